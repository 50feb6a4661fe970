"""The ``titans-lnn`` command line.

    titans-lnn info                      version, torch build, which fast paths are available
    titans-lnn demo [--preset tiny]      build a model, stream a sequence in pieces, check vs one pass, generate
    titans-lnn stability [--variant all] perturbation growth and streamed == one pass (titans_lnn.stability)
    titans-lnn train ...                 (titans_lnn.training.cli)
    titans-lnn eval TASK ...             (titans_lnn.evals.cli)
    titans-lnn niah ...                  the needle-in-a-haystack main job (titans_lnn.evals.niah)

Each subcommand lives in its own module with ``add_parser(subparsers)`` registering a function
under ``func``; modules whose optional dependencies are missing are skipped.
"""

from __future__ import annotations

import argparse
import importlib
import platform
import re
import sys

# Subcommand modules, in the order their help is listed.
_SUBCOMMANDS = ("titans_lnn.training.cli", "titans_lnn.evals.cli", "titans_lnn.evals.niah", "titans_lnn.stability")


_ROLE = re.compile(r":[a-z]+:`(~?)([^`]+)`")  # :func:`name`, :class:`~pkg.mod.Name`
_LITERAL = re.compile(r"``([^`]+)``")


def plain(text: str | None) -> str | None:
    """A docstring as ``--help`` should print it: the subcommands' descriptions are their module
    docstrings, whose reST markup (double backquotes, :func: roles) a terminal shows raw."""
    if text is None:
        return None
    text = _ROLE.sub(lambda m: m.group(2).rsplit(".", 1)[-1] if m.group(1) else m.group(2), text)
    return _LITERAL.sub(r"\1", text)


def _info(args: argparse.Namespace) -> int:
    import torch

    import titans_lnn
    from titans_lnn.kernels import dispatch

    print(f"titans-lnn {titans_lnn.__version__}")
    print(f"python     {platform.python_version()} ({sys.executable})")
    cuda = torch.version.cuda or "none (CPU build)"
    print(f"torch      {torch.__version__}  cuda={cuda}  cuda_available={torch.cuda.is_available()}")
    if torch.cuda.is_available():
        print(f"device     {torch.cuda.get_device_name()}")
    print(f"threads    {torch.get_num_threads()}")
    print("fast paths:")
    for op in ("liquid_scan", "memory_update", "sliding_window_attention"):
        have = dispatch.available(op)
        print(f"  {op:26s} available={','.join(have)}  auto->{dispatch.resolve(op, None, torch.cuda.is_available())}")
    for name in ("triton", "flash_attn", "xformers"):
        try:
            mod = importlib.import_module(name)
            print(f"  {name:26s} {getattr(mod, '__version__', 'installed')}")
        except Exception:
            print(f"  {name:26s} not installed")
    return 0


def _demo(args: argparse.Namespace) -> int:
    """Exit status 1 when the streamed logits miss one pass's by more than the dtype's tolerance."""
    import time

    import torch

    from titans_lnn import TitansLNN, TitansLNNConfig
    from titans_lnn.stability import stream, stream_verdict

    torch.manual_seed(args.seed)
    model = TitansLNN(TitansLNNConfig.from_preset(args.preset, variant=args.variant)).eval()
    print(f"{args.preset}/{args.variant}: {model.num_parameters():,} parameters")
    ids = torch.randint(0, model.config.vocab_size, (1, args.length))
    with torch.no_grad():  # inference only: no autograd graph over the whole sequence
        t0 = time.perf_counter()
        whole = model(ids).logits
        streamed, state = stream(model, ids, args.piece)
        ok, verdict = stream_verdict((streamed - whole).abs().max().item(), model.embed.weight.dtype)
        print(f"streamed {args.length} tokens in pieces of {args.piece} vs one pass: {verdict}; "
              f"state {state.nbytes() / 2**20:.2f} MiB ({time.perf_counter() - t0:.1f} s)")
        text = model.generate(ids[:, :16], 32, temperature=0.0)
        print(f"generated (greedy, untrained weights): {text[0, 16:].tolist()}")
    return 0 if ok else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="titans-lnn", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("info", help="print the version, the torch build and the available fast paths")
    p.set_defaults(func=_info)
    p = sub.add_parser("demo", help="build a model, stream a random sequence in pieces, check it against one "
                                    "pass (exit status 1 when outside the tolerance), generate")
    p.add_argument("--preset", default="tiny", help="config preset (debug, tiny, small)")
    p.add_argument("--variant", default="mac", help="model variant (mac, mag, mal, swa, full, liquid, lmm)")
    p.add_argument("--length", type=int, default=1024, help="tokens to stream")
    p.add_argument("--piece", type=int, default=100, help="tokens per streamed piece")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.set_defaults(func=_demo)
    for name in _SUBCOMMANDS:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        module.add_parser(sub)
    # Here rather than in each module, so that every subcommand's docstring stays plain reST.
    for p in (parser, *sub.choices.values()):
        p.description, p.epilog = plain(p.description), plain(p.epilog)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args) or 0


if __name__ == "__main__":
    raise SystemExit(main())
