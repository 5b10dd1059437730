"""Compiles the worker's small C kernels on first use and loads them with ctypes.

Built on the machine that runs them (`-march=native`), cached by a hash of the source, the flags
and the compiler, so a second process or run loads the cached library at once. A build writes
to a temporary file and renames it, so workers starting together never load a half-written one.
No torch headers and no Python headers are involved: the kernels take raw pointers, which keeps
a build to about a second of `cc`.

OpenMP: the library links `libgomp.so.1`, the soname of the runtime torch ships and has already
loaded, so the dynamic loader reuses torch's runtime (one thread pool, not two fighting over 2
cores). Import torch before loading a library.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Callable

logger = logging.getLogger(__name__)

SOURCE_DIR = Path(__file__).resolve().parent
CFLAGS = ("-O3", "-march=native", "-fPIC", "-shared", "-fopenmp", "-ffp-contract=fast")
# Vectorized float reductions (dot products) and exp (glibc's libmvec) need fast math; those
# kernels keep every value finite, so its finite-math assumption holds.
FAST_MATH = ("-ffast-math",)
LIBRARY_FLAGS: dict[str, tuple[str, ...]] = {
    "paged_attention": FAST_MATH,
    "fused_ops": FAST_MATH,
    # No fast math: each output must stay one FMA chain in k order (batch invariance).
    "linear": (),
}
"""Flags per library on top of CFLAGS; a library not listed here gets none."""

_lock = threading.Lock()
_loaded: dict[str, ctypes.CDLL | None] = {}


class NativeBuildError(RuntimeError):
    """No C compiler, or the source did not compile."""


def cache_dir() -> Path:
    """Where built libraries live: $SWITCHYARD_NATIVE_CACHE, else ~/.cache/switchyard/native."""
    env = os.environ.get("SWITCHYARD_NATIVE_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "switchyard" / "native"


def _compiler() -> str:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc:
        raise NativeBuildError("no C compiler found (set CC, or install gcc)")
    return cc


def _compiler_id(cc: str) -> str:
    try:
        return subprocess.run([cc, "--version"], capture_output=True, text=True,
                              check=True).stdout.splitlines()[0]
    except (OSError, subprocess.CalledProcessError, IndexError) as e:
        raise NativeBuildError(f"C compiler {cc!r} does not run: {e}") from e


def _cpu_flags() -> str:
    """The CPU's feature flags: a library built with -march=native must not be loaded on a
    machine with fewer (a shared home directory, a copied cache)."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return ""


def build(name: str) -> Path:
    """Compiles `<name>.c` beside this module (if not cached) and returns the library path."""
    src = SOURCE_DIR / f"{name}.c"
    cc = _compiler()
    flags = (*CFLAGS, *LIBRARY_FLAGS.get(name, ()))
    # Headers beside the sources are hashed too: a library includes them.
    headers = b"".join(h.read_bytes() for h in sorted(SOURCE_DIR.glob("*.h")))
    key = hashlib.sha256(src.read_bytes() + headers + " ".join(flags).encode()
                         + _compiler_id(cc).encode() + _cpu_flags().encode()).hexdigest()[:16]
    out = cache_dir() / f"{name}-{key}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        proc = subprocess.run([cc, *flags, "-o", tmp, str(src), "-lm"],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise NativeBuildError(f"compiling {src.name} failed:\n{proc.stderr.strip()}")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    logger.info("built native kernel %s", out)
    return out


def load(name: str) -> ctypes.CDLL:
    """Builds (once per process) and loads `<name>.c`; raises NativeBuildError on failure."""
    with _lock:
        if name not in _loaded:
            import torch  # noqa: F401  (torch's libgomp must be loaded first; see module doc)
            try:
                _loaded[name] = ctypes.CDLL(str(build(name)))
            except NativeBuildError:
                _loaded[name] = None
                raise
        lib = _loaded[name]
    if lib is None:
        raise NativeBuildError(f"native kernel {name!r} failed to build earlier in this process")
    return lib


class Probe:
    """`probe()` says whether a native library builds and loads here: `setup` (which loads it
    and binds its functions) runs once per process; a failure is logged once and callers fall
    back to torch. After the first call the answer is read without a lock (per-op paths)."""

    def __init__(self, what: str, setup: Callable[[], object]) -> None:
        self._what, self._setup = what, setup
        self._state: bool | None = None
        self._lock = threading.Lock()

    def __call__(self) -> bool:
        if self._state is not None:
            return self._state
        with self._lock:
            if self._state is None:
                try:
                    self._setup()
                    self._state = True
                except NativeBuildError as e:
                    logger.warning("%s unavailable, using torch: %s", self._what, e)
                    self._state = False
            return self._state
