"""DistributedDataParallel: two gloo ranks on CPU against one process with the whole batch.

One ``torch.multiprocessing.spawn`` runs every registered strategy on both backward paths inside
each of two workers (the model in DDP, the same strategy built on each rank, each rank a half of
the global batch) and saves what it saw; the test process runs the same training on the whole
batch without torch.distributed. The tests then check, per strategy and path:

* the two ranks report the same weights and end every step with the same parameters and the
  same strategy state (bit for bit);
* 2 ranks × batch b equal 1 process × batch 2b (allclose: the summation order differs), random
  strategies included: both runs seed torch identically before building the strategy, so they
  draw the same numbers;

and, once, that a NaN loss on one rank or a task missing on one rank raises on both ranks
instead of leaving one waiting in a collective, that an overflow injected on one rank under
``GradScaler`` is skipped by both ranks with the strategy state untouched, that
``GradientAccumulator`` under DDP takes the one-process step, that ``all_reduce_mean`` is a mean,
and that evaluation on rank 0 alone issues no collective.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import tempfile
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor, nn

import taskbalance as tb
from taskbalance import distributed
from taskbalance.accumulation import GradientAccumulator

TASKS = ("a", "b", "c")
PATHS = ("shared_params", "features")
STEPS = 3
LOCAL_BATCH = 6


class Net(nn.Module):
    """A tanh trunk and one linear head per task; returns the features and the task outputs."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.trunk = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 5), nn.Tanh())
        self.heads = nn.ModuleDict({t: nn.Linear(5, 1) for t in TASKS})

    def forward(self, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        features = self.trunk(x)
        return features, {t: head(features).squeeze(1) for t, head in self.heads.items()}


SCALES = {"a": 1.0, "b": 3.0, "c": 0.5}


def global_batch(step: int) -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(100 + step)
    x = torch.randn(2 * LOCAL_BATCH, 4, generator=generator)
    y = torch.randn(2 * LOCAL_BATCH, len(TASKS), generator=generator)
    return x, y


def local_batch(step: int, rank: int) -> tuple[Tensor, Tensor]:
    x, y = global_batch(step)
    part = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
    return x[part], y[part]


def task_losses(outputs: dict[str, Tensor], y: Tensor) -> dict[str, Tensor]:
    return {
        t: SCALES[t] * (1.0 + (outputs[t] - y[:, i]).pow(2).mean()) for i, t in enumerate(TASKS)
    }


@contextlib.contextmanager
def count_collectives() -> Iterator[dict[str, int]]:
    """Count the Python-level collectives (taskbalance's; DDP's reducer runs in C++)."""
    counts = {"all_reduce": 0, "all_gather": 0, "small": 0}
    originals = {name: getattr(dist, name) for name in ("all_reduce", "all_gather")}

    def counting(name: str) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            tensor = args[1] if name == "all_gather" else args[0]
            # The loss vector (2T numbers) apart from the Jacobian-sized traffic.
            counts["small" if tensor.numel() <= 2 * len(TASKS) else name] += 1
            return originals[name](*args, **kwargs)

        return call

    for name in originals:
        setattr(dist, name, counting(name))
    try:
        yield counts
    finally:
        for name, original in originals.items():
            setattr(dist, name, original)


def make_strategy(name: str) -> tb.Strategy:
    # The same global seed in both runs: rlw takes its seed from it, the others' default seeds
    # are fixed, so 2 ranks and 1 process draw the same weights, orders and masks.
    torch.manual_seed(1)
    return tb.create_strategy(name, TASKS)


def train(name: str, path: str, model: nn.Module, inner: Net, rank: int | None) -> dict[str, Any]:
    """STEPS steps of SGD; ``rank`` None trains on the whole batch in one process."""
    strategy = make_strategy(name)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    weights = []
    for step in range(STEPS):
        x, y = global_batch(step) if rank is None else local_batch(step, rank)
        optimizer.zero_grad()
        features, outputs = model(x)
        losses = task_losses(outputs, y)
        with count_collectives() as counted:
            if path == "features":
                report = strategy.backward(losses, features=features)
            else:
                report = strategy.backward(losses, shared_params=inner.trunk.parameters())
        optimizer.step()
        weights.append(report.weight_values.detach().clone())
    return {
        "weights": torch.stack(weights),
        "losses": report.loss_values.detach().clone(),
        "collectives": torch.tensor(
            [counted["small"], counted["all_reduce"], counted["all_gather"]]
        ),
        "params": [p.detach().clone() for p in inner.parameters()],
        "state": {k: v.clone() for k, v in strategy.state_dict().items() if isinstance(v, Tensor)},
    }


ACCUMULATED = ("uncertainty", "mgda")  # a loss weighting with learned state, a Gramian method


def accumulate(name: str, model: nn.Module, inner: Net, rank: int | None) -> dict[str, Any]:
    """Two optimizer steps of two micro-batches each through GradientAccumulator."""
    strategy = make_strategy(name)
    optimizer = torch.optim.SGD(inner.parameters(), lr=0.1)
    accumulator = GradientAccumulator(
        strategy, inner.parameters(), shared_params=inner.trunk.parameters()
    )
    weights = []
    for step in range(2):
        x, y = global_batch(step) if rank is None else local_batch(step, rank)
        optimizer.zero_grad()
        # No DDP backward runs: the accumulator reduces once, in step().
        sync = model.no_sync() if rank is not None else contextlib.nullcontext()
        with sync:
            for xb, yb in zip(x.chunk(2), y.chunk(2)):
                _, outputs = model(xb)
                accumulator.backward(task_losses(outputs, yb))
        weights.append(accumulator.step().weight_values.clone())
        optimizer.step()
    return {
        "weights": torch.stack(weights),
        "params": [p.detach().clone() for p in inner.parameters()],
        "state": {k: v.clone() for k, v in strategy.state_dict().items() if isinstance(v, Tensor)},
    }


@contextlib.contextmanager
def refuse_collectives() -> Iterator[list[str]]:
    """Record and refuse (raise instead of waiting for the other ranks) every collective."""
    issued: list[str] = []
    names = [n for n in ("all_reduce", "all_gather", "broadcast", "barrier") if hasattr(dist, n)]
    originals = {name: getattr(dist, name) for name in names}

    def refusing(name: str) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            issued.append(name)
            raise RuntimeError(f"{name} issued during evaluation")

        return call

    for name in names:
        setattr(dist, name, refusing(name))
    try:
        yield issued
    finally:
        for name, original in originals.items():
            setattr(dist, name, original)


def _evaluation() -> dict[str, list[str]]:
    """Rank 0 alone evaluates every strategy in ``.eval()`` mode, on losses that have a graph
    (grad mode on) and under ``torch.no_grad()``: the collectives issued, or the error."""
    out: dict[str, list[str]] = {}
    inner = Net()
    x, y = local_batch(0, 0)
    for name in tb.list_strategies():
        _, outputs = inner(x)
        losses = task_losses(outputs, y)
        with refuse_collectives() as issued:
            try:
                strategy = make_strategy(name).eval()
                strategy(losses)
                with torch.no_grad():
                    strategy(losses)
            except Exception as error:
                issued.append(f"error: {error}")
        out[name] = issued
    return out


def _faults(rank: int) -> dict[str, str]:
    """Faults on one rank only; every rank must raise the same error (or skip the same step)."""
    out: dict[str, str] = {}
    inner = Net()
    model = nn.parallel.DistributedDataParallel(inner)
    strategy = tb.create_strategy("uncertainty", TASKS)
    x, y = local_batch(0, rank)
    _, outputs = model(x)
    losses = task_losses(outputs, y)
    if rank == 1:
        losses["b"] = losses["b"] * float("nan")
    try:
        strategy.backward(losses)
        out["nan"] = "no error"
    except tb.NonFiniteLossError as error:
        out["nan"] = str(error)
    clean = task_losses(outputs, y)
    partial = clean if rank == 0 else {t: clean[t] for t in ("a", "c")}
    try:
        strategy.backward(partial)
        out["split"] = "no error"
    except tb.StrategyError as error:
        out["split"] = str(error)
    # GradDrop's features rule needs the same feature shapes on every rank: one sample fewer on
    # rank 1 must raise on both ranks, before any mask is drawn.
    graddrop = tb.create_strategy("graddrop", TASKS)
    before = graddrop.generator_state.clone()
    features, outputs = nn.parallel.DistributedDataParallel(Net())(x if rank == 0 else x[1:])
    try:
        graddrop.backward(task_losses(outputs, y if rank == 0 else y[1:]), features=features)
        out["shapes"] = "no error"
    except tb.StrategyError as error:
        out["shapes"] = str(error)
    out["shapes_state_same"] = str(torch.equal(before, graddrop.generator_state))
    return out


def _overflow(rank: int) -> dict[str, Any]:
    """An overflow on rank 1 only, under GradScaler: both ranks skip, state and model unchanged."""
    inner = Net()
    model = nn.parallel.DistributedDataParallel(inner)
    strategy = tb.create_strategy("uncertainty", TASKS)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    x, y = local_batch(0, rank)
    _, outputs = model(x)
    losses = task_losses(outputs, y)
    if rank == 1:
        losses["a"] = losses["a"] * 1e36  # finite loss, its scaled gradient overflows
    before_state = {k: v.clone() for k, v in strategy.state_dict().items() if k != "_extra_state"}
    before_params = [p.detach().clone() for p in inner.parameters()]
    optimizer.zero_grad()
    strategy.backward(losses, scaler=scaler)
    scaler.step(optimizer)
    scaler.update()
    state_same = all(torch.equal(v, strategy.state_dict()[k]) for k, v in before_state.items())
    params_same = all(torch.equal(a, b) for a, b in zip(before_params, inner.parameters()))
    return {"state_same": state_same, "params_same": params_same, "scale": scaler.get_scale()}


def _partial(rank: int) -> dict[str, Any]:
    """Partial labels under DDP: every rank passes tasks a and c only (DDP needs
    ``find_unused_parameters=True`` for the idle head); b's head and state stay as they were."""
    out: dict[str, Any] = {}
    for name in ("uncertainty", "mgda"):
        inner = Net()
        model = nn.parallel.DistributedDataParallel(inner, find_unused_parameters=True)
        strategy = tb.create_strategy(name, TASKS)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        head_b = [p.detach().clone() for p in inner.heads["b"].parameters()]
        for step in range(2):
            x, y = local_batch(step, rank)
            optimizer.zero_grad(set_to_none=True)
            _, outputs = model(x)
            losses = {t: v for t, v in task_losses(outputs, y).items() if t != "b"}
            report = strategy.backward(losses, shared_params=inner.trunk.parameters())
            optimizer.step()
        out[name] = {
            "weights": report.weight_values.clone(),
            "params": [p.detach().clone() for p in inner.parameters()],
            "head_b_same": all(
                torch.equal(a, b) for a, b in zip(head_b, inner.heads["b"].parameters())
            ),
            "tasks": list(report.tasks),
        }
    return out


def worker(rank: int, world: int, init_file: str, out_dir: str, names: list[str]) -> None:
    torch.set_num_threads(1)
    # A timeout turns a rank left waiting in a collective into an error instead of a hang.
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=60),
    )
    results: dict[str, Any] = {}
    try:
        for name in names:
            for path in PATHS:
                try:
                    inner = Net()
                    model = nn.parallel.DistributedDataParallel(inner)
                    results[f"{name}/{path}"] = train(name, path, model, inner, rank)
                except Exception:  # recorded, so that one failing strategy fails its own test
                    results[f"{name}/{path}"] = {"error": traceback.format_exc()}
                    dist.barrier()
        for name in ACCUMULATED:
            try:
                inner = Net()
                model = nn.parallel.DistributedDataParallel(inner)
                results[f"accumulate/{name}"] = accumulate(name, model, inner, rank)
            except Exception:
                results[f"accumulate/{name}"] = {"error": traceback.format_exc()}
                dist.barrier()
        value = torch.tensor([float(rank + 1)])
        results["reduce"] = {
            "mean": distributed.all_reduce_mean(value),
            "sum": distributed.all_reduce_sum(value),
            "rank": distributed.rank(),
        }
        if rank == 0:  # the other rank waits at the barrier: a collective here would fail
            results["evaluation"] = _evaluation()
        dist.barrier()
        results["faults"] = _faults(rank)
        results["overflow"] = _overflow(rank)
        results["partial"] = _partial(rank)
    finally:
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.destroy_process_group()


def run_ranks(names: list[str], world: int = 2) -> list[dict[str, Any]]:
    """Spawn ``world`` gloo ranks running every strategy in ``names``; their results."""
    with tempfile.TemporaryDirectory() as out_dir:
        init_file = os.path.join(out_dir, "init")
        mp.spawn(worker, args=(world, init_file, out_dir, names), nprocs=world, join=True)
        return [torch.load(Path(out_dir) / f"rank{r}.pt", weights_only=True) for r in range(world)]


def run_single(names: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in names:
        for path in PATHS:
            inner = Net()
            out[f"{name}/{path}"] = train(name, path, inner, inner, None)
    for name in ACCUMULATED:
        inner = Net()
        out[f"accumulate/{name}"] = accumulate(name, inner, inner, None)
    return out


@pytest.fixture(scope="module")
def runs() -> Iterator[tuple[list[dict[str, Any]], dict[str, Any]]]:
    names = tb.list_strategies()
    yield run_ranks(names), run_single(names)


def _result(ranks: list[dict[str, Any]], key: str) -> list[dict[str, Any]]:
    for rank, result in enumerate(ranks):
        assert "error" not in result[key], f"rank {rank}: {result[key]['error']}"
    return [r[key] for r in ranks]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("name", tb.list_strategies())
def test_ranks_agree(runs: tuple[list[dict[str, Any]], dict[str, Any]], name: str, path: str):
    first, second = _result(runs[0], f"{name}/{path}")
    assert torch.equal(first["weights"], second["weights"]), "ranks computed different weights"
    assert torch.equal(first["losses"], second["losses"]), "ranks report different losses"
    for a, b in zip(first["params"], second["params"]):
        assert torch.equal(a, b), "ranks ended with different parameters"
    assert first["state"].keys() == second["state"].keys()
    for key, value in first["state"].items():
        assert torch.equal(value, second["state"][key]), f"ranks differ in state {key!r}"


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("name", tb.list_strategies())
def test_two_ranks_equal_one_process_with_twice_the_batch(
    runs: tuple[list[dict[str, Any]], dict[str, Any]], name: str, path: str
) -> None:
    ranked, _ = _result(runs[0], f"{name}/{path}")
    single = runs[1][f"{name}/{path}"]
    # The reported losses are the global means: the full-batch losses.
    torch.testing.assert_close(ranked["losses"], single["losses"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ranked["weights"], single["weights"], rtol=1e-4, atol=1e-6)
    for a, b in zip(ranked["params"], single["params"]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    for key, value in single["state"].items():
        torch.testing.assert_close(
            ranked["state"][key], value, rtol=1e-4, atol=1e-6, msg=f"state {key!r}"
        )


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("name", tb.list_strategies())
def test_one_sync_point_per_step(
    runs: tuple[list[dict[str, Any]], dict[str, Any]], name: str, path: str
) -> None:
    """The communication documented in taskbalance.distributed: an all-reduce of the loss vector
    (2T numbers) per ``gather``; gradient methods add one all-reduce of the Jacobian
    (shared_params) or one all-gather of its blocks after one of their sizes (features). DDP's
    reducer comes on top (C++, not counted). db_mtl gathers once, like every strategy (its log
    transform is a hook, applied to the global losses); graddrop on features adds one
    all-reduce of its batch-summed signed gradients."""
    ranked, _ = _result(runs[0], f"{name}/{path}")
    small, reduces, gathers = ranked["collectives"].tolist()
    assert small == 1 + (path == "features" and gathers > 0)
    if not tb.registry.strategy_info(name).needs_grads:
        assert (reduces, gathers) == (0, 0)
    elif path == "shared_params":
        assert (reduces, gathers) == (1, 0)
    else:
        assert (reduces, gathers) == ((1 if name == "graddrop" else 0), 1)


@pytest.mark.parametrize("name", ACCUMULATED)
def test_accumulation_under_ddp_equals_one_process(
    runs: tuple[list[dict[str, Any]], dict[str, Any]], name: str
) -> None:
    """2 ranks × 2 micro-batches of b/2 take the step of 1 process × 2 micro-batches of b: the
    accumulated update is averaged over the ranks once (as DDP would), not left local."""
    first, second = _result(runs[0], f"accumulate/{name}")
    single = runs[1][f"accumulate/{name}"]
    for a, b in zip(first["params"], second["params"]):
        assert torch.equal(a, b), "ranks ended with different parameters"
    torch.testing.assert_close(first["weights"], single["weights"], rtol=1e-4, atol=1e-6)
    for a, b in zip(first["params"], single["params"]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    for key, value in single["state"].items():
        torch.testing.assert_close(
            first["state"][key], value, rtol=1e-4, atol=1e-6, msg=f"state {key!r}"
        )


def test_reduce_helpers(runs: tuple[list[dict[str, Any]], dict[str, Any]]) -> None:
    """Ranks hold 1 and 2: the mean is 1.5 (not the sum, which every rank would apply alike)."""
    for rank, result in enumerate(r["reduce"] for r in runs[0]):
        assert result["mean"].tolist() == [1.5]
        assert result["sum"].tolist() == [3.0]
        assert result["rank"] == rank


@pytest.mark.parametrize("name", tb.list_strategies())
def test_evaluation_on_one_rank_issues_no_collective(
    runs: tuple[list[dict[str, Any]], dict[str, Any]], name: str
) -> None:
    """``.eval()`` mode never communicates, even on losses with a graph and grad mode on:
    evaluating on rank 0 alone must not leave it waiting for the other rank."""
    issued = runs[0][0]["evaluation"][name]
    assert issued == [], f"evaluation issued {issued}"


def test_fault_on_one_rank_raises_on_every_rank(
    runs: tuple[list[dict[str, Any]], dict[str, Any]],
) -> None:
    faults = [r["faults"] for r in runs[0]]
    assert faults[0]["nan"] == "loss of task 'b' is not finite on another rank"
    assert faults[1]["nan"].startswith("loss of task 'b' is not finite")
    for rank in faults:
        assert "task 'b' is in the losses of 1 of 2 ranks" in rank["split"]
        assert "needs features of the same shape on every rank" in rank["shapes"]
        assert rank["shapes_state_same"] == "True", "graddrop drew masks before raising"


def test_overflow_on_one_rank_is_skipped_by_every_rank(
    runs: tuple[list[dict[str, Any]], dict[str, Any]],
) -> None:
    for rank, result in enumerate(r["overflow"] for r in runs[0]):
        assert result["state_same"], f"rank {rank}: the strategy state changed on an overflow"
        assert result["params_same"], f"rank {rank}: the optimizer stepped on an overflow"
        assert result["scale"] == 2.0**15, "GradScaler did not back off"


def test_partial_labels_under_ddp(runs: tuple[list[dict[str, Any]], dict[str, Any]]) -> None:
    first, second = (r["partial"] for r in runs[0])
    for name, result in first.items():
        assert result["tasks"] == ["a", "c"]
        assert result["head_b_same"], f"{name}: the absent task's head moved"
        assert torch.equal(result["weights"], second[name]["weights"])
        for a, b in zip(result["params"], second[name]["params"]):
            assert torch.equal(a, b), f"{name}: ranks differ after partial-label steps"


class IdenticalRanks:
    """A stand-in for ``torch.distributed``: ``world`` ranks holding the same tensors, so a sum
    over a group is ``size × tensor``; ``"pair"`` is a sub-group of 2 ranks: the last two, so
    this process is rank ``world − 1`` of the world and rank 1 of the pair.
    It lets one process check which group a reduction is taken over (the spawn has 2 ranks
    only, so there WORLD and any multi-rank group have the same size)."""

    ReduceOp = dist.ReduceOp

    def __init__(self, world: int) -> None:
        self.sizes = {None: world, "world": world, "pair": 2}
        self.group = type("Groups", (), {"WORLD": "world"})
        self.issued: list[str] = []

    def is_available(self) -> bool:
        return True

    def is_initialized(self) -> bool:
        return True

    def get_world_size(self, group: Any = None) -> int:
        return self.sizes[group]

    def get_rank(self, group: Any = None) -> int:
        return self.sizes[group] - 1

    def all_reduce(self, tensor: Tensor, op: Any = None, group: Any = None) -> None:
        self.issued.append("all_reduce")
        tensor.mul_(self.sizes[group])

    def all_gather(self, tensors: list[Tensor], tensor: Tensor, group: Any = None) -> None:
        self.issued.append("all_gather")
        assert len(tensors) == self.sizes[group], "one output per rank of the group"
        for out in tensors:
            out.copy_(tensor)


def _fake_ranks(monkeypatch: pytest.MonkeyPatch, world: int) -> IdenticalRanks:
    fake = IdenticalRanks(world)
    monkeypatch.setattr(distributed, "dist", fake)
    return fake


def _one_step(
    name: str, path: str, group: Any = None, dtype: torch.dtype = torch.float32, **kwargs: Any
) -> dict[str, Any]:
    inner = Net().to(dtype)
    strategy = tb.create_strategy(name, TASKS, **kwargs)
    strategy.process_group = group
    x, y = (t.to(dtype) for t in local_batch(0, 0))
    features, outputs = inner(x)
    inputs = (
        {"features": features}
        if path == "features"
        else {"shared_params": [*inner.trunk.parameters()]}
    )
    report = strategy.backward(task_losses(outputs, y), **inputs)  # type: ignore[arg-type]
    return {"weights": report.weight_values, "grads": [p.grad.clone() for p in inner.parameters()]}


# uncertainty: the loss all-reduce; mgda: the Jacobian all-reduce (shared_params) and all-gather
# (features), scale-free weights; graddrop with leak 1 (a plain sum, no masks): the reduced rows'
# scale shows in the update, and its features block is multiplied by the group's number of ranks
SUB_GROUP_STEPS: list[tuple[str, str, dict[str, Any]]] = [
    ("uncertainty", "shared_params", {}),
    ("mgda", "shared_params", {}),
    ("mgda", "features", {}),
    ("graddrop", "shared_params", {"leak": 1.0}),
    ("graddrop", "features", {"leak": 1.0}),
]


def test_reductions_over_a_sub_group(monkeypatch: pytest.MonkeyPatch) -> None:
    """In a world of 4 identical ranks, reducing over the 2-rank ``"pair"`` divides by 2: the mean
    is the rank's own value, and a step over the pair is the one-process step."""
    plain = [_one_step(name, path, **kwargs) for name, path, kwargs in SUB_GROUP_STEPS]
    exact = {"dtype": torch.float64, "leak": 1.0}
    plain_float64 = _one_step("graddrop", "features", **exact)
    fake = _fake_ranks(monkeypatch, world=4)
    value = torch.tensor([1.0, 2.0])
    assert distributed.all_reduce_mean(value, "pair").tolist() == [1.0, 2.0]
    assert (distributed.rank("pair"), distributed.rank()) == (1, 3)
    for (name, path, kwargs), expected in zip(SUB_GROUP_STEPS, plain):
        got = _one_step(name, path, group="pair", **kwargs)
        torch.testing.assert_close(got["weights"], expected["weights"], msg=f"{name}/{path}")
        for a, b in zip(got["grads"], expected["grads"]):
            torch.testing.assert_close(a, b, msg=f"{name}/{path}")
    assert "all_gather" in fake.issued  # the features path went through the group too
    # float64 rows stay float64 through the gather: halving and doubling are exact, bit for bit
    got = _one_step("graddrop", "features", group="pair", **exact)
    assert all(torch.equal(a, b) for a, b in zip(got["grads"], plain_float64["grads"]))


def test_one_rank_is_not_distributed(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch.distributed initialised with a single rank: nothing to reduce, no collective."""
    fake = _fake_ranks(monkeypatch, world=1)
    assert not distributed.is_distributed() and distributed.world_size() == 1
    _one_step("mgda", "shared_params")
    assert fake.issued == []


def test_no_communication_without_torch_distributed() -> None:
    assert not distributed.is_distributed()
    assert distributed.world_size() == 1
    value = torch.tensor([1.0, 2.0])
    assert distributed.all_reduce_mean(value) is value
    assert not distributed.is_distributed(distributed.LOCAL)


@pytest.mark.slow
@pytest.mark.parametrize(
    "args", [["--strategy", "mgda"], ["--strategy", "famo", "--accumulate", "2", "--amp"]]
)
def test_ddp_example_under_torchrun(args: list[str], tmp_path: Path) -> None:
    """The example script exits non-zero if the two ranks' parameters differ at the end."""
    import subprocess
    import sys

    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "-m",
        "experiments.ddp_example",
        "--steps",
        "10",
        "--wandb-mode",
        "disabled",
        "--out",
        str(tmp_path),
        *args,
    ]
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run(command, cwd=root, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "2 rank(s)" in done.stdout and "max parameter difference 0.0" in done.stdout
