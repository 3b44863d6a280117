"""MkDocs hooks: publish the experiments' pages and plots, and resolve links that leave docs/.

The Markdown under docs/ is written to read on GitHub too, so a page links to an experiment as
`../experiments/hd_digits/README.md`. MkDocs only knows the files under docs/; these hooks

* add every experiment's Markdown pages and images (`experiments/<name>/*.md`, `*.png`, ...)
  to the site under the same path, so `site/experiments/hd_digits/` is that experiment's page
  and its plots show;
* rewrite each relative link of a page (after `include-markdown` has inlined
  `experiments/README.md` into docs/experiments.md) from a path in the repository to the path
  of the same file in the site: `../experiments/X` becomes `experiments/X`, a link from an
  experiment's page into docs/ loses its `docs/`, and `experiments/README.md` is the gallery
  page `experiments.md`;
* turn a link to an existing repository file that is not part of the site (a script, a
  config) into its plain text, since the site has nothing to show there.

A link to a file that exists nowhere is left as it is, so `mkdocs build --strict` fails on it.
Nothing is fetched from the network.
"""

from __future__ import annotations

import logging
import posixpath
import re
from pathlib import Path

from mkdocs.config.defaults import MkDocsConfig
from mkdocs.plugins import event_priority
from mkdocs.structure.files import File, Files
from mkdocs.structure.pages import Page

__all__ = ["on_files", "on_page_markdown", "PUBLISHED", "SUFFIXES"]

log = logging.getLogger("mkdocs.hooks.metagrad")

REPO = Path(__file__).resolve().parents[1]
#: Repository folders whose pages and images the site publishes under their own path.
PUBLISHED = ("experiments",)
#: The kinds of file published from those folders.
SUFFIXES = (".md", ".png", ".jpg", ".jpeg", ".svg", ".gif")
#: Repository files that the site shows under another name.
RENAMED = {"experiments/README.md": "experiments.md"}

_LINK = re.compile(r"(!?)\[([^\]]*)\]\(([^)\s]+)((?:\s+\"[^\"]*\")?)\)")
_FENCE = re.compile(r"^(```|~~~)", re.M)


def on_files(files: Files, config: MkDocsConfig) -> Files:
    """Add the published folders' pages and images to the site."""
    for folder in PUBLISHED:
        for path in sorted((REPO / folder).rglob("*")):
            rel = path.relative_to(REPO).as_posix()
            if (
                not path.is_file()
                or path.suffix.lower() not in SUFFIXES
                or rel in RENAMED
                or any(part.startswith((".", "_")) for part in path.relative_to(REPO).parts)
            ):
                continue
            files.append(File.generated(config, rel, abs_src_path=str(path)))
    return files


def _repo_path(page: Page, config: MkDocsConfig) -> str:
    """Where the page's Markdown lives in the repository (e.g. `docs/index.md`)."""
    src = page.file.abs_src_path
    if src is None:
        return posixpath.join(_docs_prefix(config), page.file.src_uri)
    return Path(src).resolve().relative_to(REPO).as_posix()


def _docs_prefix(config: MkDocsConfig) -> str:
    return Path(config.docs_dir).resolve().relative_to(REPO).as_posix()


def _site_path(repo_path: str, config: MkDocsConfig, files: Files) -> str | None:
    """The site's path of a repository file, or None when the site does not have it."""
    if repo_path in RENAMED:
        return RENAMED[repo_path]
    docs = _docs_prefix(config) + "/"
    if repo_path.startswith(docs):
        return repo_path[len(docs) :]
    if files.get_file_from_path(repo_path) is not None:
        return repo_path
    return None


def _rewrite(text: str, here: str, page_uri: str, config: MkDocsConfig, files: Files) -> str:
    def fix(match: re.Match[str]) -> str:
        bang, label, target, title = match.groups()
        if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target) or target.startswith(("#", "/")):
            return match.group(0)
        path, hash_, anchor = target.partition("#")
        if not path:
            return match.group(0)
        repo_path = posixpath.normpath(posixpath.join(posixpath.dirname(here), path))
        site = _site_path(repo_path, config, files)
        if site is None:
            if (REPO / repo_path).exists() and not repo_path.startswith(".."):
                log.info("%s: %s is not part of the site; shown as text", here, target)
                return label if not bang else match.group(0)
            return match.group(0)  # missing everywhere: MkDocs reports it
        new = posixpath.relpath(site, posixpath.dirname(page_uri) or ".")
        return f"{bang}[{label}]({new}{hash_}{anchor}{title})"

    return _LINK.sub(fix, text)


@event_priority(-100)  # after include-markdown has inlined the files it includes
def on_page_markdown(markdown: str, page: Page, config: MkDocsConfig, files: Files) -> str:
    """Rewrite the page's relative links from repository paths to site paths."""
    here = _repo_path(page, config)
    parts = _FENCE.split(markdown)
    # split() with one group alternates text, fence marker, text, ...: code is inside pairs.
    out, inside = [], False
    for i, part in enumerate(parts):
        if i % 2 == 1:  # a fence marker
            inside = not inside
            out.append(part)
        elif inside:
            out.append(part)
        else:
            out.append(_rewrite(part, here, page.file.src_uri, config, files))
    return "".join(out)
