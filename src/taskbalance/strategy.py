"""The base class of every strategy: declared state, the transaction, the hooks.

A strategy answers one question: given the losses of several tasks, what single update should the
model take? Two families answer it (:mod:`taskbalance.loss_weighting`,
:mod:`taskbalance.gradient_aggregation`); both rest on :class:`Strategy`, which holds what every
method shares:

* **Declared state** (:meth:`Strategy.add_state`): the base class knows which tensors are state
  and which of them have one row per task, so partial labels, the transaction, ``.to()`` and
  ``state_dict()`` are handled once.
* **The transaction** (:meth:`Strategy.transaction`): a step that raises, or that met a
  mixed-precision overflow, leaves every parameter and buffer as it was.
* **The hooks** a method fills in (:meth:`Strategy.check_losses`,
  :meth:`Strategy.before_train_step`, :meth:`Strategy.on_train_step`, :meth:`Strategy.extras`,
  :meth:`Strategy.end_epoch`) and the one engine that calls them. No strategy overrides
  ``backward``, ``forward`` or an underscore method of the base classes.
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import functools
import inspect
import math
import warnings
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn

from taskbalance import distributed
from taskbalance.errors import NonFiniteLossError, StrategyError, TaskSpecificInputWarning
from taskbalance.jacobian import graph_leaves, inputs_reached
from taskbalance.report import StepReport
from taskbalance.validation import (
    TaskLosses,
    check_finite,
    check_graphs,
    check_tasks,
    nonempty_list,
    validate_losses,
)

__all__ = [
    "HALF",
    "Strategy",
    "TaskParameterOptimizer",
    "loss_scale",
    "mark_overflow",
    "overflowed",
    "scaled_backward",
    "watch",
]

# An old state_dict key and the name the state has now (resuming a 0.1 checkpoint).
_RENAMED_STATE = {"rng_state": "generator_state"}


class TaskParameterOptimizer(nn.Module):
    """Adam or SGD for a strategy's own per-task tensor, with its state in buffers.

    The tensor it updates has one entry per task along dimension 0. A step updates only the
    entries of the tasks marked in ``mask`` and each entry keeps its own step count, so a task
    missing from a batch (partial labels) keeps its value and its moments exactly. With every task
    present it computes what ``torch.optim.Adam`` (L2 ``weight_decay``) or ``torch.optim.SGD``
    computes. Because the state is in buffers, ``state_dict()`` and ``.to(device)`` cover it.
    """

    step_count: Tensor
    exp_avg: Tensor
    exp_avg_sq: Tensor

    def __init__(
        self,
        shape: Sequence[int],
        *,
        kind: Literal["adam", "sgd"] = "adam",
        lr: float,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__()
        if kind not in ("adam", "sgd"):
            raise StrategyError(f"optimizer must be 'adam' or 'sgd', got {kind!r}")
        if not (math.isfinite(lr) and lr > 0):
            raise StrategyError(f"lr must be a positive finite number, got {lr!r}")
        if weight_decay < 0:
            raise StrategyError(f"weight_decay must be >= 0, got {weight_decay!r}")
        self.kind = kind
        self.lr = lr
        self.betas = betas
        self.eps = eps
        self.weight_decay = weight_decay
        if kind == "adam":
            self.register_buffer("step_count", torch.zeros(shape[0]))
            self.register_buffer("exp_avg", torch.zeros(*shape))
            self.register_buffer("exp_avg_sq", torch.zeros(*shape))

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, lr={self.lr}, weight_decay={self.weight_decay}"

    @torch.no_grad()
    def step(self, target: Tensor, grad: Tensor, mask: Tensor) -> None:
        """Update ``target`` in place from ``grad`` at the entries where ``mask`` is true."""
        mask = mask.reshape(-1, *([1] * (target.dim() - 1)))
        grad = grad.to(target.dtype)
        if self.weight_decay:
            grad = grad + self.weight_decay * target
        if self.kind == "sgd":
            target.copy_(torch.where(mask, target - self.lr * grad, target))
            return
        beta1, beta2 = self.betas
        self.exp_avg.copy_(torch.where(mask, self.exp_avg.lerp(grad, 1 - beta1), self.exp_avg))
        self.exp_avg_sq.copy_(
            torch.where(mask, self.exp_avg_sq * beta2 + (1 - beta2) * grad * grad, self.exp_avg_sq)
        )
        self.step_count.add_(mask.reshape(-1).to(self.step_count.dtype))
        steps = self.step_count.clamp(min=1).reshape(mask.shape)
        bias1 = 1 - beta1**steps
        bias2 = 1 - beta2**steps
        update = self.lr / bias1 * self.exp_avg / (self.exp_avg_sq.sqrt() / bias2.sqrt() + self.eps)
        target.copy_(torch.where(mask, target - update, target))


class Strategy(nn.Module):
    """A way of combining several task losses into one update.

    Subclasses are small modules with one job. They declare their state with :meth:`add_state`
    and fill in hooks; the engine (``backward``, ``forward``, ``combine``, the transaction,
    validation, DDP and mixed precision) is written once in the base classes.

    Class attributes describe capabilities (the registry records them):

    * ``needs_grads``: the strategy needs per-task gradients, so only ``backward`` (or
      ``combine`` with ``shared_params=``/``features=``) trains with it.
    * ``deterministic``: the result is a function of the input and the state (no random draws).

    ``process_group`` (an instance attribute; ``None`` by default) picks the ranks a training step
    is reduced over when torch.distributed is initialised: ``None`` the default group, a process
    group that group, :data:`taskbalance.distributed.LOCAL` none (see
    :mod:`taskbalance.distributed`).

    **One step, once.** A training step is a call in training mode, with grad mode on and losses
    that carry a graph. Calling the strategy again on the very same computed loss tensors
    (``s(losses)`` then ``s.backward(losses)``, or ``combine`` twice) is the same step: the state
    is not updated a second time and the same weights are used. (Leaf tensors passed as losses,
    as toy problems do, start a new step at every call.)
    """

    needs_grads: ClassVar[bool] = False
    deterministic: ClassVar[bool] = True
    process_group: Any = None
    check_finite: bool = True  # False: no host sync in a step; failures go in the report

    _init_args: dict[str, Any]
    generator_state: Tensor

    def __init_subclass__(cls, **kwargs: Any) -> None:
        # Record every constructor argument (the outermost __init__ call wins) so that repr
        # shows them all without each strategy writing its own extra_repr.
        super().__init_subclass__(**kwargs)
        if "__init__" not in cls.__dict__:
            return
        init = cls.__dict__["__init__"]
        signature = inspect.signature(init)

        @functools.wraps(init)
        def recording_init(self: Strategy, *args: Any, **kwargs: Any) -> None:
            if "_init_args" not in self.__dict__:
                try:
                    bound = signature.bind(self, *args, **kwargs)
                except TypeError as error:
                    raise StrategyError(f"{cls.__name__}: {error}") from None
                bound.apply_defaults()
                arguments = dict(bound.arguments)
                arguments.pop(next(iter(signature.parameters)))
                object.__setattr__(self, "_init_args", arguments)
            init(self, *args, **kwargs)

        cls.__init__ = recording_init  # type: ignore[method-assign]

    def __init__(self, tasks: Sequence[str]) -> None:
        super().__init__()
        self.tasks: tuple[str, ...] = check_tasks(tasks)
        self._positions = {name: i for i, name in enumerate(self.tasks)}
        self._index_cache: dict[tuple[tuple[str, ...], torch.device], tuple[Tensor, Tensor]] = {}
        self._states: dict[str, bool] = {}  # declared state: name -> one row per task
        self._last_step: tuple[tuple[tuple[str, Any], ...], Any] | None = None
        # Sets of parameters already checked for task-specific tensors (host-side ids).
        self._checked_inputs: set[tuple[Any, ...]] = set()

    # ----------------------------------------------------------------- declared state
    def add_state(
        self, name: str, default: Tensor, *, per_task: bool = True, persistent: bool = True
    ) -> Tensor:
        """Register ``default`` as state of this strategy under ``name``; return it.

        ``per_task=True``: dimension 0 indexes ``self.tasks`` (an empty ``default`` is a state
        sized at its first use, which ``load_state_dict`` resizes to the saved shape). Then a
        step with partial labels changes only the present tasks' rows: the engine restores the
        others, whatever the hooks wrote. Every declared tensor is restored when a step fails,
        moves with ``.to()``, and is in ``state_dict()`` unless ``persistent=False``. An
        ``nn.Parameter`` is registered as a parameter, anything else as a buffer. Constants
        derived from constructor arguments are not state: register them with
        ``register_buffer``. The registry calls a strategy ``stateful`` when it declares state.
        """
        if not isinstance(default, Tensor):
            raise StrategyError(f"state {name!r} must be a tensor, got {type(default).__name__}")
        if (
            per_task
            and default.numel() > 0
            and (default.dim() == 0 or default.shape[0] != len(self.tasks))
        ):
            raise StrategyError(
                f"per-task state {name!r} needs {len(self.tasks)} rows (one per task) along "
                f"dimension 0, got shape {tuple(default.shape)}; pass per_task=False otherwise"
            )
        if isinstance(default, nn.Parameter):
            self.register_parameter(name, default)
        else:
            self.register_buffer(name, default, persistent=persistent)
        self._states[name] = per_task
        return default

    def add_random_state(self, seed: int) -> None:
        """Declare the state of this strategy's random draws: a CPU generator seeded with ``seed``.

        The one convention for random strategies: a ``seed: int = 0`` argument, drawn from with
        :meth:`draw`. The generator's state is the buffer ``generator_state``, so a resumed run
        draws what an uninterrupted one would, and the same ``seed`` on every rank draws the
        same numbers (what DDP needs). Vary ``seed`` to vary the draws across runs.
        """
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise StrategyError(f"seed must be an integer, got {seed!r}")
        state = torch.Generator().manual_seed(seed).get_state()
        self.add_state("generator_state", state, per_task=False)

    def draw(self, sample: Callable[[torch.Generator], Tensor], *, advance: bool = True) -> Tensor:
        """``sample(generator)`` on the generator of :meth:`add_random_state`; the state moves on
        unless ``advance=False`` (a look at the next draw)."""
        generator = torch.Generator()
        generator.set_state(self.generator_state.detach().cpu())  # a sync if on a GPU
        result = sample(generator)
        if advance:
            self.generator_state.copy_(generator.get_state())
        return result

    def _per_task_tensors(self) -> Iterator[tuple[dict[str, Any], str, Tensor]]:
        """(slots, name, tensor) of every tensor with one row per task: declared per-task state
        and the moments of the strategy's own optimizers."""
        for module in self.modules():
            if isinstance(module, Strategy):
                declared = [name for name, per_task in module._states.items() if per_task]
            elif isinstance(module, TaskParameterOptimizer):
                declared = list(module._buffers)
            else:
                continue
            for name in declared:
                for slots in (module._parameters, module._buffers):
                    tensor = slots.get(name)
                    if tensor is not None:
                        yield slots, name, tensor

    # ----------------------------------------------------------------- hooks
    def check_losses(self, losses: Tensor, index: Tensor) -> None:
        """Raise :class:`StrategyError` if the method cannot use these (detached) losses of the
        present tasks, before anything is computed (a log of a negative loss, say)."""

    def before_train_step(self, losses: Tensor, index: Tensor) -> None:
        """Called at the start of every training step, before the weights, inside the
        transaction (FAMO takes its delayed logit step here)."""

    def on_train_step(self, losses: Tensor, index: Tensor) -> None:
        """Called once after each successful training step with the (detached) losses of the
        present tasks and their positions ``index``; inside the transaction, so a failure or a
        mixed-precision overflow undoes it with everything else. Never called in evaluation."""

    def end_epoch(self) -> None:
        """Close a training epoch (DWA and STCH use epochs); a no-op for most methods."""

    def extras(self, index: Tensor) -> dict[str, Tensor]:
        """Per-task values to report besides losses and weights (present tasks only)."""
        return {}

    def task_mask(self, index: Tensor) -> Tensor:
        """``[T]`` bool, true at the positions ``index`` (the present tasks)."""
        mask = torch.zeros(len(self.tasks), dtype=torch.bool, device=index.device)
        mask[index] = True
        return mask

    def defer_check(self, ok: Tensor, error: Callable[[], Exception]) -> None:
        """Require ``ok`` (a bool tensor, all true) in this step; ``error()`` builds the exception
        to raise otherwise. (Skeleton: checked at once; the engine will defer it to the step's
        one verdict.)"""
        if not bool(ok.all()):
            raise error()

    def first_failing(self, ok: Tensor, index: Tensor) -> tuple[str, int] | None:
        """``(task, position)`` of the first ``False`` in ``ok`` (one entry per present task),
        ``None`` if all are true: for :meth:`check_losses` messages. One host sync."""
        if bool(ok.all()):
            return None
        position = ok.tolist().index(False)
        return self.tasks[int(index[position])], position

    # ----------------------------------------------------------------- public protocol
    def backward(
        self,
        losses: Mapping[str, Tensor],
        *,
        shared_params: Iterable[Tensor] | None = None,
        features: Tensor | Sequence[Tensor] | None = None,
        scaler: torch.amp.GradScaler | None = None,
    ) -> StepReport:
        """Fill ``.grad`` of the model's parameters with this strategy's update; return a report."""
        raise NotImplementedError

    def combine(
        self,
        losses: Mapping[str, Tensor],
        *,
        shared_params: Iterable[Tensor] | None = None,
        features: Tensor | Sequence[Tensor] | None = None,
    ) -> tuple[Tensor, StepReport]:
        """The differentiable total and the step's report, for frameworks that call
        ``total.backward()`` themselves (automatic optimization). ``total.backward()`` then
        fills the gradients ``backward`` would (up to rounding)."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        arguments = dict(getattr(self, "_init_args", {}))
        arguments["tasks"] = list(self.tasks)
        return ", ".join(f"{key}={value!r}" for key, value in arguments.items())

    def __getstate__(self) -> dict[str, Any]:
        # The last step's weak references and closures are no state: copies and pickles of a
        # strategy start without them.
        return {**super().__getstate__(), "_last_step": None}

    def get_extra_state(self) -> dict[str, Any]:
        return {"tasks": list(self.tasks), "strategy": type(self).__qualname__}

    def set_extra_state(self, state: Any) -> None:
        saved = list(state["tasks"]) if isinstance(state, Mapping) else None
        if saved != list(self.tasks):
            raise StrategyError(
                f"state_dict was saved for tasks {saved}, this strategy has {list(self.tasks)}"
            )
        kind = state.get("strategy", type(self).__qualname__)  # absent before version 0.2
        if kind != type(self).__qualname__:
            raise StrategyError(
                f"state_dict was saved by strategy class {kind}, this strategy is "
                f"{type(self).__qualname__}: build the strategy the checkpoint came from"
            )

    def load_state_dict(
        self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False
    ) -> Any:
        """``nn.Module.load_state_dict``, all or nothing, with a :class:`StrategyError`.

        The state is first loaded into a copy: a state_dict that does not fit (another strategy's,
        other options, missing keys) raises before this strategy changes at all.
        """
        try:
            nn.Module.load_state_dict(copy.deepcopy(self), state_dict, strict, assign)
        except RuntimeError as error:
            raise StrategyError(
                f"this state_dict does not fit {type(self).__qualname__}({list(self.tasks)}): "
                f"{error}"
            ) from error
        return super().load_state_dict(state_dict, strict, assign)

    def _load_from_state_dict(
        self,
        state_dict: Mapping[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        state = dict(state_dict)
        for old, new in _RENAMED_STATE.items():
            if prefix + old in state and new in self._states and prefix + new not in state:
                state[prefix + new] = state.pop(prefix + old)
                if isinstance(state_dict, dict):
                    state_dict[prefix + new] = state_dict.pop(prefix + old)
        for name in self._states:
            saved, current = state.get(prefix + name), getattr(self, name)
            if isinstance(saved, Tensor) and current.numel() == 0 and saved.shape != current.shape:
                # A state sized at its first use: take the saved size.
                setattr(self, name, current.new_zeros(saved.shape, dtype=saved.dtype))
        self._last_step = None
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    # ----------------------------------------------------------------- the engine
    def gather(self, losses: Mapping[str, Tensor]) -> TaskLosses:
        """Validate ``losses`` and stack the present ones in the strategy's task order."""
        names, parts = validate_losses(losses, self.tasks)
        check_graphs(names, parts)
        device = parts[0].device
        own = self._state_device()
        if own is not None and own != device:
            raise StrategyError(
                f"losses are on {device} but the strategy's state is on {own}; "
                f"call strategy.to({str(device)!r})"
            )
        values = torch.stack(parts)
        index, mask = self._index_and_mask(names, device)
        group = self._sync_group(values)
        training = self.training and values.requires_grad and torch.is_grad_enabled()
        if group is None:
            check_finite(names, values)
            return TaskLosses(names, values, index, mask, None, tuple(parts), training)
        # One collective: the global mean of every task's loss. The values become the global
        # ones, the gradient stays the local one (DDP averages it in the final backward).
        means, counts = distributed.reduce_losses(values, index, len(self.tasks), group)
        ranks = distributed.world_size(group)
        finite = torch.isfinite(means)
        agreed = (counts == 0) | (counts == ranks)
        if not bool(torch.cat([finite, agreed]).all()):  # every rank reaches the same verdict
            self._raise_distributed(names, values, finite, counts, ranks)
        # Stacked per task, so that each row of the Jacobian keeps its own backward root.
        shifts = (means - values.detach()).unbind()
        parts = [part + shift for part, shift in zip(parts, shifts)]
        return TaskLosses(names, torch.stack(parts), index, mask, group, tuple(parts), training)

    def _sync_group(self, values: Tensor) -> Any:
        """The group to reduce over: only in a training step, so evaluation never communicates."""
        training_step = self.training and values.requires_grad and torch.is_grad_enabled()
        if training_step and distributed.is_distributed(self.process_group):
            return distributed.resolve_group(self.process_group)
        return None

    def _raise_distributed(
        self,
        names: tuple[str, ...],
        values: Tensor,
        finite: Tensor,
        counts: Tensor,
        ranks: int,
    ) -> None:
        split = [t for t, c in zip(self.tasks, counts.tolist()) if 0 < c < ranks]
        if split:
            raise StrategyError(
                f"task {split[0]!r} is in the losses of {int(counts[self._positions[split[0]]])} "
                f"of {ranks} ranks; every rank must pass the same tasks in a step"
            )
        bad = names[finite.tolist().index(False)]
        where = "" if not bool(torch.isfinite(values).all()) else " on another rank"
        raise NonFiniteLossError(f"loss of task {bad!r} is not finite{where}", task=bad)

    def _index_and_mask(
        self, names: tuple[str, ...], device: torch.device
    ) -> tuple[Tensor, Tensor]:
        key = (names, device)
        if key not in self._index_cache:
            index = torch.tensor([self._positions[n] for n in names], device=device)
            mask = torch.zeros(len(self.tasks), dtype=torch.bool, device=device)
            mask[index] = True
            self._index_cache[key] = (index, mask)
        return self._index_cache[key]

    def _state_device(self) -> torch.device | None:
        for tensor in self._state_tensors():
            return tensor.device
        return None

    def _state_tensors(self) -> Iterator[Tensor]:
        yield from self.parameters()
        yield from self.buffers()

    def _refuse_training_combination(self, batch: TaskLosses) -> None:
        if batch.has_graph and self.training:
            raise StrategyError(
                f"{type(self).__name__} needs per-task gradients: train with "
                "strategy.backward(losses, shared_params=...) or features=... (or combine with "
                "them); calling the strategy on losses only evaluates (use torch.no_grad() or "
                ".eval())"
            )

    def _require_graph(self, batch: TaskLosses) -> None:
        if not batch.has_graph:
            raise StrategyError(
                f"backward needs losses that require grad; task {batch.names[0]!r} has no graph "
                "(computed under torch.no_grad() or detached?)"
            )

    def _grad_inputs(
        self,
        shared_params: Iterable[Tensor] | None,
        features: Tensor | Sequence[Tensor] | None,
        batch: TaskLosses,
    ) -> list[Tensor]:
        if (shared_params is None) == (features is None):
            raise StrategyError(
                f"{type(self).__name__} needs exactly one of shared_params= (the shared "
                "parameters) or features= (the output of the shared trunk)"
            )
        if features is not None:
            argument = "features"
            inputs = (
                [features] if isinstance(features, Tensor) else nonempty_list(features, argument)
            )
        else:
            assert shared_params is not None
            argument = "shared_params"
            inputs = nonempty_list(shared_params, argument)
        for tensor in inputs:
            if not isinstance(tensor, Tensor) or not tensor.requires_grad:
                raise StrategyError(f"every tensor in {argument} must require grad")
        if batch.training:
            self._warn_task_specific(batch, inputs, argument)
        return inputs

    def _warn_task_specific(
        self, batch: TaskLosses, inputs: Sequence[Tensor], argument: str
    ) -> None:
        """Warn about a tensor of ``inputs`` that some present tasks reach and others do not
        (:class:`TaskSpecificInputWarning`). Parameters are checked once per set of tensors and
        tasks (a walk of the graph on the host); several feature tensors at every step."""
        if len(batch.names) < 2 or len(inputs) < 2:
            return
        key = None
        if all(t.grad_fn is None for t in inputs):
            key = (batch.names, *map(id, inputs))
            if key in self._checked_inputs:
                return
        reached = inputs_reached(batch.values, inputs) or []
        for position, tensor in enumerate(inputs):
            tasks = [name for name, found in zip(batch.names, reached) if position in found]
            if 0 < len(tasks) < len(batch.names):
                warnings.warn(  # may raise (a filter set to "error"): then not marked checked
                    f"{argument}[{position}] (shape {tuple(tensor.shape)}) is reached by task(s) "
                    f"{', '.join(map(repr, tasks))} only, of {list(batch.names)}: a "
                    "task-specific tensor (a head?) among the shared ones changes the weights "
                    "of gradient methods. Pass only what every task shares (e.g. "
                    "model.trunk.parameters()); to differentiate w.r.t. it on purpose, filter "
                    "tb.TaskSpecificInputWarning",
                    TaskSpecificInputWarning,
                    stacklevel=4,
                )
                break
        if key is not None:
            if len(self._checked_inputs) >= 64:  # new tensors every step (torch.func, ...)
                self._checked_inputs.clear()
            self._checked_inputs.add(key)

    @contextlib.contextmanager
    def transaction(self, mask: Tensor | None = None) -> Iterator[None]:
        """Restore every parameter and buffer if the block raises: a failed step changes nothing.

        Also restores them, without raising, when the block met a mixed-precision overflow
        (non-finite scaled gradients, see :func:`scaled_backward`): ``GradScaler.step`` skips
        such a step, and the strategy skips it too. With ``mask`` (``[T]`` bool, the tasks
        present), the rows of absent tasks in per-task state are restored when the block
        succeeds: partial labels change the present tasks' state only.
        """
        saved = [
            (slots, name, tensor, tensor.detach().clone())
            for module in self.modules()
            for slots in (module._parameters, module._buffers)
            for name, tensor in slots.items()
            if tensor is not None
        ]
        step = _StepState()
        token = _STEP.set(step)
        try:
            yield
        except BaseException:
            _restore(saved)
            raise
        finally:
            _STEP.reset(token)
        if not step.overflow and step.watched and _has_nonfinite_grad(step.watched.values()):
            step.overflow = True  # GradScaler.step will see these gradients and skip
        if step.overflow:
            _restore(saved)
            outer = _STEP.get()
            if outer is not None:
                outer.overflow = True
        elif mask is not None:
            self._keep_absent_rows(saved, mask)

    def _keep_absent_rows(
        self, saved: Sequence[tuple[dict[str, Any], str, Tensor, Tensor]], mask: Tensor
    ) -> None:
        before = {(id(slots), name): copy for slots, name, _, copy in saved}
        with torch.no_grad():
            for slots, name, tensor in self._per_task_tensors():
                copy = before.get((id(slots), name))
                if copy is None or copy.shape != tensor.shape or tensor.dim() == 0:
                    continue  # sized in this step: the absent rows hold their initial value
                present = mask.reshape(-1, *([1] * (tensor.dim() - 1)))
                tensor.copy_(torch.where(present, tensor, copy))

    def _step_mask(self, batch: TaskLosses) -> Tensor | None:
        """The mask for :meth:`transaction` when some tasks are absent (no host sync)."""
        return batch.mask if len(batch.names) < len(self.tasks) else None

    def _repeated_step(self, losses: Mapping[str, Tensor]) -> Any:
        """What the last training step stored, if ``losses`` are its very loss tensors."""
        last = self._last_step
        if last is None or not (self.training and torch.is_grad_enabled()):
            return None
        refs, stored = last
        if len(refs) != len(losses):
            return None
        if all(name in losses and losses[name] is ref() for name, ref in refs):
            return stored
        return None

    def _remember_step(self, losses: Mapping[str, Tensor], stored: Any) -> None:
        # Only computed losses identify a step: leaf tensors (a toy reusing its losses) are new
        # steps each time.
        self._last_step = None
        if not all(
            isinstance(loss, Tensor) and loss.grad_fn is not None for loss in losses.values()
        ):
            return
        refs = tuple((name, weakref.ref(loss)) for name, loss in losses.items())
        self._last_step = (refs, stored)


@dataclass
class _StepState:
    """What a transaction learns about a mixed-precision step."""

    overflow: bool = False
    # Leaves whose gradients a scaled backward wrote: checked once, when the transaction ends.
    watched: dict[int, Tensor] = field(default_factory=dict)

    def watch(self, root: Tensor) -> None:
        for leaf in graph_leaves(root):
            self.watched.setdefault(id(leaf), leaf)


_STEP: contextvars.ContextVar[_StepState | None] = contextvars.ContextVar(
    "taskbalance_step", default=None
)


def _restore(saved: Sequence[tuple[dict[str, Any], str, Tensor, Tensor]]) -> None:
    """Put every saved parameter and buffer back; one that the step replaced (a buffer sized
    on first use, say) gets its old tensor back, shape included."""
    with torch.no_grad():
        for slots, name, tensor, copy in saved:
            if slots.get(name) is tensor and tensor.shape == copy.shape:
                tensor.copy_(copy)
            else:
                slots[name] = copy


def mark_overflow() -> None:
    """Mark the current :meth:`Strategy.transaction` as a mixed-precision overflow."""
    step = _STEP.get()
    if step is not None:
        step.overflow = True


def watch(root: Tensor) -> None:
    """Have the current transaction check, when it ends, the gradients that a scaled backward of
    ``root`` writes (call it before the backward, while the graph is whole)."""
    step = _STEP.get()
    if step is not None:
        step.watch(root)


def overflowed() -> bool:
    """Whether the current :meth:`Strategy.transaction` met a mixed-precision overflow."""
    step = _STEP.get()
    return step is not None and step.overflow


def _has_nonfinite_grad(tensors: Iterable[Tensor]) -> bool:
    grads: dict[torch.device, list[Tensor]] = {}
    for tensor in tensors:
        if tensor.grad is not None:
            grads.setdefault(tensor.grad.device, []).append(tensor.grad)
    found = False
    for device, group in grads.items():
        # GradScaler's own check (multiplying by 1 leaves the gradients unchanged); its flag and
        # inverse scale must be float32 whatever the default dtype, as GradScaler makes them.
        flag = torch.zeros((), dtype=torch.float32, device=device)
        one = torch.ones((), dtype=torch.float32, device=device)
        torch._amp_foreach_non_finite_check_and_unscale_(group, flag, one)
        found = found or bool(flag)  # host sync: the scaled path syncs anyway in scaler.step
    return found


def scaled_backward(total: Tensor, scaler: torch.amp.GradScaler | None) -> None:
    """``scaler.scale(total).backward()`` that lets :meth:`Strategy.transaction` see an overflow.

    With an enabled scaler, the gradients of every leaf of ``total``'s graph are checked when the
    enclosing transaction ends; a non-finite one means ``GradScaler.step`` will skip the optimizer
    step, so the transaction restores the strategy's state as well. Without a scaler it is
    ``total.backward()``.
    """
    if scaler is None or not scaler.is_enabled():
        total.backward()
        return
    watch(total)
    scaler.scale(total).backward()


def loss_scale(scaler: torch.amp.GradScaler | None, device: torch.device) -> Tensor | None:
    """The loss scale of an enabled ``scaler`` as a tensor on ``device``, else ``None``."""
    if scaler is None or not scaler.is_enabled():
        return None
    scale = scaler._scale  # the tensor itself: get_scale() would sync with the device
    if scale is None:
        scaler.scale(torch.zeros((), device="cpu"))  # creates the scale tensor
        scale = scaler._scale
    assert scale is not None
    return scale.to(device)


HALF = (torch.float16, torch.bfloat16)
