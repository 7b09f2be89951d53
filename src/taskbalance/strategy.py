"""Base classes shared by every strategy.

A strategy answers one question: given the losses of several tasks, what single update should the
model take? Two families answer it differently:

* :class:`LossWeighting` turns the loss vector into weights; the update is the gradient of
  ``sum(w_i * L_i)``. It works as a plain differentiable combination (``s(losses).backward()``)
  and through ``s.backward(losses)``.
* :class:`GradientAggregation` turns the per-task gradients (their Jacobian, or its Gramian) into
  one update direction; it needs ``s.backward(losses, shared_params=...)`` or ``features=...``.

Combining weights with losses or gradients, validating the input, keeping the state
transactional and building the :class:`StepReport` are written once, here.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import inspect
import math
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn

from taskbalance import distributed
from taskbalance.jacobian import backward_with_direction, gramian, gramian_backward, jacobian

__all__ = [
    "GradientAggregation",
    "LossWeighting",
    "NonFiniteLossError",
    "SolverError",
    "StepReport",
    "Strategy",
    "StrategyError",
    "TaskParameterOptimizer",
    "per_task_jacobian",
    "scaled_backward",
]


OnFailure = Literal["reuse", "raise"]


class StrategyError(ValueError):
    """Bad input to a strategy; the message names the task or argument at fault."""


class NonFiniteLossError(StrategyError):
    """A task loss is NaN or infinite. Nothing was updated."""


class SolverError(StrategyError):
    """A strategy's per-step problem has no solution, or its solver did not converge.

    Strategies with such a problem (Nash-MTL, FairGrad, CAGrad, MGDA, UPGrad, DualProj) take an
    ``on_failure`` argument: ``"reuse"`` falls back to the previous step's weights (and counts
    the fallback in the step report), ``"raise"`` raises this error.
    """


@dataclass(frozen=True)
class StepReport:
    """What one step did, kept as tensors so that building it never syncs with the device.

    ``loss_values`` and ``weight_values`` hold one entry per task in ``tasks`` (the tasks present
    in this step, in the strategy's order). ``extras`` holds further per-task vectors that a
    strategy wants to log (for example ``"log_var"``), ``scalars`` single values about the step
    (``"failed"`` and ``"failures"`` for strategies with an ``on_failure`` policy, see
    :class:`GradientAggregation`). Converting to Python floats happens only in :meth:`to_dict`.
    """

    tasks: tuple[str, ...]
    loss_values: Tensor
    weight_values: Tensor
    extras: Mapping[str, Tensor] = field(default_factory=dict)
    scalars: Mapping[str, Tensor] = field(default_factory=dict)

    @property
    def losses(self) -> dict[str, Tensor]:
        return dict(zip(self.tasks, self.loss_values.unbind()))

    @property
    def weights(self) -> dict[str, Tensor]:
        return dict(zip(self.tasks, self.weight_values.unbind()))

    def to_dict(self, prefix: str = "") -> dict[str, float]:
        """Floats keyed ``{prefix}loss/<task>``, ``{prefix}weight/<task>``,
        ``{prefix}<extra>/<task>`` and ``{prefix}<scalar>``.

        This is the one place that copies to the host (a single transfer for all values).
        """
        groups = {"loss": self.loss_values, "weight": self.weight_values, **self.extras}
        parts = [v.detach().reshape(-1).float() for v in (*groups.values(), *self.scalars.values())]
        flat = torch.cat(parts).tolist()
        out: dict[str, float] = {}
        position = 0
        for key in groups:
            for task in self.tasks:
                out[f"{prefix}{key}/{task}"] = flat[position]
                position += 1
        for key in self.scalars:
            out[f"{prefix}{key}"] = flat[position]
            position += 1
        return out


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


@dataclass(frozen=True)
class TaskLosses:
    """The validated losses of one step: the tasks present, in the strategy's order."""

    names: tuple[str, ...]
    values: Tensor  # [k], with the autograd graph (global values under torch.distributed)
    index: Tensor  # [k] positions of the present tasks in ``strategy.tasks``
    mask: Tensor  # [T] bool, True for the present tasks
    group: Any = None  # the process group the step is reduced over; None: a local step

    @property
    def has_graph(self) -> bool:
        return self.values.requires_grad


def _check_tasks(tasks: Sequence[str]) -> tuple[str, ...]:
    if isinstance(tasks, str) or not isinstance(tasks, Iterable):
        raise StrategyError(f"tasks must be a sequence of task names, got {tasks!r}")
    names = tuple(tasks)
    if not names:
        raise StrategyError("tasks must name at least one task")
    for name in names:
        if not isinstance(name, str) or not name:
            raise StrategyError(f"tasks must be non-empty strings, got {name!r}")
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise StrategyError(f"tasks must be unique, {duplicates} appear more than once")
    return names


def per_task_vector(
    values: Mapping[str, float] | Sequence[float] | float,
    tasks: Sequence[str],
    *,
    argument: str,
) -> Tensor:
    """A float tensor with one entry per task from a mapping, a sequence or one number."""
    if isinstance(values, Mapping):
        unknown = sorted(set(values) - set(tasks))
        if unknown:
            raise StrategyError(
                f"{argument} names unknown tasks {unknown}; tasks are {list(tasks)}"
            )
        missing = [t for t in tasks if t not in values]
        if missing:
            raise StrategyError(f"{argument} gives no value for tasks {missing}")
        items = [values[t] for t in tasks]
    elif isinstance(values, (int, float)):
        items = [values] * len(tasks)
    else:
        items = list(values)
        if len(items) != len(tasks):
            raise StrategyError(
                f"{argument} has {len(items)} values for {len(tasks)} tasks {list(tasks)}"
            )
    try:
        # The default dtype, like a module's parameters: state and its optimizer agree in dtype.
        vector = torch.tensor([float(v) for v in items], dtype=torch.get_default_dtype())
    except (TypeError, ValueError) as error:
        raise StrategyError(f"{argument} must hold numbers, got {items!r}") from error
    if not torch.isfinite(vector).all():
        raise StrategyError(f"{argument} must be finite, got {items!r}")
    return vector


def validate_losses(
    losses: Mapping[str, Tensor], tasks: Sequence[str]
) -> tuple[tuple[str, ...], list[Tensor]]:
    """Check a ``task -> scalar loss`` mapping; return the present tasks in ``tasks`` order and
    their losses as 0-d tensors of one dtype (on one device). Errors name the culprit."""
    if not isinstance(losses, Mapping):
        raise StrategyError(
            f"losses must be a mapping task name -> scalar tensor, got {type(losses).__name__}"
        )
    if not losses:
        raise StrategyError(f"losses is empty; expected some of the tasks {list(tasks)}")
    unknown = [name for name in losses if name not in tasks]
    if unknown:
        raise StrategyError(f"unknown task {unknown[0]!r} in losses; tasks are {list(tasks)}")
    names = tuple(t for t in tasks if t in losses)
    device = None
    for name in names:
        loss = losses[name]
        if not isinstance(loss, Tensor):
            raise StrategyError(
                f"loss of task {name!r} must be a tensor, got {type(loss).__name__}"
            )
        if loss.numel() != 1 or loss.dim() > 1:
            raise StrategyError(
                f"loss of task {name!r} must be a scalar, got shape {tuple(loss.shape)}"
            )
        if not loss.is_floating_point():
            raise StrategyError(f"loss of task {name!r} must be floating point, got {loss.dtype}")
        if device is None:
            device = loss.device
        elif loss.device != device:
            raise StrategyError(
                f"loss of task {name!r} is on {loss.device}, task {names[0]!r} on {device}"
            )
    dtype = functools.reduce(torch.promote_types, (losses[n].dtype for n in names))
    return names, [losses[n].reshape(()).to(dtype) for n in names]


def _check_graphs(names: Sequence[str], parts: Sequence[Tensor]) -> None:
    """A training step (some loss has a graph) needs every present task's loss to have one.

    A loss computed under ``torch.no_grad()`` or detached would otherwise be weighted, reported
    and never trained. Without any graph (evaluation) nothing is checked.
    """
    if not torch.is_grad_enabled():
        return
    graphs = [part.requires_grad for part in parts]
    if any(graphs) and not all(graphs):
        name = names[graphs.index(False)]
        raise StrategyError(
            f"loss of task {name!r} has no graph (computed under torch.no_grad() or detached?) "
            "while other tasks' losses have one: it would not be trained. Leave a task without "
            "a loss out of the mapping (partial labels)"
        )


def check_finite(names: Sequence[str], values: Tensor) -> None:
    """Raise :class:`NonFiniteLossError` naming the first task whose loss is NaN or infinite.
    One host sync: a NaN must fail loudly, before anything is updated."""
    finite = torch.isfinite(values.detach())
    if not bool(finite.all()):
        position = finite.tolist().index(False)
        raise NonFiniteLossError(
            f"loss of task {names[position]!r} is not finite ({values[position].item()})"
        )


class Strategy(nn.Module):
    """A way of combining several task losses into one update.

    Subclasses are small modules with one job; they keep all their state in parameters and
    registered buffers (one entry per task along dimension 0 for per-task state), so that
    ``state_dict()``, ``.to(device)`` and resuming work without extra code.

    Class attributes describe capabilities (the registry records them):

    * ``needs_grads``: the strategy needs per-task gradients, so only ``backward`` trains with it.
    * ``deterministic``: the result is a function of the input and the state (no random draws).

    ``process_group`` (an instance attribute; ``None`` by default) picks the ranks a training step
    is reduced over when torch.distributed is initialised: ``None`` the default group, a process
    group that group, :data:`taskbalance.distributed.LOCAL` none (see
    :mod:`taskbalance.distributed`).
    """

    needs_grads: ClassVar[bool] = False
    deterministic: ClassVar[bool] = True
    process_group: Any = None

    _init_args: dict[str, Any]

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
        self.tasks: tuple[str, ...] = _check_tasks(tasks)
        self._positions = {name: i for i, name in enumerate(self.tasks)}
        self._index_cache: dict[tuple[tuple[str, ...], torch.device], tuple[Tensor, Tensor]] = {}

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

    def extra_repr(self) -> str:
        arguments = dict(getattr(self, "_init_args", {}))
        arguments["tasks"] = list(self.tasks)
        return ", ".join(f"{key}={value!r}" for key, value in arguments.items())

    def get_extra_state(self) -> dict[str, list[str]]:
        return {"tasks": list(self.tasks)}

    def set_extra_state(self, state: Any) -> None:
        saved = list(state["tasks"]) if isinstance(state, Mapping) else None
        if saved != list(self.tasks):
            raise StrategyError(
                f"state_dict was saved for tasks {saved}, this strategy has {list(self.tasks)}"
            )

    # ----------------------------------------------------------------- helpers for subclasses
    def gather(self, losses: Mapping[str, Tensor]) -> TaskLosses:
        """Validate ``losses`` and stack the present ones in the strategy's task order."""
        names, parts = validate_losses(losses, self.tasks)
        _check_graphs(names, parts)
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
        if group is None:
            check_finite(names, values)
            return TaskLosses(names, values, index, mask)
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
        values = torch.stack([part + shift for part, shift in zip(parts, shifts)])
        return TaskLosses(names, values, index, mask, group)

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
        raise NonFiniteLossError(f"loss of task {bad!r} is not finite{where}")

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

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        """Restore every parameter and buffer if the block raises: a failed step changes nothing.

        Also restores them, without raising, when the block met a mixed-precision overflow
        (non-finite scaled gradients, see :func:`scaled_backward`): ``GradScaler.step`` skips
        such a step, and the strategy skips it too.
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

    def _require_graph(self, batch: TaskLosses) -> None:
        if not batch.has_graph:
            raise StrategyError(
                f"backward needs losses that require grad; task {batch.names[0]!r} has no graph "
                "(computed under torch.no_grad() or detached?)"
            )

    def _refuse_training_combination(self, batch: TaskLosses) -> None:
        if batch.has_graph and self.training:
            raise StrategyError(
                f"{type(self).__name__} needs per-task gradients: train with "
                "strategy.backward(losses, shared_params=...) or features=...; calling the "
                "strategy on losses only evaluates (use torch.no_grad() or .eval())"
            )

    def _grad_inputs(
        self,
        shared_params: Iterable[Tensor] | None,
        features: Tensor | Sequence[Tensor] | None,
    ) -> list[Tensor]:
        if (shared_params is None) == (features is None):
            raise StrategyError(
                f"{type(self).__name__}.backward needs exactly one of shared_params= (the shared "
                "parameters) or features= (the output of the shared trunk)"
            )
        if features is not None:
            inputs = [features] if isinstance(features, Tensor) else list(features)
            argument = "features"
        else:
            assert shared_params is not None
            inputs = list(shared_params)
            argument = "shared_params"
        if not inputs:
            raise StrategyError(f"{argument} is empty")
        for tensor in inputs:
            if not isinstance(tensor, Tensor) or not tensor.requires_grad:
                raise StrategyError(f"every tensor in {argument} must require grad")
        return inputs


@dataclass
class _StepState:
    """What a transaction learns about a mixed-precision step."""

    overflow: bool = False
    # Leaves whose gradients a scaled backward wrote: checked once, when the transaction ends.
    watched: dict[int, Tensor] = field(default_factory=dict)

    def watch(self, root: Tensor) -> None:
        for leaf in _graph_leaves(root):
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


def _mark_overflow() -> None:
    step = _STEP.get()
    if step is not None:
        step.overflow = True


def overflowed() -> bool:
    """Whether the current :meth:`Strategy.transaction` met a mixed-precision overflow."""
    step = _STEP.get()
    return step is not None and step.overflow


def _scaled(total: Tensor, scaler: torch.amp.GradScaler | None) -> Tensor:
    return total if scaler is None else scaler.scale(total)


def _graph_leaves(root: Tensor) -> list[Tensor]:
    """The leaf tensors (parameters) that ``root``'s graph accumulates gradients into."""
    leaves: list[Tensor] = []
    seen: set[Any] = set()
    stack = [root.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)
        if isinstance(variable, Tensor):
            leaves.append(variable)
        stack.extend(next_node for next_node, _ in node.next_functions)
    return leaves


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
    step = _STEP.get()
    if step is not None:
        step.watch(total)  # before the backward, while the graph is whole
    scaler.scale(total).backward()


def _scale_factor(scaler: torch.amp.GradScaler | None, device: torch.device) -> Tensor | None:
    """The loss scale of an enabled ``scaler`` as a tensor on ``device``, else ``None``."""
    if scaler is None or not scaler.is_enabled():
        return None
    scale = scaler._scale  # the tensor itself: get_scale() would sync with the device
    if scale is None:
        scaler.scale(torch.zeros((), device="cpu"))  # creates the scale tensor
        scale = scaler._scale
    assert scale is not None
    return scale.to(device)


_HALF = (torch.float16, torch.bfloat16)


def per_task_jacobian(
    batch: TaskLosses,
    inputs: Sequence[Tensor],
    scaler: torch.amp.GradScaler | None,
    *,
    features: bool | None = None,
) -> Tensor:
    """Per-task gradients of the present losses w.r.t. ``inputs`` as rows ``[k, P]``, unscaled.

    In a distributed step the rows are the global ones, the same on every rank (see
    :mod:`taskbalance.distributed`): ``features`` says whether ``inputs`` are per-sample features
    (default: yes unless every input is a leaf tensor, as parameters are). With an enabled
    ``scaler``, non-finite rows mark the step as an overflow: the enclosing
    :meth:`Strategy.transaction` then leaves the strategy's state as it was. Rows of a half
    precision type (bf16/fp16 autocast) are returned as float32.
    """
    return _per_task_rows(batch, inputs, scaler, features)[0]


def _per_task_rows(
    batch: TaskLosses,
    inputs: Sequence[Tensor],
    scaler: torch.amp.GradScaler | None,
    features: bool | None,
) -> tuple[Tensor, tuple[int, int]]:
    """The rows of :func:`per_task_jacobian` and the span of this rank's own columns."""
    if features is None:
        features = not all(t.grad_fn is None for t in inputs)  # parameters are leaves
    device = batch.values.device
    for position, tensor in enumerate(inputs):
        if tensor.device != device:
            argument = "features" if features else "shared_params"
            raise StrategyError(
                f"{argument}[{position}] is on {tensor.device}, the losses on {device}"
            )
    scale = _scale_factor(scaler, device)
    if scale is None:
        rows = jacobian(batch.values, inputs)
    else:
        step = _STEP.get()
        if step is not None:
            # A strategy with its own backward may call plain ``scaler.scale(total).backward()``:
            # the gradients it writes are checked when the transaction ends.
            step.watch(batch.values)
        rows = jacobian(batch.values, inputs, scale=scale)
        rows = rows.float() / scale if rows.dtype in _HALF else rows / scale
    if rows.dtype in _HALF:
        rows = rows.float()  # weights from a float32 Gramian; bf16/fp16 products lose too much
    span = (0, rows.shape[1])
    if batch.group is not None:
        rows, span = distributed.reduce_rows(rows, features=features, group=batch.group)
    if scale is not None and not bool(torch.isfinite(rows).all()):
        _mark_overflow()  # after the reduction, so that every rank agrees
    if not overflowed():
        _check_rows(batch, inputs, rows, features)
    return rows, span


class LossWeighting(Strategy):
    """A strategy that turns the loss vector into weights; the update is ``sum(w_i * L_i)``.

    Subclasses implement :meth:`loss_weights` and, when the paper's scalar objective is not the
    weighted sum itself, :meth:`objective`. The weights must be the gradient of the objective with
    respect to the losses (the conformance kit checks this), so ``s(losses)`` has the paper's value
    and the paper's gradient.

    Learned per-task parameters (uncertainty's log-variances, say) are declared with
    :meth:`add_learned_parameter`. They are trained on the gradient of :meth:`objective` with the
    strategy's own :class:`TaskParameterOptimizer`, whenever the strategy is in training mode,
    grad mode is on and the losses carry a graph: in ``backward`` after the model's backward
    succeeded, and in ``forward`` right away. Nobody has to add them to the model's optimizer, and
    their ``.grad`` stays ``None``, so a model optimizer that holds them by accident leaves them
    alone.
    """

    def __init__(self, tasks: Sequence[str]) -> None:
        super().__init__(tasks)
        self._learned: dict[str, TaskParameterOptimizer] = {}

    def add_learned_parameter(
        self,
        name: str,
        initial: Tensor,
        *,
        optimizer: Literal["adam", "sgd"] = "adam",
        lr: float,
        weight_decay: float = 0.0,
    ) -> nn.Parameter:
        """Register a per-task parameter (dimension 0 = tasks) trained by its own optimizer."""
        # In the default dtype, as nn.Module parameters are (its optimizer's moments are too).
        parameter = nn.Parameter(initial.detach().clone().to(torch.get_default_dtype()))
        self.register_parameter(name, parameter)
        updater = TaskParameterOptimizer(
            tuple(initial.shape), kind=optimizer, lr=lr, weight_decay=weight_decay
        )
        self.add_module(f"{name}_optimizer", updater)
        self._learned[name] = updater
        return parameter

    # ----------------------------------------------------------------- to implement
    def loss_weights(self, losses: Tensor, index: Tensor) -> Tensor:
        """Weights for the present tasks (``losses`` detached, ``index`` their positions)."""
        raise NotImplementedError

    def objective(self, losses: Tensor, index: Tensor) -> Tensor:
        """The paper's scalar objective of the (detached) losses and the learned parameters."""
        return (self.loss_weights(losses, index) * losses).sum()

    def extras(self, index: Tensor) -> dict[str, Tensor]:
        """Per-task values to report besides losses and weights (present tasks only)."""
        return {}

    # ----------------------------------------------------------------- shared mechanics
    def forward(self, losses: Mapping[str, Tensor]) -> Tensor:
        """The combined loss: the objective's value, with the gradient ``sum(w_i * grad L_i)``."""
        batch = self.gather(losses)
        if self.needs_grads:
            self._refuse_training_combination(batch)
        with self.transaction():
            total, _, commit = self._combine(batch)
            commit()
        return total

    def backward(
        self,
        losses: Mapping[str, Tensor],
        *,
        shared_params: Iterable[Tensor] | None = None,
        features: Tensor | Sequence[Tensor] | None = None,
        scaler: torch.amp.GradScaler | None = None,
    ) -> StepReport:
        """Backward of the combined loss. ``shared_params``/``features`` are accepted and unused,
        so that switching to a gradient-level strategy changes no call site."""
        batch = self.gather(losses)
        self._require_graph(batch)
        with self.transaction():
            total, weights, commit = self._combine(batch)
            scaled_backward(total, scaler)
            commit()  # undone by the transaction if the backward overflowed
        return self.report(batch, weights)

    def report(self, batch: TaskLosses, weights: Tensor) -> StepReport:
        return StepReport(batch.names, batch.values.detach(), weights, self.extras(batch.index))

    def _learning(self, batch: TaskLosses) -> bool:
        return bool(self._learned) and self.training and batch.has_graph and torch.is_grad_enabled()

    def _combine(self, batch: TaskLosses) -> tuple[Tensor, Tensor, Callable[[], None]]:
        """Return (total, weights, commit): commit() applies the learned parameters' update."""
        values, index = batch.values, batch.index
        detached = values.detach()
        commit: Callable[[], None] = _nothing
        if self._learning(batch):
            names = list(self._learned)
            with torch.enable_grad():
                objective = self.objective(detached, index)
                grads = torch.autograd.grad(
                    objective, [getattr(self, n) for n in names], materialize_grads=True
                )
            value = objective.detach()

            def commit() -> None:
                for name, grad in zip(names, grads):
                    self._learned[name].step(getattr(self, name), grad, batch.mask)

        else:
            with torch.no_grad():
                value = self.objective(detached, index)
        with torch.no_grad():
            weights = self.loss_weights(detached, index).to(values.dtype)
        # Same value as the objective, gradient sum_i w_i * grad L_i.
        total = value.to(values.dtype) + (weights * (values - detached)).sum()
        return total, weights, commit


def _nothing() -> None:
    return None


class GradientAggregation(Strategy):
    """A strategy that turns per-task gradients into one update direction.

    Most methods are a combination of the task gradients with weights computed from the Gramian
    ``G = J Jᵀ``: implement :meth:`gramian_weights`. ``backward`` then computes the weights and
    finishes with one backward of ``sum(w_i * L_i)`` through the normal graph, so heads get their
    task's weighted gradient and the shared parameters ``Σ w_i g_i``. A method whose output is not
    such a combination (GradDrop) overrides :meth:`aggregate` instead; ``backward`` then writes
    the aggregated vector into the shared tensors' gradient.

    With ``features=`` the Jacobian is taken w.r.t. the shared representation (MGDA-UB of
    Sener & Koltun, 2018): far cheaper, and an approximation of the parameter Jacobian.

    **Per-step problems that can fail.** A method whose weights solve a problem that may have no
    solution or may not converge (Nash-MTL at a Pareto front, FairGrad with opposite gradients,
    an iterative solver at its iteration cap) takes an ``on_failure`` argument, hands it to
    :meth:`add_failure_policy` in its constructor and computes its weights with
    :meth:`solved`. ``on_failure="reuse"`` then takes the previous step's solution when the
    solver raises :class:`SolverError` (equal weights when a present task has none yet);
    ``"raise"`` lets the error end the step, with nothing changed. A fallback is never silent:
    the first one warns, and the step report carries ``failed`` (1 in a step that fell back)
    and ``failures`` (the running count, a buffer saved with the state), which
    ``report.to_dict()`` includes.
    """

    needs_grads: ClassVar[bool] = True
    last_weights: Tensor
    has_last_weights: Tensor
    failures: Tensor

    on_failure: OnFailure | None = None  # None: the strategy's weights cannot fail

    def add_failure_policy(self, on_failure: OnFailure) -> None:
        """Declare that this strategy's per-step problem can fail, and how to handle a failure.

        Registers the state the policy needs: ``last_weights`` (the last solution per task),
        ``has_last_weights`` and ``failures`` (the number of fallbacks so far).
        """
        if on_failure not in ("reuse", "raise"):
            raise StrategyError(f"on_failure must be 'reuse' or 'raise', got {on_failure!r}")
        self.on_failure = on_failure
        self._warned_fallback = False
        count = len(self.tasks)
        self.register_buffer("last_weights", torch.zeros(count))
        self.register_buffer("has_last_weights", torch.zeros(count, dtype=torch.bool))
        self.register_buffer("failures", torch.zeros((), dtype=torch.long))

    def solved(
        self, solve: Callable[[], Tensor], index: Tensor, *, equal: Literal["mean", "sum"] = "mean"
    ) -> Tensor:
        """``solve()``, this step's weights of the present tasks ``index``, under ``on_failure``.

        A solution is stored for the next fallback. On :class:`SolverError` (or a linear-algebra
        failure) with ``on_failure="reuse"``: :meth:`previous_weights`, counted in
        ``failures``; the first fallback of a strategy warns. The solver's own host sync
        reported the failure, so the fallback adds none.
        """
        try:
            with _solver_errors(self):
                weights = solve()
        except SolverError as error:
            if self.on_failure != "reuse":
                raise
            with torch.no_grad():
                self.failures += 1
            if not self._warned_fallback:
                self._warned_fallback = True
                warnings.warn(
                    f"{type(self).__name__} takes the previous step's weights "
                    f"(on_failure='reuse'): {error}. Shown once; the step report counts every "
                    "fallback ('failures'). Pass on_failure='raise' to stop instead.",
                    RuntimeWarning,
                    stacklevel=2,
                )
            return self.previous_weights(index, equal=equal)
        if self.on_failure is not None:
            with torch.no_grad():
                self.last_weights[index] = weights.detach().to(self.last_weights.dtype)
                self.has_last_weights[index] = True
        return weights

    def previous_weights(self, index: Tensor, *, equal: Literal["mean", "sum"] = "mean") -> Tensor:
        """The last stored weights of the tasks ``index``; equal weights (``1/k`` each for
        ``"mean"``, 1 for ``"sum"``) if any of them has none yet. No host sync."""
        stored = self.last_weights[index]
        first = torch.full_like(stored, 1.0 / index.numel() if equal == "mean" else 1.0)
        return torch.where(self.has_last_weights[index].all(), stored, first)

    def _failure_scalars(self, before: Tensor | None) -> dict[str, Tensor]:
        if before is None:
            return {}
        return {"failed": (self.failures > before).float(), "failures": self.failures.clone()}

    def _failure_count(self) -> Tensor | None:
        return self.failures.clone() if self.on_failure is not None else None

    # ----------------------------------------------------------------- to implement
    def gramian_weights(self, gramian: Tensor, losses: Tensor, index: Tensor) -> Tensor:
        """Weights of the present tasks from their Gramian ``[k, k]`` and (detached) losses."""
        raise NotImplementedError

    @classmethod
    def combines_gradients(cls) -> bool:
        return cls.gramian_weights is not GradientAggregation.gramian_weights

    def aggregate(self, jacobian: Tensor, losses: Tensor | None = None) -> Tensor:
        """One update direction ``[P]`` from the Jacobian ``[T, P]`` (rows in ``tasks`` order)."""
        if not isinstance(jacobian, Tensor) or jacobian.dim() != 2:
            raise StrategyError("jacobian must be a 2-D tensor [tasks, parameters]")
        if jacobian.shape[0] != len(self.tasks):
            raise StrategyError(
                f"jacobian has {jacobian.shape[0]} rows for tasks {list(self.tasks)}"
            )
        if not jacobian.is_floating_point():
            raise StrategyError(f"jacobian must be floating point, got {jacobian.dtype}")
        if losses is None:
            losses = torch.ones(len(self.tasks), dtype=jacobian.dtype, device=jacobian.device)
        elif not isinstance(losses, Tensor) or losses.shape != (len(self.tasks),):
            shape = tuple(losses.shape) if isinstance(losses, Tensor) else type(losses).__name__
            raise StrategyError(f"losses must be a tensor [{len(self.tasks)}], got {shape}")
        elif losses.device != jacobian.device:
            raise StrategyError(f"losses are on {losses.device}, the jacobian on {jacobian.device}")
        if not torch.isfinite(jacobian).all():
            raise StrategyError("jacobian holds NaN or infinite entries")
        _check_gramian_range(jacobian, self.tasks)
        index, _ = self._index_and_mask(self.tasks, jacobian.device)
        with self.transaction(), _solver_errors(self):
            return self._aggregate_rows(jacobian, losses, index)

    def _aggregate_rows(
        self,
        jacobian: Tensor,
        losses: Tensor,
        index: Tensor,
        features: Sequence[Tensor] | None = None,
    ) -> Tensor:
        """The direction from the rows; ``features`` are the tensors the rows were taken w.r.t.
        on the ``features=`` path (``None`` otherwise), for methods that need them (GradDrop)."""
        weights = self.gramian_weights(gramian(jacobian), losses, index)
        return weights.to(jacobian.dtype) @ jacobian

    # ----------------------------------------------------------------- shared mechanics
    def forward(self, losses: Mapping[str, Tensor]) -> Tensor:
        """Evaluation only: the plain sum of the losses (training needs ``backward``)."""
        batch = self.gather(losses)
        self._refuse_training_combination(batch)
        return batch.values.sum()

    def backward(
        self,
        losses: Mapping[str, Tensor],
        *,
        shared_params: Iterable[Tensor] | None = None,
        features: Tensor | Sequence[Tensor] | None = None,
        scaler: torch.amp.GradScaler | None = None,
    ) -> StepReport:
        batch = self.gather(losses)
        self._require_graph(batch)
        inputs = self._grad_inputs(shared_params, features)
        before = self._failure_count()
        with self.transaction():
            detached = batch.values.detach()
            if self.combines_gradients() and _plain_parameters(batch, inputs):
                scale = _scale_factor(scaler, batch.values.device)
                # Gramian without the Jacobian where linear layers make that cheaper, and never a
                # second backward through the trunk (taskbalance.jacobian.gramian_backward).
                if scale is not None:
                    step = _STEP.get()
                    if step is not None:
                        step.watch(batch.values)  # before any backward, while the graph is whole

                def weights_of(matrix: Tensor) -> Tensor:
                    if scale is not None and not bool(torch.isfinite(matrix).all()):
                        _mark_overflow()  # GradScaler skips this step: NaN weights, as below
                        return torch.full_like(detached, math.nan)
                    _check_squared(batch, inputs, matrix.diagonal(), features=False)
                    with _solver_errors(self):
                        return self.gramian_weights(matrix, detached, batch.index)

                weights = gramian_backward(batch.values, inputs, weights_of, scale=scale)
                weights = weights.to(batch.values.dtype)
            else:
                weights = self._backward_from_rows(batch, inputs, scaler, features is not None)
        return StepReport(batch.names, detached, weights, scalars=self._failure_scalars(before))

    def _backward_from_rows(
        self,
        batch: TaskLosses,
        inputs: Sequence[Tensor],
        scaler: torch.amp.GradScaler | None,
        features: bool,
    ) -> Tensor:
        """The step from the per-task rows (features, DDP, half precision, or a method that is
        not a combination); returns the weights to report."""
        detached = batch.values.detach()
        rows, (start, stop) = _per_task_rows(batch, inputs, scaler, features)
        if overflowed():
            # GradScaler will skip this step: compute nothing, and make every gradient say
            # so (NaN) whatever the weights would have been. The report's weights are NaN.
            weights = torch.full_like(detached, math.nan)
            scaled_backward((weights * batch.values).sum(), scaler)
            return weights
        if self.combines_gradients():
            with _solver_errors(self):
                weights = self.gramian_weights(gramian(rows), detached, batch.index)
            weights = weights.detach().to(batch.values.dtype)
            scaled_backward((weights * batch.values).sum(), scaler)
            return weights
        with _solver_errors(self):
            direction = self._aggregate_rows(
                rows, detached, batch.index, inputs if features else None
            )
        if stop - start != direction.shape[0]:
            # features under DDP: this rank's block; DDP's average divides by the ranks
            direction = direction[start:stop] * distributed.world_size(batch.group)
        if _plain_parameters(batch, inputs):
            # The shared parameters get the direction; only the heads are backpropagated.
            scale = _scale_factor(scaler, batch.values.device)
            backward_with_direction(batch.values.sum(), inputs, direction, scale=scale)
        else:
            _backward_replacing(batch.values.sum(), inputs, direction, scaler)
        return torch.ones_like(detached)


@contextlib.contextmanager
def _solver_errors(strategy: Strategy) -> Iterator[None]:
    """A linear-algebra failure on a degenerate Jacobian becomes a StrategyError naming it."""
    try:
        yield
    except torch.linalg.LinAlgError as error:
        raise SolverError(
            f"{type(strategy).__name__} could not compute its weights from this Jacobian "
            f"(degenerate or ill-conditioned Gramian): {error}"
        ) from error


def _check_gramian_range(rows: Tensor, names: Sequence[str]) -> None:
    """Refuse rows whose Gramian overflows (``‖g_i‖²`` bounds every entry of ``G``)."""
    squared = rows.square().sum(dim=1)
    finite = torch.isfinite(squared)
    if not bool(finite.all()):
        bad = names[finite.tolist().index(False)]
        raise StrategyError(
            f"the gradient of task {bad!r} is not finite or too large: its squared norm "
            f"overflows {rows.dtype} (scale that loss down)"
        )


def _plain_parameters(batch: TaskLosses, inputs: Sequence[Tensor]) -> bool:
    """Whether the inputs are leaf tensors (parameters) on the losses' device, in float32/float64,
    in one process: then the Gramian and the finish of taskbalance.jacobian apply as they are."""
    device = batch.values.device
    return (
        batch.group is None
        and batch.values.dtype not in _HALF
        and all(t.is_leaf and t.device == device and t.dtype not in _HALF for t in inputs)
    )


def _check_squared(
    batch: TaskLosses, inputs: Sequence[Tensor], squared: Tensor, features: bool
) -> None:
    """:func:`_check_rows` from the squared row norms (the Gramian's diagonal)."""
    healthy = torch.cat([torch.isfinite(squared), squared > 0])
    if bool(healthy.all()):
        return
    finite = torch.isfinite(squared)
    if not bool(finite.all()):
        bad = batch.names[finite.tolist().index(False)]
        raise StrategyError(
            f"the gradient of task {bad!r} is not finite or too large: its squared norm "
            f"overflows {squared.dtype} (scale that loss down)"
        )
    argument = "features" if features else "shared_params"
    for position in (squared == 0).nonzero().reshape(-1).tolist():
        if not _task_reaches(batch.values, position, inputs):
            raise StrategyError(
                f"the loss of task {batch.names[position]!r} does not depend on any tensor of "
                f"{argument}; pass tensors that every present task reaches"
            )


def _check_rows(batch: TaskLosses, inputs: Sequence[Tensor], rows: Tensor, features: bool) -> None:
    """One host sync: the Gramian must not overflow, and every task must reach ``inputs``."""
    squared = rows.square().sum(dim=1)
    healthy = torch.cat([torch.isfinite(squared), squared > 0])
    if bool(healthy.all()):
        return
    _check_gramian_range(rows, batch.names)
    argument = "features" if features else "shared_params"
    for position in (squared == 0).nonzero().reshape(-1).tolist():
        # A zero row is legitimate (a dead ReLU, an exact optimum) unless the task's loss does
        # not depend on the inputs at all: then the caller passed the wrong tensors.
        if not _task_reaches(batch.values, position, inputs):
            raise StrategyError(
                f"the loss of task {batch.names[position]!r} does not depend on any tensor of "
                f"{argument}; pass tensors that every present task reaches"
            )


def _task_reaches(values: Tensor, position: int, inputs: Sequence[Tensor]) -> bool:
    """Whether entry ``position`` of the stacked losses depends on any of ``inputs``."""
    stack = values.grad_fn
    if stack is None or type(stack).__name__ != "StackBackward0":
        return True  # not built by gather: assume it does
    targets = {id(t.grad_fn) for t in inputs if t.grad_fn is not None}
    leaves = {id(t) for t in inputs if t.grad_fn is None}
    seen: set[int] = set()
    nodes = [stack.next_functions[position][0]]
    while nodes:
        node = nodes.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        variable = getattr(node, "variable", None)
        if id(node) in targets or (variable is not None and id(variable) in leaves):
            return True
        nodes.extend(next_node for next_node, _ in node.next_functions)
    return False


def _backward_replacing(
    total: Tensor, inputs: Sequence[Tensor], direction: Tensor, scaler: torch.amp.GradScaler | None
) -> None:
    """Backward of ``total`` with the gradient reaching ``inputs`` replaced by ``direction``."""
    scale = _scale_factor(scaler, direction.device)
    if scale is not None:
        direction = direction * scale
    pieces = direction.split([t.numel() for t in inputs])
    handles = [
        tensor.register_hook(
            lambda _grad, piece=piece, tensor=tensor: piece.view_as(tensor).to(tensor.dtype)
        )
        for tensor, piece in zip(inputs, pieces)
    ]
    try:
        scaled_backward(total, scaler)
    finally:
        for handle in handles:
            handle.remove()
