"""Triton kernels for the CUDA path, each beside a thin wrapper that asserts layout and a torch
reference (the CPU path and the test oracle):

    kv_write.py          new K/V rows into the paged cache by slot mapping
    paged_attention.py   decode + (chunked) prefill attention over block tables, GQA-aware
    rmsnorm.py           RMSNorm fused with the residual add
    rope.py              rotary embedding of q and k in one launch
    quant_matmul.py      weight-only int8 (per channel) and int4 (group-wise) matmuls
    attention_backend.py the "triton" AttentionBackend (registers itself on import)

Each module has `op_triton` (CUDA, or CPU under TRITON_INTERPRET=1), `op_reference` (torch) and
`op` (Triton on CUDA, torch elsewhere). Nothing here is imported by the CPU engine; triton itself
is imported through `_triton.py`, which tolerates its absence.
"""
