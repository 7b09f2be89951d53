"""Per-task gradients: the Jacobian of the task losses, its Gramian, writing a gradient back.

``jacobian(losses, inputs)`` returns a ``[k, P]`` matrix whose row ``i`` is the gradient of
``losses[i]`` with respect to every tensor of ``inputs``, flattened and concatenated in order.
``inputs`` are either the shared parameters or the shared features (the output of the trunk).

Two ways to compute it (``method``):

* ``"loop"``: one ``torch.autograd.grad`` per task, written into a preallocated matrix.
* ``"batched"``: one ``torch.autograd.grad`` with ``is_grads_batched=True`` (vmap over the
  backward). It needs every backward formula of the graph to support batching; where one does
  not, torch falls back to a slow loop with a warning.

``"auto"`` is ``"loop"``, by measurement (``python -m experiments.benchmark``: CPU, 1 thread,
torch 2.13, 3×512 MLP trunk, batch 256, one linear head per task; CPU time of forward +
Jacobian over forward + ``sum(L).backward()``, per-round ratios, medians, interleaved in one
process on a shared 2-core machine):

=====  =============  ================  ===============  ==================
T      params, loop   params, batched   features, loop   features, batched
=====  =============  ================  ===============  ==================
2      1.64×          1.71×             0.41×            0.43×
10     6.06×          7.82×             0.51×            1.15×
40     21.8×          33.7×             0.75×            9.39×
=====  =============  ================  ===============  ==================

The batched backward is never faster on CPU: vmap turns each matmul of the backward into a
batched one that is no more efficient than ``T`` separate calls, its batching rules cost more
than the loop's Python overhead, and over a stack of losses it runs every head for every row.

Per-task roots. A strategy stacks the task losses (``torch.stack``) before asking for their
Jacobian. Backpropagating a one-hot vector through that stack would send a (zero) gradient
into every task's head for every row: ``T²`` head backwards instead of ``T``. When ``losses``
is the output of ``torch.stack``, the loop starts row ``i``'s backward at the ``i``-th input of
the stack instead (a :class:`torch.autograd.graph.GradientEdge`), so each row only runs its own
task's part of the graph; the Jacobian is the same. That alone took the features Jacobian for
40 tasks from 4.6× to 0.57× of a plain step (wall time, same setting).

Gramian-weighting strategies need ``G = J Jᵀ``, not ``J``. :func:`task_gramian` sums the
Gramian of each linear layer from its input and output gradient (``⟨(x xᵀ) D_i, D_j⟩``) without
forming the weight gradients, where that is cheaper (a batch narrower than the layer's input).
:func:`gramian_backward` does a whole strategy step with one backward per task and nothing
more: each task's backward leaves the linear layers' output gradients, the rows of the other
shared parameters and the task's head gradients; ``G`` and then every ``.grad`` (``Σ w_i g_i``)
are computed from those pieces, so neither the trunk nor a head is traversed again after the
weights. The floor of an exact step is therefore one forward, ``k`` backwards to the output
gradients of the shared layers, and the Gramian pieces; TorchJD's ``mtl_backward`` pays ``k``
full backwards (weight gradients included) and the ``[k, P]`` Jacobian. On the MLP above with 10
tasks: 5.2–5.4× the plain step, against 6.1–7.7× with a final backward of ``Σ w_i L_i``; see the
README's Performance section for the comparison with TorchJD.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from einops import rearrange
from torch import Tensor
from torch.autograd.graph import GradientEdge

__all__ = [
    "accumulate_grad",
    "backward_with_direction",
    "direction_backward",
    "gramian",
    "gramian_backward",
    "graph_leaves",
    "inputs_reached",
    "jacobian",
    "task_gramian",
    "walk_graph",
]

JacobianMethod = Literal["auto", "loop", "batched"]


def _per_task_roots(losses: Tensor) -> list[Tensor | GradientEdge | None] | None:
    """One backward root per entry of ``losses`` when it is a ``torch.stack`` of scalars.

    ``None`` for an entry that carries no graph (its row is zero); ``None`` overall when the
    structure is not a plain stack, in which case rows are taken by one-hot vectors.
    """
    node = losses.grad_fn
    if node is None or losses.dim() != 1 or type(node).__name__ != "StackBackward0":
        return None
    following = node.next_functions
    if len(following) != losses.shape[0]:
        return None
    return [None if fn is None else _own_root(fn, nr) for fn, nr in following]


def _own_root(node: Any, output: int) -> GradientEdge | None:
    """The root of one task's backward: output ``output`` of ``node``, or, when that is entry
    ``i`` of a user's own stack of the losses (``dict(zip(tasks, torch.stack(losses)))``,
    ``stacked[i]``, ``stacked.unbind()``), the ``i``-th input of that stack. Starting at the
    stack would send a zero gradient into every other task's branch for every row; the gradient
    through ``stacked[i]`` is the ``i``-th input's, so the rows are the same, bit for bit."""
    name = type(node).__name__
    if name not in ("UnbindBackward0", "SelectBackward0") or node._saved_dim != 0:
        return GradientEdge(node, output)
    index = output if name == "UnbindBackward0" else node._saved_index
    ((stack, _),) = node.next_functions
    if stack is None or type(stack).__name__ != "StackBackward0" or stack._saved_dim != 0:
        return GradientEdge(node, output)
    if not -len(stack.next_functions) <= index < len(stack.next_functions):
        return GradientEdge(node, output)
    source, number = stack.next_functions[index]
    return None if source is None else GradientEdge(source, number)


def jacobian(
    losses: Tensor | Sequence[Tensor],
    inputs: Sequence[Tensor],
    *,
    retain_graph: bool = True,
    method: JacobianMethod = "auto",
    scale: Tensor | None = None,
) -> Tensor:
    """The Jacobian ``[k, P]`` of the loss vector ``losses`` ``[k]`` w.r.t. ``inputs``.

    ``losses`` is a ``[k]`` tensor or a sequence of ``k`` scalar tensors. An input that a loss
    does not reach gets a zero block in that loss's row. The graph is retained by default,
    because a strategy backpropagates the combined loss afterwards. ``"auto"`` is ``"loop"``
    (see the module docstring for the measurements). ``scale`` (a one-element tensor, the loss
    scale of mixed precision) gives the Jacobian of ``scale * losses`` without building that
    product, which would hide the per-task roots.

    >>> w = torch.tensor([1.0, 2.0], requires_grad=True)
    >>> jacobian(torch.stack([(w**2).sum(), 3 * w[0]]), [w])
    tensor([[2., 4.],
            [3., 0.]])
    """
    inputs = list(inputs)
    if method not in ("auto", "loop", "batched"):
        raise ValueError(f"method must be 'auto', 'loop' or 'batched', got {method!r}")
    roots: list[Tensor | GradientEdge | None] | None
    if isinstance(losses, Tensor):
        roots = _per_task_roots(losses) if method != "batched" else None
        vector = losses
    else:
        roots = list(losses)
        vector = torch.stack([loss.reshape(()) for loss in roots])  # type: ignore[union-attr]
        roots = [r if r.requires_grad else None for r in roots]  # type: ignore[union-attr]
    count = vector.shape[0]
    if method == "batched":
        eye = torch.eye(count, dtype=vector.dtype, device=vector.device)
        if scale is not None:
            eye = eye * scale.to(eye)
        grads = torch.autograd.grad(
            vector,
            inputs,
            grad_outputs=eye,
            retain_graph=retain_graph,
            is_grads_batched=True,
            allow_unused=True,
        )
        # An unreached input gives None (materialize_grads would drop the batch dimension).
        blocks = [
            vector.new_zeros(count, t.numel()) if g is None else rearrange(g, "k ... -> k (...)")
            for g, t in zip(grads, inputs)
        ]
        return torch.cat(blocks, dim=1)
    sizes = [t.numel() for t in inputs]
    dtype = torch.promote_types(vector.dtype, inputs[0].dtype)
    rows = torch.empty(count, sum(sizes), dtype=dtype, device=vector.device)
    one = torch.ones((), dtype=vector.dtype, device=vector.device)
    if scale is not None:
        one = scale.to(one).reshape(())
    for i in range(count):
        keep = retain_graph or i < count - 1
        if roots is None:
            # Not a stack: a one-hot vector through the whole loss vector.
            grads = torch.autograd.grad(
                vector[i],
                inputs,
                grad_outputs=one,
                retain_graph=keep,
                allow_unused=True,
                materialize_grads=True,
            )
        elif roots[i] is None:
            rows[i].zero_()
            continue
        else:
            grads = torch.autograd.grad(
                roots[i],  # type: ignore[arg-type]
                inputs,
                grad_outputs=one,
                retain_graph=keep,
                allow_unused=True,
                materialize_grads=True,
            )
        torch.cat([g.reshape(-1) for g in grads], out=rows[i])
    return rows


_BLOCK = 1 << 16  # columns per block of a Gramian's float32 products


def gramian(jacobian: Tensor) -> Tensor:
    """``J Jᵀ``: the inner products of every pair of task gradients, ``[k, k]``.

    Summed in float64 (float32 on MPS) over blocks of 2¹⁶ columns, each block's product in ``J``'s
    dtype: the rounding error of one float32 product grows with the number of parameters ``P``
    (about 3e-3 relative at ``P`` = 6.7e7 on CPU, enough to shift Nash-MTL's update by as much),
    the blocked sum's does not (3e-8). Returned in ``J``'s dtype.
    """
    return _inner(jacobian, jacobian).to(jacobian.dtype)


def _inner(a: Tensor, b: Tensor) -> Tensor:
    """``a bᵀ`` for ``[k, n]`` matrices, accumulated as :func:`gramian` does, in float64 (float32
    on MPS)."""
    wide = torch.float32 if a.device.type == "mps" else torch.float64
    if a.dtype == wide or a.shape[1] <= _BLOCK:
        return (a @ b.mT).to(wide)
    full = a.shape[1] // _BLOCK * _BLOCK
    # [blocks, k, 2¹⁶] views (no copy): one batched product, summed in the wide dtype
    a_blocks = a[:, :full].unflatten(1, (-1, _BLOCK)).transpose(0, 1)
    b_blocks = b[:, :full].unflatten(1, (-1, _BLOCK)).transpose(0, 1)
    result = torch.bmm(a_blocks, b_blocks.mT).to(wide).sum(dim=0)
    return result + (a[:, full:] @ b[:, full:].mT).to(wide)


def accumulate_grad(params: Iterable[Tensor], vector: Tensor) -> None:
    """Add the flat ``vector`` to the ``.grad`` of ``params`` (the order of ``jacobian``)."""
    params = list(params)
    expected = sum(p.numel() for p in params)
    if vector.numel() != expected:
        raise ValueError(f"vector has {vector.numel()} entries, the parameters {expected}")
    pieces = [
        piece.view_as(param).to(param.dtype)
        for param, piece in zip(params, vector.split([p.numel() for p in params]))
    ]
    existing = [(p.grad, piece) for p, piece in zip(params, pieces) if p.grad is not None]
    if existing:
        # One fused call instead of a Python loop of add_ over the parameters.
        torch._foreach_add_([g for g, _ in existing], [piece for _, piece in existing])
    for param, piece in zip(params, pieces):
        if param.grad is None:
            param.grad = piece.clone()


def walk_graph(*starts: Any) -> Iterator[Any]:
    """Every autograd node reachable from the nodes ``starts`` (``None`` skipped), each once.

    The one walk of the graph in taskbalance: :func:`graph_leaves` and the engine's check that a
    task reaches the tensors it is differentiated against are built on it.
    """
    seen: set[Any] = set()
    stack = list(starts)
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        yield node
        stack.extend(fn for fn, _ in node.next_functions)


def inputs_reached(losses: Tensor, inputs: Sequence[Tensor]) -> list[set[int]] | None:
    """For each entry of the stacked ``losses``, the positions of the ``inputs`` it depends on.

    ``None`` when ``losses`` is not a ``torch.stack`` of per-task losses (no per-task roots).
    One walk of each task's part of the graph, on the host.
    """
    roots = _per_task_roots(losses)
    if roots is None:
        return None
    positions: dict[int, list[int]] = {}
    for position, tensor in enumerate(inputs):
        key = id(tensor) if tensor.grad_fn is None else id(tensor.grad_fn)
        positions.setdefault(key, []).append(position)
    reached: list[set[int]] = []
    for root in roots:
        found: set[int] = set()
        for node in walk_graph(root.node if isinstance(root, GradientEdge) else None):
            variable = getattr(node, "variable", None)
            found.update(positions.get(id(node), ()))
            if variable is not None:
                found.update(positions.get(id(variable), ()))
        reached.append(found)
    return reached


def graph_leaves(*roots: Tensor) -> list[Tensor]:
    """Every leaf tensor (``AccumulateGrad`` node) that the graphs of ``roots`` reach, once."""
    variables = (
        getattr(node, "variable", None) for node in walk_graph(*(r.grad_fn for r in roots))
    )
    return [v for v in variables if isinstance(v, Tensor)]


def backward_with_direction(
    total: Tensor,
    inputs: Sequence[Tensor],
    direction: Tensor,
    *,
    scale: Tensor | None = None,
) -> None:
    """Backward of ``total`` with the gradient of the leaf tensors ``inputs`` set to ``direction``.

    ``inputs`` (the shared parameters) get ``direction`` (flat, in their order; multiplied by
    ``scale`` when given, the loss scale of mixed precision) added to their ``.grad``; every other
    leaf that ``total`` reaches (the heads) gets its gradient of ``total`` from a backward
    restricted to those leaves, so the shared trunk is not traversed a second time. With
    ``direction = w @ J`` and ``total = Σ w_i L_i`` this is ``total.backward()`` without the cost
    of the trunk. When an input is not a leaf (features), ``total`` is backpropagated with the
    gradient reaching ``inputs`` replaced by ``direction`` (the trunk has to be traversed).
    """
    inputs = list(inputs)
    if scale is not None:
        direction = direction * scale.to(direction.device)
        total = total * scale
    if all(t.is_leaf for t in inputs):
        shared = {id(t) for t in inputs}
        others = [leaf for leaf in graph_leaves(total) if id(leaf) not in shared]
        if others:
            torch.autograd.backward(total, inputs=others)
        accumulate_grad(inputs, direction)
        return
    pieces = direction.split([t.numel() for t in inputs])
    handles = [
        tensor.register_hook(lambda _grad, piece=piece, tensor=tensor: piece.view_as(tensor))
        for tensor, piece in zip(inputs, pieces)
    ]
    try:
        total.backward()
    finally:
        for handle in handles:
            handle.remove()


# ------------------------------------------------------------------ Gramian by layer contributions
@dataclass(frozen=True)
class _LinearLayer:
    """A use of ``x @ W.T (+ b)`` in the graph whose weight (and bias) are shared inputs."""

    node: Any  # the AddmmBackward0 / MmBackward0 node; its output gradient is D [B, out]
    inputs: Tensor  # x [B, in], as saved by autograd for the weight gradient
    weight: Tensor
    bias: Tensor | None


def _accumulated(node: Any) -> Tensor | None:
    variable = getattr(node, "variable", None)
    return variable if isinstance(variable, Tensor) else None


def _linear_layers(losses: Tensor, inputs: Sequence[Tensor]) -> list[_LinearLayer]:
    """The linear layers of the graph whose weight (and bias, if any) are among ``inputs`` and
    are used exactly once, so that their Jacobian block is ``D_iᵀ x`` (and ``1ᵀ D_i``)."""
    wanted = {id(t) for t in inputs}
    order = list(walk_graph(losses.grad_fn))
    indegree: dict[Any, int] = dict.fromkeys(order, 0)
    for node in order:
        for fn, _ in node.next_functions:
            if fn is not None:
                indegree[fn] += 1
    layers = []
    for node in order:
        name = type(node).__name__
        if name == "AddmmBackward0":
            if node._saved_alpha != 1 or node._saved_beta != 1:
                continue
            following = node.next_functions
            bias_fn, transposed, saved = following[0][0], following[2][0], "mat1"
        elif name == "MmBackward0":
            bias_fn, transposed, saved = None, node.next_functions[1][0], "self"
        else:
            continue
        if type(transposed).__name__ != "TBackward0" or indegree[transposed] != 1:
            continue
        weight_fn = transposed.next_functions[0][0]
        weight = _accumulated(weight_fn)
        if weight is None or id(weight) not in wanted or indegree[weight_fn] != 1:
            continue
        bias = None
        if bias_fn is not None:
            bias = _accumulated(bias_fn)
            if bias is None or id(bias) not in wanted or indegree[bias_fn] != 1 or bias.dim() != 1:
                continue
        x = getattr(node, f"_saved_{saved}")
        if x.dim() != 2 or weight.dim() != 2:
            continue
        layers.append(_LinearLayer(node, x, weight, bias))
    return layers


def _layer_saving(layer: _LinearLayer, count: int) -> int:
    """Multiply-adds the layer's pieces save over materialising its Jacobian block (negative: a
    loss), for ``count`` tasks. Both ways have one backward per task down to the layer's output
    gradient ``D_i`` ``[B, out]``; then

    * materialised: ``k`` weight gradients ``D_iᵀ x`` (``k·B·in·out``), their Gramian
      (``k²·in·out``) and ``w @ J`` (``k·in·out``);
    * pieces: ``K = x xᵀ`` (``B²·in``), ``K D_i`` for every task (``k·B²·out``), the Gramian
      ``⟨K D_i, D_j⟩`` (``k²·B·out``), ``Σ w_i D_i`` (``k·B·out``) and one weight gradient
      ``(Σ w_i D_i)ᵀ x`` (``B·in·out``).

    The pieces win when the batch is narrower than the layer's input (``B < in``) and ``k > 1``.
    """
    batch, width_in = layer.inputs.shape
    width_out = layer.weight.shape[0]
    materialised = (count * batch + count**2 + count) * width_in * width_out
    pieces = batch * batch * width_in + (count * batch + count**2 + count) * batch * width_out
    return materialised - pieces - batch * width_in * width_out


def _cheaper_layers(losses: Tensor, inputs: Sequence[Tensor]) -> list[_LinearLayer]:
    """The linear layers of :func:`_linear_layers` whose pieces are cheaper than their block."""
    count = losses.shape[0]
    if count < 2:
        return []
    return [layer for layer in _linear_layers(losses, inputs) if _layer_saving(layer, count) > 0]


@dataclass
class _TaskPieces:
    """What one backward per task leaves, enough for the Gramian and for ``Σ w_i g_i``.

    ``outputs[l]`` ``[k, B, out]`` holds every task's output gradient ``D_i`` of linear layer
    ``layers[l]``; ``rows`` ``[k, R]`` the Jacobian of the other ``inputs``
    (``rest``); ``extra_grads[i]`` task ``i``'s gradients of the ``extra`` tensors (the heads;
    ``None`` where the task does not reach one).
    """

    layers: Sequence[_LinearLayer]
    outputs: list[Tensor]
    rest: list[Tensor]
    rows: Tensor
    extra: list[Tensor]
    extra_grads: list[list[Tensor | None]]

    @torch.no_grad()
    def gramian(self) -> Tensor:
        """``J Jᵀ`` over ``layers`` and ``rest``: ``⟨(x xᵀ) D_i, D_j⟩`` for each layer."""
        result = _inner(self.rows, self.rows)
        for layer, d in zip(self.layers, self.outputs):
            count = d.shape[0]
            x = layer.inputs.to(d.dtype)
            kernel = x @ x.mT
            kd = torch.empty_like(d)
            for i in range(count):  # one mm per task: a broadcast matmul would copy the kernel
                torch.mm(kernel, d[i], out=kd[i])
            result += _inner(kd.view(count, -1), d.view(count, -1))
            if layer.bias is not None:
                bias_rows = d.sum(dim=1)
                result += _inner(bias_rows, bias_rows)
        return result.to(self.rows.dtype)

    @torch.no_grad()
    def combined(self, weights: Tensor) -> dict[Tensor, Tensor]:
        """``Σ w_i g_i`` for every input and extra tensor reached, keyed by tensor."""
        grads: dict[Tensor, Tensor] = {}
        for layer, d in zip(self.layers, self.outputs):
            mixed = (weights.to(d.dtype) @ d.view(d.shape[0], -1)).view(d.shape[1:])  # Σ w_i D_i
            grads[layer.weight] = mixed.mT @ layer.inputs.to(d.dtype)
            if layer.bias is not None:
                grads[layer.bias] = mixed.sum(dim=0)
        if self.rest:
            grads.update(_split(self.rest, weights.to(self.rows.dtype) @ self.rows))
        return grads | self.combined_extra(weights)

    @torch.no_grad()
    def combined_extra(self, weights: Tensor) -> dict[Tensor, Tensor]:
        """``Σ w_i g_i`` for the extra tensors (the heads) only."""
        grads: dict[Tensor, Tensor] = {}
        for position, tensor in enumerate(self.extra):
            total = None
            for weight, task_grads in zip(weights, self.extra_grads):
                grad = task_grads[position]
                if grad is not None:
                    term = grad * weight.to(grad.dtype)
                    total = term if total is None else total + term
            if total is not None:
                grads[tensor] = total
        return grads


def _split(tensors: Sequence[Tensor], flat: Tensor) -> dict[Tensor, Tensor]:
    """The flat vector ``flat`` cut into views shaped like ``tensors``, keyed by tensor."""
    pieces = flat.split([t.numel() for t in tensors])
    return {tensor: piece.view_as(tensor) for tensor, piece in zip(tensors, pieces)}


def _backward_targets(
    inputs: Sequence[Tensor], layers: Sequence[_LinearLayer], extra: Sequence[Tensor] = ()
) -> tuple[list[Tensor], list[Tensor | GradientEdge]]:
    """What a per-task backward through ``layers`` is taken to: each layer's output, the
    ``inputs`` the layers do not cover (also returned alone, as ``rest``), then ``extra``."""
    covered = {id(t) for layer in layers for t in (layer.weight, layer.bias) if t is not None}
    rest = [t for t in inputs if id(t) not in covered]
    return rest, [*(GradientEdge(layer.node, 0) for layer in layers), *rest, *extra]


def _task_pieces(
    losses: Tensor,
    inputs: Sequence[Tensor],
    layers: Sequence[_LinearLayer],
    *,
    extra: Sequence[Tensor] = (),
    retain_graph: bool = True,
    scale: Tensor | None = None,
) -> _TaskPieces:
    """One ``torch.autograd.grad`` per task (from its own root) to the output of each of
    ``layers``, to the other ``inputs`` and to ``extra``; unscaled only if ``scale`` is None."""
    rest, targets = _backward_targets(inputs, layers, extra)
    roots = _per_task_roots(losses)
    count = losses.shape[0]
    dtype = torch.promote_types(losses.dtype, inputs[0].dtype)
    one = torch.ones((), dtype=losses.dtype, device=losses.device)
    if scale is not None:
        one = scale.to(one).reshape(())
    outputs = [
        torch.empty(
            count, layer.inputs.shape[0], layer.weight.shape[0], dtype=dtype, device=one.device
        )
        for layer in layers
    ]
    sizes = [t.numel() for t in rest]
    rows = torch.zeros(count, sum(sizes), dtype=dtype, device=one.device)
    extra_grads: list[list[Tensor | None]] = []
    for i in range(count):
        root: Tensor | GradientEdge | None = losses[i] if roots is None else roots[i]
        grads: Sequence[Tensor | None] = [None] * len(targets)
        if root is not None:
            grads = torch.autograd.grad(
                root,  # type: ignore[arg-type]
                targets,  # type: ignore[arg-type]  # torch accepts a mix of tensors and edges
                grad_outputs=one,
                retain_graph=retain_graph or i < count - 1,
                allow_unused=True,
            )
        for output, grad in zip(outputs, grads):
            output[i].copy_(grad) if grad is not None else output[i].zero_()
        reached = [
            g.reshape(-1) if g is not None else None
            for g in grads[len(layers) : len(targets) - len(extra)]
        ]
        if any(g is not None for g in reached):
            torch.cat(
                [g if g is not None else rows.new_zeros(n) for g, n in zip(reached, sizes)],
                out=rows[i],
            )
        extra_grads.append(list(grads[len(targets) - len(extra) :]))
    return _TaskPieces(layers, outputs, rest, rows, list(extra), extra_grads)


def task_gramian(
    losses: Tensor,
    inputs: Sequence[Tensor],
    *,
    retain_graph: bool = True,
    scale: Tensor | None = None,
    layers: Sequence[_LinearLayer] | None = None,
) -> Tensor:
    """``J Jᵀ`` for ``J = jacobian(losses, inputs)`` without materialising the blocks of linear
    layers.

    For a linear layer ``y = x Wᵀ + b`` used once, task ``i``'s gradient w.r.t. ``W`` is
    ``D_iᵀ x`` with ``D_i = ∂L_i/∂y`` ``[B, out]``, so its Gramian block is
    ``⟨D_iᵀ x, D_jᵀ x⟩ = ⟨(x xᵀ) D_i, D_j⟩`` and the bias block ``⟨1ᵀ D_i, 1ᵀ D_j⟩``. The
    per-task backward then stops at ``D`` (no weight gradients) and costs ``B²·out`` instead of
    ``B·in·out`` per layer: cheaper whenever the batch is smaller than the layer's input width
    (``layers`` defaults to the layers where that is so). Other inputs (convolutions,
    normalisation, ...) are materialised as in :func:`jacobian`.

    >>> lin = torch.nn.Linear(3, 2)
    >>> x = torch.randn(2, 3)
    >>> out = lin(x)
    >>> losses = torch.stack([out[:, 0].pow(2).mean(), out.sum()])
    >>> params = list(lin.parameters())
    >>> torch.allclose(task_gramian(losses, params), gramian(jacobian(losses, params)), atol=1e-5)
    True
    """
    inputs = list(inputs)
    if layers is None:
        layers = _cheaper_layers(losses, inputs)
    pieces = _task_pieces(losses, inputs, layers, retain_graph=retain_graph, scale=scale)
    return pieces.gramian()


def gramian_backward(
    losses: Tensor,
    inputs: Sequence[Tensor],
    weights_of: Callable[[Tensor], Tensor],
    *,
    scale: Tensor | None = None,
) -> Tensor:
    """Fill ``.grad`` with the gradient of ``Σ w_i L_i``, ``w = weights_of(G)`` with ``G`` the
    Gramian of the task gradients w.r.t. ``inputs``; return ``w`` (detached).

    This is the whole backward of a Gramian-weighting strategy, done the cheapest way measured:

    * ``inputs`` not leaves (features): the (small) Jacobian, its Gramian, one weighted backward;
    * leaves (shared parameters): one backward per task, each from its own loss, to the output
      gradients of the linear layers where their pieces are cheaper (see :func:`task_gramian`),
      to the other shared parameters and to every other leaf (the heads). ``G`` comes from those
      pieces, and ``.grad`` is written from them: ``Σ w_i g_i`` for each tensor, the linear
      layers' as one weight gradient ``(Σ w_i D_i)ᵀ x``. Nothing is traversed twice: no backward
      of the trunk or of the heads after the weights. The graph is freed by the last task's
      backward.

    ``scale`` (mixed precision) multiplies the losses for every backward; ``G`` is unscaled and
    ``.grad`` receives the scaled gradient, as ``(scale * Σ w_i L_i).backward()`` writes.
    """
    inputs = list(inputs)
    if not all(t.is_leaf for t in inputs):
        rows = jacobian(losses, inputs, scale=scale)
        if scale is not None:
            rows = rows / scale.to(rows)
        weights = weights_of(gramian(rows)).detach().to(losses.dtype)
        total = (weights * losses).sum()
        (total if scale is None else total * scale).backward()
        return weights
    pieces = _leaf_pieces(losses, inputs, _cheaper_layers(losses, inputs), scale)
    matrix = pieces.gramian()
    if scale is not None:
        matrix = matrix / scale.to(matrix) ** 2
    weights = weights_of(matrix).detach().to(losses.dtype)
    for tensor, grad in pieces.combined(weights).items():
        _add_grad(tensor, grad)
    return weights


def direction_backward(
    losses: Tensor,
    inputs: Sequence[Tensor],
    direction_of: Callable[[Tensor], tuple[Tensor, Tensor]],
    *,
    scale: Tensor | None = None,
) -> None:
    """Fill ``.grad`` for a method with its own direction: ``d, h = direction_of(J)`` (``J`` the
    unscaled rows ``[k, P]``); the leaf tensors ``inputs`` (the shared parameters) get ``d``
    (flat, ``[P]``), every other leaf (a head) the gradient of ``Σ h_i L_i`` (ones for the
    gradient of the plain sum).

    One backward per task, each from its own loss, leaves ``J`` and the heads' gradients: nothing
    is traversed again after the direction (the trunk's k backwards are the whole cost). With
    ``scale`` (mixed precision) ``.grad`` receives the scaled gradients, as ``backward`` of the
    scaled losses writes them.
    """
    inputs = list(inputs)
    pieces = _leaf_pieces(losses, inputs, (), scale)
    rows = pieces.rows if scale is None else pieces.rows / scale.to(pieces.rows)
    direction, heads = direction_of(rows)
    if scale is not None:
        direction = direction * scale.to(direction)
    for tensor, grad in (_split(inputs, direction) | pieces.combined_extra(heads)).items():
        _add_grad(tensor, grad)


def _leaf_pieces(
    losses: Tensor,
    inputs: Sequence[Tensor],
    layers: Sequence[_LinearLayer],
    scale: Tensor | None,
) -> _TaskPieces:
    """:func:`_task_pieces` w.r.t. the leaf tensors ``inputs``, with every other leaf the losses
    reach (the heads) as ``extra``, freeing the graph with the last task's backward."""
    shared = {id(t) for t in inputs}
    heads = [leaf for leaf in graph_leaves(losses) if id(leaf) not in shared]
    return _task_pieces(losses, inputs, layers, extra=heads, retain_graph=False, scale=scale)


def _add_grad(tensor: Tensor, grad: Tensor) -> None:
    """``tensor.grad += grad`` (set when there is none), in the tensor's dtype."""
    grad = grad.to(tensor.dtype)
    if tensor.grad is None:
        tensor.grad = grad if grad.is_contiguous() else grad.contiguous()
    else:
        tensor.grad += grad
