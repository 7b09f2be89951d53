"""Paper reproductions, each with the published numbers, a criterion and an honest verdict.

    python -m experiments.reproduce NAME [--out DIR] [--seed 0] [--quick] [--wandb-mode offline]

``NAME`` is one of ``kendall_toy``, ``gradnorm_toy``, ``cagrad_toy``, ``famo_toy``,
``multi_digits`` or ``all``. Each writes ``<out>/<NAME>.json`` (``measured``, ``published``
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
)
from experiments.reproductions.common import ReproduceConfig, Result
from experiments.runner import parse_config

REPRODUCTIONS: dict[str, ModuleType] = {
    module.NAME: module
    for module in (kendall_toy, gradnorm_toy, cagrad_toy, famo_toy, multi_digits)
}
NAMES = tuple(REPRODUCTIONS)


def run(config: ReproduceConfig) -> list[Result]:
    """Run one reproduction (or all of them) and print one line per verdict."""
    torch.set_num_threads(config.threads)
    names = NAMES if config.name == "all" else (config.name,)
    results = []
    for name in names:
        result, _ = REPRODUCTIONS[name].run(config)
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
