"""Compare multi-task strategies on Multi-Digits: accuracy per task, Δm%, step time.

    python -m experiments.compare                 # every registered strategy, 3 seeds
    python -m experiments.compare --quick         # a smoke run: few steps, 1 seed (< 1 minute)
    python -m experiments.compare --strategies equal "grad*" mgda --seeds 0 1

For each strategy and seed it trains :class:`~experiments.models.MultiDigitsNet` (LeNet-style
trunk, two heads) on Multi-Digits (:mod:`experiments.data`) with Adam, then reports the test
accuracy of each task, mean ± std over the seeds, and

* Δm% (Maninis, Radosavovic & Kokkinos, "Attentive Single-Tasking of Multiple Tasks", CVPR
  2019): ``Δm = 1/T Σ_t (−1)^{l_t} (M_t − M_single,t) / M_single,t · 100``, with ``l_t = 1`` if
  lower is better (here accuracy: higher is better, so ``l_t = 0``). The single-task baselines
  (one network per task, same trunk, head, optimizer, steps and seeds) are trained by this
  script. Δm is computed per seed against the single-task accuracy averaged over the seeds,
  then reported as mean ± std; positive means better than single-task;
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
weights), ``grad/...`` diagnostics and, at epoch ends, ``val/acc/<task>`` and
``val/loss/<task>``; a summary per run (with the final ``failures`` count: 0 when the strategy
reports none; the table sums it over seeds); and one ``comparison`` run with the figures and the
table's numbers.
``<out>`` gets ``results.csv``, ``results.md``, ``accuracy.png``, ``weights.png`` and
``tradeoff.png`` (Δm against step time).

A strategy that raises is reported in the table as failed, with its error; the others go on.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import sys
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

import taskbalance as tb
from experiments.data import MultiDigits, make_multi_digits
from experiments.models import MultiDigitsNet
from experiments.runner import (
    RunConfig,
    Tracker,
    batch_indices,
    load_checkpoint,
    markdown_table,
    parse_config,
    progress,
    report_row,
    save_checkpoint,
    seed_everything,
    select_strategies,
    start_tracking,
    write_table,
)
from taskbalance.diagnostics import gradient_diagnostics
from taskbalance.jacobian import jacobian
from taskbalance.registry import strategy_info

QUICK_STEPS = 50
SINGLE = "single-task"
# Strategies that average each task's gradient over steps (MoCo's tracked gradients, DB-MTL's
# EMA): the entries of a gradient w.r.t. the features belong to other examples in every batch,
# so an average over steps means nothing there. They always use the trunk's parameters.
PARAMETER_GRADIENTS = frozenset({"moco", "db_mtl"})


def gradient_source(method: str, grad_source: str) -> str | None:
    """What ``method`` differentiates: None (loss-level), "features" or "shared_params"."""
    if method.startswith(f"{SINGLE}:") or not strategy_info(method).needs_grads:
        return None
    return "shared_params" if method in PARAMETER_GRADIENTS else grad_source


@dataclass
class CompareConfig(RunConfig):
    """Compare multi-task strategies on Multi-Digits (accuracy, Δm% vs single-task, step time)."""

    out: str = field(default="results/compare", metadata={"help": "directory for the results"})
    strategies: list[str] = field(
        default_factory=lambda: ["*"], metadata={"help": "names or fnmatch patterns"}
    )
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2], metadata={"help": "train seeds"})
    quick: bool = field(
        default=False, metadata={"help": f"smoke run: {QUICK_STEPS} steps, first seed only"}
    )
    epochs: int = field(default=6, metadata={"help": "training epochs per run"})
    steps: int | None = field(default=None, metadata={"help": "training steps (overrides epochs)"})
    batch_size: int = 64
    lr: float = field(default=2e-3, metadata={"help": "Adam learning rate of the model"})
    grad_source: Literal["features", "shared_params"] = field(
        default="features", metadata={"help": "what gradient-level strategies differentiate"}
    )
    diagnostics_every: int = field(
        default=25, metadata={"help": "steps between grad/cos diagnostics (0: never)"}
    )
    baselines: bool = field(default=True, metadata={"help": "train the single-task baselines"})
    timing_steps: int = field(
        default=100, metadata={"help": "steps per method of the side-by-side timing (0: none)"}
    )
    pairs_per_image: int = field(default=4, metadata={"help": "Multi-Digits pairs per train image"})
    test_pairs_per_image: int = field(
        default=4, metadata={"help": "Multi-Digits pairs per test image"}
    )
    data_seed: int = field(default=0, metadata={"help": "seed of the Multi-Digits split/pairs"})
    threads: int = field(default=1, metadata={"help": "torch CPU threads (1: stable timings)"})
    device: str = "cpu"
    checkpoint_dir: str | None = field(
        default=None, metadata={"help": "save a checkpoint per run each epoch here"}
    )
    resume: bool = field(default=False, metadata={"help": "continue runs from checkpoint_dir"})

    def __post_init__(self) -> None:
        positive = ("epochs", "batch_size", "pairs_per_image", "test_pairs_per_image", "threads")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.timing_steps < 0:
            raise ValueError(f"timing_steps must be >= 0, got {self.timing_steps}")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if not self.seeds:
            raise ValueError("seeds must name at least one seed")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a positive number, got {self.lr}")
        if self.resume and self.checkpoint_dir is None:
            raise ValueError("resume needs checkpoint_dir")


@dataclass
class RunResult:
    """One training run: final test metrics, per-step timings and logged histories."""

    method: str
    seed: int
    accuracy: dict[str, float] = field(default_factory=dict)
    step_seconds: list[float] = field(default_factory=list)
    weights: list[list[float]] = field(default_factory=list)
    cosine: list[tuple[int, float]] = field(default_factory=list)
    error: str | None = None
    steps_done: int = 0
    failures: int = 0  # the strategy's count of failed steps (solver fallbacks), if it reports one


# --------------------------------------------------------------------------- training
def evaluate(model: MultiDigitsNet, images: Tensor, labels: dict[str, Tensor]) -> dict[str, float]:
    """``val/acc/<task>`` and ``val/loss/<task>`` on the held-out split (one host transfer)."""
    model.eval()
    with torch.no_grad():
        _, logits = model(images)
        values = []
        for task in model.tasks:
            values.append((logits[task].argmax(1) == labels[task]).float().mean())
            values.append(F.cross_entropy(logits[task], labels[task]))
        flat = torch.stack(values).tolist()
    model.train()
    out = {}
    for k, task in enumerate(model.tasks):
        out[f"val/acc/{task}"] = flat[2 * k]
        out[f"val/loss/{task}"] = flat[2 * k + 1]
    return out


def total_steps(config: CompareConfig, data: MultiDigits) -> tuple[int, int]:
    """(steps of the run, steps per epoch)."""
    per_epoch = len(data.train_images) // config.batch_size
    if config.steps is not None:
        return config.steps, per_epoch
    return config.epochs * per_epoch, per_epoch


@dataclass
class Setup:
    """A model, its optimizer and (unless single-task) a strategy, ready to train."""

    method: str
    tasks: tuple[str, ...]
    model: MultiDigitsNet
    optimizer: torch.optim.Optimizer
    strategy: tb.Strategy | None
    source: str | None  # None, "features" or "shared_params"

    @classmethod
    def build(cls, config: CompareConfig, method: str, tasks: Sequence[str]) -> Setup:
        """``method`` is a strategy name or ``"single-task:<task>"`` (one network, one head)."""
        single = method.startswith(f"{SINGLE}:")
        tasks = (method.split(":", 1)[1],) if single else tuple(tasks)
        model = MultiDigitsNet(tasks).to(config.device)
        optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, foreach=True)
        strategy = None if single else tb.create_strategy(method, tasks).to(config.device)
        source = gradient_source(method, config.grad_source)
        return cls(method, tasks, model, optimizer, strategy, source)

    def forward(
        self, inputs: Tensor, targets: dict[str, Tensor]
    ) -> tuple[Tensor, dict[str, Tensor]]:
        features, logits = self.model(inputs)
        return features, {t: F.cross_entropy(logits[t], targets[t]) for t in self.tasks}

    def update(self, features: Tensor, losses: dict[str, Tensor]) -> tb.StepReport | None:
        """Backward with the strategy (plain backward for single-task) and the optimizer step."""
        self.optimizer.zero_grad(set_to_none=True)
        if self.strategy is None:
            losses[self.tasks[0]].backward()
            report = None
        elif self.source is None:
            report = self.strategy.backward(losses)
        elif self.source == "features":
            report = self.strategy.backward(losses, features=features)
        else:
            report = self.strategy.backward(losses, shared_params=self.model.shared_parameters())
        self.optimizer.step()
        return report


def train_run(
    config: CompareConfig,
    data: MultiDigits,
    method: str,
    seed: int,
    tracker: Tracker,
    *,
    checkpoint: Path | None = None,
    stop_after: int | None = None,
) -> tuple[RunResult, MultiDigitsNet]:
    """Train one model with strategy ``method`` (or ``"single-task:<task>"``) and seed ``seed``.

    With ``checkpoint``, state is saved there at every epoch end (and at ``stop_after``); with
    ``config.resume`` and an existing file, the run continues from it exactly. ``stop_after``
    ends the run early after that many steps (for tests of resuming).
    """
    seed_everything(seed)
    setup = Setup.build(config, method, data.tasks)
    model, optimizer, strategy, tasks = setup.model, setup.optimizer, setup.strategy, setup.tasks
    end_epoch = getattr(strategy, "end_epoch", None)
    result = RunResult(method, seed)

    steps, per_epoch = total_steps(config, data)
    start = 0
    if checkpoint is not None and config.resume and checkpoint.exists():
        state = load_checkpoint(checkpoint, model=model, optimizer=optimizer, strategy=strategy)
        start = state.step
        result.step_seconds = list(state.extra.get("step_seconds", []))
        result.weights = [list(w) for w in state.extra.get("weights", [])]
        result.cosine = [(int(s), float(c)) for s, c in state.extra.get("cosine", [])]
        result.failures = int(state.extra.get("failures", 0))
    last = steps if stop_after is None else min(steps, stop_after)
    images, labels = data.train_images, data.train_labels
    pair = f"{tasks[0]}-{tasks[1]}" if len(tasks) == 2 else None
    shared = model.shared_parameters()

    def save(step: int) -> None:
        if checkpoint is None:
            return
        extra = {"step_seconds": result.step_seconds, "weights": result.weights}
        extra["cosine"] = [list(c) for c in result.cosine]
        extra["failures"] = result.failures
        save_checkpoint(
            checkpoint,
            config=config,
            step=step,
            model=model,
            optimizer=optimizer,
            strategy=strategy,
            extra=extra,
        )

    bar = progress(range(start, last), desc=f"{method} s{seed}", total=last - start)
    for step in bar:
        index = batch_indices(len(images), config.batch_size, seed=seed, step=step)
        index = index.to(images.device)
        inputs, targets = images[index], {t: labels[t][index] for t in tasks}

        began = time.perf_counter()
        features, losses = setup.forward(inputs, targets)
        forward_seconds = time.perf_counter() - began

        record: dict[str, float] = {}
        if config.diagnostics_every and step % config.diagnostics_every == 0 and len(tasks) > 1:
            # On the trunk's parameters, outside the timed part; the graph is kept for the step.
            rows = jacobian(torch.stack([losses[t] for t in tasks]), shared, retain_graph=True)
            record.update(gradient_diagnostics(rows, tasks))
            if pair is not None:
                result.cosine.append((step, record[f"grad/cos/{pair}"]))

        began = time.perf_counter()
        report = setup.update(features, losses)
        result.step_seconds.append(forward_seconds + time.perf_counter() - began)

        if report is None:
            record[f"train/loss/{tasks[0]}"] = losses[tasks[0]].item()
        else:
            values = report.to_dict()  # one host transfer
            record.update(report_row(values))
            result.weights.append([values[f"weight/{t}"] for t in tasks])
            result.failures = int(values.get("failures", result.failures))
        if (step + 1) % per_epoch == 0 or step + 1 == steps:
            if end_epoch is not None and (step + 1) % per_epoch == 0:
                end_epoch()
            record.update(evaluate(model, data.test_images, data.test_labels))
            record["epoch"] = (step + 1) / per_epoch
            if (step + 1) % per_epoch == 0:
                save(step + 1)
        tracker.log(record, step=step)
    result.steps_done = last
    if stop_after is not None and last < steps:
        save(last)
    final = evaluate(model, data.test_images, data.test_labels)
    result.accuracy = {t: final[f"val/acc/{t}"] for t in tasks}
    return result, model


def time_steps(
    config: CompareConfig, data: MultiDigits, methods: Sequence[str]
) -> dict[str, float]:
    """ms per training step (forward, strategy backward, optimizer step) of each method, measured
    side by side: ``timing_steps`` rounds, each taking one step of every method, in a shuffled
    order, on the same batch, so that a change of machine load hits every method alike.

    The statistic is the lower quartile of the per-step times after 5 warm-up rounds: on a
    shared machine other processes only ever add time to a step (the reason ``timeit`` reports
    a minimum), and a quartile still reflects steps whose cost varies (iterative solvers). A
    method that fails gets NaN (its runs report the error).
    """
    images, labels = data.train_images, data.train_labels
    setups: dict[str, Setup] = {}
    for method in methods:
        try:
            seed_everything(0)
            setups[method] = Setup.build(config, method, data.tasks)
        except Exception:
            continue
    seconds: dict[str, list[float]] = {m: [] for m in setups}
    shuffle = torch.Generator().manual_seed(0)
    for step in range(config.timing_steps):
        index = batch_indices(len(images), config.batch_size, seed=0, step=step)
        index = index.to(images.device)
        names = list(setups)
        for position in torch.randperm(len(names), generator=shuffle).tolist():
            method = names[position]
            setup = setups[method]
            inputs, targets = images[index], {t: labels[t][index] for t in setup.tasks}
            try:
                began = time.perf_counter()
                features, losses = setup.forward(inputs, targets)
                setup.update(features, losses)
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
    config: CompareConfig, data: MultiDigits, method: str, seed: int, group: str
) -> RunResult:
    """One tracked run; an exception becomes a failed result (the comparison goes on)."""
    tracker = start_tracking(
        config,
        group=group,
        name=f"{method}-s{seed}",
        job_type="baseline" if ":" in method else "mtl",
    )
    checkpoint = None
    if config.checkpoint_dir is not None:
        checkpoint = Path(config.checkpoint_dir) / f"{method.replace(':', '-')}-s{seed}.pt"
    try:
        result, _ = train_run(config, data, method, seed, tracker, checkpoint=checkpoint)
    except Exception as error:
        message = f"{type(error).__name__}: {error}".splitlines()[0][:200]
        print(f"[compare] {method} seed {seed} failed: {message}", file=sys.stderr)
        traceback.print_exc(limit=3, file=sys.stderr)
        result = RunResult(method, seed, error=message)
        tracker.summary({"status": "failed", "error": message})
        tracker.finish()
        return result
    summary: dict[str, Any] = {f"final/acc/{t}": a for t, a in result.accuracy.items()}
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


def _pm(mean: float, std: float, scale: float = 1.0, digits: int = 2) -> str:
    if math.isnan(mean):
        return "–"
    return f"{mean * scale:.{digits}f} ± {std * scale:.{digits}f}"


def delta_m(accuracy: dict[str, float], single: dict[str, float]) -> float:
    """Δm% of Maninis et al. (2019) for higher-is-better metrics.

    >>> round(delta_m({"a": 0.9, "b": 0.8}, {"a": 1.0, "b": 0.8}), 6)
    -5.0
    """
    terms = [(accuracy[t] - single[t]) / single[t] * 100 for t in single]
    return statistics.fmean(terms)


def summarise(
    results: dict[str, list[RunResult]],
    tasks: Sequence[str],
    grad_source: str,
    timing: dict[str, float] | None = None,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(numeric rows for the CSV, formatted rows for Markdown and the console).

    ``step_ms`` is the side-by-side timing of :func:`time_steps` when given (NaN without it);
    ``train_step_ms`` the median step time during the training runs (exposed to load changes).
    """
    timing = timing or {}
    single_runs = {t: results.get(f"{SINGLE}:{t}", []) for t in tasks}
    single_mean: dict[str, float] = {}
    for task, runs in single_runs.items():
        accs = [r.accuracy[task] for r in runs if r.error is None]
        if accs:
            single_mean[task] = statistics.fmean(accs)
    have_single = len(single_mean) == len(tasks)
    equal_ms = timing.get("equal", math.nan)

    numeric: list[dict[str, Any]] = []
    if have_single:
        row: dict[str, Any] = {"method": SINGLE, "kind": "baseline", "grads": "–"}
        for task in tasks:
            accs = [r.accuracy[task] for r in single_runs[task] if r.error is None]
            row[f"{task}_acc_mean"], row[f"{task}_acc_std"] = _mean_std(accs)
        row["delta_m_mean"], row["delta_m_std"] = 0.0, 0.0
        # The cost of getting both tasks: one step of each network.
        row["step_ms"] = sum(timing.get(f"{SINGLE}:{t}", math.nan) for t in tasks)
        row["train_step_ms"] = sum(
            median_ms([s for r in single_runs[t] for s in r.step_seconds]) for t in tasks
        )
        row.update(seeds=len(single_runs[tasks[0]]), failures=0, status="ok", error="")
        numeric.append(row)
    for method, runs in results.items():
        if method.startswith(f"{SINGLE}:"):
            continue
        info = strategy_info(method)
        ok = [r for r in runs if r.error is None]
        row = {
            "method": method,
            "kind": "gradient"
            if isinstance(info.cls, type) and issubclass(info.cls, tb.GradientAggregation)
            else "loss",
            "grads": gradient_source(method, grad_source) or "–",
        }
        for task in tasks:
            row[f"{task}_acc_mean"], row[f"{task}_acc_std"] = _mean_std(
                [r.accuracy[task] for r in ok]
            )
        deltas = [delta_m(r.accuracy, single_mean) for r in ok] if have_single else []
        row["delta_m_mean"], row["delta_m_std"] = _mean_std(deltas)
        row["step_ms"] = timing.get(method, math.nan)
        row["train_step_ms"] = (
            median_ms([s for r in ok for s in r.step_seconds]) if ok else math.nan
        )
        failed = [r for r in runs if r.error is not None]
        row["seeds"] = len(ok)
        row["failures"] = sum(r.failures for r in ok)
        row["status"] = "ok" if not failed else f"failed {len(failed)}/{len(runs)}"
        row["error"] = failed[0].error if failed else ""
        numeric.append(row)

    formatted = []
    for row in numeric:
        shown = {"method": row["method"], "kind": row["kind"], "grads via": row["grads"]}
        for task in tasks:
            shown[f"{task} acc %"] = _pm(row[f"{task}_acc_mean"], row[f"{task}_acc_std"], 100)
        shown["Δm % (↑)"] = (
            _pm(row["delta_m_mean"], row["delta_m_std"]) if have_single else "no baseline"
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
    return numeric, formatted


# --------------------------------------------------------------------------- figures
def accuracy_figure(numeric: Sequence[dict[str, Any]], tasks: Sequence[str]) -> Any:
    """Horizontal bars: test accuracy per task (mean ± std over seeds), single-task dashed."""
    import matplotlib.pyplot as plt

    rows = [
        r for r in numeric if r["method"] != SINGLE and not math.isnan(r[f"{tasks[0]}_acc_mean"])
    ]
    rows.sort(key=lambda r: r["delta_m_mean"] if not math.isnan(r["delta_m_mean"]) else -1e9)
    height = 0.8 / len(tasks)
    figure, axis = plt.subplots(figsize=(6.5, 1.2 + 0.32 * max(len(rows), 1)), dpi=90)
    colors = ["tab:blue", "tab:orange", "tab:green", "tab:red"]
    for k, task in enumerate(tasks):
        positions = [i + (k - (len(tasks) - 1) / 2) * height for i in range(len(rows))]
        axis.barh(
            positions,
            [100 * r[f"{task}_acc_mean"] for r in rows],
            height=height,
            xerr=[100 * r[f"{task}_acc_std"] for r in rows],
            color=colors[k % len(colors)],
            label=task,
            error_kw={"elinewidth": 0.8},
        )
        single = [r for r in numeric if r["method"] == SINGLE]
        if single:
            axis.axvline(
                100 * single[0][f"{task}_acc_mean"],
                color=colors[k % len(colors)],
                linestyle="--",
                linewidth=1,
                label=f"single-task {task}",
            )
    axis.set_yticks(range(len(rows)), [r["method"] for r in rows])
    values = [100 * r[f"{t}_acc_mean"] for r in numeric for t in tasks]
    values = [v for v in values if not math.isnan(v)]
    if values:
        axis.set_xlim(max(0.0, min(values) - 5), min(100.0, max(values) + 3))
    axis.set_xlabel("test accuracy % (mean ± std over seeds); sorted by Δm")
    axis.set_title("Multi-Digits: accuracy per task")
    axis.legend(fontsize=7, loc="lower right")
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
    if runs:
        axes.flat[0].legend(fontsize=6)
    figure.suptitle(
        f"task weights over training steps (seed {runs[0].seed if runs else 0})", fontsize=9
    )
    figure.tight_layout()
    return figure


def tradeoff_figure(numeric: Sequence[dict[str, Any]]) -> Any:
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
    axis.set_title("Multi-Digits: benefit vs cost (circles: loss-level, squares: gradient-level)")
    axis.title.set_fontsize(9)
    figure.tight_layout()
    return figure


# --------------------------------------------------------------------------- main
def resolve(config: CompareConfig) -> CompareConfig:
    """Apply --quick: the first seed, QUICK_STEPS steps (unless --steps is given) and a short
    timing phase (at most 12 steps per method)."""
    if not config.quick:
        return config
    return dataclasses.replace(
        config,
        seeds=config.seeds[:1],
        steps=config.steps or QUICK_STEPS,
        timing_steps=min(config.timing_steps, 12),
    )


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Run the comparison; return the numeric table rows (also written to ``--out``)."""
    config = resolve(parse_config(CompareConfig, argv))
    torch.set_num_threads(config.threads)
    methods = select_strategies(config.strategies)
    group = config.wandb_group or time.strftime("compare-%Y%m%d-%H%M%S")
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)

    data = make_multi_digits(
        config.data_seed,
        pairs_per_image=config.pairs_per_image,
        test_pairs_per_image=config.test_pairs_per_image,
    )
    data = data.to(config.device)
    tasks = data.tasks
    steps, _ = total_steps(config, data)
    print(
        f"[compare] Multi-Digits: {len(data.train_images)} train / {len(data.test_images)} test "
        f"pairs; {len(methods)} strategies × seeds {config.seeds}, {steps} steps each; "
        f"gradient-level strategies use {config.grad_source}= (moco, db_mtl: shared_params=); "
        f"W&B {config.wandb_mode} "
        f"(group {group})",
        flush=True,
    )
    plan = [f"{SINGLE}:{t}" for t in tasks] if config.baselines else []
    plan += methods
    results: dict[str, list[RunResult]] = {}
    started = time.perf_counter()
    for method in progress(plan, desc="strategies"):
        for seed in config.seeds:
            result = run_one(config, data, method, seed, group)
            results.setdefault(method, []).append(result)
    timing = time_steps(config, data, plan) if config.timing_steps else {}
    elapsed = time.perf_counter() - started

    numeric, formatted = summarise(results, tasks, config.grad_source, timing)
    write_table(numeric, out, "results")
    (out / "results.md").write_text(markdown_table(formatted) + "\n")
    print(markdown_table(formatted))
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
            "accuracy": accuracy_figure(numeric, tasks),
            "weights": weights_figure(results, tasks),
            "tradeoff": tradeoff_figure(numeric),
        }
        for name, figure in figures.items():
            figure.savefig(out / f"{name}.png")
    except ImportError as error:
        print(f"[compare] no figures: {error}", file=sys.stderr)

    tracker = start_tracking(config, group=group, name="comparison", job_type="summary")
    for name, figure in figures.items():
        tracker.image(f"figures/{name}", figure)
    summary: dict[str, Any] = {}
    for row in numeric:
        for key in ("delta_m_mean", "step_ms", *(f"{t}_acc_mean" for t in tasks)):
            summary[f"{row['method']}/{key}"] = row[key]
    tracker.summary(summary)
    tracker.finish()
    if figures:
        plt.close("all")
    return numeric


if __name__ == "__main__":
    main()
