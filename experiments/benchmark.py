"""Step-time and peak-memory overhead of every registered strategy over a plain backward.

``python -m experiments.benchmark [--quick] [--json FILE] [--markdown FILE] [--plot FILE]``

For each model (a 3×512 MLP, batch 256, and a small CNN), each number of tasks ``T`` and each
registered strategy, one step is: zero the gradients, forward, the strategy's backward. The
reference is the plain step ``sum(losses).backward()`` on the same model and batch. Steps are
interleaved in one process (baseline, strategy paths, TorchJD, baseline, ...; the order is
reversed every other round), and the reported time is the median after warm-up. Ratios are what
count: on a shared machine the absolute times move with the load, the ratios much less.

Paths:

* ``loss``: loss-level strategies, ``s.backward(losses)``;
* ``shared_params``: per-task gradients w.r.t. every trunk parameter;
* ``shared_params_direct``: the same Jacobian and weights, finished by
  :func:`taskbalance.jacobian.backward_with_direction` (the shared parameters get ``w @ J``; only
  the heads are backpropagated again), the finish proposed for ``GradientAggregation.backward``;
* ``features``: per-task gradients w.r.t. the trunk's output (MGDA-UB style);
* ``last_layer``: GradNorm's ``W``, the last shared layer.

Peak memory: on CUDA, ``torch.cuda.max_memory_allocated`` over one step minus the memory held
before it. On CPU, PyTorch has no allocator statistics; the growth of the process's peak resident
set (Linux ``VmHWM``, reset through ``/proc/self/clear_refs`` after ``malloc_trim``) over one step
is reported instead. It counts every page the step touched, so small differences (under about a
megabyte) are noise. Elsewhere memory is reported as n/a.

When ``torchjd`` is importable (the ``bench`` extra), strategies that TorchJD also implements
run through ``torchjd.autojac.mtl_backward`` + ``jac_to_grad`` on the same model in the same
rounds, both with TorchJD's default (vmap over the tasks) and with ``parallel_chunk_size=1``
(one backward per task).
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
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

import taskbalance as tb
from experiments.runner import markdown_table, parse_config
from taskbalance.gradient_aggregation import GradientAggregation
from taskbalance.jacobian import backward_with_direction, gramian_backward, jacobian
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


@dataclass
class BenchConfig:
    """Step-time and peak-memory overhead of every strategy over a plain backward."""

    quick: bool = field(default=False, metadata={"help": "tiny models, T=2,3, few repeats"})
    tasks: list[int] = field(default_factory=lambda: [2, 10, 40])
    models: list[str] = field(default_factory=lambda: ["mlp", "cnn"])
    strategies: list[str] = field(default_factory=lambda: ["*"], metadata={"help": "patterns"})
    repeats: int = 7
    warmup: int = 2
    min_seconds: float = field(default=1.5, metadata={"help": "measure cheap steps longer"})
    max_seconds: float = field(default=30.0, metadata={"help": "cut the slowest cases short"})
    clock: str = field(default="auto", metadata={"help": "auto, cpu (thread CPU time) or wall"})
    threads: int = 1
    device: str = "cpu"
    torchjd: bool = True
    jacobian_table: bool = True
    toy: bool = True
    seed: int = 0
    json: str | None = None
    markdown: str | None = None
    plot: str | None = None

    def __post_init__(self) -> None:
        if self.quick:
            self.tasks = [t for t in self.tasks if t <= 3] or [2, 3]
            self.repeats = min(self.repeats, 2)
            self.warmup = min(self.warmup, 1)
            self.min_seconds = 0.0
        for model in self.models:
            if model not in ("mlp", "cnn"):
                raise ValueError(f"models must be 'mlp' or 'cnn', got {model!r}")
        if self.clock not in ("auto", "cpu", "wall"):
            raise ValueError(f"clock must be 'auto', 'cpu' or 'wall', got {self.clock!r}")
        if self.repeats < 1 or self.warmup < 0:
            raise ValueError("repeats must be >= 1 and warmup >= 0")
        if any(t < 1 for t in self.tasks):
            raise ValueError("tasks must be >= 1")


# ----------------------------------------------------------------------------- problems
@dataclass
class Problem:
    """A shared trunk, one head per task, a fixed batch; ``forward`` gives features and losses."""

    name: str
    trunk: nn.Module
    heads: nn.ModuleList
    inputs: Tensor
    targets: Tensor
    classify: bool
    last_layer: list[nn.Parameter]
    tasks: list[str]

    @property
    def shared(self) -> list[nn.Parameter]:
        return list(self.trunk.parameters())

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


def host_syncs(step: Callable[[], None], device: str) -> str | None:
    """On CUDA: "none" if one step runs under ``torch.cuda.set_sync_debug_mode("error")``,
    otherwise the first synchronising call. None (not checked) on other devices."""
    if not device.startswith("cuda"):
        return None
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    except RuntimeError as error:
        return str(error).splitlines()[0][:120]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return "none"


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


def _paths(strategy: Strategy) -> list[str]:
    if isinstance(strategy, GradientAggregation):
        return ["shared_params", "shared_params_direct", "features"]
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
    """Rows (one per path) for one strategy on one problem."""
    tasks = len(problem.tasks)
    base = {"model": problem.name, "T": tasks, "strategy": name}
    try:
        strategy = tb.create_strategy(name, tasks=problem.tasks).to(config.device)
    except Exception as error:
        return [{**base, "path": "-", "error": f"create: {type(error).__name__}: {error}"}]
    paths = _paths(strategy)
    steps: dict[str, Callable[[], None]] = {"baseline": _baseline(problem)}
    for path in paths:
        # One instance per path: state such as running gradient averages has the path's size.
        instance = tb.create_strategy(name, tasks=problem.tasks).to(config.device)
        steps[path] = _strategy_step(instance, problem, path)
    aggregator = _torchjd_aggregator(name, strategy, tasks) if use_torchjd else None
    if aggregator is not None:
        steps["torchjd"] = _torchjd_step(aggregator, problem, None)
        steps["torchjd_loop"] = _torchjd_step(aggregator, problem, 1)
    agreement = math.nan
    try:
        if aggregator is not None:
            # Same model state, fresh strategy: do both give the same shared gradient?
            fresh = tb.create_strategy(name, tasks=problem.tasks).to(config.device)
            torch.manual_seed(config.seed)
            _strategy_step(fresh, problem, "shared_params")()
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
        syncs = {path: host_syncs(steps[path], config.device) for path in paths}
        memory = {
            key: peak_memory(step, config.device, collect=not config.quick)
            for key, step in steps.items()
        }
    except Exception as error:
        return [{**base, "path": "-", "error": f"step: {type(error).__name__}: {error}"}]
    rows = []
    for path in paths:
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
            "host_syncs": syncs[path],
        }
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
    rows = []
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
    tasks = sorted({r["T"] for r in rows})
    for model in results["config"]["models"]:
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
    checked = [r for r in rows if r.get("host_syncs") is not None]
    if checked:
        table = [
            {k: r[k] for k in ("model", "T", "strategy", "path", "host_syncs")} for r in checked
        ]
        parts.append(
            '### Host syncs per step (`torch.cuda.set_sync_debug_mode("error")`)\n\n'
            + markdown_table(table)
        )
    errors = [r for r in results["rows"] if "error" in r]
    if errors:
        parts.append(
            "### Errors\n\n"
            + markdown_table(
                [{k: r[k] for k in ("model", "T", "strategy", "error")} for r in errors]
            )
        )
    return "\n\n".join(parts) + "\n"


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
    config: BenchConfig, on_progress: Callable[[dict[str, Any]], None] | None = None
) -> dict[str, Any]:
    """Measure everything that ``config`` asks for; return the JSON-able results.

    ``on_progress`` is called with the results so far after each model and task count, so a
    long run that is cut short still leaves what it measured."""
    torchjd_version: str | None = None
    if importlib.util.find_spec("torchjd") is not None:
        torchjd_version = importlib.metadata.version("torchjd")
    use_torchjd = config.torchjd and torchjd_version is not None
    names = [n for pattern in config.strategies for n in tb.list_strategies(pattern)]
    names = sorted(set(names))
    memory_method = (
        "torch.cuda.max_memory_allocated"
        if config.device.startswith("cuda")
        else "growth of peak RSS (VmHWM) over one step"
    )
    results: dict[str, Any] = {
        "meta": {
            "device": torch.cuda.get_device_name()
            if config.device.startswith("cuda")
            else platform.processor() or platform.machine(),
            "threads": config.threads,
            "torch": torch.__version__,
            "torchjd": torchjd_version,
            "repeats": config.repeats,
            "warmup": config.warmup,
            "memory_method": memory_method,
            "clock": clock_for(config)[1],
            "strategies": names,
        },
        "config": {"models": config.models, "tasks": config.tasks, "quick": config.quick},
        "rows": [],
        "jacobian": [],
        "toy": [],
    }
    rows: list[dict[str, Any]] = results["rows"]
    with _threads(config.threads):
        if config.toy:
            results["toy"] = bench_toy(config, names)
        for model in config.models:
            for tasks in config.tasks:
                problem = make_problem(
                    model, tasks, quick=config.quick, device=config.device, seed=config.seed
                )
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

    def save(results: dict[str, Any]) -> None:
        if config.json:
            Path(config.json).write_text(json.dumps(results, indent=2, default=str) + "\n")
        if config.markdown:
            Path(config.markdown).write_text(to_markdown(results))

    results = run(config, save)
    text = to_markdown(results)
    print(text)
    save(results)
    if config.plot:
        plot(results, config.plot)
    return results


if __name__ == "__main__":
    main()
