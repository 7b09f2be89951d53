"""The training loop every script shares: one method on one benchmark, on any device, with
mixed precision and under ``torchrun`` (DDP).

A run builds the benchmark's model (all tasks, or one task for a single-task baseline
``"single-task:<task>"``), the recipe's optimizer and learning-rate schedule, and the strategy;
then, per step: forward (under autocast with ``--amp``), the benchmark's losses, the strategy's
backward (``features=`` or ``shared_params=`` for gradient-level strategies), the optimizer
step; per epoch: the schedule, the strategy's ``end_epoch`` and the evaluation on the test
split.

* **Data order** is a pure function of ``(seed, step)`` (:func:`~experiments.runner.batch_indices`:
  a fresh permutation per epoch, last partial batch dropped), so a resumed run sees exactly the
  batches of the uninterrupted one. Random augmentation (NYUv2, Cityscapes) draws from the
  global generator of the process (of the DataLoader worker with ``--workers``): after a resume
  the crops differ.
* **Mixed precision** (``--amp``): bf16 autocast on CPU; fp16 autocast with a ``GradScaler`` on
  CUDA (passed to the strategy, which unscales what it measures). Losses are computed in float32.
* **DDP**: under ``torchrun`` every rank builds the same model and strategy (same seed); each
  takes its slice of the global batch (``batch_size`` is the global batch); the model is wrapped
  in ``DistributedDataParallel`` and the strategy reduces its statistics over the ranks. Rank 0
  alone evaluates (on the whole test split, with the unwrapped model) and logs.
* **Following a run**: on a terminal a tqdm bar; otherwise (``nohup``, SLURM, a pipe) a line on
  standard error per epoch, or every ``--progress-every`` steps, with the run, the step, the
  training losses, the evaluation and an ETA (:class:`~experiments.runner.ProgressLines`).
* **Config**: the run's W&B config (and its history file's header) holds the script's settings
  and, from :func:`strategy_config`, the strategy's resolved constructor arguments
  (``strategy_args``, with the seed it was given).
"""

from __future__ import annotations

import ast
import contextlib
import math
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate

import taskbalance as tb
from experiments.benchmarks import Benchmark, MultiTaskModel, get_benchmark, list_benchmarks
from experiments.benchmarks.classification import Collated
from experiments.runner import (
    ProgressLines,
    RunConfig,
    Tracker,
    batch_indices,
    load_checkpoint,
    progress,
    report_row,
    save_checkpoint,
    seed_everything,
    unknown_name,
)
from taskbalance.diagnostics import gradient_diagnostics
from taskbalance.jacobian import jacobian
from taskbalance.registry import strategy_info

__all__ = [
    "BenchmarkConfig",
    "Distributed",
    "RunResult",
    "Setup",
    "evaluate",
    "gradient_source",
    "load_benchmark",
    "parse_options",
    "setup_distributed",
    "strategy_config",
    "train_run",
]

SINGLE = "single-task"
# Strategies that average each task's gradient over steps (MoCo's tracked gradients, DB-MTL's
# EMA): the entries of a gradient w.r.t. the features belong to other examples in every batch,
# so an average over steps means nothing there. They always use the trunk's parameters.
PARAMETER_GRADIENTS = frozenset({"moco", "db_mtl"})


@dataclass
class BenchmarkConfig(RunConfig):
    """Settings of a training run on a benchmark (every script has them)."""

    benchmark: str = field(
        default="multi_digits",
        metadata={"help": "registered benchmark or 'package.module:attribute' (your own)"},
    )
    data_dir: str | None = field(
        default=None, metadata={"help": "the benchmark's data directory (prepared by you)"}
    )
    option: list[str] = field(
        default_factory=list,
        metadata={"help": "benchmark options KEY=VALUE (e.g. model=segnet width=0.5)"},
    )
    device: str = field(default="cpu", metadata={"help": "cpu, cuda or cuda:N (DDP: cuda)"})
    amp: bool = field(
        default=False, metadata={"help": "mixed precision: bf16 on CPU, fp16 + GradScaler on CUDA"}
    )
    epochs: int | None = field(default=None, metadata={"help": "epochs (default: the recipe's)"})
    steps: int | None = field(default=None, metadata={"help": "training steps (overrides epochs)"})
    batch_size: int | None = field(
        default=None, metadata={"help": "global batch size (default: the recipe's)"}
    )
    lr: float | None = field(default=None, metadata={"help": "learning rate (default: recipe's)"})
    grad_source: Literal["features", "shared_params"] = field(
        default="features", metadata={"help": "what gradient-level strategies differentiate"}
    )
    diagnostics_every: int = field(
        default=25, metadata={"help": "steps between grad/cos diagnostics (0: never)"}
    )
    eval_batches: int | None = field(
        default=None, metadata={"help": "evaluate on at most this many test batches"}
    )
    workers: int = field(default=0, metadata={"help": "DataLoader worker processes"})
    checkpoint_dir: str | None = field(
        default=None, metadata={"help": "save a checkpoint per run each epoch here"}
    )
    resume: bool = field(default=False, metadata={"help": "continue runs from checkpoint_dir"})
    progress_every: int | None = field(
        default=None,
        metadata={
            "help": "away from a terminal (nohup, SLURM): a progress line every this many "
            "steps; none: one per epoch; 0: no lines"
        },
    )

    def __post_init__(self) -> None:
        if ":" not in self.benchmark and self.benchmark not in list_benchmarks():
            known = unknown_name("benchmark", self.benchmark, list_benchmarks())
            raise ValueError(f"{known}; or your own as 'package.module:attribute'")
        if self.progress_every is not None and self.progress_every < 0:
            raise ValueError(f"progress_every must be >= 0, got {self.progress_every}")
        for name in ("epochs", "steps", "batch_size", "eval_batches"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if self.lr is not None and not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a positive number, got {self.lr}")
        if self.workers < 0:
            raise ValueError(f"workers must be >= 0, got {self.workers}")
        if self.resume and self.checkpoint_dir is None:
            raise ValueError("resume needs checkpoint_dir")
        parse_options(self.option)


def parse_options(items: Sequence[str]) -> dict[str, Any]:
    """``["width=0.5", "model=segnet"]`` -> ``{"width": 0.5, "model": "segnet"}`` (values are
    Python literals where they parse as one, else strings).

    >>> parse_options(["width=0.5", "model=segnet", "size=(64, 64)"])
    {'width': 0.5, 'model': 'segnet', 'size': (64, 64)}
    """
    options: dict[str, Any] = {}
    for item in items:
        key, equals, text = item.partition("=")
        if not equals or not key.isidentifier():
            raise ValueError(f"benchmark option {item!r} is not KEY=VALUE")
        try:
            options[key] = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            options[key] = text
    return options


def load_benchmark(config: BenchmarkConfig) -> Benchmark:
    """The benchmark the config names, with its data directory and options."""
    return get_benchmark(config.benchmark, config.data_dir, **parse_options(config.option))


def gradient_source(method: str, grad_source: str) -> str | None:
    """What ``method`` differentiates: None (loss-level), "features" or "shared_params"."""
    if method.startswith(f"{SINGLE}:") or not strategy_info(method).needs_grads:
        return None
    return "shared_params" if method in PARAMETER_GRADIENTS else grad_source


# --------------------------------------------------------------------------- processes
@dataclass(frozen=True)
class Distributed:
    """This process's place: rank, number of ranks and device."""

    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: str) -> Distributed:
    """Join the ``torchrun`` process group (gloo on CPU, NCCL on CUDA) when there is one; each
    rank on CUDA takes ``cuda:LOCAL_RANK``."""
    wanted = torch.device(device)
    if wanted.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: CUDA is not available here")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Distributed(device=wanted)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if wanted.type == "cuda" else "gloo")
    if wanted.type == "cuda":
        wanted = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(wanted)
    return Distributed(dist.get_rank(), dist.get_world_size(), wanted)


# --------------------------------------------------------------------------- data
class StepBatches(Sampler[list[int]]):
    """The indices of steps ``start..stop-1`` (this rank's slice of each global batch)."""

    def __init__(
        self, count: int, batch_size: int, seed: int, start: int, stop: int, place: Distributed
    ) -> None:
        if batch_size % place.world:
            raise ValueError(f"batch size {batch_size} is not divisible by {place.world} ranks")
        self.count, self.batch_size, self.seed = count, batch_size, seed
        self.start, self.stop, self.place = start, stop, place

    def __len__(self) -> int:
        return self.stop - self.start

    def __iter__(self) -> Iterator[list[int]]:
        local = self.batch_size // self.place.world
        for step in range(self.start, self.stop):
            index = batch_indices(self.count, self.batch_size, seed=self.seed, step=step)
            yield index[self.place.rank * local : (self.place.rank + 1) * local].tolist()


def collate(items: Any) -> Any:
    """Default collation, except for batches a dataset's ``__getitems__`` collated itself."""
    return tuple(items) if isinstance(items, Collated) else default_collate(items)


def _strategy_kwargs(method: str, seed: int) -> dict[str, Any]:
    return {"seed": seed} if "seed" in strategy_info(method).defaults else {}


def make_strategy(method: str, tasks: Sequence[str], seed: int) -> tb.Strategy:
    """``method`` for ``tasks``, with ``seed=seed`` when the strategy takes a seed."""
    return tb.create_strategy(method, tasks, **_strategy_kwargs(method, seed))


def _config_value(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_config_value(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _config_value(v) for k, v in value.items()}
    return repr(value)


def strategy_config(method: str, tasks: Sequence[str], seed: int) -> dict[str, Any]:
    """What the run's config records about its method: ``strategy`` (the name),
    ``strategy_class`` and ``strategy_args``, every constructor argument as the strategy
    resolves it (the defaults filled in, as its ``repr`` shows them, ``seed`` where it takes one).
    A single-task network has no strategy: ``strategy_class`` and ``strategy_args`` are None.

        >>> strategy_config("rlw", ["left", "right"], seed=3)["strategy_args"]
        {'tasks': ['left', 'right'], 'distribution': 'normal', 'total': 1.0, 'seed': 3}
    """
    if method.startswith(f"{SINGLE}:"):
        return {"strategy": method, "strategy_class": None, "strategy_args": None}
    info = strategy_info(method)
    # The constructor's defaults with what make_strategy passes: what it builds.
    arguments = {"tasks": list(tasks), **info.defaults, **_strategy_kwargs(method, seed)}
    return {
        "strategy": method,
        "strategy_class": info.cls.__qualname__,
        "strategy_args": {name: _config_value(value) for name, value in arguments.items()},
    }


def own_generator(seed: int, step: int) -> torch.Generator:
    """A DataLoader's own generator: creating its iterator draws the workers' base seed from it,
    not from the global generator, whose state a checkpoint restores exactly."""
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


def to_device(
    batch: tuple[Tensor, Mapping[str, Tensor]], device: torch.device
) -> tuple[Tensor, dict[str, Tensor]]:
    inputs, targets = batch
    moved = {t: y.to(device, non_blocking=True) for t, y in targets.items()}
    return inputs.to(device, non_blocking=True), moved


def autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager[Any]:
    """bf16 autocast on CPU, fp16 on CUDA (with the GradScaler of :class:`Setup`)."""
    dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    return torch.autocast(device.type, dtype=dtype, enabled=enabled)


def float_outputs(outputs: Mapping[str, Tensor]) -> dict[str, Tensor]:
    return {t: o.float() for t, o in outputs.items()}


# --------------------------------------------------------------------------- one run
@dataclass
class RunResult:
    """One training run: final test metrics, per-step timings and logged histories."""

    method: str
    seed: int
    metrics: dict[str, float] = field(default_factory=dict)
    step_seconds: list[float] = field(default_factory=list)
    weights: list[list[float]] = field(default_factory=list)
    cosine: list[tuple[int, float]] = field(default_factory=list)
    error: str | None = None
    steps_done: int = 0
    failures: int = 0  # the strategy's count of failed steps (solver fallbacks), if it reports one


@dataclass
class Setup:
    """A model, its optimizer and schedule and (unless single-task) a strategy, ready to train."""

    method: str
    tasks: tuple[str, ...]
    bench: Benchmark
    model: MultiTaskModel
    wrapped: nn.Module  # the model, or its DistributedDataParallel wrapper
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    strategy: tb.Strategy | None
    scaler: torch.amp.GradScaler | None
    source: str | None  # None, "features" or "shared_params"
    amp: bool
    device: torch.device

    @classmethod
    def build(
        cls, config: BenchmarkConfig, bench: Benchmark, method: str, place: Distributed, seed: int
    ) -> Setup:
        """``method`` is a strategy name or ``"single-task:<task>"`` (one network, one head).
        A random strategy (one that takes ``seed=``) draws from the run's ``seed``, so runs with
        several seeds vary its draws as they vary the initialisation."""
        single = method.startswith(f"{SINGLE}:")
        tasks = (method.split(":", 1)[1],) if single else tuple(bench.tasks)
        model = bench.model(tasks).to(place.device)
        wrapped: nn.Module = model
        if place.world > 1:
            ids = [place.device.index] if place.device.type == "cuda" else None
            wrapped = nn.parallel.DistributedDataParallel(model, device_ids=ids)
        optimizer = bench.recipe.make_optimizer(model.parameters(), lr=config.lr)
        scheduler = bench.recipe.make_scheduler(optimizer)
        strategy = None if single else make_strategy(method, tasks, seed).to(place.device)
        cuda_amp = config.amp and place.device.type == "cuda"
        scaler = torch.amp.GradScaler("cuda") if cuda_amp else None
        source = gradient_source(method, config.grad_source)
        return cls(
            method, tasks, bench, model, wrapped, optimizer, scheduler, strategy, scaler,
            source, config.amp, place.device,
        )  # fmt: skip

    def forward(
        self, inputs: Tensor, targets: Mapping[str, Tensor]
    ) -> tuple[Tensor, dict[str, Tensor]]:
        with autocast(self.device, self.amp):
            features, outputs = self.wrapped(inputs)
        return features, self.bench.losses(float_outputs(outputs), targets)

    def update(self, features: Tensor, losses: dict[str, Tensor]) -> tb.StepReport | None:
        """Backward with the strategy (plain backward for single-task) and the optimizer step."""
        self.optimizer.zero_grad(set_to_none=True)
        if self.strategy is None:
            loss = losses[self.tasks[0]]
            (loss if self.scaler is None else self.scaler.scale(loss)).backward()
            report = None
        else:
            kwargs: dict[str, Any] = {"scaler": self.scaler}
            if self.source == "features":
                kwargs["features"] = features
            elif self.source == "shared_params":
                kwargs["shared_params"] = self.model.shared_parameters()
            report = self.strategy.backward(losses, **kwargs)
        if self.scaler is None:
            self.optimizer.step()
        else:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        return report

    def end_epoch(self) -> None:
        self.scheduler.step()
        if self.strategy is not None:  # a single-task network has no strategy
            self.strategy.end_epoch()

    def state(self) -> dict[str, Any]:
        """What a checkpoint needs besides model, optimizer and strategy."""
        state: dict[str, Any] = {"scheduler": self.scheduler.state_dict()}
        if self.scaler is not None:
            state["scaler"] = self.scaler.state_dict()
        return state

    def load_state(self, state: Mapping[str, Any]) -> None:
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])


def eval_loader(bench: Benchmark, split: str, workers: int, device: torch.device) -> DataLoader:
    dataset: Dataset[Any] = bench.dataset(split)
    size = bench.recipe.eval_batch_size or bench.recipe.batch_size
    return DataLoader(
        dataset,
        batch_size=size,
        shuffle=False,
        num_workers=workers,
        collate_fn=collate,
        pin_memory=device.type == "cuda",
        generator=own_generator(0, 0),
    )


def evaluate(
    model: MultiTaskModel,
    bench: Benchmark,
    tasks: Sequence[str],
    loader: DataLoader,
    *,
    amp: bool = False,
    max_batches: int | None = None,
) -> dict[str, float]:
    """The benchmark's metrics of ``tasks`` on ``loader`` as ``val/<task>/<metric>``, and the
    mean test loss per task as ``val/loss/<task>``."""
    device = next(model.parameters()).device
    evaluator = bench.evaluator(tasks)
    totals = torch.zeros(len(tasks), dtype=torch.float64, device=device)
    batches = 0
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for batch in loader:
            if max_batches is not None and batches >= max_batches:
                break
            inputs, targets = to_device(batch, device)
            with autocast(device, amp):
                _, outputs = model(inputs)
            outputs = float_outputs(outputs)
            evaluator.update(outputs, targets)
            losses = bench.losses(outputs, targets)
            totals += torch.stack([losses[t].double() for t in tasks])
            batches += 1
    model.train(was_training)
    if not batches:
        raise ValueError(f"{bench.name}: the test split has no batch")
    values = {f"val/{name}": value for name, value in evaluator.compute().items()}
    mean_losses = (totals / batches).tolist()
    values.update({f"val/loss/{t}": v for t, v in zip(tasks, mean_losses)})
    return values


def run_length(config: BenchmarkConfig, bench: Benchmark, count: int) -> tuple[int, int, int]:
    """(steps of the run, steps per epoch, global batch size) for ``count`` training examples."""
    batch = config.batch_size or bench.recipe.batch_size
    if batch > count:
        raise ValueError(
            f"batch size {batch} exceeds the {count} training examples of {bench.name}"
        )
    per_epoch = count // batch
    steps = config.steps or (config.epochs or bench.recipe.epochs) * per_epoch
    return steps, per_epoch, batch


def train_run(
    config: BenchmarkConfig,
    bench: Benchmark,
    method: str,
    seed: int,
    tracker: Tracker,
    *,
    place: Distributed | None = None,
    checkpoint: Path | None = None,
    stop_after: int | None = None,
) -> tuple[RunResult, MultiTaskModel]:
    """Train one model with strategy ``method`` (or ``"single-task:<task>"``) and seed ``seed``.

    With ``checkpoint``, state is saved there at every epoch end (and at ``stop_after``); with
    ``config.resume`` and an existing file, the run continues from it exactly. ``stop_after``
    ends the run early after that many steps (for tests of resuming). The result's metrics are
    the final test metrics (rank 0; empty on the other ranks).
    """
    place = place or Distributed(device=torch.device(config.device))
    seed_everything(seed)
    setup = Setup.build(config, bench, method, place, seed)
    model, tasks = setup.model, setup.tasks
    tracker.update_config(strategy_config(method, tasks, seed))
    result = RunResult(method, seed)
    train = bench.dataset("train")
    steps, per_epoch, batch = run_length(config, bench, len(train))
    start = 0
    if checkpoint is not None and config.resume and checkpoint.exists():
        state = load_checkpoint(
            checkpoint,
            model=model,
            optimizer=setup.optimizer,
            strategy=setup.strategy,
            map_location=place.device,
        )
        start = state.step
        setup.load_state(state.extra["setup"])
        result.step_seconds = list(state.extra.get("step_seconds", []))
        result.weights = [list(w) for w in state.extra.get("weights", [])]
        result.cosine = [(int(s), float(c)) for s, c in state.extra.get("cosine", [])]
        result.failures = int(state.extra.get("failures", 0))
    last = steps if stop_after is None else min(steps, stop_after)
    pair = f"{tasks[0]}-{tasks[1]}" if len(tasks) == 2 else None
    test = eval_loader(bench, "test", config.workers, place.device) if place.main else None

    def save(step: int) -> None:
        if checkpoint is None or not place.main:
            return
        extra: dict[str, Any] = {"step_seconds": result.step_seconds, "weights": result.weights}
        extra["cosine"] = [list(c) for c in result.cosine]
        extra["failures"] = result.failures
        extra["setup"] = setup.state()
        save_checkpoint(
            checkpoint,
            config=config,
            step=step,
            model=model,
            optimizer=setup.optimizer,
            strategy=setup.strategy,
            extra=extra,
        )

    def evaluation() -> dict[str, float]:
        if test is None:
            return {}
        return evaluate(model, bench, tasks, test, amp=config.amp, max_batches=config.eval_batches)

    loader = DataLoader(
        train,
        batch_sampler=StepBatches(len(train), batch, seed, start, last, place),
        num_workers=config.workers,
        collate_fn=collate,
        pin_memory=place.device.type == "cuda",
        generator=own_generator(seed, start),
    )
    batches = (
        progress(loader, desc=f"{method} s{seed}", total=last - start) if place.main else loader
    )
    lines = ProgressLines(
        f"{method} seed {seed}",
        last,
        every=per_epoch if config.progress_every is None else config.progress_every,
        start=start,
        steps_per_epoch=per_epoch,
        enabled=place.main,
    )
    final: dict[str, float] | None = None
    for step, batch_data in enumerate(batches, start=start):
        inputs, targets = to_device(batch_data, place.device)

        began = time.perf_counter()
        features, losses = setup.forward(inputs, targets)
        forward_seconds = time.perf_counter() - began

        record: dict[str, float] = {}
        diagnose = config.diagnostics_every and step % config.diagnostics_every == 0
        if diagnose and len(tasks) > 1:
            # On the trunk's parameters, outside the timed part; the graph is kept for the step.
            # Every rank takes them (its own batch), so that DDP sees the same calls everywhere.
            stacked = torch.stack([losses[t] for t in tasks])
            rows = jacobian(stacked, model.shared_parameters(), retain_graph=True)
            record.update(gradient_diagnostics(rows, tasks))
            if pair is not None:
                result.cosine.append((step, record[f"grad/cos/{pair}"]))

        began = time.perf_counter()
        report = setup.update(features, losses)
        result.step_seconds.append(forward_seconds + time.perf_counter() - began)

        if report is None:
            record[f"train/loss/{tasks[0]}"] = losses[tasks[0]].item()
        else:
            row = report_row(report)  # one host transfer
            record.update(row)
            result.weights.append([row[f"weights/{t}"] for t in tasks])
            result.failures = int(row.get("strategy/failures", result.failures))
        if (step + 1) % per_epoch == 0:
            setup.end_epoch()
        if (step + 1) % per_epoch == 0 or step + 1 == steps:
            final = evaluation()
            record.update(final)
            record["epoch"] = (step + 1) / per_epoch
        if (step + 1) % per_epoch == 0:
            save(step + 1)
        tracker.log(record, step=step)
        lines.update(step, record)
    result.steps_done = last
    if stop_after is not None and last < steps:
        save(last)
    if last < steps or final is None:  # stopped early, or an empty (resumed at the end) run
        final = evaluation()
    result.metrics = {
        k.removeprefix("val/"): v for k, v in final.items() if not k.startswith("val/loss/")
    }
    return result, model
