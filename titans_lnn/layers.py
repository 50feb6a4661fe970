"""Small building blocks shared by the model's sub-layers: RMSNorm, RoPE, SwiGLU MLP, a depthwise
causal convolution that carries its last inputs as streaming state, the pre-norm residual step of a
stateful layer (``Residual``), and the two markers the model's initialisation reads (``residual_output``,
``OwnInit``)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def residual_output(linear: nn.Linear) -> nn.Linear:
    """Mark ``linear`` as a projection that writes into the residual stream: the model initialises it
    with std init_std / sqrt(2 n_layers) (GPT-2), so that the stream's variance does not grow with depth."""
    linear.residual_output = True
    return linear


class OwnInit:
    """Mixin of modules that set some of their parameters themselves (the memory's initial weights and
    gates, the liquid core's time constants, the convolutions' identity start). The model first
    initialises every linear and embedding weight, then calls ``reset_own_parameters`` on these."""

    def reset_own_parameters(self) -> None:
        raise NotImplementedError


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * g. x: (..., D)."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return y.to(x.dtype) * self.weight


def rope(x: torch.Tensor, pos: int, theta: float) -> torch.Tensor:
    """Rotate pairs of channels of x: (B, H, T, D) by angle (pos + t) * theta^(-2i/D)."""
    return apply_rope(x, rope_table(pos, x.shape[2], x.shape[3], theta, x.dtype, x.device))


def rope_table(pos: int, T: int, D: int, theta: float, dtype: torch.dtype, device=None) -> torch.Tensor:
    """The rotations of positions pos .. pos + T - 1 for ``apply_rope``: (T, D/2), complex for float32/64
    (cos + i sin), real (T, D/2, 2) [cos, sin] for half precisions (no complex type on every device).

    The angles are computed in float64: at a position of millions, a float32 product loses the
    fraction of a radian that RoPE's low-frequency pairs carry. A table serves every tensor rotated at
    those positions (MAC: q, k and the memory stream's keys of a piece, sliced per segment)."""
    inv_freq = theta ** (-torch.arange(0, D, 2, dtype=torch.float64, device=device) / D)  # (D/2,)
    t = torch.arange(pos, pos + T, dtype=torch.float64, device=device)
    ang = t[:, None] * inv_freq[None]  # (T, D/2)
    cos, sin = ang.cos().to(dtype), ang.sin().to(dtype)
    if rope_table_dtype(dtype).is_complex:
        return torch.complex(cos, sin)
    return torch.stack((cos, sin), dim=-1)


def rope_table_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of ``rope_table(..., dtype)``: complex for float32/64 in eager mode; real (the pair formula)
    for half precisions and under torch.compile (which traces the real ops and fuses them itself)."""
    if torch.compiler.is_compiling():
        return dtype
    return {torch.float32: torch.complex64, torch.float64: torch.complex128}.get(dtype, dtype)


def apply_rope(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """x: (B, H, T, D) with channel pairs (2i, 2i + 1) rotated by ``table`` (``rope_table``'s, T rows):
    (x_2i + i x_2i+1) (cos + i sin). One complex multiply (forward 8x, forward + backward 4x faster than
    the seven real ops of the pair formula at T = 128..1024 on a CPU thread; equal to rounding: the
    complex kernel may fuse multiply-adds, an ulp in fp32)."""
    pairs = x.unflatten(-1, (-1, 2))  # (B, H, T, D/2, 2)
    if table.is_complex():
        if pairs.stride(-1) != 1 or pairs.storage_offset() % 2 or any(st % 2 for st in pairs.stride()[:-1]):
            pairs = pairs.contiguous()  # view_as_complex needs (re, im) adjacent and complex-aligned
        return torch.view_as_real(torch.view_as_complex(pairs) * table).flatten(-2)
    cos, sin = table.unbind(-1)
    x1, x2 = pairs.unbind(-1)
    return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)  # (B, H, T, D/2, 2)


class SwiGLU(nn.Module):
    """y = W_2 (silu(W_1 x) * W_3 x). x: (B, T, D) -> (B, T, D)."""

    def __init__(self, dim: int, mult: float):
        super().__init__()
        hidden = int(dim * mult * 2 / 3 + 7) // 8 * 8  # same parameters as a 4x GELU MLP at mult=4
        self.w13 = nn.Linear(dim, 2 * hidden, bias=False)
        self.w2 = residual_output(nn.Linear(hidden, dim, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.w13(x).chunk(2, dim=-1)
        return self.w2(F.silu(a) * b)


class CausalConv(OwnInit, nn.Module):
    """Depthwise causal convolution: y_t = sum_j w_j * x_{t-j} + b, j < K. x: (B, T, D).

    Its streaming state is the last K - 1 inputs, (B, K - 1, D), zeros before the sequence.
    """

    def __init__(self, dim: int, kernel: int):
        super().__init__()
        self.kernel = kernel
        self.conv = nn.Conv1d(dim, dim, kernel, groups=dim, bias=True)
        self.reset_own_parameters()

    def reset_own_parameters(self) -> None:
        """Start as the identity (current-token tap 1, others and bias 0): a random bias would give
        every token nearly the same memory key, and a chunk of identical keys is a 16x step."""
        with torch.no_grad():
            self.conv.weight.zero_()
            self.conv.weight[:, :, -1] = 1.0
            self.conv.bias.zero_()

    def init_state(self, batch_size: int, device=None, dtype=torch.float32) -> torch.Tensor:
        return torch.zeros(batch_size, self.kernel - 1, self.conv.in_channels, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        xx = torch.cat([state.to(x.dtype), x], dim=1)  # (B, K-1+T, D)
        y = causal_conv(xx, self.conv.weight, self.conv.bias)  # (B, T, D)
        return y, xx[:, xx.shape[1] - (self.kernel - 1):].clone()  # a copy: a view would pin the whole input


def causal_conv(xx: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """y_t = sum_j weight[:, 0, j] * xx_{t+j} + bias: the depthwise convolution of ``nn.Conv1d(D, D, K,
    groups=D)`` on xx (B, K-1+T, D) (the K-1 earlier inputs, then the T new ones) -> (B, T, D), without
    the (B, D, T) transposes and the convolution kernel, which cost ~60 us forward and ~300-400 us
    backward per call on the CPU at any T up to a few hundred (a per-segment, per-chunk op here).
    Short pieces (decode steps, memory chunks) take all K taps of every t at once as an ``unfold`` view
    (one multiply, one sum); longer ones add K shifted products (K addcmuls: no (B, T, D, K) product).
    On one CPU thread, forward + backward: T = 16: 290 -> 90 us; T = 128: 450 -> 210 us; T = 1024
    (D = 256): 2.8 -> 1.6 ms."""
    K, T = weight.shape[-1], xx.shape[1] - weight.shape[-1] + 1
    w = weight[:, 0]  # (D, K)
    if T <= 32:
        return (xx.unfold(1, K, 1) * w).sum(-1) + bias  # (B, T, D, K) -> (B, T, D)
    wt = w.t().contiguous()  # (K, D); contiguous: a strided row broadcast runs ~4x slower (T = 128, D = 384)
    y = torch.addcmul(bias, xx[:, :T], wt[0])
    for j in range(1, K):
        y = torch.addcmul(y, xx[:, j:j + T], wt[j])
    return y


class Residual(nn.Module):
    """A stateful layer as a pre-norm residual step: x -> x + layer(norm(x)), carrying the layer's state.
    forward(x, state, **kwargs) -> (x', state'); ``kwargs`` go to the layer (the liquid core's dt)."""

    def __init__(self, layer: nn.Module, dim: int, eps: float = 1e-5):
        super().__init__()
        self.norm = RMSNorm(dim, eps)
        self.layer = layer

    def init_state(self, batch_size: int, device=None, dtype=torch.float32):
        return self.layer.init_state(batch_size, device, dtype)

    def forward(self, x: torch.Tensor, state=None, **kwargs):
        y, state = self.layer(self.norm(x), state, **kwargs)
        return x + y, state
