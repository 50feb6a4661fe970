"""The liquid core's recurrence, per token: the specification of the liquid scan.

    h_t = exp(log_a_t) * h_{t-1} + b_t            (elementwise over D)

This is the exact solution of the liquid time-constant ODE over one step with the input held
constant (DESIGN.md, "Liquid core"): ``log_a = -dt * lambda`` and ``b = (1 - a) * g``.

Every form of the op has the signature ``(log_a, b, h0) -> (h, h_last)``: ``liquid_scan_ref`` here
(the loop; the oracle), ``liquid_scan_chunked`` (``chunked.py``, parallel over time in PyTorch) and
``liquid_scan_triton`` (``triton.py``).
"""

from __future__ import annotations

import torch


def check_inputs(log_a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor | None) -> None:
    """Raise ``ValueError`` unless log_a, b are (B, T, D) and h0 is (B, D) or None."""
    if log_a.dim() != 3 or log_a.shape != b.shape:
        raise ValueError(f"liquid_scan: log_a and b must both be (B, T, D); got {tuple(log_a.shape)} "
                         f"and {tuple(b.shape)}")
    if h0 is not None and h0.shape != (b.shape[0], b.shape[2]):
        raise ValueError(f"liquid_scan: h0 must be (B, D) = {(b.shape[0], b.shape[2])}; got {tuple(h0.shape)}")


def liquid_scan_ref(log_a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor | None = None):
    """Reference scan. log_a, b: (B, T, D); h0: (B, D) or None (zeros).

    Returns h: (B, T, D) and h_last: (B, D) (equal to h0 when T = 0).
    """
    check_inputs(log_a, b, h0)
    B, T, D = b.shape
    h = torch.zeros(B, D, dtype=torch.float32 if b.dtype in (torch.float16, torch.bfloat16) else b.dtype,
                    device=b.device) if h0 is None else h0.to(torch.promote_types(h0.dtype, torch.float32))
    outs = []
    for t in range(T):
        h = torch.exp(log_a[:, t].to(h.dtype)) * h + b[:, t].to(h.dtype)
        outs.append(h)
    hs = torch.stack(outs, dim=1) if outs else b.new_zeros(B, 0, D, dtype=h.dtype)
    return hs.to(b.dtype), h.to(b.dtype)
