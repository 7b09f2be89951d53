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
run with the figures and the table's numbers. ``<out>`` gets ``results.csv``, ``results.md``,
``metrics.png``, ``weights.png`` and ``tradeoff.png`` (Δm against step time).

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

import taskbalance as tb
from experiments.benchmarks import Benchmark
from experiments.runner import (
    batch_indices,
    markdown_table,
    parse_config,
    progress,
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

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}")
        if self.timing_steps < 0:
            raise ValueError(f"timing_steps must be >= 0, got {self.timing_steps}")
        if not self.seeds:
            raise ValueError("seeds must name at least one seed")


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


def summarise(
    bench: Benchmark,
    results: dict[str, list[RunResult]],
    grad_source: str,
    timing: dict[str, float] | None = None,
    *,
    trained_baselines: bool = True,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], str]:
    """(numeric rows for the CSV, formatted rows for Markdown and the console, what Δm% is
    measured against).

    Δm% is measured against :func:`delta_m_baseline`.
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
    numeric.sort(key=lambda r: r["method"] != SINGLE)  # the baseline first, the rest in order

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


def metrics_figure(
    numeric: Sequence[dict[str, Any]], bench: Benchmark, single: Mapping[str, float]
) -> Any:
    """One panel per metric (the first nine): horizontal bars, mean ± std over seeds, methods
    sorted by Δm; ``single`` (the values Δm is measured against) dashed."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    metrics = list(bench.metrics)[:MAX_METRIC_PANELS]
    rows = [r for r in numeric if r["method"] != SINGLE]
    rows.sort(key=lambda r: r["delta_m_mean"] if not math.isnan(r["delta_m_mean"]) else -1e9)
    columns = min(3, len(metrics))
    lines = math.ceil(len(metrics) / columns)
    figure, axes = plt.subplots(
        lines,
        columns,
        figsize=(3.4 * columns, 0.6 + (0.8 + 0.2 * max(len(rows), 1)) * lines),
        dpi=90,
        squeeze=False,
        sharey=True,
    )
    for axis, metric in zip(axes.flat, metrics):
        scale = 100.0 if bench.metrics[metric].unit == "fraction" else 1.0
        means = [scale * r[f"{metric}_mean"] for r in rows]
        axis.barh(
            range(len(rows)),
            means,
            xerr=[scale * r[f"{metric}_std"] for r in rows],
            color="tab:blue",
            error_kw={"elinewidth": 0.8},
        )
        shown = [m for m in means if not math.isnan(m)]
        if metric in single:
            axis.axvline(scale * single[metric], color="k", linestyle="--", lw=1)
            shown.append(scale * single[metric])
        if shown:
            low, high = min(shown), max(shown)
            pad = max(0.1 * (high - low), abs(high) * 0.01, 1e-9)
            axis.set_xlim(low - pad, high + pad)
        arrow = "↑" if bench.metrics[metric].higher_is_better else "↓"
        axis.set_title(f"{metric}{' %' if scale == 100 else ''} ({arrow})", fontsize=8)
        axis.xaxis.set_major_locator(MaxNLocator(4))
        axis.tick_params(labelsize=6)
    for axis in list(axes.flat)[len(metrics) :]:
        axis.axis("off")
    axes[0][0].set_yticks(range(len(rows)), [r["method"] for r in rows])
    figure.suptitle(
        f"{bench.name}: test metrics (mean ± std over seeds, sorted by Δm); dashed: what Δm is "
        "measured against",
        fontsize=9,
    )
    figure.tight_layout()
    return figure


def weights_figure(results: dict[str, list[RunResult]], tasks: Sequence[str]) -> Any:
    """Task weights over the training steps of each strategy's first seed, one panel each."""
    import matplotlib.pyplot as plt

    runs = [runs[0] for method, runs in results.items() if ":" not in method and runs[0].weights]
    columns = min(5, max(len(runs), 1))
    lines = max(1, math.ceil(len(runs) / columns))
    figure, axes = plt.subplots(
        lines,
        columns,
        figsize=(2.1 * columns, 1.5 * lines + 0.4),
        dpi=80,
        squeeze=False,
        sharex=True,
    )
    for axis, run in zip(axes.flat, runs):
        history = torch.tensor(run.weights)
        for k, task in enumerate(tasks):
            axis.plot(history[:, k].numpy(), linewidth=0.8, label=task)
        axis.set_title(run.method, fontsize=8)
        axis.tick_params(labelsize=6)
    for axis in list(axes.flat)[len(runs) :]:
        axis.axis("off")
    if runs and len(tasks) <= 10:
        axes.flat[0].legend(fontsize=6)
    figure.suptitle(
        f"task weights over training steps (seed {runs[0].seed if runs else 0})", fontsize=9
    )
    figure.tight_layout()
    return figure


def tradeoff_figure(numeric: Sequence[dict[str, Any]], bench: Benchmark) -> Any:
    """Δm% (mean ± std over seeds) against the side-by-side step time, one point per method."""
    import matplotlib.pyplot as plt

    rows = [
        r
        for r in numeric
        if r["method"] != SINGLE and not math.isnan(r["delta_m_mean"] + r["step_ms"])
    ]
    figure, axis = plt.subplots(figsize=(6.5, 4.2), dpi=90)
    for row in rows:
        gradient = row["kind"] == "gradient"
        axis.errorbar(
            row["step_ms"],
            row["delta_m_mean"],
            yerr=row["delta_m_std"],
            fmt="s" if gradient else "o",
            color="tab:red" if gradient else "tab:blue",
            markersize=4,
            elinewidth=0.6,
        )
        axis.annotate(
            row["method"], (row["step_ms"], row["delta_m_mean"]), fontsize=6,
            xytext=(3, 2), textcoords="offset points",
        )  # fmt: skip
    axis.axhline(0, color="gray", linewidth=0.8, linestyle="--")
    axis.set_xlabel("ms per training step (measured side by side)")
    axis.set_ylabel("Δm % vs single-task (higher is better)")
    axis.set_title(f"{bench.name}: benefit vs cost (circles: loss-level, squares: gradient-level)")
    axis.title.set_fontsize(9)
    figure.tight_layout()
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


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Run the comparison; return the numeric table rows (also written to ``--out``; rank 0)."""
    config = resolve(parse_config(CompareConfig, argv))
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
    for method in progress(plan, desc="strategies", disable=not place.main):
        for seed in config.seeds:
            result = run_one(config, bench, method, seed, group, place)
            results.setdefault(method, []).append(result)
    if not place.main:
        return []
    timing = {}
    if config.timing_steps and place.world == 1:
        timing = time_steps(config, bench, plan)
    elapsed = time.perf_counter() - started

    numeric, formatted, against = summarise(
        bench, results, config.grad_source, timing, trained_baselines=train_baselines
    )
    single, _ = delta_m_baseline(bench, results, train_baselines)
    write_table(numeric, out, "results")
    note = f"Δm % against {against}."
    (out / "results.md").write_text(markdown_table(formatted) + f"\n\n{note}\n")
    print(markdown_table(formatted))
    print(note)
    print(
        f"[compare] {elapsed:.0f} s for {sum(map(len, results.values()))} runs; "
        f"tables and figures in {out}/",
        flush=True,
    )

    figures = {}
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        figures = {
            "metrics": metrics_figure(numeric, bench, single),
            "weights": weights_figure(results, bench.tasks),
            "tradeoff": tradeoff_figure(numeric, bench),
        }
        for name, figure in figures.items():
            figure.savefig(out / f"{name}.png")
    except ImportError as error:
        print(f"[compare] no figures: {error}", file=sys.stderr)

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
        plt.close("all")
    return numeric


if __name__ == "__main__":
    main()
