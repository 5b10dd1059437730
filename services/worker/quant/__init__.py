"""Weight-only quantization as module replacement: `Int8Linear` (per output channel, int8.py)
and `Int4Linear` (group-wise with zero points, int4.py) stand in for nn.Linear.

    load_model(path, quantization="int4")               # model/loader.py, from the checkpoint
    schemes.quantize_model(model, QuantConfig("int8"))  # an already-loaded float model

config.py     QuantConfig (scheme, int4 group size, LM-head scheme, int8 rounding)
schemes.py    the scheme registry; shells swapped in for nn.Linear; quantize_model
loading.py    a checkpoint's tensors routed to the rows of their (fused) quantized layer
gguf_blocks.py GGUF Q4_1 / Q8_0 blocks decoded to codes + scales (Q4_1 -> int4 g32 as is)
gptq.py       GPTQ rounding for int8 and its calibration on text
base.py       what both linears share (row loading, forward dispatch), the tied embedding
int8.py, int4.py   the two formats
int4_cpu.py   reading codes back out of torch's CPU int4pack layout

On CUDA the linears run the Triton kernels of services/worker/kernels/quant_matmul.py; on CPU
torch's packed weight-only kernels (few rows) or dequantize + GEMM (many rows).
This package imports nothing on import (the worker reads config.py before torch loads).
"""
