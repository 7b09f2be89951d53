"""What a person following an experiment gets: progress lines in logs, the local history file,
the strategy's arguments in the run's config, short errors for typos, the sorted table and
figures whose labels and axes read well."""

from __future__ import annotations

import io
import itertools
import json
import math
import re
import statistics
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # experiments/ is not installed

from experiments import compare, train, training
from experiments.benchmarks import get_benchmark
from experiments.runner import (
    HistoryTracker,
    ProgressLines,
    RunConfig,
    read_history,
    start_tracking,
)
from taskbalance.integrations import wandb as tb_wandb

TASKS = ("left", "right")


pytestmark = pytest.mark.usefixtures("one_thread")


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


class Recorder(tb_wandb.Tracker):
    """Keeps what a training loop logs and adds to the config."""

    def __init__(self) -> None:
        self.rows: list[dict] = []
        self.config: dict = {}

    def log(self, data, step=None) -> None:
        self.rows.append(dict(data))

    def update_config(self, data) -> None:
        self.config.update(data)


# --------------------------------------------------------------------------- progress
def test_progress_lines_away_from_a_terminal() -> None:
    stream = io.StringIO()  # a log file: not a terminal
    lines = ProgressLines("mgda seed 1", 10, every=4, steps_per_epoch=5, stream=stream)
    for step in range(10):
        record = {"train/loss/a": float(step), "train/loss/b": 1.0, "weights/a": 0.5}
        if step == 9:
            record.update({"val/a/acc": 0.5, "val/loss/a": 2.0})
        lines.update(step, record)
    out = stream.getvalue().splitlines()
    assert len(out) == lines.lines == 3  # steps 4 and 8, and the last one
    # the mean loss of each task since the previous line: steps 0-3, 4-7, 8-9
    assert out[0].startswith("[mgda seed 1] epoch 1/2 | step 4/10 | loss a 1.5, b 1 | ")
    assert "| step 8/10 | loss a 5.5, b 1 |" in out[1]
    assert "epoch 2/2 | step 10/10 | loss a 8.5, b 1 | val a/acc 0.5 | " in out[2]
    assert "val/loss" not in out[2] and "weights" not in stream.getvalue()
    assert re.search(r"\| [\d.]+ s, ETA [\d.]+ s$", out[0]) and out[2].endswith("ETA 0.0 s")

    many = io.StringIO()  # 40 tasks (CelebA): their mean, not 40 numbers
    wide = ProgressLines("x", 1, every=1, stream=many)
    wide.update(0, {f"train/loss/t{k}": 2.0 for k in range(40)})
    assert "| loss mean 2 (40 tasks) |" in many.getvalue()


def test_progress_lines_stay_off_on_a_terminal_and_when_asked() -> None:
    pytest.importorskip("tqdm")  # on a terminal tqdm draws its bar instead
    terminal, off = Terminal(), io.StringIO()
    for stream, every in ((terminal, 1), (off, 0)):
        lines = ProgressLines("x", 3, every=every, stream=stream)
        for step in range(3):
            lines.update(step, {"train/loss/a": 1.0})
    assert terminal.getvalue() == off.getvalue() == ""


def test_train_run_reports_progress_and_the_strategys_arguments(capsys, tmp_path: Path) -> None:
    # 1348 pairs in batches of 256: 5 steps per epoch, so 7 steps end one epoch and the run.
    bench = get_benchmark("multi_digits", pairs_per_image=1)
    config = training.BenchmarkConfig(
        out=str(tmp_path), steps=7, batch_size=256, eval_batches=1, wandb_mode="disabled"
    )
    recorder = Recorder()
    training.train_run(config, bench, "rlw", 3, recorder)
    err = capsys.readouterr().err.splitlines()
    lines = [line for line in err if line.startswith("[rlw seed 3] ")]
    assert len(lines) == 2, err
    assert "epoch 1/2 | step 5/7 |" in lines[0] and "epoch 2/2 | step 7/7 |" in lines[1]
    first = [statistics.fmean(r[f"train/loss/{t}"] for r in recorder.rows[:5]) for t in TASKS]
    assert f"| loss left {first[0]:.4g}, right {first[1]:.4g} |" in lines[0]
    assert f"| val left/acc {recorder.rows[4]['val/left/acc']:.4g}, right/acc" in lines[0]

    # The config gets the strategy's resolved constructor arguments, its seed the run's.
    assert recorder.config["strategy"] == "rlw" and recorder.config["strategy_class"] == "RLW"
    arguments = recorder.config["strategy_args"]
    assert arguments["seed"] == 3 and arguments["tasks"] == list(TASKS)
    shown = repr(training.make_strategy("rlw", TASKS, 3))  # every argument, as repr shows it
    assert all(f"{k}={v!r}" in shown for k, v in arguments.items())
    assert shown.count("=") == len(arguments)
    assert training.strategy_config("single-task:left", ("left",), 0)["strategy_args"] is None


# --------------------------------------------------------------------------- history file
def test_history_file_format_and_reading_it_back(tmp_path: Path) -> None:
    config = RunConfig(out=str(tmp_path), wandb_mode="disabled")
    tracker = start_tracking(config, name="single-task:left-s0", group="g", job_type="mtl")
    assert isinstance(tracker, HistoryTracker) and not tracker.active  # W&B off, file on
    assert tracker.path == tmp_path / "runs" / "single-task-left-s0" / "history.jsonl"
    tracker.update_config({"strategy_args": {"seed": 3}})  # before the first step: the header
    tracker.log({"train/loss/left": 1.0, "weights/left": 1.0}, step=0)
    tracker.log({"train/loss/left": math.nan})  # no step given: the next one
    tracker.update_config({"late": 1})
    tracker.summary({"final/left/acc": 0.5})
    following = read_history(tracker.path)  # readable while the run goes on
    assert not following["complete"] and len(following["history"]) == 2
    tracker.finish()
    tracker.finish()  # twice: no second summary

    records = [json.loads(line) for line in tracker.path.read_text().splitlines()]
    assert [r["_type"] for r in records] == ["header", "step", "step", "config", "summary"]
    header = records[0]
    assert (header["format"], header["name"], header["group"]) == (1, "single-task:left-s0", "g")
    assert header["config"]["wandb_mode"] == "disabled" and header["wandb_run_dir"] is None
    assert header["config"]["strategy_args"] == {"seed": 3}
    step = records[1]
    assert set(step) == {"_type", "_step", "_runtime", "train/loss/left", "weights/left"}
    assert (step["_step"], step["train/loss/left"]) == (0, 1.0)
    assert records[2]["_step"] == 1 and math.isnan(records[2]["train/loss/left"])
    assert records[-1]["steps"] == 2 and records[-1]["summary"] == {"final/left/acc": 0.5}

    run = read_history(tracker.path.parent)  # the folder works too
    assert run["complete"] and run["config"]["late"] == 1 and run["header"]["job_type"] == "mtl"
    assert [row["_step"] for row in run["history"]] == [0, 1]
    assert run["summary"] == {"final/left/acc": 0.5}

    quiet = start_tracking(
        RunConfig(out=str(tmp_path / "none"), wandb_mode="disabled", history=False)
    )
    assert not isinstance(quiet, HistoryTracker) and not (tmp_path / "none" / "runs").exists()


# --------------------------------------------------------------------------- typos
@pytest.mark.parametrize(
    ("script", "argv", "message"),
    [
        (compare, ["--strategies", "equal", "mgdaa"], "unknown strategy 'mgdaa'; did you mean "
                                                      "'mgda'?"),
        (compare, ["--strategies", "grd*"], "no strategy matches 'grd*'; did you mean 'cagrad', "
                                            "'graddrop', 'gradnorm'?"),
        (compare, ["--benchmark", "multi_digit"], "unknown benchmark 'multi_digit'; did you mean "
                                                  "'multi_digits', 'multimnist'?"),
        (train, ["--strategy", "mgdaa"], "unknown strategy 'mgdaa'; did you mean 'mgda'"),
        (train, ["--benchmark", "nyu"], "did you mean 'nyuv2'?"),
    ],
)  # fmt: skip
def test_a_typo_is_a_one_line_error_with_the_close_matches(
    script, argv: list[str], message: str, capsys, tmp_path: Path
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        script.main([*argv, "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and message in err, err
    assert "Traceback" not in err and "usage:" not in err
    assert not (tmp_path / "out").exists()  # nothing ran


# --------------------------------------------------------------------------- table
def test_table_sorted_by_delta_m_and_one_seed_shows_no_spread() -> None:
    run = training.RunResult
    bench = get_benchmark("multi_digits")
    results = {
        "single-task:left": [run("single-task:left", 0, {"left/acc": 0.8})],
        "single-task:right": [run("single-task:right", 0, {"right/acc": 0.5})],
        "equal": [run("equal", 0, {"left/acc": 0.72, "right/acc": 0.45})],  # Δm -10
        "static": [run("static", 0, error="RuntimeError: boom")],  # no Δm: last
        "mgda": [run("mgda", 0, {"left/acc": 0.88, "right/acc": 0.55})],  # Δm +10
        "uncertainty": [run("uncertainty", 0, {"left/acc": 0.8, "right/acc": 0.5})],  # Δm 0
    }
    numeric, formatted, _ = compare.summarise(bench, results, "features")
    order = ["single-task", "mgda", "uncertainty", "equal", "static"]
    assert [r["method"] for r in numeric] == [r["method"] for r in formatted] == order
    assert [r["Δm % (↑)"] for r in formatted] == ["0.00", "10.00", "0.00", "-10.00", "–"]
    cells = [v for row in formatted for v in row.values()]
    assert not any("±" in v for v in cells)  # one seed: the value alone


# --------------------------------------------------------------------------- figures
def _rows(count: int, seeds: int = 3) -> list[dict]:
    """Rows like summarise's, crowded the way the Multi-Digits table is."""
    rows = [
        {"method": "single-task", "kind": "baseline", "seeds": seeds, "step_ms": 9.0,
         "left/acc_mean": 0.88, "left/acc_std": 0.02, "right/acc_mean": 0.84,
         "right/acc_std": 0.02, "delta_m_mean": 0.0, "delta_m_std": 2.5}
    ]  # fmt: skip
    for k in range(count):
        rows.append(
            {"method": f"method_{k}", "kind": ("loss", "gradient")[k % 2], "seeds": seeds,
             "step_ms": 5.0 + 0.05 * k, "left/acc_mean": 0.80 + 0.002 * k, "left/acc_std": 0.03,
             "right/acc_mean": 0.79 - 0.001 * k, "right/acc_std": 0.02,
             "delta_m_mean": -5.0 - 0.1 * (k % 5), "delta_m_std": 3.0}
        )  # fmt: skip
    return rows


def test_tradeoff_labels_do_not_overlap() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bench = get_benchmark("multi_digits")
    figure = compare.tradeoff_figure(_rows(12), bench)
    renderer = figure.canvas.get_renderer()
    (axis,) = figure.axes
    boxes = [text.get_window_extent(renderer) for text in axis.texts]
    assert sorted(t.get_text() for t in axis.texts) == sorted(f"method_{k}" for k in range(12))
    assert not [(a, b) for a, b in itertools.combinations(boxes, 2) if a.overlaps(b)]
    frame = axis.get_window_extent(renderer)
    assert all(frame.x0 <= b.x0 and b.x1 <= frame.x1 for b in boxes)  # none cut off
    plt.close(figure)


def test_metrics_axes_span_the_data_and_weights_lines_differ() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bench = get_benchmark("multi_digits")
    rows = _rows(4)
    single = {"left/acc": 0.88, "right/acc": 0.84}
    figure = compare.metrics_figure(rows, bench, single)
    for axis, metric in zip(figure.axes, bench.metrics):
        low, high = axis.get_xlim()
        ends = [100 * (r[f"{metric}_mean"] + d * r[f"{metric}_std"]) for r in rows for d in (-1, 1)]
        assert low <= min(ends) and max(ends) <= high  # nothing cut off (the baseline's band too)
        assert low > 0.5 * min(ends)  # dots: the axis spans the data, it does not start at 0
        assert high - low < 2 * (max(ends) - min(ends))
    assert figure.axes[2].get_title() == "Δm % vs single-task (↑)"
    plt.close(figure)

    results = {
        "equal": [training.RunResult("equal", 0, weights=[[1.0, 1.0]] * 50)],
        "mgda": [training.RunResult("mgda", 0, weights=[[0.4, 0.6], [0.6, 0.4]] * 25)],
    }
    figure = compare.weights_figure(results, TASKS, {"equal": "loss", "mgda": "gradient"})
    equal = figure.axes[0]
    assert equal.get_title() == "equal (loss)"
    styles = [line.get_linestyle() for line in equal.lines if line.get_linewidth() > 1]
    assert styles == ["-", "--"]  # equal weights: the dashed line leaves the solid one visible
    plt.close(figure)
