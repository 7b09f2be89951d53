"""The experiment infrastructure: config parsing, tracking, checkpoints, Multi-Digits, compare."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest
import torch

import taskbalance as tb

# experiments/ is a folder of scripts next to the package, not installed: make it importable
# under plain `pytest` (which does not put the repository root on sys.path).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments import compare, training
from experiments.benchmarks import Metric, Reference, delta_m, get_benchmark
from experiments.benchmarks.multi_digits import (
    MultiDigitsBenchmark,
    MultiDigitsNet,
    make_multi_digits,
    overlay,
)
from experiments.runner import (
    RunConfig,
    batch_indices,
    markdown_table,
    parse_config,
    read_history,
    read_offline_run,
    select_strategies,
    start_tracking,
    write_table,
)
from taskbalance.integrations import wandb as tb_wandb


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def digits():
    return make_multi_digits(seed=0)


# --------------------------------------------------------------------------- config
@dataclass
class Example(RunConfig):
    steps: int = 10
    lr: float = 0.1
    quick: bool = False
    limit: int | None = None
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    names: list[str] = field(default_factory=lambda: ["*"])
    mode: Literal["a", "b"] = "a"

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")


def test_parse_config_defaults_and_typed_overrides() -> None:
    assert parse_config(Example, []) == Example()
    config = parse_config(
        Example,
        ["--steps", "7", "--lr", "1e-3", "--quick", "--seeds", "3", "4", "--names", "grad*",
         "mgda", "--limit", "5", "--mode", "b", "--wandb-mode", "disabled", "--wandb_group", "g"],
    )  # fmt: skip
    assert config == Example(
        steps=7, lr=1e-3, quick=True, limit=5, seeds=[3, 4], names=["grad*", "mgda"], mode="b",
        wandb_mode="disabled", wandb_group="g",
    )  # fmt: skip
    assert isinstance(config.steps, int) and isinstance(config.seeds[0], int)


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--quick", "false"], {"quick": False}),
        (["--quick", "yes"], {"quick": True}),
        (["--quick", "--no-quick"], {"quick": False}),
        (["--seeds", "0,1,2,5"], {"seeds": [0, 1, 2, 5]}),
        (["--limit", "none"], {"limit": None}),
    ],
)
def test_parse_config_value_forms(argv: list[str], expected: dict) -> None:
    config = parse_config(Example, argv)
    assert {k: getattr(config, k) for k in expected} == expected


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--stpes", "3"], "unrecognized arguments: --stpes"),
        (["--ste", "3"], "unrecognized arguments"),  # no abbreviations
        (["--steps", "three"], "invalid"),
        (["--mode", "c"], "not one of"),
        (["--quick", "maybe"], "expected a boolean"),
        (["--steps", "0"], "steps must be >= 1"),
    ],
)
def test_parse_config_rejects(argv: list[str], message: str, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        parse_config(Example, argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_config_file_then_command_line(tmp_path: Path, capsys) -> None:
    file = tmp_path / "config.json"
    file.write_text(json.dumps({"steps": 20, "lr": "0.5", "seeds": [7], "wandb-mode": "disabled"}))
    config = parse_config(Example, ["--config", str(file), "--steps", "30"])
    assert (config.steps, config.lr, config.seeds, config.wandb_mode) == (30, 0.5, [7], "disabled")

    file.write_text(json.dumps({"step": 20}))
    with pytest.raises(SystemExit):
        parse_config(Example, ["--config", str(file)])
    err = capsys.readouterr().err
    assert "unknown key 'step'" in err and "did you mean steps" in err


# --------------------------------------------------------------------------- small helpers
def test_batch_indices_are_epoch_permutations() -> None:
    first = torch.cat([batch_indices(10, 3, seed=1, step=s) for s in range(3)])
    assert len(set(first.tolist())) == 9  # one epoch: no repeats, the partial batch dropped
    again = torch.cat([batch_indices(10, 3, seed=1, step=s) for s in (2, 0, 1)])
    assert sorted(again.tolist()) == sorted(first.tolist())  # a pure function of the step
    assert not torch.equal(batch_indices(10, 3, seed=1, step=3), first[:3])  # a new epoch
    with pytest.raises(ValueError, match="batch_size"):
        batch_indices(10, 11, seed=0, step=0)


def test_tables(tmp_path: Path) -> None:
    rows = [{"method": "equal", "acc": 0.5}, {"method": "a|b", "acc": 0.125, "extra": "x"}]
    csv_path, md_path = write_table(rows, tmp_path / "out", "table")
    with csv_path.open() as handle:
        read = list(csv.DictReader(handle))
    assert read == [
        {"method": "equal", "acc": "0.5", "extra": ""},
        {"method": "a|b", "acc": "0.125", "extra": "x"},
    ]
    assert md_path.read_text().splitlines() == [
        "| method | acc | extra |",
        "|---|---|---|",
        "| equal | 0.5 |  |",
        "| a\\|b | 0.125 | x |",
    ]
    assert markdown_table(rows, ["acc"], float_format=".1f").endswith("| 0.1 |")


def test_select_strategies() -> None:
    assert select_strategies(["equal", "stat*", "equal"]) == ["equal", "static"]
    assert select_strategies(["*"]) == tb.list_strategies()
    with pytest.raises(tb.StrategyError, match="did you mean 'equal'"):
        select_strategies(["eqaul"])


def test_delta_m_definition() -> None:
    # Maninis et al.: mean over metrics of ±(M - M_single) / M_single · 100, higher is better.
    up, down = Metric(higher_is_better=True), Metric(higher_is_better=False)
    metrics = {"left": up, "right": up, "err": down}
    assert delta_m({"left": 0.88, "right": 0.9}, {"left": 0.8, "right": 1.0}, metrics) == (
        pytest.approx((10.0 - 10.0) / 2)
    )
    assert delta_m({"left": 0.5}, {"left": 0.4}, metrics) == pytest.approx(25.0)
    # lower is better: an error 25 % above the single-task one counts −25
    assert delta_m({"err": 0.5}, {"err": 0.4}, metrics) == pytest.approx(-25.0)
    # only the metrics of the reference count
    assert delta_m({"left": 0.5, "err": 9.0}, {"left": 0.4}, metrics) == pytest.approx(25.0)


def test_summary_delta_m_against_the_single_task_mean_over_seeds() -> None:
    """Δm% per seed against the single-task accuracy averaged over the seeds, then mean ± std."""
    run = training.RunResult

    def acc(left: float | None = None, right: float | None = None) -> dict[str, float]:
        values = {"left/acc": left, "right/acc": right}
        return {k: v for k, v in values.items() if v is not None}

    results = {
        "single-task:left": [run("single-task:left", s, acc(left=a)) for s, a in
                             enumerate((0.7, 0.8, 0.9))],  # mean 0.8
        "single-task:right": [run("single-task:right", s, acc(right=a)) for s, a in
                              enumerate((0.6, 0.4, 0.5))],  # mean 0.5
        "equal": [
            run("equal", 0, acc(0.88, 0.55)),  # (+10% + 10%) / 2 = +10
            run("equal", 1, acc(0.72, 0.45)),  # (−10% − 10%) / 2 = −10
            run("equal", 2, acc(0.80, 0.60)),  # (0% + 20%) / 2 = +10
            run("equal", 3, error="RuntimeError: boom"),  # a failed seed does not count
        ],
    }  # fmt: skip
    bench = get_benchmark("multi_digits")
    numeric, formatted, against = compare.summarise(bench, results, "features")
    single, equal = numeric
    assert against == "the single-task networks trained here"
    # the baseline's own Δm: 0 on average, its spread over the seeds
    assert single["method"] == training.SINGLE
    assert single["delta_m_mean"] == pytest.approx(0.0, abs=1e-9) and single["delta_m_std"] > 0
    assert single["left/acc_mean"] == pytest.approx(0.8)
    assert single["right/acc_std"] == pytest.approx(0.1)  # sample std of 0.6, 0.4, 0.5
    assert equal["delta_m_mean"] == pytest.approx(10 / 3)
    assert equal["delta_m_std"] == pytest.approx(math.sqrt(((20 / 3) ** 2 * 2 + (40 / 3) ** 2) / 2))
    assert equal["left/acc_mean"] == pytest.approx(0.8) and equal["seeds"] == 3
    assert equal["status"] == "failed 1/4" and equal["error"] == "RuntimeError: boom"
    assert formatted[1]["Δm % (↑)"] == "3.33 ± 11.55"
    assert formatted[1]["left/acc % (↑)"] == "80.00 ± 8.00"


def test_summary_against_a_published_reference() -> None:
    """Without trained baselines Δm% is measured against the benchmark's published values, with
    each metric's direction; one seed prints no ± 0.00."""

    class Published(MultiDigitsBenchmark):
        metrics: Mapping[str, Metric] = {
            "left/acc": Metric(True, "fraction"),
            "right/err": Metric(False),
        }
        reference = Reference({"left/acc": 0.5, "right/err": 2.0}, source="a paper")

    bench = Published()
    results = {"equal": [training.RunResult("equal", 0, {"left/acc": 0.6, "right/err": 3.0})]}
    numeric, formatted, against = compare.summarise(
        bench, results, "features", trained_baselines=False
    )
    # (+20 % − 50 %) / 2: the error 50 % above the reference counts against
    assert numeric[0]["delta_m_mean"] == pytest.approx(-15.0)
    assert against == "the published single-task reference (a paper)"
    assert formatted[0]["Δm % (↑)"] == "-15.00"
    assert formatted[0]["right/err (↓)"] == "3.00"


def test_gradient_source_per_strategy() -> None:
    assert training.gradient_source("equal", "features") is None  # loss-level: no gradients
    assert training.gradient_source("single-task:left", "features") is None
    assert training.gradient_source("mgda", "features") == "features"
    assert training.gradient_source("mgda", "shared_params") == "shared_params"
    for name in training.PARAMETER_GRADIENTS & set(tb.list_strategies()):
        # running averages of per-task gradients need the same entries at every step
        assert training.gradient_source(name, "features") == "shared_params"


# --------------------------------------------------------------------------- tracking
def test_tracker_records_what_was_logged(tmp_path: Path) -> None:
    tracker = start_tracking(Example(out=str(tmp_path)), name="probe", group="grp")
    assert tracker.active
    for step in range(3):
        tracker.log({"train/loss/left": 1.0 / (step + 1), "weights/left": 0.5}, step=step)
    tracker.summary({"final/acc/left": 0.75})
    tracker.finish()
    assert not tracker.active
    tracker.log({"ignored": 1.0})  # after finish: a no-op, no error
    record = read_offline_run(tracker.run_dir)
    assert record["complete"]
    assert (record["name"], record["group"]) == ("probe", "grp")
    assert record["config"]["steps"] == 10 and record["config"]["seeds"] == [0, 1, 2]
    losses = [row["train/loss/left"] for row in record["history"]]
    assert losses == pytest.approx([1.0, 0.5, 1 / 3])
    assert [row["_step"] for row in record["history"]] == [0, 1, 2]
    assert record["summary"]["final/acc/left"] == 0.75


def test_tracker_falls_back_when_wandb_init_fails(monkeypatch, capsys, tmp_path: Path) -> None:
    import wandb

    def broken_init(**kwargs):
        raise RuntimeError("no network")

    monkeypatch.setattr(wandb, "init", broken_init)
    tracker = start_tracking(Example(out=str(tmp_path)), name="lost")
    assert type(tracker.inner) is tb_wandb.Tracker and not tracker.active
    tracker.log({"a": 1.0}, step=0)
    tracker.summary({"a": 1.0})
    tracker.finish()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "W&B could not start (RuntimeError: no network)" in err[0]
    # The local history does not depend on W&B.
    record = read_history(tmp_path / "runs" / "lost")
    assert record["complete"] and record["history"][0]["a"] == 1.0
    assert record["header"]["wandb_run_dir"] is None


def test_tracker_adapts_to_older_wandb_options(monkeypatch) -> None:
    import wandb

    calls = []

    class FakeRun:
        dir = None

    def old_init(**kwargs):
        calls.append(kwargs["reinit"])
        if kwargs["reinit"] == "create_new":
            raise ValueError("reinit must be a boolean")
        return FakeRun()

    def old_settings(**options):
        if "x_disable_stats" in options:
            raise TypeError("unexpected keyword x_disable_stats")
        return options

    monkeypatch.setattr(wandb, "init", old_init)
    monkeypatch.setattr(wandb, "Settings", old_settings)
    tracker = tb_wandb.start_run({}, mode="offline")
    assert tracker.active and calls == ["create_new", True]


def test_tracker_falls_back_without_wandb(monkeypatch, capsys) -> None:
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb raises ImportError
    tracker = tb_wandb.start_run({}, mode="offline")
    assert not tracker.active
    assert "W&B is not installed" in capsys.readouterr().err


def test_only_rank_zero_logs(monkeypatch) -> None:
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda: 1)
    assert not tb_wandb.is_main_process()
    assert not tb_wandb.start_run({}, mode="offline").active


def test_tracker_stops_logging_when_wandb_breaks(capsys) -> None:
    class BrokenRun:
        dir = None

        def log(self, data, step=None):
            raise OSError("disk full")

        def finish(self, exit_code=0):
            self.finished = exit_code

    run = BrokenRun()
    tracker = tb_wandb.WandbTracker(run)
    tracker.log({"a": 1.0}, step=0)
    tracker.log({"a": 2.0}, step=1)  # already off: no second warning
    assert not tracker.active and run.finished == 1
    assert capsys.readouterr().err.count("W&B log failed (OSError: disk full)") == 1


# --------------------------------------------------------------------------- data and model
def test_multi_digits_is_built_like_sener_and_koltun(digits) -> None:
    from sklearn.datasets import load_digits

    source = load_digits()
    images = torch.as_tensor(source.images, dtype=torch.float32) / 16
    targets = torch.as_tensor(source.target)
    train, test = digits.train_sources, digits.test_sources
    # Split by source image first: no digit image appears in both splits.
    assert not set(train.flatten().tolist()) & set(test.flatten().tolist())
    assert len(set(train[:, 0].tolist())) + len(set(test[:, 0].tolist())) == len(images)
    assert (train[:, 0] != train[:, 1]).all() and (test[:, 0] != test[:, 1]).all()
    # Left digit at the top-left of a 10×10 canvas, right one offset by 2, max where overlapping.
    k = 5
    left, right = images[train[k, 0]], images[train[k, 1]]
    expected = torch.zeros(10, 10)
    expected[:8, :8] = left
    expected[2:, 2:] = torch.maximum(expected[2:, 2:], right)
    torch.testing.assert_close(digits.train_images[k, 0], expected)
    assert digits.train_labels["left"][k] == targets[train[k, 0]]
    assert digits.test_labels["right"].tolist() == targets[test[:, 1]].tolist()
    assert digits.train_images.min() >= 0 and digits.train_images.max() <= 1


def test_multi_digits_is_deterministic(digits) -> None:
    again = make_multi_digits(seed=0)
    assert torch.equal(again.train_images, digits.train_images)
    assert torch.equal(again.test_sources, digits.test_sources)
    assert not torch.equal(make_multi_digits(seed=1).test_sources, digits.test_sources)
    grown = make_multi_digits(seed=0, pairs_per_image=3, resize=8)
    assert len(grown.train_images) == 3 * len(digits.train_images)
    assert len(grown.test_images) == len(digits.test_images)  # test pairs: their own count
    assert torch.equal(grown.test_sources[:, 0].unique(), digits.test_sources[:, 0].unique())
    more = make_multi_digits(seed=0, test_pairs_per_image=2)
    assert len(more.test_images) == 2 * len(digits.test_images)
    assert set(more.test_sources.flatten().tolist()) <= set(digits.test_sources[:, 0].tolist())
    assert tuple(grown.train_images.shape[1:]) == (1, 8, 8)


def test_overlay_takes_the_maximum() -> None:
    left = torch.tensor([[[0.2, 0.9], [0.5, 0.1]]])
    right = torch.tensor([[[0.7, 0.0], [0.0, 0.3]]])
    canvas = overlay(left, right, canvas=3, offset=1)[0]
    expected = torch.tensor([[0.2, 0.9, 0.0], [0.5, 0.7, 0.0], [0.0, 0.0, 0.3]])
    torch.testing.assert_close(canvas, expected)
    with pytest.raises(ValueError, match="overflows"):
        overlay(left, right, canvas=2, offset=1)


def test_model_splits_trunk_and_heads() -> None:
    model = MultiDigitsNet(("left", "right"))
    features, logits = model(torch.rand(3, 1, 10, 10))
    assert features.shape == (3, 50) and logits["right"].shape == (3, 10)
    shared = {id(p) for p in model.shared_parameters()}
    heads = {id(p) for t in model.tasks for p in model.heads[t].parameters()}
    assert shared.isdisjoint(heads)
    assert shared | heads == {id(p) for p in model.parameters()}
    # The FC layer of the trunk sees 20 channels × 2 × 2 after two poolings of a 10×10 image.
    assert model.trunk[7].in_features == 80


# --------------------------------------------------------------------------- checkpoints
@pytest.mark.parametrize("method", ["rlw", "dwa", "uncertainty"])
def test_resumed_run_matches_uninterrupted_run(method: str, tmp_path: Path) -> None:
    if method not in tb.list_strategies():
        pytest.skip(f"{method} is not registered")
    # batch 256 on 1348 pairs: 5 steps per epoch, so the run crosses epoch ends (DWA's
    # end_epoch, the learning-rate schedule, evaluation, checkpoints) before and after the
    # interruption at step 7.
    bench = get_benchmark("multi_digits", pairs_per_image=1)
    bench.recipe = dataclasses.replace(bench.recipe, milestones=(1, 2), gamma=0.5)
    config = training.BenchmarkConfig(
        out=str(tmp_path), steps=13, batch_size=256, wandb_mode="disabled"
    )
    tracker = tb_wandb.Tracker()
    full, full_model = training.train_run(config, bench, method, 3, tracker)

    path = tmp_path / "run.pt"
    first, _ = training.train_run(config, bench, method, 3, tracker, checkpoint=path, stop_after=7)
    assert first.steps_done == 7 and path.exists()
    torch.manual_seed(12345)  # disturb the global RNG: the checkpoint must restore it
    resumed_config = dataclasses.replace(config, resume=True, checkpoint_dir=str(tmp_path))
    resumed, resumed_model = training.train_run(
        resumed_config, bench, method, 3, tracker, checkpoint=path
    )
    for (name, a), b in zip(full_model.state_dict().items(), resumed_model.state_dict().values()):
        assert torch.equal(a, b), name
    assert resumed.weights == full.weights
    assert resumed.metrics == full.metrics


# --------------------------------------------------------------------------- compare end to end
def _offline_runs(out: Path) -> dict[str, dict]:
    runs = {}
    for folder in sorted((out / "wandb").glob("offline-run-*")):
        record = read_offline_run(folder)
        runs[record["name"]] = record | {"folder": folder}
    return runs


def test_compare_quick_end_to_end(tmp_path: Path, monkeypatch, capsys) -> None:
    # A strategy that raises must show up as failed while the others go on.
    from taskbalance.strategies.static import Static

    def boom(self, losses, index):
        raise RuntimeError("boom")

    monkeypatch.setattr(Static, "loss_weights", boom)
    # Step scalars in the report (a solver's fallback flag and running count) are logged too,
    # and the final count goes to the run's summary and the table.
    entries = tb.StepReport.entries

    def with_failures(self):
        return [*entries(self), ("failed", None, 1.0), ("failures", None, 3.0)]

    monkeypatch.setattr(tb.StepReport, "entries", with_failures)
    methods = ["equal", "uncertainty", "mgda", "static"]
    out = tmp_path / "cmp"
    rows = compare.main(
        ["--quick", "--steps", "12", "--diagnostics-every", "5", "--out", str(out),
         "--strategies", *methods, "--wandb-group", "test"]
    )  # fmt: skip

    # The table: every method, numbers that parse, the failure reported with its error.
    with (out / "results.csv").open() as handle:
        table = {row["method"]: row for row in csv.DictReader(handle)}
    assert set(table) == {training.SINGLE, *methods}
    # The baseline first, then by Δm% (best first), the failed one (no Δm%) last.
    assert [r["method"] for r in rows][:: len(rows) - 1] == [training.SINGLE, "static"]
    deltas = [r["delta_m_mean"] for r in rows[1:-1]]
    assert len(deltas) == 3 and deltas == sorted(deltas, reverse=True)
    assert list(table) == [r["method"] for r in rows]  # the CSV in the same order
    for method in (training.SINGLE, "equal", "uncertainty", "mgda"):
        row = table[method]
        assert row["status"] == "ok"
        for key in ("left/acc_mean", "right/acc_mean", "delta_m_mean", "step_ms"):
            assert math.isfinite(float(row[key])), (method, key)
        assert 0 <= float(row["left/acc_mean"]) <= 1
    assert table["mgda"]["grads"] == "features" and table["equal"]["grads"] == "–"
    assert table["static"]["status"] == "failed 1/1"
    assert [table[m]["failures"] for m in (training.SINGLE, *methods)] == ["0", "3", "3", "3", "0"]
    assert math.isnan(float(table["static"]["step_ms"]))  # the timing phase skips it too
    assert "RuntimeError: boom" in table["static"]["error"]
    markdown = (out / "results.md").read_text()
    assert all(f"| {m} |" in markdown for m in methods) and "failed 1/1: RuntimeError" in markdown
    assert "Δm % against the single-task networks trained here." in markdown
    assert "Rows sorted by Δm %" in markdown and "with one seed, the value alone" in markdown
    assert "±" not in markdown.split("\n\n")[0]  # one seed: no "± 0.00" in the table
    for figure in ("metrics.png", "weights.png", "tradeoff.png"):
        assert (out / figure).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # What W&B recorded: one run per (method, seed), one history row per step.
    runs = _offline_runs(out)
    expected = {"single-task:left-s0", "single-task:right-s0", "comparison"}
    assert set(runs) == expected | {f"{m}-s0" for m in methods}
    assert all(r["group"] == "test" and r["complete"] for r in runs.values())
    equal = runs["equal-s0"]
    assert equal["config"]["strategies"] == methods and equal["config"]["steps"] == 12
    history = equal["history"]
    assert [row["_step"] for row in history] == list(range(12))
    for row in history:
        for key in ("train/loss/left", "train/loss/right", "weights/left", "weights/right"):
            assert math.isfinite(row[key]), key
    assert [row["_step"] for row in history if "grad/cos/left-right" in row] == [0, 5, 10]
    assert -1 <= history[5]["grad/cos/left-right"] <= 1
    assert 0 <= history[-1]["val/left/acc"] <= 1 and "val/right/acc" in history[-1]
    assert math.isfinite(history[-1]["val/loss/left"])
    assert equal["summary"]["status"] == "ok" and equal["summary"]["failures"] == 3
    assert history[-1]["strategy/failed"] == 1.0 and history[-1]["strategy/failures"] == 3.0
    assert equal["summary"]["final/left/acc"] == pytest.approx(
        float(table["equal"]["left/acc_mean"])
    )
    uncertainty = runs["uncertainty-s0"]["history"][-1]
    assert math.isfinite(uncertainty["strategy/log_var/left"])  # a strategy's extras
    assert runs["static-s0"]["summary"]["status"] == "failed"
    # The strategy's resolved constructor arguments are in the run's config.
    arguments = runs["uncertainty-s0"]["config"]["strategy_args"]
    assert (
        arguments == training.strategy_config("uncertainty", ("left", "right"), 0)["strategy_args"]
    )
    assert "lr" in arguments and f"lr={arguments['lr']!r}" in repr(
        training.make_strategy("uncertainty", ("left", "right"), 0)
    )

    # Beside each W&B run, its history file: the same rows, config and summary.
    for name, record in runs.items():
        local = read_history(out / "runs" / name.replace(":", "-"))
        assert local["complete"] and local["header"]["wandb_run_dir"] == str(record["folder"])
        assert local["header"]["group"] == "test" and local["config"] == record["config"]
        logged = [{k: v for k, v in r.items() if not k.startswith("_")} for r in record["history"]]
        mine = [{k: v for k, v in r.items() if not k.startswith("_")} for r in local["history"]]
        if name == "comparison":  # figures go to W&B only
            assert mine == [] and all(k.startswith("figures/") for r in logged for k in r)
            continue
        assert mine == logged and len(mine) == (0 if name == "static-s0" else 12)
        assert [r["_step"] for r in local["history"]] == [r["_step"] for r in record["history"]]
        # W&B adds each key's last logged value to the summary; the file keeps what was set.
        assert local["summary"] and local["summary"].items() <= record["summary"].items()

    # Away from a terminal: a progress line per run (12 steps, less than an epoch: at the end)
    # and one per finished run, flushed as they come.
    err = capsys.readouterr().err.splitlines()
    assert [line for line in err if line.startswith("[compare] run ")] == [
        line for line in err if re.match(r"\[compare\] run \d/6 done: ", line)
    ] and len([line for line in err if line.startswith("[compare] run ")]) == 6
    (line,) = [line for line in err if line.startswith("[equal seed 0] ")]
    assert "step 12/12 | loss left " in line and "| val left/acc " in line and "ETA" in line

    # --replot draws the figures again from results.csv and the history files, training nothing.
    drawn = {}
    weights_figure = compare.weights_figure

    def capture(results, *args):
        drawn.update(results)
        return weights_figure(results, *args)

    monkeypatch.setattr(compare, "weights_figure", capture)
    for figure in ("metrics.png", "weights.png", "tradeoff.png"):
        (out / figure).unlink()
    again = compare.main(["--replot", "--out", str(out), "--strategies", *methods])

    def same(a, b) -> bool:  # NaN (a failed method's numbers) equals NaN here
        return a == b or (isinstance(a, float) and math.isnan(a) and math.isnan(b))

    assert [list(r) for r in again] == [list(r) for r in rows]  # the CSV, typed again
    assert all(same(a[k], b[k]) for a, b in zip(again, rows) for k in a)
    assert all((out / f).exists() for f in ("metrics.png", "weights.png", "tradeoff.png"))
    assert drawn["equal"][0].weights == [
        [row["weights/left"], row["weights/right"]] for row in equal["history"]
    ]
    assert sorted(runs) == sorted(_offline_runs(out))  # no new W&B run

    summary = runs["comparison"]["summary"]
    assert summary["figures/metrics/_type"] == "image-file"
    image = runs["comparison"]["folder"] / "files" / summary["figures/metrics/path"]
    assert image.exists()
    assert summary["equal/delta_m_mean"] == pytest.approx(float(table["equal"]["delta_m_mean"]))


@pytest.mark.slow
def test_compare_quick_covers_every_registered_strategy(tmp_path: Path) -> None:
    rows = compare.main(["--quick", "--out", str(tmp_path), "--wandb-mode", "disabled"])
    assert sorted(r["method"] for r in rows) == sorted([training.SINGLE, *tb.list_strategies()])
    failed = {r["method"]: r["error"] for r in rows if r["status"] != "ok"}
    assert not failed
