"""Regenerate the Python gRPC stubs that are checked in beside each .proto under protos/.

    .venv/bin/python scripts/gen_protos.py          # rewrite the stubs in place
    .venv/bin/python scripts/gen_protos.py --check  # exit 1, listing every stub that drifted

Stubs are generated with `-I protos`, so generated imports read
`from switchyard.common.v1 import common_pb2` and the import root is `protos/`. The managed files
are the `*_pb2.py`, `*_pb2.pyi` and `*_pb2_grpc.py` stubs plus an empty `__init__.py` in every
package directory. Output depends only on the .proto sources and the pinned grpcio-tools version.
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from google.protobuf import descriptor_pb2

REPO_ROOT = Path(__file__).resolve().parents[1]
PROTO_ROOT = REPO_ROOT / "protos"
STUB_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def find_protos(proto_root: Path) -> list[str]:
    """The .proto files under `proto_root`, as sorted POSIX paths relative to it."""
    return sorted(p.relative_to(proto_root).as_posix() for p in proto_root.rglob("*.proto"))


def _protoc(proto_root: Path, args: list[str]) -> None:
    """Run `python -m grpc_tools.protoc -I proto_root ARGS <all protos>`, raising on failure."""
    protos = find_protos(proto_root)
    if not protos:
        raise FileNotFoundError(f"no .proto files under {proto_root}")
    cmd = [sys.executable, "-m", "grpc_tools.protoc", f"-I{proto_root}", *args, *protos]
    result = subprocess.run(cmd, cwd=proto_root, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"protoc failed ({result.returncode}):\n{result.stderr}")


def generate(proto_root: Path, out_dir: Path) -> None:
    """Generate every managed file for the protos under `proto_root` into `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    _protoc(proto_root, [f"--python_out={out_dir}", f"--pyi_out={out_dir}",
                         f"--grpc_python_out={out_dir}"])
    for proto in find_protos(proto_root):
        package_dir = Path(proto).parent
        while package_dir != Path("."):
            (out_dir / package_dir / "__init__.py").touch()
            package_dir = package_dir.parent


def descriptor_set(proto_root: Path = PROTO_ROOT) -> descriptor_pb2.FileDescriptorSet:
    """The compiled descriptors of the protos under `proto_root`, with comments (source info)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "descriptors.pb"
        _protoc(proto_root, ["--include_source_info", f"--descriptor_set_out={out}"])
        return descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())


def managed_files(root: Path) -> set[str]:
    """Stubs and package `__init__.py` files under `root`, as POSIX paths relative to it."""
    found = set()
    for path in root.rglob("*"):
        if not path.is_file() or "__pycache__" in path.parts:
            continue
        rel = path.relative_to(root)
        is_package_init = path.name == "__init__.py" and len(rel.parts) > 1
        if is_package_init or path.name.endswith(STUB_SUFFIXES):
            found.add(rel.as_posix())
    return found


def check(proto_root: Path = PROTO_ROOT) -> list[str]:
    """Compare the checked-in managed files with a fresh generation.

    Returns one line per problem, sorted: `differs: PATH`, `missing: PATH` (should exist but does
    not) or `extra: PATH` (exists but nothing generates it). Empty means up to date.
    """
    with tempfile.TemporaryDirectory() as tmp:
        fresh = Path(tmp)
        generate(proto_root, fresh)
        expected, actual = managed_files(fresh), managed_files(proto_root)
        problems = [f"missing: {p}" for p in expected - actual]
        problems += [f"extra: {p}" for p in actual - expected]
        problems += [
            f"differs: {p}"
            for p in expected & actual
            if not filecmp.cmp(fresh / p, proto_root / p, shallow=False)
        ]
    return sorted(problems, key=lambda line: (line.split(": ", 1)[1], line))


def write(proto_root: Path = PROTO_ROOT) -> list[str]:
    """Bring the checked-in managed files up to date; returns the problems that were fixed."""
    problems = check(proto_root)
    with tempfile.TemporaryDirectory() as tmp:
        fresh = Path(tmp)
        generate(proto_root, fresh)
        for line in problems:
            kind, rel = line.split(": ", 1)
            if kind == "extra":
                (proto_root / rel).unlink()
            else:
                (proto_root / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(fresh / rel, proto_root / rel)
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="do not write; exit 1 if any stub differs, is missing or is extra")
    parser.add_argument("--proto-root", type=Path, default=PROTO_ROOT,
                        help="directory holding switchyard/**.proto (default: %(default)s)")
    args = parser.parse_args(argv)
    root = args.proto_root.resolve()
    if args.check:
        problems = check(root)
        for line in problems:
            print(line)
        if problems:
            print(f"{len(problems)} stub file(s) out of date; run scripts/gen_protos.py",
                  file=sys.stderr)
            return 1
        print("stubs up to date")
        return 0
    fixed = write(root)
    for line in fixed:
        print(f"updated ({line})")
    print(f"{len(fixed)} file(s) updated")
    return 0


if __name__ == "__main__":
    sys.exit(main())
