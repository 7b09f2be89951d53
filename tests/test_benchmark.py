"""The benchmark script's structure (not its timings) and torch.compile on loss combinations."""

from __future__ import annotations

import json
import statistics
import sys
import traceback
import warnings
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
from experiments.runner import parse_config


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
    assert problem.last_layer == list(problem.trunk.get_submodule("4").parameters())
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


# ----------------------------------------------------------------------------- SegNet, sync check
def _tiny_segnet(**overrides: Any) -> benchmark.BenchConfig:
    """SegNet at its smallest (channels 1–8, one 32×32 image): the rows, not the timings."""
    options: dict[str, Any] = {
        "quick": True,
        "models": ["segnet"],
        "segnet_width": 1 / 64,
        "segnet_batch": 1,
        "repeats": 1,
        "warmup": 0,
        "toy": False,
        "jacobian_table": False,
        "torchjd": False,
    }
    return benchmark.BenchConfig(**{**options, **overrides})


def _dense_paths_for(name: str) -> set[str]:
    cls = strategy_info(name).cls
    if issubclass(cls, GradientAggregation):
        return {"shared_params", "features", "repo_style"}
    return _paths_for(name)


@pytest.fixture(scope="module")
def segnet_results() -> dict[str, Any]:
    return benchmark.run(_tiny_segnet(models=["segnet_mtan"], sync_check=True))


def test_segnet_rows_cover_every_strategy_and_path(segnet_results: dict[str, Any]) -> None:
    errors = [r for r in segnet_results["rows"] if "error" in r]
    assert not errors, f"strategies that failed on SegNet-MTAN: {errors}"
    for name in tb.list_strategies():
        rows = [r for r in segnet_results["rows"] if r["strategy"] == name]
        assert {r["path"] for r in rows} == _dense_paths_for(name), name
        for row in rows:
            assert (row["model"], row["T"]) == ("segnet_mtan", 3)
            assert row["vs_equal"] > 0 and row["memory_vs_equal"] is not None
            measured_against_repo = row["kind"] == "gradient" and row["path"] != "repo_style"
            assert ("vs_repo_style" in row) == measured_against_repo
    problem = benchmark.make_dense_problem(
        "segnet_mtan", size=(32, 32), width=1 / 64, batch=1, device="cpu", seed=0
    )
    assert segnet_results["problems"] == {
        "segnet_mtan": {
            "shared_parameters": sum(p.numel() for p in problem.trunk.parameters()),
            "features": [1, 1, 32, 32],
        }
    }
    text = benchmark.to_markdown(segnet_results)
    assert "### segnet_mtan: NYUv2, T = 3, input 1×3×32×32" in text
    checked = [
        r
        for r in segnet_results["rows"]
        if r["path"] == "shared_params" and r["kind"] == "gradient"
    ]
    assert "meet both" in text and f"of {len(checked)} gradient methods" in text
    # The sync check needs CUDA: on the CPU it says so instead of running.
    assert segnet_results["sync_check"] == {"skipped": "the sync check needs CUDA (--device cuda)"}
    assert "Not run: the sync check needs CUDA" in text


def test_dense_problem_is_nyuv2_on_segnet() -> None:
    problem = benchmark.make_dense_problem(
        "segnet_mtan", size=(64, 96), width=1 / 16, batch=2, device="cpu", seed=0
    )
    features, losses = problem.forward()
    assert problem.tasks == ["segmentation", "depth", "normal"] and list(losses) == problem.tasks
    assert features.shape == (2, 4, 64, 96)
    assert problem.targets["segmentation"].shape == (2, 64, 96)
    assert problem.targets["normal"].norm(dim=1).sub(1).abs().max() < 1e-5
    network: Any = problem.network
    assert [id(h) for h in problem.heads] == [id(network.heads[t]) for t in problem.tasks]
    # GradNorm's layer: the last shared decoder unit (conv + batch norm), inside the trunk
    last = network.trunk.backbone.decoder_body[-1][-1]
    assert problem.last_layer == list(last.parameters())
    assert {id(p) for p in problem.last_layer} <= {id(p) for p in problem.shared}


def _fixed_measurements(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[float]]:
    """Replace timing and memory by fixed numbers per step name (seconds, megabytes)."""
    times = {
        "baseline": [1.0, 2.0, 1.0],
        "shared_params": [2.0, 5.0, 3.0],  # / baseline: 2, 2.5, 3 -> 2.5
        "features": [1.5, 3.0, 1.0],
        "loss": [1.0, 2.0, 1.0],
        "equal": [1.0, 2.0, 1.5],  # shared_params / equal: 2, 2.5, 2 -> 2
        "repo_style": [4.0, 4.0, 4.0],  # shared_params / repo: 0.5, 1.25, 0.75 -> 0.75
    }
    megabytes = {"baseline": 10.0, "shared_params": 30.0, "features": 12.0, "equal": 15.0}
    megabytes.update(repo_style=40.0, loss=11.0)
    names: dict[int, str] = {}

    def interleaved(steps: dict[str, Any], **_: Any) -> dict[str, list[float]]:
        names.update({id(step): name for name, step in steps.items()})
        return {name: times[name] for name in steps}

    def peak_memory(step: Any, device: str, *, collect: bool = True) -> float:
        return megabytes[names[id(step)]]

    monkeypatch.setattr(benchmark, "interleaved", interleaved)
    monkeypatch.setattr(benchmark, "peak_memory", peak_memory)
    return times


def test_segnet_ratios_are_paired_medians_against_each_reference(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _fixed_measurements(monkeypatch)
    config = _tiny_segnet()
    problem = benchmark.problem_for(config, "segnet", 3)
    rows = {r["path"]: r for r in benchmark.bench_strategy("mgda", problem, config, False)}
    assert set(rows) == {"shared_params", "features", "repo_style"}
    shared = rows["shared_params"]
    assert shared["time_ratio"] == 2.5 and shared["step_ms"] == 3000.0
    assert shared["vs_equal"] == 2.0 and shared["equal_ms"] == 1500.0
    assert shared["vs_repo_style"] == 0.75 and shared["repo_style_ms"] == 4000.0
    assert shared["memory_ratio"] == 3.0 and shared["memory_vs_equal"] == 2.0
    assert shared["memory_vs_repo_style"] == 0.75
    repo = rows["repo_style"]
    assert repo["time_ratio"] == 4.0 and repo["vs_equal"] == statistics.median([4, 2, 4 / 1.5])
    assert "vs_repo_style" not in repo and repo["memory_vs_equal"] == 40 / 15
    # A loss-level strategy: its one path against the plain step and equal weighting.
    (row,) = benchmark.bench_strategy("uncertainty", problem, config, False)
    assert row["path"] == "loss" and "vs_repo_style" not in row
    assert row["time_ratio"] == 1.0 and row["vs_equal"] == 1.0 and row["memory_vs_equal"] == 11 / 15


def test_segnet_mtan_table_checks_the_issue_targets() -> None:
    def row(strategy: str, path: str, vs_repo: float, vs_plain: float) -> dict[str, Any]:
        return {
            "model": "segnet_mtan",
            "T": 3,
            "strategy": strategy,
            "kind": "gradient",
            "path": path,
            "time_ratio": vs_plain,
            "memory_ratio": 1.5,
            "vs_equal": vs_plain,
            "memory_vs_equal": 1.5,
            "vs_repo_style": vs_repo,
            "memory_vs_repo_style": 0.9,
            "step_ms": 10.0,
            "peak_mb": 3.0,
        }

    results = {
        "meta": {"segnet": {"size": [288, 384], "width": 1.0, "batch": 2}},
        "problems": {"segnet_mtan": {"shared_parameters": 35163456}},
        "rows": [
            row("mgda", "shared_params", 0.8, 2.2),  # at both targets: met
            row("pcgrad", "shared_params", 0.81, 1.5),
            row("cagrad", "shared_params", 0.5, 2.25),
            row("cagrad", "features", 0.9, 3.0),  # another path: not a target
        ],
    }
    head, sentence = benchmark._dense_tables(results, "segnet_mtan")
    assert head.startswith(
        "### segnet_mtan: NYUv2, T = 3, input 2×3×288×384, width 1 (35,163,456 shared parameters)"
    )
    assert "| mgda | shared_params | 2.20 | 1.50 | 2.20 | 1.50 | 0.80 | 0.90 | 10.0 | 3.0 |" in head
    assert sentence == (
        "Issue 15 targets on `shared_params` (≤ 0.8× the repo-style step and ≤ 2.2× the plain "
        "step): 1 of 3 gradient methods meet both; not met: pcgrad (0.810× repo, 1.500× "
        "plain), cagrad (0.500× repo, 2.250× plain)."
    )


def _grad(parameter: Tensor) -> Tensor:
    assert parameter.grad is not None
    return parameter.grad


@pytest.mark.parametrize("name", ["mgda", "upgrad", "db_mtl", "nash_mtl"])
def test_repo_style_step_gives_the_update_of_backward(name: str) -> None:
    problem = benchmark.make_dense_problem(
        "segnet", size=(32, 32), width=1 / 32, batch=2, device="cpu", seed=0
    )
    ours = tb.create_strategy(name, tasks=problem.tasks)
    benchmark._strategy_step(ours, problem, "shared_params")()
    expected = [_grad(p).clone() for p in [*problem.shared, *problem.heads.parameters()]]
    repo = tb.create_strategy(name, tasks=problem.tasks)
    benchmark.repo_style_step(repo, problem)()  # type: ignore[arg-type]
    got = [_grad(p) for p in [*problem.shared, *problem.heads.parameters()]]
    count = len(problem.shared)
    if name == "nash_mtl":
        # that code clips the shared gradient only; ours folds the clip into the weights
        expected, got = expected[:count], got[:count]
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


class _Counting(tb.LossWeighting):
    """Equal weights; ``.item()`` in its hook on the steps ``syncs_at`` says (a host sync on a
    GPU); records the ``check_finite`` of every call."""

    seen: list[bool]

    def __init__(self, tasks: Any, syncs_at: Any = lambda call: False) -> None:
        super().__init__(tasks)
        self.syncs_at = syncs_at
        self.calls = 0

    def loss_weights(self, losses: Tensor, index: Tensor) -> Tensor:
        self.calls += 1
        type(self).seen.append(self.check_finite)
        if self.syncs_at(self.calls):
            losses.sum().item()
        return torch.ones_like(losses)


def _item_calls(monkeypatch: pytest.MonkeyPatch) -> benchmark.SyncDetector:
    """A CPU stand-in for CUDA's sync debug mode: every ``Tensor.item`` call is a sync."""

    def detector(step: Any) -> list[str]:
        sites: list[str] = []
        item = torch.Tensor.item

        def counted(self: Tensor) -> Any:
            sites.append(benchmark.call_site(traceback.extract_stack()[:-1]))
            return item(self)

        with monkeypatch.context() as patch:
            patch.setattr(torch.Tensor, "item", counted)
            step()
        return sites

    return detector


def test_sync_check_reports_where_a_strategy_syncs(monkeypatch: pytest.MonkeyPatch) -> None:
    _Counting.seen = []
    kinds = {
        "every_step": lambda call: True,
        "first_step_only": lambda call: call == 1,  # the warm-up step: not the steady state
        "never": lambda call: False,
    }

    def create(name: str, tasks: Any) -> tb.Strategy:
        return tb.create_strategy(name, tasks) if name == "equal" else _Counting(tasks, kinds[name])

    detector = _item_calls(monkeypatch)
    problem = benchmark.make_problem("mlp", 3, quick=True, device="cpu", seed=0)
    rows = benchmark.sync_check(
        problem,
        [*kinds, "equal"],
        first_sync=detector,
        count_syncs=detector,
        steps=2,
        create=create,
    )
    by_name = {r["strategy"]: r for r in rows}
    assert [r["path"] for r in rows] == ["sum(losses).backward()"] + ["loss"] * 4
    assert by_name["plain"]["check_finite_off"] == "ok"  # the model and its losses do not sync
    line = _Counting.loss_weights.__code__.co_firstlineno + 4  # the .item() line
    site = f"tests/test_benchmark.py:{line} in loss_weights: losses.sum().item()"
    assert by_name["every_step"]["check_finite_off"] == site
    assert by_name["every_step"]["syncs_per_step"] == 1
    assert by_name["every_step"]["sync_sites"] == [site]
    assert by_name["first_step_only"]["check_finite_off"] == "ok"
    assert by_name["first_step_only"]["syncs_per_step"] == 0
    assert by_name["never"]["check_finite_off"] == "ok"
    assert by_name["equal"]["check_finite_off"] == "ok"
    # Per strategy: 1 + 1 steps with check_finite off (the first checked one syncs and ends
    # the pass), then 1 + 2 with it on; the others 1 + 2 and 1 + 2.
    assert _Counting.seen == [False] * 2 + [True] * 3 + ([False] * 3 + [True] * 3) * 2
    table = benchmark._sync_table({"method": "counted", "rows": rows})
    assert f"| every_step | loss | {site} | 1 | {site} |" in table
    assert "3 of 4 strategy/path pairs ran without a host sync" in table


def test_sync_check_reports_a_failing_step_as_an_error() -> None:
    class Broken(_Counting):
        def loss_weights(self, losses: Tensor, index: Tensor) -> Tensor:
            raise RuntimeError("not a sync")

    _Counting.seen = []
    problem = benchmark.make_problem("mlp", 2, quick=True, device="cpu", seed=0)
    _, row = benchmark.sync_check(
        problem, ["broken"], first_sync=lambda step: [], create=lambda n, tasks: Broken(tasks)
    )
    assert row["error"] == "RuntimeError: not a sync" and "check_finite_off" not in row


def test_run_wires_the_sync_check_through_every_path() -> None:
    def no_sync(step: Any) -> list[str]:
        step()
        return []

    config = _tiny_segnet(
        models=["mlp"], tasks=[2], strategies=["equal", "gradnorm", "mgda"], sync_check=True
    )
    config.timings = False
    results = benchmark.run(config, sync_detectors=(no_sync, no_sync))
    assert results["rows"] == []
    plain, *rest = results["sync_check"]["rows"]
    assert plain["strategy"] == "plain" and plain["check_finite_off"] == "ok"
    checked = {(r["strategy"], r["path"]): r for r in rest}
    assert set(checked) == {
        (name, path) for name in ("equal", "gradnorm", "mgda") for path in _paths_for(name)
    }
    assert all(r["check_finite_off"] == "ok" and r["syncs_per_step"] == 0 for r in checked.values())


def test_call_site_is_the_deepest_frame_in_the_repository() -> None:
    def inner() -> list[traceback.FrameSummary]:
        return traceback.extract_stack()

    frames = inner()
    outside = traceback.FrameSummary("/usr/lib/python3/somewhere.py", 7, "elsewhere", line="x")
    line = inner.__code__.co_firstlineno + 1
    expected = f"tests/test_benchmark.py:{line} in inner: return traceback.extract_stack()"
    assert benchmark.call_site([*frames, outside]) == expected
    assert benchmark.call_site([outside]) == "/usr/lib/python3/somewhere.py:7 in elsewhere: x"


def test_command_line_options_for_the_gpu_run() -> None:
    config = parse_config(benchmark.BenchConfig, ["--device", "cuda", "--sync-check"])
    assert config.sync_check and config.out == "docs/benchmark/gpu"
    assert config.models == ["mlp", "segnet", "segnet_mtan"]
    assert (config.segnet_size, config.segnet_width, config.segnet_batch) == ([288, 384], 1.0, 2)
    cpu = parse_config(benchmark.BenchConfig, ["--models", "segnet,segnet_mtan"])
    assert cpu.models == ["segnet", "segnet_mtan"] and cpu.out is None and not cpu.sync_check
    assert (cpu.segnet_size, cpu.segnet_width) == ([96, 128], 0.25)
    given = parse_config(
        benchmark.BenchConfig,
        ["--segnet-size", "64", "96", "--segnet-width", "0.5", "--no-timings", "--out", "x"],
    )
    assert (given.segnet_size, given.segnet_width, given.timings, given.out) == (
        [64, 96],
        0.5,
        False,
        "x",
    )
    with pytest.raises(SystemExit):
        parse_config(benchmark.BenchConfig, ["--segnet-size", "100", "128"])
    with pytest.raises(SystemExit):
        parse_config(benchmark.BenchConfig, ["--models", "segnet_v2"])


def _fake_cuda(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """torch.cuda's sync debug switch as a log of the modes set (no CUDA needed)."""
    modes: list[str] = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", modes.append)
    return modes


def test_cuda_detectors_report_the_syncing_call(monkeypatch: pytest.MonkeyPatch) -> None:
    modes = _fake_cuda(monkeypatch)
    message = "called a synchronizing CUDA operation"

    # what "error" mode does at the first sync, and "warn" mode at each one
    def raising() -> None:
        raise RuntimeError(message)

    def warning() -> None:
        for _ in range(2):
            warnings.warn(message, stacklevel=1)
        warnings.warn("something else", stacklevel=1)

    first = raising.__code__.co_firstlineno + 1
    assert benchmark.cuda_first_sync(raising) == [
        f"tests/test_benchmark.py:{first} in raising: raise RuntimeError(message)"
    ]
    assert modes == ["error", "default"]
    with pytest.warns(UserWarning, match="something else"):
        sites = benchmark.cuda_syncs(warning)
    line = warning.__code__.co_firstlineno + 2
    site = f"tests/test_benchmark.py:{line} in warning: warnings.warn(message, stacklevel=1)"
    assert sites == [site, site]
    assert modes[2:] == ["warn", "default"]
    assert benchmark.cuda_first_sync(lambda: None) == [] and modes[-1] == "default"

    def failing() -> None:
        raise RuntimeError("CUDA out of memory")

    with pytest.raises(RuntimeError, match="out of memory"):
        benchmark.cuda_first_sync(failing)  # not a sync: the caller sees it
    assert modes[-1] == "default"


def test_gpu_check_plans_the_device_tests_then_the_benchmark(tmp_path: Path) -> None:
    from experiments import gpu_check

    config = parse_config(gpu_check.GpuCheckConfig, ["--out", str(tmp_path)])
    tests, bench = gpu_check.plan(config)
    assert tests.command[1:3] == ["-m", "pytest"]
    assert tests.command[tests.command.index("-k") + 1] == "cuda"
    assert "tests/test_device.py" in tests.command and tests.log == "tests.txt"
    assert bench.command[1:3] == ["-m", "experiments.benchmark"]
    options = parse_config(benchmark.BenchConfig, bench.command[3:])
    assert options.device == "cuda" and options.sync_check and options.out == str(tmp_path)
    assert options.models == ["segnet_mtan", "segnet", "mlp"] and options.tasks == [10]
    assert (options.segnet_size, options.segnet_width) == ([288, 384], 1.0)
    assert tests.limit + bench.limit <= 540, "the check must fit one 10-minute device command"
