"""The documentation site: it builds in strict mode, its examples run, its links resolve.

- `scripts/build_docs` builds the site into a temporary folder (skipped only where MkDocs is not
  installed; CI installs the `docs` extra), offline: any HTTP request goes to a closed port.
- Every ```python block of every page under docs/ runs, the blocks of a page in order in one
  namespace (as a reader would run them); long loops are shortened by the substitutions in
  `SHORTER`, each of which must still match the page.
- Every relative link of docs/ and experiments/README.md points at an existing file, and the
  experiments gallery lists every experiment folder.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
GALLERY = ROOT / "experiments" / "README.md"

#: Per page, (as written, as run): loops shortened so the examples run in seconds.
SHORTER: dict[str, list[tuple[str, str]]] = {
    "hypergradients.md": [("range(30)", "range(3)"), ("T = 100", "T = 20")],
    "long-horizons.md": [("range(1000)", "range(3)")],
    "learners.md": [("range(1000)", "range(2)")],
    "online.md": [("range(300)", "range(20)"), ("range(100)", "range(10)")],
    "weighting.md": [("range(20)", "range(2)"), ("steps=100", "steps=20")],
    "scaling-out.md": [("range(1000)", "range(2)"), ("steps = 10", "steps = 2")],
}

_FENCE = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
_LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
_CODE = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)


def _pages() -> list[Path]:
    return sorted(DOCS.rglob("*.md"))


def _python_blocks(page: Path) -> list[str]:
    return _FENCE.findall(page.read_text())


# ------------------------------------------------------------------------------ the build
def _env() -> dict[str, str]:
    env = dict(os.environ)
    closed = "http://127.0.0.1:9"  # discard port: a request fails at once instead of fetching
    env.update(
        NO_MKDOCS_2_WARNING="1",
        http_proxy=closed,
        https_proxy=closed,
        HTTP_PROXY=closed,
        HTTPS_PROXY=closed,
        no_proxy="",
        NO_PROXY="",
    )
    return env


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("mkdocs", reason="the docs extra is not installed")
    out = tmp_path_factory.mktemp("site")
    proc = subprocess.run(
        ["bash", str(ROOT / "scripts" / "build_docs"), str(out)],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-5000:]
    assert "WARNING" not in log, log[-5000:]
    return out


def test_site_builds_strict_and_offline_with_every_page(site: Path) -> None:
    for page in _pages():
        rel = page.relative_to(DOCS).with_suffix("")
        html = site / ("index.html" if rel.name == "index" else rel / "index.html")
        assert html.is_file(), f"{page} was not built"
    # The API reference is generated from the docstrings.
    api = (site / "api" / "hypergrad" / "index.html").read_text()
    for name in ("Unrolled", "Implicit", "ImplicitBiasWarning", "TruncatedSession", "PES"):
        assert f'id="metagrad.hypergrad.{name}"' in api, name
    learners = (site / "api" / "learners" / "index.html").read_text()
    assert 'id="metagrad.learners.MetaLearner.forward"' in learners


def test_gallery_page_shows_every_plot_and_experiment_page(site: Path) -> None:
    html = (site / "experiments" / "index.html").read_text()
    plots = re.findall(r'<img[^>]*src="([^"]+\.png)"', html)
    assert len(plots) >= len(_experiment_folders())
    for src in plots:
        assert (site / "experiments" / src).is_file(), src
    for folder in _experiment_folders():
        assert f'href="{folder}/"' in html, folder
        assert (site / "experiments" / folder / "index.html").is_file(), folder


def test_a_docstring_that_does_not_match_its_signature_fails_the_build(tmp_path: Path) -> None:
    """The API reference's settings turn griffe's warning about a documented parameter the
    function does not have into a failed `--strict` build."""
    yaml = pytest.importorskip("yaml")
    pytest.importorskip("mkdocs")
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "index.md").write_text("# API\n\n::: stale\n")
    (tmp_path / "stale.py").write_text(
        '"""A module."""\n\n\ndef f(x: int) -> int:\n'
        '    """Double.\n\n    Args:\n        x: a number.\n        y: gone from the signature.\n'
        '    """\n    return 2 * x\n'
    )
    handler = next(p for p in config["plugins"] if isinstance(p, dict) and "mkdocstrings" in p)
    handler["mkdocstrings"]["handlers"]["python"]["paths"] = [str(tmp_path)]
    small = {
        "site_name": "stale",
        "docs_dir": str(tmp_path / "docs"),
        "theme": config["theme"],
        "markdown_extensions": config["markdown_extensions"],
        "plugins": [handler],
    }
    (tmp_path / "mkdocs.yml").write_text(yaml.safe_dump(small))
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(tmp_path / "mkdocs.yml")],
        cwd=tmp_path,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    assert "'y' does not appear in the function signature" in proc.stderr


# ----------------------------------------------------------------------------- examples
@pytest.mark.parametrize("page", [p for p in _pages() if _python_blocks(p)], ids=lambda p: p.name)
def test_python_examples_of_the_page_run(page: Path) -> None:
    blocks = _python_blocks(page)
    substitutions = SHORTER.get(page.name, [])
    source = "\n".join(blocks)
    for full, _ in substitutions:
        assert full in source, f"{page.name}: {full!r} is no longer in the page; update SHORTER"
    namespace: dict = {"__name__": "__docs__"}
    threads = torch.get_num_threads()
    state = torch.random.get_rng_state()
    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            for i, block in enumerate(blocks):
                for full, short in substitutions:
                    block = block.replace(full, short)
                exec(compile(block, f"{page.name}:block{i + 1}", "exec"), namespace)
    finally:
        torch.set_num_threads(threads)
        torch.random.set_rng_state(state)


def test_every_page_with_code_is_checked() -> None:
    """The examples of the guides exist (a page that lost its code blocks is noticed)."""
    with_code = {p.name for p in _pages() if _python_blocks(p)}
    assert set(SHORTER) <= with_code, set(SHORTER) - with_code
    assert {"getting-started.md", "optimizers.md"} <= with_code


def test_examples_give_the_numbers_the_pages_state() -> None:
    """getting-started.md's second-order example prints the gradients its comment shows."""
    (block,) = _python_blocks(DOCS / "getting-started.md")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(block, "getting-started.md", "exec"), {})
    assert out.getvalue().strip() == "tensor(-8.) tensor(1.6000)"


# -------------------------------------------------------------------------------- links
def _relative_links(page: Path) -> list[str]:
    text = _CODE.sub("", page.read_text())
    links = []
    for target in _LINK.findall(text):
        if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target) or target.startswith("#"):
            continue
        links.append(target)
    return links


@pytest.mark.parametrize("page", [*_pages(), GALLERY], ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_point_at_existing_files(page: Path) -> None:
    missing = []
    for target in _relative_links(page):
        path = target.split("#", 1)[0]
        if path and not (page.parent / path).exists():
            missing.append(target)
    assert not missing, f"{page.relative_to(ROOT)}: broken links {missing}"


def test_link_check_sees_broken_links(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text(
        "[ok](page.md) [gone](missing.md#x) ![img](gone.png) [web](https://x.org) [a](#b)\n"
        "```bash\n[not a link](nowhere.md)\n```\n"
    )
    assert _relative_links(page) == ["page.md", "missing.md#x", "gone.png"]


def _experiment_folders() -> list[str]:
    return sorted(
        p.name
        for p in (ROOT / "experiments").iterdir()
        if p.is_dir() and not p.name.startswith((".", "_"))
    )


def test_gallery_lists_every_experiment_with_its_plot() -> None:
    text = GALLERY.read_text()
    links = _relative_links(GALLERY)
    for folder in _experiment_folders():
        assert f"{folder}/README.md" in links, f"experiments/README.md does not list {folder}"
        assert (ROOT / "experiments" / folder / "README.md").is_file(), folder
        assert any(t.startswith(f"{folder}/") and t.endswith(".png") for t in links), (
            f"experiments/README.md shows no plot of {folder}"
        )
        assert f"## {folder}" in text, f"experiments/README.md has no section on {folder}"
    included = (DOCS / "experiments.md").read_text()
    assert 'include-markdown "../experiments/README.md"' in included


def test_site_hooks_map_repository_links_to_site_links() -> None:
    """A link from docs/ into experiments/ becomes the published page's path, a link to a
    repository file the site does not publish becomes its text, a missing one is left for
    MkDocs to report, and code is not touched."""
    pytest.importorskip("mkdocs")
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import mkdocs_hooks as hooks
    finally:
        sys.path.remove(str(ROOT / "scripts"))

    class Config:
        docs_dir = str(DOCS)

    class Files:
        def get_file_from_path(self, path: str) -> object | None:
            return object() if path == "experiments/hd_digits/README.md" else None

    text = (
        "[hd](../../experiments/hd_digits/README.md#result) "
        "[gallery](../../experiments/README.md)\n"
        "[bench](../../benchmarks/bench_pes.py) [gone](../../nowhere.md) [page](online.md)\n"
    )
    out = hooks._rewrite(text, "docs/api/x.md", "api/x.md", Config(), Files())
    assert out == (
        "[hd](../experiments/hd_digits/README.md#result) [gallery](../experiments.md)\n"
        "bench [gone](../../nowhere.md) [page](online.md)\n"
    )
    fenced = "```bash\n[bench](../../benchmarks/bench_pes.py)\n```\n"

    class Page:
        class file:  # noqa: N801 - the attribute names of mkdocs' Page
            abs_src_path = str(DOCS / "api" / "x.md")
            src_uri = "api/x.md"

    assert hooks.on_page_markdown(fenced, Page(), Config(), Files()) == fenced
