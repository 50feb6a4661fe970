"""The ``titans-lnn`` command line.

    titans-lnn info                      version, torch build, which fast paths are available
    titans-lnn demo [--preset tiny]      build a model, stream a sequence in pieces, check vs one pass, generate
    titans-lnn stability [--variant all] perturbation growth and streamed == one pass (titans_lnn.stability)
    titans-lnn train ...                 (titans_lnn.training.cli)
    titans-lnn eval TASK ...             (titans_lnn.evals.cli)
    titans-lnn niah ...                  the needle-in-a-haystack main job (titans_lnn.evals.niah)

Each subcommand lives in its own module with ``add_parser(subparsers)`` registering a function
under ``func``. A subcommand whose optional third-party dependency is missing stays listed and says
what to install when run; any other import error of a subcommand module is raised (a broken module
must fail loudly, not vanish from the command line).

Flag values are checked before any work starts (the argparse types below): a bad value prints one
line naming the flag, the value and what is expected, with exit status 2.
"""

from __future__ import annotations

import argparse
import importlib
import platform
import re
import sys

from titans_lnn.config import PRESETS, VARIANTS

# Subcommand -> its module, in the order their help is listed.
_SUBCOMMANDS = {"train": "titans_lnn.training.cli", "eval": "titans_lnn.evals.cli", "niah": "titans_lnn.evals.niah",
                "stability": "titans_lnn.stability", "adapt": "titans_lnn.adapt.cli", "zoo": "titans_lnn.evals.zoo",
                "embed": "titans_lnn.evals.embed"}
MAX_DEMO_LENGTH = 1 << 20  # the demo also reads the whole sequence in one pass


def integer(lo: int, hi: int | None = None, what: str = ""):
    """An argparse type: a whole number in [lo, hi] (no upper bound when ``hi`` is None); ``what`` is said
    after the range in the error."""
    expected = f"a whole number >= {lo}" if hi is None else f"a whole number in [{lo}, {hi}]"
    expected += f" ({what})" if what else ""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number: expected {expected}") from None
        if value < lo or (hi is not None and value > hi):
            raise argparse.ArgumentTypeError(f"{text!r} is out of range: expected {expected}")
        return value

    parse.__name__ = "integer"
    return parse


def number(lo: float, hi: float, *, open_lo: bool = False, open_hi: bool = False):
    """An argparse type: a finite number in the interval from ``lo`` to ``hi`` (open ends as given)."""
    expected = f"a number in {'(' if open_lo else '['}{lo}, {hi}{')' if open_hi else ']'}"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number: expected {expected}") from None
        inside = (lo < value if open_lo else lo <= value) and (value < hi if open_hi else value <= hi)
        if not inside:  # NaN is never inside
            raise argparse.ArgumentTypeError(f"{text!r} is out of range: expected {expected}")
        return value

    parse.__name__ = "number"
    return parse


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
    print("streaming state per layer (batch 1, fp32; full attention grows with the tokens read):")
    for preset in ("tiny", "small"):
        sizes = _state_bytes_per_layer(preset)
        print(f"  {preset:6s} " + "  ".join(f"{v} {b / 1024:.1f} KiB" for v, b in sizes.items()))
    return 0


def _state_bytes_per_layer(preset: str) -> dict[str, float]:
    """{variant: bytes of one block's streaming state} for ``preset``, built on the meta device (no memory)."""
    import torch

    from titans_lnn import VARIANTS, TitansLNN, TitansLNNConfig

    sizes = {}
    for variant in VARIANTS:
        if variant == "full":
            continue
        with torch.device("meta"):
            model = TitansLNN(TitansLNNConfig.from_preset(preset, variant=variant))
        sizes[variant] = model.init_state(1, device="meta").nbytes() / model.config.n_layers
    return sizes


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


def _add_unavailable(sub, command: str, module: str, error: ModuleNotFoundError) -> None:
    """List ``command`` even though its module needs a package that is not installed; running it says which."""
    message = (f"titans-lnn {command}: unavailable: {module} needs the package {error.name!r}, which is not "
               f"installed (pip install {error.name})")
    # No option prefix: whatever flags follow are taken as plain words, so the message below is what prints.
    p = sub.add_parser(command, help=f"(unavailable: needs {error.name})", add_help=False, prefix_chars="\0")
    p.add_argument("rest", nargs="*", help=argparse.SUPPRESS)

    def run(args: argparse.Namespace) -> int:
        print(message, file=sys.stderr)
        return 2

    p.set_defaults(func=run)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="titans-lnn", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("info", help="print the version, the torch build and the available fast paths")
    p.set_defaults(func=_info)
    p = sub.add_parser("demo", help="build a model, stream a random sequence in pieces, check it against one "
                                    "pass (exit status 1 when outside the tolerance), generate")
    p.add_argument("--preset", default="tiny", choices=list(PRESETS), help="config preset (default: tiny)")
    p.add_argument("--variant", default="mac", choices=list(VARIANTS), help="model variant (default: mac)")
    p.add_argument("--length", type=integer(1, MAX_DEMO_LENGTH), default=1024, help="tokens to stream (default: 1024)")
    p.add_argument("--piece", type=integer(1), default=100, help="tokens per streamed piece (default: 100)")
    p.add_argument("--seed", type=integer(0), default=0, help="random seed (default: 0)")
    p.set_defaults(func=_demo)
    for command, name in _SUBCOMMANDS.items():
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name is None or e.name.split(".")[0] == "titans_lnn":
                raise  # our own module is missing or broken: not an optional dependency
            _add_unavailable(sub, command, name, e)
            continue
        module.add_parser(sub)
    # Here rather than in each module, so that every subcommand's docstring stays plain reST.
    for p in (parser, *sub.choices.values()):
        p.description, p.epilog = plain(p.description), plain(p.epilog)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Exit status: the subcommand's; 2 for a bad flag, or a missing or damaged input file (one line)."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError) + _file_errors() as e:
        # A subcommand that did not catch a missing or damaged input itself: one line, not a traceback.
        print(f"titans-lnn {args.command}: error: {e}", file=sys.stderr)
        return 2


def _file_errors() -> tuple[type[Exception], ...]:
    """Our errors for damaged files (checksums, manifests, fingerprints), when their modules are loaded."""
    errors = []
    for module, name in (("titans_lnn.io", "IntegrityError"), ("titans_lnn.training.checkpoint", "CheckpointError")):
        if module in sys.modules:
            errors.append(getattr(sys.modules[module], name))
    return tuple(errors)


if __name__ == "__main__":
    raise SystemExit(main())
