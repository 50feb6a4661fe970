"""Speed of the kernels in ``titans_lnn.kernels``, side by side; prints a Markdown table.

    python benchmarks/kernels.py --suite cpu --out benchmarks/kernels_cpu.md
    python benchmarks/kernels.py --suite gpu --out benchmarks/RESULTS.md      # needs CUDA

``--suite cpu``: each op's chunked/blocked PyTorch form against its reference loop (the
specification), forward and forward+backward, fp32, and the speed-up:
liquid_scan (B=1, D=1024; T = 1K, 4K, 16K), memory_update (the tiny model's memory: B=1, H=2, Dk=64,
hidden 128, depth 2, C=16; T = 256, 1K, 4K), sliding-window attention (the tiny model's shapes:
H=4, 2 KV heads, D=32, W=128, 4 persistent tokens; T = 1K, 4K). ``--quick`` keeps the smallest sizes.
The liquid_scan reference's fwd+bwd is not run at 16K: autograd through that loop costs O(T^2 D).

``--suite gpu`` (CUDA only): first measures the device's copy bandwidth (a large ``copy_``) and bf16
matmul rate (8192^3), then times, for T from 4K to 1M and batch 1 and 8: liquid_scan (bf16) Triton
vs chunked PyTorch vs fla's ``chunk_simple_gla`` (if ``fla`` is installed; a scalar-gated linear
attention with 64-wide heads over the same D: the closest fla op, not the same math); memory_update
Triton vs chunked PyTorch (the small model's memory: H=10, Dk=64, hidden 128, C=64; fp32, as the
model calls it); sliding-window attention (bf16): ours ("auto": flash-attn / xformers /
FlexAttention, with 16 persistent tokens) vs flash-attn's windowed attention alone (no sinks) vs the
blocked form (small model's shapes: H=10, 2 KV heads, D=64, W=512). Each row gives the time, the
bytes or FLOPs the op must move or compute (a lower bound, stated per op below), and those as
fractions of the measured copy bandwidth and matmul rate. Configurations that would not fit in memory are skipped.
"""

from __future__ import annotations

import argparse
import math
import time

import torch
import torch.nn.functional as F

from titans_lnn.cli import plain
from titans_lnn.kernels.liquid import liquid_scan_chunked, liquid_scan_ref
from titans_lnn.kernels.titans_memory import memory_update_chunked, memory_update_ref
from titans_lnn.kernels.window_attention import sliding_window_attention_blocked, sliding_window_attention_ref

# ---------------------------------------------------------------------------------------------------
# timing


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timeit(fn, device, min_time=0.2, max_reps=10, warmup=1):
    """Best wall time (s) of ``fn()`` over repeats that together take at least ``min_time``."""
    for _ in range(warmup):
        fn()
    _sync(device)
    best, total, reps = math.inf, 0.0, 0
    while reps < max_reps and (reps == 0 or total < min_time):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        dt = time.perf_counter() - t0
        best, total, reps = min(best, dt), total + dt, reps + 1
    return best


def fwd_bwd(fn, inputs):
    """A closure running fn(*inputs) and back-propagating a random weighting of every output."""
    leaves = [x.detach().clone().requires_grad_() if torch.is_tensor(x) and x.is_floating_point() else x
              for x in inputs]

    def run():
        outs = fn(*leaves)
        outs = [o for o in _flatten(outs) if o.requires_grad]
        torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])
        for x in leaves:
            if torch.is_tensor(x):
                x.grad = None

    return run


def _flatten(x):
    if isinstance(x, (tuple, list)):
        return [y for z in x for y in _flatten(z)]
    return [x]


def fwd(fn, inputs):
    def run():
        with torch.no_grad():
            fn(*inputs)

    return run


# ---------------------------------------------------------------------------------------------------
# inputs


def scan_inputs(B, T, D, device, dtype=torch.float32):
    log_a = -torch.rand(B, T, D, device=device).mul(0.1).to(dtype)
    b = torch.randn(B, T, D, device=device).to(dtype)
    return [log_a, b, torch.zeros(B, D, device=device, dtype=dtype)]


def memory_inputs(B, H, T, D, hidden, device, dtype=torch.float32):
    q = F.normalize(torch.randn(B, H, T, D, device=device), dim=-1).to(dtype)
    k = F.normalize(torch.randn(B, H, T, D, device=device), dim=-1).to(dtype)
    v = torch.randn(B, H, T, D, device=device).to(dtype)
    theta = 0.1 * torch.rand(B, H, T, device=device)
    eta = 0.5 + 0.5 * torch.rand(B, H, T, device=device)
    alpha = 0.1 * torch.rand(B, H, T, device=device)
    shapes = [(hidden, D), (D, hidden)]
    W = [0.1 * torch.randn(B, H, *s, device=device) for s in shapes]
    S = [torch.zeros(B, H, *s, device=device) for s in shapes]
    return [q, k, v, theta, eta, alpha, *W, *S]


def memory_fn(impl, C, max_grad_norm=2.0):
    def run(q, k, v, theta, eta, alpha, w1, w2, s1, s2):
        return impl(q, k, v, theta, eta, alpha, (w1, w2), (s1, s2), (w1, w2), chunk_size=C,
                    max_grad_norm=max_grad_norm)

    return run


def attention_inputs(B, H, G, T, D, Np, device, dtype=torch.float32):
    q = torch.randn(B, H, T, D, device=device, dtype=dtype)
    k, v = (torch.randn(B, G, T, D, device=device, dtype=dtype) for _ in range(2))
    sinks = [torch.randn(1, G, Np, D, device=device, dtype=dtype) for _ in range(2)] if Np else [None, None]
    return [q, k, v, *sinks]


def attention_fn(impl, window):
    def run(q, k, v, sink_k, sink_v):
        return impl(q, k, v, window=window, sink_k=sink_k, sink_v=sink_v)

    return run


# ---------------------------------------------------------------------------------------------------
# CPU suite


def cpu_suite(quick: bool, min_time: float):
    device = torch.device("cpu")
    rows = []

    def compare(op, shape, T, ref_fn, fast_fn, inputs, ref_bwd=True):
        for name, wrap in (("fwd", fwd), ("fwd+bwd", fwd_bwd)):
            # The reference loops take seconds: no warm-up, at most 3 runs.
            run_ref = ref_bwd or name == "fwd"
            t_ref = timeit(wrap(ref_fn, inputs), device, min_time, max_reps=3, warmup=0) if run_ref else None
            t_fast = timeit(wrap(fast_fn, inputs), device, min_time)
            rows.append([op, shape, _k(T), name, f"{t_ref * 1e3:.1f}" if t_ref else "(not run)",
                         f"{t_fast * 1e3:.1f}", f"{t_ref / t_fast:.1f}x" if t_ref else ""])
            print(" | ".join(rows[-1]), flush=True)

    for T in (1024,) if quick else (1024, 4096, 16384):
        # Autograd through the reference loop costs O(T^2 D) (each step's slice gradient is a full
        # (B, T, D) tensor): its fwd+bwd is left out at 16K (minutes).
        compare("liquid_scan", "B=1 D=1024", T, liquid_scan_ref, liquid_scan_chunked, scan_inputs(1, T, 1024, device),
                ref_bwd=T <= 4096)
    for T in (256,) if quick else (256, 1024, 4096):
        compare("memory_update", "B=1 H=2 Dk=64 hidden=128 C=16", T, memory_fn(memory_update_ref, 16),
                memory_fn(memory_update_chunked, 16), memory_inputs(1, 2, T, 64, 128, device))
    for T in (1024,) if quick else (1024, 4096):
        compare("attention", "B=1 H=4 G=2 D=32 W=128 Np=4", T, attention_fn(sliding_window_attention_ref, 128),
                attention_fn(sliding_window_attention_blocked, 128), attention_inputs(1, 4, 2, T, 32, 4, device))
    header = ["op", "shape", "T", "pass", "reference loop (ms)", "chunked/blocked (ms)", "speed-up"]
    return header, rows


def _k(T):
    return f"{T // 1024}K" if T >= 1024 and T % 1024 == 0 else str(T)


# ---------------------------------------------------------------------------------------------------
# GPU suite


def copy_bandwidth(device):
    """Bytes/s of a device-to-device copy of 1 GiB (read + write counted)."""
    x = torch.empty(2 ** 28, dtype=torch.float32, device=device)
    y = torch.empty_like(x)
    t = timeit(lambda: y.copy_(x), device, 0.5, 20, warmup=2)
    return 2 * x.numel() * 4 / t


def matmul_rate(device, n=8192):
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    t = timeit(lambda: a @ b, device, 0.5, 20, warmup=2)
    return 2 * n ** 3 / t


def _fits(nbytes, device, fraction=0.5):
    free, _ = torch.cuda.mem_get_info(device)
    return nbytes < fraction * free


def gpu_suite(quick: bool, min_time: float, scan_dim: int):
    from titans_lnn.kernels.liquid.triton import liquid_scan_triton
    from titans_lnn.kernels.titans_memory.triton import memory_update_triton
    from titans_lnn.kernels.window_attention.cuda import sliding_window_attention_cuda

    device = torch.device("cuda")
    bw, mm = copy_bandwidth(device), matmul_rate(device)
    print(f"{torch.cuda.get_device_name(device)}: copy {bw / 1e9:.0f} GB/s, bf16 matmul {mm / 1e12:.0f} TFLOP/s")
    Ts = [4096, 65536] if quick else [4096, 16384, 65536, 262144, 1048576]
    dt = torch.bfloat16
    rows = []

    def add(op, impl, B, T, name, t, nbytes=None, flops=None):
        row = [op, impl, str(B), _k(T), name]
        if t is None:
            row += ["skipped", "", "", "", ""]
        else:
            row.append(f"{t * 1e3:.2f}")
            row += [f"{nbytes / t / 1e9:.0f}", f"{nbytes / t / bw:.0%}"] if nbytes else ["", ""]
            row += [f"{flops / t / 1e12:.1f}", f"{flops / t / mm:.1%}"] if flops else ["", ""]
        rows.append(row)
        print(" | ".join(row), flush=True)

    def bench(op, impl, B, T, fn, inputs, nbytes, flops):
        """nbytes, flops: (forward, forward+backward) lower bounds."""
        for i, (name, wrap) in enumerate((("fwd", fwd), ("fwd+bwd", fwd_bwd))):
            try:
                t = timeit(wrap(fn, inputs), device, min_time)
            except torch.OutOfMemoryError:
                t = None
            torch.cuda.empty_cache()
            add(op, impl, B, T, name, t, nbytes and nbytes[i], flops and flops[i])

    fla_gla = _import_fla()
    for B in (1, 8):
        for T in Ts:
            # liquid_scan: reads log_a, b and writes h (fwd); the backward reads log_a, h, dh and writes
            # d_log_a, db: 3 and 8 tensors of B*T*D bf16 elements.
            D = scan_dim
            n = B * T * D * 2
            if not _fits(12 * n, device):
                add("liquid_scan", "-", B, T, "fwd", None)
                continue
            inputs = scan_inputs(B, T, D, device, dt)
            bench("liquid_scan", "triton", B, T, liquid_scan_triton, inputs, (3 * n, 8 * n), None)
            bench("liquid_scan", "torch (chunked)", B, T, liquid_scan_chunked, inputs, (3 * n, 8 * n), None)
            if fla_gla is not None:
                H = D // 64
                q, k, v = (torch.randn(B, T, H, 64, device=device, dtype=dt) for _ in range(3))
                g = F.logsigmoid(torch.randn(B, T, H, device=device)).to(dt)
                bench("liquid_scan", "fla chunk_simple_gla (H=D/64, K=V=64)", B, T,
                      lambda q, k, v, g: fla_gla(q=q, k=k, v=v, g=g)[0], [q, k, v, g], (4 * n, 10 * n), None)
            del inputs
            torch.cuda.empty_cache()
    for B in (1, 8):
        for T in Ts:
            # memory_update, small model's memory; FLOPs of the chunked closed form (per token and layer:
            # ~12 in*out for the anchor pass, delta, reads at W and S and the state update, + 2 C (in+out)
            # for the intra-chunk attention form), backward ~2x forward (recomputation).
            H, Dk, hid, C = 10, 64, 128, 64
            per_tok = 2 * (12 * Dk * hid + 2 * C * (Dk + hid))
            flops = B * H * T * per_tok
            if not _fits(B * H * T * Dk * 4 * 30, device):
                add("memory_update", "-", B, T, "fwd", None)
                continue
            inputs = memory_inputs(B, H, T, Dk, hid, device)
            for name, impl in (("triton", memory_update_triton), ("torch (chunked)", memory_update_chunked)):
                bench("memory_update", name, B, T, memory_fn(impl, C), inputs, None, (flops, 3 * flops))
            del inputs
            torch.cuda.empty_cache()
    flash = _import_flash()
    for B in (1, 8):
        for T in Ts:
            # attention: FLOPs of the window, 4 B H T W D (QK^T and PV), backward 2.5x that.
            H, G, Dh, W, Np = 10, 2, 64, 512, 16
            flops = 4 * B * H * T * W * Dh
            if not _fits(B * H * T * Dh * 2 * 12, device):
                add("attention", "-", B, T, "fwd", None)
                continue
            inputs = attention_inputs(B, H, G, T, Dh, Np, device, dt)
            bench("attention", "ours (auto, 16 sinks)", B, T, attention_fn(sliding_window_attention_cuda, W),
                  inputs, None, (flops, 3.5 * flops))
            if flash is not None:
                bench("attention", "flash-attn window (no sinks)", B, T,
                      lambda q, k, v, W=W: flash(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                 causal=True, window_size=(W - 1, 0)),
                      inputs[:3], None, (flops, 3.5 * flops))
            if T <= 65536:
                bench("attention", "torch (blocked)", B, T, attention_fn(sliding_window_attention_blocked, W), inputs,
                      None, (flops, 3.5 * flops))
            del inputs
            torch.cuda.empty_cache()
    header = ["op", "implementation", "B", "T", "pass", "ms", "GB/s", "of copy BW", "TFLOP/s", "of bf16 matmul"]
    device_line = (f"Device: {torch.cuda.get_device_name(device)}; measured copy bandwidth {bw / 1e9:.0f} GB/s, "
                   f"bf16 matmul {mm / 1e12:.0f} TFLOP/s. liquid_scan (D={scan_dim}) and attention in bf16; "
                   "memory_update in fp32, as the model calls it.")
    return header, rows, device_line


def _import_fla():
    try:
        from fla.ops.simple_gla import chunk_simple_gla
    except Exception:  # noqa: BLE001 - fla missing or broken: leave its rows out
        return None
    return chunk_simple_gla


def _import_flash():
    try:
        from flash_attn import flash_attn_func
    except Exception:  # noqa: BLE001
        return None
    return flash_attn_func


# ---------------------------------------------------------------------------------------------------


def markdown(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=plain(__doc__.split("\n\n")[0]),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--suite", choices=("cpu", "gpu"), default="cpu",
                   help="cpu: PyTorch forms vs reference loops; gpu: Triton vs PyTorch vs fla / flash-attn (CUDA)")
    p.add_argument("--out", help="also write the Markdown table to this file")
    p.add_argument("--quick", action="store_true", help="only the smallest sizes (a smoke test)")
    p.add_argument("--min-time", type=float, default=0.2, help="seconds of repeats per timing (best is kept)")
    p.add_argument("--scan-dim", type=int, default=1024, help="D of the liquid scan in the gpu suite")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.suite == "cpu":
        header, rows = cpu_suite(args.quick, args.min_time)
        title = (f"CPU ({torch.get_num_threads()} threads), fp32, torch {torch.__version__}: "
                 "the PyTorch forms vs the reference loops. Best of repeats.")
    else:
        if not torch.cuda.is_available():
            p.error("--suite gpu needs CUDA")
        header, rows, title = gpu_suite(args.quick, args.min_time, args.scan_dim)
    table = title + "\n\n" + markdown(header, rows) + "\n"
    print()
    print(table)
    if args.out:
        with open(args.out, "w") as f:
            f.write(table)


if __name__ == "__main__":
    main()
