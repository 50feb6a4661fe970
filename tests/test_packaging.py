"""Packaging: every package folder is listed in pyproject, importing the package is light, the extras
and the license are as the README says, and --help prints plain text."""

import argparse
import pathlib
import re
import subprocess
import sys

import tomllib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_every_package_is_listed():
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed, dirs = set(cfg["packages"]), cfg["package-dir"]
    found = set()
    for name, folder in dirs.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder)
            found.add(".".join([name, *rel.parts]) if rel.parts else name)
    # Nested packages map through their parent's folder; collapse names found twice.
    found = {n for n in found if not any(n != m and n.startswith(m + ".") and n[len(m) + 1:] in dirs.get(m, "")
                                         for m in found)}
    assert found <= listed, f"packages missing from pyproject: {sorted(found - listed)}"
    assert listed <= found, f"pyproject lists packages with no __init__.py: {sorted(listed - found)}"


def test_import_does_not_load_triton_or_cuda_extensions():
    code = ("import sys, titans_lnn, titans_lnn.kernels, titans_lnn.memory; "
            "bad = [m for m in ('triton', 'flash_attn', 'xformers') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_cli_info_runs():
    out = subprocess.run([sys.executable, "-m", "titans_lnn.cli", "info"], check=True, capture_output=True, text=True)
    assert "titans-lnn" in out.stdout and "liquid_scan" in out.stdout


def test_main_job_extra_is_light_and_dev_has_every_extra_the_tests_use():
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]

    def names(reqs):
        return {re.split(r"[<>=!~\[ ]", r, maxsplit=1)[0].lower() for r in reqs}

    assert "lm-eval" not in names(extras["evals"])  # `pip install -e '.[evals]'` is the main job's set-up
    assert names(extras["evals"]) | names(extras["lmeval"]) <= names(extras["dev"])  # CI installs dev
    assert "pip install -e '.[evals]' && titans-lnn niah" in (ROOT / "README.md").read_text()


def test_help_texts_show_no_rest_markup():
    """The subcommands' descriptions are their module docstrings; --help prints them without reST."""
    from titans_lnn.cli import build_parser, plain

    assert plain("``--out`` and :func:`~titans_lnn.evals.runner.stream_nll` or :class:`a.B`") == \
        "--out and stream_nll or a.B"
    parser = build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, sub in [("titans-lnn", parser), *subparsers.choices.items()]:
        text = sub.format_help()
        assert "``" not in text and not re.search(r":[a-z]+:`", text), name


def test_license_is_apache_2_as_declared():
    assert tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["license"] == {"text": "Apache-2.0"}
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text and "END OF TERMS AND CONDITIONS" in text
