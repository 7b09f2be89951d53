"""FAMO (Liu et al., NeurIPS 2023), Figure 1: on the CAGrad toy with the first loss × 0.1 (the
Nash-MTL version), who reaches the Pareto front, and how fast."""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from typing import Any

from experiments.reproductions import pareto_toy
from experiments.reproductions.common import (
    Check,
    ReproduceConfig,
    Result,
    conclude,
    overall,
    training_length,
    unmeasured,
)
from experiments.reproductions.pareto_toy import REACH_TOLERANCE, method_check, reached
from experiments.toys import FAMO_STARTS

NAME = "famo_toy"
TITLE = "FAMO (Liu et al., NeurIPS 2023): the toy with the first loss scaled by 0.1"
PUBLISHED_SECONDS = {"Adam": 33.0, "FAMO": 39.0, "Nash-MTL": 995.0}
PUBLISHED = {
    "claims": [
        "Adam on the summed loss fails to reach the Pareto front from one of the five starts",
        "Nash-MTL and FAMO reach the front from all five starts",
    ],
    "wall_time_s": PUBLISHED_SECONDS,
    "source": "Liu et al., arXiv:2306.03792, Figure 1 (trajectories and times for "
    "50 000 steps); official code Cranial-XIX/FAMO experiments/toy",
}
ADAM, FAMO, NASH = "Adam", "FAMO", "Nash-MTL"
METHODS: dict[str, tuple[str, dict[str, Any]]] = {
    ADAM: ("equal", {}),
    FAMO: ("famo", {"gamma": 0.0, "min_losses": [-21 * 0.1, -21.0], "lr": 0.025}),
    NASH: ("nash_mtl", {}),
}
FAMO_OVER_ADAM = 2.0  # "about as fast as Adam" (published 39 s / 33 s): less than this ratio
CRITERION = (
    f"'reached' = final point within {REACH_TOLERANCE} of the Pareto set; timing claims as "
    "ratios measured in one process, one thread"
)


def _fails_somewhere(summary: Mapping[str, Any]) -> tuple[Any, bool]:
    ends = reached(summary)
    return {"failed_starts": [s for s, ok in zip(FAMO_STARTS, ends) if not ok]}, not all(ends)


def _reaches_everywhere(summary: Mapping[str, Any]) -> tuple[Any, bool]:
    ends = reached(summary)
    return ends, all(ends)


def _timing_check(
    claim: str, times: Mapping[str, float], over: str, under: str, holds: Callable[[float], bool]
) -> Check:
    """A claim on the time ratio ``over / under``; failed when either method was not run."""
    if over not in times or under not in times:
        return unmeasured(claim)
    ratio = times[over] / times[under]
    return Check(claim, round(ratio, 3), holds(ratio))


def verdict(measured: Mapping[str, Any]) -> tuple[list[Check], str]:
    """Checks on ``measured["per_method"]`` (:func:`pareto_toy.summarise` per method label)
    and the wall times ``measured["wall_time_s"]``."""
    summaries, times = measured["per_method"], measured["wall_time_s"]
    claim = (
        "Adam on the summed loss fails to reach the front from some start (published: one of five)"
    )
    checks = [method_check(summaries, ADAM, claim, _fails_somewhere)]
    for label in (FAMO, NASH):
        claim = f"{label} reaches the Pareto front from all five starts"
        checks.append(method_check(summaries, label, claim, _reaches_everywhere))
    claim = f"FAMO's wall time within {FAMO_OVER_ADAM:g}× of Adam's (published 39 s vs 33 s)"
    checks.append(_timing_check(claim, times, FAMO, ADAM, lambda ratio: ratio < FAMO_OVER_ADAM))
    claim = "Nash-MTL slower than FAMO (published 995 s vs 39 s)"
    checks.append(_timing_check(claim, times, NASH, FAMO, lambda ratio: ratio > 1.0))
    return checks, overall(checks)


def run(config: ReproduceConfig) -> tuple[Result, Any]:
    """Every method from the five starts, 50 000 Adam steps as the paper."""
    steps, deviations = training_length(config, 50_000, quick=1000)
    scale = (0.1, 1.0)
    runs, summaries, missing, seconds = pareto_toy.run_methods(
        config, NAME, METHODS, FAMO_STARTS, steps=steps, scale=scale
    )
    times = {label: run.seconds for label, run in runs.items()}
    measured = {
        "per_method": summaries,
        "wall_time_s": times,
        "time_ratio_to_adam": {k: v / times[ADAM] for k, v in times.items()}
        if ADAM in times
        else {},
        "seconds": seconds,
    }
    fig = pareto_toy.figure(runs, scale, "FAMO toy (first loss × 0.1): trajectories")
    return conclude(
        sys.modules[__name__],
        config,
        measured,
        fig,
        settings={
            "steps": steps,
            "scale": scale,
            "optimizer": "Adam lr 1e-3 on θ, per start",
            "starts": FAMO_STARTS,
            "methods": {k: [m, kw] for k, (m, kw) in METHODS.items()},
            "path": "batched: the 5 starts' losses in one tensor, then per start strategy(losses) "
            "(loss-level) or strategy.aggregate(J) (gradient-level)",
            "threads": config.threads,
        },
        notes=[
            "Times are for all five starts (the paper's figure does not say whether its times "
            "are per start); only ratios are comparable across machines.",
            "The Nash-MTL here solves its small problem in torch; the paper's 995 s come from "
            "the official cvxpy/ECOS solver, so the ratio is not expected to match.",
        ],
        missing=missing,
        wall_time_s=seconds,
        deviations=deviations,
    )
