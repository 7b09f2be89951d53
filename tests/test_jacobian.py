"""The per-task gradient engine: Jacobian (loop, batched, per-task roots), Gramians (plain and
from linear-layer contributions), writing gradients back."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from taskbalance.jacobian import (
    _cheaper_layers,
    _linear_layers,
    accumulate_grad,
    backward_with_direction,
    direction_backward,
    gramian,
    gramian_backward,
    jacobian,
    task_gramian,
)

METHODS = ["auto", "loop", "batched"]


def _tiny() -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """L1 = (w·x + b)², L2 = 3·w₀ + b on hand-picked numbers; also an unreached input."""
    w = torch.tensor([1.0, -2.0], dtype=torch.float64, requires_grad=True)
    b = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    unused = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    x = torch.tensor([3.0, 1.0], dtype=torch.float64)
    u = w @ x + b  # 1.5
    losses = torch.stack([u**2, 3 * w[0] + b])
    return losses, w, b, unused, x


def _expected() -> Tensor:
    # dL1/dw = 2u·x = [9, 3], dL1/db = 2u = 3; dL2/dw = [3, 0], dL2/db = 1; unused: zeros.
    return torch.tensor(
        [[9.0, 3.0, 3.0, 0.0, 0.0, 0.0], [3.0, 0.0, 1.0, 0.0, 0.0, 0.0]], dtype=torch.float64
    )


@pytest.mark.parametrize("method", METHODS)
def test_jacobian_matches_hand_derived(method: str) -> None:
    losses, w, b, unused, _ = _tiny()
    rows = jacobian(losses, [w, b, unused], method=method)  # type: ignore[arg-type]
    assert rows.shape == (2, 6)
    torch.testing.assert_close(rows, _expected())


@pytest.mark.parametrize("method", METHODS)
def test_jacobian_of_a_sequence_and_of_a_non_stack_vector(method: str) -> None:
    losses, w, b, unused, x = _tiny()
    u = w @ x + b
    sequence = [u**2, 3 * w[0] + b]
    torch.testing.assert_close(
        jacobian(sequence, [w, b, unused], method=method),  # type: ignore[arg-type]
        _expected(),
    )
    # Not a torch.stack: rows are taken by one-hot vectors through the whole vector.
    doubled = losses * 2
    torch.testing.assert_close(
        jacobian(doubled, [w, b, unused], method=method),  # type: ignore[arg-type]
        2 * _expected(),
    )


@pytest.mark.parametrize("method", METHODS)
def test_jacobian_scale_gives_the_scaled_rows(method: str) -> None:
    losses, w, b, unused, _ = _tiny()
    scale = torch.tensor([1024.0], dtype=torch.float64)
    rows = jacobian(losses, [w, b, unused], method=method, scale=scale)  # type: ignore[arg-type]
    torch.testing.assert_close(rows, 1024 * _expected())


def test_loop_equals_batched_on_a_network() -> None:
    torch.manual_seed(0)
    trunk = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 4))
    heads = [nn.Linear(4, 1) for _ in range(3)]
    z = trunk(torch.randn(6, 5))
    losses = torch.stack([h(z).pow(2).mean() for h in heads])
    params = list(trunk.parameters())
    loop = jacobian(losses, params, method="loop")
    batched = jacobian(losses, params, method="batched")
    torch.testing.assert_close(loop, batched)
    # Against one autograd.grad per loss from scratch.
    for i in range(3):
        grads = torch.autograd.grad(losses[i], params, retain_graph=True)
        torch.testing.assert_close(loop[i], torch.cat([g.reshape(-1) for g in grads]))
    features = jacobian(losses, [z], method="loop")
    torch.testing.assert_close(features, jacobian(losses, [z], method="batched"))
    assert features.shape == (3, 6 * 4)


def test_stacked_losses_run_each_head_once() -> None:
    """Row i starts at the i-th input of the stack: T head backwards, not T² (the speed-up)."""
    z = torch.randn(4, 3, requires_grad=True)
    calls = [0, 0, 0]
    outputs = []
    for i in range(3):
        out = z * (i + 1.0)
        out.register_hook(lambda grad, i=i: calls.__setitem__(i, calls[i] + 1))
        outputs.append(out.sum())
    rows = jacobian(torch.stack(outputs), [z], method="loop")
    assert calls == [1, 1, 1]
    torch.testing.assert_close(rows, torch.tensor([[1.0] * 12, [2.0] * 12, [3.0] * 12]))


def test_jacobian_rejects_unknown_method() -> None:
    losses, w, *_ = _tiny()
    with pytest.raises(ValueError, match="method must be"):
        jacobian(losses, [w], method="vmap")  # type: ignore[arg-type]


def test_retain_graph_false_frees_the_graph_after_the_last_row() -> None:
    losses, w, b, _, _ = _tiny()
    jacobian(losses, [w, b], retain_graph=False)
    with pytest.raises(RuntimeError, match="second time"):
        losses.sum().backward()


def test_gramian_by_hand() -> None:
    rows = torch.tensor([[1.0, 2.0, 0.0], [0.0, 1.0, -1.0]])
    torch.testing.assert_close(gramian(rows), torch.tensor([[5.0, 2.0], [2.0, 2.0]]))


class _Net(nn.Module):
    """Linear layers (one without bias, one fed a 3-D tensor), a convolution, a shared weight."""

    def __init__(self, tie: bool = False) -> None:
        super().__init__()
        self.conv = nn.Conv1d(2, 3, 3, padding=1)
        self.first = nn.Linear(12, 16)
        self.second = nn.Linear(16, 8, bias=False)
        self.third = nn.Linear(8, 8)
        self.tie = tie

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv(x).flatten(1)  # [B, 12]
        h = torch.relu(self.first(h))
        h = torch.tanh(self.second(h.unsqueeze(1))).squeeze(1)  # 3-D input to a linear layer
        h = self.third(h)
        return self.third(torch.relu(h)) if self.tie else h


def _losses(net: nn.Module, batch: int, tasks: int = 3) -> Tensor:
    torch.manual_seed(1)
    z = net(torch.randn(batch, 2, 4, dtype=torch.float64))
    heads = [nn.Linear(8, 1).double() for _ in range(tasks)]
    return torch.stack([h(z).pow(2).mean() for h in heads])


@pytest.mark.parametrize("batch", [3, 40])  # kernel (B < in) and weight-gradient branches
@pytest.mark.parametrize("tie", [False, True])
def test_task_gramian_equals_the_materialised_gramian(batch: int, tie: bool) -> None:
    torch.manual_seed(0)
    net = _Net(tie).double()
    losses = _losses(net, batch)
    params = list(net.parameters())
    expected = gramian(jacobian(losses, params))
    torch.testing.assert_close(task_gramian(losses, params), expected)
    layers = _linear_layers(losses, params)
    # first, second (no bias, 3-D input) and third; third is used twice when tied: excluded.
    found = {id(layer.weight) for layer in layers}
    assert found == {id(net.first.weight), id(net.second.weight)} | (
        set() if tie else {id(net.third.weight)}
    )
    assert id(net.conv.weight) not in found


def test_task_gramian_runs_each_head_once() -> None:
    # as for jacobian: row i starts at the i-th input of the stack, not at a one-hot vector
    layer = nn.Linear(6, 3).double()
    z = layer(torch.randn(2, 6, dtype=torch.float64))
    calls = [0, 0, 0]
    outputs = []
    for i in range(3):
        out = z * (i + 1.0)
        out.register_hook(lambda grad, i=i: calls.__setitem__(i, calls[i] + 1))
        outputs.append(out.pow(2).sum())
    losses = torch.stack(outputs)
    task_gramian(losses, list(layer.parameters()))
    assert calls == [1, 1, 1]


def test_task_gramian_zero_block_for_a_task_that_misses_a_layer() -> None:
    # task b does not reach the layer (batch 5 ≠ its 3 inputs): a zero block of the layer's
    # output shape
    torch.manual_seed(0)
    layer, extra = nn.Linear(3, 2).double(), torch.ones(2, dtype=torch.float64, requires_grad=True)
    out = layer(torch.randn(5, 3, dtype=torch.float64))
    losses = torch.stack([out.pow(2).mean(), (extra**2).sum()])
    params = [*layer.parameters(), extra]
    torch.testing.assert_close(task_gramian(losses, params), gramian(jacobian(losses, params)))


def test_task_gramian_retain_graph_false_frees_the_graph_after_the_last_row() -> None:
    net = _Net().double()
    losses = _losses(net, 3)  # three heads on one trunk: every row needs the shared graph
    params = list(net.parameters())
    expected = gramian(jacobian(losses, params))
    torch.testing.assert_close(task_gramian(losses, params, retain_graph=False), expected)
    with pytest.raises(RuntimeError, match="second time"):
        losses.sum().backward()


@pytest.mark.parametrize("batch", [2, 8])  # kernel (B < in) and weight-gradient branches
def test_task_gramian_of_float64_losses_on_a_float32_layer(batch: int) -> None:
    torch.manual_seed(0)
    layer = nn.Linear(4, 3)
    out = layer(torch.randn(batch, 4))
    losses = torch.stack([out.pow(2).mean().double(), out.sum().double()])
    params = list(layer.parameters())
    result = task_gramian(losses, params)
    assert result.dtype == torch.float64
    torch.testing.assert_close(result, gramian(jacobian(losses, params)), rtol=1e-5, atol=1e-6)


def test_task_gramian_of_a_layer_whose_bias_is_not_an_input() -> None:
    # only the weight is shared: the layer is materialised, and the bias contributes nothing
    torch.manual_seed(0)
    layer = nn.Linear(6, 2).double()
    out = layer(torch.randn(3, 6, dtype=torch.float64))
    losses = torch.stack([out.pow(2).mean(), out.sum()])
    expected = gramian(jacobian(losses, [layer.weight]))
    torch.testing.assert_close(task_gramian(losses, [layer.weight]), expected)


def test_task_gramian_of_layers_outside_the_inputs_is_materialised() -> None:
    torch.manual_seed(0)
    net = _Net().double()
    losses = _losses(net, 3)
    params = [*net.third.parameters(), net.conv.weight]
    layers = _linear_layers(losses, params)
    assert [layer.weight for layer in layers] == [net.third.weight]
    torch.testing.assert_close(task_gramian(losses, params), gramian(jacobian(losses, params)))


def _trunk_and_losses(batch: int, tasks: int) -> tuple[nn.Module, list[nn.Module], Tensor, Tensor]:
    torch.manual_seed(0)
    trunk = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU()).double()
    heads = [nn.Linear(32, 1).double() for _ in range(tasks)]
    z = trunk(torch.randn(batch, 32, dtype=torch.float64))
    losses = torch.stack([(h(z).squeeze(1) - i).pow(2).mean() for i, h in enumerate(heads)])
    return trunk, heads, z, losses


def _grads(modules: list[nn.Module]) -> Tensor:
    return torch.cat([p.grad.reshape(-1) for m in modules for p in m.parameters()])  # type: ignore[union-attr]


def _reference(batch: int, tasks: int, weigh: object, features: bool) -> tuple[Tensor, Tensor]:
    trunk, heads, z, losses = _trunk_and_losses(batch, tasks)
    inputs = [z] if features else list(trunk.parameters())
    weights = weigh(gramian(jacobian(losses, inputs))).detach()  # type: ignore[operator]
    (weights * losses).sum().backward()
    return weights, _grads([trunk, *heads])


def _inverse_norm(matrix: Tensor) -> Tensor:
    return 1 / matrix.diagonal().sqrt()


@pytest.mark.parametrize(
    ("batch", "tasks", "features"),
    [(4, 8, False), (64, 2, False), (4, 8, True)],  # layer Gramian / w @ J finish / features
)
def test_gramian_backward_equals_weights_then_one_weighted_backward(
    batch: int, tasks: int, features: bool
) -> None:
    expected_weights, expected = _reference(batch, tasks, _inverse_norm, features)
    trunk, heads, z, losses = _trunk_and_losses(batch, tasks)
    inputs = [z] if features else list(trunk.parameters())
    weights = gramian_backward(losses, inputs, _inverse_norm)
    torch.testing.assert_close(weights, expected_weights)
    torch.testing.assert_close(_grads([trunk, *heads]), expected)


def test_gramian_backward_with_a_loss_scale_gives_the_scaled_gradient() -> None:
    _, expected = _reference(4, 8, _inverse_norm, False)
    trunk, heads, _, losses = _trunk_and_losses(4, 8)
    scale = torch.tensor([8.0], dtype=torch.float64)
    gramian_backward(losses, list(trunk.parameters()), _inverse_norm, scale=scale)
    torch.testing.assert_close(_grads([trunk, *heads]), 8 * expected)


@pytest.mark.parametrize("features", [False, True])
def test_backward_with_direction_sets_the_shared_gradient(features: bool) -> None:
    trunk, heads, z, losses = _trunk_and_losses(4, 3)
    shared = list(trunk.parameters())
    inputs = [z] if features else shared
    size = sum(t.numel() for t in inputs)
    direction = torch.linspace(-1, 1, size, dtype=torch.float64)
    backward_with_direction(losses.sum(), inputs, direction)
    head_grads = _grads(heads)
    # Heads: the gradient of the sum, as an ordinary backward gives.
    _, reference_heads, _, reference_losses = _trunk_and_losses(4, 3)
    reference_losses.sum().backward()
    torch.testing.assert_close(head_grads, _grads(reference_heads))
    if not features:
        torch.testing.assert_close(_grads([trunk]), direction)
    else:  # the trunk gets the backward of `direction` placed at the features
        trunk2, _, z3, _ = _trunk_and_losses(4, 3)
        z3.backward(direction.view_as(z3))
        torch.testing.assert_close(_grads([trunk]), _grads([trunk2]))


def test_accumulate_grad_sets_then_adds() -> None:
    a = torch.zeros(2, 2, requires_grad=True)
    b = torch.zeros(3, requires_grad=True)
    b.grad = torch.ones(3)
    vector = torch.arange(7.0)
    accumulate_grad([a, b], vector)
    torch.testing.assert_close(a.grad, torch.tensor([[0.0, 1.0], [2.0, 3.0]]))
    torch.testing.assert_close(b.grad, torch.tensor([5.0, 6.0, 7.0]))
    vector.zero_()  # a's new .grad must be a copy, not a view of the vector
    torch.testing.assert_close(a.grad, torch.tensor([[0.0, 1.0], [2.0, 3.0]]))
    accumulate_grad([a, b], torch.ones(7))
    torch.testing.assert_close(a.grad, torch.tensor([[1.0, 2.0], [3.0, 4.0]]))


def test_accumulate_grad_casts_to_the_parameter_dtype_and_checks_the_size() -> None:
    half = torch.zeros(2, dtype=torch.float16, requires_grad=True)
    accumulate_grad([half], torch.tensor([0.5, 1.5], dtype=torch.float64))
    assert half.grad is not None and half.grad.dtype == torch.float16
    with pytest.raises(ValueError, match="3 entries, the parameters 2"):
        accumulate_grad([half], torch.ones(3))


def test_gramian_backward_traverses_each_head_once_and_frees_the_graph() -> None:
    # The weights come from one backward per task; .grad is written from what those left, so
    # no head (and no part of the trunk) is backpropagated a second time after the weights.
    trunk, heads, z, losses = _trunk_and_losses(4, 3)
    calls = [0, 0, 0, 0]
    z.register_hook(lambda grad: calls.__setitem__(3, calls[3] + 1))
    for i, head in enumerate(heads):
        head.weight.register_hook(lambda grad, i=i: calls.__setitem__(i, calls[i] + 1))
    gramian_backward(losses, list(trunk.parameters()), _inverse_norm)
    assert calls == [1, 1, 1, 3]  # each head once; the trunk once per task
    with pytest.raises(RuntimeError, match="second time"):
        losses[0].backward()  # the last task's backward freed the trunk's buffers


def test_gramian_backward_sums_the_weighted_gradients_of_a_leaf_two_tasks_reach() -> None:
    # a tensor outside shared_params that two tasks use (not a head): Σ w_i ∇_t L_i, as the
    # weighted backward gives
    torch.manual_seed(0)
    trunk = nn.Linear(5, 4).double()
    both = torch.randn(4, dtype=torch.float64, requires_grad=True)
    x = torch.randn(3, 5, dtype=torch.float64)

    def losses_of() -> Tensor:
        z = trunk(x)
        return torch.stack([(z @ both).pow(2).mean(), (z @ both - 1).abs().mean(), z.sum()])

    losses = losses_of()
    weights = gramian_backward(losses, list(trunk.parameters()), _inverse_norm)
    got = [both.grad.clone(), trunk.weight.grad.clone()]  # type: ignore[union-attr]
    both.grad, trunk.weight.grad = None, None
    (weights * losses_of()).sum().backward()
    torch.testing.assert_close(got, [both.grad, trunk.weight.grad])


@pytest.mark.parametrize(("batch", "pieces"), [(8, True), (64, False)])
def test_linear_layer_pieces_are_used_only_where_cheaper(batch: int, pieces: bool) -> None:
    # pieces cost B²·in + k·B²·out + ...; the block k·B·in·out + ...: narrow batches only
    trunk, _, _, losses = _trunk_and_losses(batch, 8)
    layers = _cheaper_layers(losses, list(trunk.parameters()))
    assert len(layers) == (2 if pieces else 0)


@pytest.mark.parametrize("take", ["zip", "index", "unbind"])
def test_losses_taken_from_one_stacked_tensor_start_at_their_own_input(take: str) -> None:
    # dict(zip(tasks, torch.stack(losses))): each row starts at its loss's own input to the
    # user's stack, so no other head runs; the rows are those of the separate losses, bit for bit
    trunk, heads, z, _ = _trunk_and_losses(4, 3)
    calls = [0, 0, 0]
    outputs = []
    for i, head in enumerate(heads):
        out = head(z)
        out.register_hook(lambda grad, i=i: calls.__setitem__(i, calls[i] + 1))
        outputs.append((out.squeeze(1) - i).pow(2).mean())
    stacked = torch.stack(outputs)
    parts = {
        "zip": lambda: list(stacked),
        "index": lambda: [stacked[i] for i in range(3)],
        "unbind": lambda: list(stacked.unbind()),
    }[take]()
    params = list(trunk.parameters())
    rows = jacobian(torch.stack(parts), params)
    assert calls == [1, 1, 1]
    torch.testing.assert_close(rows, jacobian(torch.stack(outputs), params), rtol=0, atol=0)


def test_gramian_error_does_not_grow_with_the_number_of_parameters() -> None:
    # Nash-MTL's trainer lost 0.6–1.5 % of its squared norms over 44M parameters in one float32
    # product; the blocked float64 sum stays at float32's resolution
    torch.manual_seed(0)
    rows = 1 + 0.1 * torch.randn(3, (1 << 24) + 123)
    exact = rows.double() @ rows.double().mT
    one_product = rows @ rows.mT
    assert ((one_product.double() - exact).abs().max() / exact.abs().max()).item() > 1e-6
    result = gramian(rows)
    assert result.dtype == torch.float32
    assert ((result.double() - exact).abs().max() / exact.abs().max()).item() < 2e-7


@pytest.mark.parametrize("scale", [None, 8.0])
def test_direction_backward_writes_the_direction_and_the_heads_weighted_gradient(
    scale: float | None,
) -> None:
    trunk, heads, _, losses = _trunk_and_losses(4, 3)
    shared = list(trunk.parameters())
    expected_rows = jacobian(losses, shared)
    calls = [0, 0, 0]
    for i, head in enumerate(heads):
        head.weight.register_hook(lambda grad, i=i: calls.__setitem__(i, calls[i] + 1))
    seen = []

    def direction(rows: Tensor) -> Tensor:
        return rows.sum(0) * torch.linspace(0, 1, rows.shape[1], dtype=rows.dtype)

    def direction_of(rows: Tensor) -> tuple[Tensor, Tensor]:
        seen.append(rows)
        return direction(rows), torch.tensor([1.0, 2.0, 3.0], dtype=rows.dtype)

    factor = None if scale is None else torch.tensor([scale], dtype=torch.float64)
    direction_backward(losses, shared, direction_of, scale=factor)
    assert calls == [1, 1, 1]  # each head once: its gradient comes from its task's backward
    torch.testing.assert_close(seen[0], expected_rows)  # unscaled rows
    _, reference_heads, _, reference_losses = _trunk_and_losses(4, 3)
    (reference_losses * torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)).sum().backward()
    times = 1.0 if scale is None else scale
    torch.testing.assert_close(_grads(heads), times * _grads(reference_heads))
    torch.testing.assert_close(_grads([trunk]), times * direction(expected_rows))
