"""Every Python example of the README runs, and its strategy table matches the registry."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import taskbalance as tb
from taskbalance import registry
from tests.examples import python_blocks, run_python_blocks

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_examples_run_in_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert len(python_blocks(README.read_text())) >= 3
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "disabled")
    # Examples register strategies: keep the real registry as it was.
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    run_python_blocks(README.read_text(), "README.md")
    assert "mtl/weight/cls" in capsys.readouterr().out


@pytest.mark.parametrize("with_plugin", [False, True])
def test_readme_strategy_table_lists_every_builtin_strategy(
    with_plugin: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    if with_plugin:  # an installed plug-in (entry point) is not the README's to list
        monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))

        @tb.register_strategy("someones_plugin")
        class SomeonesPlugin(tb.LossWeighting):
            def loss_weights(self, losses, index):  # type: ignore[no-untyped-def]
                return losses.new_ones(losses.shape)

        assert "someones_plugin" in tb.list_strategies()
    text = README.read_text()
    table = text.split("<!-- strategies-table")[1].split("<!-- end strategies-table")[0]
    names = re.findall(r"^\| `([a-z0-9_]+)` \|", table, flags=re.M)
    assert len(names) == len(set(names)), "a strategy is listed twice"
    builtins = {n for n in tb.list_strategies() if registry.strategy_info(n).builtin}
    assert set(names) == builtins
