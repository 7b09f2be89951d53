"""Sener & Koltun (NeurIPS 2018), Table 3, on MultiMNIST built from the MNIST files as they built
it, with their LeNet and recipe (:mod:`experiments.benchmarks.multimnist`).

    python -m experiments.reproduce multimnist --data-dir data/mnist
"""

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
    unmeasured,
)
from experiments.training import SINGLE

NAME = "multimnist"
TITLE = "Sener & Koltun (NeurIPS 2018), Table 3: MultiMNIST, single-task, equal, uncertainty, " \
    "GradNorm and MGDA-UB"  # fmt: skip
PUBLISHED = {
    "accuracy_percent": {m: {"left": v[0], "right": v[1]} for m, v in table3.TABLE3.items()},
    "source": "Sener & Koltun, Multi-Task Learning as Multi-Objective Optimization, NeurIPS "
    "2018, arXiv:1810.04650, Table 3 (MultiMNIST, test accuracy %)",
}
CLOSE_PP = 1.0  # every measured accuracy within 1 percentage point of the published one
CRITERION = (
    f"{table3.ORDERING}; and every method's accuracy on each task (mean over seeds) within "
    f"{CLOSE_PP} pp of Table 3"
)


def verdict(measured: Mapping[str, Any]) -> tuple[list[Check], str]:
    """The ordering checks on ``measured["mean_of_tasks"]`` and the closeness of
    ``measured["accuracy_percent_mean"]`` (per method and task, in %) to Table 3."""
    checks = table3.ordering_checks(measured["mean_of_tasks"])
    claim = f"every accuracy of Table 3 reproduced within {CLOSE_PP} pp"
    means = measured["accuracy_percent_mean"]
    if all(m in means for m in table3.TABLE3):
        gaps = {
            f"{method}/{task}": round(means[method][task] - published[k], 3)
            for method, published in table3.TABLE3.items()
            for k, task in enumerate(table3.TASKS)
        }
        checks.append(Check(claim, gaps, all(abs(g) <= CLOSE_PP for g in gaps.values())))
    else:
        checks.append(unmeasured(claim))
    return checks, overall(checks)


def run(config: ReproduceConfig) -> tuple[Result, Any]:
    """Every method for every seed at the paper's recipe; the claims on the means over seeds."""
    done = table3.run_methods(config, NAME)
    return conclude(
        sys.modules[__name__],
        config,
        done.measured,
        table3.figure(done.measured, "MultiMNIST"),
        settings={
            "data": f"{done.bench.name} from {done.settings.data_dir}",
            "training": done.training(),
            "mgda": "strategy 'mgda' on the gradients w.r.t. the shared features (MGDA-UB)",
            "baselines": f"{SINGLE}: one network per task, same recipe",
            "seeds": table3.seeds(config),
        },
        notes=[table3.UNCERTAINTY_NOTE],
        missing=done.missing,
        wall_time_s=done.seconds,
        deviations=done.deviations,
    )
