"""The registry, third-party plug-ins through entry points, and the public namespace."""

from __future__ import annotations

import inspect
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import taskbalance as tb
from taskbalance import registry


@pytest.fixture
def scratch_registry(monkeypatch: pytest.MonkeyPatch) -> dict[str, registry.StrategyInfo]:
    """A copy of the registry that the test may change; restored afterwards."""
    table = dict(registry._REGISTRY)
    monkeypatch.setattr(registry, "_REGISTRY", table)
    return table


def test_public_namespace_is_exactly_the_contract() -> None:
    contract = {
        "Strategy",
        "LossWeighting",
        "GradientAggregation",
        "StepReport",
        "StrategyError",
        "NonFiniteLossError",
        "register_strategy",
        "list_strategies",
        "create_strategy",
        "MultiTaskLoss",
        "TaskOptimizers",
        "make_optimizer",
        "list_optimizers",
    }
    assert contract <= set(tb.__all__)
    for name in tb.__all__:
        assert hasattr(tb, name), name
    assert issubclass(tb.NonFiniteLossError, tb.StrategyError)
    assert issubclass(tb.SolverError, tb.StrategyError)
    assert issubclass(tb.StrategyError, ValueError)


def test_list_strategies_is_sorted_and_takes_fnmatch_patterns() -> None:
    names = tb.list_strategies()
    assert names == sorted(names)
    assert {"static", "equal", "uncertainty", "gradnorm"} <= set(names)
    assert tb.list_strategies("grad*") == sorted(n for n in names if n.startswith("grad"))
    assert "gradnorm" in tb.list_strategies("GRAD*")
    assert tb.list_strategies("no_such_*") == []


def test_unknown_name_lists_close_matches() -> None:
    with pytest.raises(tb.StrategyError, match=r"unknown strategy 'gradnrom'.*'gradnorm'"):
        tb.create_strategy("gradnrom", tasks=["a", "b"])
    with pytest.raises(tb.StrategyError, match=r"takes no argument 'alpah'.*'alpha'"):
        tb.create_strategy("gradnorm", tasks=["a", "b"], alpah=1.0)


def test_info_records_paper_and_capabilities() -> None:
    info = registry.strategy_info("gradnorm")
    assert info.cls.__name__ == "GradNorm"
    assert "1711.02257" in info.paper
    assert info.needs_grads and info.stateful and info.deterministic
    static = registry.strategy_info("static")
    assert not static.needs_grads and not static.stateful


@pytest.mark.parametrize("name", tb.list_strategies())
def test_strategy_info_shows_signature_defaults_and_docstring(name: str) -> None:
    info = tb.strategy_info(name)
    text = str(info)
    assert text.startswith(f"{name}: {info.kind}")
    assert info.paper in text.splitlines()[0]
    assert info.signature in text
    for option, default in info.defaults.items():
        assert f"{option}={default!r}" in info.signature, option
    assert inspect.getdoc(info.cls).splitlines()[0] in text  # type: ignore[union-attr]
    # The listed defaults are the real ones: passing them changes nothing.
    tasks = ["a", "b"]
    assert repr(tb.create_strategy(name, tasks, **info.defaults)) == repr(
        tb.create_strategy(name, tasks)
    )


def test_strategy_info_kind_and_pointer_from_create_strategy() -> None:
    assert tb.strategy_info("mgda").kind == "gradient-level"
    assert tb.strategy_info("uncertainty").kind == "loss-level"
    assert tb.strategy_info("mgda").builtin
    assert "strategy_info" in (tb.create_strategy.__doc__ or "")
    assert str(tb.strategy_info("rlw")).startswith("rlw: loss-level, stateful, random (")


def test_every_builtin_cites_its_paper() -> None:
    for name in tb.list_strategies():
        info = registry.strategy_info(name)
        if info.builtin and name not in {
            "static",
            "equal",
        }:
            assert info.paper, f"{name} has no paper"
            assert info.cls.__doc__ and len(info.cls.__doc__) > 200, f"{name}: docstring too thin"


def test_register_rejects_bad_names_non_strategies_and_duplicates(
    scratch_registry: dict[str, registry.StrategyInfo],
) -> None:
    with pytest.raises(tb.StrategyError, match="lower case"):
        tb.register_strategy("My-Method")
    with pytest.raises(tb.StrategyError, match="needs a Strategy subclass"):
        tb.register_strategy("plain")(dict)  # type: ignore[type-var]

    @tb.register_strategy("halves")
    class Halves(tb.LossWeighting):
        def loss_weights(self, losses: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
            return torch.full_like(losses, 0.5)

    assert "halves" in tb.list_strategies() and "halves" in scratch_registry
    with pytest.raises(tb.StrategyError, match="already registered"):

        @tb.register_strategy("halves")
        class Other(tb.LossWeighting):
            pass

    s = tb.create_strategy("halves", tasks=["a", "b"])
    a, b = torch.tensor(2.0, requires_grad=True), torch.tensor(4.0, requires_grad=True)
    assert s({"a": a, "b": b}).item() == 3.0


def _write_distribution(root: Path, name: str, entry_points: str, module: str) -> None:
    """A real installed distribution: a package plus its .dist-info metadata."""
    (root / name).mkdir()
    (root / name / "__init__.py").write_text(textwrap.dedent(module))
    info = root / f"{name}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(textwrap.dedent(entry_points))


def test_third_party_strategies_load_from_entry_points(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    scratch_registry: dict[str, registry.StrategyInfo],
) -> None:
    _write_distribution(
        tmp_path,
        "tb_plugin_demo",
        """
        [taskbalance.strategies]
        thirds = tb_plugin_demo:Thirds
        broken = tb_plugin_missing:Nothing
        """,
        """
        import torch
        import taskbalance as tb

        class Thirds(tb.LossWeighting):
            '''Weights 1/3 for every task.'''

            def loss_weights(self, losses, index):
                return torch.full_like(losses, 1 / 3)
        """,
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(registry, "_entry_points_loaded", False)
    with pytest.warns(RuntimeWarning, match="could not load strategy plug-in 'broken'"):
        names = tb.list_strategies("thirds")
    assert names == ["thirds"]
    assert "broken" not in tb.list_strategies()
    strategy = tb.create_strategy("thirds", tasks=["x", "y", "z"])
    assert type(strategy).__module__ == "tb_plugin_demo"
    losses = {t: torch.tensor(3.0, requires_grad=True) for t in ("x", "y", "z")}
    assert strategy(losses).item() == pytest.approx(3.0)
    sys.modules.pop("tb_plugin_demo", None)
