"""Per-task optimizers and learning rates: :class:`TaskOptimizers`.

The popular recipe for "a different optimizer per task" is::

    class_loss.backward(retain_graph=True)
    optimizer.step()
    regress_loss.backward()
    optimizer.step()

It breaks as soon as the trunk has two layers: the first ``step()`` changes, in place, weights
that the second backward still needs, and autograd raises "one of the variables needed for
gradient computation has been modified by an inplace operation". :class:`TaskOptimizers` does
what the recipe meant, in either of its two readings:

* ``mode="simultaneous"``: every task's gradient is taken at the same parameters from one forward
  graph; then each task's optimizer applies only its own task's gradient. For SGD the update is
  ``θ − lr_cls·∇L_cls(θ) − lr_reg·∇L_reg(θ)``.
* ``mode="sequential"``: ``step(closure)`` recomputes the losses between the tasks' updates:
  ``θ₁ = θ₀ − lr_cls·∇L_cls(θ₀)``, then ``θ₂ = θ₁ − lr_reg·∇L_reg(θ₁)``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Literal

import torch
from torch import Tensor
from torch.optim import Optimizer

from taskbalance.errors import StrategyError
from taskbalance.registry import create_strategy
from taskbalance.report import StepReport
from taskbalance.strategy import Strategy
from taskbalance.validation import check_finite, validate_losses

__all__ = ["TaskOptimizers"]

Losses = Mapping[str, Tensor]
Mode = Literal["simultaneous", "sequential"]


def _flat_params(optimizer: Optimizer) -> list[Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"]]


def _clone_tree(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.detach().clone()
    if isinstance(value, dict):
        return {k: _clone_tree(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clone_tree(v) for v in value]
    return value


class TaskOptimizers(Mapping[str, Optimizer]):
    """One optimizer per task: each applies its own task's gradient (the separate-backward path).

    ``optimizers`` maps each task to its optimizer (any type, any learning rate). The mapping
    order is the order of the tasks (sequential mode updates them in this order).

    ``mode="simultaneous"``: :meth:`backward` takes every task's gradient at the same parameters
    from one forward graph (one ``torch.autograd.grad`` per task, over the parameters of that
    task's optimizer) and keeps them; :meth:`step` then has each task's optimizer apply only its
    own task's gradient. A parameter held by several tasks' optimizers receives each optimizer's
    update computed at the same point, so the result does not depend on the order of the tasks;
    for SGD it is ``θ − Σ_t lr_t ∇L_t(θ)``. A parameter that a task's loss does not reach has no
    gradient for that task, so that task's optimizer skips it: no momentum, no weight decay.

    ``mode="sequential"``: :meth:`step` takes a closure that returns the losses; it is called
    before each task's update, so task ``t`` steps on its loss at the parameters left by the tasks
    before it (what the article's code meant).

    The research layout: one optimizer for the shared trunk driven by a strategy, one optimizer
    per task head. Give the trunk's optimizer as ``shared=`` and a strategy (a
    :class:`~taskbalance.Strategy` or a registry name, default ``"equal"``) as ``strategy=``;
    ``backward`` then also runs ``strategy.backward(losses, shared_params=<the trunk's
    parameters>)`` (or ``features=``), which fills the trunk's ``.grad``, and ``step`` steps the
    trunk's optimizer too. The heads' optimizers apply the gradient of their task's own
    (unweighted) loss: their learning rate sets the scale. A parameter may not be in both
    ``shared`` and a task's optimizer.

        >>> import torch, taskbalance as tb
        >>> _ = torch.manual_seed(0)
        >>> trunk = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU())
        >>> heads = torch.nn.ModuleDict({"cls": torch.nn.Linear(8, 3),
        ...                              "reg": torch.nn.Linear(8, 1)})
        >>> opt = tb.TaskOptimizers(
        ...     {"cls": tb.make_optimizer("lamb", heads["cls"].parameters(), lr=1e-2),
        ...      "reg": tb.make_optimizer("sgd", heads["reg"].parameters(), lr=1e-1, momentum=0.9)},
        ...     shared=tb.make_optimizer("adam", trunk.parameters(), lr=1e-3),
        ...     strategy="uncertainty")
        >>> schedulers = [torch.optim.lr_scheduler.StepLR(opt["cls"], step_size=10),
        ...               torch.optim.lr_scheduler.ExponentialLR(opt["reg"], gamma=0.9)]
        >>> x, y, t = torch.randn(16, 4), torch.randint(0, 3, (16,)), torch.randn(16, 1)
        >>> for _ in range(3):
        ...     z = trunk(x)
        ...     losses = {"cls": torch.nn.functional.cross_entropy(heads["cls"](z), y),
        ...               "reg": torch.nn.functional.mse_loss(heads["reg"](z), t)}
        ...     opt.zero_grad()
        ...     report = opt.backward(losses)
        ...     _ = opt.step()
        ...     for scheduler in schedulers:
        ...         scheduler.step()
        >>> sorted(report.to_dict(prefix="train/"))
        ['train/loss/cls', 'train/loss/reg', 'train/weight/cls', 'train/weight/reg']
        >>> round(opt["reg"].param_groups[0]["lr"], 4)
        0.0729

    Mixed precision: ``backward(losses, scaler=scaler)`` takes the gradients of the scaled
    losses; ``step()`` unscales them (``scaler.unscale_`` on every optimizer) and, if any of
    them holds an inf or NaN, skips every optimizer's step (one decision for the whole set,
    where ``GradScaler`` alone decides per optimizer); call ``scaler.update()`` afterwards as
    usual. Losses that are NaN or infinite raise :class:`~taskbalance.NonFiniteLossError` naming
    the task, with nothing updated (in sequential mode the updates already made in the step are
    rolled back).

    The per-task gradients live here between ``backward`` and ``step``, not in ``.grad`` (a
    parameter shared by two tasks has two): the task optimizers' parameters have ``.grad`` set
    only while their optimizer steps, and ``None`` otherwise. ``backward`` accumulates into the
    kept gradients (gradient accumulation works); ``step`` consumes them; ``zero_grad`` drops
    them. :meth:`task_gradients` shows them.
    """

    def __init__(
        self,
        optimizers: Mapping[str, Optimizer],
        mode: Mode = "simultaneous",
        *,
        shared: Optimizer | None = None,
        strategy: Strategy | str | None = None,
    ) -> None:
        if not isinstance(optimizers, Mapping) or not optimizers:
            raise StrategyError("optimizers must be a non-empty mapping task -> optimizer")
        if mode not in ("simultaneous", "sequential"):
            raise StrategyError(f"mode must be 'simultaneous' or 'sequential', got {mode!r}")
        for task, optimizer in optimizers.items():
            if not isinstance(task, str) or not task:
                raise StrategyError(f"task names must be non-empty strings, got {task!r}")
            _check_optimizer(optimizer, f"optimizer of task {task!r}")
        self._optimizers: dict[str, Optimizer] = dict(optimizers)
        self.mode: Mode = mode
        self.tasks: tuple[str, ...] = tuple(optimizers)
        if shared is None and strategy is not None:
            raise StrategyError("strategy= drives the shared optimizer: give shared= as well")
        if shared is not None:
            if mode != "simultaneous":
                raise StrategyError("shared= and strategy= need mode='simultaneous'")
            _check_optimizer(shared, "shared optimizer")
            trunk = {id(p) for p in _flat_params(shared)}
            for task, optimizer in self._optimizers.items():
                if any(id(p) in trunk for p in _flat_params(optimizer)):
                    raise StrategyError(
                        f"optimizer of task {task!r} holds parameters of the shared optimizer; "
                        "a parameter belongs either to the shared trunk or to the tasks"
                    )
            if strategy is None:
                strategy = "equal"
            if isinstance(strategy, str):
                strategy = create_strategy(strategy, self.tasks)
            if not isinstance(strategy, Strategy):
                raise StrategyError(f"strategy must be a Strategy or a name, got {strategy!r}")
            if set(strategy.tasks) != set(self.tasks):
                raise StrategyError(
                    f"strategy tasks {list(strategy.tasks)} differ from the optimizers' tasks "
                    f"{list(self.tasks)}"
                )
        self.shared = shared
        self.strategy: Strategy | None = strategy  # type: ignore[assignment]
        self._grads: dict[str, list[Tensor | None]] = {}
        self._scaler: torch.amp.GradScaler | None = None
        self._report: StepReport | None = None

    # ----------------------------------------------------------------- Mapping
    def __getitem__(self, task: str) -> Optimizer:
        if task not in self._optimizers:
            raise KeyError(f"unknown task {task!r}; tasks are {list(self.tasks)}")
        return self._optimizers[task]

    def __iter__(self) -> Iterator[str]:
        return iter(self._optimizers)

    def __len__(self) -> int:
        return len(self._optimizers)

    def __repr__(self) -> str:
        inner = ", ".join(f"{t!r}: {type(o).__name__}" for t, o in self._optimizers.items())
        extra = ""
        if self.shared is not None:
            extra = f", shared={type(self.shared).__name__}, strategy={self.strategy!r}"
        return f"TaskOptimizers({{{inner}}}, mode={self.mode!r}{extra})"

    # ----------------------------------------------------------------- gradients
    def zero_grad(self, set_to_none: bool = True) -> None:
        """Drop the kept per-task gradients and zero every optimizer's gradients."""
        self._grads = {}
        self._scaler = None
        for optimizer in self._all_optimizers():
            optimizer.zero_grad(set_to_none=set_to_none)

    def task_gradients(self, task: str) -> list[Tensor | None]:
        """The kept gradient of ``task`` for each parameter of its optimizer (``None``:
        not reached), in ``param_groups`` order; scaled if ``backward`` got a scaler."""
        if task not in self._optimizers:
            raise StrategyError(f"unknown task {task!r}; tasks are {list(self.tasks)}")
        return list(self._grads.get(task, [None] * len(_flat_params(self._optimizers[task]))))

    def backward(
        self,
        losses: Losses,
        *,
        scaler: torch.amp.GradScaler | None = None,
        features: Tensor | Sequence[Tensor] | None = None,
        retain_graph: bool = False,
    ) -> StepReport:
        """Take every present task's gradient at the current parameters and keep it.

        ``losses`` maps tasks to scalar losses from one forward pass; it may hold a subset of the
        tasks (partial labels): the absent tasks' optimizers do not step. With ``shared=``, the
        strategy's ``backward`` fills the trunk's ``.grad``; ``features=`` (the trunk's output)
        is passed to it instead of the trunk's parameters (MGDA-UB style). The graph is freed
        unless ``retain_graph``. Returns the losses and, with a strategy, its weights (else 1).
        """
        if self.mode != "simultaneous":
            raise StrategyError(
                "mode='sequential' takes its losses from step(closure), not backward(losses)"
            )
        names, values = self._gather(losses, need_graph=True)
        active = _enabled(scaler)
        run_strategy = self.strategy is not None
        fresh: dict[str, list[Tensor | None]] = {}
        for position, task in enumerate(names):
            params = _flat_params(self._optimizers[task])
            loss = losses[task] if active is None else active.scale(losses[task])
            keep = retain_graph or run_strategy or position < len(names) - 1
            grads = torch.autograd.grad(loss, params, retain_graph=keep, allow_unused=True)
            if all(g is None for g in grads):
                raise StrategyError(
                    f"loss of task {task!r} reaches none of the parameters of its optimizer"
                )
            fresh[task] = _unaliased(grads)
        weights = torch.ones_like(values.detach())
        if self.strategy is not None:
            assert self.shared is not None
            present = {t: losses[t] for t in names}
            if features is None:
                report = self.strategy.backward(
                    present, shared_params=_flat_params(self.shared), scaler=scaler
                )
            else:
                report = self.strategy.backward(present, features=features, scaler=scaler)
            by_task = report.weights
            weights = torch.stack([by_task[t].detach().to(values.dtype) for t in names])
            # The strategy's backward also reached the heads; their gradients are kept here.
            for task in names:
                for p in _flat_params(self._optimizers[task]):
                    p.grad = None
        elif features is not None:
            raise StrategyError("features= is passed to the strategy: it needs shared=")
        self._commit(fresh, scaler)
        self._report = StepReport(names, values.detach(), weights)
        return self._report

    def _commit(
        self, fresh: dict[str, list[Tensor | None]], scaler: torch.amp.GradScaler | None
    ) -> None:
        if self._grads and scaler is not self._scaler:
            raise StrategyError(
                "backward got a different scaler than the previous backward of this step"
            )
        for task, grads in fresh.items():
            kept = self._grads.get(task)
            if kept is None:
                self._grads[task] = grads
                continue
            for i, grad in enumerate(grads):
                if grad is None:
                    continue
                current = kept[i]
                kept[i] = grad if current is None else current + grad
        self._scaler = scaler

    # ----------------------------------------------------------------- stepping
    def step(
        self,
        closure: Callable[[], Losses] | None = None,
        *,
        scaler: torch.amp.GradScaler | None = None,
    ) -> StepReport:
        """Apply the kept gradients (simultaneous) or run the chain of updates (sequential).

        Sequential: ``closure()`` returns the losses (a mapping task -> scalar) at the current
        parameters; it is called once before each task's update, under grad mode; ``scaler=`` is
        the GradScaler (simultaneous mode takes it in :meth:`backward`). Returns the step's
        report; with an enabled scaler its ``extras["skipped"]`` is 1 where the step was skipped.
        """
        if closure is not None and not callable(closure):
            raise StrategyError(
                f"step() takes a closure, a function that recomputes the losses at the current "
                f"parameters (mode='sequential'), got a {type(closure).__name__}; with losses "
                "already computed use mode='simultaneous': backward(losses), then step()"
            )
        if self.mode == "sequential":
            if closure is None:
                raise StrategyError("mode='sequential' needs step(closure), closure() -> losses")
            return self._sequential(closure, scaler)
        if closure is not None:
            raise StrategyError("mode='simultaneous' takes no closure: call backward(losses)")
        if scaler is not None:
            raise StrategyError("mode='simultaneous' takes the scaler in backward(losses, scaler=)")
        if self._report is None:
            raise StrategyError("step() needs backward(losses) first")
        report = self._report
        scaler = self._scaler
        tasks = [t for t in self.tasks if t in self._grads]
        skipped = False
        try:
            if scaler is not None and scaler.is_enabled():
                found: list[Tensor] = []
                for task in tasks:  # one at a time: tasks' optimizers may share parameters
                    self._assign(task)
                    found += _unscale(scaler, self._optimizers[task])
                if self.shared is not None:
                    found += _unscale(scaler, self.shared)
                skipped = _any_found(found)
                report = StepReport(
                    report.tasks,
                    report.loss_values,
                    report.weight_values,
                    {"skipped": torch.full_like(report.loss_values, float(skipped))},
                )
            if not skipped:
                self._apply(tasks)
        finally:
            for task in tasks:
                for p in _flat_params(self._optimizers[task]):
                    p.grad = None
            self._grads = {}
            self._scaler = None
            self._report = None
        return report

    def _assign(self, task: str) -> list[Tensor]:
        params = _flat_params(self._optimizers[task])
        for p, g in zip(params, self._grads[task]):
            p.grad = g
        return params

    @torch.no_grad()
    def _apply(self, tasks: Sequence[str]) -> None:
        # Parameters held by several present tasks' optimizers: each optimizer computes its update
        # at the same point θ; the updates are summed (order of the tasks does not matter).
        owners: dict[int, int] = {}
        for task in tasks:
            for p in _flat_params(self._optimizers[task]):
                owners[id(p)] = owners.get(id(p), 0) + 1
        multi: dict[int, tuple[Tensor, Tensor, Tensor]] = {}
        for task in tasks:
            for p in _flat_params(self._optimizers[task]):
                if owners[id(p)] > 1 and id(p) not in multi:
                    multi[id(p)] = (p, p.detach().clone(), torch.zeros_like(p))
        for task in tasks:
            params = self._assign(task)
            self._optimizers[task].step()
            mine = [multi[id(p)] for p in params if id(p) in multi]
            if mine:
                current = [m[0] for m in mine]
                start = [m[1] for m in mine]
                torch._foreach_add_([m[2] for m in mine], torch._foreach_sub(current, start))
                torch._foreach_copy_(current, start)
            for p in params:
                p.grad = None
        if multi:
            entries = list(multi.values())
            torch._foreach_add_([m[0] for m in entries], [m[2] for m in entries])
        if self.shared is not None:
            self.shared.step()

    def _sequential(
        self, closure: Callable[[], Losses], scaler: torch.amp.GradScaler | None
    ) -> StepReport:
        optimizers = list(self._optimizers.values())
        params = list({id(p): p for o in optimizers for p in _flat_params(o)}.values())
        # A later task's loss may be NaN after earlier tasks stepped: keep what to roll back to.
        saved_params = [p.detach().clone() for p in params]
        saved_states = [_clone_tree(o.state_dict()) for o in optimizers]
        active = _enabled(scaler)
        names: list[str] = []
        values: list[Tensor] = []
        skipped = False
        try:
            for task in self.tasks:
                with torch.enable_grad():
                    losses = closure()
                present, current = self._gather(losses, need_graph=True)
                if task not in present:
                    continue  # partial labels: this task has no loss in this batch
                loss = losses[task]
                optimizer = self._optimizers[task]
                task_params = _flat_params(optimizer)
                grads = torch.autograd.grad(
                    loss if active is None else active.scale(loss), task_params, allow_unused=True
                )
                if all(g is None for g in grads):
                    raise StrategyError(
                        f"loss of task {task!r} reaches none of the parameters of its optimizer"
                    )
                for p, g in zip(task_params, _unaliased(grads)):
                    p.grad = g
                names.append(task)
                values.append(current[present.index(task)].detach())
                try:
                    if active is not None and _any_found(_unscale(active, optimizer)):
                        skipped = True  # GradScaler's skip, for the whole chain
                        break
                    optimizer.step()
                finally:
                    for p in task_params:
                        p.grad = None
        except BaseException:
            self._restore(optimizers, params, saved_params, saved_states)
            raise
        if skipped:
            self._restore(optimizers, params, saved_params, saved_states)
        elif not names:
            raise StrategyError("closure returned no loss for any task")
        loss_values = torch.stack(values) if values else torch.zeros(0)
        extras = {} if active is None else {"skipped": torch.full_like(loss_values, float(skipped))}
        return StepReport(tuple(names), loss_values, torch.ones_like(loss_values), extras)

    @staticmethod
    @torch.no_grad()
    def _restore(
        optimizers: Sequence[Optimizer],
        params: Sequence[Tensor],
        saved_params: Sequence[Tensor],
        saved_states: Sequence[dict[str, Any]],
    ) -> None:
        for p, value in zip(params, saved_params):
            p.copy_(value)
        for optimizer, state in zip(optimizers, saved_states):
            optimizer.load_state_dict(state)

    # ----------------------------------------------------------------- checks
    def _gather(self, losses: Losses, *, need_graph: bool) -> tuple[tuple[str, ...], Tensor]:
        names, parts = validate_losses(losses, self.tasks)
        if need_graph:
            for name, loss in zip(names, parts):
                if not loss.requires_grad:
                    raise StrategyError(
                        f"loss of task {name!r} does not require grad (computed under "
                        "torch.no_grad() or detached?)"
                    )
        values = torch.stack(parts)
        check_finite(names, values)
        return names, values

    def _all_optimizers(self) -> list[Optimizer]:
        extra = [self.shared] if self.shared is not None else []
        return [*self._optimizers.values(), *extra]

    # ----------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Every optimizer's state (and the strategy's); loads with ``weights_only=True``."""
        out: dict[str, Any] = {
            "mode": self.mode,
            "optimizers": {t: o.state_dict() for t, o in self._optimizers.items()},
        }
        if self.shared is not None:
            out["shared"] = self.shared.state_dict()
        if self.strategy is not None:
            out["strategy"] = self.strategy.state_dict()
        return out

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Load a :meth:`state_dict`; the tasks (and shared/strategy parts) must match."""
        if not isinstance(state_dict, Mapping) or "optimizers" not in state_dict:
            raise StrategyError("state_dict has no 'optimizers' entry (not a TaskOptimizers one)")
        saved = state_dict["optimizers"]
        missing = [t for t in self.tasks if t not in saved]
        unknown = [t for t in saved if t not in self._optimizers]
        if missing or unknown:
            raise StrategyError(
                f"state_dict tasks differ: missing {missing}, unknown {unknown}; "
                f"tasks are {list(self.tasks)}"
            )
        for part, own in (("shared", self.shared), ("strategy", self.strategy)):
            if (part in state_dict) != (own is not None):
                raise StrategyError(
                    f"state_dict {'has' if part in state_dict else 'lacks'} "
                    f"a {part!r} entry and this TaskOptimizers "
                    f"{'has none' if own is None else 'has one'}"
                )
        for task, optimizer in self._optimizers.items():
            optimizer.load_state_dict(saved[task])
        if self.shared is not None:
            self.shared.load_state_dict(state_dict["shared"])
        if self.strategy is not None:
            self.strategy.load_state_dict(state_dict["strategy"])
        self._grads = {}
        self._report = None


def _unaliased(grads: Sequence[Tensor | None]) -> list[Tensor | None]:
    """autograd.grad may hand the same tensor to several inputs (the backward of ``a + b``);
    optimizers and ``scaler.unscale_`` write ``.grad`` in place, so each gets its own."""
    seen: set[tuple[int, int, tuple[int, ...]]] = set()  # (data_ptr, offset, shape)
    out: list[Tensor | None] = []
    for grad in grads:
        if grad is not None:
            key = (grad.data_ptr(), int(grad.storage_offset()), tuple(grad.shape))
            if key in seen:
                grad = grad.clone()
            else:
                seen.add(key)
        out.append(grad)
    return out


def _check_optimizer(optimizer: Any, what: str) -> None:
    if not isinstance(optimizer, Optimizer):
        raise StrategyError(f"{what} must be a torch.optim.Optimizer, got {type(optimizer)}")
    if isinstance(optimizer, torch.optim.LBFGS):
        raise StrategyError(
            f"{what} is LBFGS, which re-evaluates a closure inside step(); TaskOptimizers steps "
            "each optimizer on the gradients of its own task"
        )
    if "_optimizer_state_dict_pre_hooks" not in optimizer.__dict__:
        raise StrategyError(
            f"{what} ({type(optimizer).__name__}) never called torch.optim.Optimizer.__init__, so "
            "its state_dict() cannot be saved on current torch; for Lookahead use "
            "tb.make_optimizer('lookahead', params, base='adam', k=5, alpha=0.5, lr=...)"
        )


def _enabled(scaler: torch.amp.GradScaler | None) -> torch.amp.GradScaler | None:
    return scaler if scaler is not None and scaler.is_enabled() else None


def _unscale(scaler: torch.amp.GradScaler, optimizer: Optimizer) -> list[Tensor]:
    """``scaler.unscale_(optimizer)``, which records the inf check ``scaler.update()`` needs;
    returns its found-inf flags (tensors, no sync)."""
    scaler.unscale_(optimizer)
    return list(scaler._found_inf_per_device(optimizer).values())


def _any_found(found: Sequence[Tensor]) -> bool:
    """True if any flag is set: one host sync, as in GradScaler.step."""
    if not found:
        return False
    return bool(torch.stack([f.to(found[0].device).reshape(()) for f in found]).sum() > 0)
