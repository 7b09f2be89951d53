"""Loss-level strategies: the update is the gradient of ``Σ w_i L_i``."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Literal

import torch
from torch import Tensor, nn

from taskbalance.gradient_aggregation import per_task_jacobian
from taskbalance.report import StepReport
from taskbalance.strategy import Strategy, TaskParameterOptimizer, overflowed, scaled_backward
from taskbalance.validation import TaskLosses

__all__ = ["LossWeighting"]


class LossWeighting(Strategy):
    """A strategy that turns the loss vector into weights; the update is ``sum(w_i * L_i)``.

    Hooks (``losses`` are the detached losses of the present tasks ``[k]``, ``index`` their
    positions in ``self.tasks``):

    * :meth:`loss_weights` (required): this step's weights ``[k]``;
    * :meth:`objective`: the paper's scalar objective, when it is not ``Σ w_i L_i`` itself. The
      weights must be its gradient with respect to the losses (the conformance kit checks this),
      so ``s(losses)`` has the paper's value and the paper's gradient;
    * :meth:`eval_weights`: the weights outside training steps (default: :meth:`loss_weights`;
      RLW uses its mean weights);
    * :meth:`on_gradients`: with ``needs_grads = True``, the per-task gradients of each training
      step (GradNorm reads their norms);
    * the hooks every strategy has: :meth:`~Strategy.check_losses`,
      :meth:`~Strategy.before_train_step`, :meth:`~Strategy.on_train_step`,
      :meth:`~Strategy.extras`, :meth:`~Strategy.end_epoch`.

    Learned per-task parameters (uncertainty's log-variances, say) are declared with
    :meth:`add_learned_parameter`. They are trained on the gradient of :meth:`objective` with the
    strategy's own :class:`~taskbalance.strategy.TaskParameterOptimizer` in every training step:
    in ``backward`` after the model's backward succeeded, in ``forward`` and ``combine`` right
    away.
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
        """Declare a per-task parameter (dimension 0 = tasks) trained on the gradient of
        :meth:`objective` by its own optimizer. Nobody adds it to the model's optimizer, and its
        ``.grad`` stays ``None``, so a model optimizer that holds it by accident leaves it alone.
        """
        # In the default dtype, as nn.Module parameters are (its optimizer's moments are too).
        parameter = nn.Parameter(initial.detach().clone().to(torch.get_default_dtype()))
        self.add_state(name, parameter)
        updater = TaskParameterOptimizer(
            tuple(initial.shape), kind=optimizer, lr=lr, weight_decay=weight_decay
        )
        self.add_module(f"{name}_optimizer", updater)
        self._learned[name] = updater
        return parameter

    # ----------------------------------------------------------------- hooks
    def loss_weights(self, losses: Tensor, index: Tensor) -> Tensor:
        """Weights for the present tasks (``losses`` detached, ``index`` their positions)."""
        raise NotImplementedError

    def objective(self, losses: Tensor, index: Tensor) -> Tensor:
        """The paper's scalar objective of the (detached) losses and the learned parameters."""
        return (self.loss_weights(losses, index) * losses).sum()

    def eval_weights(self, losses: Tensor, index: Tensor) -> Tensor:
        """The weights outside training steps (evaluation); default :meth:`loss_weights`."""
        return self.loss_weights(losses, index)

    def on_gradients(self, jacobian: Tensor, losses: Tensor, index: Tensor) -> None:
        """With ``needs_grads = True``: the per-task gradients ``[k, P]`` of a training step
        w.r.t. ``shared_params``/``features`` (unscaled), after the weights were computed and
        before the backward, inside the transaction."""

    # ----------------------------------------------------------------- the engine
    def forward(self, losses: Mapping[str, Tensor]) -> Tensor:
        """The combined loss: the objective's value, with the gradient ``sum(w_i * grad L_i)``."""
        batch = self.gather(losses)
        if self.needs_grads:
            self._refuse_training_combination(batch)
        return self._step(losses, batch)[0]

    def combine(
        self,
        losses: Mapping[str, Tensor],
        *,
        shared_params: Iterable[Tensor] | None = None,
        features: Tensor | Sequence[Tensor] | None = None,
    ) -> tuple[Tensor, StepReport]:
        """``(s(losses), report)`` in one call. A strategy with ``needs_grads`` (GradNorm) takes
        ``shared_params=`` or ``features=`` in a training step, as ``backward`` does."""
        batch = self.gather(losses)
        inputs = None
        if self.needs_grads and batch.training:
            inputs = self._grad_inputs(shared_params, features, batch)
        return self._step(losses, batch, inputs)

    def backward(
        self,
        losses: Mapping[str, Tensor],
        *,
        shared_params: Iterable[Tensor] | None = None,
        features: Tensor | Sequence[Tensor] | None = None,
        scaler: torch.amp.GradScaler | None = None,
    ) -> StepReport:
        """Backward of the combined loss. ``shared_params``/``features`` are needed only with
        ``needs_grads``; otherwise they are accepted and unused, so that switching to a
        gradient-level strategy changes no call site."""
        batch = self.gather(losses)
        self._require_graph(batch)
        inputs = self._grad_inputs(shared_params, features, batch) if self.needs_grads else None
        return self._step(losses, batch, inputs, scaler, run_backward=True)[1]

    def _step(
        self,
        losses: Mapping[str, Tensor],
        batch: TaskLosses,
        inputs: list[Tensor] | None = None,
        scaler: torch.amp.GradScaler | None = None,
        *,
        run_backward: bool = False,
    ) -> tuple[Tensor, StepReport]:
        train = batch.training
        repeated = self._repeated_step(losses) if train else None
        if repeated is not None:  # the same step again: its weights, and no second update
            value, weights, report = repeated
            total = self._total(batch, value, weights)
            if run_backward:
                scaled_backward(total, scaler)
            return total, report
        detached, index = batch.values.detach(), batch.index
        with self.transaction(self._step_mask(batch) if train else None):
            with torch.no_grad():
                self.check_losses(detached, index)
                if train:
                    self.before_train_step(detached, index)
            value, weights, grads = self._weights(detached, index, train)
            total = self._total(batch, value, weights)
            if train and inputs is not None:
                rows = per_task_jacobian(batch, inputs, scaler)
                if not overflowed():
                    with torch.no_grad():
                        self.on_gradients(rows, detached, index)
            if run_backward:
                scaled_backward(total, scaler)
            if train:
                with torch.no_grad():
                    for name, grad in grads.items():
                        self._learned[name].step(getattr(self, name), grad, batch.mask)
                    self.on_train_step(detached, index)
        report = StepReport(batch.names, detached, weights, self.extras(index))
        if train:
            self._remember_step(losses, (value, weights, report))
        return total, report

    def _weights(
        self, losses: Tensor, index: Tensor, train: bool
    ) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """The objective's value, the weights, and the learned parameters' gradients."""
        grads: dict[str, Tensor] = {}
        value = None
        if train and self._learned:
            names = list(self._learned)
            with torch.enable_grad():
                objective = self.objective(losses, index)
                found = torch.autograd.grad(
                    objective, [getattr(self, n) for n in names], materialize_grads=True
                )
            value, grads = objective.detach(), dict(zip(names, found))
        elif type(self).objective is not LossWeighting.objective:
            with torch.no_grad():
                value = self.objective(losses, index)
        with torch.no_grad():
            weights = (self.loss_weights if train else self.eval_weights)(losses, index)
            if value is None:
                value = (weights * losses).sum()  # the default objective, without a second call
        return value, weights.to(losses.dtype), grads

    @staticmethod
    def _total(batch: TaskLosses, value: Tensor, weights: Tensor) -> Tensor:
        # The objective's value, with the gradient Σ_i w_i ∇L_i.
        detached = batch.values.detach()
        return value.to(detached.dtype) + (weights * (batch.values - detached)).sum()
