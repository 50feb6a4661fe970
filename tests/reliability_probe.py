"""Adversarial probe of issue 13: many attempts to make titans-lnn trust what it did not check.

    python tests/reliability_probe.py            # prints every attempt that is not "clear" and the counts
    python tests/reliability_probe.py -v         # every attempt

Each attempt is classified as the issue counts them:
- clear: refused with our own error (ValueError, TypeError, FileNotFoundError, FileExistsError,
  CheckpointError) raised by titans-lnn code and naming what is wrong; for the command line, exit
  status 2 and one error line, no traceback;
- raw: an exception from deep inside (KeyError, AttributeError, a torch error, ZeroDivisionError, ...)
  or a traceback from the command line;
- silent: accepted, and the result is not what was saved / asked for (another model, wrong ids, NaN);
- data lost: a run's history (checkpoints, metrics) or a saved model was destroyed.
Attempts the brief left to others (ModelState, ``dt``/labels in ``TitansLNN.forward``) are in the
group "others'" and counted apart. Not collected by pytest (its name does not start with ``test_``): the
reproducers are in ``tests/test_reliability_files.py`` and ``tests/test_reliability_inputs.py``, and one test of
the latter runs :func:`probe` and asserts that nothing is raw, silent or lost.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import shutil
import sys
import tempfile
import traceback
import warnings
from collections import Counter
from pathlib import Path

import torch

from titans_lnn import TitansLNN, TitansLNNConfig
from titans_lnn.cli import main
from titans_lnn.io import file_digest
from titans_lnn.pretrained import load_pretrained, save_pretrained
from titans_lnn.training.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from titans_lnn.training.data import load_corpus
from titans_lnn.training.trainer import TrainConfig, train

CLEAR = (ValueError, TypeError, FileNotFoundError, FileExistsError, CheckpointError)
ROOTS = tuple(str(Path(__file__).resolve().parent.parent / d) for d in ("titans_lnn", "evals", "memory", "kernels"))


class Silent(Exception):
    """Raised by an attempt whose call was accepted but whose result is wrong."""


class DataLost(Exception):
    """Raised by an attempt after which a run's or a model's files are gone or truncated."""


def classify(attempt) -> tuple[str, str]:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            detail = attempt()
    except Silent as e:
        return "silent", str(e)
    except DataLost as e:
        return "data lost", str(e)
    except CLEAR as e:
        frames = traceback.extract_tb(e.__traceback__)
        ours = frames and frames[-1].filename.startswith(ROOTS)
        return ("clear" if ours else "raw"), f"{type(e).__name__}: {str(e)[:150]}"
    except Exception as e:  # noqa: BLE001 - classifying is the point
        return "raw", f"{type(e).__name__}: {str(e)[:150]}"
    return "clear", detail or "ok"


def cli(argv: list[str]) -> str:
    """Run the command line; returns a detail on a clean exit 2, raises Silent / raw otherwise."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            status = main(argv)
        except SystemExit as e:
            status = e.code
    lines = [line for line in err.getvalue().splitlines() if not line.startswith(("usage:", " "))]
    if status != 2:
        raise Silent(f"exit {status} for {argv}: {err.getvalue()[-200:]}")
    if "Traceback" in err.getvalue() or len([x for x in lines if "error:" in x]) != 1:
        raise RuntimeError(f"not one error line: {err.getvalue()[-300:]}")
    return lines[-1][:150]


# ----------------------------------------------------------------------------- fixtures


def model(**kw) -> TitansLNN:
    torch.manual_seed(0)
    return TitansLNN(TitansLNNConfig.from_preset("debug", **kw)).eval()


def same(a: TitansLNN, b: TitansLNN) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return a.config == b.config and all(torch.equal(sa[k], sb[k]) for k in sa)


def rehash(folder: Path) -> None:
    m = json.loads((folder / "manifest.json").read_text())
    m["files"] = {n: file_digest(folder / n) for n in m["files"]}
    (folder / "manifest.json").write_text(json.dumps(m))


def flip(path: Path, count: int, seed: int) -> None:
    data = bytearray(path.read_bytes())
    g = torch.Generator().manual_seed(seed)
    for i in torch.randint(len(data), (count,), generator=g).tolist():
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def loads_same(folder: Path, original: TitansLNN) -> str:
    loaded = load_pretrained(folder)
    if not same(loaded, original):
        raise Silent(f"{folder} loaded a different model")
    return "loaded the saved model exactly"


# ----------------------------------------------------------------------------- attempts


def api_attempts():
    m = model()
    p = torch.tensor([[1, 2, 3]])
    for kw in [dict(top_k=0), dict(top_k=-1), dict(top_k=1.5), dict(top_k=True), dict(temperature=math.nan),
               dict(temperature=-1.0), dict(temperature=math.inf), dict(top_p=0.0), dict(top_p=1.5),
               dict(top_p=math.nan), dict(max_new_tokens=-1), dict(max_new_tokens=2.5), dict(generator=3),
               dict(return_state="yes")]:
        yield f"generate {kw}", lambda kw=kw: m.generate(p, **{"max_new_tokens": 2, **kw})
    for dtype, vocab in [(torch.uint8, 1000), (torch.int16, 70_000)]:
        def ids_fit(dtype=dtype, vocab=vocab):
            big = model(vocab_size=vocab)
            with torch.no_grad():
                big.embed.weight[-3:] *= 50
            ids = big.generate(p.to(dtype), 4, temperature=0.0)
            if ids.dtype != torch.int64 or int(ids.max()) < 256:
                raise Silent(f"ids {ids.dtype} max {int(ids.max())}")
            return "int64 ids of the whole vocabulary"
        yield f"generate {dtype} prompt, vocab {vocab}", ids_fit
    bad = dict(init_std=math.inf, mem_max_lr=math.inf, liquid_tau_max=math.inf, rope_theta=math.inf,
               norm_eps=math.nan, n_persistent=True, mem_depth=False, mem_gate_context=1, mlp_mult=0.01,
               mem_chunk=10 ** 9, window=10 ** 9, vocab_size=10 ** 12, variant=None, tie_embeddings="false",
               mem_max_grad_norm="2", mem_hidden_mult=1e-9, liquid_tau_min=-1.0, mem_max_forget=2.0)
    for field, value in bad.items():
        yield f"config {field}={value!r}", lambda f=field, v=value: TitansLNNConfig.from_preset("debug", **{f: v})

    def frozen():
        c = TitansLNNConfig.from_preset("debug")
        try:
            c.window = 3
        except AttributeError:  # dataclasses.FrozenInstanceError
            return "frozen"
        raise Silent("config mutated after validation")
    yield "config mutation after validation", frozen
    yield "config from_dict(None)", lambda: TitansLNNConfig.from_dict(None)
    yield "config from_dict missing field", lambda: TitansLNNConfig.from_dict({"variant": "mac"})


def saved_model_attempts(tmp: Path):
    original = model()
    base = tmp / "base"
    save_pretrained(original, base, extra_files={"tokenizer.json": '{"type": "byte"}'})

    def copy(name: str) -> Path:
        folder = tmp / name
        shutil.copytree(base, folder)
        return folder

    for field, value in [("variant", "mag"), ("window", 4), ("mem_chunk", 8), ("tie_embeddings", "false"),
                         ("n_layers", 1), ("d_model", 64), ("vocab_size", 512), ("mem_max_lr", 0.3)]:
        for re in (False, True):
            def edit(field=field, value=value, re=re):
                f = copy(f"cfg-{field}-{re}")
                c = json.loads((f / "config.json").read_text())
                c[field] = value
                (f / "config.json").write_text(json.dumps(c))
                if re:
                    rehash(f)
                return loads_same(f, original)
            yield f"config.json {field}={value!r}{' re-hashed' if re else ''}", edit
    for field in ("mem_chunk", "window", "variant"):
        def missing(field=field):
            f = copy(f"miss-{field}")
            c = json.loads((f / "config.json").read_text())
            del c[field]
            (f / "config.json").write_text(json.dumps(c))
            rehash(f)
            return loads_same(f, original)
        yield f"config.json without {field} (re-hashed)", missing
    for content in (b"null", b"[]", b"{trunc", b""):
        def cfg(content=content):
            f = copy(f"raw-{len(content)}-{content[:2].hex()}")
            (f / "config.json").write_bytes(content)
            rehash(f)
            return loads_same(f, original)
        yield f"config.json = {content!r} (re-hashed)", cfg
    for count in (1, 10, 1000):
        for seed in range(3):
            def weights(count=count, seed=seed):
                f = copy(f"flip-{count}-{seed}")
                flip(f / "model.safetensors", count, seed)
                return loads_same(f, original)
            yield f"model.safetensors: {count} flipped bytes (seed {seed})", weights
    for name in ("model.safetensors", "config.json", "manifest.json"):
        def gone(name=name):
            f = copy(f"gone-{name}")
            (f / name).unlink()
            return loads_same(f, original)
        yield f"{name} deleted", gone

    def truncated():
        f = copy("trunc")
        (f / "model.safetensors").write_bytes((f / "model.safetensors").read_bytes()[:500])
        return loads_same(f, original)
    yield "model.safetensors truncated", truncated

    def swapped():
        other = tmp / "other"
        save_pretrained(model(mem_chunk=8), other)
        f = copy("swap")
        shutil.copy(other / "model.safetensors", f / "model.safetensors")
        rehash(f)
        return loads_same(f, original)
    yield "another model's weights beside this config (re-hashed)", swapped

    def half_save():
        import titans_lnn.pretrained as pretrained

        f = copy("half")
        real = pretrained.write_synced

        def die(path, data):
            raise KeyboardInterrupt

        pretrained.write_synced = die
        try:
            save_pretrained(model(mem_chunk=8), f)
        except KeyboardInterrupt:
            pass
        finally:
            pretrained.write_synced = real
        return loads_same(f, original)
    yield "killed between writing the weights and the config", half_save
    for entry in ({"/etc/hostname": {"bytes": 1, "sha256": "0" * 64}}, {}, {"../x": {"bytes": 1, "sha256": "0"}}):
        def manifest(entry=entry):
            f = copy(f"man-{len(entry)}-{abs(hash(str(entry))) % 1000}")
            m = json.loads((f / "manifest.json").read_text())
            m["files"] = entry if not entry else {**m["files"], **entry}
            (f / "manifest.json").write_text(json.dumps(m))
            return loads_same(f, original)
        yield f"manifest files {entry}", manifest

    def eval_cli():
        f = copy("evalcli")
        flip(f / "model.safetensors", 1000, 0)
        return cli(["eval", "passkey", "--checkpoint", str(f), "--lengths", "256", "--no-progress",
                    "--out", str(tmp / "evalout")])
    yield "eval --checkpoint with 1000 flipped bytes", eval_cli


def checkpoint_attempts(tmp: Path):
    tensors = {"w": torch.randn(3, 3)}

    def fresh(name):
        return save_checkpoint(tmp / name, 1, tensors, {"scheduler": {}, "k": 1})

    def loads_exactly(path):
        c = load_checkpoint(path)
        if not torch.equal(c.tensors["w"], tensors["w"]) or c.meta != {"scheduler": {}, "k": 1}:
            raise Silent(f"{path} loaded other contents")
        return "loaded exactly"

    edits = {"absolute path": lambda m: m["files"].update({"/etc/hostname": file_digest("/etc/hostname")}),
             "empty files": lambda m: m.update(files={}),
             "parent path": lambda m: m["files"].update({"../../x": {"bytes": 0, "sha256": ""}}),
             "entry not an object": lambda m: m["files"].update({"meta.json": 3}),
             "files a list": lambda m: m.update(files=[]),
             "step changed": lambda m: m.update(step=9),
             "format changed": lambda m: m.update(format="x")}
    for what, edit in edits.items():
        def man(what=what, edit=edit):
            p = fresh(f"m-{what.replace(' ', '-')}")
            m = json.loads((p / "manifest.json").read_text())
            edit(m)
            (p / "manifest.json").write_text(json.dumps(m))
            return loads_exactly(p)
        yield f"checkpoint manifest: {what}", man
    for text in ("null", "[]", '{"format": "titans-lnn-checkpoint", "step": "1", "meta": {}}',
                 '{"format": "titans-lnn-checkpoint", "step": 1, "meta": null}'):
        def meta(text=text):
            p = fresh(f"meta-{abs(hash(text)) % 10000}")
            (p / "meta.json").write_text(text)
            m = json.loads((p / "manifest.json").read_text())
            m["files"]["meta.json"] = file_digest(p / "meta.json")
            (p / "manifest.json").write_text(json.dumps(m))
            return loads_exactly(p)
        yield f"checkpoint meta.json = {text[:40]} (re-hashed)", meta
    for count in (1, 100):
        def data(count=count):
            p = fresh(f"flip-{count}")
            flip(p / "tensors.safetensors", count, 0)
            return loads_exactly(p)
        yield f"checkpoint tensors: {count} flipped bytes", data


def run_attempts(tmp: Path):
    words = "the quick brown fox jumps over a lazy dog and then runs far away".split()
    g = torch.Generator().manual_seed(0)
    text = "\n".join(" ".join(words[i] for i in torch.randint(len(words), (10,), generator=g).tolist())
                     for _ in range(150))
    (tmp / "corpus.txt").write_text(text)
    base = tmp / "run"
    train(TrainConfig(model_preset="debug", data=str(tmp / "corpus.txt"), out=str(base), batch_size=2, seq_len=16,
                      steps=8, val_fraction=0.1, eval_batches=2, eval_every=4, save_every=1, log_every=1, keep=5,
                      stop_at=2, progress=False, tensorboard=False))

    def snapshot(run: Path) -> dict:
        return {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and "tensorboard" not in p.parts}

    def guarded(name, damage, argv_extra=()):
        def attempt():
            run = tmp / name
            shutil.copytree(base, run)
            damage(run)
            before = snapshot(run)
            out = cli(["train", "--out", str(run), "--data", str(tmp / "corpus.txt"), "--no-progress",
                       "--no-tensorboard", *argv_extra])
            after = snapshot(run)
            lost = [str(p.relative_to(run)) for p in before if p not in after or len(after[p]) < len(before[p])]
            if lost:
                raise DataLost(f"lost or truncated: {lost}")
            return out
        return attempt

    def corrupt_all(run):
        for c in (run / "checkpoints").iterdir():
            flip(c / "tensors.safetensors", 10, 0)

    def meta_without(key):
        def damage(run):
            for c in (run / "checkpoints").iterdir():
                m = json.loads((c / "meta.json").read_text())
                del m["meta"][key]
                (c / "meta.json").write_text(json.dumps(m))
                man = json.loads((c / "manifest.json").read_text())
                man["files"]["meta.json"] = file_digest(c / "meta.json")
                (c / "manifest.json").write_text(json.dumps(man))
        return damage

    yield "train --resume, every checkpoint corrupt", guarded("all-corrupt", corrupt_all, ["--resume"])
    yield "train (no --resume), every checkpoint corrupt", guarded("all-corrupt-new", corrupt_all, ["--steps", "4"])
    yield "train (no --resume) into a run", guarded("new-into-run", lambda r: None, ["--steps", "4"])
    for key in ("scheduler", "sampler", "state", "tokens_seen"):
        yield f"train --resume, meta.json without {key} (re-hashed)", guarded(f"no-{key}", meta_without(key),
                                                                              ["--resume"])
    yield "train --device cuda on a CPU machine" if not torch.cuda.is_available() else "train --device cuda:99", \
        lambda: cli(["train", "--device", "cuda" if not torch.cuda.is_available() else "cuda:99", "--out",
                     str(tmp / "dev"), "--no-progress"])


def cli_attempts(tmp: Path):
    flags = [["demo", "--piece", "0"], ["demo", "--length", "-5"], ["demo", "--preset", "huge"],
             ["demo", "--variant", "gpt"], ["demo", "--seed", "x"]]
    for task in ("passkey", "mqar", "genomics"):
        base = ["eval", task, "--preset", "debug", "--no-progress"]
        flags += [base + ["--samples", "0"], base + ["--lengths", ""], base + ["--seed", "-1"],
                  base + ["--device", "gpu"], base + ["--chunk-len", "0"], base + ["--max-tokens", "-1"]]
    flags += [["eval", "passkey", "--preset", "debug", "--max-new-tokens", "0"],
              ["eval", "passkey", "--preset", "debug", "--depths", ""],
              ["eval", "passkey", "--preset", "debug", "--depths", "1.5"],
              ["eval", "perplexity", "--preset", "debug", "--val-fraction", "nan"],
              ["eval", "passkey", "--checkpoint", "nope"],
              ["eval", "genomics", "--preset", "debug", "--data", "nope.fa"],
              ["eval", "mqar", "--preset", "debug", "--batch-size", "0"],
              ["eval", "mqar", "--preset", "debug", "--num-kv-pairs", ""]]
    for name in ("steps", "batch-size", "seq-len", "bptt", "accum", "keep", "log-every", "eval-batches"):
        flags.append(["train", f"--{name}", "0"])
    for name, value in (("lr", "nan"), ("lr", "0"), ("beta1", "1"), ("beta2", "-0.1"), ("min-lr-ratio", "2"),
                        ("grad-clip", "-1"), ("weight-decay", "inf"), ("val-fraction", "0"), ("warmup", "-1"),
                        ("save-every", "0"), ("eval-every", "x"), ("segments", "-1"), ("seed", "-3")):
        flags.append(["train", f"--{name}", value])
    for argv in flags:
        yield " ".join(argv), lambda argv=argv: cli(argv + (["--out", str(tmp / "o")] if argv[0] != "demo" else []))


def data_attempts(tmp: Path):
    (tmp / "mixed").mkdir()
    (tmp / "mixed" / "a.fa").write_text(">a\nACGT\n")
    (tmp / "mixed" / "README.md").write_text("# genomes\n")
    yield "FASTA folder with a README.md", lambda: load_corpus(tmp / "mixed")
    (tmp / "cr.fa").write_bytes(b">" + b"x" * 20_000 + b"\r" + b"ACGT" * 10)

    def lone_cr():
        c = load_corpus(tmp / "cr.fa")
        if len(c.tokens) != 40:
            raise Silent(f"{len(c.tokens)} tokens read from 40 bases")
        return "lone CR read as line breaks"
    yield "lone-CR FASTA", lone_cr
    (tmp / "longhead.fa").write_bytes(b">" + b"x" * 20_000 + b"\n")

    def long_header():
        try:
            load_corpus(tmp / "longhead.fa")
        except ValueError as e:
            if len(str(e)) > 500:
                raise Silent(f"an error of {len(str(e))} characters") from None
            raise
        raise Silent("a 20 KB header was accepted")
    yield "FASTA with a 20 KB header and no sequence", long_header
    (tmp / "nul.txt").write_bytes(b"\x00" * 50_000)
    yield "50 KB of NUL bytes as text", lambda: load_corpus(tmp / "nul.txt")
    (tmp / "three.fa").write_text(">r\nACG\n")

    def few_bases():
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("default")
            status = main(["eval", "genomics", "--preset", "debug", "--data", str(tmp / "three.fa"), "--no-progress",
                           "--out", str(tmp / "g")])
        if status != 0 or "warning" not in err.getvalue():
            raise Silent(f"exit {status} without a warning")
        return "warned"
    yield "eval genomics on 3 bases", few_bases
    (tmp / "dna.txt").write_text("ACGT ACGT")
    yield "nucleotide tokenizer on a text with spaces", lambda: load_corpus(tmp / "dna.txt", "nucleotide")
    (tmp / "bad.fa").write_text(">r\nACGTXX\n")
    yield "eval genomics on a FASTA with an X", lambda: cli(["eval", "genomics", "--preset", "debug", "--data",
                                                            str(tmp / "bad.fa"), "--no-progress", "--out",
                                                            str(tmp / "g2")])
    (tmp / "empty.fa").write_text("")
    yield "empty FASTA", lambda: load_corpus(tmp / "empty.fa")
    (tmp / "gz.fa.gz").write_bytes(b"\x1f\x8b garbage")
    yield "corrupt gzip FASTA", lambda: load_corpus(tmp / "gz.fa.gz")
    (tmp / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    yield "latin-1 text", lambda: load_corpus(tmp / "latin1.txt")


def others_attempts(tmp: Path):
    """ModelState (item 5) and forward's dt / labels (item 7): the lead engineer's, counted apart."""
    m = model()
    x = torch.randint(0, 256, (1, 6))
    with torch.no_grad():
        s = m(x).state

    def returns_finite(f):
        def attempt():
            with torch.no_grad():
                out = f()
            values = [out.logits] + ([out.loss] if out.loss is not None else [])
            if not all(bool(torch.isfinite(v).all()) for v in values):
                raise Silent("non-finite logits or loss")
            raise Silent("accepted")
        return attempt

    yield "forward dt negative", returns_finite(lambda: m(x, dt=-torch.ones(1, 6)))
    yield "forward dt NaN", returns_finite(lambda: m(x, dt=torch.full((1, 6), math.nan)))
    yield "forward float labels", returns_finite(lambda: m(x, labels=torch.full((1, 6), 1.7)))

    def all_ignored():
        with torch.no_grad():
            loss = m(x, labels=torch.full((1, 6), -100)).loss
        if not bool(torch.isfinite(loss)):
            raise Silent(f"loss {loss.item()}")
        return f"loss {loss.item()} (nothing to score)"
    yield "forward all labels -100", all_ignored

    def state_pos(pos):
        def attempt():
            import dataclasses

            with torch.no_grad():
                m(x[:, :1], state=dataclasses.replace(s, pos=pos))
            raise Silent(f"pos={pos} accepted")
        return attempt
    yield "state pos=-3", state_pos(-3)
    yield "state pos=999", state_pos(999)

    def dropped_layer():
        import dataclasses

        with torch.no_grad():
            m(x[:, :1], state=dataclasses.replace(s, layers=s.layers[:1]))
        raise Silent("one layer's state accepted")
    yield "state with a layer dropped", dropped_layer

    def edited_pos_file():
        path = tmp / "s.safetensors"
        s.save(path)
        raw = path.read_bytes().replace(b'"pos":"6"', b'"pos":"2"')
        path.write_bytes(raw)
        loaded = type(s).load(path, m)
        if loaded.pos != s.pos:
            raise Silent(f"edited pos {loaded.pos} loaded")
        return "edit refused"
    yield "state file with an edited pos", edited_pos_file


GROUPS = {"api": api_attempts, "saved model": saved_model_attempts, "checkpoint": checkpoint_attempts,
          "run (resume, data loss)": run_attempts, "cli": cli_attempts, "data": data_attempts,
          "others' (state, dt/labels)": others_attempts}


def probe(verbose: bool = False) -> dict[str, Counter]:
    results: dict[str, Counter] = {}
    with tempfile.TemporaryDirectory() as root:
        cwd = os.getcwd()
        os.chdir(root)
        try:
            for group, make in GROUPS.items():
                tmp = Path(root) / group.split()[0].strip("'")
                tmp.mkdir()
                counts = results.setdefault(group, Counter())
                attempts = make() if group == "api" else make(tmp)
                for name, attempt in attempts:
                    kind, detail = classify(attempt)
                    counts[kind] += 1
                    if verbose or kind != "clear":
                        print(f"[{group}] {kind:9s} {name}: {detail}")
        finally:
            os.chdir(cwd)
    return results


if __name__ == "__main__":
    torch.set_num_threads(1)
    results = probe(verbose="-v" in sys.argv)
    kinds = ("clear", "raw", "silent", "data lost")
    print(f"\n{'group':28s} " + " ".join(f"{k:>9s}" for k in kinds) + "    total")
    total = Counter()
    for group, counts in results.items():
        total.update(counts) if not group.startswith("others") else None
        print(f"{group:28s} " + " ".join(f"{counts[k]:9d}" for k in kinds) + f" {sum(counts.values()):8d}")
    print(f"{'all but others':28s} " + " ".join(f"{total[k]:9d}" for k in kinds) + f" {sum(total.values()):8d}")
