"""One training run: one strategy on one benchmark, tracked in W&B.

    python -m experiments.train --strategy mgda                       # Multi-Digits
    python -m experiments.train --benchmark nyuv2 --data-dir data/nyuv2 --strategy nash_mtl \\
        --grad-source shared_params --device cuda --amp
    torchrun --nproc_per_node=2 -m experiments.train --benchmark cityscapes --data-dir ...

The benchmark's recipe (optimizer, learning rate and schedule, epochs, batch size) applies unless
overridden (``--epochs``, ``--steps``, ``--batch-size``, ``--lr``); ``--strategy
single-task:<task>`` trains a single-task network. The loop is
:func:`experiments.training.train_run`; the final test metrics are printed, written to
``<out>/metrics.json`` and put in the run's W&B summary (rank 0).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from experiments.runner import config_dict, parse_config, start_tracking
from experiments.training import (
    SINGLE,
    BenchmarkConfig,
    load_benchmark,
    setup_distributed,
    train_run,
)
from taskbalance.integrations.wandb import Tracker
from taskbalance.registry import strategy_info


@dataclass
class TrainConfig(BenchmarkConfig):
    """One training run of one strategy on one benchmark."""

    out: str = field(default="results/train", metadata={"help": "directory for the outputs"})
    strategy: str = field(
        default="equal", metadata={"help": "registered strategy or single-task:<task>"}
    )
    seed: int = field(default=0, metadata={"help": "seed of the model, data order and strategy"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.strategy.startswith(f"{SINGLE}:"):
            strategy_info(self.strategy)  # an unknown name raises with the close matches


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    """Train; return the final test metrics (``<task>/<metric>``; empty on ranks other than 0)."""
    config = parse_config(TrainConfig, argv)
    place = setup_distributed(config.device)
    bench = load_benchmark(config)
    if config.strategy.startswith(f"{SINGLE}:"):
        task = config.strategy.split(":", 1)[1]
        if task not in bench.tasks:
            raise SystemExit(f"{bench.name} has no task {task!r}; its tasks: {bench.tasks}")
    name = f"{bench.name}-{config.strategy}-s{config.seed}"
    tracker = start_tracking(config, name=name) if place.main else Tracker()
    checkpoint = None
    if config.checkpoint_dir is not None:
        checkpoint = Path(config.checkpoint_dir) / f"{name.replace(':', '-')}.pt"
    result, _ = train_run(
        config, bench, config.strategy, config.seed, tracker, place=place, checkpoint=checkpoint
    )
    if not place.main:
        return {}
    tracker.summary({f"final/{k}": v for k, v in result.metrics.items()} | {"status": "ok"})
    tracker.finish()
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    record = {"config": config_dict(config), "metrics": result.metrics, "steps": result.steps_done}
    (out / "metrics.json").write_text(json.dumps(record, indent=2))
    for metric, value in result.metrics.items():
        print(f"{metric}: {value:.4f}")
    return result.metrics


if __name__ == "__main__":
    main()
