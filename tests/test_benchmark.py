"""The benchmark script's structure (not its timings) and torch.compile on loss combinations."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor

import taskbalance as tb
from taskbalance.gradient_aggregation import GradientAggregation
from taskbalance.registry import strategy_info

# experiments/ is a folder of scripts next to the package, not installed: make it importable.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments import benchmark


@pytest.fixture(scope="module")
def quick(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path]:
    out = tmp_path_factory.mktemp("bench")
    results = benchmark.main(
        [
            "--quick",
            "--json",
            str(out / "bench.json"),
            "--markdown",
            str(out / "bench.md"),
            "--plot",
            str(out / "bench.png"),
        ]
    )
    return results, out


def _paths_for(name: str) -> set[str]:
    cls = strategy_info(name).cls
    if issubclass(cls, GradientAggregation):
        return {"shared_params", "shared_params_direct", "features"}
    if cls.needs_grads:
        return {"last_layer", "features", "shared_params"}
    return {"loss"}


def test_quick_covers_every_registered_strategy_on_every_path(
    quick: tuple[dict[str, Any], Path],
) -> None:
    results, _ = quick
    names = tb.list_strategies()
    assert results["meta"]["strategies"] == names
    errors = [r for r in results["rows"] if "error" in r]
    assert not errors, f"strategies that failed in the benchmark: {errors}"
    for model in ("mlp", "cnn"):
        for tasks in results["config"]["tasks"]:
            for name in names:
                paths = {
                    r["path"]
                    for r in results["rows"]
                    if (r["model"], r["T"], r["strategy"]) == (model, tasks, name)
                }
                assert paths == _paths_for(name), (model, tasks, name)


def test_quick_rows_hold_positive_times_and_ratios(quick: tuple[dict[str, Any], Path]) -> None:
    results, _ = quick
    for row in results["rows"]:
        if "error" in row:  # reported by the test above
            continue
        assert row["step_ms"] > 0 and row["baseline_ms"] > 0
        assert 0 < row["time_ratio"] < float("inf")
        if "vs_torchjd" in row:  # only where torchjd is installed
            assert row["path"].startswith("shared_params")
            assert row["torchjd_ms"] > 0 and row["torchjd_loop_ms"] > 0
            assert 0 < row["vs_torchjd"] < float("inf")
            if row["strategy"] in ("mgda", "upgrad"):  # defined alike in both libraries
                assert row["torchjd_cosine"] > 0.999
    jacobian_rows = {(r["model"], r["path"]) for r in results["jacobian"]}
    assert jacobian_rows == {(m, p) for m in ("mlp", "cnn") for p in ("shared_params", "features")}
    toy = {r["strategy"] for r in results["toy"]}
    assert toy == {n for n in tb.list_strategies() if strategy_info(n).needs_grads}


def test_quick_writes_json_markdown_and_plot(quick: tuple[dict[str, Any], Path]) -> None:
    results, out = quick
    saved = json.loads((out / "bench.json").read_text())
    assert saved["rows"] == json.loads(json.dumps(results["rows"]))
    text = (out / "bench.md").read_text()
    assert "### mlp: overhead over the plain step" in text
    assert "### cnn: overhead over the plain step" in text
    for name in tb.list_strategies():
        assert f"| {name} |" in text
    assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_config_rejects_unknown_models_and_bad_repeats() -> None:
    with pytest.raises(SystemExit):
        benchmark.main(["--models", "resnet"])
    with pytest.raises(ValueError, match="repeats"):
        benchmark.BenchConfig(repeats=0)
    with pytest.raises(ValueError, match="clock"):
        benchmark.BenchConfig(clock="sundial")


def test_paired_ratio_is_the_median_of_per_round_ratios() -> None:
    times = {"a": [2.0, 30.0, 4.0], "b": [1.0, 10.0, 4.0]}  # ratios 2, 3, 1
    assert benchmark.paired_ratio(times, "a", "b") == 2.0
    counts = {"x": 0}

    def step() -> None:
        counts["x"] += 1

    measured = benchmark.interleaved({"x": step}, warmup=2, repeats=3, device="cpu")
    assert counts["x"] == 5 and len(measured["x"]) == 3


def test_problems_have_the_documented_shapes() -> None:
    problem = benchmark.make_problem("mlp", 3, quick=False, device="cpu", seed=0)
    features, losses = problem.forward()
    assert features.shape == (256, 512) and list(losses) == ["task0", "task1", "task2"]
    assert sum(p.numel() for p in problem.shared) == 3 * (512 * 512 + 512)
    assert problem.last_layer == list(problem.trunk[4].parameters())
    cnn = benchmark.make_problem("cnn", 2, quick=False, device="cpu", seed=0)
    features, losses = cnn.forward()
    assert features.shape == (64, 128) and len(losses) == 2


# ----------------------------------------------------------------------------- torch.compile
# The combination of a loss-level strategy (weights and objective from the loss vector) compiles
# into one graph. The full ``s(losses)`` call does not: Strategy.gather checks for NaN with one
# host sync (data-dependent control flow), ``transaction()`` is a generator context manager with
# exception handling, and learned weights take their own step through torch.autograd.grad.


def _combination(strategy: tb.LossWeighting) -> Any:
    def combine(values: Tensor, index: Tensor) -> Tensor:
        detached = values.detach()
        weights = strategy.loss_weights(detached, index)
        value = strategy.objective(detached, index)
        return value + (weights * (values - detached)).sum()

    return combine


@pytest.mark.parametrize("name", ["static", "uncertainty"])
def test_loss_combination_compiles_without_graph_break(name: str) -> None:
    torch._dynamo.reset()
    strategy = tb.create_strategy(name, tasks=["a", "b", "c"])
    assert isinstance(strategy, tb.LossWeighting)
    strategy.eval()  # the combination alone; the learned weights' own step is not compiled
    combine = _combination(strategy)
    compiled = torch.compile(combine, fullgraph=True, backend="eager")
    values = torch.tensor([0.5, 2.0, 1.5], requires_grad=True)
    index = torch.arange(3)
    explanation = torch._dynamo.explain(combine)(values, index)
    assert explanation.graph_count == 1 and explanation.graph_break_count == 0
    total = compiled(values, index)
    expected = strategy({"a": values[0], "b": values[1], "c": values[2]})
    torch.testing.assert_close(total, expected)
    (grad,) = torch.autograd.grad(total, values)
    torch.testing.assert_close(grad, strategy.loss_weights(values.detach(), index))
