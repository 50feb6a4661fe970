"""One benchmark job, run by ``run.py`` in a fresh process so that its peak memory is its own.

    python benchmarks/bench_jobs.py '{"kind": "liquid", "impl": "ncps", "Ts": [1024, 4096]}'

Kinds: ``liquid`` (a liquid core, forward), ``memory`` (a neural memory, forward and forward+backward),
``model`` (a whole model: ``infer``, where ours streams in pieces and a competitor reads in one call;
``prefill``, one call; ``train``, optimizer steps), ``stream`` (the tiny MAC reads a corpus in one
streamed pass, time and memory read after every piece), ``decode`` (ms per generated token after a
streamed prompt, batch 1 and 8), ``longtrain`` (one training pass over a long sequence with activation
checkpointing, and its gradients vs the plain pass's on a short one). Each measurement is warm (a warm-up call
first), the median of up to ``repeats`` calls within ``budget_s``, with the peak RSS of this process
(and ``torch.cuda.max_memory_allocated`` on CUDA). A size whose predicted time passes ``max_run_s``
is skipped. Every measurement is printed as soon as it is taken, as one line ``RESULT {json}``, so a
job stopped by the runner's memory or time guard still reports the sizes it finished.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time

import bench_models
import numpy as np
import torch
from bench_common import MIB, median, median_time, peak_rss_mib, predict_time, rss_bytes

DEFAULTS = dict(device="cpu", threads=1, B=1, repeats=3, budget_s=20.0, max_run_s=60.0, warm_full_s=3.0,
                profile=False, amp=False, history={}, piece=4096, passes=["fwd", "fwd+bwd"])


def emit(record: dict) -> None:
    print("RESULT " + json.dumps(record), flush=True)


def _sync(device: torch.device):
    return (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)


def _autocast(spec, device):
    if spec["amp"] and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def profile_table(fn, device: torch.device, rows: int = 12) -> str:
    """The top ops of one call of ``fn`` by self time, from torch.profiler's raw events.

    (The profiler's own ``key_averages`` takes minutes and gigabytes on the ~600K events of one
    training step of the tiny model; nesting the raw events by thread takes a second.)"""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    t0 = time.perf_counter()
    with profile(activities=activities) as prof:
        fn()
        _sync(device)()
    wall = time.perf_counter() - t0
    events = sorted(((e.device_type() != DeviceType.CPU, e.start_thread_id(), e.start_ns(), e.duration_ns(), e.name())
                     for e in prof.profiler.kineto_results.events()), key=lambda e: (e[0], e[1], e[2], -e[3]))
    self_ns: dict[str, float] = {}
    calls: dict[str, int] = {}
    top_ns, stack, lane = 0, [], None
    for on_device, tid, start, dur, name in events:
        if (on_device, tid) != lane:  # a new thread (or the device's timeline): a new nesting stack
            stack, lane = [], (on_device, tid)
        while stack and stack[-1][0] <= start:
            stack.pop()
        if stack:
            self_ns[stack[-1][1]] -= dur  # the parent's self time excludes its children
        elif not on_device:
            top_ns += dur
        self_ns[name] = self_ns.get(name, 0) + dur
        calls[name] = calls.get(name, 0) + 1
        stack.append((start + dur, name))
    lines = [f"{'op':<56} {'self ms':>9} {'share':>6} {'calls':>8} {'us/call':>8}"]
    for name, ns in sorted(self_ns.items(), key=lambda kv: -kv[1])[:rows]:
        lines.append(f"{name[:56]:<56} {ns / 1e6:9.1f} {ns / max(top_ns, 1):6.1%} {calls[name]:8d} "
                     f"{ns / 1e3 / calls[name]:8.1f}")
    lines.append(f"one profiled call: {wall:.2f} s wall (profiler on), {top_ns / 1e9:.2f} s inside top-level ops, "
                 f"{sum(calls.values()):,} op events")
    return "\n".join(lines)


def measure(fn, warm, *, T: int, label: str, spec: dict, device: torch.device, points: list) -> dict:
    """Times ``fn`` (a call over T tokens); ``warm`` is a cheaper call of the same code. ``points``
    holds this pass's earlier (T, seconds) and receives this one."""
    rec = {"T": T, "pass": label}
    pred = predict_time(points, T)
    if pred > spec["max_run_s"]:
        return {**rec, "status": f"skipped: predicted {pred:.0f} s > {spec['max_run_s']:.0f} s cap"}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    sync = _sync(device)
    try:
        warm()
        if pred <= spec["warm_full_s"]:
            fn()
        cpu0 = time.process_time()
        times = median_time(fn, repeats=spec["repeats"], budget_s=spec["budget_s"], sync=sync)
        cpu_s = (time.process_time() - cpu0) / len(times)  # all of this process' threads, per call
        prof = profile_table(fn, device) if spec["profile"] else None
    except torch.OutOfMemoryError:
        return {**rec, "status": "out of memory"}
    t = median(times)
    points.append((T, t))
    rec.update(status="ok", time_s=t, times=times, reps=len(times), tokens_per_s=spec["B"] * T / t,
               cpu_s=cpu_s, cpu_tokens_per_s=spec["B"] * T / cpu_s if cpu_s > 0 else None,
               peak_rss_mib=peak_rss_mib())
    if device.type == "cuda":
        rec["peak_cuda_mib"] = torch.cuda.max_memory_allocated(device) / MIB
    if prof:
        rec["profile"] = prof
    return rec


def _points(spec, label) -> list:
    return [tuple(p) for p in spec["history"].get(label, [])]


# ---------------------------------------------------------------------------------------------------
# kinds


def job_liquid(spec, device):
    m = bench_models.liquid(spec["impl"], device)
    emit({"params": bench_models.num_parameters(m)})
    points = _points(spec, "fwd")
    for T in spec["Ts"]:
        x = torch.randn(spec["B"], T, bench_models.LIQUID_WIDTH, device=device)

        def run(x=x):
            with torch.inference_mode():
                m(x)

        def warm(x=x):
            with torch.inference_mode():
                m(x[:, :1024])

        emit(measure(run, warm, T=T, label="fwd", spec=spec, device=device, points=points))
    if spec["impl"] != "ncps":  # our core's matmul FLOPs per token (the same at any T) and the machine's rate
        x = torch.randn(spec["B"], 1024, bench_models.LIQUID_WIDTH, device=device)
        emit({"bound": bench_models.compute_bound(m, x, device, tokens=x.shape[0] * x.shape[1],
                                                  clock=time.process_time)})  # per CPU second, as cpu_s


def job_memory(spec, device):
    m = bench_models.memory(spec["impl"], device)
    emit({"params": bench_models.num_parameters(m)})
    dim = bench_models.MEMORY["dim"]
    points = {p: _points(spec, p) for p in spec["passes"]}
    for T in spec["Ts"]:
        x = torch.randn(spec["B"], T, dim, device=device)
        grad = torch.randn_like(x)

        def fwd(x=x):
            with torch.inference_mode():
                m(x)

        def fwd_bwd(x=x, grad=grad):
            xr = x.detach().requires_grad_()
            m(xr)[0].backward(grad[:, :xr.shape[1]])
            m.zero_grad(set_to_none=True)

        for label, fn in (("fwd", fwd), ("fwd+bwd", fwd_bwd)):
            if label not in spec["passes"]:
                continue
            def warm(fn=fn, x=x):
                fn(x[:, :1024])

            emit(measure(fn, warm, T=T, label=label, spec=spec, device=device, points=points[label]))


def job_model(spec, device):
    impl = spec["impl"]
    m = bench_models.model(impl, device)
    emit({"params": bench_models.num_parameters(m)})
    ours = impl.startswith("ours-")
    opt = torch.optim.AdamW(m.parameters(), lr=1e-4)
    vocab = m.config.vocab_size if ours else bench_models.MAC_KWARGS["num_tokens"]
    points = {p: _points(spec, p) for p in spec["modes"]}
    for T in spec["Ts"]:
        ids = torch.randint(0, vocab, (spec["B"], T + 1), device=device)

        def infer(n=T, ids=ids):
            with torch.inference_mode(), _autocast(spec, device):
                if not ours:
                    return m(ids[:, :n])
                state = m.init_state(spec["B"])
                for s in range(0, n, spec["piece"]):
                    state = m(ids[:, s:min(n, s + spec["piece"])], state=state).state

        def prefill(n=T, ids=ids):
            with torch.inference_mode(), _autocast(spec, device):
                m(ids[:, :n])

        def train(n=T, ids=ids):
            with _autocast(spec, device):
                loss = m(ids[:, :n], labels=ids[:, 1:n + 1]).loss if ours else m(ids[:, :n + 1], return_loss=True)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        fns = {"infer": infer, "prefill": prefill, "train": train}
        for mode in spec["modes"]:
            fn = fns[mode]
            emit(measure(fn, lambda fn=fn, T=T: fn(min(T, 1024)), T=T, label=mode, spec=spec, device=device,
                         points=points[mode]))


def job_stream(spec, device):
    """The tiny MAC reads ``tokens`` tokens of ``corpus`` (repeated if shorter) in pieces, carrying its
    state, under inference_mode; time and memory after every piece."""
    from titans_lnn.training.data import load_corpus

    t0 = time.perf_counter()
    corpus = load_corpus(spec["corpus"])
    n = spec["tokens"] or len(corpus.tokens)
    tokens = np.resize(corpus.tokens, n) if n > len(corpus.tokens) else corpus.tokens[:n]
    ids = torch.from_numpy(tokens.astype(np.int64))[None].to(device)
    load_s = time.perf_counter() - t0
    m = bench_models.model("ours-mac", device, vocab_size=corpus.tokenizer.vocab_size).eval()
    piece, sync = spec["piece"], _sync(device)
    with torch.inference_mode():
        m(ids[:, :piece])  # warm-up, its state thrown away
        state = m.init_state(1)
        records = []
        rss0 = rss_bytes() / MIB
        sync()
        start = time.perf_counter()
        for s in range(0, n, piece):
            state = m(ids[:, s:s + piece], state=state).state
            sync()
            records.append([state.pos, time.perf_counter() - start, rss_bytes() / MIB, peak_rss_mib()])
    wall = records[-1][1]
    rec = dict(corpus=spec["corpus"], tokens=n, corpus_tokens=len(corpus.tokens), piece=piece,
               threads=torch.get_num_threads(), status="ok", time_s=wall, tokens_per_s=n / wall, load_s=load_s,
               rss_start_mib=rss0,
               peak_rss_mib=peak_rss_mib(), state_mib=state.nbytes() / MIB, params=bench_models.num_parameters(m),
               records=records)
    if device.type == "cuda":
        rec["peak_cuda_mib"] = torch.cuda.max_memory_allocated(device) / MIB
    rec.update(bench_models.compute_bound(m, ids[:, :piece], device))  # after the pass: its RSS is untouched
    emit({"pass": "stream", **rec})


def job_decode(spec, device):
    """The tiny MAC reads a prompt of each length in ``Ts`` with ``model.stream`` (the whole prompt, streamed),
    then generates greedily one token at a time from that state, at each batch size of ``batches``: ms per
    new token by the decode step (``titans_lnn.decode``) and by a forward call of length 1 (``_forward``).
    The prompts are read first and the timed calls after every prompt alternate, so that the ratio between
    prompt lengths is not skewed by a change in the machine's load between them. A batch of B rows continues
    B copies of the one prompt's state (reading B prompts of 1M tokens would take B times longer and decode
    the same way: the state has the same size and position)."""
    import dataclasses

    from titans_lnn.decode import decode_step

    m = bench_models.model("ours-mac", device).eval()
    emit({"params": bench_models.num_parameters(m)})
    sync, n_new = _sync(device), spec["new_tokens"]
    paths = {"decode step": lambda ids, st: decode_step(m, ids, st),
             "forward (T = 1)": lambda ids, st: (lambda o: (o.logits[:, -1], o.state))(m._forward(ids, state=st))}
    prompts = {}
    for T in spec["Ts"]:
        ids = torch.randint(0, m.config.vocab_size, (1, T), device=device)
        with torch.inference_mode():
            t0 = time.perf_counter()
            out = m.stream(ids, chunk_len=spec["piece"])
            sync()
            prompts[T] = (out, time.perf_counter() - t0)
    for B in spec["batches"]:
        for label, step in paths.items():
            runs = {}
            for T, (out, _) in prompts.items():
                with torch.inference_mode():
                    state = dataclasses.replace(out.state.map(lambda t, B=B: t.repeat(B, *[1] * (t.dim() - 1))),
                                                batch_size=B)
                    first = out.logits.argmax(-1, keepdim=True).repeat(B, 1)  # (B, 1)

                def generate(n, state=state, step=step, first=first):
                    with torch.inference_mode():
                        nxt, st = first, state
                        for _ in range(n):
                            logits, st = step(nxt, st)
                            nxt = logits.argmax(-1, keepdim=True)

                generate(4)  # warm-up
                runs[T] = (generate, state, [])
            for _ in range(spec["repeats"]):
                for generate, _, times in runs.values():
                    times += median_time(lambda g=generate: g(n_new), repeats=1, sync=sync)
            for T, (generate, state, times) in runs.items():
                t = median(times)
                rec = {"T": T, "pass": f"{label}, B={B}", "B": B, "status": "ok", "ms_per_token": 1e3 * t / n_new,
                       "tokens_per_s": B * n_new / t, "time_s": t, "times": times, "reps": len(times),
                       "new_tokens": n_new, "prompt_s": prompts[T][1], "pos": state.pos,
                       "state_bytes": state.nbytes(), "state_bytes_per_row": state.nbytes() // B,
                       "peak_rss_mib": peak_rss_mib(), "load_avg_1min": os.getloadavg()[0]}
                if spec["profile"] and label == "decode step":
                    rec["profile"] = profile_table(lambda g=generate: g(n_new), device)
                emit(rec)

def job_longtrain(spec, device):
    """One training pass (forward, loss, backward) of the tiny MAC over one sequence of ``T`` tokens with
    activation checkpointing in segments of ``segment`` tokens: time, peak RSS (this process' only run of
    that size, taken first), gradient norm. Then the checkpointed gradients against the plain pass's on a
    short sequence (``check_T`` tokens, segments of ``check_segment``): the largest difference relative to
    the largest gradient entry, over every parameter."""
    m = bench_models.model("ours-mac", device)
    emit({"params": bench_models.num_parameters(m)})
    T, seg = spec["T"], spec["segment"]
    ids = torch.randint(0, m.config.vocab_size, (1, T + 1), device=device)
    sync = _sync(device)
    t0, cpu0 = time.perf_counter(), time.process_time()
    loss = m(ids[:, :T], labels=ids[:, 1:], checkpoint_len=seg).loss
    loss.backward()
    sync()
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    grad_norm = torch.stack([p.grad.double().norm() for p in m.parameters() if p.grad is not None]).norm().item()
    emit({"T": T, "pass": f"train, checkpoint {seg}", "status": "ok", "time_s": wall, "cpu_s": cpu,
          "tokens_per_s": T / wall, "peak_rss_mib": peak_rss_mib(), "loss": loss.item(), "grad_norm": grad_norm})

    n, c = spec["check_T"], spec["check_segment"]
    grads = []
    for checkpoint_len in (None, c):
        m.zero_grad(set_to_none=True)
        m(ids[:, :n], labels=ids[:, 1:n + 1], checkpoint_len=checkpoint_len).loss.backward()
        grads.append([p.grad.detach().clone() for p in m.parameters() if p.grad is not None])
    scale = max(g.abs().max().item() for g in grads[0])
    diff = max((a - b).abs().max().item() for a, b in zip(*grads))
    emit({"T": n, "pass": f"gradients, checkpoint {c} vs plain", "status": "ok", "max_rel_diff": diff / scale,
          "params_compared": len(grads[0])})


JOBS = {"liquid": job_liquid, "memory": job_memory, "model": job_model, "stream": job_stream, "decode": job_decode,
        "longtrain": job_longtrain}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        sys.exit("usage: bench_jobs.py JOB_JSON  (run.py writes these; see its --help)")
    spec = {**DEFAULTS, **json.loads(argv[0])}
    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    device = torch.device(spec["device"])
    try:
        JOBS[spec["kind"]](spec, device)
    except bench_models.MissingCompetitor as e:
        emit({"status": f"skipped: {e}"})
    print("DONE", flush=True)


if __name__ == "__main__":
    main()
