"""Every Python example of the README runs, and its strategy table matches the registry."""

from __future__ import annotations

import ast
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


def test_coming_from_table_names_real_strategies_and_arguments() -> None:
    # Every taskbalance call of the "Coming from the Nash-MTL or LibMTL code" table creates its
    # strategy with those keyword arguments, and every registered method appears in it.
    text = README.read_text()
    table = text.split("<!-- coming-from-table")[1].split("<!-- end coming-from-table")[0]
    rows = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line]
    calls = [c for row in rows[1:] for c in re.findall(r"`([a-z_]+\([^`]*\))`", row.split("|")[3])]
    assert len(calls) >= 25
    listed = set()
    for call in calls:
        node = ast.parse(call, mode="eval").body
        assert isinstance(node, ast.Call) and isinstance(node.func, ast.Name), call
        kwargs = {k.arg: ast.literal_eval(k.value) for k in node.keywords}
        assert not node.args and all(k is not None for k in kwargs), call
        strategy = tb.create_strategy(node.func.id, ["a", "b", "c"], **kwargs)
        for key, value in kwargs.items():  # the argument is taken, not just accepted
            held = getattr(strategy, key, None)
            if isinstance(held, (int, float, str)):
                assert held == value, (call, key, held)
        listed.add(node.func.id)
    builtins = {n for n in tb.list_strategies() if registry.strategy_info(n).builtin}
    # in neither library (IMTL-L alone included: LibMTL's IMTL is the hybrid)
    assert builtins - listed <= {"config", "dualproj", "imtl_l"}, builtins - listed
