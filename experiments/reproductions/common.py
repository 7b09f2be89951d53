"""What every reproduction shares: its config, the result record, the verdict rule and output."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Literal

import numpy as np
from torch import Tensor

import taskbalance as tb
from experiments.benchmarks import list_benchmarks
from experiments.runner import RunConfig, Tracker, start_tracking, unknown_name

REPRODUCED, NOT_REPRODUCED = "reproduced", "not reproduced"
VERDICTS = (REPRODUCED, NOT_REPRODUCED)


@dataclass
class ReproduceConfig(RunConfig):
    """Paper reproductions: python -m experiments.reproduce NAME."""

    name: Literal[
        "kendall_toy",
        "gradnorm_toy",
        "cagrad_toy",
        "famo_toy",
        "multi_digits",
        "multimnist",
        "all",
    ] = field(default="kendall_toy", metadata={"help": "which reproduction (or all)"})
    out: str = field(default="results/reproduce", metadata={"help": "directory for the outputs"})
    seed: int = field(default=0, metadata={"help": "random seed"})
    quick: bool = field(default=False, metadata={"help": "shortened runs (smoke test only)"})
    threads: int = field(default=1, metadata={"help": "torch threads (timings use 1)"})
    steps: int = field(
        default=0,
        metadata={
            "help": "override the training length (steps; epochs for kendall_toy); 0 = the "
            "paper's. Any other value is recorded as a deviation from the paper's settings"
        },
    )

    benchmark: str | None = field(
        default=None,
        metadata={
            "help": "Table 3 reproductions (multi_digits, multimnist): train on this benchmark "
            "instead of their own (recorded as a deviation)"
        },
    )
    data_dir: str | None = field(
        default=None, metadata={"help": "the benchmark's data (multimnist: the MNIST IDX files)"}
    )
    option: list[str] = field(
        default_factory=list, metadata={"help": "benchmark options KEY=VALUE"}
    )
    device: str = field(
        default="cpu", metadata={"help": "device of the benchmark reproductions (toys: CPU)"}
    )
    amp: bool = field(
        default=False, metadata={"help": "mixed precision for the benchmark reproductions"}
    )
    only: list[str] = field(
        default_factory=list,
        metadata={"help": "toy reproductions: run only these strategies (default: all)"},
    )

    def __post_init__(self) -> None:
        name = self.benchmark
        if name is not None and ":" not in name and name not in list_benchmarks():
            known = unknown_name("benchmark", name, list_benchmarks())
            raise ValueError(f"{known}; or your own as 'package.module:attribute'")
        if self.steps < 0:
            raise ValueError(f"steps must be >= 0, got {self.steps}")
        if self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}")


def training_length(config: ReproduceConfig, paper: int, quick: int) -> tuple[int, list[str]]:
    """The number of steps to run and, when it is not the paper's, a note that says so."""
    if config.steps:
        length = config.steps
    elif config.quick:
        length = quick
    else:
        return paper, []
    return length, [
        f"DEVIATION: ran {length} steps/epochs instead of the default {paper} "
        "(the paper's where it gives one)"
    ]


def tracking_group(config: ReproduceConfig, name: str) -> str:
    return config.wandb_group or f"reproduce-{name}"


def available(name: str) -> bool:
    return bool(tb.list_strategies(name))


# ----------------------------------------------------------------------------- verdicts


@dataclass
class Check:
    """One published claim, what we measured for it and whether it holds."""

    claim: str
    measured: Any
    passed: bool


def unmeasured(claim: str) -> Check:
    """A claim whose measurement is missing (its method was not run): it does not hold."""
    return Check(claim, None, False)


def overall(checks: Sequence[Check]) -> str:
    """Reproduced when every claim was checked and holds; nothing checked is not reproduced."""
    return REPRODUCED if checks and all(c.passed for c in checks) else NOT_REPRODUCED


@dataclass
class Result:
    name: str
    title: str
    published: dict[str, Any]
    measured: dict[str, Any]
    criterion: str
    checks: list[Check]
    settings: dict[str, Any]
    notes: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    wall_time_s: float = 0.0
    quick: bool = False
    deviations: list[str] = field(default_factory=list)

    @property
    def verdict(self) -> str:
        return overall(self.checks)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["verdict"] = self.verdict
        data["paper_settings"] = not self.deviations
        data["figure"] = f"{self.name}.png"
        return data


# ----------------------------------------------------------------------------- output


def conclude(
    reproduction: ModuleType,
    config: ReproduceConfig,
    measured: dict[str, Any],
    figure: Any,
    *,
    tracker: Tracker | None = None,
    **record: Any,
) -> tuple[Result, Any]:
    """Judge ``measured`` with the reproduction module's ``verdict``, write the result with its
    published values, criterion and figure, and finish the W&B run (one is started under the
    reproduction's name unless ``tracker`` is given). ``record``: the other :class:`Result`
    fields (settings, notes, missing, wall_time_s, deviations)."""
    checks, _ = reproduction.verdict(measured)
    result = Result(
        name=reproduction.NAME,
        title=reproduction.TITLE,
        published=reproduction.PUBLISHED,
        measured=measured,
        criterion=reproduction.CRITERION,
        checks=checks,
        quick=config.quick,
        **record,
    )
    if tracker is None:
        name = reproduction.NAME
        tracker = start_tracking(config, group=tracking_group(config, name), name=name)
    write_result(result, Path(config.out), figure, tracker)
    tracker.finish()
    return result, figure


def write_result(result: Result, out: Path, figure: Any, tracker: Tracker) -> Path:
    """``<out>/<name>.json`` and ``.png``; the figure and the summary go to W&B too."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{result.name}.json"
    path.write_text(json.dumps(result.to_json(), indent=2, default=_jsonable) + "\n")
    figure.savefig(out / f"{result.name}.png", dpi=80, bbox_inches="tight")
    tracker.image(f"figures/{result.name}", figure)
    summary: dict[str, Any] = {"verdict": result.verdict, "wall_time_s": result.wall_time_s}
    summary.update(_flatten(result.measured, "measured/"))
    tracker.summary(summary)
    import matplotlib.pyplot as plt

    plt.close(figure)
    return path


def _jsonable(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.tolist()
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def _flatten(data: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{prefix}{key}/"))
        elif isinstance(value, (int, float, str, bool)) or value is None:
            flat[f"{prefix}{key}"] = value
    return flat


def figure_row(columns: int, width: float = 4.0) -> tuple[Any, Any]:
    """A figure with ``columns`` axes side by side (Agg backend: no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, columns, figsize=(width * columns, 3.6), squeeze=False)
    return fig, axes[0]
