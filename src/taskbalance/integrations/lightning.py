"""PyTorch Lightning: every strategy under automatic optimization, ``TaskOptimizers`` under manual.

:class:`MultiTaskModule` is a ``LightningModule`` whose ``training_step`` returns
``self.balance(losses, shared_params=...)`` (or ``features=``). Lightning then runs its usual
automatic optimization (zero_grad, backward, optimizer step, precision plugin, DDP, gradient
accumulation, clipping, checkpoints, loggers) and the module's ``backward`` hands the step to the
strategy: ``strategy.backward(losses, ..., scaler=<the precision plugin's GradScaler>)``, so
loss-level and gradient-level strategies alike fill ``.grad`` exactly as in the plain loop::

    optimizer.zero_grad()
    strategy.backward(losses, shared_params=trunk.parameters())
    optimizer.step()

What the module takes care of:

* **The strategy stays out of the module tree**: its learned parameters (uncertainty's
  log-variances, ...) train with the strategy's own optimizer, so they are not in
  ``self.parameters()`` (nor in the optimizer that ``configure_optimizers`` builds from it) and DDP
  does not wrap them. It follows the module's device (``.to()``, ``.cuda()``), not its dtype.
* **Checkpoints**: ``on_save_checkpoint`` stores ``strategy.state_dict()`` under
  :data:`CHECKPOINT_KEY`; ``on_load_checkpoint`` restores it (``trainer.fit(ckpt_path=...)``
  resumes exactly), with a :class:`~taskbalance.StrategyError` if it is missing or does not fit.
* **Epochs**: ``on_train_epoch_end`` calls ``strategy.end_epoch()`` (DWA, STCH).
* **Logging**: every optimizer step logs the step report with ``self.log_dict`` under
  ``log_prefix`` (default ``"train/"``): ``train/loss/<task>``, ``train/weight/<task>`` and the
  strategy's extras, the same keys as ``report.to_dict(prefix="train/")``. Every rank logs the
  same (global) values; Lightning's loggers write on rank 0. How often the logger writes is
  ``Trainer(log_every_n_steps=...)``.
* **Mixed precision**: Lightning's ``MixedPrecision`` plugin scales the closure loss before it
  calls ``backward``; that scaled tensor is not backpropagated here: the strategy takes the
  plugin's ``GradScaler`` and scales its own backward once, leaving scaled gradients that the
  plugin's ``optimizer_step`` unscales (``scaler.unscale_``), steps or skips
  (``scaler.step``) and updates. An overflow step leaves the strategy untouched. bf16 needs no
  scaler.
* **DDP** (``strategy="ddp"``, ``"ddp_spawn"``, ...): nothing to do; every rank computes the
  same weights from the global losses and gradients (see :mod:`taskbalance.distributed`).
* **Gradient accumulation** (``Trainer(accumulate_grad_batches=N)``): summing strategy steps per
  micro-batch is not the full-batch step, so the micro-batches go to a
  :class:`~taskbalance.accumulation.GradientAccumulator` and the strategy steps once, on the
  mean losses and mean per-task gradients, in the backward of the micro-batch on which Lightning
  steps the optimizer (the last of each window, or the last of the epoch). It costs one
  backward per task per micro-batch and ``T × P`` numbers of memory (``P``: every trainable
  parameter of the module).

:class:`TaskOptimizersAdapter` and :class:`TaskSchedulers` are for manual optimization with
:class:`~taskbalance.TaskOptimizers` (per-task optimizers): Lightning sees one optimizer, counts
one ``global_step`` per ``step()`` (so ``max_steps`` means training steps), saves and restores
every inner optimizer, the strategy and the schedulers in its checkpoints.

Lightning is optional: ``import taskbalance`` never imports it, and importing this module without
it raises an ``ImportError`` that says how to install it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

try:
    import lightning.pytorch as pl
    from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy
except ImportError as error:  # pragma: no cover - run in a subprocess by the tests
    raise ImportError(
        "taskbalance.integrations.lightning needs PyTorch Lightning (lightning>=2.2): "
        'pip install "taskbalance[lightning]"'
    ) from error

from taskbalance.accumulation import GradientAccumulator
from taskbalance.errors import StrategyError
from taskbalance.optim import TaskOptimizers
from taskbalance.registry import create_strategy
from taskbalance.report import StepReport
from taskbalance.strategy import Strategy
from taskbalance.validation import nonempty_list, validate_losses

__all__ = [
    "CHECKPOINT_KEY",
    "MultiTaskModule",
    "TaskOptimizersAdapter",
    "TaskSchedulers",
    "grad_scaler",
]

CHECKPOINT_KEY = "taskbalance_strategy"
"""The key of the strategy's ``state_dict()`` in a Lightning checkpoint."""


def grad_scaler(trainer: pl.Trainer) -> torch.amp.GradScaler | None:
    """The enabled ``GradScaler`` of the trainer's precision plugin (``"16-mixed"``), else
    ``None`` (32-bit, ``"bf16-mixed"``)."""
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    if isinstance(scaler, torch.amp.GradScaler) and scaler.is_enabled():
        return scaler
    return None


@dataclass
class _Pending:
    """What ``balance`` handed over for the coming ``backward``."""

    losses: dict[str, Tensor]
    shared: list[Tensor] | None
    features: Tensor | Sequence[Tensor] | None
    batch: int | None  # Lightning's batch counter when balance was called


class MultiTaskModule(pl.LightningModule):
    """A ``LightningModule`` that trains with any strategy under automatic optimization.

    ``strategy`` is a :class:`~taskbalance.Strategy` or a registry name (then ``tasks`` and the
    strategy's keyword ``options`` build it, as :func:`~taskbalance.create_strategy` does).
    Subclass it as any ``LightningModule`` and end ``training_step`` with
    ``return self.balance(losses, shared_params=self.trunk.parameters())`` (or ``features=z``);
    ``configure_optimizers`` builds the model's optimizer from ``self.parameters()`` as usual.

    ``log_prefix`` (``None``: no logging) names the logged step report. If you override
    ``on_train_epoch_end``, ``on_save_checkpoint`` or ``on_load_checkpoint``, call ``super()``:
    they close the strategy's epoch and carry its state. ``backward`` is the strategy's; do not
    override it.
    """

    def __init__(
        self,
        strategy: Strategy | str,
        tasks: Sequence[str] | None = None,
        *,
        log_prefix: str | None = "train/",
        **options: Any,
    ) -> None:
        super().__init__()
        if isinstance(strategy, str):
            if tasks is None:
                raise StrategyError(f"strategy {strategy!r} is a name: give tasks=[...] as well")
            built = create_strategy(strategy, tasks, **options)
        elif isinstance(strategy, Strategy):
            if options:
                raise StrategyError(
                    f"options {sorted(options)} build a strategy from its name; this strategy "
                    "is already built"
                )
            if tasks is not None and tuple(tasks) != strategy.tasks:
                raise StrategyError(
                    f"tasks {list(tasks)} differ from the strategy's tasks {list(strategy.tasks)}"
                )
            built = strategy
        else:
            raise StrategyError(f"strategy must be a Strategy or a registry name, got {strategy!r}")
        # Not a submodule: out of parameters(), state_dict() and DDP (see the module docstring).
        object.__setattr__(self, "_tb_strategy", built)
        self.log_prefix = log_prefix
        self.last_report: StepReport | None = None
        self._pending: _Pending | None = None
        self._accumulator: tuple[tuple[int, int], GradientAccumulator] | None = None
        self._stepped_epoch: int | None = None  # the epoch of the last training step
        self._closed_epoch: int | None = None  # the epoch last closed by end_epoch()

    @property
    def strategy(self) -> Strategy:
        """The strategy (not a submodule: it keeps its own parameters and optimizer)."""
        strategy: Strategy = self.__dict__["_tb_strategy"]
        return strategy

    def shared_parameters(self) -> Iterable[Tensor] | None:
        """The shared parameters, used when ``balance`` gets neither ``shared_params`` nor
        ``features`` and by gradient accumulation. Default ``None``: override it (e.g.
        ``return self.trunk.parameters()``) or pass them to ``balance``."""
        return None

    # ----------------------------------------------------------------- the training step
    def balance(
        self,
        losses: Mapping[str, Tensor],
        *,
        shared_params: Iterable[Tensor] | None = None,
        features: Tensor | Sequence[Tensor] | None = None,
    ) -> Tensor:
        """Hand this step's task losses to the strategy; return what ``training_step`` returns.

        ``losses`` maps tasks to scalar losses (a subset of the tasks for partial labels).
        Gradient-level strategies (and GradNorm) need ``shared_params=`` (the shared trunk's
        parameters) or ``features=`` (its output, MGDA-UB style) unless
        :meth:`shared_parameters` is overridden. The step itself runs in :meth:`backward`; the
        returned value is the plain sum of the losses (Lightning divides it by
        ``accumulate_grad_batches`` and shows it in the progress bar; it is not backpropagated).
        """
        if not self.automatic_optimization:
            raise StrategyError(
                "balance() hands the step to Lightning's automatic optimization; with "
                "automatic_optimization = False call self.strategy.backward(losses, ...) and step "
                "the optimizers yourself"
            )
        if self._trainer is not None and not self.trainer.training:
            raise StrategyError(
                "balance() is for training_step; to evaluate, combine the losses with "
                "self.strategy(losses) (no training step, no state update)"
            )
        _, parts = validate_losses(losses, self.strategy.tasks)
        if shared_params is not None and features is not None:
            raise StrategyError("balance() takes shared_params= or features=, not both")
        batch = self._batch_counter()
        if self._pending is not None and batch is not None and self._pending.batch == batch:
            raise StrategyError(
                "balance() was called twice in one training_step; call it once, with the "
                "losses of every task"
            )
        given = self.shared_parameters() if shared_params is None else shared_params
        shared = None if given is None else nonempty_list(given, "shared_params")
        if self.strategy.needs_grads and shared is None and features is None:
            raise StrategyError(
                f"{type(self.strategy).__name__} needs per-task gradients: pass "
                "shared_params= (the shared trunk's parameters) or features= (its output) to "
                "balance(), or override shared_parameters()"
            )
        self._pending = _Pending(dict(losses), shared, features, batch)
        return torch.stack([p.float() for p in parts]).sum()

    def backward(self, loss: Tensor, *args: Any, **kwargs: Any) -> None:
        """Run the strategy's step on the losses of ``balance`` (``loss`` itself, the sum that
        ``training_step`` returned, scaled by the precision plugin, is not backpropagated)."""
        if not self.automatic_optimization:  # manual_backward of the user's own losses
            super().backward(loss, *args, **kwargs)
            return
        pending, self._pending = self._pending, None
        if pending is None:
            raise StrategyError(
                "training_step must return self.balance(losses, ...): Lightning asked "
                f"{type(self).__name__} for a backward, but balance() was not called in this "
                "training_step"
            )
        trainer = self.trainer
        _check_lightning_strategy(trainer)
        self._check_epoch_closed(trainer.current_epoch)
        scaler = grad_scaler(trainer)
        if trainer.accumulate_grad_batches > 1:
            report = self._accumulate(pending, scaler, trainer)
        elif pending.features is not None:
            report = self.strategy.backward(
                pending.losses, features=pending.features, scaler=scaler
            )
        else:
            report = self.strategy.backward(
                pending.losses, shared_params=pending.shared, scaler=scaler
            )
        self._stepped_epoch = trainer.current_epoch
        if report is not None:
            self.last_report = report
            if self.log_prefix is not None:
                self.log_dict(report.to_tensors(self.log_prefix), on_step=True, on_epoch=False)

    def _accumulate(
        self, pending: _Pending, scaler: torch.amp.GradScaler | None, trainer: pl.Trainer
    ) -> StepReport | None:
        """Add one micro-batch; on the micro-batch where Lightning steps, the strategy step."""
        window = (id(trainer), trainer.global_step)  # constant over one accumulation window
        if self._accumulator is None or self._accumulator[0] != window:
            params: list[Tensor] = [p for p in self.parameters() if p.requires_grad]
            shared = pending.shared
            if shared is None:
                if self.strategy.needs_grads:
                    raise StrategyError(
                        f"accumulate_grad_batches > 1: {type(self.strategy).__name__} takes the "
                        "accumulated per-task gradients of the shared parameters; pass "
                        "shared_params= to balance() or override shared_parameters() (features= "
                        "alone is not enough)"
                    )
                shared = params  # a loss weighting never reads them
            self._accumulator = (
                window,
                GradientAccumulator(self.strategy, params, shared_params=shared),
            )
        accumulator = self._accumulator[1]
        accumulator.backward(pending.losses, scaler=scaler)
        if not _lightning_steps_now(trainer):
            if accumulator.micro_batches >= trainer.accumulate_grad_batches:
                raise StrategyError(
                    f"{accumulator.micro_batches} micro-batches accumulated and Lightning did not "
                    "step: this Lightning version's accumulation boundary is not recognised"
                )
            return None
        self._accumulator = None
        return accumulator.step(scaler=scaler)

    def _batch_counter(self) -> int | None:
        trainer = self._trainer
        return None if trainer is None else int(trainer.fit_loop.total_batch_idx)

    def _check_epoch_closed(self, epoch: int) -> None:
        stepped = self._stepped_epoch
        if (
            stepped is not None
            and epoch > stepped
            and self._closed_epoch != stepped
            and type(self.strategy).end_epoch is not Strategy.end_epoch
        ):
            raise StrategyError(
                f"training epoch {stepped} ended without strategy.end_epoch(): an override of "
                "on_train_epoch_end must call super().on_train_epoch_end()"
            )

    # ----------------------------------------------------------------- hooks
    def on_train_epoch_end(self) -> None:
        """Close the strategy's epoch (DWA and STCH average their losses per epoch)."""
        self.strategy.end_epoch()
        self._closed_epoch = self.trainer.current_epoch

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Store the strategy's state under :data:`CHECKPOINT_KEY`."""
        checkpoint[CHECKPOINT_KEY] = self.strategy.state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Restore the strategy's state saved by :meth:`on_save_checkpoint`."""
        state = checkpoint.get(CHECKPOINT_KEY)
        if state is None:
            raise StrategyError(
                f"the checkpoint holds no strategy state (no {CHECKPOINT_KEY!r} entry): it was "
                "not saved by a MultiTaskModule, or on_save_checkpoint was overridden without "
                "calling super().on_save_checkpoint(checkpoint)"
            )
        try:
            self.strategy.load_state_dict(state)
        except StrategyError as error:
            raise StrategyError(f"the checkpoint's {CHECKPOINT_KEY!r}: {error}") from error
        self._pending = None
        self._accumulator = None

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> Any:
        # .to(), .cuda(), .cpu() and the trainer's device placement all end here: the strategy
        # follows the module's device (set by Lightning's device mixin before this runs), not
        # its dtype (its learned weights and moments stay in their precision).
        result = super()._apply(fn, recurse)
        self.strategy.to(self.device)
        return result


def _lightning_steps_now(trainer: pl.Trainer) -> bool:
    """Whether this backward runs inside Lightning's optimizer step (the accumulation boundary).

    Lightning's automatic loop counts an optimizer step as ready right before it calls
    ``LightningModule.optimizer_step`` (whose closure runs ``training_step`` and ``backward``)
    and as completed after it; between micro-batches the two counts are equal. Unlike a flag set
    in ``optimizer_step``, this holds when a user overrides that hook.
    """
    loop = trainer.fit_loop.epoch_loop.automatic_optimization
    step = loop.optim_progress.optimizer.step.total
    return bool(step.ready > step.completed)


def _check_lightning_strategy(trainer: pl.Trainer) -> None:
    strategy = trainer.strategy
    if not isinstance(strategy, (SingleDeviceStrategy, DDPStrategy)) or (
        strategy.handles_gradient_accumulation
    ):
        raise StrategyError(
            f"MultiTaskModule trains with Lightning's single-device and DDP strategies; "
            f"{type(strategy).__name__} shards or wraps the parameters and is not supported"
        )


# --------------------------------------------------------------------- manual optimization
class TaskOptimizersAdapter(Optimizer):
    """A :class:`~taskbalance.TaskOptimizers` as the one ``torch.optim.Optimizer`` that
    Lightning steps (manual optimization).

    ``param_groups`` is the list of the inner optimizers' groups (the same dicts: the tasks' in
    task order, then the shared one's), so an ``LRScheduler`` built on the adapter changes the
    inner learning rates; :meth:`step` is ``TaskOptimizers.step``; ``state_dict`` and
    ``load_state_dict`` are the ``TaskOptimizers``' (every optimizer and the strategy). Lightning
    counts one ``global_step`` per :meth:`step`.

    Under ``"16-mixed"`` pass ``scaler=grad_scaler(self.trainer)`` to :meth:`backward`:
    ``TaskOptimizers.step`` then unscales and skips on overflow itself (the adapter declares
    ``_step_supports_amp_scaling``, so Lightning's plugin hands the step to it and only checks
    and updates the scale). ``mode="sequential"`` takes ``step(closure)``, with 32-bit or bf16
    precision. DDP is not supported: ``TaskOptimizers`` keeps local per-task gradients.
    """

    # GradScaler.step and Lightning's MixedPrecision plugin leave unscaling and skipping to
    # step() (TaskOptimizers.step does both, with the scaler given to backward).
    _step_supports_amp_scaling = True

    def __init__(self, task_optimizers: TaskOptimizers) -> None:
        if not isinstance(task_optimizers, TaskOptimizers):
            raise StrategyError(
                f"TaskOptimizersAdapter wraps a tb.TaskOptimizers, got {type(task_optimizers)}"
            )
        super().__init__([{"params": []}], {})  # groups are the inner ones (below)
        self.task_optimizers = task_optimizers
        self.param_groups = [group for inner in self.inner() for group in inner.param_groups]
        # Mutable: Lightning calls these methods on its wrapper, which forwards attribute reads.
        self._last_scaler: list[torch.amp.GradScaler | None] = [None]

    def inner(self) -> list[Optimizer]:
        """The inner optimizers: the tasks' in task order, then the shared one (if any)."""
        tasks = self.task_optimizers
        shared = [] if tasks.shared is None else [tasks.shared]
        return [*(tasks[t] for t in tasks.tasks), *shared]

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if "task_optimizers" in self.__dict__:
            raise StrategyError("add the parameter group to one of the inner optimizers")
        super().add_param_group(param_group)

    def backward(
        self,
        losses: Mapping[str, Tensor],
        *,
        scaler: torch.amp.GradScaler | None = None,
        features: Tensor | Sequence[Tensor] | None = None,
        retain_graph: bool = False,
    ) -> StepReport:
        """``TaskOptimizers.backward``: every task's gradient, kept for :meth:`step`.

        It runs outside autocast (a ``training_step`` under a mixed-precision plugin is inside
        it): the per-task gradients and the strategy's weights are computed as in automatic
        optimization, where Lightning calls ``backward`` after leaving autocast.
        """
        distributed = torch.distributed
        if distributed.is_available() and distributed.is_initialized():
            if distributed.get_world_size() > 1:
                raise StrategyError(
                    "TaskOptimizers keeps each rank's own per-task gradients (DDP does not "
                    "average them): under DDP train with MultiTaskModule"
                )
        self._last_scaler[0] = scaler
        device = next(iter(losses.values())).device.type if losses else "cpu"
        with torch.autocast(device, enabled=False):
            return self.task_optimizers.backward(
                losses, scaler=scaler, features=features, retain_graph=retain_graph
            )

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.task_optimizers.zero_grad(set_to_none=set_to_none)

    def step(self, closure: Callable[[], Any] | None = None) -> StepReport:  # type: ignore[override]
        """``TaskOptimizers.step``; a closure (Lightning's, which runs its
        ``on_before_optimizer_step`` hooks) is called first, or, in sequential mode, is the
        closure that returns the losses."""
        tasks = self.task_optimizers
        # GradScaler.step sets found_inf on an optimizer that handles scaling itself.
        scaled = getattr(self, "found_inf", None) is not None
        if tasks.mode == "sequential":
            if closure is None or scaled:
                raise StrategyError(
                    "TaskOptimizers in mode='sequential' need step(closure) with 32-bit or bf16 "
                    "precision (a GradScaler cannot run their closure between the updates)"
                )
            return tasks.step(closure)
        if scaled and self._last_scaler[0] is None:
            raise StrategyError(
                "16-mixed precision: pass scaler=grad_scaler(self.trainer) to backward() so that "
                "the losses are scaled and step() unscales them"
            )
        if closure is not None:
            closure()
        return tasks.step()

    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        return self.task_optimizers.state_dict()

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:  # type: ignore[override]
        self.task_optimizers.load_state_dict(state_dict)

    def __repr__(self) -> str:
        return f"TaskOptimizersAdapter({self.task_optimizers!r})"


class TaskSchedulers:
    """Schedulers of the inner optimizers of a :class:`TaskOptimizersAdapter`, as the one
    scheduler that ``configure_optimizers`` returns with it.

    Lightning accepts a scheduler only for an optimizer that ``configure_optimizers`` returned,
    and saves and restores its ``state_dict``; this holds ``schedulers`` (any names, e.g. the
    tasks and ``"shared"``), each built on one inner optimizer. In manual optimization call
    ``self.lr_schedulers().step()`` where the schedules should advance (once per training step,
    or per epoch).
    """

    def __init__(self, optimizer: TaskOptimizersAdapter, schedulers: Mapping[str, Any]) -> None:
        if not isinstance(optimizer, TaskOptimizersAdapter):
            raise StrategyError(f"optimizer must be a TaskOptimizersAdapter, got {type(optimizer)}")
        inner = {id(o) for o in optimizer.inner()}
        for name, scheduler in schedulers.items():
            if id(getattr(scheduler, "optimizer", None)) not in inner:
                raise StrategyError(
                    f"scheduler {name!r} is not built on one of the TaskOptimizers' optimizers"
                )
        self.optimizer = optimizer  # what Lightning checks against configure_optimizers
        self.schedulers = dict(schedulers)

    def step(self) -> None:
        """Step every scheduler once."""
        for scheduler in self.schedulers.values():
            scheduler.step()

    def get_last_lr(self) -> list[float]:
        """The last learning rates of every scheduler, in their order."""
        return [lr for s in self.schedulers.values() for lr in s.get_last_lr()]

    def state_dict(self) -> dict[str, Any]:
        return {name: s.state_dict() for name, s in self.schedulers.items()}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        if set(state_dict) != set(self.schedulers):
            raise StrategyError(
                f"scheduler state for {sorted(state_dict)}, these schedulers are "
                f"{sorted(self.schedulers)}"
            )
        for name, scheduler in self.schedulers.items():
            scheduler.load_state_dict(state_dict[name])

    def __repr__(self) -> str:
        inner = ", ".join(f"{n!r}: {type(s).__name__}" for n, s in self.schedulers.items())
        return f"TaskSchedulers({{{inner}}})"
