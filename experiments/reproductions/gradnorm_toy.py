"""GradNorm (Chen et al., ICML 2018), Sec. 4: synthetic regression tasks of different scales."""

from __future__ import annotations

import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

import taskbalance as tb
from experiments.reproductions.common import (
    Check,
    ReproduceConfig,
    Result,
    conclude,
    figure_row,
    overall,
    tracking_group,
    training_length,
    unmeasured,
)
from experiments.runner import report_row, start_tracking
from experiments.toys import GradNormNet, gradnorm_problem

NAME = "gradnorm_toy"
TITLE = "GradNorm (Chen et al., ICML 2018), Sec. 4: synthetic tasks of different scales"
PUBLISHED = {
    "claims": [
        "T=2, σ=(1,100): GradNorm increases the weight of the small-scale task (Fig. 2)",
        "GradNorm's task-normalised test loss is below equal weighting's and "
        "uncertainty weighting's for T=2 and T=10 (Fig. 2 and 3)",
    ],
    "source": "Chen et al., arXiv:1711.02257, Sec. 4, Figures 2-3 (figures only, no numbers)",
}
CRITERION = (
    "every qualitative claim holds: the σ=1 task's GradNorm weight ends above 1, "
    "and GradNorm's task-normalised test loss (mean over tasks of L_i/L_i(0) on a held-out "
    "set, averaged over the last 10% of evaluations) is below both baselines' in both "
    "settings"
)
SETTINGS = ("T2", "T10")
BASELINES = ("equal", "uncertainty")
ALPHA = 0.12
METHODS: dict[str, dict[str, Any]] = {"equal": {}, "uncertainty": {}, "gradnorm": {"alpha": ALPHA}}
LR = 1e-3
BATCH = 100


def verdict(measured: Mapping[str, Any]) -> tuple[list[Check], str]:
    """Checks on ``measured["t2_gradnorm_final_weights"]`` (weights normalised to sum T) and
    ``measured["final_normalised_test_loss"]`` (keyed ``"<setting>/<method>"``)."""
    claim = "T=2, σ=(1,100): GradNorm raises the weight of the σ=1 task above its initial 1"
    weight = measured["t2_gradnorm_final_weights"][0]
    checks = [Check(claim, round(weight, 4), weight > 1.0)]
    finals = measured["final_normalised_test_loss"]
    for setting in SETTINGS:
        for other in BASELINES:
            claim = f"{setting}: GradNorm's task-normalised test loss below {other}'s"
            grad, value = finals.get(f"{setting}/gradnorm"), finals.get(f"{setting}/{other}")
            if grad is None or value is None:
                checks.append(unmeasured(claim))
                continue
            pair = {"gradnorm": round(grad, 5), other: round(value, 5)}
            checks.append(Check(claim, pair, grad < value))
    return checks, overall(checks)


def train(
    config: ReproduceConfig,
    sigmas: Sequence[float],
    method: str,
    kwargs: Mapping[str, Any],
    *,
    steps: int,
    label: str,
) -> dict[str, Any]:
    """Train the toy with one strategy; return test-loss and weight histories."""
    problem = gradnorm_problem(sigmas, seed=config.seed)
    count = len(sigmas)
    tasks = [f"t{i}" for i in range(count)]
    torch.manual_seed(config.seed)  # the same initial network for every method
    model = GradNormNet(count)
    strategy = tb.create_strategy(method, tasks=tasks, **kwargs)
    optimizer = torch.optim.Adam(model.parameters(), lr=LR)
    generator = torch.Generator().manual_seed(config.seed + 1)
    tracker = start_tracking(config, group=tracking_group(config, NAME), name=label)
    eval_every = max(steps // 100, 1)

    def test_losses() -> Tensor:
        with torch.no_grad():
            outs = torch.stack(model(problem.x_test), dim=1)
            return (outs - problem.y_test).pow(2).mean(dim=(0, 2))

    initial = test_losses()
    evaluations: list[tuple[int, float]] = []
    weights: list[list[float]] = []
    start = time.perf_counter()
    for step in range(steps):
        index = torch.randint(0, problem.x_train.shape[0], (BATCH,), generator=generator)
        outs = model(problem.x_train[index])
        target = problem.y_train[index]
        losses = {t: (o - target[:, i]).pow(2).mean() for i, (t, o) in enumerate(zip(tasks, outs))}
        optimizer.zero_grad()
        report = strategy.backward(losses, shared_params=model.last_shared)
        optimizer.step()
        if step % eval_every == 0 or step == steps - 1:
            normalised = (test_losses() / initial).mean().item()
            evaluations.append((step, normalised))
            # Weights relative to their sum: comparable across methods (uncertainty's do not
            # sum to T).
            w = report.weight_values.detach()
            weights.append((w / w.sum() * count).tolist())
            row = report_row(report)
            row["val/normalised_loss/mean"] = normalised
            tracker.log(row, step=step)
    seconds = time.perf_counter() - start
    tail = [v for _, v in evaluations[-max(len(evaluations) // 10, 1) :]]
    tracker.summary({"final_normalised_test_loss": float(np.mean(tail)), "seconds": seconds})
    tracker.finish()
    return {
        "evaluations": evaluations,
        "weights": weights,
        "final": float(np.mean(tail)),
        "seconds": seconds,
    }


def run(config: ReproduceConfig) -> tuple[Result, Any]:
    """T = 2 with σ = (1, 100) and T = 10 with σ from a wide normal; three methods each."""
    steps, deviations = training_length(config, 5000, quick=200)
    sigma_generator = torch.Generator().manual_seed(1000 + config.seed)
    wide = (torch.randn(10, generator=sigma_generator) * 10).abs().clamp_min(0.1)
    sigmas = {"T2": [1.0, 100.0], "T10": [round(v, 3) for v in wide.tolist()]}
    runs: dict[str, dict[str, Any]] = {}
    start = time.perf_counter()
    for setting in SETTINGS:
        for method, kwargs in METHODS.items():
            label = f"{NAME}/{setting}-{method}"
            runs[f"{setting}/{method}"] = train(
                config, sigmas[setting], method, kwargs, steps=steps, label=label
            )
    seconds = time.perf_counter() - start
    t2_weights = runs["T2/gradnorm"]["weights"]
    measured = {
        "final_normalised_test_loss": {key: run["final"] for key, run in runs.items()},
        "t2_gradnorm_final_weights": t2_weights[-1],
        "t10_sigmas": sigmas["T10"],
        "seconds": seconds,
    }
    fig = _figure(runs)
    return conclude(
        sys.modules[__name__],
        config,
        measured,
        fig,
        settings={
            "steps": steps,
            "batch": BATCH,
            "optimizer": f"Adam lr {LR:g} (model)",
            "gradnorm": f"alpha {ALPHA}, W = last shared layer, weights by the "
            "strategy's Adam lr 0.025 (its default)",
            "uncertainty": "strategy defaults (regression form, Adam lr 1e-3)",
            "data": "10 000 train / 2 000 test inputs, uniform on the unit sphere of R^250",
            "loss": "MSE per task",
            "seed": config.seed,
        },
        notes=[
            "Unstated in the paper and chosen here: optimiser and learning rate (Adam 1e-3), "
            "batch (100), steps (5000), input distribution (unit sphere), train/test sizes, "
            "N(0,10) and N(0,3.5) read as variances, and the T=10 σ_i: |N(0, 10²)| draws "
            "(clamped at 0.1), the paper saying only 'a wide normal distribution'.",
            "Weights are reported normalised to sum T so that uncertainty's e^(−s)/2 and "
            "GradNorm's w_i are comparable.",
        ],
        wall_time_s=seconds,
        deviations=deviations,
    )


def _figure(runs: Mapping[str, dict[str, Any]]) -> Any:
    fig, axes = figure_row(3)
    for setting, ax in zip(SETTINGS, axes[:2]):
        for method in METHODS:
            steps_axis, values = zip(*runs[f"{setting}/{method}"]["evaluations"])
            ax.plot(steps_axis, values, label=method)
        ax.set_yscale("log")
        ax.set_title(f"{setting}: task-normalised test loss")
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    gradnorm = runs["T2/gradnorm"]
    steps_axis = [s for s, _ in gradnorm["evaluations"]]
    w = np.array(gradnorm["weights"])
    axes[2].plot(steps_axis, w[:, 0], label="GradNorm w (σ=1)")
    axes[2].plot(steps_axis, w[:, 1], label="GradNorm w (σ=100)")
    axes[2].set_title("T2: GradNorm weights")
    axes[2].set_xlabel("step")
    axes[2].legend(fontsize=7)
    return fig
