"""The sections of the suite: each runs its jobs and returns a plain dict that ``bench_report`` renders.

    0 kernels   the kernel suite of ``kernels.py`` (chunked forms vs reference loops; Triton on CUDA)
    1 liquid    our liquid core vs ncps CfC, forward tokens/s vs T
    2 memory    our neural memory vs titans-pytorch's, forward and forward+backward tokens/s vs T
    3 model     the tiny MAC vs titans-pytorch's MemoryAsContextTransformer: training and inference
                tokens/s and peak memory, T grown until a memory or time limit
    4 scaling   full causal attention (our ``full`` ablation) vs the hybrid: time and memory vs T, exponents
    5 streaming the tiny MAC reads 1M tokens of KJV text and the E. coli genome (bench_streaming.py)
    6 decode    ms per generated token after a short and a long prompt (bench_decode.py)
    7 long_training  one training pass over a long sequence with activation checkpointing: peak RSS,
                gradients vs the plain pass

A section dict: id, key, title, target, status (MET / NOT MET / PARTLY MET / INFO / SKIPPED /
INCOMPLETE), measured (one line), tables [{caption, header, rows}], notes [str], plots [{file,
panels}], profile (str or None), data (raw records), wall_s.
"""

from __future__ import annotations

import importlib.util
import math

import bench_models
from bench_common import fit_exponent, fit_linear, fmt_rate, fmt_ratio, fmt_tokens, k
from bench_runner import HERE, Ctx, launch, run_with_status

GB = 1e9


def new_section(id_: int, key: str, title: str, target: str | None) -> dict:
    return dict(id=id_, key=key, title=title, target=target, status="INCOMPLETE", measured="", tables=[], notes=[],
                plots=[], profile=None, data={}, wall_s=0.0)


def skip_missing(sec: dict, ctx: Ctx, names: list[str]) -> dict:
    why = f"{', '.join(names)} not installed: {bench_models.INSTALL_HINT}"
    ctx.log(f"section {sec['id']} ({sec['key']}) skipped: {why}")
    sec.update(status="SKIPPED", measured=why)
    return sec


def verdict(ok: list[bool]) -> str:
    if not ok:
        return "INCOMPLETE"
    return "MET" if all(ok) else ("NOT MET" if not any(ok) else "PARTLY MET")


def _find(records: list[dict], T: int, p: str) -> dict | None:
    return next((r for r in records if r.get("T") == T and r.get("pass") == p and r.get("status") == "ok"), None)


def _tps(records, T, p) -> float | None:
    r = _find(records, T, p)
    return r["tokens_per_s"] if r else None


def _ratio(a, b) -> float | None:
    return a / b if a and b else None


def _peak(ctx: Ctx, r: dict) -> float | None:
    return r.get("peak_cuda_mib") if ctx.device == "cuda" else r.get("peak_rss_mib")


def _mem_header(ctx: Ctx) -> str:
    return "peak GPU memory (MiB)" if ctx.device == "cuda" else "peak RSS (MiB)"


def speed_table(ctx: Ctx, res: dict, labels: dict, params: dict, ratio_cols: list[tuple[str, str]],
                ours: tuple[str, ...]) -> dict:
    """One row per (model, pass, T); ratio columns give ours' tokens/s over a baseline's at the same T."""
    header = ["model", "params", "pass", "T", "tokens/s", "time (s)", "runs", _mem_header(ctx)]
    header += [title for title, _ in ratio_cols]
    rows = []
    for impl, records in res.items():
        for r in records:
            row = [labels[impl], f"{params.get(impl, 0):,}", r["pass"], k(r["T"])]
            if r["status"] != "ok":
                rows.append(row + [r["status"], "", "", ""] + [""] * len(ratio_cols))
                continue
            peak = _peak(ctx, r)
            row += [fmt_rate(r["tokens_per_s"]), f"{r['time_s']:.3f}", str(r["reps"]),
                    f"{peak:,.0f}" if peak is not None else "-"]
            for _, base in ratio_cols:
                row.append(fmt_ratio(_ratio(r["tokens_per_s"], _tps(res[base], r["T"], r["pass"])))
                           if impl in ours else "")
            rows.append(row)
    return dict(caption="", header=header, rows=rows)


def series(res: dict, labels: dict, p: str, key: str = "tokens_per_s") -> list[dict]:
    out = []
    for impl, records in res.items():
        ok = [r for r in records if r["pass"] == p and r["status"] == "ok" and r.get(key) is not None]
        if ok:
            out.append(dict(label=labels[impl], x=[r["T"] for r in ok], y=[r[key] for r in ok]))
    return out


def params_of(out) -> int:
    """The parameter count a job reports when it has built its model (0 if it never did)."""
    return next((r["params"] for r in out.results if "params" in r), 0)


# The whole model launches ~600 profiler events per token in training: its profiles are taken at these
# sizes (per-segment work, so representative of longer T) to keep them to seconds and a few GiB.
PROFILE_T = {"train": 1024, "prefill": 4096, "infer": 4096}


def profile_note(ctx: Ctx, spec: dict) -> str | None:
    """The top ops of one more run of ``spec`` (one size, one pass), headed by what was profiled."""
    if not ctx.profile:
        return None
    out = launch(ctx, {**spec, "profile": True, "repeats": 1})
    rec = next((r for r in out.results if r.get("profile")), None)
    if rec is None:
        return None
    return f"{spec['impl']}, {rec['pass']}, T = {k(rec['T'])}:\n{rec['profile']}"


# ---------------------------------------------------------------------------------------------------
# 0 kernels


def kernels_section(ctx: Ctx) -> dict:
    import torch

    sec = new_section(0, "kernels", "Kernels: chunked PyTorch forms vs the reference loops", None)
    spec = importlib.util.spec_from_file_location("titans_lnn_bench_kernels", HERE / "kernels.py")
    kernels = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(kernels)
    torch.set_num_threads(ctx.threads)
    torch.manual_seed(0)
    if ctx.suite == "cpu":
        header, rows = kernels.cpu_suite(ctx.quick, 0.2)
        caption = ("fp32, the fastest of repeats (kernels.py's own timing), in the runner's process "
                   f"({ctx.threads} thread(s)); `--quick` keeps the smallest sizes.")
    else:
        header, rows, caption = kernels.gpu_suite(ctx.quick, 0.2, 1024)
    sec["tables"].append(dict(caption=caption, header=header, rows=rows))
    sec.update(status="INFO", measured=f"{len(rows)} rows", data=dict(header=header, rows=rows))
    return sec


# ---------------------------------------------------------------------------------------------------
# 1 liquid core vs ncps


LIQUID_LABELS = {"ncps": "ncps CfC(128, 128)", "ours-state128": "ours LiquidCore, 128 states",
                 "ours-tiny": "ours LiquidCore, tiny (1024 states)"}


def liquid_section(ctx: Ctx) -> dict:
    T0 = ctx.sizes["target_T"]
    sec = new_section(1, "liquid", "Liquid core vs ncps CfC (forward, B = 1, width 128)",
                      f"ours >= 100x ncps CfC's forward tokens/s at T = {k(T0)}")
    if missing := bench_models.missing_competitors(["ncps"]):
        return skip_missing(sec, ctx, missing)
    Ts = ctx.sizes["liquid"]
    res, params, outs = {}, {}, {}
    for impl in LIQUID_LABELS:
        ctx.log(f"  liquid: {impl}")
        res[impl], outs[impl] = run_with_status(ctx, ctx.spec(kind="liquid", impl=impl, Ts=Ts),
                                                [(T, "fwd") for T in Ts])
        params[impl] = params_of(outs[impl])
    table = speed_table(ctx, res, LIQUID_LABELS, params, [("ours / ncps", "ncps")], ("ours-state128", "ours-tiny"))
    sec["tables"].append(table)
    ratios = {i: _ratio(_tps(res[i], T0, "fwd"), _tps(res["ncps"], T0, "fwd")) for i in ("ours-state128", "ours-tiny")}
    ok = [r >= 100 for r in ratios.values() if r is not None]
    sec["status"] = verdict(ok)
    sec["measured"] = "; ".join(f"{LIQUID_LABELS[i]}: {fmt_ratio(r)}" for i, r in ratios.items()) + f" at {k(T0)}"
    bounds = {i: next((r["bound"] for r in outs[i].results if "bound" in r), None) for i in outs}
    cpu_table, cpu_ratios = liquid_cpu_table(res, bounds, T0)
    sec["tables"].append(cpu_table)
    if cpu_ratios:
        sec["measured"] += "; by CPU time " + "; ".join(f"{fmt_ratio(r)} (bound {fmt_ratio(b)})"
                                                        for r, b in cpu_ratios.values())
    sec["notes"] += bench_models.DIFFERENCES["liquid"]
    sec["notes"].append("CPU time: the job process' CPU seconds per call (all its threads), which a busy machine "
                        "does not inflate as it does wall time. The compute bound: our core's matmul FLOPs per "
                        "token (torch.utils.flop_counter's formulas; elementwise passes not counted) at the fp32 "
                        "matmul rate measured in the same job (per CPU second); the bound ratio is that rate over "
                        "ncps's CPU-time tokens/s, the most any implementation of this core could reach against ncps "
                        "here.")
    sec["plots"].append(dict(file="liquid_vs_ncps.png", panels=[dict(
        title="liquid core, forward", xlabel="T (tokens)", ylabel="tokens/s", logx=True, logy=True,
        series=series(res, LIQUID_LABELS, "fwd"))]))
    if sec["status"] != "MET":
        sec["profile"] = profile_note(ctx, ctx.spec(kind="liquid", impl="ours-tiny", Ts=[T0]))
    sec["data"] = dict(records=res, params=params, ratios=ratios)
    return sec


# ---------------------------------------------------------------------------------------------------
# 2 neural memory vs titans-pytorch


MEMORY_LABELS = {"ours": "ours NeuralMemory", "titans-default": "titans-pytorch (batch_size=None, default)",
                 "titans-chunked": "titans-pytorch (batch_size=16)"}


def liquid_cpu_table(res: dict, bounds: dict, T0: int) -> tuple[dict, dict]:
    """Section 1 by CPU time: per size, each core's CPU-time tokens/s and ratio to ncps's, and ours' compute
    bound (tokens/s and as a ratio to ncps); also {impl: (ratio, bound ratio)} at ``T0``."""
    header = ["model", "T", "CPU tokens/s", "ours / ncps (CPU time)", "compute bound (tokens/s)",
              "share of the bound", "bound / ncps"]
    rows, at_target = [], {}
    for impl in ("ours-state128", "ours-tiny"):
        bound = bounds.get(impl)
        for r in res[impl]:
            base = _find(res["ncps"], r["T"], "fwd")
            mine = r.get("cpu_tokens_per_s") if r["status"] == "ok" else None
            theirs = base.get("cpu_tokens_per_s") if base and base["status"] == "ok" else None
            if mine is None:
                continue
            b = bound["bound_tokens_per_s"] if bound else None
            ratio, b_ratio = _ratio(mine, theirs), _ratio(b, theirs)
            rows.append([LIQUID_LABELS[impl], k(r["T"]), fmt_rate(mine), fmt_ratio(ratio), fmt_rate(b),
                         f"{mine / b:.0%}" if b else "-", fmt_ratio(b_ratio)])
            if r["T"] == T0 and ratio is not None:
                at_target[impl] = (ratio, b_ratio)
    caption = "By CPU time (the same runs), with our core's compute bound"
    if bounds.get("ours-state128"):
        bd = bounds["ours-state128"]
        caption += (f": {bd['flops_per_token']:,.0f} matmul FLOP per token (128 states), fp32 matmul measured at "
                    f"{bd['matmul_flops_per_s'] / 1e9:.0f} GFLOP per CPU second")
    return dict(caption=caption, header=header, rows=rows), at_target


def memory_section(ctx: Ctx) -> dict:
    T0 = ctx.sizes["target_T"]
    Ts = ctx.sizes["memory"]
    targets = [T for T in Ts if T <= T0]  # the goal: 4K and 16K on the CPU suite
    sec = new_section(2, "memory", "Neural memory vs titans-pytorch NeuralMemory (B = 1)",
                      "ours >= 3x titans-pytorch's forward+backward tokens/s at T = "
                      + " and ".join(k(T) for T in targets))
    if missing := bench_models.missing_competitors(["titans-pytorch"]):
        return skip_missing(sec, ctx, missing)
    res, params = {}, {}
    for impl in MEMORY_LABELS:
        ctx.log(f"  memory: {impl}")
        expected = [(T, p) for T in Ts for p in ("fwd", "fwd+bwd")]
        res[impl], out = run_with_status(ctx, ctx.spec(kind="memory", impl=impl, Ts=Ts), expected)
        params[impl] = params_of(out)
    cols = [("ours / default", "titans-default"), ("ours / batch_size=16", "titans-chunked")]
    sec["tables"].append(speed_table(ctx, res, MEMORY_LABELS, params, cols, ("ours",)))
    ratios = {base: {T: _ratio(_tps(res["ours"], T, "fwd+bwd"), _tps(res[base], T, "fwd+bwd")) for T in targets}
              for _, base in cols}
    sec["status"] = verdict([r >= 3 for by_T in ratios.values() for r in by_T.values() if r is not None])
    sec["measured"] = "fwd+bwd " + "; ".join(
        f"vs {MEMORY_LABELS[b]}: " + ", ".join(f"{fmt_ratio(r)} at {k(T)}" for T, r in by_T.items())
        for b, by_T in ratios.items())
    sec["notes"] += bench_models.DIFFERENCES["memory"]
    sec["plots"].append(dict(file="memory_vs_titans.png", panels=[
        dict(title=f"neural memory, {p}", xlabel="T (tokens)", ylabel="tokens/s", logx=True, logy=True,
             series=series(res, MEMORY_LABELS, p)) for p in ("fwd", "fwd+bwd")]))
    if sec["status"] != "MET":  # at the smallest size that misses the target
        missed = [T for T in targets if any((by_T.get(T) or 0) < 3 for by_T in ratios.values())] or [T0]
        sec["profile"] = profile_note(ctx, ctx.spec(kind="memory", impl="ours", Ts=missed[:1], passes=["fwd+bwd"]))
    sec["data"] = dict(records=res, params=params, ratios=ratios)
    return sec


# ---------------------------------------------------------------------------------------------------
# 3 whole model vs titans-pytorch MAC


MODEL_LABELS = {"ours-mac": "ours tiny MAC", "titans-mac": "titans-pytorch MAC (4 residual streams, default)",
                "titans-mac-1stream": "titans-pytorch MAC (1 residual stream)",
                "titans-mac-1stream-bs16": "titans-pytorch MAC (1 residual stream, memory batch_size=16)"}


def grow(ctx: Ctx, impl: str, modes: list[str], Ts: list[int], **spec_fields) -> tuple[list[dict], int]:
    """Runs ``impl`` at each T in its own process (its peak memory its own), each mode until it fails,
    passes the memory budget or is predicted to pass the time cap or the budget. Returns the records
    and the model's parameter count."""
    n_params = 0
    records, history, stopped, peaks = [], {m: [] for m in modes}, {}, {m: [] for m in modes}
    for T in Ts:
        for m in modes:
            pred = predict_linear(peaks[m], T)
            if m not in stopped and pred > ctx.mem_budget:
                records.append({"T": T, "pass": m, "status": f"skipped: predicted peak {pred / 2**30:.1f} GiB > "
                                                             f"{ctx.mem_budget / 2**30:.1f} GiB budget"})
                stopped[m] = "memory budget"
        todo = [m for m in modes if m not in stopped]
        for m in modes:
            if m in stopped and not any(r["T"] == T and r["pass"] == m for r in records):
                records.append({"T": T, "pass": m, "status": f"not run ({stopped[m]} at a smaller T)"})
        if not todo:
            break
        spec = ctx.spec(kind="model", impl=impl, Ts=[T], modes=todo, history=history, **spec_fields)
        got, out = run_with_status(ctx, spec, [(T, m) for m in todo])
        n_params = n_params or params_of(out)
        for r in got:
            records.append(r)
            if r["status"] == "ok":
                history[r["pass"]].append((T, r["time_s"]))
                peaks[r["pass"]].append((T, (_peak(ctx, r) or 0) * 2**20))
            else:
                stopped[r["pass"]] = "time cap" if r["status"].startswith("skipped") else "stopped"
        ctx.log(f"  {impl} T={k(T)}: " + ", ".join(f"{r['pass']} {fmt_rate(r.get('tokens_per_s'))} tok/s"
                                                  if r["status"] == "ok" else f"{r['pass']} {r['status']}"
                                                  for r in got))
    return records, n_params


def predict_linear(points: list[tuple[int, float]], T: int) -> float:
    """Peak memory expected at T from the last two (T, bytes) points (a line through them); 0 without two."""
    if len(points) < 2:
        return 0.0
    (T0, m0), (T1, m1) = points[-2:]
    return m1 + max(0.0, (m1 - m0) / (T1 - T0)) * (T - T1)


def memory_estimate(ctx: Ctx, records: list[dict], mode: str, budget_bytes: float) -> dict | None:
    """Linear fit of peak memory vs T (sizes >= 4K when there are two): the estimated peak at 1M tokens
    and the T at which the budget is reached."""
    ok = [r for r in records if r["pass"] == mode and r["status"] == "ok" and _peak(ctx, r) is not None]
    big = [r for r in ok if r["T"] >= 4096]
    pts = big if len(big) >= 2 else ok
    if not pts:
        return None
    a, b = fit_linear([r["T"] for r in pts], [_peak(ctx, r) * 2**20 for r in pts])
    largest = max(r["T"] for r in ok)
    at_1m = a + b * 2**20
    t_budget = (budget_bytes - a) / b if b > 0 else math.inf
    return dict(largest_T=largest, bytes_per_token=b, est_peak_1m_bytes=at_1m, est_T_at_budget=t_budget,
                measured_1m=any(r["T"] >= 2**20 for r in ok))


def model_section(ctx: Ctx) -> dict:
    Ts = ctx.sizes["model"]
    targets = [T for T in Ts if T <= ctx.sizes["target_T"]]  # the goal: 1K, 4K and 16K on the CPU suite
    sec = new_section(3, "model", "Whole model vs titans-pytorch MemoryAsContextTransformer (B = 1)",
                      "ours >= 2x titans-pytorch MAC's training tokens/s (both variants) at T = "
                      + ", ".join(k(T) for T in targets))
    if missing := bench_models.missing_competitors(["titans-pytorch"]):
        return skip_missing(sec, ctx, missing)
    res, params = {}, {}
    for impl in MODEL_LABELS:
        res[impl], params[impl] = grow(ctx, impl, ["infer", "train"], Ts, piece=ctx.sizes["model_piece"])
    cols = [("ours / MAC", "titans-mac"), ("ours / MAC 1-stream", "titans-mac-1stream")]  # the goal's two
    reference = ("ours / MAC 1-stream bs16", "titans-mac-1stream-bs16")  # the paper's memory update, for reference
    table = speed_table(ctx, res, MODEL_LABELS, params, cols + [reference], ("ours-mac",))
    table["caption"] = (f"`infer`: ours streams in pieces of {k(ctx.sizes['model_piece'])} tokens; titans-pytorch "
                        "reads the sequence in one call. `train`: forward + loss + backward + AdamW step over T "
                        "tokens.")
    sec["tables"].append(table)
    # The training ratio at every target size (a size one side could not run counts as missed).
    def train_ratios(base):  # {T: ours / base} at the target sizes
        return {T: _ratio(_tps(res["ours-mac"], T, "train"), _tps(res[base], T, "train")) for T in targets}

    def at_sizes(by_T):
        return ", ".join(f"{fmt_ratio(r) if r else 'not run'} at {k(T)}" for T, r in by_T.items())

    ratios = {base: train_ratios(base) for _, base in cols}
    sec["status"] = verdict([r is not None and r >= 2 for by_T in ratios.values() for r in by_T.values()])
    ref = train_ratios(reference[1])
    infer = {}
    for _, base in cols:
        common = [T for T in Ts if _tps(res["ours-mac"], T, "infer") and _tps(res[base], T, "infer")]
        if common:
            infer[base] = (common[-1], _ratio(_tps(res["ours-mac"], common[-1], "infer"),
                                              _tps(res[base], common[-1], "infer")))
    sec["measured"] = "training " + "; ".join(f"vs {MODEL_LABELS[b]}: {at_sizes(by_T)}" for b, by_T in ratios.items())
    sec["measured"] += f"; for reference, vs {MODEL_LABELS[reference[1]]}: {at_sizes(ref)}"
    label = {base: name for name, base in cols}
    sec["measured"] += " (inference: " + "; ".join(f"{label[b]} {fmt_ratio(r)} at {k(T)}"
                                                   for b, (T, r) in infer.items()) + ")"
    est_rows, estimates = [], {}
    for impl in MODEL_LABELS:
        for mode in ("infer", "train"):
            e = memory_estimate(ctx, res[impl], mode, ctx.mem_budget)
            estimates[f"{impl}/{mode}"] = e
            if e:
                fits = "yes (measured)" if e["measured_1m"] else ("yes (estimate)" if e["est_peak_1m_bytes"]
                                                                    < ctx.mem_budget else "no (estimate)")
                est_rows.append([MODEL_LABELS[impl], mode, k(e["largest_T"]), f"{e['bytes_per_token'] / 1024:.1f}",
                                 f"{e['est_peak_1m_bytes'] / 2**30:.1f}",
                                 fmt_tokens(e["est_T_at_budget"]), fits])
    sec["tables"].append(dict(
        caption=(f"Memory growth, from a linear fit of peak memory vs T over the measured sizes (>= 4K): "
                 f"**estimates** beyond the largest T measured. Budget {ctx.mem_budget / 2**30:.0f} GiB."),
        header=["model", "pass", "largest T run", "KiB per token", "est. peak at 1M (GiB)",
                "est. T at budget", "1M tokens within budget?"], rows=est_rows))
    e = estimates.get("titans-mac/infer")
    if e:
        gib = ctx.mem_budget / 2**30
        answer = ("yes, measured" if e["measured_1m"] else
                  f"{'yes' if e['est_peak_1m_bytes'] < ctx.mem_budget else 'no'}, by estimate: "
                  f"{e['bytes_per_token'] / 1024:.0f} KiB per token measured up to {k(e['largest_T'])} gives "
                  f"~{e['est_peak_1m_bytes'] / 2**30:.0f} GiB at 1M, the budget reached near "
                  f"{fmt_tokens(e['est_T_at_budget'])} tokens")
        sec["notes"].append(f"Can titans-pytorch's MAC read 1M tokens within {gib:.0f} GiB? {answer}. Ours streams "
                            "in a fixed-size state: section 5 reads 1M tokens and a 4.6M-base genome.")
    sec["notes"] += bench_models.DIFFERENCES["model"]
    sec["notes"].append(f"Sizes grow by 4x from {k(Ts[0])} until a run fails, passes the memory budget or is "
                        f"predicted to take over {ctx.sizes['max_run_s']:.0f} s (on CPU the time cap binds first).")
    mem_key = "peak_cuda_mib" if ctx.device == "cuda" else "peak_rss_mib"
    sec["plots"].append(dict(file="model_vs_mac.png", panels=[
        dict(title="training", xlabel="T", ylabel="tokens/s", logx=True, logy=True,
             series=series(res, MODEL_LABELS, "train")),
        dict(title="inference", xlabel="T", ylabel="tokens/s", logx=True, logy=True,
             series=series(res, MODEL_LABELS, "infer")),
        dict(title="peak memory, training", xlabel="T", ylabel="MiB", logx=True, logy=True,
             series=series(res, MODEL_LABELS, "train", mem_key)),
    ]))
    if sec["status"] != "MET":
        T = min(PROFILE_T["train"], Ts[-1])
        sec["profile"] = profile_note(ctx, ctx.spec(kind="model", impl="ours-mac", Ts=[T], modes=["train"]))
    sec["data"] = dict(records=res, params=params, ratios=ratios, reference_ratios=ref, estimates=estimates)
    return sec


# ---------------------------------------------------------------------------------------------------
# 4 full attention vs the hybrid: scaling


SCALING_LABELS = {"ours-full": "full causal attention (ours, variant full)", "ours-mac": "hybrid (ours tiny MAC)"}


def scaling_section(ctx: Ctx) -> dict:
    sec = new_section(4, "scaling", "Full causal attention vs the hybrid: time and memory vs T (one forward call)",
                      "time exponent ~2 for full attention (>= 1.7) and ~1 for the hybrid (<= 1.15)")
    Ts, fit_min = ctx.sizes["full"], ctx.sizes["full_fit_min"]
    res, params = {}, {}
    for impl in SCALING_LABELS:
        res[impl], params[impl] = grow(ctx, impl, ["prefill"], Ts)
    sec["tables"].append(speed_table(ctx, res, SCALING_LABELS, params, [("ours hybrid / full", "ours-full")],
                                     ("ours-mac",)))
    fits, panel_series = {}, []
    for impl, records in res.items():
        ok = [r for r in records if r["status"] == "ok" and r["T"] >= fit_min]
        if len(ok) >= 2:
            p, c, r2 = fit_exponent([r["T"] for r in ok], [r["time_s"] for r in ok])
            fits[impl] = dict(exponent=p, coefficient=c, r2=r2, Ts=[r["T"] for r in ok])
        s = series({impl: records}, SCALING_LABELS, "prefill", "time_s")
        panel_series += s
    checks = []
    if "ours-full" in fits:
        checks.append(fits["ours-full"]["exponent"] >= 1.7)
    if "ours-mac" in fits:
        checks.append(fits["ours-mac"]["exponent"] <= 1.15)
    sec["status"] = verdict(checks) if len(checks) == 2 else "INCOMPLETE"
    sec["measured"] = "; ".join(f"{SCALING_LABELS[i]}: t ~ T^{f['exponent']:.2f} (R^2 {f['r2']:.3f}, "
                                f"{k(f['Ts'][0])}-{k(f['Ts'][-1])})" for i, f in fits.items())
    mem_key = "peak_cuda_mib" if ctx.device == "cuda" else "peak_rss_mib"
    sec["plots"].append(dict(file="full_vs_hybrid.png", panels=[
        dict(title="forward time", xlabel="T", ylabel="seconds", logx=True, logy=True, series=panel_series,
             fits={SCALING_LABELS[i]: f for i, f in fits.items()}),
        dict(title="peak memory", xlabel="T", ylabel="MiB", logx=True, logy=False, ymin=0,
             series=series(res, SCALING_LABELS, "prefill", mem_key))]))
    sec["notes"].append(f"Least-squares fit of log time on log T over T >= {k(fit_min)}. The full-attention "
                        "ablation has the same width and depth but neither memory nor liquid core "
                        f"({params.get('ours-full', 0):,} vs {params.get('ours-mac', 0):,} parameters).")
    if ctx.device == "cuda":
        sec["notes"].append("On CUDA full attention goes through flash-attn when installed, else FlexAttention.")
    if sec["status"] != "MET" and res["ours-mac"]:
        T = min(PROFILE_T["prefill"], Ts[-1])
        sec["profile"] = profile_note(ctx, ctx.spec(kind="model", impl="ours-mac", Ts=[T], modes=["prefill"]))
    sec["data"] = dict(records=res, params=params, fits=fits)
    return sec


# ---------------------------------------------------------------------------------------------------
# 7 one long sequence trained in bounded memory


GRAD_TOL = 1e-4  # checkpointed vs plain gradients, relative to the largest entry (fp32 recomputation)


def long_training_section(ctx: Ctx) -> dict:
    T, seg, budget = ctx.sizes["long_T"], ctx.sizes["long_segment"], ctx.sizes["long_budget_gib"]
    check_T, check_seg = min(T, 1024), min(seg, 256)
    sec = new_section(7, "long_training", "Training one long sequence in bounded memory (tiny MAC, activation "
                      "checkpointing)", f"one training pass over {k(T)} tokens in < {budget:.0f} GiB peak "
                      "RSS, with gradients equal to the plain pass's")
    spec = ctx.spec(kind="longtrain", T=T, segment=seg, check_T=check_T, check_segment=check_seg)
    expected = [(T, f"train, checkpoint {seg}"), (check_T, f"gradients, checkpoint {check_seg} vs plain")]
    records, out = run_with_status(ctx, spec, expected, timeout_s=ctx.stream_timeout_s)
    run, check = records
    rows, checks, parts = [], [], []
    if run["status"] == "ok":
        peak = (run.get("peak_cuda_mib") or run["peak_rss_mib"]) / 1024
        rows.append([f"{T:,}", f"checkpoint every {k(seg)}", f"{run['time_s']:.1f}", fmt_rate(run["tokens_per_s"]),
                     f"{peak:.2f}", f"{run['loss']:.4f}", f"{run['grad_norm']:.6g}", ""])
        checks.append(peak < budget)
        parts.append(f"{k(T)} tokens in {peak:.2f} GiB peak RSS ({run['time_s']:.0f} s, {fmt_rate(run['tokens_per_s'])}"
                     " tokens/s)")
    else:
        rows.append([f"{T:,}", f"checkpoint every {k(seg)}", run["status"], "", "", "", "", ""])
        checks.append(False)
    if check["status"] == "ok":
        rows.append([f"{check_T:,}", f"checkpoint every {check_seg} vs none", "", "", "", "", "",
                     f"{check['max_rel_diff']:.1e}"])
        checks.append(check["max_rel_diff"] <= GRAD_TOL)
        parts.append(f"gradients vs the plain pass: largest difference {check['max_rel_diff']:.1e} of the largest "
                     f"entry ({check['params_compared']} tensors)")
    else:
        rows.append([f"{check_T:,}", f"checkpoint every {check_seg} vs none", check["status"], "", "", "", "", ""])
        checks.append(False)
    sec["status"] = verdict(checks)
    sec["measured"] = "; ".join(parts)
    sec["tables"].append(dict(
        caption=("Forward, next-token loss and backward over one sequence (B = 1), `model(ids, labels=labels, "
                 "checkpoint_len=...)`, in a fresh process: its peak RSS is this pass's."),
        header=["tokens", "how", "time (s)", "tokens/s", "peak RSS (GiB)", "loss", "grad norm",
                "grad max diff / max |grad|"], rows=rows))
    sec["notes"].append("Without checkpointing the memory of a training pass grows with T: section 3's linear fit "
                        "of the tiny MAC's training peak (KiB per token) estimates the size that passes the budget.")
    sec["notes"].append(f"The gradient row compares every parameter's gradient of a {check_T}-token pass with and "
                        f"without checkpointing (segments of {check_seg}); tolerance {GRAD_TOL:g} of the largest "
                        "entry (fp32: the recomputed activations are the same operations, in a different order).")
    sec["data"] = dict(records=records)
    return sec
