"""Sener & Koltun (NeurIPS 2018, arXiv:1810.04650), Table 3: what the MultiMNIST reproduction and
its Multi-Digits emulation share: the published accuracies, the ordering claims, the training of
every method on a two-task ``left``/``right`` benchmark, and the figure."""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from experiments.benchmarks import Benchmark
from experiments.reproductions.common import (
    Check,
    ReproduceConfig,
    available,
    figure_row,
    tracking_group,
    training_length,
    unmeasured,
)
from experiments.runner import start_tracking
from experiments.training import SINGLE, BenchmarkConfig, load_benchmark, train_run

TABLE3 = {  # test accuracy (%) left / right, MultiMNIST, Sener & Koltun 2018, Table 3
    SINGLE: (97.23, 95.90),
    "equal": (96.46, 94.99),
    "uncertainty": (96.47, 95.29),
    "gradnorm": (96.27, 94.84),
    "mgda": (97.26, 95.90),
}
TASKS = ("left", "right")
BASELINES = ("equal", "uncertainty", "gradnorm")
METHODS = (f"{SINGLE}:left", f"{SINGLE}:right", *BASELINES, "mgda")
BASELINE_SPREAD_PP = 1.0  # "close to each other": mean accuracies within 1 percentage point
MGDA_CLOSE_PP = 0.5  # "MGDA-UB close to single-task": within 0.5 percentage point
ORDERING = (
    "the ordering claims of Table 3 as checks, on the mean over seeds of the two tasks' "
    f"accuracy: baselines within {BASELINE_SPREAD_PP} pp of each other and below single-task; "
    f"MGDA-UB within {MGDA_CLOSE_PP} pp of single-task and above the baselines"
)
UNCERTAINTY_NOTE = (
    "Uncertainty weighting runs with the strategy's default regression form for both "
    "classification tasks (the paper's classification form is e^(−s)L + ½s; "
    "task_types='classification' would select it)."
)


def ordering_checks(average: Mapping[str, float]) -> list[Check]:
    """The four ordering claims of Table 3 on ``average``: per method, the mean over seeds of
    the two tasks' accuracy in %."""
    have_baselines = all(m in average for m in BASELINES)
    checks = []

    claim = (
        "equal, uncertainty and GradNorm close to each other (mean accuracy spread "
        f"≤ {BASELINE_SPREAD_PP} pp; published 0.32 pp)"
    )
    if have_baselines:
        spread = max(average[m] for m in BASELINES) - min(average[m] for m in BASELINES)
        checks.append(Check(claim, round(spread, 3), spread <= BASELINE_SPREAD_PP))
    else:
        checks.append(unmeasured(claim))

    claim = (
        "equal, uncertainty and GradNorm below single-task (mean accuracy; published −0.69 to "
        "−1.01 pp)"
    )
    if have_baselines and SINGLE in average:
        below = {m: round(average[m] - average[SINGLE], 3) for m in BASELINES}
        checks.append(Check(claim, below, all(v < 0 for v in below.values())))
    else:
        checks.append(unmeasured(claim))

    claim = f"MGDA-UB close to single-task (within {MGDA_CLOSE_PP} pp; published +0.02 pp)"
    if "mgda" in average and SINGLE in average:
        gap = average["mgda"] - average[SINGLE]
        checks.append(Check(claim, round(gap, 3), abs(gap) <= MGDA_CLOSE_PP))
    else:
        checks.append(unmeasured(claim))

    claim = "MGDA-UB above equal, uncertainty and GradNorm (published +0.70 to +1.02 pp)"
    if "mgda" in average and have_baselines:
        margin = {m: round(average["mgda"] - average[m], 3) for m in BASELINES}
        checks.append(Check(claim, margin, all(v > 0 for v in margin.values())))
    else:
        checks.append(unmeasured(claim))
    return checks


def settings(config: ReproduceConfig, benchmark: str, steps: int) -> BenchmarkConfig:
    """The training settings: the benchmark's recipe, three seeds (one with ``--quick``)."""
    return BenchmarkConfig(
        out=config.out,
        wandb_mode=config.wandb_mode,
        wandb_project=config.wandb_project,
        benchmark=benchmark,
        data_dir=config.data_dir,
        option=config.option,
        device=config.device,
        amp=config.amp,
        steps=steps or None,
        eval_batches=2 if config.quick else None,
        grad_source="features",  # MGDA-UB: MGDA on the gradients w.r.t. the shared features
        diagnostics_every=0,
    )


def seeds(config: ReproduceConfig) -> list[int]:
    return [config.seed] if config.quick else [config.seed, config.seed + 1, config.seed + 2]


def train(
    config: ReproduceConfig, name: str, bench: Benchmark, run_settings: BenchmarkConfig
) -> tuple[dict[str, list[dict[str, float]]], list[str], float]:
    """Test accuracies (%) per method, one dict per seed (the two single-task networks merged
    per seed), the methods that could not run, and the seconds it took."""
    if set(bench.tasks) != set(TASKS) or any(f"{t}/acc" not in bench.metrics for t in TASKS):
        raise ValueError(
            f"Table 3 needs a benchmark with tasks {TASKS} and metrics left/acc, right/acc; "
            f"{bench.name} has tasks {bench.tasks}"
        )
    accuracy: dict[str, list[dict[str, float]]] = {}
    missing = []
    group = tracking_group(config, name)
    started = time.perf_counter()
    for method in METHODS:
        if ":" not in method and not available(method):
            missing.append(f"{method}: strategy not available")
            continue
        for seed in seeds(config):
            tracker = start_tracking(config, group=group, name=f"{name}/{method}-s{seed}")
            result, _ = train_run(run_settings, bench, method, seed, tracker)
            tracker.summary({f"final/{k}": v for k, v in result.metrics.items()})
            tracker.finish()
            values = {k.removesuffix("/acc"): 100 * v for k, v in result.metrics.items()}
            accuracy.setdefault(method.split(":")[0], []).append(values)
    if SINGLE in accuracy:  # one network per task: merge the two into one pair per seed
        runs, count = accuracy[SINGLE], len(seeds(config))
        accuracy[SINGLE] = [{**a, **b} for a, b in zip(runs[:count], runs[count:])]
    return accuracy, missing, time.perf_counter() - started


def measure(accuracy: Mapping[str, list[dict[str, float]]], used: list[int]) -> dict[str, Any]:
    """Mean and std over seeds per method and task, and the mean of the two tasks."""

    def over_seeds(statistic: Any) -> dict[str, dict[str, float]]:
        return {
            method: {t: float(statistic([r[t] for r in runs])) for t in TASKS}
            for method, runs in accuracy.items()
        }

    means = over_seeds(np.mean)
    return {
        "accuracy_percent_mean": means,
        "accuracy_percent_std": over_seeds(np.std),
        "mean_of_tasks": {m: (v["left"] + v["right"]) / 2 for m, v in means.items()},
        "seeds": used,
    }


@dataclass
class Table3Run:
    """What a Table 3 reproduction measured, and how."""

    bench: Benchmark
    settings: BenchmarkConfig
    steps: int  # 0: the recipe's epochs
    measured: dict[str, Any]
    missing: list[str]
    seconds: float
    deviations: list[str]

    def training(self) -> str:
        """The training settings in words."""
        recipe = self.bench.recipe
        text = f"{recipe.optimizer} lr {recipe.lr}, batch {recipe.batch_size}, {recipe.epochs} "
        text += f"epochs ({recipe.source})"
        return text + (f", {self.steps} steps" if self.steps else "")


def run_methods(config: ReproduceConfig, name: str) -> Table3Run:
    """Train every method of Table 3 on the benchmark ``name`` (or ``--benchmark``, recorded as
    a deviation) for every seed, and measure the accuracies."""
    steps, deviations = training_length(config, 0, quick=30)
    run_settings = settings(config, config.benchmark or name, steps)
    bench = load_benchmark(run_settings)
    if bench.name != name:
        deviations.append(f"DEVIATION: benchmark {bench.name} instead of {name}")
    accuracy, missing, seconds = train(config, name, bench, run_settings)
    measured = measure(accuracy, seeds(config)) | {"seconds": seconds}
    return Table3Run(bench, run_settings, steps, measured, missing, seconds, deviations)


def figure(measured: Mapping[str, Any], title: str) -> Any:
    """Accuracy per method and task (mean ± std over seeds), the published values as ticks."""
    means, stds = measured["accuracy_percent_mean"], measured["accuracy_percent_std"]
    fig, (ax,) = figure_row(1, 6.0)
    labels = list(means)
    positions = np.arange(len(labels))
    for offset, task in ((-0.2, "left"), (0.2, "right")):
        ax.bar(
            positions + offset,
            [means[m][task] for m in labels],
            width=0.4,
            yerr=[stds[m][task] for m in labels],
            label=task,
        )
        published = [TABLE3[m][TASKS.index(task)] if m in TABLE3 else np.nan for m in labels]
        ax.scatter(positions + offset, published, marker="_", color="k", s=120, zorder=3)
    ax.set_xticks(positions, labels, rotation=20)
    low = min(min(v.values()) for v in means.values()) if means else 0
    ax.set_ylim(max(low - 5, 0), 100)
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"{title} (black ticks: Sener & Koltun's Table 3)", fontsize=9)
    ax.legend(fontsize=7)
    return fig
