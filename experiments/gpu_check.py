"""The GPU check of issue 15 in one command: ``python -m experiments.gpu_check [--out DIR]``.

On a CUDA machine, in this order, each step under its own time limit, everything written to
``--out`` (default: ``$OUT`` when set, else ``docs/benchmark/gpu``):

1. ``pytest tests/test_device.py -k cuda``: every registered strategy's backward on CUDA
   against float64 on the CPU, fp16 autocast with a ``GradScaler`` and bf16 autocast
   (``tests.txt``, ``tests.xml``);
2. ``python -m experiments.benchmark --device cuda --sync-check``: first the sync check (every
   strategy and path with ``check_finite = False`` under ``torch.cuda.set_sync_debug_mode``),
   then the NYUv2 SegNet-MTAN and SegNet tables at the real input size and the MLP table
   (T = 10) (``benchmark.md``, ``benchmark.json``, rewritten after every strategy, so a step cut
   short by its limit still leaves what it measured; ``benchmark.log``);
3. ``summary.md`` and ``summary.json``: the machine, each step's command, exit status and time.

The default limits (2 + 6⅔ minutes, inside one 10-minute command) leave room in a 15-minute
device budget for the machine's start; ``--tests-limit`` and ``--benchmark-limit`` change them.
``--device cpu --quick`` runs the same steps on the CPU at toy sizes, to try the plumbing.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from experiments.runner import markdown_table, parse_config

__all__ = ["GpuCheckConfig", "main", "plan"]


@dataclass
class GpuCheckConfig:
    """The GPU check of issue 15: device tests, sync check, MLP and SegNet tables."""

    out: str = field(
        default_factory=lambda: os.environ.get("OUT", "docs/benchmark/gpu"),
        metadata={"help": "output folder (default: $OUT, else docs/benchmark/gpu)"},
    )
    device: str = "cuda"
    quick: bool = field(default=False, metadata={"help": "toy sizes (to try it on the CPU)"})
    tests: bool = True
    benchmark: bool = True
    tests_limit: float = field(default=120.0, metadata={"help": "seconds for the tests"})
    benchmark_limit: float = field(default=400.0, metadata={"help": "seconds for the tables"})
    tasks: list[int] = field(default_factory=lambda: [10], metadata={"help": "MLP task counts"})


@dataclass
class Step:
    """One command of the check, its time limit and the file that takes its output."""

    name: str
    command: list[str]
    limit: float
    log: str


def plan(config: GpuCheckConfig) -> list[Step]:
    """The commands the check runs, in order."""
    out = Path(config.out)
    steps = []
    if config.tests:
        half = "cuda" if config.device.startswith("cuda") else "cpu"
        pytest = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs"]
        pytest += ["tests/test_device.py", "-k", half, f"--junitxml={out / 'tests.xml'}"]
        steps.append(Step("device tests", pytest, config.tests_limit, "tests.txt"))
    if config.benchmark:
        bench = [sys.executable, "-m", "experiments.benchmark", "--device", config.device]
        # SegNet-MTAN first: the targets are on it, and a step cut short keeps it
        bench += ["--sync-check", "--out", str(out), "--models", "segnet_mtan", "segnet", "mlp"]
        bench += ["--tasks", *map(str, config.tasks), "--no-toy", "--min-seconds", "1"]
        if config.quick:
            bench += ["--quick", "--segnet-width", "0.03125"]
        steps.append(Step("benchmark", bench, config.benchmark_limit, "benchmark.log"))
    return steps


def _machine(device: str) -> dict[str, Any]:
    info: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__}
    if device.startswith("cuda") and torch.cuda.is_available():
        properties = torch.cuda.get_device_properties(0)
        info.update(
            gpu=properties.name,
            memory_gib=round(properties.total_memory / 2**30, 1),
            cuda=torch.version.cuda,
            cudnn=torch.backends.cudnn.version(),
        )
    return info


def run_step(step: Step, out: Path) -> dict[str, Any]:
    """Run ``step`` with its output in ``out / step.log``; its exit status and seconds."""
    start = time.perf_counter()
    with open(out / step.log, "w") as log:
        try:
            returncode: int | str = subprocess.run(
                step.command, stdout=log, stderr=subprocess.STDOUT, timeout=step.limit
            ).returncode
        except subprocess.TimeoutExpired:
            returncode = f"stopped at its limit ({step.limit:g} s)"
    return {
        "step": step.name,
        "command": " ".join(step.command),
        "exit": returncode,
        "seconds": round(time.perf_counter() - start, 1),
        "output": step.log,
    }


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    config = parse_config(GpuCheckConfig, argv)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    machine = _machine(config.device)
    if config.device.startswith("cuda") and not torch.cuda.is_available():
        (out / "summary.md").write_text("No CUDA device: nothing was run.\n")
        sys.exit("gpu_check: no CUDA device here (use --device cpu --quick to try the steps)")
    results = []
    for step in plan(config):
        print(f"gpu_check: {step.name} (limit {step.limit:g} s)", file=sys.stderr, flush=True)
        results.append(run_step(step, out))
        print(f"gpu_check: {results[-1]}", file=sys.stderr, flush=True)
        summary = {"machine": machine, "steps": results}
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        lines = ", ".join(f"{key} {value}" for key, value in machine.items())
        (out / "summary.md").write_text(f"Machine: {lines}.\n\n{markdown_table(results)}")
    return results


if __name__ == "__main__":
    main()
