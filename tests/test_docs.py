"""The documentation site: generated strategy pages, the nav, the API pages, the pages' examples.

The generators of docs/hooks.py are called directly (no MkDocs needed); the full
``mkdocs build --strict`` runs where the ``docs`` extra is installed.
"""

from __future__ import annotations

import importlib.util
import inspect
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

import taskbalance as tb
from taskbalance import registry
from tests.examples import run_python_blocks

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
# Pages whose examples other tests run: the guide (tests/test_guide.py) and the Lightning page
# (its own tests); README sections included by the hook are run by tests/test_readme.py.
NOT_OURS = {"writing-a-strategy.md", "guides/lightning.md"}


def _load_hooks() -> ModuleType:
    spec = importlib.util.spec_from_file_location("taskbalance_docs_hooks", DOCS / "hooks.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


hooks = _load_hooks()


def _nav_files(nav: list[Any]) -> list[str]:
    files: list[str] = []
    for entry in nav:
        values = entry.values() if isinstance(entry, dict) else [entry]
        for value in values:
            files += _nav_files(value) if isinstance(value, list) else [value]
    return files


def _config() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "mkdocs.yml").read_text())


def _written_pages() -> list[str]:
    pages = sorted(p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md"))
    return [p for p in pages if p not in NOT_OURS and not p.startswith("benchmark/")]


def _isolated_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))


@pytest.mark.parametrize("name", tb.list_strategies())
def test_every_strategy_gets_a_page_from_its_docstring_and_the_registry(name: str) -> None:
    info = tb.strategy_info(name)
    page = hooks.strategy_page(name)
    path = f"{info.cls.__module__}.{info.cls.__qualname__}"
    first_line = (inspect.getdoc(info.cls) or "").splitlines()[0]
    assert hooks.docstring_to_markdown(first_line, path) in page
    assert info.paper in page
    assert f"| {info.kind} | " in page
    for argument, default in info.defaults.items():
        assert f"| `{argument}` | `{default!r}` |" in page
    assert not re.search(r"(?<!`)``(?!`)|:class:`|:meth:`", page), "reST markup left"


def test_a_registered_plug_in_gets_a_page_an_index_row_and_a_nav_entry(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _isolated_registry(monkeypatch)

    @tb.register_strategy("docs_plugin", paper="Someone, 'A Plug-in', 2031, arXiv:3101.00001")
    class DocsPlugin(tb.LossWeighting):
        """Weights ``1 / k``: a plug-in whose page nobody wrote.

        See :class:`~taskbalance.LossWeighting` for the hooks.
        """

        def __init__(self, tasks, *, scale: float = 2.0):  # type: ignore[no-untyped-def]
            super().__init__(tasks)
            self.scale = scale

        def loss_weights(self, losses, index):  # type: ignore[no-untyped-def]
            return losses.new_full(losses.shape, self.scale / len(losses))

    pages = hooks.strategy_pages()
    page = pages["strategies/docs_plugin.md"]
    assert "Weights `1 / k`: a plug-in whose page nobody wrote." in page
    assert "Someone, 'A Plug-in', 2031, arXiv:3101.00001" in page
    assert "https://arxiv.org/abs/3101.00001" in page
    assert "(a plug-in, from `" in page and "| `scale` | `2.0` | `float` |" in page
    assert 'identifier="taskbalance.loss_weighting.LossWeighting" optional' in page
    assert "[`docs_plugin`](docs_plugin.md)" in pages[hooks.STRATEGIES_INDEX]
    nav = _config()["nav"]
    hooks._expand_nav(nav)
    assert "strategies/docs_plugin.md" in _nav_files(nav)


def test_every_nav_page_exists_and_every_strategy_is_in_the_nav() -> None:
    nav = _config()["nav"]
    hooks._expand_nav(nav)
    files = _nav_files(nav)
    generated = set(hooks.strategy_pages())
    missing = [f for f in files if f not in generated and not (DOCS / f).is_file()]
    assert not missing, f"nav entries without a page: {missing}"
    assert generated <= set(files)
    for guide in ("guides/lightning.md", "writing-a-strategy.md", "guides/reproductions.md"):
        assert guide in files
    assert set(_written_pages()) <= set(files) | generated, "a page is missing from the nav"


def test_the_api_pages_document_the_public_api() -> None:
    directives = {
        m.group(1)
        for page in (DOCS / "api").glob("*.md")
        for m in re.finditer(r"^::: (\S+)", page.read_text(), flags=re.M)
    }
    missing = [n for n in tb.__all__ if f"taskbalance.{n}" not in directives]
    assert not missing, f"public names without an API entry: {missing}"
    modules = ["accumulation", "diagnostics", "distributed", "testing", "integrations.wandb"]
    assert {f"taskbalance.{m}" for m in modules} <= directives


@pytest.mark.parametrize("page", _written_pages())
def test_the_python_examples_of_the_pages_run(
    page: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "disabled")
    _isolated_registry(monkeypatch)
    text = (DOCS / page).read_text()
    run_python_blocks(text, f"docs/{page}")


def test_the_generated_index_has_an_example_that_runs(capsys: pytest.CaptureFixture[str]) -> None:
    blocks = re.findall(r"```python\n(.*?)```", hooks.strategies_index(), flags=re.S)
    assert blocks
    for block in blocks:
        exec(compile(block, "strategies/index.md", "exec"), {})
    assert "gradient-level" in capsys.readouterr().out


def test_readme_sections_are_included_with_links_that_resolve() -> None:
    included = 0
    for page in _written_pages():
        text = (DOCS / page).read_text()
        for name in re.findall(r'^--8<-- "README\.md:([\w-]+)"', text, flags=re.M):
            section = hooks.readme_section(name, page)
            included += 1
            prose = re.sub(r"```.*?```|`[^`\n]*`", "", section, flags=re.S)
            assert not re.search(r"^# ", prose, flags=re.M), "a title inside a section"
            for target in re.findall(r"\]\(([^)\s#]+)\)", prose):
                if "://" not in target and not target.startswith("mailto:"):
                    resolved = (DOCS / page).parent / target
                    assert resolved.exists(), f"{page}: {name}: {target}"
        assert "--8<--" not in hooks.expand_includes(text, page)
    assert included >= 10
    with pytest.raises(ValueError, match="no section 'nope'"):
        hooks.readme_section("nope")


def test_reproductions_are_rendered_with_their_verdicts() -> None:
    text = hooks.reproductions_markdown(DOCS / "reproductions", "guides")
    results = sorted((DOCS / "reproductions").glob("*.json"))
    assert results
    for path in results:
        assert f"### {path.stem}" in text
        assert f"](../reproductions/{path.stem}.png)" in text
    assert '!!! success "Verdict: reproduced"' in text
    assert '!!! failure "Verdict: not reproduced"' in text


def test_docstring_markup_becomes_markdown() -> None:
    doc = inspect.cleandoc(
        """
        Uses ``x`` and :class:`~taskbalance.Strategy` (see :meth:`Strategy.add_state`),
        :func:`nowhere.at_all` and a literal ``that spans
        two lines``. Call it::

            s = f(x)

        The equation

            ``a = b``,   for all ``i``

        * an item whose text goes
          on, with a block::

              y = g(x)

        =====  ============
        name   what
        =====  ============
        one    first (it
               continues)
        two    second
        =====  ============

            >>> 1 + 1  # doctest: +SKIP
            2
        """
    )
    text = hooks.docstring_to_markdown(doc, "taskbalance.strategy")
    strategy = '<autoref identifier="taskbalance.strategy.Strategy" optional>`Strategy`</autoref>'
    assert f"Uses `x` and {strategy}" in text
    assert "taskbalance.strategy.Strategy.add_state" in text
    assert "`Strategy.add_state()`</autoref>" in text
    assert "`nowhere.at_all()`" in text and "`that spans\ntwo lines`" in text
    assert "Call it:\n\n``` python\ns = f(x)\n```" in text
    assert "``` { .text .tb-display .no-copy }\na = b,   for all i\n```" in text
    assert (
        "* an item whose text goes\n    on, with a block:\n\n    ``` python\n    y = g(x)" in text
    )
    assert "| name | what |\n|---|---|\n| one | first (it continues) |\n| two | second |" in text
    assert "``` pycon\n>>> 1 + 1\n2\n```" in text


@pytest.mark.slow
def test_the_site_builds_strictly(tmp_path: Path) -> None:
    for module in ("mkdocs", "material", "mkdocstrings_handlers.python"):
        pytest.importorskip(module, reason='the docs extra: pip install -e ".[docs]"')
    site = tmp_path / "site"
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(site)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert "WARNING" not in result.stderr, result.stderr[-4000:]
    for name in tb.list_strategies():
        page = (site / "strategies" / name / "index.html").read_text()
        assert inspect.getdoc(tb.strategy_info(name).cls).split("\n")[0].split("``")[0] in page
    api = (site / "api" / "strategy" / "index.html").read_text()
    assert 'id="taskbalance.Strategy.add_state"' in api
    assert not re.search(r"(?<!`)``(?!`)|:class:`|:meth:`", api), "reST markup left"
    shutil.rmtree(site)
