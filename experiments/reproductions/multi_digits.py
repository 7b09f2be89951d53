"""Sener & Koltun (NeurIPS 2018), Table 3, as an ordering of methods, emulated on Multi-Digits
(sklearn's 8×8 digits paired like MultiMNIST)."""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any

from experiments.reproductions import table3
from experiments.reproductions.common import (
    Check,
    ReproduceConfig,
    Result,
    conclude,
    overall,
)

NAME = "multi_digits"
TITLE = (
    "Sener & Koltun (NeurIPS 2018), Table 3, as an ordering on Multi-Digits "
    "(EMULATION: 8×8 sklearn digits, not MultiMNIST)"
)
PUBLISHED = {
    "accuracy_percent": {m: {"left": v[0], "right": v[1]} for m, v in table3.TABLE3.items()},
    "source": "Sener & Koltun, arXiv:1810.04650, Table 3 (MultiMNIST); the absolute "
    "numbers are not the target here, only the ordering",
}
CRITERION = table3.ORDERING


def verdict(measured: Mapping[str, Any]) -> tuple[list[Check], str]:
    """Checks on ``measured["mean_of_tasks"]``: per method, the mean over seeds of the two
    tasks' accuracy in %."""
    checks = table3.ordering_checks(measured["mean_of_tasks"])
    return checks, overall(checks)


def run(config: ReproduceConfig) -> tuple[Result, Any]:
    """Every method for every seed; the ordering claims on the means over seeds."""
    done = table3.run_methods(config, NAME)
    return conclude(
        sys.modules[__name__],
        config,
        done.measured,
        table3.figure(done.measured, "Multi-Digits (emulation of Sener & Koltun Table 3)"),
        settings={
            "data": "experiments.benchmarks.multi_digits (seed 0, pairs_per_image 4): 10×10 "
            "canvas, offset 2, split before pairing",
            "model": "MultiDigitsNet (LeNet-style trunk, two heads)",
            "training": done.training(),
            "mgda": "strategy 'mgda' with its defaults on the gradients w.r.t. the shared "
            "features (MGDA-UB)",
            "gradnorm": "strategy defaults (alpha 1.5, lr 0.025), W = the shared features",
            "uncertainty": "strategy defaults (regression form for both tasks)",
            "seeds": table3.seeds(config),
        },
        notes=[
            "An emulation: Multi-Digits is MultiMNIST's recipe applied to sklearn's 1 797 8×8 "
            "digits, with a small LeNet; only the ordering of Table 3 is checked.",
            table3.UNCERTAINTY_NOTE,
        ],
        missing=done.missing,
        wall_time_s=done.seconds,
        deviations=done.deviations,
    )
