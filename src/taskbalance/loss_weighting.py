"""Loss-level strategies: the update is the gradient of ``Σ w_i L_i``."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Literal

import torch
from torch import Tensor, nn
from torch.autograd.graph import GradientEdge

from taskbalance.gradient_aggregation import _check_squared, per_task_jacobian
from taskbalance.jacobian import (
    _backward_targets,
    _linear_layers,
    _LinearLayer,
    _per_task_roots,
)
from taskbalance.report import StepReport
from taskbalance.strategy import (
    Strategy,
    TaskParameterOptimizer,
    loss_scale,
    mark_overflow,
    overflowed,
    scaled_backward,
    verdict,
    watch,
)
from taskbalance.validation import TaskLosses

__all__ = ["LossWeighting", "present_rows", "task_squared_norms", "write_rows"]


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
    * :meth:`objective_and_gradients`: the objective's value and its gradient with respect to
      the learned parameters in closed form, from this step's weights (optional; without it a
      training step differentiates :meth:`objective` with autograd, or calls it for the value);
    * :meth:`on_gradients`: with ``needs_grads = True``, the per-task gradients of each training
      step;
    * :meth:`on_gradient_norms`: with ``needs_grads = True``, only the per-task gradients' squared
      norms (GradNorm), which the engine computes without forming the gradients of linear layers;
    * the hooks every strategy has: :meth:`~Strategy.check_losses`,
      :meth:`~Strategy.before_train_step`, :meth:`~Strategy.on_train_step`,
      :meth:`~Strategy.extras`, :meth:`~Strategy.end_epoch`.

    Learned per-task parameters (uncertainty's log-variances, say) are declared with
    :meth:`add_learned_parameter`. They are trained on the gradient of :meth:`objective` with the
    strategy's own :class:`~taskbalance.strategy.TaskParameterOptimizer` in every training step,
    once its weights are computed (in ``backward`` before the model's backward: a step that fails
    or that mixed precision skips undoes the update with the rest of the state).
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

    def objective_and_gradients(
        self, losses: Tensor, index: Tensor, weights: Tensor
    ) -> tuple[Tensor, dict[str, Tensor]] | None:
        """:meth:`objective`'s value and its gradient with respect to each learned parameter
        (:meth:`add_learned_parameter`) in closed form, from this step's :meth:`loss_weights`
        ``weights``: ``(value, {name: rows})``, the rows of the present tasks (``[k, ...]`` in
        ``index`` order; the absent tasks' rows are not updated), ``{}`` without learned
        parameters. Called in training steps only. The default, ``None``, has the engine
        differentiate the objective with autograd (a backward per step) or evaluate it; the
        conformance kit checks an implementation against that."""
        return None

    def on_gradients(self, jacobian: Tensor, losses: Tensor, index: Tensor) -> None:
        """With ``needs_grads = True``: the per-task gradients ``[k, P]`` of a training step
        w.r.t. ``shared_params``/``features`` (unscaled), after the weights were computed and
        before the backward, inside the transaction."""

    def on_gradient_norms(self, squared_norms: Tensor, losses: Tensor, index: Tensor) -> None:
        """With ``needs_grads = True``, instead of :meth:`on_gradients` for a method that needs
        only the norms: the squared norms ``[k]`` of the per-task gradients (unscaled), called
        where :meth:`on_gradients` would be. The engine then forms no per-task gradient of a
        linear layer of ``shared_params`` (see :func:`task_squared_norms`)."""

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
                if train and not self.needs_grads:
                    # The step's one verdict, before any training hook: every check of a loss
                    # weighting is registered by now (the per-task gradients' come later).
                    verdict()
                if train:
                    self.before_train_step(detached, index)
            value, weights, grads = self._weights(detached, index, train)
            total = self._total(batch, value, weights)
            if train and inputs is not None:
                self._per_task_hooks(batch, inputs, scaler)
            if grads:
                # Before the model's backward, on warm caches; a step that fails or overflows
                # undoes it with the rest of the state (the transaction).
                with torch.no_grad():
                    mask = self._step_mask(batch)  # None: every task, the optimizers' fast path
                    for name, grad in grads.items():
                        self._learned[name].step(getattr(self, name), grad, mask)
            if run_backward:
                scaled_backward(total, scaler)
            if train:
                verdict()  # on_train_step runs in steps that pass (backward took it already)
                with torch.no_grad():
                    self.on_train_step(detached, index)
        report = StepReport(
            batch.names, detached, weights, self.extras(index), self._step_scalars(detached)
        )
        if train:
            self._remember_step(losses, (value, weights, report))
        return total, report

    def _per_task_hooks(
        self, batch: TaskLosses, inputs: list[Tensor], scaler: torch.amp.GradScaler | None
    ) -> None:
        """:meth:`on_gradients` with the per-task rows, or, for a strategy that implements
        :meth:`on_gradient_norms` only, that hook with the squared norms computed the cheap way."""
        detached, index = batch.values.detach(), batch.index
        if type(self).on_gradients is LossWeighting.on_gradients:
            squared = task_squared_norms(batch, inputs, scaler)
            if not overflowed():
                with torch.no_grad():
                    self.on_gradient_norms(squared, detached, index)
            return
        rows = per_task_jacobian(batch, inputs, scaler)
        if not overflowed():
            with torch.no_grad():
                self.on_gradients(rows, detached, index)
                if type(self).on_gradient_norms is not LossWeighting.on_gradient_norms:
                    self.on_gradient_norms(_squared_rows(rows), detached, index)

    def _weights(
        self, losses: Tensor, index: Tensor, train: bool
    ) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """The objective's value, the weights, and the gradients of the learned parameters
        (full size; the absent tasks' rows are zero)."""
        with torch.no_grad():
            weights = (self.loss_weights if train else self.eval_weights)(losses, index)
            closed = self.objective_and_gradients(losses, index, weights) if train else None
            if closed is not None:
                value, rows = closed
                grads = {name: self._full_rows(name, part, index) for name, part in rows.items()}
                return value, weights.to(losses.dtype), grads
            if not (train and self._learned):
                if type(self).objective is LossWeighting.objective:
                    value = (weights * losses).sum()  # the default objective, without a call
                else:
                    value = self.objective(losses, index)
                return value, weights.to(losses.dtype), {}
        names = list(self._learned)  # no closed form: autograd of the objective
        with torch.enable_grad():
            objective = self.objective(losses, index)
            found = torch.autograd.grad(
                objective, [getattr(self, n) for n in names], materialize_grads=True
            )
        return objective.detach(), weights.to(losses.dtype), dict(zip(names, found))

    def _full_rows(self, name: str, rows: Tensor, index: Tensor) -> Tensor:
        """The present tasks' rows of a learned parameter's gradient, at full size."""
        parameter = getattr(self, name)
        if rows.shape[0] == parameter.shape[0]:  # every task present: index is 0, 1, ..., T-1
            return rows
        return torch.zeros_like(parameter).index_put_((index,), rows.to(parameter.dtype))

    @staticmethod
    def _total(batch: TaskLosses, value: Tensor, weights: Tensor) -> Tensor:
        # The objective's value, with the gradient Σ_i w_i ∇L_i.
        detached = batch.values.detach()
        return value.to(detached.dtype) + (weights * (batch.values - detached)).sum()


def present_rows(tensor: Tensor, index: Tensor) -> Tensor:
    """``tensor[index]``, the present tasks' rows of per-task state, without the gather (and its
    copy) when every task is present. ``index`` is as the engine passes it to the hooks (the
    positions in increasing order), so it is then ``0, 1, ..., T-1`` and the result is ``tensor``
    itself: never write into it or keep it past the step (report a copy)."""
    return tensor if index.shape[0] == tensor.shape[0] else tensor[index]


def write_rows(tensor: Tensor, index: Tensor, value: Tensor | float) -> None:
    """``tensor[index] = value`` for per-task state, as one ``copy_`` or ``fill_`` when every
    task is present (``index`` as :func:`present_rows` takes it)."""
    if index.shape[0] != tensor.shape[0]:
        tensor[index] = value
    elif isinstance(value, Tensor):
        tensor.copy_(value)
    else:
        tensor.fill_(value)


def task_squared_norms(
    batch: TaskLosses, inputs: Sequence[Tensor], scaler: torch.amp.GradScaler | None
) -> Tensor:
    """``‖g_i‖²`` ``[k]`` of each present task's gradient w.r.t. ``inputs`` (unscaled), with the
    checks of :func:`~taskbalance.gradient_aggregation.per_task_jacobian`, without forming the
    gradients of linear layers where that is cheaper.

    For a linear layer ``y = x Wᵀ + b`` of ``inputs`` used once, with ``D_i = ∂L_i/∂y``
    ``[B, out]``: ``‖∇_W L_i‖² = ‖D_iᵀ x‖² = ⟨(x xᵀ) D_i, D_i⟩`` and ``‖∇_b L_i‖² = ‖1ᵀ D_i‖²``.
    Each task's backward stops at ``y`` (only the heads are traversed, no weight gradient), and
    the norms cost ``B²·in`` multiply-adds for ``x xᵀ`` once plus ``B²·out`` per task, against
    ``B·in·out`` per task for the weight gradients (and ``B·in·out`` for the layer's share of
    the step's own backward, ``2·B·in·out`` with its input gradient). GradNorm on the last
    shared layer of the 3×512 MLP of ``experiments.benchmark`` (``B = 256``, ``T = 10``): 0.37
    G multiply-adds for the norms instead of 0.67 G, against 0.54 G for the whole plain step.
    Used for each layer where it is fewer multiply-adds (a batch narrower than the layer);
    other tensors, features (not leaves) and distributed steps (the global norms need the
    global rows) take the per-task rows.
    """
    values = batch.values
    count = values.shape[0]
    layers: list[_LinearLayer] = []
    if batch.group is None and all(t.grad_fn is None for t in inputs):
        layers = [
            layer for layer in _linear_layers(values, inputs) if _norm_saving(layer, count) > 0
        ]
    if not layers:
        return _squared_rows(per_task_jacobian(batch, inputs, scaler))
    scale = loss_scale(scaler, values.device)
    if scale is not None:
        watch(values)  # the gradients a later backward writes are checked at the end
    squared = _kernel_norms(values, inputs, layers, scale)
    if scale is not None:
        mark_overflow(~torch.isfinite(squared).all())  # a flag on the device, never read back
    _check_squared(batch, inputs, squared, features=False)
    return squared


def _kernel_norms(
    values: Tensor, inputs: Sequence[Tensor], layers: Sequence[_LinearLayer], scale: Tensor | None
) -> Tensor:
    """The squared norms of :func:`task_squared_norms`, one task at a time: each task's output
    gradients ``D_i`` (and its gradients of the other ``inputs``) are reduced as soon as its
    backward returns, into one reused ``(x xᵀ) D_i`` buffer per layer. Keeping every ``D_i``, as
    the Gramian needs, would hold ``k`` of them and copy each once more."""
    roots = _per_task_roots(values)
    _, targets = _backward_targets(inputs, layers)
    dtype = torch.promote_types(values.dtype, inputs[0].dtype)
    one = torch.ones((), dtype=values.dtype, device=values.device)
    unscale = one.new_ones((), dtype=dtype)
    if scale is not None:
        one = scale.to(one).reshape(())
        unscale = unscale / scale.to(dtype).reshape(())
    kernels, products = [], []
    with torch.no_grad():
        for layer in layers:
            x = layer.inputs.to(dtype)
            kernel = x @ x.mT
            kernels.append(kernel if scale is None else kernel * unscale.square())  # D_i is ·s
            products.append(x.new_empty(x.shape[0], layer.weight.shape[0]))
    zero = one.new_zeros((), dtype=dtype)
    squared = []
    for i in range(values.shape[0]):
        root: Tensor | GradientEdge | None = values[i] if roots is None else roots[i]
        if root is None:
            squared.append(zero)
            continue
        grads = torch.autograd.grad(
            root,  # type: ignore[arg-type]
            targets,  # type: ignore[arg-type]  # torch accepts a mix of tensors and edges
            grad_outputs=one,
            retain_graph=True,  # the step's own backward follows
            allow_unused=True,
        )
        with torch.no_grad():
            total = zero
            for layer, kernel, product, d in zip(layers, kernels, products, grads):
                if d is None:
                    continue
                d = d.to(dtype)
                torch.mm(kernel, d, out=product)
                total = total + torch.dot(product.view(-1), d.reshape(-1))
                if layer.bias is not None:
                    bias = d.sum(dim=0) if scale is None else d.sum(dim=0) * unscale
                    total = total + torch.dot(bias, bias)
            for g in grads[len(layers) :]:
                if g is not None:
                    g = g.reshape(-1).to(dtype) if scale is None else g.reshape(-1) * unscale
                    total = total + torch.dot(g, g)
            squared.append(total)
    # ⟨(x xᵀ) D_i, D_i⟩ ≥ 0 up to rounding; a square root follows
    return torch.stack(squared).clamp_(min=0)


def _squared_rows(rows: Tensor) -> Tensor:
    """``‖row‖²`` of each row, without a temporary the size of ``rows``."""
    return torch.linalg.vector_norm(rows, dim=1).square()


def _norm_saving(layer: _LinearLayer, count: int) -> int:
    """Multiply-adds that :func:`task_squared_norms` saves on ``layer`` for ``count`` tasks by
    the kernel ``x xᵀ`` over the weight gradients (negative: a loss)."""
    batch, width_in = layer.inputs.shape
    width_out = layer.weight.shape[0]
    materialised = count * (batch + 1) * width_in * width_out
    kernel = batch * batch * width_in + count * (batch + 1) * batch * width_out
    return materialised - kernel
