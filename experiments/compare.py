"""Compare multi-task strategies on a benchmark: its metrics, Δm%, step time.

    python -m experiments.compare                 # Multi-Digits, every strategy, 3 seeds
    python -m experiments.compare --quick         # a smoke run: few steps, 1 seed (< 1 minute)
    python -m experiments.compare --strategies equal "grad*" mgda --seeds 0 1
    python -m experiments.compare --benchmark nyuv2 --data-dir data/nyuv2 --device cuda --amp
    python -m experiments.compare --benchmark mylab.tasks:make_benchmark   # your own
    torchrun --nproc_per_node=2 -m experiments.compare --benchmark cityscapes --data-dir ...

For each strategy and seed it trains the benchmark's model with the benchmark's recipe
(:mod:`experiments.training`: optimizer, learning rate and schedule, epochs, batch size; each
can be overridden), then reports the test metrics (mean ± std over the seeds) and

* Δm% (Maninis, Radosavovic & Kokkinos, "Attentive Single-Tasking of Multiple Tasks", CVPR
  2019): ``Δm = 1/K Σ_k (−1)^{l_k} (M_k − S_k) / S_k · 100`` over the benchmark's ``K``
  metrics, ``l_k = 1`` where lower is better; positive is better than single-task (the CAGrad,
  Nash-MTL and FAMO tables print the negation, lower is better). ``S`` is the benchmark's
  published single-task reference (NYUv2, Cityscapes) or, when it has none or with
  ``--baselines train``, single-task networks (one per task, same recipe and seeds) trained by
  this script; Δm is computed per seed against ``S`` (the trained baselines averaged over the
  seeds) and reported as mean ± std;
* the time of a training step (forward, strategy backward, optimizer step), measured side by
  side after the training runs (:func:`time_steps`: one step of every method in turn, on the
  same batch, so a change of machine load hits every method alike; lower quartile of the step
  times), and its ratio to equal weighting. The CSV also has ``train_step_ms``, the median
  during the training runs (logging and diagnostics excluded), exposed to load changes.

Gradient-level strategies (``needs_grads``) take their per-task gradients with respect to the
shared features by default (``--grad-source features``: MGDA-UB style, cheap), or the whole
trunk (``--grad-source shared_params``); the table says which. MoCo and DB-MTL always use the
trunk's parameters (they average each task's gradient over steps, which has no meaning for
feature gradients of changing batches). The gradient-conflict diagnostics
(``grad/cos/left-right``, ...) are always computed on the trunk's parameters, every
``--diagnostics-every`` steps, outside the timed part of the step.

W&B (offline by default, under ``<out>/wandb``): one run per (strategy, seed) in group
``--wandb-group`` (default ``compare-<time>``), one ``log`` call per step with
``train/loss/<task>``, ``weights/<task>``, every other entry of the strategy's step report as
``strategy/<key>`` (extras as ``strategy/<name>/<task>``; step scalars such as
``strategy/failures``, the running count of steps whose solver fell back to the previous
weights), ``grad/...`` diagnostics and, at epoch ends, ``val/<task>/<metric>`` and
``val/loss/<task>``; a summary per run (``final/<task>/<metric>``, the final ``failures``
count: 0 when the strategy reports none; the table sums it over seeds); and one ``comparison``
run with the figures and the table's numbers. The config of a run holds the script's settings
and the strategy's resolved constructor arguments (``strategy_args``, with the run's seed for
the random strategies). Beside each W&B run, ``<out>/runs/<run>/history.jsonl`` holds the same
rows, config and summary as JSON lines (:class:`experiments.runner.HistoryTracker`), readable
without W&B (:func:`experiments.runner.read_history`). ``<out>`` gets ``results.csv``,
``results.md`` (sorted by Δm%, best first), ``metrics.png`` (a dot plot per metric and of Δm%),
``weights.png`` (the task weights over the steps) and ``tradeoff.png`` (Δm against step time).

Progress: on a terminal, tqdm bars; otherwise (``nohup``, SLURM, a pipe) a line on standard
error per epoch of every run (``--progress-every N``: every N steps) and one per finished run,
with an ETA.

Under ``torchrun`` every training run is data-parallel over the ranks; rank 0 logs, writes the
tables and figures; the side-by-side timing needs one process and is skipped.

A strategy that raises is reported in the table as failed, with its error; the others go on.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import sys
import time
import traceback
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

import taskbalance as tb
from experiments.benchmarks import Benchmark
from experiments.runner import (
    batch_indices,
    draws_bars,
    duration,
    history_path,
    markdown_table,
    parse_config,
    progress,
    read_history,
    seed_everything,
    select_strategies,
    start_tracking,
    write_table,
)
from experiments.training import (
    SINGLE,
    BenchmarkConfig,
    Distributed,
    RunResult,
    Setup,
    collate,
    gradient_source,
    load_benchmark,
    run_length,
    setup_distributed,
    to_device,
    train_run,
)
from taskbalance.integrations.wandb import Tracker
from taskbalance.registry import strategy_info

QUICK_STEPS = 50


@dataclass
class CompareConfig(BenchmarkConfig):
    """Compare multi-task strategies on a benchmark (metrics, Δm% vs single-task, step time)."""

    out: str = field(default="results/compare", metadata={"help": "directory for the results"})
    strategies: list[str] = field(
        default_factory=lambda: ["*"], metadata={"help": "names or fnmatch patterns"}
    )
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2], metadata={"help": "train seeds"})
    quick: bool = field(
        default=False,
        metadata={"help": f"smoke run: {QUICK_STEPS} steps, first seed, 2 test batches"},
    )
    baselines: Literal["auto", "train", "off"] = field(
        default="auto",
        metadata={
            "help": "single-task baselines: auto (train them when the benchmark has no "
            "published reference), train, or off"
        },
    )
    timing_steps: int = field(
        default=100, metadata={"help": "steps per method of the side-by-side timing (0: none)"}
    )
    threads: int = field(default=1, metadata={"help": "torch CPU threads (1: stable timings)"})
    replot: bool = field(
        default=False,
        metadata={
            "help": "train nothing: redraw the figures from <out>/results.csv and the first "
            "seed's <out>/runs/*/history.jsonl of an earlier comparison"
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}")
        if self.timing_steps < 0:
            raise ValueError(f"timing_steps must be >= 0, got {self.timing_steps}")
        if not self.seeds:
            raise ValueError("seeds must name at least one seed")
        select_strategies(self.strategies)  # a typo ends the parse with the close matches


def time_steps(config: CompareConfig, bench: Benchmark, methods: Sequence[str]) -> dict[str, float]:
    """ms per training step (forward, strategy backward, optimizer step) of each method, measured
    side by side: ``timing_steps`` rounds, each taking one step of every method, in a shuffled
    order, on the same batch, so that a change of machine load hits every method alike.

    The statistic is the lower quartile of the per-step times after 5 warm-up rounds: on a
    shared machine other processes only ever add time to a step (the reason ``timeit`` reports
    a minimum), and a quartile still reflects steps whose cost varies (iterative solvers). A
    method that fails gets NaN (its runs report the error).
    """
    place = Distributed(device=torch.device(config.device))
    train = bench.dataset("train")
    _, _, size = run_length(config, bench, len(train))
    setups: dict[str, Setup] = {}
    for method in methods:
        try:
            seed_everything(0)
            setups[method] = Setup.build(config, bench, method, place, seed=0)
        except Exception:
            continue
    seconds: dict[str, list[float]] = {m: [] for m in setups}
    shuffle = torch.Generator().manual_seed(0)
    for step in range(config.timing_steps):
        index = batch_indices(len(train), size, seed=0, step=step).tolist()
        getitems = getattr(train, "__getitems__", None)
        items = getitems(index) if getitems else [train[i] for i in index]
        inputs, targets = to_device(collate(items), place.device)
        names = list(setups)
        for position in torch.randperm(len(names), generator=shuffle).tolist():
            method = names[position]
            setup = setups[method]
            try:
                began = time.perf_counter()
                features, losses = setup.forward(inputs, targets)
                setup.update(features, losses)
                if place.device.type == "cuda":
                    torch.cuda.synchronize(place.device)
                seconds[method].append(time.perf_counter() - began)
            except Exception:
                del setups[method]
                seconds[method] = []
    warm_up = min(5, config.timing_steps // 2)
    quartiles = {
        m: 1000 * statistics.quantiles(s[warm_up:], n=4, method="inclusive")[0]
        if len(s) - warm_up >= 2
        else math.nan
        for m, s in seconds.items()
    }
    return quartiles | {m: math.nan for m in methods if m not in seconds}


def median_ms(seconds: Sequence[float]) -> float:
    """Median step time in ms, skipping the first steps (allocator and cache warm-up)."""
    kept = seconds[min(5, len(seconds) // 5) :] or seconds
    return 1000 * statistics.median(kept) if kept else math.nan


def run_one(
    config: CompareConfig,
    bench: Benchmark,
    method: str,
    seed: int,
    group: str,
    place: Distributed,
) -> RunResult:
    """One tracked run; an exception becomes a failed result (the comparison goes on)."""
    name = f"{method}-s{seed}"
    job_type = "baseline" if ":" in method else "mtl"
    tracker = (
        start_tracking(config, group=group, name=name, job_type=job_type)
        if place.main
        else Tracker()
    )
    checkpoint = None
    if config.checkpoint_dir is not None:
        checkpoint = Path(config.checkpoint_dir) / f"{method.replace(':', '-')}-s{seed}.pt"
    try:
        result, _ = train_run(
            config, bench, method, seed, tracker, place=place, checkpoint=checkpoint
        )
    except Exception as error:
        if place.world > 1:
            raise  # the other ranks would wait for this one forever
        message = f"{type(error).__name__}: {error}".splitlines()[0][:200]
        print(f"[compare] {method} seed {seed} failed: {message}", file=sys.stderr)
        traceback.print_exc(limit=3, file=sys.stderr)
        result = RunResult(method, seed, error=message)
        tracker.summary({"status": "failed", "error": message})
        tracker.finish()
        return result
    summary: dict[str, Any] = {f"final/{k}": v for k, v in result.metrics.items()}
    summary.update(
        status="ok", step_ms=median_ms(result.step_seconds), seed=seed, failures=result.failures
    )
    tracker.summary(summary)
    tracker.finish()
    return result


# --------------------------------------------------------------------------- table
def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    if not values:
        return math.nan, math.nan
    mean = statistics.fmean(values)
    return mean, statistics.stdev(values) if len(values) > 1 else 0.0


def _pm(mean: float, std: float, seeds: int, digits: int = 2) -> str:
    if math.isnan(mean):
        return "–"
    return f"{mean:.{digits}f}" if seeds < 2 else f"{mean:.{digits}f} ± {std:.{digits}f}"


def single_task_values(
    bench: Benchmark, results: Mapping[str, Sequence[RunResult]]
) -> dict[str, float]:
    """Each metric of the trained single-task networks, averaged over their seeds (empty when a
    task's baseline is missing or failed)."""
    values: dict[str, float] = {}
    for task in bench.tasks:
        runs = [r for r in results.get(f"{SINGLE}:{task}", []) if r.error is None]
        if not runs:
            return {}
        for metric in bench.task_metrics(task):
            values[metric] = statistics.fmean(r.metrics[metric] for r in runs)
    return values


def delta_m_baseline(
    bench: Benchmark, results: Mapping[str, Sequence[RunResult]], trained_baselines: bool
) -> tuple[dict[str, float], str]:
    """(the single-task values Δm% is measured against, what they are in words): the trained
    single-task networks when ``trained_baselines`` and they all ran, else the benchmark's
    published reference (if any)."""
    single = single_task_values(bench, results) if trained_baselines else {}
    if single:
        return single, "the single-task networks trained here"
    if bench.reference:
        source = bench.reference.source
        return dict(bench.reference.values), f"the published single-task reference ({source})"
    return {}, "nothing (no single-task baseline)"


def table_order(row: Mapping[str, Any]) -> tuple[int, float]:
    """Sort key of the table: the single-task baseline first, then by Δm% (best first), then the
    rows without a Δm% (failed, or nothing to measure against) in the order they ran."""
    if row["method"] == SINGLE:
        return (0, 0.0)
    delta = row["delta_m_mean"]
    return (1, -delta) if not math.isnan(delta) else (2, 0.0)


def summarise(
    bench: Benchmark,
    results: dict[str, list[RunResult]],
    grad_source: str,
    timing: dict[str, float] | None = None,
    *,
    trained_baselines: bool = True,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], str]:
    """(numeric rows for the CSV, formatted rows for Markdown and the console, what Δm% is
    measured against), in :func:`table_order`: the baseline first, then by Δm%, best first.

    Δm% is measured against :func:`delta_m_baseline`. A formatted value is the mean ± the
    sample standard deviation over the seeds, or the value alone when one seed ran.
    ``step_ms`` is the side-by-side timing of :func:`time_steps` when given (NaN without it);
    ``train_step_ms`` the median step time during the training runs (exposed to load changes).
    """
    timing = timing or {}
    metrics = list(bench.metrics)
    single, against = delta_m_baseline(bench, results, trained_baselines)
    equal_ms = timing.get("equal", math.nan)

    numeric: list[dict[str, Any]] = []
    for method, runs in results.items():
        baseline = method.startswith(f"{SINGLE}:")
        if baseline and method != f"{SINGLE}:{bench.tasks[0]}":
            continue  # one row for all single-task networks, below
        ok = [r for r in runs if r.error is None]
        if baseline:
            # The cost of getting every task: one step of each network.
            task_runs = {t: results.get(f"{SINGLE}:{t}", []) for t in bench.tasks}
            row: dict[str, Any] = {"method": SINGLE, "kind": "baseline", "grads": "–"}
            for metric in metrics:
                task_ok = [r for r in task_runs[metric.split("/", 1)[0]] if r.error is None]
                row[f"{metric}_mean"], row[f"{metric}_std"] = _mean_std(
                    [r.metrics[metric] for r in task_ok]
                )
            per_seed = [
                {k: v for t in bench.tasks for k, v in task_runs[t][i].metrics.items()}
                for i in range(min(len(r) for r in task_runs.values()))
                if all(task_runs[t][i].error is None for t in bench.tasks)
            ]
            row["step_ms"] = sum(timing.get(f"{SINGLE}:{t}", math.nan) for t in bench.tasks)
            row["train_step_ms"] = sum(
                median_ms([s for r in task_runs[t] for s in r.step_seconds]) for t in bench.tasks
            )
            failed = [r for t in bench.tasks for r in task_runs[t] if r.error is not None]
            seeds = len(per_seed)
        else:
            info = strategy_info(method)
            gradient = isinstance(info.cls, type) and issubclass(info.cls, tb.GradientAggregation)
            row = {
                "method": method,
                "kind": "gradient" if gradient else "loss",
                "grads": gradient_source(method, grad_source) or "–",
            }
            for metric in metrics:
                row[f"{metric}_mean"], row[f"{metric}_std"] = _mean_std(
                    [r.metrics[metric] for r in ok]
                )
            per_seed = [r.metrics for r in ok]
            row["step_ms"] = timing.get(method, math.nan)
            row["train_step_ms"] = (
                median_ms([s for r in ok for s in r.step_seconds]) if ok else math.nan
            )
            failed = [r for r in runs if r.error is not None]
            seeds = len(ok)
        deltas = [bench.delta_m(values, single) for values in per_seed] if single else []
        row["delta_m_mean"], row["delta_m_std"] = _mean_std(deltas)
        row["seeds"] = seeds
        row["failures"] = sum(r.failures for r in ok)
        total = len(runs) if not baseline else sum(len(r) for r in task_runs.values())
        row["status"] = "ok" if not failed else f"failed {len(failed)}/{total}"
        row["error"] = failed[0].error if failed else ""
        numeric.append(row)
    numeric.sort(key=table_order)

    formatted = []
    for row in numeric:
        shown = {"method": row["method"], "kind": row["kind"], "grads via": row["grads"]}
        for metric in metrics:
            unit = bench.metrics[metric].unit
            scale, suffix = (100.0, " %") if unit == "fraction" else (1.0, "")
            mean, std = row[f"{metric}_mean"] * scale, row[f"{metric}_std"] * scale
            arrow = "↑" if bench.metrics[metric].higher_is_better else "↓"
            shown[f"{metric}{suffix} ({arrow})"] = _pm(mean, std, row["seeds"])
        shown["Δm % (↑)"] = (
            _pm(row["delta_m_mean"], row["delta_m_std"], row["seeds"]) if single else "–"
        )
        ms = row["step_ms"]
        shown["ms/step"] = "–" if math.isnan(ms) else f"{ms:.2f}"
        shown["× equal"] = (
            "–"
            if math.isnan(ms) or math.isnan(equal_ms) or row["method"] == SINGLE
            else f"{ms / equal_ms:.2f}"
        )
        shown["seeds"] = str(row["seeds"])
        shown["failed steps"] = str(row["failures"])
        shown["status"] = row["status"] if not row["error"] else f"{row['status']}: {row['error']}"
        formatted.append(shown)
    return numeric, formatted, against


# --------------------------------------------------------------------------- figures
MAX_METRIC_PANELS = 9
# One colour and marker per kind of method, the same in every figure.
KIND_STYLE = {
    "loss": {"color": "tab:blue", "marker": "o", "label": "loss-level"},
    "gradient": {"color": "tab:red", "marker": "s", "label": "gradient-level"},
}
TASK_LINES = ("-", "--", ":", "-.")


def _by_delta_m(numeric: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The methods' rows (no baseline), best Δm first, rows without a Δm last."""
    return sorted((r for r in numeric if r["method"] != SINGLE), key=table_order)


def metrics_figure(
    numeric: Sequence[dict[str, Any]], bench: Benchmark, single: Mapping[str, float]
) -> Any:
    """A dot plot per metric (the first nine) and one of Δm%: the mean over seeds (dot) ± the
    standard deviation (line), methods sorted by Δm%, best at the top; the values Δm is measured
    against dashed, the trained baselines' ± std over seeds shaded.

    Dots, not bars: a bar's length claims a distance from zero, and accuracies of 75–90 % drawn
    from zero hide their differences, drawn from 70 % exaggerate them. A dot's axis can span just
    the data (it does: mean ± std and the reference, padded), and the reader compares positions.
    """
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch
    from matplotlib.ticker import MaxNLocator

    rows = _by_delta_m(numeric)
    baseline = next((r for r in numeric if r["method"] == SINGLE), None)
    metrics = list(bench.metrics)[:MAX_METRIC_PANELS]
    panels: list[str | None] = [*metrics, None]  # None: the Δm% panel
    columns = min(3, len(panels))
    lines = math.ceil(len(panels) / columns)
    figure, axes = plt.subplots(
        lines,
        columns,
        figsize=(3.3 * columns + 1.0, 1.0 + (0.5 + 0.17 * max(len(rows), 1)) * lines),
        dpi=100,
        squeeze=False,
        sharey=True,
    )
    positions = range(len(rows))
    for axis, metric in zip(axes.flat, panels):
        if metric is None:
            scale, key, title = 1.0, "delta_m", "Δm % vs single-task (↑)"
            reference, spread = (0.0, math.nan) if single else (math.nan, math.nan)
            if baseline is not None and single and baseline["seeds"] > 1:
                spread = baseline["delta_m_std"]
        else:
            scale = 100.0 if bench.metrics[metric].unit == "fraction" else 1.0
            key = metric
            arrow = "↑" if bench.metrics[metric].higher_is_better else "↓"
            title = f"{metric}{' %' if scale == 100 else ''} ({arrow})"
            reference = scale * single[metric] if metric in single else math.nan
            spread = math.nan
            if baseline is not None and metric in single and baseline["seeds"] > 1:
                spread = scale * baseline[f"{metric}_std"]
        means = [scale * r[f"{key}_mean"] for r in rows]
        stds = [scale * r[f"{key}_std"] if r["seeds"] > 1 else 0.0 for r in rows]
        for y, row, mean, std in zip(positions, rows, means, stds):
            if math.isnan(mean):
                continue
            style = KIND_STYLE[row["kind"]]
            axis.plot([mean - std, mean + std], [y, y], color=style["color"], lw=1, alpha=0.5)
            axis.plot(mean, y, style["marker"], color=style["color"], markersize=4)
        shown = [m + s * d for m, s in zip(means, stds) for d in (-1, 1) if not math.isnan(m)]
        if not math.isnan(reference):
            axis.axvline(reference, color="k", linestyle="--", lw=0.9)
            shown.append(reference)
            if not math.isnan(spread):
                axis.axvspan(reference - spread, reference + spread, color="0.85", zorder=0)
                shown += [reference - spread, reference + spread]
        if shown:
            low, high = min(shown), max(shown)
            pad = max(0.06 * (high - low), abs(high) * 0.005, 1e-9)
            axis.set_xlim(low - pad, high + pad)
        axis.set_title(title, fontsize=9)
        axis.xaxis.set_major_locator(MaxNLocator(5))
        axis.tick_params(labelsize=7)
        axis.grid(axis="y", color="0.92", lw=0.6)
        axis.grid(axis="x", color="0.92", lw=0.6)
        axis.set_axisbelow(True)
    for axis in list(axes.flat)[len(panels) :]:
        axis.axis("off")
    axes[0][0].set_yticks(list(positions), [r["method"] for r in rows])
    if rows:
        axes[0][0].set_ylim(len(rows) - 0.5, -0.5)  # best at the top
    handles = [
        Line2D([], [], marker=s["marker"], color=s["color"], ls="-", lw=1, label=s["label"])
        for s in KIND_STYLE.values()
    ]
    handles.append(Line2D([], [], color="k", ls="--", lw=0.9, label="what Δm is measured against"))
    if baseline is not None and baseline["seeds"] > 1 and single:
        handles.append(Patch(color="0.85", label="single-task ± std over seeds"))
    figure.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8, frameon=False)
    figure.suptitle(
        f"{bench.name}: test metrics, mean ± std over seeds, sorted by Δm % "
        "(axes span the data, not from 0)",
        fontsize=10,
    )
    figure.tight_layout(rect=(0, 0.04, 1, 1))
    return figure


def _running_mean(values: Tensor, window: int) -> Tensor:
    """The mean of the last ``window`` values at every step (fewer at the start)."""
    sums = torch.cumsum(torch.nan_to_num(values.double()), 0)
    counts = torch.arange(1, len(values) + 1, dtype=torch.float64)
    shifted = torch.cat([torch.zeros(window, dtype=torch.float64), sums])[: len(values)]
    return ((sums - shifted) / counts.clamp(max=window)).float()


def weights_figure(
    results: dict[str, list[RunResult]],
    tasks: Sequence[str],
    kinds: Mapping[str, str] | None = None,
) -> Any:
    """Task weights over the training steps of each strategy's first seed: one panel per
    strategy (loss-level first, then gradient-level, alphabetical within), one line style and
    colour per task; every step thin and faint, the running mean thick, so that two tasks'
    weights stay visible where they coincide and where they jump from step to step."""
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    kinds = kinds or {}
    runs = [runs[0] for method, runs in results.items() if ":" not in method and runs[0].weights]
    order = {"loss": 0, "gradient": 1}
    runs.sort(key=lambda r: (order.get(kinds.get(r.method, ""), 2), r.method))
    columns = min(5, max(len(runs), 1))
    lines = max(1, math.ceil(len(runs) / columns))
    figure, axes = plt.subplots(
        lines,
        columns,
        figsize=(2.3 * columns, 1.55 * lines + 0.8),
        dpi=100,
        squeeze=False,
        sharex=True,
    )
    steps = max((len(r.weights) for r in runs), default=1)
    window = max(1, steps // 40)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for axis, run in zip(axes.flat, runs):
        history = torch.tensor(run.weights)
        for k in range(len(tasks)):
            colour, style = colours[k % len(colours)], TASK_LINES[k % len(TASK_LINES)]
            axis.plot(history[:, k].numpy(), color=colour, lw=0.4, alpha=0.3)
            smooth = _running_mean(history[:, k], window).numpy()
            axis.plot(smooth, color=colour, lw=1.4, ls=style)
        kind = kinds.get(run.method)
        axis.set_title(run.method + (f" ({kind})" if kind else ""), fontsize=8)
        axis.tick_params(labelsize=6)
        axis.margins(y=0.08)
        axis.grid(color="0.93", lw=0.5)
    for axis in list(axes.flat)[len(runs) :]:
        axis.axis("off")
    for axis in axes[-1]:
        axis.set_xlabel("step", fontsize=7)
    if runs and len(tasks) <= 10:
        handles = [
            Line2D([], [], color=colours[k % len(colours)], lw=1.4, ls=TASK_LINES[k % 4], label=t)
            for k, t in enumerate(tasks)
        ]
        figure.legend(handles=handles, loc="upper right", ncol=len(tasks), fontsize=8)
    figure.suptitle(
        f"task weights over training (seed {runs[0].seed if runs else 0}): thin, every step; "
        f"thick, the running mean over {window} steps",
        fontsize=9,
        x=0.02,
        ha="left",
    )
    figure.tight_layout(rect=(0, 0, 1, 0.98))
    return figure


def _place_labels(axis: Any, points: Sequence[tuple[float, float]], names: Sequence[str]) -> None:
    """Label each point where its text overlaps no other label or point: candidate offsets
    around it at growing distances, the first free one taken (the most crowded points choose
    first). A label right next to its point must be nearer to it than to any other point;
    one moved further away gets a leader line to its point."""
    from matplotlib.transforms import Bbox

    figure = axis.figure
    figure.canvas.draw()  # fixes the transforms and fonts that measuring needs
    renderer = figure.canvas.get_renderer()
    frame = axis.get_window_extent(renderer)
    where = [tuple(p) for p in axis.transData.transform(points)] if points else []
    marks = [Bbox.from_bounds(x - 4, y - 4, 8, 8) for x, y in where]
    crowding = [sum(math.dist(p, q) < 40 for q in where) for p in where]
    placed: list[Any] = []
    directions = [math.radians(a) for a in (30, 150, 210, 330, 90, 270, 0, 180, 60, 120, 240, 300)]
    near, font = 5, 7

    def gap(box: Any, x: float, y: float) -> float:
        return math.hypot(max(box.x0 - x, 0, x - box.x1), max(box.y0 - y, 0, y - box.y1))

    for i in sorted(range(len(names)), key=lambda i: -crowding[i]):
        best: tuple[float, float, float, str, str] | None = None
        best_cost = math.inf
        for radius in (near, 12, 18, 26, 36, 48, 62, 78, 96):
            for angle in directions:
                dx, dy = radius * math.cos(angle), radius * math.sin(angle)
                ha = "left" if dx > 1 else "right" if dx < -1 else "center"
                va = "bottom" if dy > 1 else "top" if dy < -1 else "center"
                text = axis.annotate(
                    names[i], points[i], xytext=(dx, dy), textcoords="offset points",
                    fontsize=font, ha=ha, va=va,
                )  # fmt: skip
                box = text.get_window_extent(renderer).expanded(1.08, 1.2)
                text.remove()
                outside = not (
                    frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0
                    and box.y1 <= frame.y1
                )  # fmt: skip
                hits = sum(box.overlaps(other) for other in [*placed, *marks])
                # Without a leader line, the nearest point must be the label's own.
                own = gap(box, *where[i])
                unclear = radius == near and any(
                    gap(box, *p) < own + 6 for j, p in enumerate(where) if j != i
                )
                cost = hits + 10 * outside + unclear + radius / 1000
                if cost < best_cost:
                    best, best_cost = (dx, dy, radius, ha, va), cost
            if best_cost < 1:
                break
        assert best is not None
        dx, dy, radius, ha, va = best
        leader = {"arrowstyle": "-", "color": "0.4", "lw": 0.6, "shrinkA": 0, "shrinkB": 3}
        text = axis.annotate(
            names[i], points[i], xytext=(dx, dy), textcoords="offset points", fontsize=font,
            ha=ha, va=va, arrowprops=leader if radius > near else None,
        )  # fmt: skip
        placed.append(text.get_window_extent(renderer).expanded(1.08, 1.2))


def tradeoff_figure(numeric: Sequence[dict[str, Any]], bench: Benchmark) -> Any:
    """Δm% (mean ± std over seeds) against the side-by-side step time, one point per method,
    each labelled where its name overlaps nothing (with a leader line when moved away); the
    dotted lines cross at equal weighting, the dashed one is the single-task level (Δm = 0)."""
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    rows = [
        r
        for r in numeric
        if r["method"] != SINGLE and not math.isnan(r["delta_m_mean"] + r["step_ms"])
    ]
    figure, axis = plt.subplots(figsize=(8.0, 5.6), dpi=100)
    for row in rows:
        style = KIND_STYLE[row["kind"]]
        drawn = axis.errorbar(
            row["step_ms"],
            row["delta_m_mean"],
            yerr=row["delta_m_std"] if row["seeds"] > 1 else None,
            fmt=style["marker"],
            color=style["color"],
            markersize=4.5,
            elinewidth=0.8,
        )
        for bar in drawn[2]:  # faint: the spreads are long and would hide the labels
            bar.set_alpha(0.25)
    axis.axhline(0, color="0.3", linewidth=0.8, linestyle="--")
    equal = next((r for r in rows if r["method"] == "equal"), None)
    if equal is not None:
        axis.axhline(equal["delta_m_mean"], color="0.6", lw=0.7, ls=":")
        axis.axvline(equal["step_ms"], color="0.6", lw=0.7, ls=":")
    handles = [
        Line2D([], [], marker=s["marker"], color=s["color"], ls="none", label=s["label"])
        for s in KIND_STYLE.values()
    ]
    handles.append(Line2D([], [], color="0.3", lw=0.8, ls="--", label="single-task (Δm = 0)"))
    if equal is not None:
        handles.append(Line2D([], [], color="0.6", lw=0.7, ls=":", label="equal weighting"))
    axis.legend(handles=handles, fontsize=7, loc="lower left", framealpha=0.9)
    axis.set_xlabel("ms per training step (measured side by side)")
    axis.set_ylabel("Δm % vs single-task (higher is better)")
    seeds = max((r["seeds"] for r in rows), default=0)
    spread = "mean ± std over seeds" if seeds > 1 else "one seed"
    axis.set_title(f"{bench.name}: benefit vs cost ({spread}; up and left is better)", fontsize=10)
    axis.margins(x=0.12, y=0.08)
    figure.tight_layout()
    _place_labels(
        axis, [(r["step_ms"], r["delta_m_mean"]) for r in rows], [r["method"] for r in rows]
    )
    return figure


# --------------------------------------------------------------------------- main
def resolve(config: CompareConfig) -> CompareConfig:
    """Apply --quick: the first seed, QUICK_STEPS steps (unless --steps is given), at most two
    test batches per evaluation and a short timing phase (at most 12 steps per method)."""
    if not config.quick:
        return config
    return dataclasses.replace(
        config,
        seeds=config.seeds[:1],
        steps=config.steps or QUICK_STEPS,
        eval_batches=config.eval_batches or 2,
        timing_steps=min(config.timing_steps, 12),
    )


def draw_figures(
    numeric: Sequence[dict[str, Any]],
    bench: Benchmark,
    single: Mapping[str, float],
    results: dict[str, list[RunResult]],
    out: Path,
) -> dict[str, Any]:
    """The three figures, saved as ``<out>/<name>.png`` (none, with a note, without
    matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
    except ImportError as error:
        print(f"[compare] no figures: {error}", file=sys.stderr)
        return {}
    kinds = {r["method"]: r["kind"] for r in numeric}
    figures = {
        "metrics": metrics_figure(numeric, bench, single),
        "weights": weights_figure(results, bench.tasks, kinds),
        "tradeoff": tradeoff_figure(numeric, bench),
    }
    for name, figure in figures.items():
        figure.savefig(out / f"{name}.png")
    return figures


_TEXT_COLUMNS = frozenset({"method", "kind", "grads", "status", "error"})


def read_results(path: Path) -> list[dict[str, Any]]:
    """The numeric rows of a ``results.csv`` written by :func:`main`, typed again."""
    import csv

    rows = []
    with path.open(newline="") as handle:
        for row in csv.DictReader(handle):
            typed: dict[str, Any] = {}
            for key, text in row.items():
                if key in _TEXT_COLUMNS:
                    typed[key] = text
                elif key in ("seeds", "failures"):
                    typed[key] = int(text)
                else:
                    typed[key] = float(text) if text else math.nan
            rows.append(typed)
    return rows


def replot(config: CompareConfig) -> list[dict[str, Any]]:
    """``--replot``: the figures of an earlier comparison in ``--out`` drawn again from its
    ``results.csv`` and, for the weights, the history files of each method's first seed
    (``--seeds``); nothing is trained. Returns the table's rows."""
    out = Path(config.out)
    bench = load_benchmark(config)
    if not (out / "results.csv").exists():
        raise SystemExit(f"--replot: no {out / 'results.csv'}; run the comparison first")
    numeric = read_results(out / "results.csv")
    baseline = next((r for r in numeric if r["method"] == SINGLE), None)
    single = {}
    if baseline is not None:
        single = {m: baseline[f"{m}_mean"] for m in bench.metrics}
        single = {m: v for m, v in single.items() if not math.isnan(v)}
    if not single and bench.reference:
        single = dict(bench.reference.values)
    results: dict[str, list[RunResult]] = {}
    for row in numeric:
        method = row["method"]
        for seed in config.seeds:
            path = history_path(out, f"{method}-s{seed}")
            if method == SINGLE or not path.exists():
                continue
            keys = [f"weights/{t}" for t in bench.tasks]
            rows = read_history(path)["history"]
            weights = [[r[k] for k in keys] for r in rows if all(k in r for k in keys)]
            results[method] = [RunResult(method, seed, weights=weights)]
            break
    draw_figures(numeric, bench, single, results, out)
    print(f"[compare] figures redrawn in {out}/", flush=True)
    import matplotlib.pyplot as plt

    plt.close("all")
    return numeric


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Run the comparison; return the numeric table rows (also written to ``--out``; rank 0)."""
    config = resolve(parse_config(CompareConfig, argv))
    if config.replot:
        return replot(config)
    torch.set_num_threads(config.threads)
    place = setup_distributed(config.device)
    methods = select_strategies(config.strategies)
    bench = load_benchmark(config)
    group = config.wandb_group or time.strftime("compare-%Y%m%d-%H%M%S")
    out = Path(config.out)
    train_baselines = config.baselines == "train" or (
        config.baselines == "auto" and not bench.reference
    )
    steps, _, batch = run_length(config, bench, len(bench.dataset("train")))
    if place.main:
        out.mkdir(parents=True, exist_ok=True)
        print(
            f"[compare] {bench.describe()}; {len(methods)} strategies × seeds {config.seeds}, "
            f"{steps} steps of batch {batch} each on {place.world} × {place.device}; "
            f"gradient-level strategies use {config.grad_source}= (moco, db_mtl: shared_params=); "
            f"W&B {config.wandb_mode} (group {group})",
            flush=True,
        )
    plan = [f"{SINGLE}:{t}" for t in bench.tasks] if train_baselines else []
    plan += methods
    results: dict[str, list[RunResult]] = {}
    started = time.perf_counter()
    # Away from a terminal, a line per finished run says how far the whole comparison is.
    lines = place.main and not draws_bars()
    runs, done = len(plan) * len(config.seeds), 0
    for method in progress(plan, desc="strategies", disable=not place.main):
        for seed in config.seeds:
            began = time.perf_counter()
            result = run_one(config, bench, method, seed, group, place)
            results.setdefault(method, []).append(result)
            done += 1
            if lines:
                elapsed = time.perf_counter() - started
                status = "ok" if result.error is None else "failed"
                print(
                    f"[compare] run {done}/{runs} done: {method} seed {seed} ({status}, "
                    f"{duration(time.perf_counter() - began)}) | {duration(elapsed)} elapsed, "
                    f"ETA {duration(elapsed / done * (runs - done))}",
                    file=sys.stderr,
                    flush=True,
                )
    if not place.main:
        return []
    timing = {}
    if config.timing_steps and place.world == 1:
        print(
            f"[compare] timing {len(plan)} methods side by side, {config.timing_steps} steps each",
            file=sys.stderr,
            flush=True,
        )
        timing = time_steps(config, bench, plan)
    elapsed = time.perf_counter() - started

    numeric, formatted, against = summarise(
        bench, results, config.grad_source, timing, trained_baselines=train_baselines
    )
    single, _ = delta_m_baseline(bench, results, train_baselines)
    write_table(numeric, out, "results")
    seeds = sorted({row["seeds"] for row in numeric})
    note = (
        f"Δm % against {against}. Rows sorted by Δm % (best first). Values: mean ± sample "
        "standard deviation over the seeds (the `seeds` column); with one seed, the value alone."
    )
    if seeds == [1]:
        note += " One seed ran here: no spread is known."
    (out / "results.md").write_text(markdown_table(formatted) + f"\n\n{note}\n")
    print(markdown_table(formatted))
    print(note)
    print(
        f"[compare] {elapsed:.0f} s for {sum(map(len, results.values()))} runs; "
        f"tables and figures in {out}/",
        flush=True,
    )

    figures = draw_figures(numeric, bench, single, results, out)

    tracker = start_tracking(config, group=group, name="comparison", job_type="summary")
    for name, figure in figures.items():
        tracker.image(f"figures/{name}", figure)
    summary: dict[str, Any] = {"delta_m_against": against}
    for row in numeric:
        for key in ("delta_m_mean", "step_ms", *(f"{m}_mean" for m in bench.metrics)):
            summary[f"{row['method']}/{key}"] = row[key]
    tracker.summary(summary)
    tracker.finish()
    if figures:
        import matplotlib.pyplot as plt

        plt.close("all")
    return numeric


if __name__ == "__main__":
    main()
