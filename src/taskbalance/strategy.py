"""The base class of every strategy: declared state, the transaction, the hooks.

A strategy answers one question: given the losses of several tasks, what single update should the
model take? Two families answer it (:mod:`taskbalance.loss_weighting`,
:mod:`taskbalance.gradient_aggregation`); both rest on :class:`Strategy`, which holds what every
method shares:

* **Declared state** (:meth:`Strategy.add_state`): the base class knows which tensors are state
  and which of them have one row per task, so partial labels, the transaction, ``.to()`` and
  ``state_dict()`` are handled once.
* **The transaction** (:meth:`Strategy.transaction`): a step that raises, or that met a
  mixed-precision overflow, leaves every declared state tensor as it was.
* **The verdict**: a step reads the device once, for all its checks together, before it writes
  ``.grad``; with ``check_finite = False`` never (see :class:`Strategy`).
* **The hooks** a method fills in (:meth:`Strategy.check_losses`,
  :meth:`Strategy.before_train_step`, :meth:`Strategy.on_train_step`, :meth:`Strategy.extras`,
  :meth:`Strategy.end_epoch`) and the one engine that calls them. No strategy overrides
  ``backward``, ``forward`` or an underscore method of the base classes.
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import dataclasses
import functools
import inspect
import math
import warnings
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, NoReturn, TypeVar

import torch
from torch import Tensor, nn

from taskbalance import distributed
from taskbalance.errors import NonFiniteLossError, StrategyError, TaskSpecificInputWarning
from taskbalance.jacobian import graph_leaves, inputs_reached
from taskbalance.report import StepReport
from taskbalance.validation import (
    TaskLosses,
    check_graphs,
    check_tasks,
    non_finite_error,
    nonempty_list,
    validate_losses,
)

__all__ = [
    "HALF",
    "Strategy",
    "TaskParameterOptimizer",
    "check_watched_gradients",
    "discarded",
    "loss_scale",
    "mark_overflow",
    "on_overflow",
    "overflow_flag",
    "overflowed",
    "require",
    "scaled_backward",
    "verdict",
    "watch",
]

# An old state_dict key and the name the state has now (resuming a 0.1 checkpoint).
_RENAMED_STATE = {"rng_state": "generator_state"}

_Drawn = TypeVar("_Drawn")


class TaskParameterOptimizer(nn.Module):
    """Adam or SGD for a strategy's own per-task tensor, with its state in buffers.

    The tensor it updates has one entry per task along dimension 0. A step updates only the
    entries of the tasks marked in ``mask`` and each entry keeps its own step count, so a task
    missing from a batch (partial labels) keeps its value and its moments exactly. With every task
    present it computes what ``torch.optim.Adam`` (L2 ``weight_decay``) or ``torch.optim.SGD``
    computes, to the last bit. Because the state is in buffers, ``state_dict()`` and
    ``.to(device)`` cover it.
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
    def step(self, target: Tensor, grad: Tensor, mask: Tensor | None = None) -> None:
        """Update ``target`` in place from ``grad`` at the entries where ``mask`` (``[T]`` bool)
        is true. ``mask=None`` means every task: the fast path, in place on the state (Adam:
        about twenty small kernels, no host sync)."""
        grad = grad.to(target.dtype)
        if self.weight_decay:
            grad = grad.add(target, alpha=self.weight_decay)
        state = [target]
        if self.kind == "adam":
            state += [self.step_count, self.exp_avg, self.exp_avg_sq]
        if mask is None:
            self._update(grad, *state)
            return
        # Partial labels: the same update on copies, kept for the present tasks only.
        fresh = [tensor.clone() for tensor in state]
        self._update(grad, *fresh)
        for old, new in zip(state, fresh):
            rows = mask if old.dim() == 1 else mask.reshape(-1, *([1] * (old.dim() - 1)))
            torch.where(rows, new, old, out=old)

    def _update(self, grad: Tensor, target: Tensor, *moments: Tensor) -> None:
        """One step of every entry, in place, with torch.optim's formulas and order of
        operations: the same result to the last bit."""
        if self.kind == "sgd":
            target.add_(grad, alpha=-self.lr)
            return
        step_count, exp_avg, exp_avg_sq = moments
        beta1, beta2 = self.betas
        step_count.add_(1)
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        # Per-task bias corrections in double precision, as torch.optim.Adam's Python floats
        # (MPS has no float64), in as few calls as possible: on tensors this small each costs
        # far more than its arithmetic.
        steps = step_count.view(-1, *([1] * (target.dim() - 1)))  # one per task
        power = torch.pow if steps.device.type == "mps" else torch.float_power
        step_size = power(beta1, steps).sub_(1.0).reciprocal_().mul_(self.lr)  # −lr/(1 − β1^t)
        bias2_sqrt = torch.rsub(power(beta2, steps), 1.0).sqrt_()
        denom = exp_avg_sq.sqrt().div_(bias2_sqrt.to(target.dtype)).add_(self.eps)
        target.addcdiv_(exp_avg.mul(step_size.to(target.dtype)), denom)


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

    **One verdict, one host sync.** Everything a step checks (the losses are finite, every
    task's gradient is finite and reaches the shared tensors, the conditions hooks register
    with :meth:`defer_check`, a solver's convergence under ``on_failure="raise"``) is read back
    from the device together, once per step, just before the step writes ``.grad`` (loss-level
    strategies: before the backward; gradient methods: once the weights are known, before the
    final backward). A failing check raises the error it would have raised at once, in the
    order the step met them (a non-finite loss first, naming its task), and the transaction
    leaves the state as it was. Syncs that remain: in a distributed step, one more read before
    the verdict, of the ranks' agreement on the tasks present (the rows' collectives need it; the
    global losses' check is read with it), even with ``check_finite`` off; with a ``GradScaler``,
    for a random strategy only, reading an overflow of the final backward to rewind its
    generator (``GradScaler.step`` syncs anyway). Random draws are made on the host
    (:meth:`draw`) and never sync. ``tests/syncs.py`` counts a step's syncs on the CPU.

    ``check_finite`` (an instance attribute, ``True`` by default; set ``strategy.check_finite =
    False`` on any strategy, plug-ins included) turns the verdict off: a step in one process
    then never syncs with the host, and never raises for what the verdict checks. What you give
    up: a NaN loss or gradient is not reported as it happens. The step report carries
    ``skipped`` instead (1 when the step failed a check or overflowed: the strategy's state
    updates of that step are undone with ``torch.where``, except the host-side random
    generator, which moves on); the gradients written are whatever the failing values give (NaN
    for a NaN loss, which a ``GradScaler`` skips); a solver failure falls back to the previous
    weights whatever ``on_failure`` says (counted in ``failures``, without the warning); a zero
    gradient row of a task that does not reach the inputs is not told apart from a legitimate
    one. Errors in the arguments (unknown tasks, shapes, devices) are still raised: they are
    known on the host.
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
        self._host_states: set[str] = set()  # declared state that stays on the CPU
        self._engine = _Engine()
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
        self._host_states.add("generator_state")

    def draw(
        self,
        sample: Callable[[torch.Generator], _Drawn],
        *,
        advance: bool = True,
        device: torch.device | None = None,
    ) -> _Drawn:
        """``sample(generator)`` on the generator of :meth:`add_random_state`; the state moves on
        unless ``advance=False`` (a look at the next draw).

        The generator and its state stay on the CPU whatever ``.to()`` does, so a draw never
        waits for the device. ``sample`` may return a tensor or a Python value (a seed, say);
        with ``device``, a tensor is sent there without blocking the host.
        """
        generator = torch.Generator()
        generator.set_state(self.generator_state.detach().cpu())  # kept on the CPU: no sync
        result = sample(generator)
        if advance:
            self.generator_state.copy_(generator.get_state())
        if device is not None and isinstance(result, Tensor):
            return result.to(device, non_blocking=True)  # type: ignore[return-value]
        return result

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> Strategy:
        # .to(device) and friends move every tensor but the host-side state (random generators).
        kept = {name: self._buffers[name] for name in self._host_states}
        super()._apply(fn, recurse)
        for name, tensor in kept.items():
            moved = self._buffers[name]
            if tensor is not None and moved is not None and moved.device != tensor.device:
                self._buffers[name] = tensor
        return self

    def _declared_state(self) -> Iterator[tuple[dict[str, Any], str, Tensor, bool, bool]]:
        """(slots, name, tensor, per_task, on_host) of every declared state tensor: the
        strategies' declared state and the moments of their own optimizers (the conformance kit
        checks that nothing else changes in a step)."""
        for module in self.modules():
            if isinstance(module, Strategy):
                declared = list(module._states.items())
                host = module._host_states
            elif isinstance(module, TaskParameterOptimizer):
                declared, host = [(name, True) for name in module._buffers], set()
            else:
                continue
            for name, per_task in declared:
                for slots in (module._parameters, module._buffers):
                    tensor = slots.get(name)
                    if tensor is not None:
                        yield slots, name, tensor, per_task, name in host

    # ----------------------------------------------------------------- hooks
    def check_losses(self, losses: Tensor, index: Tensor) -> None:
        """Raise :class:`StrategyError` if the method cannot use these (detached) losses of the
        present tasks, before anything is computed (a log of a negative loss, say)."""

    def before_train_step(self, losses: Tensor, index: Tensor) -> None:
        """Called at the start of every training step, before the weights, inside the
        transaction (FAMO takes its delayed logit step here). It may run in a step that then
        fails its verdict (a NaN loss, say): the transaction undoes what it changed."""

    def on_train_step(self, losses: Tensor, index: Tensor) -> None:
        """Called once after each successful training step with the (detached) losses of the
        present tasks and their positions ``index``, after the step's verdict; inside the
        transaction, so a failure or a mixed-precision overflow undoes it with everything else
        (with ``check_finite`` off, every step calls it, and a rejected step's updates are
        undone). Never called in evaluation."""

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
        to raise otherwise (it may read values back: it runs only on failure).

        Inside a step (a hook such as :meth:`check_losses`) the check joins the step's one
        verdict, read back with the others before the step writes ``.grad``; its error is
        raised in the order the step met the checks, and the step changes nothing. With
        ``check_finite = False`` it is never read back: a failure marks the step ``skipped``
        and undoes its state updates. Outside a step it is checked at once (a host sync).
        """
        require(ok, error)

    def first_failing(self, ok: Tensor, index: Tensor) -> tuple[str, int] | None:
        """``(task, position)`` of the first ``False`` in ``ok`` (one entry per present task),
        ``None`` if all are true: for the messages of :meth:`check_losses`, built in the error
        function of :meth:`defer_check` (it reads ``ok`` back: call it only on failure)."""
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
        # The engine's bookkeeping (the last step's weak references, closures and checks) is no
        # state: copies and pickles of a strategy start without it.
        return {**super().__getstate__(), "_engine": _Engine()}

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
        self._engine.last_step = None
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    # ----------------------------------------------------------------- the engine
    def gather(self, losses: Mapping[str, Tensor]) -> TaskLosses:
        """Validate ``losses`` and stack the present ones in the strategy's task order.

        Whether they are finite is not read here: the check goes to the step's verdict (the
        transaction that follows adopts it), so that a step reads the device once.
        """
        self._engine.gathered = []
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
            detached = values.detach()
            finite = torch.isfinite(detached)
            self._engine.gathered = [_Check(finite, lambda: non_finite_error(names, detached))]
            return TaskLosses(names, values, index, mask, None, tuple(parts), training)
        # One collective: the global mean of every task's loss. The values become the global
        # ones, the gradient stays the local one (DDP averages it in the final backward).
        means, counts = distributed.reduce_losses(values, index, len(self.tasks), group)
        ranks = distributed.world_size(group)
        finite = torch.isfinite(means)
        agreed = (counts == 0) | (counts == ranks)

        def error() -> StrategyError:
            return self._distributed_error(names, values, finite, counts, ranks)

        # A sync of its own: the rows' collectives need the same tasks on every rank (every
        # rank reaches the same verdict). The global losses' finiteness is read with it, or,
        # without check_finite, left to the step's flags.
        if self.check_finite:
            _raise_first([_Check(torch.cat([agreed, finite]), error)])
        else:
            _raise_first([_Check(agreed, error)])
            self._engine.gathered = [_Check(finite, error)]
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

    def _distributed_error(
        self,
        names: tuple[str, ...],
        values: Tensor,
        finite: Tensor,
        counts: Tensor,
        ranks: int,
    ) -> StrategyError:
        split = [t for t, c in zip(self.tasks, counts.tolist()) if 0 < c < ranks]
        if split:
            return StrategyError(
                f"task {split[0]!r} is in the losses of {int(counts[self._positions[split[0]]])} "
                f"of {ranks} ranks; every rank must pass the same tasks in a step"
            )
        bad = names[finite.tolist().index(False)]
        where = "" if not bool(torch.isfinite(values).all()) else " on another rank"
        return NonFiniteLossError(f"loss of task {bad!r} is not finite{where}", task=bad)

    def _index_and_mask(
        self, names: tuple[str, ...], device: torch.device
    ) -> tuple[Tensor, Tensor]:
        key = (names, device)
        if key not in self._index_cache:
            # Sent without blocking the host: no sync on a GPU, even for a new set of tasks.
            positions = torch.tensor([self._positions[n] for n in names])
            index = positions.to(device, non_blocking=True)
            mask = torch.zeros(len(self.tasks), dtype=torch.bool, device=device)
            mask[index] = True
            self._index_cache[key] = (index, mask)
        return self._index_cache[key]

    def _check_gathered(self) -> None:
        """The checks of :meth:`gather` in a call without a transaction (evaluation): read back
        at once, unless ``check_finite`` is off."""
        checks, self._engine.gathered = self._engine.gathered, []
        if self.check_finite:
            _raise_first(checks)

    def _refuse(self, error: StrategyError) -> NoReturn:
        """Raise ``error`` about the arguments, unless a loss of the call is not finite: that
        error comes first, as it always has (read back on this error path only)."""
        checks, self._engine.gathered = self._engine.gathered, []
        _raise_first(checks)
        raise error

    def _state_device(self) -> torch.device | None:
        for tensor in self._state_tensors():
            return tensor.device
        return None

    def _state_tensors(self) -> Iterator[Tensor]:
        """Every parameter and buffer, but the state kept on the host (random generators)."""
        for module in self.modules():
            host = module._host_states if isinstance(module, Strategy) else set()
            for slots in (module._parameters, module._buffers):
                for name, tensor in slots.items():
                    if tensor is not None and name not in host:
                        yield tensor

    def _refuse_training_combination(self, batch: TaskLosses) -> None:
        if batch.has_graph and self.training:
            self._refuse(
                StrategyError(
                    f"{type(self).__name__} needs per-task gradients: train with "
                    "strategy.backward(losses, shared_params=...) or features=... (or combine "
                    "with them); calling the strategy on losses only evaluates (use "
                    "torch.no_grad() or .eval())"
                )
            )

    def _require_graph(self, batch: TaskLosses) -> None:
        if not batch.has_graph:
            self._refuse(
                StrategyError(
                    f"backward needs losses that require grad; task {batch.names[0]!r} has no "
                    "graph (computed under torch.no_grad() or detached?)"
                )
            )

    def _grad_inputs(
        self,
        shared_params: Iterable[Tensor] | None,
        features: Tensor | Sequence[Tensor] | None,
        batch: TaskLosses,
    ) -> list[Tensor]:
        if (shared_params is None) == (features is None):
            self._refuse(
                StrategyError(
                    f"{type(self).__name__} needs exactly one of shared_params= (the shared "
                    "parameters) or features= (the output of the shared trunk)"
                )
            )
        argument = "features" if features is not None else "shared_params"
        try:
            if isinstance(features, Tensor):
                inputs = [features]
            else:
                given = features if features is not None else shared_params
                assert given is not None
                inputs = nonempty_list(given, argument)
        except StrategyError as error:
            self._refuse(error)
        for tensor in inputs:
            if not isinstance(tensor, Tensor) or not tensor.requires_grad:
                self._refuse(StrategyError(f"every tensor in {argument} must require grad"))
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
        """One step: its verdict, and its state restored if it fails.

        The block's checks (the losses that :meth:`gather` just validated, :meth:`defer_check`,
        the engine's own) are read back once, at :func:`verdict` or when the block ends; a
        failing one raises its error. A block that raises changes no declared state (every
        tensor of :meth:`add_state` and of the strategy's own optimizers is restored; the
        conformance kit checks that nothing else changes), and an error raised by the block is
        replaced by the error of an earlier check that fails (a non-finite loss comes first).

        Without a sync, the step's updates are undone with ``torch.where`` when it met a
        mixed-precision overflow (non-finite scaled gradients, see :func:`scaled_backward`:
        ``GradScaler.step`` skips such a step) or, with ``check_finite = False``, failed a check.
        With ``mask`` (``[T]`` bool, the tasks present), the rows of absent tasks in per-task
        state are kept as they were: partial labels change the present tasks' state only.

        Cost: one ``torch._foreach_copy_`` of the declared state (nothing for a strategy
        without state), and no sync but the verdict's.
        """
        engine = self._engine
        saved = self._snapshot()
        outer = _STEP.get()
        inherited = None if outer is None else outer.overflow_flag
        step = _StepState(
            self.check_finite, engine.gathered, overflow_flag=inherited, inherited=inherited
        )
        engine.gathered = []
        token = _STEP.set(step)
        engine.depth += 1
        try:
            yield
            step.settle()  # what the block did not settle before writing .grad
            step.check_gradients()
        except Exception:
            saved.restore()
            earlier = step.pending_error()
            if earlier is not None:
                raise earlier  # noqa: B904 - the cause, with the block's error as its context
            raise
        except BaseException:
            saved.restore()
            raise
        finally:
            engine.depth -= 1
            _STEP.reset(token)
        if outer is not None:
            outer.absorb(step)
        rejected = step.rejected()
        engine.rejected = True if step.overflow else (False if rejected is None else rejected)
        if step.overflow:
            saved.restore()
            return
        if rejected is not None and self.check_finite and saved.on_host():
            # A random strategy under a GradScaler: its generator lives on the host, so
            # rewinding it after an overflow needs the flag (the only sync besides the verdict).
            if bool(rejected):
                saved.restore()
                return
            rejected, engine.rejected = None, False
        if rejected is not None or mask is not None:
            saved.undo(rejected, mask)

    def _snapshot(self) -> _Snapshot:
        """A copy of every declared state tensor: one ``torch._foreach_copy_`` into buffers kept
        from the last step (nothing at all for a strategy without state)."""
        engine = self._engine
        key = (len(self._states), len(self._modules))  # a new state or submodule: a new layout
        if engine.layout is None or engine.layout[0] != key:
            layout = [
                (slots, name, per_task, host)
                for slots, name, _, per_task, host in self._declared_state()
            ]
            engine.layout, engine.copies = (key, layout), []
        layout = engine.layout[1]
        if not layout:
            return _Snapshot([], [], [])
        live = [slots[name] for slots, name, _, _ in layout]
        # A nested transaction of the same strategy (GradientAccumulator's) keeps its own copies.
        copies = engine.copies if engine.depth == 0 else []
        if len(copies) != len(live) or any(
            c.shape != t.shape or c.dtype != t.dtype or c.device != t.device
            for c, t in zip(copies, live)
        ):
            copies = [torch.empty_like(tensor, requires_grad=False) for tensor in live]
            if engine.depth == 0:
                engine.copies = copies
        with torch.no_grad():
            torch._foreach_copy_(copies, live)
        return _Snapshot(layout, live, copies)

    def _step_scalars(self, like: Tensor) -> dict[str, Tensor]:
        """``{"skipped": 0-d float}`` of the last step when ``check_finite`` is off (1: a check
        failed or mixed precision overflowed, its state updates were undone), else ``{}``."""
        if self.check_finite:
            return {}
        rejected = self._engine.rejected
        if isinstance(rejected, Tensor):
            return {"skipped": rejected.to(like.device, torch.float32)}
        return {"skipped": torch.full((), float(rejected), device=like.device)}

    def _step_mask(self, batch: TaskLosses) -> Tensor | None:
        """The mask for :meth:`transaction` when some tasks are absent (no host sync)."""
        return batch.mask if len(batch.names) < len(self.tasks) else None

    def _repeated_step(self, losses: Mapping[str, Tensor]) -> Any:
        """What the last training step stored, if ``losses`` are its very loss tensors."""
        last = self._engine.last_step
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
        self._engine.last_step = None
        if not all(
            isinstance(loss, Tensor) and loss.grad_fn is not None for loss in losses.values()
        ):
            return
        refs = tuple((name, weakref.ref(loss)) for name, loss in losses.items())
        self._engine.last_step = (refs, stored)


class _Engine:
    """What the engine keeps between calls that is not state, in plain attributes (a module's
    ``__setattr__`` costs more than a small step's arithmetic)."""

    __slots__ = ("copies", "depth", "gathered", "last_step", "layout", "rejected")

    def __init__(self) -> None:
        self.gathered: list[_Check] = []  # gather()'s checks, for the transaction to adopt
        self.rejected: Tensor | bool = False  # the last step's: a device flag, or known here
        self.last_step: tuple[tuple[tuple[str, Any], ...], Any] | None = None
        # Where the declared state lives: (key, [(slots, name, per_task, on_host)]).
        self.layout: tuple[Any, list[tuple[dict[str, Any], str, bool, bool]]] | None = None
        self.copies: list[Tensor] = []  # the snapshot's buffers, reused from step to step
        self.depth = 0  # transactions open


@dataclass(frozen=True)
class _Snapshot:
    """The declared state tensors at the start of a step (``live``) and their copies."""

    layout: list[tuple[dict[str, Any], str, bool, bool]]
    live: list[Tensor]
    copies: list[Tensor]

    def on_host(self) -> bool:
        return any(host for _, _, _, host in self.layout)

    def restore(self) -> None:
        """Put every state tensor back; one that the step replaced (a buffer sized on first
        use, say) gets its old tensor back, shape included."""
        with torch.no_grad():
            for (slots, name, _, _), tensor, copy in zip(self.layout, self.live, self.copies):
                current = slots.get(name)
                if current is tensor and current.shape == copy.shape:
                    current.copy_(copy)
                else:
                    slots[name] = copy.clone()  # the copy's buffer serves the next step

    def undo(self, rejected: Tensor | None, mask: Tensor | None) -> None:
        """Keep the step's updates only where they stand, with ``torch.where`` (no sync):
        nowhere if ``rejected`` (a 0-d bool on the device) is true, and, in per-task state,
        only in the rows of the tasks present (``mask``). Host-side state (a random generator)
        keeps its updates."""
        with torch.no_grad():
            for (slots, name, per_task, host), tensor, copy in zip(
                self.layout, self.live, self.copies
            ):
                if per_task and mask is not None and copy.dim() > 0:
                    keep = mask.reshape(-1, *([1] * (copy.dim() - 1)))
                    if rejected is not None:
                        keep = keep & ~rejected
                elif rejected is not None and not host:
                    keep = ~rejected
                else:
                    continue
                current = slots.get(name)
                if current is not tensor or current.shape != copy.shape:
                    # Sized in this step (first use): the absent rows hold their initial value;
                    # a rejected step gets the old tensor back, which needs the flag (first step
                    # only).
                    if rejected is not None and bool(rejected):
                        slots[name] = copy.clone()
                    continue
                current.copy_(torch.where(keep, current, copy))


@dataclass(frozen=True)
class _Check:
    """A condition of one step: ``ok`` (a bool tensor) all true, else ``error()`` (``None``: no
    error on a closer look, e.g. a zero gradient row of a task that does reach the inputs)."""

    ok: Tensor
    error: Callable[[], Exception | None]
    # Read only with check_finite, and then raised or shown as any check; without it, not a
    # failure of the step (a warning to show, a zero gradient row that may be legitimate).
    advisory: bool = False


@dataclass
class _StepState:
    """What a transaction learns about its step: the checks of its verdict, a mixed-precision
    overflow, and (without ``check_finite``) whether a check failed."""

    strict: bool = True  # check_finite: the verdict is read back and raises
    checks: list[_Check] = field(default_factory=list)
    overflow: bool = False  # known on the host
    overflow_flag: Tensor | None = None  # found on the device, never read back
    failed: Tensor | None = None  # not strict: a check failed (on the device)
    inherited: Tensor | None = None  # the enclosing step's overflow flag, at the start
    # Leaves whose gradients a scaled backward wrote: checked once, when the transaction ends.
    watched: dict[int, Tensor] = field(default_factory=dict)

    def require(self, check: _Check) -> None:
        if self.overflow:
            return  # the step is skipped: what it meets after the overflow does not matter
        if self.overflow_flag is not None:
            check = dataclasses.replace(check, ok=check.ok | self.overflow_flag)
        self.checks.append(check)

    def watch(self, root: Tensor) -> None:
        for leaf in graph_leaves(root):
            self.watched.setdefault(id(leaf), leaf)

    def flag_overflow(self, flag: Tensor) -> None:
        flag = flag.detach().reshape(())
        self.overflow_flag = flag if self.overflow_flag is None else self.overflow_flag | flag

    def settle(self) -> None:
        """The verdict on the checks so far: one read from the device, a raise if one fails;
        not strict, no read: a failure is kept in ``failed``."""
        checks, self.checks = self.checks, []
        if self.strict:
            oks = [check.ok for check in checks]
            flag = self.overflow_flag
            if flag is None:
                _raise_first(checks)
                return
            # The overflow flag is read with the checks: from here on it is known on the host.
            *values, fine = _read([*oks, ~flag])
            self.overflow_flag = None
            self.overflow = self.overflow or not fine
            error = _first_error(checks, values)
            if error is not None:
                raise error
            return
        failures = [check.ok.all() for check in checks if not check.advisory]
        if failures:
            bad = ~torch.stack(failures).all()
            self.failed = bad if self.failed is None else self.failed | bad

    def pending_error(self) -> Exception | None:
        """The error of the first failing check not settled yet (on an error path: reads back)."""
        checks, self.checks = self.checks, []
        return _first_error(checks)

    def check_gradients(self) -> None:
        """Flag an overflow if a watched leaf got a non-finite gradient (no sync)."""
        if self.watched and not self.overflow:
            flag = _nonfinite_grad_flag(self.watched.values())
            if flag is not None:
                self.flag_overflow(flag)

    def rejected(self) -> Tensor | None:
        """The device flag of a step whose state updates must be undone; ``None``: none."""
        flags = [f for f in (self.failed, self.overflow_flag) if f is not None]
        if not flags:
            return None
        return flags[0] if len(flags) == 1 else flags[0] | flags[1]

    def absorb(self, inner: _StepState) -> None:
        """An inner transaction's outcome is part of this step's."""
        self.overflow = self.overflow or inner.overflow
        if inner.inherited is not None and inner.overflow_flag is None:
            self.overflow_flag = None  # the inner verdict read it (into inner.overflow)
        elif inner.overflow_flag is not None and inner.overflow_flag is not self.overflow_flag:
            self.flag_overflow(inner.overflow_flag)
        if inner.failed is not None:
            self.failed = inner.failed if self.failed is None else self.failed | inner.failed


_STEP: contextvars.ContextVar[_StepState | None] = contextvars.ContextVar(
    "taskbalance_step", default=None
)


def _read(oks: Sequence[Tensor]) -> list[bool]:
    """Whether each of ``oks`` is all true: one read back from the device for all of them."""
    if len(oks) == 1:
        return [bool(oks[0].all())]
    return torch.stack([ok.all() for ok in oks]).tolist()


def _first_error(checks: Sequence[_Check], values: list[bool] | None = None) -> Exception | None:
    """The error of the first failing check (in the order the step met them), or ``None``;
    ``values``: whether each check passed, if already read."""
    if not checks:
        return None
    if values is None:
        values = _read([check.ok for check in checks])
    for check, ok in zip(checks, values):
        if not ok:
            error = check.error()
            if error is not None:
                return error
    return None


def _raise_first(checks: Sequence[_Check]) -> None:
    error = _first_error(checks)
    if error is not None:
        raise error


def require(ok: Tensor, error: Callable[[], Exception | None], *, advisory: bool = False) -> None:
    """Add a check to the current step's verdict (:meth:`Strategy.defer_check`, for engine code
    without the strategy at hand). ``error()`` may return ``None`` (no error on a closer look).
    ``advisory``: read only with ``check_finite`` (a warning to show, a condition that may be
    legitimate); without it the check is dropped instead of failing the step. Outside a step
    the check is read at once."""
    check = _Check(ok.detach(), error, advisory)
    step = _STEP.get()
    if step is None:
        _raise_first([check])
    elif step.strict or not advisory:
        step.require(check)


def overflow_flag() -> Tensor | bool | None:
    """The current step's mixed-precision overflow: a 0-d bool on the device, ``True`` when known
    on the host, ``None`` when there is none to fear."""
    step = _STEP.get()
    if step is None:
        return None
    return True if step.overflow else step.overflow_flag


def discarded() -> Tensor | bool | None:
    """Whether the current step's result is to be thrown away, as far as known without a sync:
    a mixed-precision overflow, or (with ``check_finite`` off) a check failed so far. A 0-d bool
    on the device, ``True`` when known on the host, ``None`` when there is none to fear. The
    engine hands a solver harmless input where it is true: with ``check_finite`` a failed check
    raises at the verdict instead."""
    step = _STEP.get()
    if step is None:
        return None
    if step.overflow:
        return True
    if not step.strict:
        step.settle()  # no sync: the checks so far into step.failed
    flags = [f for f in (step.overflow_flag, step.failed) if f is not None]
    if not flags:
        return None
    return flags[0] if len(flags) == 1 else flags[0] | flags[1]


def verdict() -> None:
    """Settle the current step's checks now: the engine calls it just before it writes ``.grad``.
    One host sync with ``check_finite`` (and a raise if a check fails), none without."""
    step = _STEP.get()
    if step is not None:
        step.settle()


def mark_overflow(flag: Tensor | None = None) -> None:
    """Mark the current :meth:`Strategy.transaction` as a mixed-precision overflow: known on the
    host (no ``flag``), or where the 0-d bool ``flag`` on the device is true, without reading it.
    Checks registered afterwards pass in an overflowed step (the step is skipped anyway)."""
    step = _STEP.get()
    if step is None:
        return
    if flag is None:
        step.overflow = True
    else:
        step.flag_overflow(flag)


def on_overflow(values: Tensor, fill: float = math.nan) -> Tensor:
    """``values``, or ``fill`` in their place where the current step overflowed (no sync).

    NaN weights and directions make every gradient of a skipped mixed-precision step say so
    (``GradScaler.step`` then skips); a harmless ``fill`` keeps a solver away from non-finite
    input in a step whose result is discarded anyway.
    """
    flag = overflow_flag()
    if flag is None:
        return values
    if isinstance(flag, bool):
        return torch.full_like(values, fill)
    return torch.where(flag, fill, values)


def watch(root: Tensor) -> None:
    """Have the current transaction check, when it ends, the gradients that a scaled backward of
    ``root`` writes (call it before the backward, while the graph is whole)."""
    step = _STEP.get()
    if step is not None:
        step.watch(root)


def check_watched_gradients() -> None:
    """Flag now (no sync) an overflow in the gradients that :func:`watch` covers, for what
    follows in the step (such as its reported weights); the transaction's end checks again."""
    step = _STEP.get()
    if step is not None:
        step.check_gradients()


def overflowed() -> bool:
    """Whether the current :meth:`Strategy.transaction` met a mixed-precision overflow that is
    known on the host (an overflow found on the device is never read back: see
    :func:`on_overflow`)."""
    step = _STEP.get()
    return step is not None and step.overflow


def _nonfinite_grad_flag(tensors: Iterable[Tensor]) -> Tensor | None:
    """A 0-d bool on the device: whether a gradient of ``tensors`` is not finite (no sync)."""
    grads: dict[torch.device, list[Tensor]] = {}
    for tensor in tensors:
        if tensor.grad is not None:
            grads.setdefault(tensor.grad.device, []).append(tensor.grad)
    found = None
    for device, group in grads.items():
        # GradScaler's own check (multiplying by 1 leaves the gradients unchanged); its flag and
        # inverse scale must be float32 whatever the default dtype, as GradScaler makes them.
        flag = torch.zeros((), dtype=torch.float32, device=device)
        one = torch.ones((), dtype=torch.float32, device=device)
        torch._amp_foreach_non_finite_check_and_unscale_(group, flag, one)
        if found is None:
            found = flag > 0
        else:  # several devices: one flag, on the first
            found = found | (flag.to(found.device, non_blocking=True) > 0)
    return found


def scaled_backward(total: Tensor, scaler: torch.amp.GradScaler | None) -> None:
    """``scaler.scale(total).backward()`` that lets :meth:`Strategy.transaction` see an overflow.

    The step's :func:`verdict` comes first (nothing is written to ``.grad`` by a step that
    fails). With an enabled scaler, the gradients of every leaf of ``total``'s graph are checked
    when the enclosing transaction ends; a non-finite one means ``GradScaler.step`` will skip the
    optimizer step, so the transaction undoes the strategy's updates as well. Without a scaler it
    is ``total.backward()``.
    """
    verdict()
    if scaler is None or not scaler.is_enabled():
        total.backward()
        return
    watch(total)
    scaler.scale(total).backward()


def loss_scale(scaler: torch.amp.GradScaler | None, device: torch.device) -> Tensor | None:
    """The loss scale of an enabled ``scaler`` as a tensor on ``device``, else ``None``."""
    if scaler is None or not scaler.is_enabled():
        return None
    if scaler._scale is None:
        scaler.scale(torch.zeros((), device=device))  # creates the scale tensor, on the device
    scale = scaler._scale  # the tensor itself: get_scale() would sync with the device
    assert scale is not None
    return scale.to(device)


HALF = (torch.float16, torch.bfloat16)
