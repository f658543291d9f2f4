"""MkDocs hooks of the bnnzoo site (``hooks: [docs/hooks.py]`` in ``mkdocs.yml``).

The site's pages live in ``docs/``, but some of what it shows lives elsewhere in the repository.
These hooks bring it in at build time, without copying or linking anything into ``docs/``:

- :data:`MOUNTS`: repository files served in the site at their path in the repository: the
  notebooks and the README of ``tutorials/`` and the figures of ``benchmarks/results/``. They are
  added before the plugins' ``on_files`` runs, so mkdocs-jupyter sees the mounted notebooks as
  pages. A tutorial with an executed copy (``tutorials/executed/``, from
  ``scripts/execute_tutorials.py``) is shown with that copy's outputs.
- A relative Markdown link is written as on GitHub, from the page's file in the repository
  (``../benchmarks/results/x.png`` in ``docs/results.md``, which ``python -m benchmarks.report``
  writes; ``docs/methods/bmr.md`` in the README section of a generated page). One that leads to a
  page of ``docs/`` or to a mounted file, but not by the same path in the site, is rewritten to
  its place in the site; any other link is left as written, for MkDocs to check.
- :data:`GENERATED`: pages made from another file: ``catalog.md`` is the "The catalog" section of the
  README (the catalog table), so the table has one source.
- On the API page, the Sphinx roles of the docstrings (``:func:`fit```) are shown as the code they
  name (``fit``; ``~a.b.C`` as ``C``), as Sphinx shows them.
- ``javascripts/mathjax.js``: the MathJax configuration that ``mkdocs.yml`` loads, typesetting the
  math of Markdown pages (Material's arithmatex, ``\\(...\\)`` and ``\\[...\\]``) and of notebook
  Markdown cells (``$...$`` and ``$$...$$``), and nothing else of the page content (a ``$`` in a
  Markdown page stays a dollar sign); MathJax itself (2.7, from the ``jupyter-server-mathjax``
  package of the docs extra) is copied into ``javascripts/mathjax/`` of the built site, so the
  site typesets its math without network.

:func:`nav_targets` is used by ``tests/test_docs_site.py`` to check the nav.
"""

from __future__ import annotations

import posixpath
import re
import shutil
from pathlib import Path

from mkdocs.plugins import event_priority
from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"

#: repository directory -> the patterns of its files served in the site, at the same path
MOUNTS: dict[str, tuple[str, ...]] = {
    "tutorials": ("*.ipynb", "README.md"),
    "benchmarks/results": ("*.png", "*.svg"),
}

#: generated page -> (repository file, heading of the section it shows)
GENERATED: dict[str, tuple[str, str]] = {
    "catalog.md": ("README.md", "## The catalog"),
}

MATHJAX_JS = "javascripts/mathjax.js"
#: where MathJax itself is served in the site (copied from jupyter-server-mathjax, the docs extra's)
MATHJAX_DIR = "javascripts/mathjax"
MATHJAX_CONFIG = r"""window.MathJax = {
  // the combined configuration the package ships (TeX input, HTML-CSS output, tex2jax, AMS), which
  // holds the output jax that its trimmed tree leaves out as separate files
  config: ["TeX-AMS-MML_HTMLorMML-full.js"],
  tex2jax: {
    inlineMath: [["\\(", "\\)"], ["$", "$"]],
    displayMath: [["\\[", "\\]"], ["$$", "$$"]],
    processEscapes: true,
    processEnvironments: true,
    // the page content is left alone but for arithmatex's elements and the notebooks' Markdown
    // cells (a dollar sign elsewhere in a page stays a dollar sign)
    ignoreClass: "md-typeset",
    processClass: "arithmatex|jp-RenderedMarkdown"
  },
  "HTML-CSS": {availableFonts: ["STIX-Web"], preferredFont: "STIX-Web", webFont: "STIX-Web", imageFont: null},
  messageStyle: "none"
};
"""

API_PAGE = "api.md"
_ROLE = re.compile(r":(?:func|class|meth|mod|data|attr|exc|obj|const):(<code>)(?:~(?:[\w.]+\.)?)?")
_LINK = re.compile(r"(!?\[[^\]]*\]\()([^)\s]+)(\))")


def mounted_files() -> dict[str, Path]:
    """Every mounted repository file: its path in the site (a ``docs``-relative URI) -> the file."""
    found: dict[str, Path] = {}
    for repo_dir, patterns in MOUNTS.items():
        for pattern in patterns:
            for path in sorted((ROOT / repo_dir).glob(pattern)):
                if path.is_file():
                    found[f"{repo_dir}/{path.name}"] = path
    return found


def executed_copy(uri: str) -> Path | None:
    """The executed copy of a mounted tutorial (``tutorials/executed/<name>``, written by
    ``scripts/execute_tutorials.py``), which the site serves in its place; ``None`` if there is
    none."""
    path = ROOT / "tutorials" / "executed" / Path(uri).name
    return path if uri.startswith("tutorials/") and uri.endswith(".ipynb") and path.is_file() else None


def nav_targets() -> set[str]:
    """Every page path a nav entry of ``mkdocs.yml`` may name: the Markdown files of ``docs/``, the
    mounted notebooks and Markdown files, and the generated pages."""
    pages = {p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md")}
    pages |= {uri for uri in mounted_files() if uri.endswith((".md", ".ipynb"))}
    return pages | set(GENERATED)


def section(text: str, heading: str) -> str:
    """The part of Markdown ``text`` from the line ``heading`` to the next heading of the same or a
    higher level (excluded); raises ``ValueError`` when no line is ``heading``."""
    level = len(heading) - len(heading.lstrip("#"))
    lines = text.splitlines()
    try:
        start = lines.index(heading)
    except ValueError:
        raise ValueError(f"no line {heading!r}") from None
    end = len(lines)
    for i in range(start + 1, len(lines)):
        hashes = len(lines[i]) - len(lines[i].lstrip("#"))
        if 0 < hashes <= level and lines[i][hashes:hashes + 1] == " ":
            end = i
            break
    return "\n".join(lines[start:end]).rstrip() + "\n"


def _generated_page(src: str, heading: str) -> str:
    body = section((ROOT / src).read_text(encoding="utf-8"), heading)
    title = heading.lstrip("#").strip()
    body = body.replace(heading, f"# {title}", 1)
    return f"{body}\nThis page is the section \"{title}\" of the repository's `{src}`.\n"


@event_priority(50)  # before mkdocs-jupyter's on_files, which must see the mounted notebooks
def on_files(files: Files, config) -> Files:
    for uri in mounted_files():
        if files.get_file_from_path(uri) is None:
            # a plain File whose source directory is the repository root (not File.generated:
            # mkdocs-jupyter's wrapper of a notebook reads the source path off src_dir)
            files.append(File(uri, src_dir=str(ROOT), dest_dir=config.site_dir,
                              use_directory_urls=config.use_directory_urls))
    for uri, (src, heading) in GENERATED.items():
        files.append(File.generated(config, uri, content=_generated_page(src, heading)))
    files.append(File.generated(config, MATHJAX_JS, content=MATHJAX_CONFIG))
    return files


@event_priority(100)  # before mkdocs-jupyter's on_pre_page, which converts page.file.abs_src_path
def on_pre_page(page, config, files):
    """A tutorial with an executed copy is read from that copy (:func:`executed_copy`)."""
    executed = executed_copy(page.file.src_uri)
    if executed is not None:
        page.file.abs_src_path = str(executed)
    return page


def _source_dir(page) -> Path | None:
    """The repository directory a page's relative links start from: its file's directory, or for a
    generated page, that of the file it is made from."""
    if page.file.src_uri in GENERATED:
        return (ROOT / GENERATED[page.file.src_uri][0]).parent
    if page.file.abs_src_path:
        return Path(page.file.abs_src_path).resolve().parent
    return None


def on_page_markdown(markdown: str, page, config, files) -> str:
    """Point the relative links of a page that lead, in the repository, to a page of ``docs/`` or
    to a mounted file at that page or file in the site; other links are left as written."""
    source_dir = _source_dir(page)
    if source_dir is None:
        return markdown
    mounted = {path.resolve(): uri for uri, path in mounted_files().items()}
    page_dir = posixpath.dirname(page.file.src_uri)

    def fix(match: re.Match) -> str:
        target = match.group(2)
        if "://" in target or target.startswith(("#", "/", "mailto:")):
            return match.group(0)
        path, hash_, anchor = target.partition("#")
        resolved = (source_dir / path).resolve()
        if resolved in mounted:
            uri = mounted[resolved]
        elif resolved.is_relative_to(DOCS):
            uri = resolved.relative_to(DOCS).as_posix()
        else:
            return match.group(0)
        if posixpath.normpath(posixpath.join(page_dir, path)) == uri:
            return match.group(0)  # already right in the site
        return f"{match.group(1)}{posixpath.relpath(uri, page_dir or '.')}{hash_}{anchor}{match.group(3)}"

    return _LINK.sub(fix, markdown)


def on_page_content(html: str, page, config, files) -> str:
    """Show the Sphinx roles of the API page's docstrings as the code they name."""
    if page.file.src_uri == API_PAGE:
        return _ROLE.sub(r"\1", html)
    return html


def on_post_build(config) -> None:
    """Copy MathJax (the static files of ``jupyter-server-mathjax``) into the built site."""
    import jupyter_server_mathjax  # lazy: only a build needs it (the docs extra), not the nav tests

    source = Path(jupyter_server_mathjax.__file__).parent / "static"
    shutil.copytree(source, Path(config.site_dir) / MATHJAX_DIR, dirs_exist_ok=True)
