"""Packaging: every package folder is listed in pyproject, and importing the package is light."""

import pathlib
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
