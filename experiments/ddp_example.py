"""Multi-task training under DistributedDataParallel with any strategy.

``torchrun --nproc_per_node=2 -m experiments.ddp_example [--strategy mgda] [--steps 50]``
(also runs as a single process: ``python -m experiments.ddp_example``).

A tanh trunk with three regression heads of different loss scales on synthetic data. Every rank
builds the same model and the same strategy; the model is wrapped in
:class:`~torch.nn.parallel.DistributedDataParallel`; each rank trains on its own slice of the
global batch. The strategy reduces its loss statistics and per-task gradients over the ranks
(see :mod:`taskbalance.distributed`), so every rank computes the same weights and DDP's own
all-reduce of the final weighted gradient is the only reduction of the model's gradients.

Options: ``--amp`` runs the forward under bf16 autocast (CPU) or fp16 autocast with a
``GradScaler`` (CUDA); ``--accumulate N`` splits each rank's batch into ``N`` micro-batches
through :class:`~taskbalance.accumulation.GradientAccumulator` (one strategy step per optimizer
step). Only rank 0 logs (W&B offline by default, ``train/loss/<task>``, ``weights/<task>``). At
the end every rank's parameters are compared with rank 0's, and the script fails if they
differ.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor, nn

import taskbalance as tb
from experiments.runner import (
    RunConfig,
    parse_config,
    report_row,
    seed_everything,
    start_tracking,
)
from taskbalance.accumulation import GradientAccumulator

TASKS = ("a", "b", "c")
SCALES = {"a": 1.0, "b": 10.0, "c": 0.1}


@dataclass
class DDPConfig(RunConfig):
    """Multi-task training under DDP with any taskbalance strategy."""

    strategy: str = field(default="mgda", metadata={"help": "registered strategy name"})
    path: str = field(default="shared_params", metadata={"help": "shared_params or features"})
    steps: int = field(default=50, metadata={"help": "optimizer steps"})
    batch: int = field(default=64, metadata={"help": "global batch (split over the ranks)"})
    lr: float = field(default=1e-2, metadata={"help": "Adam learning rate"})
    amp: bool = field(default=False, metadata={"help": "autocast (bf16 on CPU, fp16 + scaler)"})
    accumulate: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    seed: int = field(default=0, metadata={"help": "seed (the same on every rank)"})

    def __post_init__(self) -> None:
        if self.path not in ("shared_params", "features"):
            raise ValueError(f"path must be shared_params or features, got {self.path!r}")
        if self.accumulate < 1:
            raise ValueError("accumulate must be >= 1")
        if self.accumulate > 1 and self.path != "shared_params":
            raise ValueError("--accumulate needs --path shared_params")


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 16), nn.Tanh())
        self.heads = nn.ModuleDict({t: nn.Linear(16, 1) for t in TASKS})

    def forward(self, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        features = self.trunk(x)
        return features, {t: head(features).squeeze(1) for t, head in self.heads.items()}


def global_batch(step: int, size: int) -> tuple[Tensor, Tensor]:
    """The same global batch on every rank (each takes its own slice)."""
    generator = torch.Generator().manual_seed(10_000 + step)
    x = torch.randn(size, 8, generator=generator)
    y = torch.stack([x[:, :4].sum(1).sin(), x[:, 4:].prod(1), x[:, 0] * x[:, 7]], dim=1)
    return x, y


def task_losses(outputs: dict[str, Tensor], y: Tensor) -> dict[str, Tensor]:
    return {
        t: SCALES[t] * nn.functional.mse_loss(outputs[t].float(), y[:, i])
        for i, t in enumerate(TASKS)
    }


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    config = parse_config(DDPConfig, argv)
    distributed = "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1
    cuda = torch.cuda.is_available()
    if distributed:
        dist.init_process_group("nccl" if cuda else "gloo")
    rank = dist.get_rank() if distributed else 0
    world = dist.get_world_size() if distributed else 1
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    if config.batch % (world * config.accumulate):
        raise SystemExit("--batch must be divisible by ranks × accumulate")

    seed_everything(config.seed)  # the same model and strategy on every rank
    inner = Net().to(device)
    model = nn.parallel.DistributedDataParallel(inner) if distributed else inner
    strategy = tb.create_strategy(config.strategy, TASKS).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    scaler = torch.amp.GradScaler("cuda") if (config.amp and cuda) else None
    autocast_dtype = torch.float16 if cuda else torch.bfloat16
    accumulator = (
        GradientAccumulator(strategy, inner.parameters(), shared_params=inner.trunk.parameters())
        if config.accumulate > 1
        else None
    )
    tracker = start_tracking(config, name=f"ddp-{config.strategy}") if rank == 0 else None

    local = config.batch // world
    report = None
    for step in range(config.steps):
        x, y = global_batch(step, config.batch)
        x, y = x[rank * local : (rank + 1) * local].to(device), y[rank * local : (rank + 1) * local]
        y = y.to(device)
        optimizer.zero_grad(set_to_none=True)
        if accumulator is None:
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=config.amp):
                features, outputs = model(x)
            losses = task_losses(outputs, y)
            kwargs = (
                {"features": features}
                if config.path == "features"
                else {"shared_params": inner.trunk.parameters()}
            )
            report = strategy.backward(losses, scaler=scaler, **kwargs)
        else:
            # No DDP backward runs here: the accumulator reduces once, in step().
            sync = model.no_sync() if distributed else contextlib.nullcontext()
            with sync:
                for xb, yb in zip(x.chunk(config.accumulate), y.chunk(config.accumulate)):
                    with torch.autocast(device.type, dtype=autocast_dtype, enabled=config.amp):
                        _, outputs = model(xb)
                    accumulator.backward(task_losses(outputs, yb), scaler=scaler)
            report = accumulator.step(scaler=scaler)
        if scaler is None:
            optimizer.step()
        else:
            scaler.step(optimizer)
            scaler.update()
        if tracker is not None:
            row = report_row(report)
            tracker.log(row, step=step)  # extras and solver fallbacks included
            if step % 10 == 0 or step == config.steps - 1:
                shown = "  ".join(
                    f"{t}: loss {row[f'train/loss/{t}']:.4f} w {row[f'weights/{t}']:.3f}"
                    for t in report.tasks
                )
                print(f"step {step:4d}  {shown}", flush=True)

    # Every rank must hold rank 0's parameters, bit for bit.
    flat = torch.cat([p.detach().reshape(-1) for p in inner.parameters()])
    reference = flat.clone()
    if distributed:
        dist.broadcast(reference, src=0)
    mismatch = float((flat - reference).abs().max())
    if distributed:
        worst = torch.tensor(mismatch, device=device)
        dist.all_reduce(worst, op=dist.ReduceOp.MAX)
        mismatch = float(worst)
    if rank == 0:
        print(f"{world} rank(s), strategy {config.strategy}: max parameter difference {mismatch}")
    if tracker is not None:
        tracker.finish()
    if distributed:
        dist.destroy_process_group()
    if mismatch != 0.0:
        raise SystemExit(f"ranks diverged (max parameter difference {mismatch})")
    assert report is not None
    return {k: v for k, v in report.to_dict().items()}


if __name__ == "__main__":
    main()
