"""Section 6 of the suite: generation. The tiny MAC reads a prompt of 1K and of 1M tokens (streamed for
real with ``model.stream``), then generates greedily one token at a time: ms per new token at batch 1
and 8, by the decode step (``titans_lnn.decode``) and by a forward call of length 1, with the state's
size. The state does not grow with the prompt, so neither should the time per token. The section dict
is the one ``bench_sections`` documents.
"""

from __future__ import annotations

from bench_common import fmt_rate, fmt_ratio, k
from bench_runner import Ctx, run_with_status
from bench_sections import new_section, params_of, profile_note

K, M = 1024, 1024 * 1024
# Sizes per (suite, quick): the prompt lengths read before decoding, new tokens per timed call, batch sizes.
DECODE_SIZES = {
    ("cpu", False): dict(prompts=[1 * K, 1 * M], new_tokens=32, batches=[1, 8], piece=4 * K),
    ("cpu", True): dict(prompts=[1 * K, 8 * K], new_tokens=8, batches=[1, 8], piece=1 * K),
    ("gpu", False): dict(prompts=[1 * K, 1 * M], new_tokens=64, batches=[1, 8], piece=64 * K),
    ("gpu", True): dict(prompts=[1 * K, 64 * K], new_tokens=16, batches=[1, 8], piece=16 * K),
}
PATHS = ("decode step", "forward (T = 1)")
FLAT = 1.15  # the target: ms/token after the longest prompt within this factor of after the shortest


def decode_section(ctx: Ctx) -> dict:
    sizes = DECODE_SIZES[(ctx.suite, ctx.quick)]
    Ts, batches = sizes["prompts"], sizes["batches"]
    lo, hi = Ts[0], Ts[-1]
    sec = new_section(6, "decode", "Generation: ms per new token after a short and a long prompt (tiny MAC)",
                      f"ms/token after {k(hi)} tokens of prompt within {FLAT}x of after {k(lo)}, at B = "
                      + " and ".join(str(b) for b in batches))
    spec = ctx.spec(kind="decode", Ts=Ts, batches=batches, new_tokens=sizes["new_tokens"], piece=sizes["piece"])
    expected = [(T, f"{p}, B={B}") for T in Ts for B in batches for p in PATHS]
    records, out = run_with_status(ctx, spec, expected, timeout_s=ctx.stream_timeout_s)

    def ms(T, p, B):
        r = next((r for r in records if r["T"] == T and r["pass"] == f"{p}, B={B}" and r["status"] == "ok"), None)
        return r["ms_per_token"] if r else None

    rows = []
    for r in records:
        if r["status"] != "ok":
            rows.append([k(r["T"]), r["pass"], r["status"], "", "", "", "", ""])
            continue
        rows.append([k(r["T"]), r["pass"], f"{r['ms_per_token']:.2f}", fmt_rate(r["tokens_per_s"]),
                     f"{r['state_bytes_per_row'] / 2**20:.2f}", f"{r['prompt_s']:.1f}", f"{r['peak_rss_mib']:,.0f}",
                     f"{r['load_avg_1min']:.1f}"])
    sec["tables"].append(dict(
        caption=(f"Greedy generation of {sizes['new_tokens']} tokens per timed call after the prompt (streamed in "
                 f"pieces of {k(sizes['piece'])}); B rows continue B copies of the prompt's state. Both prompts are "
                 "read first, then the timed calls after each alternate (median of the repeats), so that a change in "
                 "the machine's load does not fall between the two prompt lengths."),
        header=["prompt", "path, batch", "ms/token", "tokens/s (all rows)", "state per row (MiB)",
                "prompt read (s)", "peak RSS (MiB)", "load avg (1 min)"], rows=rows))
    ratios, speedups = {}, {}
    for B in batches:
        ratios[B] = _div(ms(hi, PATHS[0], B), ms(lo, PATHS[0], B))
        speedups[B] = _div(ms(hi, PATHS[1], B), ms(hi, PATHS[0], B))
    ok = [r <= FLAT for r in ratios.values() if r is not None]
    sec["status"] = "INCOMPLETE" if len(ok) < len(batches) else ("MET" if all(ok) else "NOT MET")
    sec["measured"] = "; ".join(
        f"B = {B}: {_fmt_ms(ms(lo, PATHS[0], B))} after {k(lo)}, {_fmt_ms(ms(hi, PATHS[0], B))} after {k(hi)} "
        f"(ratio {_fmt(ratios[B])})" for B in batches)
    sec["measured"] += " (decode step; " + ", ".join(f"{fmt_ratio(s)} faster than a forward call at B = {B}"
                                                     for B, s in speedups.items()) + ")"
    state = next((r for r in records if r["status"] == "ok"), None)
    if state:
        sec["notes"].append(f"The state is {state['state_bytes_per_row']:,} bytes per row whatever the prompt's "
                            "length (attention cache of W - 1 keys/values, memory weights, momentum and anchor, "
                            "liquid vectors): decoding reads and writes the same amount after 1K or 1M tokens.")
    sec["notes"].append("`decode step`: `titans_lnn.decode.decode_step`, each layer's one-token form (what "
                        "`generate` runs). `forward (T = 1)`: the model's forward on a piece of one token "
                        "(the chunked machinery: memory chunk bookkeeping, blocked attention).")
    if sec["status"] != "MET" and ctx.profile:
        sec["profile"] = profile_note(ctx, {**spec, "Ts": [lo], "batches": [1], "impl": "ours-mac"})
    sec["data"] = dict(records=records, params=params_of(out), ratios=ratios, speedups=speedups)
    return sec


def _div(a, b):
    return a / b if a and b else None


def _fmt(x) -> str:
    return "-" if x is None else f"{x:.2f}"


def _fmt_ms(x) -> str:
    return "-" if x is None else f"{x:.2f} ms/token"
