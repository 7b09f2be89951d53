"""CAGrad (Liu et al., NeurIPS 2021), Sec. 5.1: trajectories of Adam on the mean loss, MGDA,
PCGrad and CAGrad on the two-objective toy."""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any

from experiments.reproductions import pareto_toy
from experiments.reproductions.common import (
    Check,
    ReproduceConfig,
    Result,
    conclude,
    overall,
    training_length,
)
from experiments.reproductions.pareto_toy import REACH_TOLERANCE, method_check, reached
from experiments.toys import CAGRAD_STARTS

NAME = "cagrad_toy"
TITLE = "CAGrad (Liu et al., NeurIPS 2021), Sec. 5.1: two-objective toy"
PUBLISHED = {
    "claims": [
        "Adam on the mean loss stalls from some starts",
        "MGDA and PCGrad converge to different points of the Pareto set",
        "CAGrad (c = 0.5) converges to the mean-loss optimum θ ≈ (0, −8.355)",
    ],
    "source": "Liu et al., arXiv:2110.14048, Sec. 5.1, Figure 1 (trajectories); "
    "official code Cranial-XIX/CAGrad toy.py (losses, starts, 100 000 Adam steps)",
}
ADAM, MGDA, PCGRAD, CAGRAD = "Adam (mean loss)", "MGDA", "PCGrad", "CAGrad (c=0.5)"
METHODS: dict[str, tuple[str, dict[str, Any]]] = {
    ADAM: ("equal", {}),
    MGDA: ("mgda", {}),
    PCGRAD: ("pcgrad", {}),
    CAGRAD: ("cagrad", {"c": 0.5}),
}
# The official toy.py's three starts, then the two further ones of the Nash-MTL/FAMO version.
EXTRA_STARTS: tuple[tuple[float, float], ...] = ((-7.5, -0.5), (9.0, -1.0))
STARTS = [*CAGRAD_STARTS, *EXTRA_STARTS]
SPREAD = 1.0  # "different points": the reached end points span more than this in θ1
OPTIMUM_TOLERANCE = 0.1  # "reaches the mean-loss optimum": within this distance of it
CRITERION = (
    f"each claim as a check: 'reached' = final point within {REACH_TOLERANCE} of the Pareto "
    "set (x1 in [−7, 7], x2 from −8.355 to −8.435, solved numerically); CAGrad within "
    f"{OPTIMUM_TOLERANCE} of (0, −8.3552)"
)


def _stalls(summary: Mapping[str, Any]) -> tuple[Any, bool]:
    ends = reached(summary)
    return {"reached": ends}, not all(ends)


def _stops_apart(summary: Mapping[str, Any]) -> tuple[Any, bool]:
    ends = reached(summary)
    x1 = [point[0] for point, ok in zip(summary["final"], ends) if ok]
    spread = max(x1) - min(x1) if x1 else 0.0  # > SPREAD needs two distinct end points
    return {"reached": ends, "final_x1_spread": round(spread, 3)}, spread > SPREAD


def _reaches_optimum(summary: Mapping[str, Any]) -> tuple[Any, bool]:
    distance = summary["distance_to_mean_optimum"]
    measured = {"distance": [round(d, 4) for d in distance]}
    return measured, all(d < OPTIMUM_TOLERANCE for d in distance)


def verdict(measured: Mapping[str, Any]) -> tuple[list[Check], str]:
    """One check per claim on ``measured["per_method"]`` (:func:`pareto_toy.summarise` per
    method label)."""
    summaries = measured["per_method"]
    claim = "Adam on the mean loss stalls (does not reach the Pareto set) from some start"
    checks = [method_check(summaries, ADAM, claim, _stalls)]
    for label in (MGDA, PCGRAD):
        claim = (
            f"{label} stops at different points of the Pareto set (reached from ≥ 2 starts, "
            f"final θ1 spread > {SPREAD:g})"
        )
        checks.append(method_check(summaries, label, claim, _stops_apart))
    claim = (
        "CAGrad (c=0.5) reaches the mean-loss optimum (0, −8.355) from every start (distance "
        f"< {OPTIMUM_TOLERANCE})"
    )
    checks.append(method_check(summaries, CAGRAD, claim, _reaches_optimum))
    return checks, overall(checks)


def run(config: ReproduceConfig) -> tuple[Result, Any]:
    """Every method from every start, 100 000 Adam steps as the official code."""
    steps, deviations = training_length(config, 100_000, quick=2000)
    scale = (1.0, 1.0)
    runs, summaries, missing, seconds = pareto_toy.run_methods(
        config, NAME, METHODS, STARTS, steps=steps, scale=scale
    )
    measured = {"per_method": summaries, "seconds": seconds}
    fig = pareto_toy.figure(runs, scale, "CAGrad toy: trajectories on the mean-loss contours")
    return conclude(
        sys.modules[__name__],
        config,
        measured,
        fig,
        settings={
            "steps": steps,
            "optimizer": "Adam lr 1e-3 on θ, per start",
            "starts": STARTS,
            "losses": "official toy.py (f2 with + tanh(−θ2) + 2), LOWER 5e-6",
            "methods": {k: [m, kw] for k, (m, kw) in METHODS.items()},
        },
        notes=[
            "The official toy.py runs three starts, (−8.5, 7.5), (−8.5, −5) and (9, 9); the two "
            "further starts here, (−7.5, −0.5) and (9, −1), are those of the Nash-MTL/FAMO "
            "version of the toy.",
            "The official code rescales directions (mean for 'sgd', /(1+c) for CAGrad, mean of "
            "projections for PCGrad); Adam is invariant to a constant rescaling, so the "
            "package's conventions give the same trajectories up to Adam's eps.",
        ],
        missing=missing,
        wall_time_s=seconds,
        deviations=deviations,
    )
