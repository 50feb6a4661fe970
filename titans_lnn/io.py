"""Files and folders written so that a kill at any moment leaves the old version or the new one, never
a mix, and read back only after checking them.

One set of helpers for training checkpoints, streaming-state files and saved models:

    atomic_write_bytes(path, data)              # a temporary file beside it, fsync, one rename
    atomic_write_file(path, lambda tmp: save_file(tensors, tmp))   # the same for a writer that takes a path
    atomic_replace_dir(folder, fill)            # fill a sibling temporary folder, fsync, swap it in
    manifest = make_manifest(folder, names, format="...")          # byte sizes and SHA-256 sums
    verify_manifest(folder, manifest, required=names)              # -> raises IntegrityError naming the file

A folder replaced by ``atomic_replace_dir`` is, after a kill, either the old folder, the new one, or
(between its two renames) absent with the old one kept beside it as ``.old-<name>-<pid>-<hex>``, which
the next ``atomic_replace_dir`` of the same folder (or ``recover_replaced_dir``) puts back.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path

MANIFEST_VERSION = 1


class IntegrityError(ValueError):
    """A file or folder is incomplete, damaged or edited: its contents do not match what was written."""


# ----------------------------------------------------------------------------- files


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename or a new entry in folder ``path`` durable (a no-op where folders cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_file(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Replace ``path`` with what ``write(tmp_path)`` writes to a temporary file in the same folder:
    readers see the old file or the new one, never a part. The temporary file is removed on failure."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_bytes(path: str | os.PathLike, data: bytes | str) -> None:
    """Replace ``path`` with ``data`` (str is written as UTF-8) all at once."""
    if isinstance(data, str):
        data = data.encode("utf-8")
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"atomic_write_bytes: data must be bytes or str, got {type(data).__name__}")

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)

    atomic_write_file(path, write)


def write_synced(path: str | os.PathLike, data: bytes) -> None:
    """Write a new file and fsync it (for files inside a temporary folder that is renamed later)."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


# ----------------------------------------------------------------------------- folders

_OLD_DIR = re.compile(r"\.old-(.+)-(\d+)-[0-9a-f]{8}")
_TMP_DIR = re.compile(r"\.tmp-(.+)-(\d+)-[0-9a-f]{8}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def recover_replaced_dir(folder: str | os.PathLike) -> None:
    """Undo what a killed ``atomic_replace_dir(folder, ...)`` left: put the old folder back when the new
    one never arrived, and remove temporary and superseded copies whose process is gone."""
    folder = Path(folder)
    parent = folder.parent
    if not parent.is_dir():
        return
    changed = False
    for p in sorted(parent.iterdir()):
        for pattern in (_OLD_DIR, _TMP_DIR):
            m = pattern.fullmatch(p.name)
            if not m or m.group(1) != folder.name or _alive(int(m.group(2))):
                continue
            if pattern is _OLD_DIR and not folder.exists():
                os.replace(p, folder)
            else:
                shutil.rmtree(p, ignore_errors=True)
            changed = True
    if changed:
        fsync_dir(parent)


def atomic_replace_dir(folder: str | os.PathLike, fill: Callable[[Path], None]) -> Path:
    """Replace ``folder`` by a new one that ``fill(tmp)`` populates. ``fill`` writes into a temporary
    sibling folder; every file in it is fsynced, then the folder is renamed into place (the old one,
    if any, is moved aside first and deleted after). Returns ``folder``."""
    folder = Path(os.path.abspath(folder))
    if Path.cwd() == folder or folder in Path.cwd().parents:
        raise ValueError(f"{folder} is the current working folder (or holds it): it cannot be replaced as a "
                         f"whole; write into a subfolder")
    folder.parent.mkdir(parents=True, exist_ok=True)
    recover_replaced_dir(folder)
    if folder.exists() and not folder.is_dir():
        raise FileExistsError(f"{folder} exists and is not a folder: expected a folder (or nothing) to replace")
    tag = f"{folder.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp = folder.parent / f".tmp-{tag}"
    tmp.mkdir()
    try:
        fill(tmp)
        for p in tmp.rglob("*"):
            if p.is_file():
                with open(p, "rb+") as f:
                    os.fsync(f.fileno())
        fsync_dir(tmp)
        if folder.exists():
            old = folder.parent / f".old-{tag}"
            os.replace(folder, old)
            os.replace(tmp, folder)
            fsync_dir(folder.parent)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, folder)
        fsync_dir(folder.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


# ----------------------------------------------------------------------------- manifests


def file_digest(path: str | os.PathLike) -> dict:
    """``{"bytes": size, "sha256": hex digest}`` of a file."""
    h, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
            size += len(chunk)
    return {"bytes": size, "sha256": h.hexdigest()}


def make_manifest(folder: str | os.PathLike, names: list[str], *, format: str, **extra) -> dict:
    """A manifest of the files ``names`` in ``folder``: format, version, ``extra`` fields, and for each
    file its byte size and SHA-256."""
    folder = Path(folder)
    return {"format": format, "version": MANIFEST_VERSION, **extra,
            "files": {name: file_digest(folder / name) for name in names}}


def read_json(path: str | os.PathLike, what: str = "JSON object"):
    """A JSON object read from ``path``; IntegrityError naming the file when it is not one."""
    path = Path(path)
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise IntegrityError(f"{path} is not valid JSON ({e}): expected a {what}") from None
    if not isinstance(data, dict):
        raise IntegrityError(f"{path} holds a JSON {type(data).__name__} ({str(data)[:40]}): expected a {what}")
    return data


def verify_manifest(folder: str | os.PathLike, manifest: dict, *, format: str, required: set[str],
                    optional: set[str] = frozenset(), label: str | None = None) -> None:
    """Check ``manifest`` (as read from ``folder``) lists exactly the ``required`` files plus some of the
    ``optional`` ones, each a plain name inside ``folder``, and that every file's size and SHA-256 match.
    Raises IntegrityError naming the folder and the file."""
    folder = Path(folder)
    label = label or str(folder)
    if manifest.get("format") != format:
        raise IntegrityError(f"{label}: manifest format {manifest.get('format')!r}, expected {format!r}")
    if manifest.get("version") != MANIFEST_VERSION:
        raise IntegrityError(f"{label}: manifest version {manifest.get('version')!r}, expected {MANIFEST_VERSION}")
    files = manifest.get("files")
    if not isinstance(files, dict):
        raise IntegrityError(f"{label}: manifest 'files' is {type(files).__name__}, expected an object")
    names = set(files)
    missing, unknown = sorted(required - names), sorted(names - required - set(optional))
    if missing or unknown:
        raise IntegrityError(f"{label}: manifest lists {sorted(names)}, expected {sorted(required)}"
                             f"{' plus any of ' + str(sorted(optional)) if optional else ''}")
    for name, expected in files.items():
        if not (isinstance(expected, dict) and isinstance(expected.get("bytes"), int)
                and not isinstance(expected.get("bytes"), bool) and isinstance(expected.get("sha256"), str)):
            raise IntegrityError(f"{label}: manifest entry for {name} is {expected!r}, expected "
                                 f"{{'bytes': int, 'sha256': str}}")
        f = folder / name
        if not f.is_file():
            raise IntegrityError(f"{label}: {f} is missing")
        size = f.stat().st_size
        if size != expected["bytes"]:
            raise IntegrityError(f"{label}: {f} has {size} bytes, the manifest says {expected['bytes']} "
                                 f"(truncated or replaced)")
        digest = file_digest(f)["sha256"]
        if digest != expected["sha256"]:
            raise IntegrityError(f"{label}: {f} is corrupt: SHA-256 {digest[:16]}... does not match the "
                                 f"manifest's {expected['sha256'][:16]}...")
