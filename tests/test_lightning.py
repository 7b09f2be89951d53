"""PyTorch Lightning: every strategy trains under Lightning's automatic optimization exactly as in
the plain loop of the README.

Each test trains with a real ``lightning.Trainer`` on CPU and compares with the same run written
as the plain loop (``optimizer.zero_grad(); strategy.backward(...); optimizer.step()``): the
parameters and the strategy's state must be equal. Covered: every registered strategy (the
``shared_params`` path, the ``features`` path for gradient methods, ``shared_parameters()``
for the others), resuming from a checkpoint, bf16 autocast, 16-bit with a GradScaler (an
overflow step included), gradient accumulation, DDP with two gloo ranks, the logged step report,
the manual-optimization recipe for ``TaskOptimizers``, the error messages, and the guide's
examples.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import socket
import subprocess
import sys
import tempfile
import traceback
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor, nn
from torch.utils.data import DataLoader, Sampler, TensorDataset

pytest.importorskip("lightning")

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import Logger
from lightning.pytorch.plugins.precision import MixedPrecision
from lightning.pytorch.strategies import DDPStrategy

import taskbalance as tb
from taskbalance.integrations.lightning import (
    CHECKPOINT_KEY,
    MultiTaskModule,
    TaskOptimizersAdapter,
    TaskSchedulers,
)
from tests.examples import python_blocks, run_python_blocks

GUIDE = Path(__file__).resolve().parents[1] / "docs" / "guides" / "lightning.md"
TASKS = ("a", "b")
SCALES = {"a": 1.0, "b": 3.0}
BATCH = 8
EPOCHS = 3  # DWA's weights move from the third epoch on
STRATEGIES = tb.list_strategies()
GRADIENT = [n for n in STRATEGIES if tb.strategy_info(n).needs_grads]
# Every strategy on the shared parameters; gradient methods also on the features; loss weightings
# through an overridden shared_parameters() (what balance() uses when given neither).
CASES = [
    *((n, "shared_params") for n in GRADIENT),
    *((n, "features") for n in GRADIENT),
    *((n, "override") for n in STRATEGIES if n not in GRADIENT),
]

pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning:lightning.*"),
    pytest.mark.filterwarnings("ignore:.*does not have many workers:UserWarning"),
    pytest.mark.filterwarnings("ignore:.*LeafSpec.*:FutureWarning"),
]


def data(size: int = 16, boost: dict[int, float] | None = None) -> TensorDataset:
    """Inputs, two targets, and a factor on task a's loss per sample (to provoke an overflow)."""
    generator = torch.Generator().manual_seed(5)
    x = torch.randn(size, 4, generator=generator)
    y = torch.randn(size, len(TASKS), generator=generator)
    factor = torch.ones(size)
    for index, value in (boost or {}).items():
        factor[index] = value
    return TensorDataset(x, y, factor)


def toy_losses(
    trunk: nn.Module, heads: nn.ModuleDict, batch: list[Tensor]
) -> tuple[Tensor, dict[str, Tensor]]:
    """The trunk's output and the task losses (task "a" scaled by the batch's largest factor)."""
    x, y, factor = batch
    z = trunk(x)
    losses = {
        t: SCALES[t] * (1.0 + (heads[t](z).squeeze(1).float() - y[:, i]).pow(2).mean())
        for i, t in enumerate(TASKS)
    }
    losses["a"] = losses["a"] * factor.max()
    return z, losses


class Net(MultiTaskModule):
    """A tanh trunk and a linear head per task; ``path`` says what ``balance`` gets."""

    def __init__(self, name: str = "mgda", path: str = "shared_params", **options: Any) -> None:
        torch.manual_seed(1)  # the same strategy in every run (random ones included)
        super().__init__(name, TASKS, **options)
        torch.manual_seed(0)
        self.trunk = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 5), nn.Tanh())
        self.heads = nn.ModuleDict({t: nn.Linear(5, 1) for t in TASKS})
        self.path = path

    def task_losses(self, batch: list[Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        return toy_losses(self.trunk, self.heads, batch)

    def shared_parameters(self) -> Any:
        return self.trunk.parameters() if self.path == "override" else None

    def training_step(self, batch: list[Tensor], batch_idx: int) -> Tensor:
        z, losses = self.task_losses(batch)
        if self.path == "features":
            return self.balance(losses, features=z)
        if self.path == "shared_params":
            return self.balance(losses, shared_params=self.trunk.parameters())
        return self.balance(losses)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


def trainer(**options: Any) -> L.Trainer:
    settings: dict[str, Any] = {
        "accelerator": "cpu",
        "devices": 1,
        "max_epochs": EPOCHS,
        "logger": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "enable_checkpointing": False,
        "num_sanity_val_steps": 0,
    }
    settings.update(options)
    return L.Trainer(**settings)


def fit(
    model: L.LightningModule,
    dataset: TensorDataset | None = None,
    *,
    batch: int = BATCH,
    ckpt_path: str | None = None,
    val_dataloaders: DataLoader[Any] | None = None,
    **options: Any,
) -> L.Trainer:
    run = trainer(**options)
    loader = DataLoader(data() if dataset is None else dataset, batch_size=batch)
    run.fit(model, loader, val_dataloaders, ckpt_path=ckpt_path)
    return run


def plain(
    name: str,
    path: str = "shared_params",
    dataset: TensorDataset | None = None,
    *,
    batch: int = BATCH,
    epochs: int = EPOCHS,
    autocast: torch.dtype | None = None,
    scaler: torch.amp.GradScaler | None = None,
) -> tuple[Net, list[tb.StepReport]]:
    """The README's loop: zero_grad, strategy.backward, step; end_epoch after each epoch."""
    model = Net(name, path)
    strategy = model.strategy
    optimizer = model.configure_optimizers()
    reports = []
    for _ in range(epochs):
        for step_batch in DataLoader(data() if dataset is None else dataset, batch_size=batch):
            optimizer.zero_grad()
            context = (
                torch.autocast("cpu", dtype=autocast) if autocast else contextlib.nullcontext()
            )
            with context:
                z, losses = model.task_losses(step_batch)
            if path == "features":
                report = strategy.backward(losses, features=z, scaler=scaler)
            else:
                report = strategy.backward(
                    losses, shared_params=model.trunk.parameters(), scaler=scaler
                )
            if scaler is None:
                optimizer.step()
            else:
                scaler.step(optimizer)
                scaler.update()
            reports.append(report)
        strategy.end_epoch()
    return model, reports


def strategy_state(model: MultiTaskModule) -> dict[str, Tensor]:
    return {k: v for k, v in model.strategy.state_dict().items() if isinstance(v, Tensor)}


def assert_same(
    trained: MultiTaskModule, reference: MultiTaskModule, rtol: float = 0.0, atol: float = 0.0
) -> None:
    """Equal parameters and strategy state (bit for bit by default)."""
    for (name, a), b in zip(trained.named_parameters(), reference.parameters()):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=lambda m, n=name: f"{n}: {m}")
    state, expected = strategy_state(trained), strategy_state(reference)
    assert state.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(
            state[key], value, rtol=rtol, atol=atol, msg=lambda m, k=key: f"state {k}: {m}"
        )


# ----------------------------------------------------------------- every strategy
@pytest.mark.parametrize(("name", "path"), CASES)
def test_lightning_equals_the_plain_loop(name: str, path: str) -> None:
    model = Net(name, path)
    run = fit(model)
    reference, reports = plain(name, path)
    assert run.global_step == len(reports) == EPOCHS * 2
    assert_same(model, reference)
    assert model.last_report is not None
    torch.testing.assert_close(model.last_report.weight_values, reports[-1].weight_values)


@pytest.mark.parametrize("name", STRATEGIES)
def test_resume_from_a_checkpoint_equals_an_uninterrupted_run(name: str, tmp_path: Path) -> None:
    # Lightning restarts a dataloader without state at the start of the epoch, so a checkpoint
    # taken mid-epoch would not see the same batches: checkpoint at an epoch end. ModelCheckpoint
    # saves after the module's on_train_epoch_end, so the strategy's epoch is closed in it.
    saver = ModelCheckpoint(dirpath=tmp_path, filename="{epoch}", save_top_k=-1)
    uninterrupted = Net(name)
    fit(uninterrupted, callbacks=[saver], enable_checkpointing=True)
    checkpoint = tmp_path / "epoch=0.ckpt"
    saved = torch.load(checkpoint, weights_only=True)[CHECKPOINT_KEY]
    assert saved.keys() == uninterrupted.strategy.state_dict().keys()
    resumed = Net(name)
    run = fit(resumed, ckpt_path=str(checkpoint))
    assert run.global_step == EPOCHS * 2
    assert_same(resumed, uninterrupted)


def test_gradient_clipping_clips_the_strategy_update() -> None:
    model = Net("cagrad")
    fit(model, gradient_clip_val=0.05)
    reference = Net("cagrad")
    optimizer = reference.configure_optimizers()
    for _ in range(EPOCHS):
        for batch in DataLoader(data(), batch_size=BATCH):
            optimizer.zero_grad()
            _, losses = reference.task_losses(batch)
            reference.strategy.backward(losses, shared_params=reference.trunk.parameters())
            torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.05)
            optimizer.step()
    assert_same(model, reference)
    unclipped, _ = plain("cagrad")
    assert not torch.equal(unclipped.trunk[0].weight, model.trunk[0].weight)


class Validated(Net):
    def validation_step(self, batch: list[Tensor], batch_idx: int) -> None:
        _, losses = self.task_losses(batch)
        self.log("val/loss", self.strategy(losses))
        self.log_dict({f"val/loss/{t}": loss for t, loss in losses.items()})


@pytest.mark.parametrize("name", ["uncertainty", "dwa", "mgda"])
def test_validation_with_the_strategy_changes_no_training_step(name: str) -> None:
    model = Validated(name)
    val = DataLoader(data(8), batch_size=BATCH)
    run = fit(model, val_dataloaders=val)
    reference, _ = plain(name)
    assert_same(model, reference)
    assert {"val/loss", "val/loss/a", "val/loss/b"} <= set(run.callback_metrics)


# ----------------------------------------------------------------- precision
@pytest.mark.parametrize(
    ("name", "path"), [(n, "features" if n in GRADIENT else "override") for n in STRATEGIES]
)
def test_bf16_mixed_equals_the_plain_loop_under_autocast(name: str, path: str) -> None:
    model = Net(name, path)
    fit(model, precision="bf16-mixed")
    reference, _ = plain(name, path, autocast=torch.bfloat16)
    assert_same(model, reference)
    # Not a vacuous comparison: bf16 changed the run.
    full, _ = plain(name, path)
    assert not torch.equal(full.trunk[0].weight, model.trunk[0].weight)


def _scaler() -> torch.amp.GradScaler:
    # The second batch of an epoch (loss x1e30) overflows: GradScaler skips it and backs off;
    # the other steps are finite at this scale and grow it after two of them.
    return torch.amp.GradScaler("cpu", init_scale=2.0**8, backoff_factor=0.5, growth_interval=2)


@pytest.mark.parametrize(
    ("name", "path"),
    [("uncertainty", "override"), ("mgda", "shared_params"), ("pcgrad", "features")],
)
def test_16_mixed_scales_once_and_skips_overflows_like_the_plain_loop(name: str, path: str) -> None:
    # The second batch of every epoch: a finite loss whose scaled gradients overflow in fp16.
    dataset = data(boost={8: 1e30})
    scaler = _scaler()
    model = Net(name, path)
    fit(model, dataset, plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)])
    reference_scaler = _scaler()
    reference, _ = plain(name, path, dataset, autocast=torch.float16, scaler=reference_scaler)
    assert_same(model, reference)
    # Three overflows, three backoffs: a run that scaled twice (or never) would not match.
    assert scaler.get_scale() == reference_scaler.get_scale() == 2.0**5


class Watch(Net):
    """Records the parameters and the strategy state after every training batch."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.seen: list[tuple[list[Tensor], dict[str, Tensor]]] = []

    def on_train_batch_end(self, *args: Any) -> None:
        params = [p.detach().clone() for p in self.parameters()]
        self.seen.append((params, {k: v.clone() for k, v in strategy_state(self).items()}))


# Strategies whose overflow is not undone by their weights (FAMO's 1/L weights keep the gradient
# of a 1e30 loss finite): a learned weighting, a random one, a random gradient method.
@pytest.mark.parametrize("name", ["uncertainty", "rlw", "gradvac"])
def test_16_mixed_overflow_step_changes_neither_model_nor_strategy(name: str) -> None:
    model = Watch(name, "override")
    plugin = MixedPrecision("16-mixed", "cpu", scaler=_scaler())
    fit(model, data(boost={8: 1e30}), max_epochs=1, plugins=[plugin])
    (params, state), (params_after, state_after) = model.seen
    for a, b in zip(params, params_after):
        assert torch.equal(a, b), "the optimizer stepped on an overflow"
    assert state.keys() == state_after.keys()
    for key in state:
        assert torch.equal(state[key], state_after[key]), f"state {key} moved on an overflow"


# ----------------------------------------------------------------- accumulation
@pytest.mark.parametrize("name", ["mgda", "famo", "uncertainty", "dwa"])
def test_accumulation_equals_one_step_on_the_whole_batch(name: str) -> None:
    model = Net(name, "override")
    run = fit(model, batch=BATCH // 2, accumulate_grad_batches=2)
    reference, reports = plain(name, "shared_params")
    assert run.global_step == len(reports)
    assert_same(model, reference, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model.last_report.loss_values, reports[-1].loss_values)


def test_accumulation_with_a_short_last_window_steps_at_the_epoch_end() -> None:
    # 3 micro-batches per epoch, 2 per window: Lightning steps after micro-batches 2 and 3.
    model = Net("mgda", "override")
    run = fit(model, data(size=12), batch=4, accumulate_grad_batches=2, max_epochs=2)
    assert run.global_step == 4
    reference = Net("mgda")
    optimizer = reference.configure_optimizers()
    for _ in range(2):
        for window in (slice(0, 8), slice(8, 12)):
            optimizer.zero_grad()
            x, y, f = data(size=12)[window]
            _, losses = reference.task_losses([x, y, f])
            reference.strategy.backward(losses, shared_params=reference.trunk.parameters())
            optimizer.step()
        reference.strategy.end_epoch()
    assert_same(model, reference, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------- logging
class Recorder(Logger):
    """Keeps what Lightning writes: one dict per logged step."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[tuple[int, dict[str, float]]] = []

    @property
    def name(self) -> str:
        return "recorder"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.rows.append((int(step or 0), dict(metrics)))


@pytest.mark.parametrize("name", ["uncertainty", "mgda"])
def test_the_step_report_is_logged_every_step(name: str) -> None:
    recorder = Recorder()
    model = Net(name)
    fit(model, logger=recorder, log_every_n_steps=1)
    _, reports = plain(name)
    rows = [(step, m) for step, m in recorder.rows if any(k.startswith("train/") for k in m)]
    assert [step for step, _ in rows] == list(range(len(reports)))
    for (_, metrics), report in zip(rows, reports):
        expected = report.to_dict(prefix="train/")
        assert {k for k in metrics if k.startswith("train/")} == set(expected)
        for key, value in expected.items():
            assert metrics[key] == pytest.approx(value, rel=1e-6, abs=1e-7), key
    assert {"train/loss/a", "train/weight/b"} <= set(rows[0][1])
    tensors = reports[-1].to_tensors(prefix="x/")  # what is logged, without a host sync
    assert {k: v.item() for k, v in tensors.items()} == reports[-1].to_dict(prefix="x/")


def test_log_prefix_none_logs_nothing() -> None:
    recorder = Recorder()
    model = Net("uncertainty")
    model.log_prefix = None
    fit(model, logger=recorder, log_every_n_steps=1, max_epochs=1)
    assert not any(k.startswith("train/") for _, m in recorder.rows for k in m)


# ----------------------------------------------------------------- the module
def test_the_strategy_is_kept_out_of_the_module_tree() -> None:
    model = Net("uncertainty")
    strategy_params = {id(p) for p in model.strategy.parameters()}
    assert strategy_params, "uncertainty has learned parameters"
    assert not strategy_params & {id(p) for p in model.parameters()}
    assert not any("log_var" in k for k in model.state_dict())
    model.to(torch.float64)  # the dtype is the module's alone
    assert all(p.dtype == torch.float32 for p in model.strategy.parameters())
    model.to("meta")  # the device is followed
    assert all(
        t.device.type == "meta"
        for t in model.strategy.state_dict().values()
        if isinstance(t, Tensor)
    )


def test_construction_errors() -> None:
    with pytest.raises(tb.StrategyError, match="give tasks"):
        MultiTaskModule("mgda")
    with pytest.raises(tb.StrategyError, match=r"tasks \['x', 'y'\] differ"):
        MultiTaskModule(tb.create_strategy("mgda", TASKS), tasks=["x", "y"])
    with pytest.raises(tb.StrategyError, match="already built"):
        MultiTaskModule(tb.create_strategy("mgda", TASKS), alpha=1.0)
    with pytest.raises(tb.StrategyError, match="takes no argument 'alpah'"):
        MultiTaskModule("gradnorm", TASKS, alpah=1.0)
    with pytest.raises(tb.StrategyError, match="a Strategy or a registry name"):
        MultiTaskModule(3)  # type: ignore[arg-type]


class NoBalance(Net):
    def training_step(self, batch: list[Tensor], batch_idx: int) -> Tensor:
        return sum(self.task_losses(batch)[1].values())  # type: ignore[return-value]


class Twice(Net):
    def training_step(self, batch: list[Tensor], batch_idx: int) -> Tensor:
        losses = self.task_losses(batch)[1]
        self.balance(losses, shared_params=self.trunk.parameters())
        return self.balance(losses, shared_params=self.trunk.parameters())


class UnknownTask(Net):
    def training_step(self, batch: list[Tensor], batch_idx: int) -> Tensor:
        losses = self.task_losses(batch)[1]
        return self.balance({**losses, "c": losses["a"]}, shared_params=self.trunk.parameters())


class KeptGenerator(Net):
    def training_step(self, batch: list[Tensor], batch_idx: int) -> Tensor:
        if not hasattr(self, "kept"):
            self.kept = self.trunk.parameters()  # used up by the first step
        return self.balance(self.task_losses(batch)[1], shared_params=self.kept)


class NoEpochEnd(Net):
    def on_train_epoch_end(self) -> None:
        pass  # forgets super(): DWA's epoch is never closed


@pytest.mark.parametrize(
    ("module", "name", "path", "message"),
    [
        (NoBalance, "mgda", "shared_params", "training_step must return self.balance"),
        (Twice, "mgda", "shared_params", "balance\\(\\) was called twice"),
        (UnknownTask, "mgda", "shared_params", "unknown task 'c'"),
        (Net, "mgda", "none", "MGDA needs per-task gradients: pass shared_params="),
        (NoEpochEnd, "dwa", "none", "epoch 0 ended without strategy.end_epoch"),
        (KeptGenerator, "mgda", "none", "shared_params is empty: it is an iterator that an"),
    ],
)
def test_training_errors_name_what_is_wrong(
    module: type[Net], name: str, path: str, message: str
) -> None:
    with pytest.raises(tb.StrategyError, match=message):
        fit(module(name, path), max_epochs=2)


def test_accumulation_needs_the_shared_parameters() -> None:
    with pytest.raises(tb.StrategyError, match="shared_params= to balance"):
        fit(Net("mgda", "features"), batch=4, accumulate_grad_batches=2, max_epochs=1)


def test_checkpoint_errors_name_what_is_wrong() -> None:
    model = Net("uncertainty")
    with pytest.raises(tb.StrategyError, match=f"no '{CHECKPOINT_KEY}' entry"):
        model.on_load_checkpoint({"state_dict": {}})
    other = Net("mgda")
    checkpoint: dict[str, Any] = {}
    other.on_save_checkpoint(checkpoint)
    with pytest.raises(tb.StrategyError, match=f"checkpoint's '{CHECKPOINT_KEY}'.*MGDA"):
        model.on_load_checkpoint(checkpoint)


def test_balance_outside_automatic_optimization_is_refused() -> None:
    model = Net("mgda")
    model.automatic_optimization = False
    with pytest.raises(tb.StrategyError, match="automatic optimization"):
        model.balance({"a": torch.ones((), requires_grad=True)})


def test_import_needs_no_lightning_and_says_how_to_install_it() -> None:
    script = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'lightning' or name.startswith('lightning.'):\n"
        "            raise ImportError('blocked: ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import taskbalance\n"
        "assert 'lightning' not in {m.split('.')[0] for m in sys.modules}, 'lightning imported'\n"
        "try:\n"
        "    import taskbalance.integrations.lightning\n"
        "except ImportError as error:\n"
        "    print(error)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True
    )
    assert 'pip install "taskbalance[lightning]"' in result.stdout


# ----------------------------------------------------------------- manual optimization
STEPS = 10
LRS = {"a": 0.05, "b": 0.1, "shared": 0.02}


class Manual(L.LightningModule):
    """The guide's recipe: per-task optimizers for the heads, a strategy for the trunk."""

    def __init__(self, strategy: str = "uncertainty") -> None:
        super().__init__()
        self.automatic_optimization = False
        torch.manual_seed(0)
        self.trunk = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 5), nn.Tanh())
        self.heads = nn.ModuleDict({t: nn.Linear(5, 1) for t in TASKS})
        self.strategy_name = strategy
        self.steps = 0

    def task_losses(self, batch: list[Tensor]) -> dict[str, Tensor]:
        return toy_losses(self.trunk, self.heads, batch)[1]

    def configure_optimizers(self) -> dict[str, Any]:
        torch.manual_seed(1)
        tasks = tb.TaskOptimizers(
            {
                "a": torch.optim.Adam(self.heads["a"].parameters(), lr=LRS["a"]),
                "b": torch.optim.SGD(self.heads["b"].parameters(), lr=LRS["b"], momentum=0.9),
            },
            shared=torch.optim.SGD(self.trunk.parameters(), lr=LRS["shared"], momentum=0.9),
            strategy=self.strategy_name,
        )
        optimizer = TaskOptimizersAdapter(tasks)
        schedulers = TaskSchedulers(
            optimizer,
            {
                "a": torch.optim.lr_scheduler.StepLR(tasks["a"], step_size=3, gamma=0.5),
                "b": torch.optim.lr_scheduler.ExponentialLR(tasks["b"], gamma=0.9),
            },
        )
        return {"optimizer": optimizer, "lr_scheduler": schedulers}

    def training_step(self, batch: list[Tensor], batch_idx: int) -> None:
        optimizer = self.optimizers()
        optimizer.zero_grad()
        report = optimizer.backward(self.task_losses(batch))
        optimizer.step()
        self.lr_schedulers().step()
        self.steps += 1
        self.log_dict(report.to_dict(prefix="train/"))


def manual_reference(steps: int) -> Manual:
    """The same training as the plain loop of the README's per-task optimizers."""
    model = Manual()
    config = model.configure_optimizers()
    optimizer, schedulers = config["optimizer"], config["lr_scheduler"]
    batches = [b for _ in range(2) for b in DataLoader(data(40), batch_size=BATCH)]
    for batch in batches[:steps]:
        optimizer.zero_grad()
        optimizer.backward(model.task_losses(batch))
        optimizer.step()
        schedulers.step()
    return model


def assert_tree_equal(tree: Any, expected: Any, where: str = "") -> None:
    if isinstance(expected, Tensor):
        assert torch.equal(tree, expected), where
    elif isinstance(expected, dict):
        assert tree.keys() == expected.keys(), where
        for key in expected:
            assert_tree_equal(tree[key], expected[key], f"{where}/{key}")
    elif isinstance(expected, (list, tuple)):
        assert len(tree) == len(expected), where
        for i, (a, b) in enumerate(zip(tree, expected)):
            assert_tree_equal(a, b, f"{where}/{i}")
    else:
        assert tree == expected, where


def test_manual_task_optimizers_count_one_global_step_per_training_step() -> None:
    model = Manual()
    run = fit(model, data(40), max_epochs=-1, max_steps=STEPS)
    assert model.steps == STEPS
    assert run.global_step == STEPS
    optimizer = run.optimizers[0]
    tasks = optimizer.task_optimizers
    assert tasks["a"].param_groups[0]["lr"] == pytest.approx(LRS["a"] * 0.5 ** (STEPS // 3))
    assert tasks["b"].param_groups[0]["lr"] == pytest.approx(LRS["b"] * 0.9**STEPS)
    assert tasks.shared.param_groups[0]["lr"] == LRS["shared"]
    reference = manual_reference(STEPS)
    for a, b in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_manual_task_optimizers_resume_exactly(tmp_path: Path) -> None:
    # 5 batches per epoch: checkpoint at the first epoch's end (see _resume).
    saver = ModelCheckpoint(dirpath=tmp_path, filename="{epoch}", save_top_k=-1)
    uninterrupted = Manual()
    run = fit(uninterrupted, data(40), max_epochs=2, callbacks=[saver], enable_checkpointing=True)
    resumed = Manual()
    again = fit(resumed, data(40), max_epochs=2, ckpt_path=str(tmp_path / "epoch=0.ckpt"))
    assert again.global_step == run.global_step == STEPS
    assert resumed.steps == STEPS // 2
    for a, b in zip(resumed.parameters(), uninterrupted.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert_tree_equal(again.optimizers[0].state_dict(), run.optimizers[0].state_dict())
    assert again.lr_scheduler_configs[0].scheduler.get_last_lr() == pytest.approx(
        run.lr_scheduler_configs[0].scheduler.get_last_lr()
    )


def test_manual_16_mixed_task_optimizers_equal_the_plain_loop() -> None:
    class Scaled(Manual):
        def training_step(self, batch: list[Tensor], batch_idx: int) -> None:
            from taskbalance.integrations.lightning import grad_scaler

            optimizer = self.optimizers()
            optimizer.zero_grad()
            optimizer.backward(self.task_losses(batch), scaler=grad_scaler(self.trainer))
            optimizer.step()
            self.lr_schedulers().step()

    dataset = data(40, boost={8: 1e30})  # the second step overflows and is skipped
    scaler = _scaler()
    model = Scaled()
    fit(model, dataset, max_epochs=1, plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)])
    reference = Manual()
    config = reference.configure_optimizers()
    optimizer, schedulers = config["optimizer"], config["lr_scheduler"]
    reference_scaler = _scaler()
    for batch in DataLoader(dataset, batch_size=BATCH):
        optimizer.zero_grad()
        with torch.autocast("cpu", dtype=torch.float16):
            losses = reference.task_losses(batch)
        optimizer.backward(losses, scaler=reference_scaler)
        reference_scaler.step(optimizer)
        reference_scaler.update()
        schedulers.step()
    assert scaler.get_scale() == reference_scaler.get_scale() == 2.0**8  # one backoff
    for a, b in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_manual_16_mixed_without_the_scaler_fails_loudly() -> None:
    # GradScaler itself refuses to step a scaler that never scaled (torch's AssertionError);
    # the adapter refuses a step whose losses were not scaled once the scale exists.
    with pytest.raises((tb.StrategyError, AssertionError), match="scaler"):
        fit(Manual(), data(16), max_epochs=1, plugins=[MixedPrecision("16-mixed", "cpu")])


def test_task_schedulers_check_their_optimizers() -> None:
    tasks = tb.TaskOptimizers({"a": torch.optim.SGD([nn.Parameter(torch.ones(1))], lr=0.1)})
    optimizer = TaskOptimizersAdapter(tasks)
    stranger = torch.optim.SGD([nn.Parameter(torch.ones(1))], lr=0.1)
    with pytest.raises(tb.StrategyError, match="scheduler 'x' is not built on"):
        TaskSchedulers(optimizer, {"x": torch.optim.lr_scheduler.StepLR(stranger, 1)})
    with pytest.raises(tb.StrategyError, match=r"wraps a tb\.TaskOptimizers"):
        TaskOptimizersAdapter(stranger)  # type: ignore[arg-type]
    schedulers = TaskSchedulers(optimizer, {"a": torch.optim.lr_scheduler.StepLR(tasks["a"], 1)})
    with pytest.raises(tb.StrategyError, match=r"scheduler state for \['b'\]"):
        schedulers.load_state_dict({"b": {}})


def test_task_optimizers_refuse_ddp(monkeypatch: pytest.MonkeyPatch) -> None:
    model = Manual()
    optimizer = model.configure_optimizers()["optimizer"]
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    with pytest.raises(tb.StrategyError, match="under DDP train with MultiTaskModule"):
        optimizer.backward(model.task_losses(list(data(8)[:])))


# ----------------------------------------------------------------- DDP
DDP_DEFAULT = ["uncertainty", "mgda", "graddrop"]
DDP_ACCUMULATED = ["mgda"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RankSlices(Sampler[int]):
    """This rank's contiguous share of every global batch of ``BATCH`` samples, so that the
    ranks' features side by side are the one-process batch in its order (what per-sample state
    such as MoCo's on the features path is indexed by)."""

    def __init__(self, size: int, rank: int, world: int) -> None:
        share = BATCH // world
        self.indices = [
            start + rank * share + i for start in range(0, size, BATCH) for i in range(share)
        ]

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def _ddp_worker(rank: int, world: int, port: int, out_dir: str, cases: list[Any]) -> None:
    # As torchrun would start it: Lightning sees an externally launched process (LOCAL_RANK)
    # and joins the group instead of spawning its own workers.
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        WORLD_SIZE=str(world),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        NODE_RANK="0",
    )
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    dist.init_process_group(
        "gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60)
    )
    results: dict[str, Any] = {}
    try:
        for name, path, accumulate in cases:
            key = f"{name}/{path}/{accumulate}"
            try:
                model = Net(name, path)
                run = trainer(
                    devices=world,
                    strategy=DDPStrategy(process_group_backend="gloo"),
                    accumulate_grad_batches=accumulate,
                    use_distributed_sampler=False,
                )
                dataset = data()
                local = BATCH // world // accumulate
                loader = DataLoader(dataset, local, sampler=RankSlices(len(dataset), rank, world))
                run.fit(model, loader)
                results[key] = {
                    "params": [p.detach().clone() for p in model.parameters()],
                    "state": strategy_state(model),
                    "steps": torch.tensor(run.global_step),
                }
            except Exception:  # recorded: one failing strategy fails its own test
                results[key] = {"error": traceback.format_exc()}
    finally:
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.destroy_process_group()


def run_ddp(cases: list[tuple[str, str, int]]) -> list[dict[str, Any]]:
    world = 2
    with tempfile.TemporaryDirectory() as out_dir:
        # Forked: the workers inherit the imported torch and Lightning (a spawned worker spends
        # seconds importing them); each builds its process group after the fork.
        mp.start_processes(
            _ddp_worker,
            args=(world, _free_port(), out_dir, cases),
            nprocs=world,
            join=True,
            start_method="fork",
        )
        return [torch.load(Path(out_dir) / f"rank{r}.pt", weights_only=True) for r in range(world)]


def check_ddp(ranks: list[dict[str, Any]], name: str, path: str, accumulate: int) -> None:
    key = f"{name}/{path}/{accumulate}"
    reference, reports = plain(name, path)
    expected_params = list(reference.parameters())
    expected_state = strategy_state(reference)
    for rank, results in enumerate(ranks):
        result = results[key]
        assert "error" not in result, f"rank {rank}: {result.get('error')}"
        assert int(result["steps"]) == len(reports)
        for a, b in zip(result["params"], expected_params):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
        assert result["state"].keys() == expected_state.keys()
        for k, value in expected_state.items():
            torch.testing.assert_close(result["state"][k], value, rtol=1e-4, atol=1e-6)


DEFAULT_DDP_CASES = [
    ("uncertainty", "override", 1),
    ("mgda", "features", 1),
    ("graddrop", "shared_params", 1),
    ("mgda", "shared_params", 2),
]


@pytest.fixture(scope="module")
def ddp_default() -> list[dict[str, Any]]:
    return run_ddp(DEFAULT_DDP_CASES)


@pytest.mark.parametrize(("name", "path", "accumulate"), DEFAULT_DDP_CASES)
def test_ddp_two_ranks_equal_one_process_with_the_whole_batch(
    ddp_default: list[dict[str, Any]], name: str, path: str, accumulate: int
) -> None:
    check_ddp(ddp_default, name, path, accumulate)


ALL_DDP_CASES = [(name, path, 1) for name, path in CASES]


@pytest.fixture(scope="module")
def ddp_all() -> list[dict[str, Any]]:
    return run_ddp(ALL_DDP_CASES)


@pytest.mark.slow
@pytest.mark.parametrize(("name", "path", "accumulate"), ALL_DDP_CASES)
def test_ddp_every_strategy(
    ddp_all: list[dict[str, Any]], name: str, path: str, accumulate: int
) -> None:
    check_ddp(ddp_all, name, path, accumulate)


# ----------------------------------------------------------------- the guide
def test_the_guide_examples_run_in_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert len(python_blocks(GUIDE.read_text())) >= 4
    monkeypatch.chdir(tmp_path)
    run_python_blocks(GUIDE.read_text(), "lightning.md")
