"""The model runner owns every tensor: the weights, the paged KV cache and per-request RNGs.

`execute(scheduler_output)` turns one step's plain-Python schedule into flat input tensors and an
`AttentionMetadata`, runs the model once over the mixed batch (prefill chunks and decodes
together), computes logits only for rows that sample, and returns plain `ModelOutput`.
"""

from __future__ import annotations

import logging
import math
import mmap
import os
import time
from dataclasses import dataclass

import torch

from services.worker.model import cpu_attention  # noqa: F401  (registers the "cpu" backend)
from services.worker.model.attention import (AttentionMetadata, forward_context, get_backend,
                                             select_backend)
from services.worker.model.loader import LoadedModel

from . import sampler
from .config import CacheConfig, num_blocks_for_budget
from .outputs import ModelOutput, SchedulerOutput

logger = logging.getLogger(__name__)

DEFAULT_KV_FRACTION = 0.1
"""Share of available memory given to the KV cache when the config sets no budget."""


@dataclass(frozen=True)
class TokenLogprobs:
    """Logprobs of one sampled token: its own, and the top-k alternatives (id, logprob)."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...]


def kv_bytes_per_block(loaded: LoadedModel, block_size: int, dtype: torch.dtype) -> int:
    c = loaded.config
    elem = torch.empty((), dtype=dtype).element_size()
    return 2 * c.num_layers * block_size * c.num_kv_heads * c.head_dim * elem


def _available_memory(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free
    # Host memory the OS could give us now (MemAvailable), without a psutil dependency.
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)
"""Linux >= 5.14: fault pages in writable now (Python 3.11's mmap module lacks the name)."""


def _zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device,
           prefault: bool = False) -> torch.Tensor:
    """A zeroed tensor. On CPU an anonymous mapping gives zero pages lazily: a multi-GB KV pool
    costs nothing until used (torch.zeros memsets every page: ~1.4 s/GiB on this machine).
    prefault: fault every page in now instead (after the huge-page advice, so it gets huge
    pages), keeping first-touch zeroing off the serving path.

    The mapping asks for transparent huge pages. Decode writes each new token's K/V rows into
    pages touched for the first time, and with 4 KiB pages that is a page fault every ~5 tokens
    per sequence and layer: 4.7 ms of a 90 ms step at 32 sequences of SmolLM2 (measured; 0.9 ms
    with huge pages). Where THP is off ("never"), the advice is ignored.
    """
    if device.type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    buf = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_HUGEPAGE"):
        try:
            buf.madvise(mmap.MADV_HUGEPAGE)
        except OSError as e:  # e.g. a kernel built without THP
            logger.debug("no huge pages for the KV pool: %s", e)
    tensor = torch.frombuffer(buf, dtype=dtype).view(shape)  # the tensor keeps `buf` alive
    if prefault:
        try:
            buf.madvise(MADV_POPULATE_WRITE)
        except OSError:  # kernel older than 5.14: touch one element per 4 KiB page instead
            tensor.view(-1)[:: 4096 // tensor.element_size()].zero_()
    return tensor


def resolve_num_blocks(cfg: CacheConfig, bytes_per_block: int, device: torch.device) -> int:
    """Block count from the config: explicit count, byte budget, or a fraction of free memory."""
    if cfg.num_blocks is not None:
        return cfg.num_blocks
    if cfg.memory_bytes is not None:
        return num_blocks_for_budget(cfg.memory_bytes, bytes_per_block)
    fraction = cfg.memory_fraction if cfg.memory_fraction is not None else DEFAULT_KV_FRACTION
    return num_blocks_for_budget(int(_available_memory(device) * fraction), bytes_per_block)


class ModelRunner:
    """Runs scheduled steps on one device."""

    def __init__(self, loaded: LoadedModel, cache_config: CacheConfig,
                 kv_dtype: torch.dtype | None = None,
                 attention_backend: str | None = None) -> None:
        """attention_backend: a registered backend name; None picks the best for the device."""
        self.model = loaded.model
        self.config = loaded.config
        self.device = next(self.model.parameters()).device
        self.block_size = cache_config.block_size
        self.kv_dtype = kv_dtype or next(self.model.parameters()).dtype
        per_block = kv_bytes_per_block(loaded, self.block_size, self.kv_dtype)
        self.num_blocks = resolve_num_blocks(cache_config, per_block, self.device)
        c = self.config
        shape = (c.num_layers, 2, self.num_blocks, self.block_size, c.num_kv_heads, c.head_dim)
        start = time.perf_counter()
        self._kv = _zeros(shape, self.kv_dtype, self.device, prefault=cache_config.prefault)
        # kv_caches[layer]: [2 (K, V), num_blocks, block_size, num_kv_heads, head_dim]
        self.kv_caches = list(self._kv.unbind(0))
        logger.info("KV cache: %d blocks of %d tokens (%.1f MiB, %s in %.2f s)", self.num_blocks,
                    self.block_size, self.num_blocks * per_block / 2**20,
                    "faulted in" if cache_config.prefault else "lazy",
                    time.perf_counter() - start)
        if self.device.type == "cuda":
            # Registers "triton" (priority 20, CUDA only); imported here so CPU workers never
            # need triton importable.
            from services.worker.kernels import attention_backend  # noqa: F401
        self.attention_backend = attention_backend or select_backend(self.device, self.kv_dtype)
        self._attention = get_backend(self.attention_backend)
        logger.info("attention backend: %s", self.attention_backend)
        self._generators: dict[str, torch.Generator] = {}

    def release(self, request_ids) -> None:
        """Forgets per-request state (seeded generators) of finished requests."""
        for rid in request_ids:
            self._generators.pop(rid, None)

    def _generator(self, request) -> torch.Generator | None:
        seed = request.sampling_params.seed
        if seed is None or request.sampling_params.greedy:
            return None
        gen = self._generators.get(request.request_id)
        if gen is None:
            gen = torch.Generator(device=self.device).manual_seed(seed)
            self._generators[request.request_id] = gen
        return gen

    def _prepare(self, so: SchedulerOutput) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        bs = self.block_size
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        qsl = [0]
        seq_lens = []
        for s in so.scheduled:
            start, end = s.start_position, s.end_position
            ids.extend(s.token_ids)
            positions.extend(range(start, end))
            blocks = s.block_ids
            slots.extend(blocks[p // bs] * bs + p % bs for p in range(start, end))
            qsl.append(qsl[-1] + s.num_new_tokens)
            seq_lens.append(end)
        width = max(len(s.block_ids) for s in so.scheduled)
        tables = [list(s.block_ids) + [0] * (width - len(s.block_ids)) for s in so.scheduled]
        dev = self.device
        meta = AttentionMetadata(
            query_start_loc=qsl,
            seq_lens=seq_lens,
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=dev),
            block_tables=torch.tensor(tables, dtype=torch.int64, device=dev),
            kv_caches=self.kv_caches,
            backend=self._attention,
        )
        return (torch.tensor(ids, dtype=torch.int64, device=dev),
                torch.tensor(positions, dtype=torch.int64, device=dev), meta)

    @torch.inference_mode()
    def execute(self, so: SchedulerOutput) -> ModelOutput:
        """Runs one step; returns the sampled token of every request whose step reaches its end."""
        self.release(so.finished_request_ids)
        if so.is_empty:
            return ModelOutput()
        input_ids, positions, meta = self._prepare(so)
        with forward_context(meta):
            hidden = self.model(input_ids, positions)  # [T, hidden]
        rows = [i for i, s in enumerate(so.scheduled) if s.will_sample]
        if not rows:
            return ModelOutput()
        last = torch.tensor([meta.query_start_loc[i + 1] - 1 for i in rows], device=self.device)
        logits = self.model.compute_logits(hidden.index_select(0, last))  # [B, vocab]
        reqs = [so.scheduled[i].request for i in rows]
        batch = sampler.prepare(
            [sampler.SamplingRow(r.sampling_params, r.prompt_token_ids, r.output_token_ids,
                                 self._generator(r)) for r in reqs],
            logits.shape[-1], self.device)
        out = sampler.sample(logits, batch)
        tokens = out.token_ids.tolist()  # the step's one host sync
        sampled = {r.request_id: t for r, t in zip(reqs, tokens)}
        return ModelOutput(sampled_token_ids=sampled, logprobs=_logprobs(reqs, tokens, out))


def _logprobs(reqs, tokens: list[int], out: sampler.SamplerOutput) -> dict | None:
    if out.sampled_logprobs is None:
        return None
    lp = out.sampled_logprobs.tolist()
    top_ids = out.top_ids.tolist() if out.top_ids is not None else None
    top_lps = out.top_logprobs.tolist() if out.top_logprobs is not None else None
    result = {}
    for i, (r, tok) in enumerate(zip(reqs, tokens)):
        k = r.sampling_params.logprobs
        if k is None:
            continue
        top = tuple(zip(top_ids[i][:k], top_lps[i][:k])) if k and top_ids else ()
        result[r.request_id] = TokenLogprobs(tok, lp[i], top)
    return result
