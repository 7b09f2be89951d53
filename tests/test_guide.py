"""The "write your own strategy" guide: its three plug-ins are short and pass the conformance kit,
and its hook table names every hook of the base classes."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from taskbalance import registry
from taskbalance.gradient_aggregation import GradientAggregation
from taskbalance.loss_weighting import LossWeighting
from taskbalance.strategy import Strategy
from tests.examples import python_blocks, run_python_blocks

GUIDE = Path(__file__).resolve().parents[1] / "docs" / "writing-a-strategy.md"
PLUG_INS = ("log_sum", "uncertainty_warmup", "equal_norm")


def test_the_guide_plug_ins_are_short_and_pass_the_conformance_kit(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))  # keep the real one
    plug_ins = [b for b in python_blocks(GUIDE.read_text()) if "@tb.register_strategy(" in b]
    assert len(plug_ins) == 3
    for block in plug_ins:
        lines = [line for line in block.splitlines() if line.strip()]
        assert len(lines) <= 40, f"a guide plug-in has {len(lines)} lines:\n{block}"
    run_python_blocks(GUIDE.read_text(), GUIDE.name)  # the last block runs check_strategy
    assert set(PLUG_INS) <= set(registry.list_strategies())
    assert registry.strategy_info("uncertainty_warmup").stateful
    assert not registry.strategy_info("equal_norm").stateful


def test_the_hook_table_names_every_hook() -> None:
    table = GUIDE.read_text().split("| hook |")[1].split("\n\n")[0]
    listed = set(re.findall(r"^\| `([a-z_]+)\(", table, flags=re.M))
    hooks = {
        "check_losses", "before_train_step", "on_train_step", "extras", "end_epoch",
        "loss_weights", "objective", "eval_weights", "on_gradients", "objective_and_gradients",
        "on_gradient_norms",
        "gramian_weights", "aggregate_rows", "report_weights", "reused_weights",
        "transform_losses",
    }  # fmt: skip
    assert listed == hooks
    for hook in hooks:
        assert any(hook in vars(base) for base in (Strategy, LossWeighting, GradientAggregation))
