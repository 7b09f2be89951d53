"""Kendall, Gal & Cipolla (CVPR 2018): the learned noise σ on the authors' own two-task toy."""

from __future__ import annotations

import sys
import time
from collections.abc import Mapping
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
)
from experiments.runner import start_tracking
from experiments.toys import KendallNet, kendall_data

NAME = "kendall_toy"
TITLE = "Kendall et al. (CVPR 2018): learned homoscedastic noise on the authors' toy"
TASKS = ("y1", "y2")
SIGMA = {"y1": 8.5875, "y2": 0.9198}  # the authors' PyTorch notebook prints 8.5875, 0.9198
TRUE_SIGMA = {"y1": 10.0, "y2": 1.0}
PUBLISHED = {
    "sigma": SIGMA,
    "true_sigma": TRUE_SIGMA,
    "source": "authors' example notebook yaringal/multi-task-learning-example, "
    "multi-task-learning-example-pytorch.ipynb, last cell (8.5875, 0.9198); the Keras "
    "notebook of the same repository reports about the same",
}
TOLERANCE = 0.10  # relative, either side
CRITERION = "each learned σ within 10% of the published value"


def relative_error(sigma: Mapping[str, float]) -> dict[str, float]:
    """|σ − σ_published| / σ_published per task."""
    return {task: abs(sigma[task] - SIGMA[task]) / SIGMA[task] for task in TASKS}


def verdict(measured: Mapping[str, Any]) -> tuple[list[Check], str]:
    """One check per task on ``measured["sigma"]``."""
    error = relative_error(measured["sigma"])
    checks = [
        Check(
            f"σ{k} within 10% of the published {SIGMA[task]:.2f}",
            round(measured["sigma"][task], 4),
            error[task] <= TOLERANCE,
        )
        for k, task in enumerate(TASKS, 1)
    ]
    return checks, overall(checks)


def run(config: ReproduceConfig) -> tuple[Result, Any]:
    """Train as the authors' notebook does; judge the final σ."""
    epochs, deviations = training_length(config, 2000, quick=100)
    batch, n = 20, 100
    x, y1, y2 = kendall_data(n, seed=config.seed)
    targets = {"y1": y1, "y2": y2}
    torch.manual_seed(config.seed)
    model = KendallNet(1024)
    # The authors put log σ² into the model's Adam (lr 1e-3); the strategy trains them with its
    # own Adam, which with the same lr and betas is the same per-parameter update.
    strategy = tb.create_strategy("uncertainty", tasks=TASKS, lr=1e-3)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    # Data order as in the notebook: the global numpy generator continues after the data was
    # drawn, and each epoch shuffles the already shuffled arrays.
    order_rng = np.random.RandomState(config.seed)
    order_rng.randn(n, 1), order_rng.randn(n, 1), order_rng.randn(n, 1)
    order = np.arange(n)
    tracker = start_tracking(config, group=tracking_group(config, NAME), name=NAME)
    history = np.zeros((epochs, 2))
    start = time.perf_counter()
    for epoch in range(epochs):
        order = order[order_rng.permutation(n)]
        epoch_order = torch.from_numpy(order)
        sums = torch.zeros(2)
        for j in range(n // batch):
            index = epoch_order[j * batch : (j + 1) * batch]
            out1, out2 = model(x[index])
            losses = {
                "y1": (out1 - targets["y1"][index]).pow(2).mean(),
                "y2": (out2 - targets["y2"][index]).pow(2).mean(),
            }
            optimizer.zero_grad()
            report = strategy.backward(losses)
            optimizer.step()
            sums += report.loss_values.detach()
        log_var: Tensor = strategy.log_var  # type: ignore[assignment]
        sigma = (log_var.detach() / 2).exp()
        history[epoch] = sigma.numpy()
        row = {f"train/loss/{t}": v for t, v in zip(TASKS, (sums / (n // batch)).tolist())}
        row.update({f"weights/{t}": v for t, v in zip(TASKS, report.weight_values.tolist())})
        row.update({f"sigma/{t}": v for t, v in zip(TASKS, sigma.tolist())})
        tracker.log(row, step=epoch)
    seconds = time.perf_counter() - start
    final = dict(zip(TASKS, history[-1].tolist()))
    with torch.no_grad():
        residual = [(o - t).pow(2).mean().sqrt().item() for o, t in zip(model(x), (y1, y2))]
    measured = {
        "sigma": final,
        "relative_error": relative_error(final),
        "train_rmse": dict(zip(TASKS, residual)),
        "seconds": seconds,
    }
    fig = _figure(history)
    return conclude(
        sys.modules[__name__],
        config,
        measured,
        fig,
        tracker=tracker,
        settings={
            "n": n,
            "batch": batch,
            "epochs": epochs,
            "steps": epochs * (n // batch),
            "model": "Linear(1,1024)-ReLU, two Linear(1024,1) heads",
            "optimizer": "Adam lr 1e-3 (model); strategy 'uncertainty' Adam lr 1e-3 for log σ²",
            "loss": "MSE per task; uncertainty regression form ½e^(−s)L + ½s",
            "seed": config.seed,
        },
        notes=[
            "The authors' loss is Σ_t e^(−s_t)·MSE_t + s_t; the strategy's regression form "
            "½e^(−s)L + ½s is exactly half of it, so every gradient is halved; Adam (eps 1e-8 "
            "aside) takes the same steps, and the optimum s = log L is the same.",
            "σ is the square root of e^s; at the optimum of the loss for s, σ² equals the "
            "task's MSE. After 2000 epochs σ1 is still rising (compare train_rmse: the fitted "
            "residual); the published 8.59 is the value at the notebook's budget, not a "
            "converged noise estimate, and is what the criterion compares with.",
            "Data, initialisation and batch order follow the notebook: numpy RandomState(seed) "
            "draws x, the y1 noise, the y2 noise, then one shuffle per epoch applied to the "
            "already shuffled arrays; torch.manual_seed(seed) before building the model.",
        ],
        wall_time_s=seconds,
        deviations=deviations,
    )


def _figure(history: np.ndarray) -> Any:
    fig, (ax,) = figure_row(1, 5.0)
    epochs_axis = np.arange(1, len(history) + 1)
    for i, task in enumerate(TASKS):
        line = ax.plot(epochs_axis, history[:, i], label=f"learned σ ({task})")[0]
        true = TRUE_SIGMA[task]
        ax.axhline(true, ls=":", color=line.get_color(), label=f"true σ = {true:g}")
        ax.axhline(SIGMA[task], ls="--", color=line.get_color(), alpha=0.5)
    ax.set_yscale("log")
    ax.set_xlabel("epoch")
    ax.set_ylabel("σ = exp(s/2)")
    ax.set_title("Kendall toy: learned σ (dashed: published)")
    ax.legend(fontsize=7)
    return fig
