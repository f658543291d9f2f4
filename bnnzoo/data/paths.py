"""Where data lives: the bundled package data and the user's data directories."""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

ENV_VAR = "BNNZOO_DATA"


def bundled_dir(name: str = "") -> Path:
    """Directory of the bundled data (``bundled/<name>``), for regular and editable installs."""
    base: Path | None = None
    try:
        ref = resources.files(__package__) / "bundled"
        if isinstance(ref, Path) and ref.is_dir():
            base = ref
    except (ModuleNotFoundError, TypeError):
        base = None
    if base is None:
        base = Path(__file__).resolve().parent / "bundled"
    return base / name if name else base


def _shared_roots_above(start: Path) -> list[Path]:
    """``<ancestor>/shared/data`` for every ancestor of ``start`` (itself included) that has ``uci/``."""
    found = []
    for anc in (start, *start.parents):
        cand = anc / "shared" / "data"
        if (cand / "uci").is_dir():
            found.append(cand)
    return found


def data_roots(root: str | os.PathLike | None = None) -> list[Path]:
    """Candidate data roots, most specific first.

    ``root`` if given (and only it); else ``$BNNZOO_DATA``, then any ``shared/data`` found walking up
    from the working directory (which covers ``../shared/data`` next to a checkout), then walking up
    from this package's own location (so an editable install run from elsewhere still finds it).
    """
    if root is not None:
        return [Path(root).expanduser()]
    roots: list[Path] = []
    env = os.environ.get(ENV_VAR)
    if env:
        roots.append(Path(env).expanduser())
    roots += _shared_roots_above(Path.cwd().resolve())
    roots += _shared_roots_above(Path(__file__).resolve().parent)
    unique: list[Path] = []
    for r in roots:
        if r not in unique:
            unique.append(r)
    return unique
