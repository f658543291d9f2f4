"""The documentation site's nav (``mkdocs.yml``) matches the files: checked without building it.

Every page the nav names exists (a Markdown file of ``docs/``, a notebook or the README of
``tutorials/`` that ``docs/hooks.py`` serves in the site, or a page that hook generates), and every
notebook of ``tutorials/`` and every page of ``docs/methods/`` is in the nav. Skipped when MkDocs
(the ``docs`` extra) is not installed.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

pytest.importorskip("mkdocs")
yaml = pytest.importorskip("yaml")

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"


def _hooks():
    spec = importlib.util.spec_from_file_location("bnnzoo_docs_hooks", DOCS / "hooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _config() -> dict:
    # mkdocs.yml may hold !!python/name tags (none today); the safe loader with a fallback
    # for unknown tags reads the nav without importing anything
    class Loader(yaml.SafeLoader):
        pass

    Loader.add_multi_constructor("", lambda loader, suffix, node: None)
    return yaml.load((ROOT / "mkdocs.yml").read_text(encoding="utf-8"), Loader=Loader)


def _nav_pages(nav) -> list[str]:
    """Every page path of a MkDocs nav (external links left out), in order."""
    pages = []
    for item in nav if isinstance(nav, list) else [nav]:
        if isinstance(item, str):
            pages.append(item)
        elif isinstance(item, dict):
            for value in item.values():
                pages.extend(_nav_pages(value))
    return [p for p in pages if "://" not in p]


@pytest.fixture(scope="module")
def nav() -> list[str]:
    config = _config()
    assert config.get("docs_dir", "docs") == "docs"
    return _nav_pages(config["nav"])


def test_nav_names_only_existing_pages(nav):
    targets = _hooks().nav_targets()
    missing = [page for page in nav if page not in targets]
    assert not missing, f"mkdocs.yml's nav names pages that do not exist: {missing}"
    assert len(nav) == len(set(nav)), "a page is in the nav twice"


def test_every_tutorial_is_in_the_nav(nav):
    notebooks = sorted(p.name for p in (ROOT / "tutorials").glob("*.ipynb"))
    assert notebooks
    missing = [name for name in notebooks if f"tutorials/{name}" not in nav]
    assert not missing, f"notebooks of tutorials/ not in mkdocs.yml's nav: {missing}"


def test_every_method_page_is_in_the_nav(nav):
    pages = sorted(p.name for p in (DOCS / "methods").glob("*.md"))
    assert pages
    missing = [name for name in pages if f"methods/{name}" not in nav]
    assert not missing, f"pages of docs/methods/ not in mkdocs.yml's nav: {missing}"


def test_the_mounted_paths_are_not_also_in_docs():
    # a file of docs/ at a mounted path would shadow the repository's file in the site
    hooks = _hooks()
    clashes = [uri for uri in hooks.mounted_files() if (DOCS / uri).exists()]
    assert not clashes, f"docs/ holds files at paths the hooks serve from the repository: {clashes}"
