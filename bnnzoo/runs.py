"""Run directories: written atomically, with a manifest of file hashes checked on load.

A run is a directory holding ``config.json`` and ``posterior.pt`` (see
:meth:`bnnzoo.posterior.Posterior.save`) and whatever else was written with them (the CLI's
``metrics.json``, a pruning report). :func:`write_run` writes all of it in a temporary directory
beside the target (``.NAME.partial-PID-TOKEN``), adds ``manifest.json`` (every file's relative
path, size and SHA-256), flushes the files to disk and renames the directory into place, so a reader
sees either no run, the previous complete run, or the new complete run, never a mix. A write that
raises (or is interrupted) removes its temporary directory; one killed outright leaves it beside the
target under its ``.partial`` name, and the next write of the same target removes it once its
process is gone.

An existing run is replaced only with ``overwrite=True``: the old directory is renamed aside
(``.NAME.replaced-PID-TOKEN``), the new one renamed into place, then the old one deleted (no stale
file of the old run survives). A writer killed between the two renames leaves no run at the target;
the next write there renames the old run back first.

:func:`verify_run` checks a run against its manifest: every listed file present, of the listed size
and hash. A file not listed (diagnostics written later into the run directory) is allowed. Runs
saved before manifests existed have none and get only the structural checks of
:meth:`~bnnzoo.posterior.Posterior.load`; a run whose ``config.json`` says it was written with a
manifest (``"manifest": "manifest.json"``) must have it.

:func:`run_dataset` finds the data to evaluate a saved run on: the data given now, else the
recorded source if it still exists, else the recorded dataset name.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

from .data import Dataset, load_dataset
from .errors import DataError, RunError

#: the manifest's file name inside a run directory
MANIFEST = "manifest.json"
#: the version of the manifest's layout
MANIFEST_FORMAT = 1
_PARTIAL = ".partial-"
_REPLACED = ".replaced-"
_CHUNK = 1 << 20


def file_digest(path: Path) -> tuple[str, int]:
    """The SHA-256 (hex) and size in bytes of the file ``path``."""
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def _files(root: Path) -> list[Path]:
    """Every regular file under ``root`` (recursively), except the manifest, sorted."""
    return sorted(p for p in root.rglob("*") if p.is_file() and p.relative_to(root) != Path(MANIFEST))


def _fsync(path: Path) -> None:
    """Flush ``path`` (a file, or a directory's entries) to disk; a platform that cannot open a
    directory for this (Windows) skips directories."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        if path.is_dir():
            return
        raise
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_manifest(root: Path) -> dict:
    """Write ``root/manifest.json`` listing every other file under ``root`` with its size and SHA-256;
    return the manifest."""
    files = {}
    for p in _files(root):
        sha, size = file_digest(p)
        files[p.relative_to(root).as_posix()] = {"sha256": sha, "size": size}
    manifest = {"manifest_format": MANIFEST_FORMAT, "files": files}
    (root / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return manifest


#: names whose presence marks a directory as a run (or the checkpoint of one) that ``overwrite`` may replace
RUN_MARKERS = ("config.json", "posterior.pt", MANIFEST, "checkpoint")


def check_target(path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Check before any work that a run can be written at ``path``: it must not be a file, and an
    existing non-empty directory needs ``overwrite`` and must be a run (hold one of
    :data:`RUN_MARKERS`): ``overwrite`` never deletes a directory of other files. Raises
    :class:`~bnnzoo.errors.RunError`."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise RunError(f"{path} exists and is not a directory: a run is a directory; choose another --out")
    if not path.is_dir() or not any(path.iterdir()):
        return path
    if not overwrite:
        raise RunError(f"{path} already exists: pass --overwrite (overwrite=True) to replace it, "
                       f"or choose another --out")
    if not any((path / marker).exists() for marker in RUN_MARKERS):
        raise RunError(f"{path} is a directory of other files, not a bnnzoo run: it is not replaced even with "
                       f"--overwrite; choose another --out")
    return path


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _clean_abandoned(path: Path) -> None:
    """Tidy up after writers of ``path`` whose process has gone (killed): remove their temporary
    directories; a previous run they had moved aside but not yet replaced (``path`` itself
    missing) is renamed back to ``path``."""
    parent, name = path.absolute().parent, path.name
    if not parent.is_dir():
        return
    for marker in (_REPLACED, _PARTIAL):
        for leftover in sorted(parent.glob(f".{glob.escape(name)}{marker}*")):
            pid = leftover.name[len(name) + 1 + len(marker):].partition("-")[0]
            if not pid.isdigit() or int(pid) == os.getpid() or _pid_alive(int(pid)):
                continue
            if marker == _REPLACED and not path.exists():
                os.rename(leftover, path)
            else:
                shutil.rmtree(leftover, ignore_errors=True)


@contextlib.contextmanager
def write_run(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Write a run directory atomically: ``with write_run(path) as tmp: <write files into tmp>``.

    On a normal exit the manifest is written, the files are flushed to disk and ``tmp`` is renamed
    to ``path`` (replacing an existing run only with ``overwrite``; see the module docstring). On an
    exception ``tmp`` is removed and ``path`` is left as it was. Raises
    :class:`~bnnzoo.errors.RunError` when ``path`` is taken (checked before and after the writing).
    """
    path = Path(path)
    _clean_abandoned(path)
    check_target(path, overwrite)
    parent = path.absolute().parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = parent / f".{path.name}{_PARTIAL}{os.getpid()}-{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        yield tmp
        write_manifest(tmp)
        for p in [*_files(tmp), tmp / MANIFEST, tmp]:
            _fsync(p)
        _publish(tmp, path, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync(parent)


def _publish(tmp: Path, path: Path, overwrite: bool) -> None:
    """Rename the complete ``tmp`` to ``path``; an existing ``path`` is renamed aside first and then
    deleted (only with ``overwrite``; an empty directory is replaced in any case)."""
    if path.is_dir() and not any(path.iterdir()):
        path.rmdir()
    if not path.exists():
        try:
            os.rename(tmp, path)
        except OSError as err:  # another writer took the name between the check and now
            raise RunError(f"{path} appeared while the run was being written: {err.strerror}") from None
        return
    check_target(path, overwrite)
    aside = path.absolute().parent / f".{path.name}{_REPLACED}{os.getpid()}-{secrets.token_hex(4)}"
    os.rename(path, aside)
    try:
        os.rename(tmp, path)
    except BaseException:
        os.rename(aside, path)
        raise
    shutil.rmtree(aside, ignore_errors=True)


def read_manifest(path: Path) -> dict | None:
    """The manifest of the run ``path`` (``None`` if it has none), its layout checked."""
    file = path / MANIFEST
    if not file.exists():
        return None
    try:
        manifest = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise RunError(f"{path}: {MANIFEST} is unreadable ({err})") from None
    files = manifest.get("files") if isinstance(manifest, dict) else None
    ok = isinstance(files, dict) and all(
        isinstance(name, str) and isinstance(entry, dict) and isinstance(entry.get("sha256"), str)
        and isinstance(entry.get("size"), int) and not PurePosixPath(name).is_absolute()
        and ".." not in PurePosixPath(name).parts
        for name, entry in files.items())
    if not ok or manifest.get("manifest_format") != MANIFEST_FORMAT:
        raise RunError(f"{path}: {MANIFEST} is not a bnnzoo manifest of format {MANIFEST_FORMAT} "
                       f"(expected {{'manifest_format': {MANIFEST_FORMAT}, 'files': {{name: {{'sha256', 'size'}}}}}})")
    return manifest


def verify_run(path: str | os.PathLike, required: tuple[str, ...] = ("config.json", "posterior.pt")) -> dict | None:
    """Check the run directory ``path`` against its manifest: each listed file exists with the
    listed size and SHA-256, and the ``required`` files are listed. Returns the manifest, or
    ``None`` for a run saved without one. Raises one :class:`~bnnzoo.errors.RunError` naming the
    run and the first file at fault (missing, truncated, altered or unreadable)."""
    path = Path(path)
    if not path.is_dir():
        raise RunError(f"{path} is not a saved bnnzoo posterior: no such directory")
    manifest = read_manifest(path)
    if manifest is None:
        return None
    files = manifest["files"]
    for name in required:
        if name not in files:
            raise RunError(f"{path}: {MANIFEST} does not list {name}, which every run holds")
    for name, entry in files.items():
        file = path / name
        if not file.is_file():
            raise RunError(f"{path}: {name} is missing (listed in {MANIFEST})")
        try:
            sha, size = file_digest(file)
        except OSError as err:
            raise RunError(f"{path}: {name} is unreadable ({err.strerror})") from None
        if size != entry["size"]:
            what = "truncated (or altered)" if size < entry["size"] else "longer than written (altered)"
            raise RunError(f"{path}: {name} is {what}: {size} bytes, the manifest says {entry['size']}")
        if sha != entry["sha256"]:
            raise RunError(f"{path}: {name} was altered after it was saved: its SHA-256 differs from {MANIFEST}'s")
    return manifest


def run_dataset(recorded: dict, data: str | os.PathLike | None = None, split: int | None = None) -> Dataset:
    """The data to evaluate a saved run on. ``recorded`` is the run's ``config["data"]`` (``name``,
    ``split``, ``source``). With ``data`` (a dataset name or a directory), that; otherwise the
    recorded ``source`` if it still exists here, else the recorded dataset ``name`` (a bundled set,
    or one found under ``$BNNZOO_DATA`` or ``shared/data``). ``split`` defaults to the recorded
    split. Raises :class:`~bnnzoo.errors.DataError` naming what was tried."""
    recorded = recorded if isinstance(recorded, dict) else {}
    if split is None:
        split = recorded.get("split") or 0
    if data is not None:
        return load_dataset(data, split=split)
    source, name = recorded.get("source"), recorded.get("name")
    tried = []
    if source and Path(source).expanduser().exists():
        try:
            return load_dataset(source, split=split)
        except DataError as err:
            tried.append(f"the recorded source {source} ({err})")
    elif source:
        tried.append(f"the recorded source {source} (not found here)")
    if name:
        try:
            return load_dataset(name, split=split)
        except DataError as err:
            tried.append(f"the dataset name {name!r} ({err})")
    if not tried:
        raise DataError("this run records no data it was fitted on: pass --data NAME_OR_DIR")
    raise DataError("no data found for this run: tried " + "; ".join(tried) + ". Pass --data NAME_OR_DIR")
