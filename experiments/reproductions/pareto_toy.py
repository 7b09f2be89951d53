"""Runs on the two-objective toy of CAGrad (and of Nash-MTL and FAMO, first loss × 0.1): Adam
on θ from several starts, one strategy per start, and what is measured at the end."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn

import taskbalance as tb
from experiments.reproductions.common import (
    Check,
    ReproduceConfig,
    available,
    figure_row,
    tracking_group,
    unmeasured,
)
from experiments.runner import start_tracking
from experiments.toys import PARETO_X2, cagrad_losses, distance_to_pareto, min_norm_two, pareto_set

TASKS = ("f1", "f2")
REACH_TOLERANCE = 0.05  # "reached the Pareto set": within this distance of it
# A method: its label in the results -> (strategy name, keyword arguments)
Methods = Mapping[str, tuple[str, dict[str, Any]]]


def reached(summary: Mapping[str, Any]) -> list[bool]:
    """Per start: did the run end within :data:`REACH_TOLERANCE` of the Pareto set?"""
    return [d < REACH_TOLERANCE for d in summary["distance_to_pareto"]]


def method_check(
    summaries: Mapping[str, Mapping[str, Any]],
    label: str,
    claim: str,
    judge: Callable[[Mapping[str, Any]], tuple[Any, bool]],
) -> Check:
    """The check of a claim about one method: ``judge(summary) -> (measured, passed)`` on the
    method's summary, or a failed check when the method was not run."""
    if label not in summaries:
        return unmeasured(claim)
    measured, passed = judge(summaries[label])
    return Check(claim, measured, passed)


@dataclass
class ToyRun:
    method: str
    trajectories: Tensor  # [starts, records, 2]
    final: Tensor  # [starts, 2]
    seconds: float
    errors: dict[int, str] = field(default_factory=dict)  # start -> "step k: message"
    # per start: steps whose per-step problem failed and took the previous weights (on_failure)
    fallbacks: list[int] = field(default_factory=list)


def run_toy(
    config: ReproduceConfig,
    method: str,
    kwargs: Mapping[str, Any],
    starts: Sequence[tuple[float, float]],
    *,
    steps: int,
    scale: tuple[float, float],
    path: Literal["batched", "backward"],
    group: str,
    record_every: int = 100,
) -> ToyRun:
    """Adam (lr 1e-3) on the toy from every start at once, one strategy per start.

    ``path="backward"`` is a user's loop: per start, the losses and ``strategy.backward(losses,
    shared_params=[θ])``. ``"batched"`` evaluates all starts in one tensor and then combines per
    start: gradient-level strategies through ``strategy.aggregate(J)`` (J the 2×2 Jacobian of
    that start), loss-level ones through the differentiable ``strategy(losses)``; the same
    numbers, with less overhead per step.
    """
    points: list[Tensor] = [nn.Parameter(torch.tensor(s, dtype=torch.float32)) for s in starts]
    strategies = [tb.create_strategy(method, tasks=TASKS, **kwargs) for _ in starts]
    gradient_level = isinstance(strategies[0], tb.GradientAggregation)
    optimizer = torch.optim.Adam(points, lr=1e-3)
    records = torch.empty(len(starts), steps // record_every + 1, 2)
    tracker = start_tracking(
        config, group=group, name=f"{group.removeprefix('reproduce-')}/{method}"
    )
    errors: dict[int, str] = {}

    def fail(k: int, step: int, error: tb.StrategyError) -> None:
        # A start whose strategy raises stops where it is (its grad stays None, so Adam leaves
        # it); the other starts go on and the error is reported with the step.
        errors[k] = f"step {step}: {str(error).splitlines()[0][:300]}"
        points[k].grad = None

    start = time.perf_counter()
    for step in range(steps):
        optimizer.zero_grad()
        live = [k for k in range(len(starts)) if k not in errors]
        if not live:
            break
        if path == "backward":
            rows = []
            for k, (point, strategy) in enumerate(zip(points, strategies)):
                losses = cagrad_losses(point, scale)
                rows.append(losses.detach())
                if k in errors:
                    continue
                try:
                    strategy.backward({"f1": losses[0], "f2": losses[1]}, shared_params=[point])
                except tb.StrategyError as error:
                    fail(k, step, error)
            values = torch.stack(rows)
        else:
            losses = cagrad_losses(torch.stack(points), scale)
            values = losses.detach()
            if gradient_level:
                g1 = torch.autograd.grad(losses[:, 0].sum(), points, retain_graph=True)
                g2 = torch.autograd.grad(losses[:, 1].sum(), points)
                for k in live:
                    jacobian = torch.stack([g1[k], g2[k]])
                    try:
                        points[k].grad = strategies[k].aggregate(jacobian, values[k])  # type: ignore[operator]
                    except tb.StrategyError as error:
                        fail(k, step, error)
            else:
                totals = []
                for k in live:
                    try:
                        totals.append(strategies[k]({"f1": losses[k, 0], "f2": losses[k, 1]}))
                    except tb.StrategyError as error:
                        fail(k, step, error)
                if totals:
                    torch.stack(totals).sum().backward()
        optimizer.step()
        if step % record_every == 0:
            with torch.no_grad():
                records[:, step // record_every] = torch.stack(points)
            row = {}
            for k in range(len(starts)):
                row[f"start{k}/train/loss/f1"] = values[k, 0]
                row[f"start{k}/train/loss/f2"] = values[k, 1]
                row[f"start{k}/theta/x1"] = records[k, step // record_every, 0]
                row[f"start{k}/theta/x2"] = records[k, step // record_every, 1]
            tracker.log({key: float(v) for key, v in row.items()}, step=step)
    seconds = time.perf_counter() - start
    final = torch.stack([p.detach().clone() for p in points])
    records[:, -1] = final
    fallbacks = [int(getattr(s, "failures", 0)) for s in strategies]
    tracker.summary({"seconds": seconds, "errors": len(errors), "failures": sum(fallbacks)})
    tracker.finish()
    return ToyRun(method, records, final, seconds, errors, fallbacks)


def run_methods(
    config: ReproduceConfig,
    name: str,
    methods: Methods,
    starts: Sequence[tuple[float, float]],
    *,
    steps: int,
    scale: tuple[float, float],
) -> tuple[dict[str, ToyRun], dict[str, dict[str, Any]], list[str], float]:
    """Run every method from every start: the runs and their :func:`summarise` (both keyed by
    label), what was not run and why, and the wall time of them all."""
    runs: dict[str, ToyRun] = {}
    missing = []
    group = tracking_group(config, name)
    start = time.perf_counter()
    for label, (method, kwargs) in methods.items():
        if config.only and method not in config.only:
            missing.append(f"{method}: not run (--only {' '.join(config.only)})")
            continue
        if not available(method):
            missing.append(f"{method}: strategy not available")
            continue
        runs[label] = run_toy(
            config, method, kwargs, starts, steps=steps, scale=scale, path="batched", group=group
        )
    seconds = time.perf_counter() - start
    front = pareto_set()
    summaries = {label: summarise(run, front, scale) for label, run in runs.items()}
    return runs, summaries, missing, seconds


def summarise(run: ToyRun, front: Tensor, scale: tuple[float, float]) -> dict[str, Any]:
    """What a run measured, per start: where it ended, how far from the Pareto set and from
    the mean-loss optimum, and how close to Pareto-stationary."""
    final = run.final.double()
    final_req = final.clone().requires_grad_(True)
    losses = cagrad_losses(final_req, scale)
    g1 = torch.autograd.grad(losses[:, 0].sum(), final_req, retain_graph=True)[0]
    g2 = torch.autograd.grad(losses[:, 1].sum(), final_req)[0]
    summary: dict[str, Any] = {
        "final": [[round(v, 4) for v in row] for row in final.tolist()],
        "distance_to_pareto": distance_to_pareto(final, front).tolist(),
    }
    summary["reached"] = reached(summary)
    summary.update(
        pareto_stationarity=min_norm_two(g1, g2).tolist(),
        mean_loss=losses.detach().mean(dim=1).tolist(),
        distance_to_mean_optimum=(final - torch.tensor([0.0, PARETO_X2], dtype=final.dtype))
        .norm(dim=1)
        .tolist(),
        seconds=run.seconds,
        errors={str(k): v for k, v in run.errors.items()},
        solver_fallbacks=run.fallbacks,
    )
    return summary


def figure(runs: Mapping[str, ToyRun], scale: tuple[float, float], title: str) -> Any:
    """One panel per method: the trajectories over the contours of the mean loss."""
    fig, axes = figure_row(max(len(runs), 1), 3.6)
    grid = torch.linspace(-10, 10, 201)
    xx, yy = torch.meshgrid(grid, grid, indexing="xy")
    surface = cagrad_losses(torch.stack([xx, yy], dim=-1), scale).mean(dim=-1)
    front = pareto_set(201)
    for ax, (method, run) in zip(axes, runs.items()):
        ax.contour(xx.numpy(), yy.numpy(), surface.numpy(), levels=15, cmap="viridis")
        ax.plot(front[:, 0], front[:, 1], color="gray", lw=4, alpha=0.6)
        ax.plot(0, PARETO_X2, marker="*", color="k", ms=10)
        for trajectory in run.trajectories:
            ax.plot(trajectory[:, 0], trajectory[:, 1], color="tab:red", lw=1.2)
            ax.plot(trajectory[0, 0], trajectory[0, 1], "ko", ms=4)
            ax.plot(trajectory[-1, 0], trajectory[-1, 1], "rx", ms=6)
        ax.set_title(f"{method} ({run.seconds:.0f} s)")
        ax.set_xlim(-10, 10)
        ax.set_ylim(-10, 10)
        ax.set_aspect("equal")
    fig.suptitle(title)
    return fig
