"""Step-time and peak-memory overhead of every registered strategy over a plain backward.

``python -m experiments.benchmark [--quick] [--models ...] [--device cuda] [--sync-check]
[--out DIR] [--json FILE] [--markdown FILE] [--plot FILE]``

For each model, each number of tasks ``T`` and each registered strategy, one step is: zero the
gradients, forward, the strategy's backward. The reference is the plain step
``sum(losses).backward()`` on the same model and batch. Steps are interleaved in one process
(baseline, strategy paths, references, baseline, ...; the order is reversed every other round),
and the reported time is the median after warm-up. Ratios are what count: on a shared machine
the absolute times move with the load, the ratios much less.

Models:

* ``mlp``: a 3×512 MLP, batch 256, one linear head per task;
* ``cnn``: a small CNN, batch 64, 32×32 RGB, one linear classifier per task;
* ``segnet`` / ``segnet_mtan``: the NYUv2 networks of :mod:`experiments.benchmarks.networks`
  (the split SegNet and SegNet-MTAN of the MTAN / CAGrad / Nash-MTL code) with NYUv2's three
  tasks (13-class segmentation, depth, normals; the losses of :mod:`experiments.benchmarks.dense`)
  on random inputs and targets, batch 2 (the Nash-MTL trainer's), always ``T = 3``. On CUDA the
  real input (3×288×384, ``width`` 1); on CPU by default a third of each side (3×96×128) and a
  quarter of every channel count (``width`` 0.25): about 6 minutes of one CPU thread for
  ``segnet``, 17 for ``segnet_mtan`` (``--segnet-size``, ``--segnet-width``). Per-parameter work
  (Jacobian rows, Gramian) scales with the parameters, a convolution with its parameters ×
  pixels, so at 1/9 of the pixels the CPU table over-states per-parameter costs relative to
  the real network (narrower channels leave that ratio as it is).

Paths:

* ``loss``: loss-level strategies, ``s.backward(losses)``;
* ``shared_params``: per-task gradients w.r.t. every trunk parameter (on SegNet-MTAN the trunk
  is the backbone and the attention branches' shared units, the MTAN code's shared modules);
* ``shared_params_direct`` (MLP and CNN): the same Jacobian and weights, finished by
  :func:`taskbalance.jacobian.backward_with_direction` (the shared parameters get ``w @ J``; only
  the heads are backpropagated again), the finish proposed for ``GradientAggregation.backward``;
* ``features``: per-task gradients w.r.t. the trunk's output (MGDA-UB style). On SegNet-MTAN
  it is the last shared decoder map: the attention branches also read the earlier shared maps,
  so the weights come from the gradient through that map only (an approximation, see
  :class:`~experiments.benchmarks.networks.SegNetMTAN`);
* ``last_layer``: GradNorm's ``W``, the last shared layer (SegNet: the last shared decoder unit).

References on the SegNet models, measured in the same rounds: ``equal`` (equal weighting, a
loss-level step: the table a user reads before choosing a method gives every step as a multiple
of it) and, for every gradient method, ``repo_style``: the step of the Nash-MTL repository's
trainer (its ``WeightMethod``), written here from its description with our method for the
weights (:func:`repo_style_step`).

Peak memory: on CUDA, ``torch.cuda.max_memory_allocated`` over one step minus the memory held
before it. On CPU, PyTorch has no allocator statistics; the growth of the process's peak resident
set (Linux ``VmHWM``, reset through ``/proc/self/clear_refs`` after ``malloc_trim``) over one step
is reported instead. It counts every page the step touched, so small differences (under about a
megabyte) are noise. Elsewhere memory is reported as n/a.

When ``torchjd`` is importable (the ``bench`` extra), strategies that TorchJD also implements
run through ``torchjd.autojac.mtl_backward`` + ``jac_to_grad`` on the MLP and the CNN in the
same rounds, both with TorchJD's default (vmap over the tasks) and with
``parallel_chunk_size=1`` (one backward per task). Not on SegNet-MTAN, whose heads read more
shared maps than ``features``, which ``mtl_backward`` assumes.

``--sync-check``: every registered strategy on every path and model, with
``check_finite = False``, one warm-up step, then steps under
``torch.cuda.set_sync_debug_mode("error")``: ok, or the first call that synchronised with the
host (:func:`sync_check`); and with the default ``check_finite = True`` the number of
synchronising calls per step (``"warn"`` mode), which should be at most one. ``--no-timings``
runs the check alone. On the CPU it is skipped, and says so.

On CUDA, without ``--out``, everything is written to ``docs/benchmark/gpu/`` (``benchmark.md``,
``benchmark.json``); ``python -m experiments.gpu_check`` runs the whole GPU check in one command.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import importlib.metadata
import importlib.util
import json
import math
import platform
import re
import statistics
import sys
import time
import traceback
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
from torch import Tensor, nn

import taskbalance as tb
from experiments.runner import markdown_table, parse_config
from taskbalance.gradient_aggregation import GradientAggregation
from taskbalance.jacobian import backward_with_direction, gramian, gramian_backward, jacobian
from taskbalance.loss_weighting import LossWeighting
from taskbalance.registry import strategy_info
from taskbalance.strategy import Strategy

__all__ = ["BenchConfig", "Problem", "main", "make_problem", "run"]

# TorchJD aggregators equivalent to our strategies, and the hyperparameters passed on from ours.
TORCHJD_AGGREGATORS: dict[str, tuple[str, tuple[str, ...]]] = {
    "upgrad": ("UPGrad", ()),
    "mgda": ("MGDA", ()),
    "pcgrad": ("PCGrad", ()),
    "cagrad": ("CAGrad", ("c",)),
    "nash_mtl": ("NashMTL", ()),  # n_tasks is added
    "imtl_g": ("IMTLG", ()),
    "aligned_mtl": ("AlignedMTL", ()),
    "graddrop": ("GradDrop", ()),
    "gradvac": ("GradVac", ()),
    "dualproj": ("DualProj", ()),
    "config": ("ConFIG", ()),
    "fairgrad": ("FairGrad", ("alpha",)),
}


MODELS = ("mlp", "cnn", "segnet", "segnet_mtan")
DENSE_MODELS = ("segnet", "segnet_mtan")
GPU_OUT = "docs/benchmark/gpu"


@dataclass
class BenchConfig:
    """Step-time and peak-memory overhead of every strategy over a plain backward."""

    quick: bool = field(default=False, metadata={"help": "tiny models, T=2,3, few repeats"})
    tasks: list[int] = field(
        default_factory=lambda: [2, 10, 40], metadata={"help": "MLP and CNN (SegNet: 3)"}
    )
    models: list[str] = field(
        default_factory=list,
        metadata={
            "help": f"of {', '.join(MODELS)}; default mlp cnn, on CUDA mlp segnet segnet_mtan"
        },
    )
    strategies: list[str] = field(default_factory=lambda: ["*"], metadata={"help": "patterns"})
    repeats: int = 7
    warmup: int = 2
    min_seconds: float = field(default=1.5, metadata={"help": "measure cheap steps longer"})
    max_seconds: float = field(default=30.0, metadata={"help": "cut the slowest cases short"})
    clock: str = field(default="auto", metadata={"help": "auto, cpu (thread CPU time) or wall"})
    threads: int = 1
    device: str = "cpu"
    segnet_size: list[int] = field(
        default_factory=list,
        metadata={"help": "SegNet input H W; default 288 384 on CUDA (NYUv2's), 96 128 on CPU"},
    )
    segnet_width: float = field(
        default=0.0, metadata={"help": "SegNet channel scale; default 1 on CUDA, 0.25 on CPU"}
    )
    segnet_batch: int = 2
    sync_check: bool = field(
        default=False,
        metadata={"help": "CUDA: host syncs of every strategy and path"},
    )
    sync_steps: int = field(default=2, metadata={"help": "checked steps after the warm-up"})
    timings: bool = field(default=True, metadata={"help": "false: the sync check alone"})
    torchjd: bool = True
    jacobian_table: bool = True
    toy: bool = True
    seed: int = 0
    out: str | None = field(
        default=None,
        metadata={"help": f"folder for benchmark.json and .md; default on CUDA: {GPU_OUT}"},
    )
    json: str | None = None
    markdown: str | None = None
    plot: str | None = None

    def __post_init__(self) -> None:
        cuda = self.device.startswith("cuda")
        if not self.models:
            self.models = ["mlp", "segnet", "segnet_mtan"] if cuda else ["mlp", "cnn"]
        if self.out is None and cuda:
            self.out = GPU_OUT
        if self.quick:
            self.tasks = [t for t in self.tasks if t <= 3] or [2, 3]
            self.repeats = min(self.repeats, 2)
            self.warmup = min(self.warmup, 1)
            self.min_seconds = 0.0
        for model in self.models:
            if model not in MODELS:
                raise ValueError(f"models must be among {', '.join(MODELS)}, got {model!r}")
        if not self.segnet_size:
            self.segnet_size = [32, 32] if self.quick else [288, 384] if cuda else [96, 128]
        if len(self.segnet_size) != 2 or any(n < 32 or n % 32 for n in self.segnet_size):
            raise ValueError(
                f"segnet_size must be H W, multiples of 32 (SegNet pools 5 times), "
                f"got {self.segnet_size}"
            )
        if self.segnet_width == 0:
            self.segnet_width = 1 / 16 if self.quick else 1.0 if cuda else 0.25
        if self.segnet_width < 0 or self.segnet_batch < 1:
            raise ValueError("segnet_width must be positive and segnet_batch >= 1")
        if self.clock not in ("auto", "cpu", "wall"):
            raise ValueError(f"clock must be 'auto', 'cpu' or 'wall', got {self.clock!r}")
        if self.repeats < 1 or self.warmup < 0 or self.sync_steps < 1:
            raise ValueError("repeats and sync_steps must be >= 1 and warmup >= 0")
        if any(t < 1 for t in self.tasks):
            raise ValueError("tasks must be >= 1")


# ----------------------------------------------------------------------------- problems
@dataclass
class Problem:
    """A shared trunk, one head per task, a fixed batch; ``forward`` gives features and losses."""

    name: str
    trunk: nn.Module
    heads: nn.ModuleList  # one head per task, in task order
    inputs: Tensor
    targets: Any
    classify: bool
    last_layer: list[nn.Parameter]
    tasks: list[str]

    @property
    def shared(self) -> list[nn.Parameter]:
        return list(self.trunk.parameters())

    @property
    def dense(self) -> bool:
        return False

    def zero_grad(self) -> None:
        self.trunk.zero_grad(set_to_none=True)
        self.heads.zero_grad(set_to_none=True)

    def forward(self) -> tuple[Tensor, dict[str, Tensor]]:
        features = self.trunk(self.inputs)
        losses = {}
        for i, (task, head) in enumerate(zip(self.tasks, self.heads)):
            out = head(features)
            if self.classify:
                losses[task] = nn.functional.cross_entropy(out, self.targets[:, i])
            else:
                losses[task] = nn.functional.mse_loss(out.squeeze(1), self.targets[:, i])
        return features, losses


@dataclass
class DenseProblem(Problem):
    """NYUv2 on SegNet or SegNet-MTAN: ``network(inputs)`` gives the features and the dense
    outputs, scored by the NYUv2 benchmark's losses against ``targets`` (``{task: tensor}``)."""

    network: nn.Module

    @property
    def dense(self) -> bool:
        return True

    def forward(self) -> tuple[Tensor, dict[str, Tensor]]:
        from experiments.benchmarks.nyuv2 import LOSSES

        features, outputs = self.network(self.inputs)
        return features, {t: LOSSES[t](outputs[t], self.targets[t]) for t in self.tasks}


def make_problem(model: str, tasks: int, *, quick: bool, device: str, seed: int) -> Problem:
    """The 3×512 MLP (batch 256) or the small CNN (batch 64, 32×32 RGB), ``tasks`` heads."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    names = [f"task{i}" for i in range(tasks)]
    if model == "mlp":
        width, batch = (32, 16) if quick else (512, 256)
        layers: list[nn.Module] = []
        for _ in range(3):
            layers += [nn.Linear(width, width), nn.ReLU()]
        trunk = nn.Sequential(*layers)
        heads = nn.ModuleList(nn.Linear(width, 1) for _ in range(tasks))
        inputs = torch.randn(batch, width, generator=generator)
        targets = torch.randn(batch, tasks, generator=generator)
        last = list(trunk[-2].parameters())
        classify = False
    else:
        channels, side, batch, hidden = (4, 8, 8, 16) if quick else (16, 32, 64, 128)
        trunk = nn.Sequential(
            nn.Conv2d(3, channels, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(channels, 2 * channels, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(2 * channels * (side // 4) ** 2, hidden),
            nn.ReLU(),
        )
        heads = nn.ModuleList(nn.Linear(hidden, 10) for _ in range(tasks))
        inputs = torch.randn(batch, 3, side, side, generator=generator)
        targets = torch.randint(0, 10, (batch, tasks), generator=generator)
        last = list(trunk[-2].parameters())
        classify = True
    trunk.to(device)
    heads.to(device)
    return Problem(
        model,
        trunk,
        heads,
        inputs.to(device),
        targets.to(device),
        classify,
        last,  # type: ignore[arg-type]
        names,
    )


def problem_for(config: BenchConfig, model: str, tasks: int) -> Problem:
    """The problem ``config`` asks for: a SegNet model at the configured size, or
    :func:`make_problem`'s."""
    if model in DENSE_MODELS:
        return make_dense_problem(
            model,
            size=config.segnet_size,
            width=config.segnet_width,
            batch=config.segnet_batch,
            device=config.device,
            seed=config.seed,
        )
    return make_problem(model, tasks, quick=config.quick, device=config.device, seed=config.seed)


def make_dense_problem(
    model: str, *, size: Sequence[int], width: float, batch: int, device: str, seed: int
) -> DenseProblem:
    """SegNet (``"segnet"``) or SegNet-MTAN (``"segnet_mtan"``) with NYUv2's tasks and classes,
    in training mode, on a random batch: images ``[batch, 3, H, W]``, labels in ``[-1, 13)``
    (−1 unlabelled), depth in ``(0, 1)``, unit normals."""
    from experiments.benchmarks.networks import SegNet, SegNetEncoderDecoder, SegNetMTAN
    from experiments.benchmarks.nyuv2 import NYUv2

    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    tasks = list(NYUv2.tasks)
    network_class = SegNet if model == "segnet" else SegNetMTAN
    network = network_class({t: t for t in tasks}, classes=NYUv2.classes, width=width).to(device)
    height, side = size
    pixels = (batch, height, side)
    targets = {
        "segmentation": torch.randint(-1, NYUv2.classes, pixels, generator=generator),
        "depth": torch.rand(batch, 1, height, side, generator=generator),
        "normal": nn.functional.normalize(torch.randn(batch, 3, *size, generator=generator), dim=1),
    }
    trunk = network.trunk
    decoder = cast(
        SegNetEncoderDecoder, trunk.backbone if isinstance(network, SegNetMTAN) else trunk
    )
    return DenseProblem(
        model,
        trunk,
        nn.ModuleList(network.heads[t] for t in tasks),
        torch.randn(batch, 3, height, side, generator=generator).to(device),
        {t: target.to(device) for t, target in targets.items()},
        False,
        list(list(decoder.decoder_body[-1].children())[-1].parameters()),  # last shared unit
        tasks,
        network,
    )


# ----------------------------------------------------------------------------- measuring
def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def interleaved(
    steps: dict[str, Callable[[], None]],
    *,
    warmup: int,
    repeats: int,
    device: str,
    min_seconds: float = 0.0,
    max_seconds: float = math.inf,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, list[float]]:
    """Seconds per step of each callable, round by round (in alternating order) after warm-up.

    ``repeats`` measured rounds; more (up to ten times as many) until the measured rounds took
    ``min_seconds``, so that cheap steps get enough samples for a stable median; fewer (but at
    least three) once they took ``max_seconds``, so that the slowest cases fit in the time.
    ``clock`` is wall time by default; :func:`clock_for` picks the thread's CPU time where that
    is honest."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    names = list(steps)
    elapsed = 0.0
    round_ = 0

    def more() -> bool:
        measured = round_ - warmup
        if measured < min(3, repeats):
            return True
        if elapsed > max_seconds:
            return False
        return measured < repeats or (elapsed < min_seconds and measured < 10 * repeats)

    while more():
        for name in names if round_ % 2 == 0 else reversed(names):
            _sync(device)
            start = clock()
            steps[name]()
            _sync(device)
            if round_ >= warmup:
                times[name].append(clock() - start)
                elapsed += times[name][-1]
        round_ += 1
    return times


def paired_ratio(times: dict[str, list[float]], name: str, reference: str) -> float:
    """Median over rounds of ``name``'s time over ``reference``'s time in the same round: pairs
    measured moments apart, so that a change in the machine's load cancels out."""
    return statistics.median(a / b for a, b in zip(times[name], times[reference]))


def medians_of(times: dict[str, list[float]]) -> dict[str, float]:
    return {name: statistics.median(values) for name, values in times.items()}


def clock_for(config: BenchConfig) -> tuple[Callable[[], float], str]:
    """The clock and its description. On CPU with one thread, every operation of a step runs on
    the calling thread (intra-op parallelism off, autograd's CPU work on the caller), so the
    thread's CPU time measures the step without the time other processes held the core: the
    honest choice on a loaded machine. Otherwise (CUDA, several threads) wall time."""
    if config.clock == "wall" or (
        config.clock == "auto" and (config.device != "cpu" or config.threads != 1)
    ):
        return time.perf_counter, "wall-clock time"
    return time.thread_time, "CPU time of the calling thread"


_LIBC: Any = None


def _trim() -> None:
    global _LIBC
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL("libc.so.6")
        except OSError:
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)


def _status_kb(key: str) -> int:
    text = Path("/proc/self/status").read_text()
    match = re.search(rf"^{key}:\s+(\d+) kB", text, re.MULTILINE)
    if match is None:
        raise OSError(f"no {key} in /proc/self/status")
    return int(match.group(1))


def peak_memory(step: Callable[[], None], device: str, *, collect: bool = True) -> float | None:
    """Megabytes of peak memory over one step beyond what was held before it (None: unknown)."""
    if collect:
        gc.collect()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    if sys.platform != "linux":
        return None
    try:
        _trim()
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        before = _status_kb("VmRSS")
        step()
        return (_status_kb("VmHWM") - before) / 1024
    except OSError:
        return None


# ----------------------------------------------------------------------------- host syncs
# A detector runs one step and returns where it synchronised with the host (call sites, in
# order; empty: none). The CUDA ones use torch.cuda.set_sync_debug_mode; a test can pass any.
SyncDetector = Callable[[Callable[[], None]], list[str]]
ROOT = Path(__file__).resolve().parents[1]


def call_site(frames: Sequence[traceback.FrameSummary]) -> str:
    """The deepest of ``frames`` in this repository (the library or the experiments), else the
    deepest: ``path:line in function: code``."""
    inside = [f for f in frames if f.filename.startswith(str(ROOT))]
    frame = (inside or list(frames))[-1]
    path = Path(frame.filename)
    shown = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
    return f"{shown}:{frame.lineno} in {frame.name}: {(frame.line or '').strip()}"


def _is_sync_message(message: object) -> bool:
    return "synchroniz" in str(message)


def cuda_first_sync(step: Callable[[], None]) -> list[str]:
    """The step under ``set_sync_debug_mode("error")``: ``[]``, or the call site of the first
    synchronising call (the step stops there)."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    except RuntimeError as error:
        if not _is_sync_message(error):
            raise
        return [call_site(traceback.extract_tb(error.__traceback__))]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return []


def cuda_syncs(step: Callable[[], None]) -> list[str]:
    """The step under ``set_sync_debug_mode("warn")``: the call site of every synchronising
    call (each one a warning, caught here with the stack that raised it)."""
    sites: list[str] = []
    torch.cuda.synchronize()
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        shown = warnings.showwarning

        def record(message: Any, category: Any, *args: Any, **kwargs: Any) -> None:
            if _is_sync_message(message):
                sites.append(call_site(traceback.extract_stack()[:-1]))
            else:
                shown(message, category, *args, **kwargs)

        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sites


# ----------------------------------------------------------------------------- steps
def _baseline(problem: Problem) -> Callable[[], None]:
    def step() -> None:
        problem.zero_grad()
        _, losses = problem.forward()
        torch.stack(list(losses.values())).sum().backward()

    return step


def _strategy_step(strategy: Strategy, problem: Problem, path: str) -> Callable[[], None]:
    def step() -> None:
        problem.zero_grad()
        features, losses = problem.forward()
        if path == "loss":
            strategy.backward(losses)
        elif path == "features":
            strategy.backward(losses, features=features)
        elif path == "last_layer":
            strategy.backward(losses, shared_params=problem.last_layer)
        elif path == "shared_params":
            strategy.backward(losses, shared_params=problem.shared)
        elif path == "shared_params_direct":
            _direct_backward(strategy, losses, problem.shared)  # type: ignore[arg-type]
        else:
            raise ValueError(f"unknown path {path!r}")

    return step


def _direct_backward(
    strategy: GradientAggregation, losses: dict[str, Tensor], shared: list[nn.Parameter]
) -> None:
    """GradientAggregation.backward as proposed in the report: :func:`gramian_backward` (layer
    Gramian, or ``w @ J`` without a second backward through the trunk)."""
    batch = strategy.gather(losses)
    detached = batch.values.detach()
    with strategy.transaction():
        if strategy.combines_gradients():
            gramian_backward(
                batch.values,
                shared,
                lambda matrix: strategy.gramian_weights(matrix, detached, batch.index),
            )
        else:
            rows = jacobian(batch.values, shared)
            direction = strategy.aggregate_rows(rows, detached, batch.index)
            backward_with_direction(batch.values.sum(), shared, direction)


def repo_style_step(strategy: GradientAggregation, problem: Problem) -> Callable[[], None]:
    """The training step of the Nash-MTL repository's trainer (github.com/AvivNavon/nash-mtl,
    ``methods/weight_methods.py``), written from its description with ``strategy``'s method.

    One ``torch.autograd.grad(loss_i, shared_params, retain_graph=True)`` per task, flattened
    and stacked into the Jacobian; the weights from the method on it (its Gramian); then
    ``sum(w_i * L_i).backward()``, which traverses the trunk once more; with ``max_norm``,
    ``clip_grad_norm_`` of the shared parameters (that code's Nash-MTL). A method with its own
    direction (:meth:`~GradientAggregation.aggregate_rows`) writes it into the shared
    parameters' gradients and backpropagates ``sum(L_i)`` into the heads only, as that code's
    PCGrad does. The strategy's hooks run inside its transaction, as in ``backward``."""
    heads = list(problem.heads.parameters())

    def step() -> None:
        problem.zero_grad()
        _, losses = problem.forward()
        shared = problem.shared
        batch = strategy.gather(losses)
        detached = batch.values.detach()
        with strategy.transaction():
            # the losses the method trains on (DB-MTL's logarithms), each its own root
            parts = [strategy.transform_losses(losses[t].reshape(1)) for t in batch.names]
            rows = []
            for part in parts:
                grads = torch.autograd.grad(part, shared, retain_graph=True)
                rows.append(torch.cat([g.reshape(-1) for g in grads]))
            matrix, values = torch.stack(rows), torch.cat(parts)
            if strategy.combines_gradients():
                weights = strategy.gramian_weights(gramian(matrix), values.detach(), batch.index)
                (weights.detach() * values).sum().backward()
            else:
                direction = strategy.aggregate_rows(matrix, values.detach(), batch.index)
                for parameter, piece in zip(shared, direction.split([p.numel() for p in shared])):
                    parameter.grad = piece.view_as(parameter).clone()
                values.sum().backward(inputs=heads)
            strategy.on_train_step(detached, batch.index)
        if strategy.max_norm > 0:
            nn.utils.clip_grad_norm_(shared, strategy.max_norm)

    return step


def _torchjd_aggregator(name: str, strategy: Strategy, tasks: int) -> Any | None:
    """TorchJD's aggregator for ``name`` with our strategy's hyperparameters, or None (not
    installed, no equivalent, or missing optional dependencies such as cvxpy)."""
    if name not in TORCHJD_AGGREGATORS:
        return None
    try:
        from torchjd import aggregation
    except ImportError:
        return None
    cls_name, shared = TORCHJD_AGGREGATORS[name]
    ours = getattr(strategy, "_init_args", {})
    kwargs = {key: ours[key] for key in shared if key in ours}
    if name == "nash_mtl":
        kwargs["n_tasks"] = tasks
    try:
        return getattr(aggregation, cls_name)(**kwargs)
    except (ImportError, TypeError):  # e.g. CAGrad and Nash-MTL need cvxpy
        return None


def _torchjd_step(aggregator: Any, problem: Problem, chunk: int | None) -> Callable[[], None]:
    from torchjd.autojac import jac_to_grad, mtl_backward

    heads = [list(h.parameters()) for h in problem.heads]

    def step() -> None:
        problem.zero_grad()
        features, losses = problem.forward()
        shared = problem.shared
        mtl_backward(
            list(losses.values()),
            features=features,
            tasks_params=heads,
            shared_params=shared,
            parallel_chunk_size=chunk,
        )
        jac_to_grad(shared, aggregator)

    return step


def _shared_grad(problem: Problem) -> Tensor:
    return torch.cat([p.grad.reshape(-1) for p in problem.shared if p.grad is not None])


def _paths(strategy: Strategy, dense: bool = False) -> list[str]:
    """The paths a strategy is measured on (``dense``: the SegNet models, whose gradient methods
    take ``shared_params`` and ``features`` only)."""
    if isinstance(strategy, GradientAggregation):
        direct = [] if dense else ["shared_params_direct"]
        return ["shared_params", *direct, "features"]
    if isinstance(strategy, LossWeighting) and strategy.needs_grads:
        return ["last_layer", "features", "shared_params"]
    return ["loss"]


def _kind(strategy: Strategy) -> str:
    return "gradient" if isinstance(strategy, GradientAggregation) else "loss"


@contextlib.contextmanager
def _threads(count: int) -> Iterator[None]:
    saved = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def bench_strategy(
    name: str, problem: Problem, config: BenchConfig, use_torchjd: bool
) -> list[dict[str, Any]]:
    """Rows (one per path, and ``repo_style`` for gradient methods on the SegNet models) for one
    strategy on one problem."""
    tasks = len(problem.tasks)
    base = {"model": problem.name, "T": tasks, "strategy": name}

    def create(strategy_name: str = name) -> Strategy:
        return tb.create_strategy(strategy_name, tasks=problem.tasks).to(config.device)

    try:
        strategy = create()
    except Exception as error:
        return [{**base, "path": "-", "error": f"create: {type(error).__name__}: {error}"}]
    paths = _paths(strategy, problem.dense)
    steps: dict[str, Callable[[], None]] = {"baseline": _baseline(problem)}
    for path in paths:
        # One instance per path: state such as running gradient averages has the path's size.
        steps[path] = _strategy_step(create(), problem, path)
    if problem.dense:
        steps["equal"] = _strategy_step(create("equal"), problem, "loss")
        if isinstance(strategy, GradientAggregation):
            steps["repo_style"] = repo_style_step(create(), problem)  # type: ignore[arg-type]
    aggregator = None
    if use_torchjd and not problem.dense:
        aggregator = _torchjd_aggregator(name, strategy, tasks)
    if aggregator is not None:
        steps["torchjd"] = _torchjd_step(aggregator, problem, None)
        steps["torchjd_loop"] = _torchjd_step(aggregator, problem, 1)
    agreement = math.nan
    try:
        if aggregator is not None:
            # Same model state, fresh strategy: do both give the same shared gradient?
            torch.manual_seed(config.seed)
            _strategy_step(create(), problem, "shared_params")()
            ours = _shared_grad(problem)
            torch.manual_seed(config.seed)
            steps["torchjd"]()
            theirs = _shared_grad(problem)
            agreement = float(nn.functional.cosine_similarity(ours, theirs, dim=0))
        times = interleaved(
            steps,
            warmup=config.warmup,
            repeats=config.repeats,
            device=config.device,
            min_seconds=config.min_seconds,
            max_seconds=config.max_seconds,
            clock=clock_for(config)[0],
        )
        medians = medians_of(times)
        memory = {
            key: peak_memory(step, config.device, collect=not config.quick)
            for key, step in steps.items()
        }
    except Exception as error:
        return [{**base, "path": "-", "error": f"step: {type(error).__name__}: {error}"}]
    rows = []
    for path in paths + (["repo_style"] if "repo_style" in steps else []):
        row: dict[str, Any] = {
            **base,
            "kind": _kind(strategy),
            "path": path,
            "baseline_ms": medians["baseline"] * 1e3,
            "step_ms": medians[path] * 1e3,
            "time_ratio": paired_ratio(times, path, "baseline"),
            "baseline_peak_mb": memory["baseline"],
            "peak_mb": memory[path],
            "memory_ratio": _ratio(memory[path], memory["baseline"]),
            "rounds": len(times[path]),
        }
        for reference in ("equal", "repo_style"):
            if reference in steps and path != reference:
                row.update(
                    {
                        f"{reference}_ms": medians[reference] * 1e3,
                        f"{reference}_peak_mb": memory[reference],
                        f"vs_{reference}": paired_ratio(times, path, reference),
                        f"memory_vs_{reference}": _ratio(memory[path], memory[reference]),
                    }
                )
        if aggregator is not None and path.startswith("shared_params"):
            best_name = min(("torchjd", "torchjd_loop"), key=medians.__getitem__)
            row.update(
                torchjd_ms=medians["torchjd"] * 1e3,
                torchjd_loop_ms=medians["torchjd_loop"] * 1e3,
                vs_torchjd=paired_ratio(times, path, best_name),
                torchjd_peak_mb=memory["torchjd"],
                memory_vs_torchjd=_ratio(memory[path], memory["torchjd"]),
                torchjd_cosine=agreement,
            )
        rows.append(row)
    return rows


def sync_check(
    problem: Problem,
    names: Sequence[str],
    *,
    first_sync: SyncDetector,
    count_syncs: SyncDetector | None = None,
    steps: int = 2,
    create: Callable[..., Strategy] = tb.create_strategy,
) -> list[dict[str, Any]]:
    """Host syncs of every strategy in ``names`` on every path of ``problem``.

    For each: an instance with ``check_finite = False``, one warm-up step (first-step work such
    as lazy state is not the steady state), then ``steps`` steps under ``first_sync``; the row
    says ``"ok"`` or where the first synchronising call was (``check_finite_off``). With
    ``count_syncs``, a fresh instance with the default ``check_finite = True`` likewise, and
    the most synchronising calls in one step (``syncs_per_step``, at most 1 wanted: the
    engine's verdict) with where they were. ``create(name, tasks=...)`` builds the strategies.
    A step that raises something else is reported as an error. The first row is the plain
    step's own (strategy ``"plain"``): a sync there, in the model or its losses, is in every
    strategy's step too."""
    plain = _checked(_baseline(problem), first_sync, steps)
    rows: list[dict[str, Any]] = [
        {
            "model": problem.name,
            "T": len(problem.tasks),
            "strategy": "plain",
            "path": "sum(losses).backward()",
            "check_finite_off": plain[0] if plain else "ok",
        }
    ]
    for name in names:
        base = {"model": problem.name, "T": len(problem.tasks), "strategy": name}
        try:
            paths = _paths(create(name, tasks=problem.tasks), problem.dense)
        except Exception as error:
            rows.append({**base, "path": "-", "error": f"create: {type(error).__name__}: {error}"})
            continue
        for path in paths:
            row: dict[str, Any] = {**base, "path": path}
            try:
                strategy = create(name, tasks=problem.tasks).to(problem.inputs.device)
                strategy.check_finite = False
                sites = _checked(_strategy_step(strategy, problem, path), first_sync, steps)
                row["check_finite_off"] = sites[0] if sites else "ok"
                if count_syncs is not None:
                    strategy = create(name, tasks=problem.tasks).to(problem.inputs.device)
                    step = _strategy_step(strategy, problem, path)
                    step()
                    counted = [count_syncs(step) for _ in range(steps)]
                    most = max(counted, key=len)
                    row["syncs_per_step"] = len(most)
                    row["sync_sites"] = most
            except Exception as error:
                row["error"] = f"{type(error).__name__}: {error}"
            rows.append(row)
    return rows


def _checked(step: Callable[[], None], detector: SyncDetector, steps: int) -> list[str]:
    """One warm-up step, then up to ``steps`` under ``detector``: the first sites it found."""
    step()
    for _ in range(steps):
        sites = detector(step)
        if sites:
            return sites
    return []


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b <= 0:
        return None
    return a / b


def bench_jacobian(problem: Problem, config: BenchConfig) -> list[dict[str, Any]]:
    """Forward + Jacobian (loop / batched, params / features) relative to the plain step."""
    steps: dict[str, Callable[[], None]] = {"baseline": _baseline(problem)}

    def make(path: str, method: str) -> Callable[[], None]:
        def step() -> None:
            features, losses = problem.forward()
            values = torch.stack(list(losses.values()))
            inputs = problem.shared if path == "shared_params" else [features]
            jacobian(values, inputs, method=method, retain_graph=False)  # type: ignore[arg-type]

        return step

    for path in ("shared_params", "features"):
        for method in ("loop", "batched"):
            steps[f"{path}/{method}"] = make(path, method)
    times = interleaved(
        steps,
        warmup=config.warmup,
        repeats=config.repeats,
        device=config.device,
        clock=clock_for(config)[0],
    )
    rows = []
    for path in ("shared_params", "features"):
        loop, batched = f"{path}/loop", f"{path}/batched"
        rows.append(
            {
                "model": problem.name,
                "T": len(problem.tasks),
                "path": path,
                "loop_ratio": paired_ratio(times, loop, "baseline"),
                "batched_ratio": paired_ratio(times, batched, "baseline"),
                "batched_over_loop": paired_ratio(times, batched, loop),
            }
        )
    return rows


def _toy_steps(name: str) -> dict[str, Callable[[], None]]:
    """Plain Adam on the sum, and Adam after the strategy's backward, on CAGrad's toy."""
    from experiments.toys import cagrad_losses

    theta = torch.tensor([0.5, -3.0], requires_grad=True)
    reference = torch.tensor([0.5, -3.0], requires_grad=True)
    adam = torch.optim.Adam([theta], lr=1e-3)
    plain_adam = torch.optim.Adam([reference], lr=1e-3)
    strategy = tb.create_strategy(name, tasks=["f1", "f2"])

    def plain() -> None:
        plain_adam.zero_grad(set_to_none=True)
        cagrad_losses(reference).sum().backward()
        plain_adam.step()

    def step() -> None:
        adam.zero_grad(set_to_none=True)
        values = cagrad_losses(theta)
        strategy.backward({"f1": values[0], "f2": values[1]}, shared_params=[theta])
        adam.step()

    return {"adam": plain, "strategy": step}


def bench_toy(config: BenchConfig, names: Sequence[str]) -> list[dict[str, Any]]:
    """Strategies that need gradients on the two-objective toy: step + Adam vs plain Adam."""
    rows: list[dict[str, Any]] = []
    for name in names:
        if not strategy_info(name).needs_grads:
            continue
        try:
            times = interleaved(
                _toy_steps(name),
                warmup=config.warmup + 3,
                repeats=config.repeats * 5,
                device="cpu",
                clock=clock_for(config)[0],
            )
        except Exception as error:
            rows.append({"strategy": name, "error": f"{type(error).__name__}: {error}"})
            continue
        rows.append(
            {
                "strategy": name,
                "adam_us": statistics.median(times["adam"]) * 1e6,
                "step_us": statistics.median(times["strategy"]) * 1e6,
                "time_ratio": paired_ratio(times, "strategy", "adam"),
            }
        )
    return rows


# ----------------------------------------------------------------------------- reporting
def _fmt(value: Any, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.{digits}f}"


def to_markdown(results: dict[str, Any]) -> str:
    """Markdown tables: overhead per strategy and path, TorchJD side by side, Jacobian, toy."""
    meta = results["meta"]
    parts = [
        f"Device: {meta['device']} ({meta['threads']} thread(s)), torch {meta['torch']}, "
        f"torchjd {meta['torchjd'] or 'not installed'}; {meta['clock']}, medians of at least "
        f"{meta['repeats']} steps after {meta['warmup']} warm-up steps, interleaved with the "
        "baseline in one process. "
        "Time ×: step time over the plain `sum(losses).backward()` step; memory ×: peak memory "
        f"over the plain step's ({meta['memory_method']}).",
    ]
    rows = [r for r in results["rows"] if "error" not in r]
    tasks = sorted({r["T"] for r in rows if r["model"] not in DENSE_MODELS})
    for model in results["config"]["models"]:
        if model in DENSE_MODELS:
            parts += _dense_tables(results, model)
            continue
        if not any(r["model"] == model for r in rows):
            continue  # --no-timings, or every strategy failed (the errors table says why)
        table = []
        keys = sorted(
            {(r["strategy"], r["path"]) for r in rows if r["model"] == model},
        )
        for strategy, path in keys:
            entry: dict[str, Any] = {"strategy": strategy, "path": path}
            for t in tasks:
                match = [
                    r
                    for r in rows
                    if (r["model"], r["strategy"], r["path"], r["T"]) == (model, strategy, path, t)
                ]
                cell = "n/a"
                if match:
                    cell = f"{_fmt(match[0]['time_ratio'])} / {_fmt(match[0]['memory_ratio'])}"
                entry[f"T={t} time× / mem×"] = cell
            table.append(entry)
        parts.append(f"### {model}: overhead over the plain step\n\n{markdown_table(table)}")
        versus = [
            {
                "strategy": r["strategy"],
                "path": r["path"],
                "T": r["T"],
                "ours ms": _fmt(r["step_ms"], 1),
                "TorchJD ms (vmap / loop)": f"{_fmt(r['torchjd_ms'], 1)} / "
                f"{_fmt(r['torchjd_loop_ms'], 1)}",
                "ours / best TorchJD": _fmt(r["vs_torchjd"]),
                "peak MB ours / TorchJD": f"{_fmt(r['peak_mb'], 1)} / "
                f"{_fmt(r['torchjd_peak_mb'], 1)}",
                "cosine": _fmt(r["torchjd_cosine"], 4),
            }
            for r in rows
            if r["model"] == model and "vs_torchjd" in r
        ]
        if versus:
            parts.append(
                f"### {model}: against TorchJD (same model, same aggregator)\n\n"
                + markdown_table(versus)
            )
    if results.get("jacobian"):
        table = [
            {
                "model": r["model"],
                "T": r["T"],
                "w.r.t.": r["path"],
                "loop ×": _fmt(r["loop_ratio"]),
                "batched ×": _fmt(r["batched_ratio"]),
                "batched / loop": _fmt(r["batched_over_loop"]),
            }
            for r in results["jacobian"]
        ]
        parts.append(
            "### Forward + Jacobian, loop vs batched (× the plain step)\n\n" + markdown_table(table)
        )
    if results.get("toy"):
        table = [
            {
                "strategy": r["strategy"],
                "Adam µs": _fmt(r.get("adam_us"), 1),
                "step µs": _fmt(r.get("step_us"), 1),
                "time ×": _fmt(r.get("time_ratio")),
                "error": r.get("error", ""),
            }
            for r in results["toy"]
        ]
        parts.append(
            "### Two-objective toy (CAGrad's), strategy + Adam vs plain Adam\n\n"
            + markdown_table(table)
        )
    if results.get("sync_check"):
        parts.append(_sync_table(results["sync_check"]))
    errors = [r for r in results["rows"] if "error" in r]
    if errors:
        parts.append(
            "### Errors\n\n"
            + markdown_table(
                [{k: r[k] for k in ("model", "T", "strategy", "error")} for r in errors]
            )
        )
    return "\n\n".join(parts) + "\n"


# The targets for gradient methods on SegNet-MTAN, shared_params, T = 3.
TARGET_VS_REPO, TARGET_VS_PLAIN = 0.8, 2.2


def _dense_tables(results: dict[str, Any], model: str) -> list[str]:
    """The table of one SegNet model: every strategy and path against equal weighting, the
    plain step and (gradient methods) the repo-style step; on SegNet-MTAN the issue's targets."""
    rows = [r for r in results["rows"] if r["model"] == model and "error" not in r]
    if not rows:
        return []
    info = results["problems"].get(model, {})
    h, w = results["meta"]["segnet"]["size"]
    head = (
        f"### {model}: NYUv2, T = 3, input {results['meta']['segnet']['batch']}×3×{h}×{w}, "
        f"width {results['meta']['segnet']['width']:g} ({info.get('shared_parameters', 0):,} "
        "shared parameters)\n\n"
        "Step time and peak memory as multiples of equal weighting's step (a loss-level step: "
        "the cost of choosing the method), of the plain step, and of the Nash-MTL trainer's "
        "step with the same method (`repo_style`: one `autograd.grad` per task, then "
        "`sum(w_i L_i).backward()`). Paired medians over the same rounds."
    )
    if model == "segnet_mtan":
        head += (
            " `features` is the last shared decoder map: the attention branches also read the "
            "earlier shared maps, so that path's weights see only part of the trunk's gradient."
        )
    table = [
        {
            "strategy": r["strategy"],
            "path": r["path"],
            "time × equal": _fmt(r.get("vs_equal")),
            "mem × equal": _fmt(r.get("memory_vs_equal")),
            "time × plain": _fmt(r["time_ratio"]),
            "mem × plain": _fmt(r["memory_ratio"]),
            "time / repo-style": _fmt(r.get("vs_repo_style")),
            "mem / repo-style": _fmt(r.get("memory_vs_repo_style")),
            "step ms": _fmt(r["step_ms"], 1),
            "peak MB": _fmt(r["peak_mb"], 1),
        }
        for r in sorted(rows, key=lambda r: (r["strategy"], r["path"]))
    ]
    parts = [head + "\n\n" + markdown_table(table)]
    if model == "segnet_mtan":
        checked = [r for r in rows if r["path"] == "shared_params" and "vs_repo_style" in r]
        missed = [
            f"{r['strategy']} ({_fmt(r['vs_repo_style'], 3)}× repo, "
            f"{_fmt(r['time_ratio'], 3)}× plain)"
            for r in checked
            if not (r["vs_repo_style"] <= TARGET_VS_REPO and r["time_ratio"] <= TARGET_VS_PLAIN)
        ]
        parts.append(
            f"Issue 15 targets on `shared_params` (≤ {TARGET_VS_REPO}× the repo-style step and "
            f"≤ {TARGET_VS_PLAIN}× the plain step): {len(checked) - len(missed)} of "
            f"{len(checked)} gradient methods meet both"
            + (f"; not met: {', '.join(missed)}." if missed else ".")
        )
    return parts


def _sync_table(check: dict[str, Any]) -> str:
    """The sync check's rows, or why it did not run."""
    title = "### Host syncs per training step\n\n"
    if "skipped" in check:
        return title + f"Not run: {check['skipped']}."
    table = [
        {
            "model": r["model"],
            "T": r["T"],
            "strategy": r["strategy"],
            "path": r["path"],
            "check_finite=False": r.get("error") or r["check_finite_off"],
            "syncs per step (default)": r.get("syncs_per_step", "n/a"),
            "where (default)": "; ".join(r.get("sync_sites", [])),
        }
        for r in check["rows"]
    ]
    strategies = [r for r in check["rows"] if r["strategy"] != "plain"]
    clean = sum(r.get("check_finite_off") == "ok" for r in strategies)
    summary = (
        f"{check['method']}. With `check_finite = False`: {clean} of {len(strategies)} "
        "strategy/path pairs ran without a host sync."
    )
    return f"{title}{summary}\n\n{markdown_table(table)}"


def plot(results: dict[str, Any], path: str) -> None:
    """Step time against T, one panel per model and path family, log scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in results["rows"] if "error" not in r]
    models = results["config"]["models"]
    panels = ["loss", "features", "shared_params"]
    figure, axes = plt.subplots(
        len(models), len(panels), figsize=(5 * len(panels), 4 * len(models)), squeeze=False
    )
    for i, model in enumerate(models):
        for j, panel in enumerate(panels):
            axis = axes[i][j]
            chosen = [r for r in rows if r["model"] == model and _panel(r["path"]) == panel]
            baseline: dict[int, list[float]] = {}
            for r in chosen:
                baseline.setdefault(r["T"], []).append(r["baseline_ms"])
            for key in sorted({(r["strategy"], r["path"]) for r in chosen}):
                series = sorted(
                    (r["T"], r["step_ms"]) for r in chosen if (r["strategy"], r["path"]) == key
                )
                label = key[0] if key[1] in ("loss", "features", "shared_params") else "/".join(key)
                (line,) = axis.plot(*zip(*series), marker="o", label=label, linewidth=1)
                theirs = sorted(
                    (r["T"], min(r["torchjd_ms"], r["torchjd_loop_ms"]))
                    for r in chosen
                    if (r["strategy"], r["path"]) == key and "torchjd_ms" in r
                )
                if theirs and key[1] == "shared_params":
                    axis.plot(
                        *zip(*theirs),
                        linestyle="--",
                        color=line.get_color(),
                        linewidth=1,
                        label=f"{key[0]} (TorchJD)",
                    )
            if baseline:
                ts = sorted(baseline)
                axis.plot(
                    ts,
                    [statistics.median(baseline[t]) for t in ts],
                    color="black",
                    linewidth=2.5,
                    label="sum(losses).backward()",
                )
            axis.set_xscale("log")
            axis.set_yscale("log")
            axis.set_xlabel("tasks T")
            axis.set_ylabel("step time (ms)")
            axis.set_title(f"{model}: {panel}")
            if chosen:
                axis.legend(fontsize=6, ncol=2)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def _panel(path: str) -> str:
    if path.startswith("shared_params") or path == "last_layer":
        return "shared_params" if path.startswith("shared_params") else "loss"
    return path


# ----------------------------------------------------------------------------- driver
def run(
    config: BenchConfig,
    on_progress: Callable[[dict[str, Any]], None] | None = None,
    *,
    sync_detectors: tuple[SyncDetector, SyncDetector | None] | None = None,
) -> dict[str, Any]:
    """Measure everything that ``config`` asks for; return the JSON-able results.

    ``on_progress`` is called with the results so far after each strategy, so a long run that
    is cut short still leaves what it measured. ``sync_detectors`` (first sync, count) replace
    the CUDA ones of ``--sync-check`` (tests pass their own)."""
    torchjd_version: str | None = None
    if importlib.util.find_spec("torchjd") is not None:
        torchjd_version = importlib.metadata.version("torchjd")
    use_torchjd = config.torchjd and torchjd_version is not None
    names = [n for pattern in config.strategies for n in tb.list_strategies(pattern)]
    names = sorted(set(names))
    cuda = config.device.startswith("cuda")
    memory_method = (
        "torch.cuda.max_memory_allocated" if cuda else "growth of peak RSS (VmHWM) over one step"
    )
    results: dict[str, Any] = {
        "meta": {
            "device": torch.cuda.get_device_name()
            if cuda
            else platform.processor() or platform.machine(),
            "threads": config.threads,
            "torch": torch.__version__,
            "cuda": torch.version.cuda if cuda else None,
            "cudnn_tf32": torch.backends.cudnn.allow_tf32 if cuda else None,
            "matmul_tf32": torch.backends.cuda.matmul.allow_tf32 if cuda else None,
            "torchjd": torchjd_version,
            "repeats": config.repeats,
            "warmup": config.warmup,
            "memory_method": memory_method,
            "clock": clock_for(config)[1],
            "strategies": names,
            "segnet": {
                "size": config.segnet_size,
                "width": config.segnet_width,
                "batch": config.segnet_batch,
            },
        },
        "config": {"models": config.models, "tasks": config.tasks, "quick": config.quick},
        "problems": {},
        "rows": [],
        "jacobian": [],
        "toy": [],
        "sync_check": {},
    }
    detectors: tuple[SyncDetector, SyncDetector | None] | None = sync_detectors
    method = "a detector given by the caller"
    if detectors is None and cuda:
        detectors = (cuda_first_sync, cuda_syncs)
        method = (
            '`torch.cuda.set_sync_debug_mode("error")` with `check_finite = False`, `"warn"` '
            "mode to count the default mode's calls"
        )
    if config.sync_check and detectors is None:
        # On the CPU nothing syncs, and a Python-level stand-in would flag the reads that
        # device-aware code does only where they are free (CPU tensors).
        results["sync_check"] = {"skipped": "the sync check needs CUDA (--device cuda)"}
        print("--sync-check: skipped, it needs CUDA", file=sys.stderr)
    rows: list[dict[str, Any]] = results["rows"]
    problems = [
        (model, tasks)
        for model in config.models
        for tasks in ([3] if model in DENSE_MODELS else config.tasks)
    ]
    with _threads(config.threads):
        if config.sync_check and detectors is not None:
            # First: it is quick, and a cut-short run should still have it.
            checked: list[dict[str, Any]] = []
            results["sync_check"] = {
                "method": f"One warm-up step, then {config.sync_steps} steps under the detector "
                f"({method})",
                "rows": checked,
            }
            for model, tasks in problems:
                checked += sync_check(
                    problem_for(config, model, tasks),
                    names,
                    first_sync=detectors[0],
                    count_syncs=detectors[1],
                    steps=config.sync_steps,
                )
                if on_progress is not None:
                    on_progress(results)
        if config.toy and config.timings:
            results["toy"] = bench_toy(config, names)
        for model, tasks in problems if config.timings else []:
            problem = problem_for(config, model, tasks)
            results["problems"][model] = {
                "shared_parameters": sum(p.numel() for p in problem.shared),
                "features": list(problem.forward()[0].shape),
            }
            if config.jacobian_table:
                results["jacobian"] += bench_jacobian(problem, config)
            for name in names:
                new = bench_strategy(name, problem, config, use_torchjd)
                rows += new
                summary = ", ".join(f"{r['path']} {_fmt(r.get('time_ratio'))}×" for r in new)
                print(f"{model} T={tasks} {name}: {summary}", file=sys.stderr, flush=True)
                if on_progress is not None:
                    on_progress(results)
    return results


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    config = parse_config(BenchConfig, argv)
    targets = [(config.json, "json"), (config.markdown, "markdown")]
    if config.out is not None:
        Path(config.out).mkdir(parents=True, exist_ok=True)
        targets += [
            (str(Path(config.out) / "benchmark.json"), "json"),
            (str(Path(config.out) / "benchmark.md"), "markdown"),
        ]

    def save(results: dict[str, Any]) -> None:
        for path, kind in targets:
            if path is None:
                continue
            if kind == "json":
                Path(path).write_text(json.dumps(results, indent=2, default=str) + "\n")
            else:
                Path(path).write_text(to_markdown(results))

    results = run(config, save)
    text = to_markdown(results)
    print(text)
    save(results)
    if config.plot:
        plot(results, config.plot)
    return results


if __name__ == "__main__":
    main()
