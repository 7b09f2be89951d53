"""Paper reproductions, each with the published numbers, a criterion and an honest verdict.

    python -m experiments.reproduce NAME [--out DIR] [--seed 0] [--quick] [--wandb-mode offline]

``NAME`` is one of ``kendall_toy``, ``gradnorm_toy``, ``cagrad_toy``, ``famo_toy``,
``multi_digits``, ``multimnist`` or ``all``. The reproductions of a benchmark table
(``multi_digits``, ``multimnist``) take ``--benchmark``, ``--data-dir``, ``--option``,
``--device`` and ``--amp`` (``multimnist`` needs ``--data-dir``, the folder of the MNIST
IDX files; ``all`` skips it without one); the toys run on the CPU and refuse benchmark
options. Each writes ``<out>/<NAME>.json`` (``measured``, ``published``
with its source, ``criterion``, the individual ``checks`` and ``verdict``: ``"reproduced"`` or
``"not reproduced"``) and ``<out>/<NAME>.png``, and logs its curves, figure and summary to
Weights & Biases (offline by default, under ``<out>/wandb``).

Each reproduction is a module of :mod:`experiments.reproductions` whose ``verdict(measured)``
judges the measured values alone, so that ``verdict(json["measured"])`` of a result file gives
its checks and verdict again. The reproductions use the papers' settings; ``--quick`` shortens
every run (fewer steps or epochs) to check that the script works, and its verdicts say nothing
about the papers. A criterion is fixed before the run and never tuned to pass: a mismatch is
reported with what differs. A method whose strategy is not registered (or left out with
``--only``) is listed under ``missing``, and its claims fail as not measured.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Sequence
from types import ModuleType

import torch

from experiments.reproductions import (
    cagrad_toy,
    famo_toy,
    gradnorm_toy,
    kendall_toy,
    multi_digits,
    multimnist,
)
from experiments.reproductions.common import ReproduceConfig, Result
from experiments.runner import parse_config

REPRODUCTIONS: dict[str, ModuleType] = {
    module.NAME: module
    for module in (kendall_toy, gradnorm_toy, cagrad_toy, famo_toy, multi_digits, multimnist)
}
NAMES = tuple(REPRODUCTIONS)
ON_BENCHMARKS = frozenset({multi_digits.NAME, multimnist.NAME})
NEEDS_DATA = frozenset({multimnist.NAME})


def run(config: ReproduceConfig) -> list[Result]:
    """Run one reproduction (or all of them) and print one line per verdict."""
    torch.set_num_threads(config.threads)
    names = NAMES if config.name == "all" else (config.name,)
    if config.name == "all" and config.data_dir is None:
        skipped = [n for n in names if n in NEEDS_DATA]
        names = tuple(n for n in names if n not in NEEDS_DATA)
        print(f"skipped {', '.join(skipped)}: needs --data-dir", flush=True)
    given = config.benchmark or config.data_dir or config.option
    if given and config.name not in ON_BENCHMARKS | {"all"}:
        raise SystemExit(
            "--benchmark, --data-dir and --option apply to the benchmark reproductions "
            f"({', '.join(sorted(ON_BENCHMARKS))}) only"
        )
    if config.name == "all" and (config.benchmark or config.option):
        raise SystemExit("--benchmark and --option need one reproduction, not all")
    results = []
    for name in names:
        # with all, the data directory is multimnist's
        own = config if name in NEEDS_DATA else dataclasses.replace(config, data_dir=None)
        result, _ = REPRODUCTIONS[name].run(own)
        results.append(result)
        print(f"{name}: {result.verdict} ({result.wall_time_s:.1f} s) -> {config.out}/{name}.json")
    return results


def main(argv: Sequence[str] | None = None) -> list[Result]:
    arguments = list(sys.argv[1:] if argv is None else argv)
    if arguments and not arguments[0].startswith("-"):  # the NAME positional
        arguments = ["--name", arguments[0], *arguments[1:]]
    return run(parse_config(ReproduceConfig, arguments))


if __name__ == "__main__":
    main()
