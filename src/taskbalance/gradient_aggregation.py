"""Gradient-level strategies: per-task gradients in, one update direction out."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import ClassVar, Literal

import torch
from torch import Tensor

from taskbalance import distributed
from taskbalance.errors import SolverError, StrategyError
from taskbalance.jacobian import (
    backward_with_direction,
    direction_backward,
    gramian,
    gramian_backward,
    graph_leaves,
    inputs_reached,
    jacobian,
)
from taskbalance.report import StepReport
from taskbalance.solvers import Solution, solver_dtype
from taskbalance.strategy import (
    HALF,
    Strategy,
    check_watched_gradients,
    discarded,
    loss_scale,
    mark_overflow,
    on_overflow,
    require,
    scaled_backward,
    verdict,
    watch,
)
from taskbalance.validation import TaskLosses

__all__ = ["GradientAggregation", "OnFailure", "per_task_jacobian"]

OnFailure = Literal["reuse", "raise"]

_CLIP_EPS = 1e-6  # torch.nn.utils.clip_grad_norm_'s: max_norm / (‖d‖ + 1e-6)


class GradientAggregation(Strategy):
    """A strategy that turns per-task gradients into one update direction.

    Hooks (``losses`` are the detached losses of the present tasks ``[k]``, ``index`` their
    positions in ``self.tasks``):

    * :meth:`gramian_weights`: most methods are a combination of the task gradients with weights
      computed from the Gramian ``G = J Jᵀ``. ``backward`` then computes the weights and
      finishes with one backward of ``sum(w_i * L_i)`` through the normal graph, so heads get
      their task's weighted gradient and the shared parameters ``Σ w_i g_i``;
    * :meth:`aggregate_rows`: a method whose direction is not such a combination (GradDrop,
      MoCo, DB-MTL) implements this instead; ``backward`` then writes the direction into the
      gradient reaching the shared tensors, and the heads get their own task's gradient.
      :meth:`report_weights` gives the weights its report shows;
    * :meth:`reused_weights`: weights known without this step's gradients (Nash-MTL between two
      solves): the engine then takes no per-task gradients;
    * :meth:`transform_losses`: train on an elementwise transform of the losses (DB-MTL's
      ``log(L + ε)``): the per-task gradients are those of the transformed losses;
    * the hooks every strategy has (:meth:`~Strategy.check_losses`,
      :meth:`~Strategy.on_train_step`, :meth:`~Strategy.extras`, :meth:`~Strategy.end_epoch`).

    Base-class options: ``max_norm`` (an instance attribute, 0 = off; Nash-MTL's clip) is
    ``torch.nn.utils.clip_grad_norm_(shared parameters, max_norm)`` of the step's gradient after
    its backward: the shared parameters' gradient ``d`` is multiplied by
    ``min(1, max_norm / (‖d‖ + 1e-6))``, the heads' is not, and the report shows the unclipped
    weights. The shared parameters are ``shared_params``, or on ``features=`` the parameters the
    features are computed from (not the features: their gradient's norm says nothing about the
    parameters'). ``combine`` folds it into the total on ``shared_params`` and refuses it on
    ``features=`` (the backward is the caller's); :meth:`aggregate` clips the direction it
    returns. And the failure policy below.

    With ``features=`` the Jacobian is taken w.r.t. the shared representation (MGDA-UB of
    Sener & Koltun, 2018): far cheaper, and an approximation of the parameter Jacobian.

    **Per-step problems that can fail.** A method whose weights solve a problem that may have no
    solution or may not converge (Nash-MTL at a Pareto front, FairGrad with opposite gradients,
    an iterative solver at its iteration cap) takes an ``on_failure`` argument, hands it to
    :meth:`add_failure_policy` in its constructor and computes its weights with
    :meth:`solved`. ``on_failure="reuse"`` then takes the previous step's solution when the
    solver fails (equal weights when a present task has none yet); ``"raise"`` ends the step
    with :class:`SolverError` at its verdict, with nothing changed. A fallback is never silent:
    the first one warns, and the step report carries ``failed`` (1 in a step that fell back)
    and ``failures`` (the running count, a buffer saved with the state), which
    ``report.to_dict()`` includes. With ``check_finite = False`` every failure falls back (no
    warning: the report's ``failed`` says it).

    **Host syncs.** A step reads the device once, at its verdict: once the weights are known,
    before the final backward (see :class:`~taskbalance.Strategy`). The rows' health (finite,
    and a zero row only for a task that reaches the inputs), a solver's convergence and a
    mixed-precision overflow are device flags until then; an overflowed step computes its
    weights on a harmless Gramian and makes them NaN (so ``GradScaler.step`` skips it) instead of
    branching on the host.
    """

    needs_grads: ClassVar[bool] = True
    last_weights: Tensor
    has_last_weights: Tensor
    failures: Tensor

    on_failure: OnFailure | None = None  # None: the strategy's weights cannot fail
    max_norm: float = 0.0  # > 0: the shared update is clipped to this norm

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
        self.add_state("last_weights", torch.zeros(count))
        self.add_state("has_last_weights", torch.zeros(count, dtype=torch.bool))
        self.add_state("failures", torch.zeros((), dtype=torch.long), per_task=False)

    def solved(
        self,
        solve: Callable[[], Tensor | Solution],
        index: Tensor,
        *,
        equal: Literal["mean", "sum"] = "mean",
    ) -> Tensor:
        """``solve()``, this step's weights of the present tasks ``index``, under ``on_failure``.

        ``solve()`` returns the weights, or a :class:`~taskbalance.solvers.Solution` whose ``ok``
        is read with the step's verdict (never on its own), or raises :class:`SolverError` (a
        failure known on the host, as a linear-algebra error is). On a failure with
        ``on_failure="reuse"``, or any failure with ``check_finite = False``: the
        :meth:`previous_weights`, picked with ``torch.where`` and counted in ``failures``
        without a sync; the first fallback of a strategy warns (with the verdict). With
        ``"raise"``: the verdict raises the solver's error, and the step changes nothing. A
        solution that meets its tolerance is stored for the next fallback.
        """
        reuse = self.on_failure == "reuse" or not self.check_finite
        try:
            with _solver_errors(self):
                answer = solve()
        except SolverError as error:
            if not reuse:
                raise
            with torch.no_grad():
                self.failures += 1
            if not self._warned_fallback:  # with the verdict: not if an earlier check fails
                failed, message = torch.zeros((), dtype=torch.bool, device=index.device), str(error)
                require(failed, lambda: self._warn_fallback(message), advisory=True)
            return self.previous_weights(index, equal=equal)
        if not isinstance(answer, Solution):
            self._store(answer, index, None)
            return answer
        weights, ok, reason = answer.weights, answer.ok.detach(), answer.reason
        self._store(weights, index, ok)
        if not reuse:
            require(ok, lambda: SolverError(reason()))
            return weights
        with torch.no_grad():
            self.failures += (~ok).to(self.failures.dtype)
        if not self._warned_fallback:
            require(ok, lambda: self._warn_fallback(reason()), advisory=True)
        previous = self.previous_weights(index, equal=equal).to(weights.dtype)
        return torch.where(ok, weights, previous)

    def _store(self, weights: Tensor, index: Tensor, ok: Tensor | None) -> None:
        """Keep this step's solution for a later fallback (where ``ok``; no sync)."""
        if self.on_failure is None:
            return
        with torch.no_grad():
            solution = weights.detach().to(self.last_weights.dtype)
            if ok is None:
                self.last_weights[index] = solution
                self.has_last_weights[index] = True
            else:
                self.last_weights[index] = torch.where(ok, solution, self.last_weights[index])
                self.has_last_weights[index] |= ok

    def _warn_fallback(self, reason: str) -> None:
        """The warning of a strategy's first fallback (later ones are counted, not shown)."""
        if self._warned_fallback:
            return
        self._warned_fallback = True
        warnings.warn(
            f"{type(self).__name__} takes the previous step's weights (on_failure='reuse'): "
            f"{reason}. Shown once; the step report counts every fallback ('failures'). Pass "
            "on_failure='raise' to stop instead.",
            RuntimeWarning,
            stacklevel=_caller_level(),
        )

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

    # ----------------------------------------------------------------- hooks
    def gramian_weights(self, gramian: Tensor, losses: Tensor, index: Tensor) -> Tensor:
        """Weights of the present tasks from their Gramian ``[k, k]`` and (detached) losses."""
        raise NotImplementedError

    def aggregate_rows(
        self,
        jacobian: Tensor,
        losses: Tensor,
        index: Tensor,
        features: Sequence[Tensor] | None = None,
    ) -> Tensor:
        """The direction ``[P]`` from the rows ``[k, P]``; ``features`` are the tensors the rows
        were taken w.r.t. on the ``features=`` path (``None`` otherwise), for methods that need
        them (GradDrop). Default: the combination with :meth:`gramian_weights`."""
        weights = self._weights_from_gramian(gramian(jacobian), losses, index, clip=True)
        return weights.to(jacobian.dtype) @ jacobian

    def reused_weights(self, losses: Tensor, index: Tensor) -> Tensor | None:
        """Weights for this step that need no per-task gradients, or ``None`` (default)."""
        return None

    def transform_losses(self, losses: Tensor) -> Tensor:
        """An elementwise, differentiable transform of the losses whose gradients the method
        aggregates (default: none). The engine may call it one task at a time."""
        return losses

    def report_weights(self, losses: Tensor, index: Tensor) -> Tensor | None:
        """The weights a step report shows for a method that implements :meth:`aggregate_rows`
        (read after the step), or ``None`` (default): ones, NaN in a step that mixed precision
        skips."""
        return None

    @classmethod
    def combines_gradients(cls) -> bool:
        return cls.gramian_weights is not GradientAggregation.gramian_weights

    @classmethod
    def _transforms(cls) -> bool:
        return cls.transform_losses is not GradientAggregation.transform_losses

    # ----------------------------------------------------------------- the engine
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
        index, _ = self._index_and_mask(self.tasks, jacobian.device)
        self._engine.gathered = []  # a plain function of the Jacobian: no losses to check
        with self.transaction(), _solver_errors(self):
            # For the step's verdict: finite entries, then a Gramian that does not overflow.
            require(
                torch.isfinite(jacobian).all(),
                lambda: StrategyError("jacobian holds NaN or infinite entries"),
            )
            _require_finite_norms(self.tasks, jacobian.square().sum(dim=1))
            with torch.no_grad():
                self.check_losses(losses, index)
            if self._transforms():
                jacobian, losses = self._transformed_rows(jacobian, losses)
            weights = self.reused_weights(losses, index)
            if weights is None:
                return self.aggregate_rows(jacobian, losses, index)
            return self._clip_by_gramian(weights, gramian(jacobian)).to(jacobian.dtype) @ jacobian

    def forward(self, losses: Mapping[str, Tensor]) -> Tensor:
        """Evaluation only: the plain sum of the losses (training needs ``backward``)."""
        batch = self.gather(losses)
        self._refuse_training_combination(batch)
        self._check_gathered()
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
        inputs = self._grad_inputs(shared_params, features, batch)
        before = self._failure_count()
        detached, index = batch.values.detach(), batch.index
        with self.transaction(self._step_mask(batch)):
            with torch.no_grad():
                self.check_losses(detached, index)
                if batch.training:
                    self.before_train_step(detached, index)
            work = self._transformed(batch)
            reused = self.reused_weights(work.values.detach(), index)
            with self._clipped(inputs, features is not None, scaler):
                if reused is not None:
                    weights = self._backward_reused(work, scaler, reused)
                elif self.combines_gradients() and _plain_parameters(work, inputs):
                    weights = self._backward_gramian(work, inputs, scaler)
                elif features is None and _plain_parameters(work, inputs):
                    weights = self._backward_direction(work, inputs, scaler)
                else:
                    weights = self._backward_from_rows(work, inputs, scaler, features is not None)
            if batch.training:
                verdict()  # settled before the final backward already: on_train_step only
                with torch.no_grad():  # runs in a step that succeeded
                    self.on_train_step(detached, index)
            if reused is None and not self.combines_gradients():
                shown = self.report_weights(detached, index)
                weights = weights if shown is None else shown
        return self._report(batch, weights, before)

    def combine(
        self,
        losses: Mapping[str, Tensor],
        *,
        shared_params: Iterable[Tensor] | None = None,
        features: Tensor | Sequence[Tensor] | None = None,
    ) -> tuple[Tensor, StepReport]:
        """``(total, report)`` with ``total.backward()`` giving what ``backward`` gives (up to
        rounding), for frameworks that call ``backward()`` themselves.

        For a combination the total is ``Σ w_i L_i`` with this step's weights (detached). For a
        method with its own direction ``d`` (:meth:`aggregate_rows`) it is ``Σ L_i + Σ_t ⟨t,
        stopgrad(d − Σ_i g_i)⟩`` over the shared tensors ``t``: their gradient is ``d``, and the
        heads get their task's gradient; not available in a distributed step (use
        ``backward``). No loss scaling: under fp16 autocast use ``backward(scaler=...)``.
        Outside training steps the total is the plain sum, as ``s(losses)``.
        """
        batch = self.gather(losses)
        detached, index = batch.values.detach(), batch.index
        if not batch.training:
            self._check_gathered()
            return batch.values.sum(), self._report(batch, torch.ones_like(detached), None)
        inputs = self._grad_inputs(shared_params, features, batch)
        if features is not None and self.max_norm > 0:
            raise StrategyError(
                f"{type(self).__name__}.combine with features=: max_norm={self.max_norm} clips "
                "the trunk parameters' gradient after the backward, which combine leaves to you; "
                "use backward(losses, features=...), or pass shared_params=, or create the "
                "strategy with max_norm=0 and call torch.nn.utils.clip_grad_norm_ yourself"
            )
        repeated = self._repeated_step(losses)
        if repeated is not None:
            make_total, report = repeated
            return make_total(self._transformed(batch), inputs), report
        before = self._failure_count()
        with self.transaction(self._step_mask(batch)):
            with torch.no_grad():
                self.check_losses(detached, index)
                self.before_train_step(detached, index)
            work = self._transformed(batch)
            make_total, weights = self._combined(work, inputs, features is not None)
            total = make_total(work, inputs)
            verdict()  # on_train_step only in a step that succeeded
            with torch.no_grad():
                self.on_train_step(detached, index)
            if not self.combines_gradients():
                shown = self.report_weights(detached, index)
                weights = weights if shown is None else shown
        report = self._report(batch, weights, before)
        self._remember_step(losses, (make_total, report))
        return total, report

    def _combined(
        self, work: TaskLosses, inputs: Sequence[Tensor], features: bool
    ) -> tuple[Callable[[TaskLosses, Sequence[Tensor]], Tensor], Tensor]:
        """This step's total as a function of the losses and inputs, and its weights."""
        detached = work.values.detach()
        reused = self.reused_weights(detached, work.index)
        if reused is None and not self.combines_gradients():
            if work.group is not None:
                raise StrategyError(
                    f"{type(self).__name__}.combine: a method with its own direction cannot "
                    "hand its update to autograd in a distributed step; use backward"
                )
            rows = per_task_jacobian(work, inputs, None)
            with _solver_errors(self):
                direction = self.aggregate_rows(
                    rows, detached, work.index, inputs if features else None
                )
            if self.max_norm > 0:
                direction = direction * self._clip_factor(direction.square().sum())
            ones = torch.ones_like(detached)
            return _corrected_total(ones, direction - rows.sum(0), inputs), ones
        if reused is not None:
            weights = reused.to(detached.dtype)
        else:
            rows = per_task_jacobian(work, inputs, None)
            with _solver_errors(self):
                weights = self._weights_from_gramian(gramian(rows), detached, work.index)
            weights = weights.detach().to(detached.dtype)
        if self.max_norm == 0:
            return (lambda batch, _tensors: (weights * batch.values).sum()), weights
        # max_norm: the shared tensors get the clipped d = Σ w_i g_i, the heads their unclipped
        # gradient, as from backward
        if reused is not None:  # d from one gradient of the combined loss
            combined = dataclasses.replace(
                work, names=("the combined loss",), values=(weights @ work.values)[None]
            )
            direction = per_task_jacobian(combined, inputs, None)[0]
        else:
            direction = weights.to(rows.dtype) @ rows
        factor = self._clip_factor(direction.square().sum())
        return _corrected_total(weights, (factor - 1) * direction, inputs), weights

    def _report(self, batch: TaskLosses, weights: Tensor, before: Tensor | None) -> StepReport:
        scalars = {**self._failure_scalars(before), **self._step_scalars(batch.values)}
        return StepReport(
            batch.names, batch.values.detach(), weights, self.extras(batch.index), scalars
        )

    def _transformed(self, batch: TaskLosses) -> TaskLosses:
        """The batch with :meth:`transform_losses` applied task by task (so that each task keeps
        its own backward root)."""
        if not self._transforms():
            return batch
        parts = tuple(self.transform_losses(p.reshape(1)).reshape(()) for p in batch.parts)
        return dataclasses.replace(batch, values=torch.stack(parts), parts=parts)

    def _transformed_rows(self, jacobian: Tensor, losses: Tensor) -> tuple[Tensor, Tensor]:
        """Rows and losses of :meth:`aggregate` after :meth:`transform_losses` (chain rule)."""
        with torch.enable_grad():
            point = losses.detach().requires_grad_(True)
            transformed = self.transform_losses(point)
            (slope,) = torch.autograd.grad(transformed.sum(), point)
        return jacobian * slope.to(jacobian.dtype)[:, None], transformed.detach()

    def _weights_from_gramian(
        self, gramian: Tensor, losses: Tensor, index: Tensor, *, clip: bool = False
    ) -> Tensor:
        """:meth:`gramian_weights` (clipped by ``max_norm`` if ``clip``: for :meth:`aggregate`,
        whose rows are the shared tensors' gradients; a step clips after its backward, see
        :meth:`_clipped`), in the Gramian's dtype; then the
        step's :func:`~taskbalance.strategy.verdict` (the weights are known, ``.grad`` is not
        written yet). In a step to be discarded (a mixed-precision overflow, or a failed check
        with ``check_finite`` off) the method sees the identity instead of a possibly non-finite
        Gramian; after an overflow the weights are NaN."""
        flag = discarded()
        if flag is not None:
            eye = torch.eye(gramian.shape[0], dtype=gramian.dtype, device=gramian.device)
            gramian = eye if isinstance(flag, bool) else torch.where(flag, eye, gramian)
        weights = self.gramian_weights(gramian, losses, index)
        weights = self._clip_by_gramian(weights, gramian) if clip else weights.to(gramian.dtype)
        weights = on_overflow(weights)
        verdict()
        return weights

    def _clip_by_gramian(self, weights: Tensor, gramian: Tensor) -> Tensor:
        """``weights`` clipped with ``‖d‖² = wᵀGw``, in the Gramian's dtype."""
        if self.max_norm > 0:
            work = weights.to(solver_dtype(gramian.device))
            squared = work @ gramian.to(work.dtype) @ work
            weights = weights * self._clip_factor(squared).to(weights.dtype)
        return weights.to(gramian.dtype)

    def _clip_factor(self, squared_norm: Tensor) -> Tensor:
        """``min(1, max_norm / (‖d‖ + 1e-6))``, ``torch.nn.utils.clip_grad_norm_``'s factor for
        ``‖d‖²`` (``max_norm > 0``)."""
        norm = squared_norm.clamp(min=0).sqrt()
        return (self.max_norm / (norm + _CLIP_EPS)).clamp(max=1.0)

    @contextlib.contextmanager
    def _clipped(
        self, inputs: Sequence[Tensor], features: bool, scaler: torch.amp.GradScaler | None
    ) -> Iterator[None]:
        """``max_norm``: after the step in the block, this step's gradient of the shared
        parameters is clipped to ``max_norm``, as the official Nash-MTL code's
        ``clip_grad_norm_(shared_parameters, max_norm)`` after its backward; the heads are not
        clipped. The shared parameters are ``shared_params``, or on ``features=`` the leaves the
        features' graph reaches (the feature-space direction's norm says nothing about theirs).
        Gradients accumulated in ``.grad`` before this step keep their size. No host sync."""
        if self.max_norm == 0:
            yield
            return
        shared = [t for t in inputs if t.is_leaf and t.requires_grad]
        if features:
            shared += [leaf for leaf in graph_leaves(*inputs) if leaf.requires_grad]
        earlier = [None if t.grad is None else t.grad.clone() for t in shared]
        yield
        pairs = [(t.grad, e) for t, e in zip(shared, earlier) if t.grad is not None]
        if not pairs:
            return
        steps = [grad if before is None else grad - before for grad, before in pairs]
        norms = torch.stack(torch._foreach_norm(steps))
        squared = norms.to(solver_dtype(norms.device)).square().sum()
        scale = loss_scale(scaler, squared.device)
        if scale is not None:  # the gradients are those of the scaled loss
            squared = squared / scale.to(squared.dtype).square()
        factor = self._clip_factor(squared)
        for (grad, before), step in zip(pairs, steps):
            if before is None:
                grad.mul_(factor.to(grad.dtype))
            else:
                grad.copy_(before.add_(step.mul_(factor.to(step.dtype))))

    def _backward_reused(
        self, batch: TaskLosses, scaler: torch.amp.GradScaler | None, weights: Tensor
    ) -> Tensor:
        """A step with weights known before the gradients: one backward of ``Σ w_i L_i``."""
        weights = on_overflow(weights.to(batch.values.dtype))  # one flagged already
        scaled_backward((weights * batch.values).sum(), scaler)
        check_watched_gradients()  # one in this backward
        return on_overflow(weights)  # NaN in a step that GradScaler skips

    def _backward_gramian(
        self, batch: TaskLosses, inputs: Sequence[Tensor], scaler: torch.amp.GradScaler | None
    ) -> Tensor:
        """A combination on plain parameters: the Gramian without the Jacobian where linear
        layers make that cheaper, and never a second backward through the trunk
        (:func:`taskbalance.jacobian.gramian_backward`)."""
        detached = batch.values.detach()
        scale = loss_scale(scaler, batch.values.device)
        if scale is not None:
            watch(batch.values)  # before any backward, while the graph is whole

        def weights_of(matrix: Tensor) -> Tensor:
            if scale is not None:  # a device flag: GradScaler skips the step, weights are NaN
                mark_overflow(~torch.isfinite(matrix.diagonal()).all())
            _check_squared(batch, inputs, matrix.diagonal(), features=False)
            with _solver_errors(self):
                return self._weights_from_gramian(matrix, detached, batch.index)

        weights = gramian_backward(batch.values, inputs, weights_of, scale=scale)
        return weights.to(batch.values.dtype)

    def _backward_direction(
        self, batch: TaskLosses, inputs: Sequence[Tensor], scaler: torch.amp.GradScaler | None
    ) -> Tensor:
        """A method with its own direction on plain parameters: the rows and the heads'
        gradients from one backward per task, nothing traversed after the direction
        (:func:`taskbalance.jacobian.direction_backward`); returns the weights to report."""
        detached = batch.values.detach()
        scale = loss_scale(scaler, batch.values.device)
        if scale is not None:
            watch(batch.values)  # before any backward, while the graph is whole

        def direction_of(rows: Tensor) -> tuple[Tensor, Tensor]:
            squared = torch.linalg.vector_norm(rows, dim=1).square()
            if scale is not None:  # a device flag: GradScaler skips the step
                mark_overflow(~torch.isfinite(squared).all())
            _check_squared(batch, inputs, squared, features=False)
            with _solver_errors(self):
                direction = self.aggregate_rows(rows, detached, batch.index, None)
            verdict()
            # every gradient NaN in a step that GradScaler skips, the heads' too
            return on_overflow(direction), on_overflow(torch.ones_like(detached))

        direction_backward(batch.values, inputs, direction_of, scale=scale)
        return on_overflow(torch.ones_like(detached))

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
        if self.combines_gradients():
            with _solver_errors(self):
                weights = self._weights_from_gramian(gramian(rows), detached, batch.index)
            weights = weights.detach().to(batch.values.dtype)
            scaled_backward((weights * batch.values).sum(), scaler)
            return weights
        with _solver_errors(self):
            direction = self.aggregate_rows(
                rows, detached, batch.index, inputs if features else None
            )
        # An overflowed step (GradScaler skips it): every gradient NaN, whatever the direction.
        direction = on_overflow(direction)
        total = on_overflow(batch.values).sum()
        verdict()
        if stop - start != direction.shape[0]:
            # features under DDP: this rank's block; DDP's average divides by the ranks
            direction = direction[start:stop] * distributed.world_size(batch.group)
        if _plain_parameters(batch, inputs):
            # The shared parameters get the direction; only the heads are backpropagated.
            scale = loss_scale(scaler, batch.values.device)
            backward_with_direction(total, inputs, direction, scale=scale)
        else:
            _backward_replacing(total, inputs, direction, scaler)
        return on_overflow(torch.ones_like(detached))


def _corrected_total(
    weights: Tensor, correction: Tensor, inputs: Sequence[Tensor]
) -> Callable[[TaskLosses, Sequence[Tensor]], Tensor]:
    """``Σ w_i L_i + Σ_t ⟨t, c_t⟩`` with ``c`` a constant ``[P]``: its backward gives the shared
    tensors ``t`` the combination's gradient plus ``c``, and the heads the combination's."""
    pieces = correction.detach().split([t.numel() for t in inputs])

    def total(batch: TaskLosses, tensors: Sequence[Tensor]) -> Tensor:
        extra = sum((t * p.view_as(t).to(t.dtype)).sum() for t, p in zip(tensors, pieces))
        return (weights * batch.values).sum() + extra

    return total


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


def _caller_level() -> int:
    """The ``stacklevel`` of the first frame outside taskbalance, for a warning raised in the
    engine (at the step's verdict, say) to point at the user's call."""
    package = os.path.dirname(__file__)
    frame, level = sys._getframe(1), 1
    while frame.f_back is not None and frame.f_code.co_filename.startswith(package):
        frame, level = frame.f_back, level + 1
    return level


def _plain_parameters(batch: TaskLosses, inputs: Sequence[Tensor]) -> bool:
    """Whether the inputs are leaf tensors (parameters) on the losses' device, in float32/float64,
    in one process: then the Gramian and the finish of taskbalance.jacobian apply as they are."""
    device = batch.values.device
    return (
        batch.group is None
        and batch.values.dtype not in HALF
        and all(t.is_leaf and t.device == device and t.dtype not in HALF for t in inputs)
    )


def _check_squared(
    batch: TaskLosses, inputs: Sequence[Tensor], squared: Tensor, features: bool
) -> None:
    """The rows' health, for the step's verdict (no sync here): every squared row norm (the
    Gramian's diagonal) finite, so that the Gramian does not overflow, and every task with a
    zero row reaching ``inputs``. A zero row is legitimate (a dead ReLU, an exact optimum) unless
    the task's loss does not depend on the inputs at all: then the caller passed the wrong
    tensors. That walk of the graph runs only for a zero row, and only with ``check_finite``."""
    squared = squared.detach()
    _require_finite_norms(batch.names, squared)

    def unreached() -> StrategyError | None:
        argument = "features" if features else "shared_params"
        for position in (squared == 0).nonzero().reshape(-1).tolist():
            if not _task_reaches(batch.values, position, inputs):
                return StrategyError(
                    f"the loss of task {batch.names[position]!r} does not depend on any tensor "
                    f"of {argument}; pass tensors that every present task reaches"
                )
        return None

    require(squared != 0, unreached, advisory=True)


def _require_finite_norms(names: Sequence[str], squared: Tensor) -> None:
    """For the step's verdict: the squared row norms ``[k]`` are finite, so that the Gramian
    (whose entries they bound) does not overflow."""
    finite = torch.isfinite(squared)

    def not_finite() -> StrategyError:
        bad = names[finite.tolist().index(False)]
        return StrategyError(
            f"the gradient of task {bad!r} is not finite or too large: its squared norm "
            f"overflows {squared.dtype} (scale that loss down)"
        )

    require(finite, not_finite)


def _task_reaches(values: Tensor, position: int, inputs: Sequence[Tensor]) -> bool:
    """Whether entry ``position`` of the stacked losses depends on any of ``inputs``."""
    reached = inputs_reached(values, inputs)
    return reached is None or bool(reached[position])  # not built by gather: assume it does


def _backward_replacing(
    total: Tensor, inputs: Sequence[Tensor], direction: Tensor, scaler: torch.amp.GradScaler | None
) -> None:
    """Backward of ``total`` with the gradient reaching ``inputs`` replaced by ``direction``."""
    scale = loss_scale(scaler, direction.device)
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
    scale = loss_scale(scaler, device)
    if scale is None:
        rows = jacobian(batch.values, inputs)
    else:
        watch(batch.values)  # the gradients a later backward writes are checked at the end
        rows = jacobian(batch.values, inputs, scale=scale)
        rows = rows.float() / scale if rows.dtype in HALF else rows / scale
    if rows.dtype in HALF:
        rows = rows.float()  # weights from a float32 Gramian; bf16/fp16 products lose too much
    span = (0, rows.shape[1])
    if batch.group is not None:
        rows, span = distributed.reduce_rows(rows, features=features, group=batch.group)
    squared = torch.linalg.vector_norm(rows, dim=1).square()  # no temporary the size of J
    if scale is not None:
        # After the reduction, so that every rank agrees; a flag on the device, never read back.
        mark_overflow(~torch.isfinite(squared).all())
    _check_squared(batch, inputs, squared, features)
    return rows, span
