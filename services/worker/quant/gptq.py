"""GPTQ rounding (Frantar et al., 2022) for per-channel int8, and the calibration it needs.

Round-to-nearest rounds each weight on its own. GPTQ rounds one input column at a time and
pushes that column's rounding error onto the columns not yet rounded, weighted through the
inverse of H = X^T X, the Gram matrix of the layer's inputs on calibration text: the rounding
then minimizes the layer's output error on inputs like those, not the weight error. On SmolLM2
(bench/quant_quality.py, decode path) int8 top-1 agreement with float32 was 95.3% with round
to nearest (1k tokens, before the kernel's scales moved to float32) and is 97.1% with GPTQ and
act-order (4k tokens); mean KL 0.0062 -> 0.0021. It costs ~30-60 s of load on the 2-core CPU.

Calibration text is Python's help topics (`pydoc_data.topics`) read from the end of the corpus,
disjoint from the windows bench/quant_quality.py scores (which start at the beginning).
"""

from __future__ import annotations

import torch
from torch import nn

from services.worker.model.attention import AttentionMetadata, forward_context

CALIBRATION_TOKENS = 1024
CALIBRATION_WINDOW = 512


def calibration_ids(tokenizer, num_tokens: int = CALIBRATION_TOKENS) -> list[int]:
    """The last `num_tokens` tokens of the help-topics corpus (keys in order)."""
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[key] for key in sorted(topics))
    return tokenizer.encode(text[-12 * num_tokens:], add_special_tokens=False)[-num_tokens:]


@torch.no_grad()
def collect_hessians(model: nn.Module, ids: list[int],
                     window: int = CALIBRATION_WINDOW) -> dict[str, torch.Tensor]:
    """H = X^T X (float32 [K, K]) of the inputs of every nn.Linear, over `ids` run as windows of
    causal attention (no KV cache). The LM head's comes from the final hidden states."""
    hessians: dict[str, torch.Tensor] = {}

    def hook(path: str):
        def add(module, inputs, output) -> None:
            x = inputs[0].reshape(-1, inputs[0].shape[-1]).float()
            h = hessians.get(path)
            hessians[path] = x.t() @ x if h is None else h.addmm_(x.t(), x)
        return add

    handles = [m.register_forward_hook(hook(p)) for p, m in model.named_modules()
               if type(m) is nn.Linear]
    device = next(model.parameters()).device
    try:
        for s in range(0, len(ids), window):
            chunk = torch.tensor(ids[s:s + window], device=device)
            with forward_context(AttentionMetadata.for_prefill([len(chunk)])):
                hidden = model(chunk, torch.arange(len(chunk), device=device))
            model.compute_logits(hidden)  # runs the LM head's hook
    finally:
        for h in handles:
            h.remove()
    return hessians


@torch.no_grad()
def gptq_int8(weight: torch.Tensor, hessian: torch.Tensor, block: int = 32,
              damp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [L, N, K] (L layers of one shape) or [N, K], hessian [L, K, K] or [K, K]
    -> (q int8 like weight, scale float32 [L, N] or [N]); w ~ q * scale.

    Scales are the round-to-nearest ones (row absmax / 127); GPTQ only changes the rounding.
    The column loop is Python, so layers of one shape go through it together (30x fewer
    iterations for SmolLM2); columns are rows of the transposed weight, so each step touches
    contiguous memory. Within a block of columns each column gathers its predecessors' errors
    on demand; across blocks the errors go out in one batched GEMM.
    """
    single = weight.dim() == 2
    w = weight.float().clone()
    h = hessian.float().clone()
    if single:
        w, h = w[None], h[None]
    # act-order: round the columns with the largest input energy first, while the most columns
    # remain to absorb their error (one order per stacked layer).
    order = torch.argsort(h.diagonal(dim1=1, dim2=2), dim=1, descending=True)  # [L, K]
    w = torch.gather(w, 2, order[:, None, :].expand_as(w))
    h = torch.gather(torch.gather(h, 1, order[:, :, None].expand_as(h)), 2,
                     order[:, None, :].expand_as(h))
    diag = h.diagonal(dim1=1, dim2=2)  # a view: writes land in h
    dead = diag == 0  # inputs that never fire: their weights cannot matter
    diag[dead] = 1.0
    w.masked_fill_(dead[:, None, :], 0.0)
    diag.add_(damp * diag.mean(dim=1, keepdim=True))
    # Upper Cholesky factor of H^-1: row i holds the update weights of column i's error.
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    scale = w.abs().amax(dim=2) / 127.0  # [L, N]
    inv = torch.where(scale > 0, 1.0 / scale, torch.zeros_like(scale))
    wt = w.transpose(1, 2).contiguous()  # [L, K, N]: column i of W is row i here
    k = wt.shape[1]
    qt = torch.empty(wt.shape, dtype=torch.int8, device=wt.device)
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        w1 = wt[:, i1:i2]  # [L, B, N]
        err = torch.empty_like(w1)
        hb = hinv[:, i1:i2, i1:i2]  # [L, B, B]
        for i in range(i2 - i1):
            # Column i after the errors of the block's earlier columns, applied lazily: one
            # read of those errors instead of rewriting the whole block per column.
            col = w1[:, i] - torch.bmm(hb[:, None, :i, i], err[:, :i])[:, 0] if i else w1[:, 0]
            qc = torch.round(col * inv).clamp_(-127, 127)
            qt[:, i1 + i] = qc.to(torch.int8)
            err[:, i] = (col - qc * scale) / hb[:, i, i, None]
        # The block's errors onto the columns after it: [L, K-i2, B] @ [L, B, N].
        wt[:, i2:].baddbmm_(hinv[:, i1:i2, i2:].transpose(1, 2), err, alpha=-1.0)
    q = torch.empty_like(qt.transpose(1, 2))
    q.scatter_(2, order[:, None, :].expand_as(q), qt.transpose(1, 2))  # undo the column order
    return (q[0], scale[0]) if single else (q, scale)
