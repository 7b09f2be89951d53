"""Per-task optimizers (TaskOptimizers), make_optimizer and the checkpointable Lookahead."""

from __future__ import annotations

import copy
import inspect
import io

import pytest
import torch
import torch_optimizer
from torch import Tensor, nn

import taskbalance as tb
from taskbalance.optim import Lookahead


# --------------------------------------------------------------------------- helpers
class Net(nn.Module):
    """Two-layer trunk, one head per task, and a parameter no loss reaches."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.trunk = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 4), nn.Tanh())
        self.cls = nn.Linear(4, 2)
        self.reg = nn.Linear(4, 1)
        self.spare = nn.Parameter(torch.randn(2))

    def losses(self, x: Tensor, y: Tensor, t: Tensor) -> dict[str, Tensor]:
        z = self.trunk(x)
        return {
            "cls": nn.functional.cross_entropy(self.cls(z), y),
            "reg": nn.functional.mse_loss(self.reg(z).squeeze(1), t),
        }


def batch(seed: int = 1) -> tuple[Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(8, 3, generator=g),
        torch.randint(0, 2, (8,), generator=g),
        torch.randn(8, generator=g),
    )


def snapshot(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same_tree(a: object, b: object) -> bool:
    if isinstance(a, Tensor):
        return isinstance(b, Tensor) and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return (
            isinstance(b, dict) and a.keys() == b.keys() and all(same_tree(a[k], b[k]) for k in a)
        )
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same_tree(x, y) for x, y in zip(a, b))  # type: ignore[arg-type]
    return a == b


def roundtrip(state: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


# --------------------------------------------------------------------------- a hand-computable pair
# θ = (a, b); L_cls = (ab − 1)², L_reg = (a + b)².
def pair_losses(a: Tensor, b: Tensor) -> dict[str, Tensor]:
    return {"cls": (a * b - 1) ** 2, "reg": (a + b) ** 2}


def grad_cls(a: float, b: float) -> tuple[float, float]:
    return 2 * (a * b - 1) * b, 2 * (a * b - 1) * a


def grad_reg(a: float, b: float) -> tuple[float, float]:
    return 2 * (a + b), 2 * (a + b)


def test_simultaneous_sgd_is_theta_minus_each_tasks_step() -> None:
    a0, b0, lr_cls, lr_reg = 0.5, 2.0, 0.1, 0.01
    a = nn.Parameter(torch.tensor(a0, dtype=torch.float64))
    b = nn.Parameter(torch.tensor(b0, dtype=torch.float64))
    opt = tb.TaskOptimizers(
        {
            "cls": torch.optim.SGD([a, b], lr=lr_cls),
            "reg": tb.make_optimizer("sgd", [a, b], lr=lr_reg),
        }
    )
    report = opt.backward(pair_losses(a, b))
    opt.step()
    gc, gr = grad_cls(a0, b0), grad_reg(a0, b0)
    assert a.item() == pytest.approx(a0 - lr_cls * gc[0] - lr_reg * gr[0], abs=1e-15)
    assert b.item() == pytest.approx(b0 - lr_cls * gc[1] - lr_reg * gr[1], abs=1e-15)
    # pinned: a = 0.5 − 0.1·0 − 0.01·5 = 0.45, b = 2 − 0 − 0.05 = 1.95 (ab = 1: L_cls is flat)
    assert (a.item(), b.item()) == pytest.approx((0.45, 1.95), abs=1e-15)
    assert report.to_dict() == {"loss/cls": 0.0, "loss/reg": 6.25, "weight/cls": 1.0,
                                "weight/reg": 1.0}  # fmt: skip
    assert a.grad is None and b.grad is None  # kept gradients are consumed by step()


def test_simultaneous_updates_are_taken_at_the_same_point_with_weight_decay() -> None:
    # Weight decay reads θ: each optimizer's update is computed at θ, not after the other's.
    a0, b0, lr_cls, lr_reg, wd = 0.3, -1.2, 0.1, 0.05, 0.2
    results = []
    for order in (("cls", "reg"), ("reg", "cls")):
        a = nn.Parameter(torch.tensor(a0, dtype=torch.float64))
        b = nn.Parameter(torch.tensor(b0, dtype=torch.float64))
        lrs = {"cls": lr_cls, "reg": lr_reg}
        opt = tb.TaskOptimizers(
            {t: torch.optim.SGD([a, b], lr=lrs[t], weight_decay=wd) for t in order}
        )
        opt.backward(pair_losses(a, b))
        opt.step()
        results.append((a.item(), b.item()))
    gc, gr = grad_cls(a0, b0), grad_reg(a0, b0)
    expected = (
        a0 - lr_cls * (gc[0] + wd * a0) - lr_reg * (gr[0] + wd * a0),
        b0 - lr_cls * (gc[1] + wd * b0) - lr_reg * (gr[1] + wd * b0),
    )
    assert results[0] == pytest.approx(expected, abs=1e-14)
    assert results[1] == pytest.approx(expected, abs=1e-14)


def test_simultaneous_result_does_not_depend_on_the_order_of_the_tasks() -> None:
    def run(order: tuple[str, ...]) -> dict[str, Tensor]:
        model = Net()
        make = {
            "cls": lambda: torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.5),
            "reg": lambda: tb.make_optimizer("lamb", model.parameters(), lr=1e-2, weight_decay=0.1),
        }
        opt = tb.TaskOptimizers({t: make[t]() for t in order})
        for seed in range(3):
            opt.zero_grad()
            opt.backward(model.losses(*batch(seed)))
            opt.step()
        return snapshot(model)

    forward, backward = run(("cls", "reg")), run(("reg", "cls"))
    for key in forward:
        torch.testing.assert_close(forward[key], backward[key], rtol=0, atol=1e-6)


def test_sequential_is_the_recomputed_chain() -> None:
    a0, b0, lr_cls, lr_reg = 0.5, 1.5, 0.1, 0.01
    a = nn.Parameter(torch.tensor(a0, dtype=torch.float64))
    b = nn.Parameter(torch.tensor(b0, dtype=torch.float64))
    opt = tb.TaskOptimizers(
        {"cls": torch.optim.SGD([a, b], lr=lr_cls), "reg": torch.optim.SGD([a, b], lr=lr_reg)},
        mode="sequential",
    )
    calls = []

    def closure() -> dict[str, Tensor]:
        calls.append((a.item(), b.item()))
        return pair_losses(a, b)

    report = opt.step(closure)
    gc = grad_cls(a0, b0)
    a1, b1 = a0 - lr_cls * gc[0], b0 - lr_cls * gc[1]
    gr = grad_reg(a1, b1)  # the reg gradient at the parameters the cls update left
    a2, b2 = a1 - lr_reg * gr[0], b1 - lr_reg * gr[1]
    assert (a.item(), b.item()) == pytest.approx((a2, b2), abs=1e-15)
    assert [pytest.approx(c) for c in calls] == [(a0, b0), (a1, b1)]
    assert report.tasks == ("cls", "reg")
    assert report.losses["reg"].item() == pytest.approx((a1 + b1) ** 2)
    # pinned: θ₁ = (0.575, 1.525), ∇L_reg(θ₁) = (4.2, 4.2), θ₂ = (0.533, 1.483)
    assert (a.item(), b.item()) == pytest.approx((0.533, 1.483), abs=1e-12)


# --------------------------------------------------------------------------- the article's recipe
def test_the_articles_recipe_raises_on_a_two_layer_trunk_and_task_optimizers_does_it() -> None:
    model = Net()
    x, y, t = batch()
    reference = copy.deepcopy(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    losses = model.losses(x, y, t)
    losses["cls"].backward(retain_graph=True)
    optimizer.step()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        losses["reg"].backward()

    # What it meant: both gradients at the same θ, each applied with its task's step size.
    params = list(reference.parameters())
    ref_losses = reference.losses(x, y, t)
    g_cls = torch.autograd.grad(ref_losses["cls"], params, retain_graph=True, allow_unused=True)
    g_reg = torch.autograd.grad(ref_losses["reg"], params, allow_unused=True)
    model = copy.deepcopy(reference)
    opt = tb.TaskOptimizers(
        {
            "cls": torch.optim.SGD(model.parameters(), lr=0.1),
            "reg": torch.optim.SGD(model.parameters(), lr=0.03),
        }
    )
    opt.zero_grad()
    opt.backward(model.losses(x, y, t))
    opt.step()
    for p, p0, gc, gr in zip(model.parameters(), params, g_cls, g_reg):
        expected = p0.detach().clone()
        if gc is not None:
            expected -= 0.1 * gc
        if gr is not None:
            expected -= 0.03 * gr
        torch.testing.assert_close(p.detach(), expected, rtol=0, atol=1e-7)


def test_the_articles_recipe_on_one_layer_runs_but_applies_the_cls_gradient_twice() -> None:
    torch.manual_seed(0)
    trunk, head_cls, head_reg = nn.Linear(3, 4), nn.Linear(4, 2), nn.Linear(4, 1)
    x, y, t = batch()
    params = [*trunk.parameters(), *head_cls.parameters(), *head_reg.parameters()]
    start = [p.detach().clone() for p in params]

    def losses() -> dict[str, Tensor]:
        z = trunk(x)
        return {
            "cls": nn.functional.cross_entropy(head_cls(z), y),
            "reg": nn.functional.mse_loss(head_reg(z).squeeze(1), t),
        }

    first = losses()
    g_cls = torch.autograd.grad(first["cls"], params, retain_graph=True, allow_unused=True)
    g_reg = torch.autograd.grad(first["reg"], params, allow_unused=True)
    optimizer = torch.optim.SGD(params, lr=0.1)
    recipe = losses()
    recipe["cls"].backward(retain_graph=True)
    optimizer.step()
    recipe["reg"].backward()  # no error: one Linear's backward needs only its input
    optimizer.step()
    for p, p0, gc, gr in zip(params, start, g_cls, g_reg):
        gc = torch.zeros_like(p0) if gc is None else gc
        gr = torch.zeros_like(p0) if gr is None else gr
        # .grad was never zeroed: the second step applies g_cls again, plus g_reg.
        torch.testing.assert_close(p.detach(), p0 - 0.1 * gc - 0.1 * (gc + gr))


# --------------------------------------------------------------------------- unreached parameters
def test_a_parameter_a_task_does_not_reach_is_untouched_by_its_optimizer() -> None:
    model = Net()
    x, y, t = batch()
    lr, momentum, wd = 0.1, 0.9, 0.05
    opt = tb.TaskOptimizers(
        {
            "cls": torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.5, weight_decay=0.3),
            "reg": torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=wd),
        }
    )
    spare = model.spare.detach().clone()
    head = [p.detach().clone() for p in model.reg.parameters()]
    position = {id(p): i for i, p in enumerate(model.parameters())}
    unreached_by_cls = [position[id(p)] for p in [model.spare, *model.reg.parameters()]]
    buffers: list[Tensor | None] = [None, None]
    for _ in range(4):
        opt.zero_grad()
        opt.backward(model.losses(x, y, t))
        cls_grads, reg_grads = opt.task_gradients("cls"), opt.task_gradients("reg")
        assert [cls_grads[i] for i in unreached_by_cls] == [None, None, None]
        for i, p in enumerate(model.reg.parameters()):
            g = reg_grads[position[id(p)]]
            assert g is not None
            d = g + wd * head[i]  # SGD: weight decay, then momentum, on reg's gradient only
            buffers[i] = d.clone() if buffers[i] is None else momentum * buffers[i] + d
            head[i] = head[i] - lr * buffers[i]
        opt.step()
    # The cls optimizer holds no state for what cls never reached, and moved none of it.
    for p in [*model.reg.parameters(), model.spare]:
        assert p not in opt["cls"].state
    assert model.spare not in opt["reg"].state
    assert torch.equal(model.spare.detach(), spare)  # weight decay did not drift it
    for p, expected in zip(model.reg.parameters(), head):
        torch.testing.assert_close(p.detach(), expected, rtol=0, atol=1e-6)


def test_partial_labels_step_only_the_present_tasks() -> None:
    model = Net()
    x, y, t = batch()
    opt = tb.TaskOptimizers(
        {
            "cls": torch.optim.Adam([*model.trunk.parameters(), *model.cls.parameters()]),
            "reg": torch.optim.Adam(model.reg.parameters(), weight_decay=0.1),
        }
    )
    before = snapshot(model.reg)
    report = opt.backward({"cls": model.losses(x, y, t)["cls"]})
    opt.step()
    assert report.tasks == ("cls",)
    assert same_tree(snapshot(model.reg), before)
    assert not opt["reg"].state and opt["cls"].state


def test_backward_twice_accumulates_like_grad() -> None:
    a = nn.Parameter(torch.tensor(0.5, dtype=torch.float64))
    b = nn.Parameter(torch.tensor(2.0, dtype=torch.float64))
    opt = tb.TaskOptimizers({"reg": torch.optim.SGD([a, b], lr=0.1)})
    opt.backward({"reg": pair_losses(a, b)["reg"]})
    opt.backward({"reg": pair_losses(a, b)["reg"]})
    opt.step()
    assert (a.item(), b.item()) == pytest.approx((0.5 - 0.1 * 10, 2.0 - 0.1 * 10))


# --------------------------------------------------------------------------- shared trunk + heads
def test_shared_trunk_follows_the_strategy_and_heads_their_own_task() -> None:
    model = Net()
    x, y, t = batch()
    reference = copy.deepcopy(model)
    weights = {"cls": 2.0, "reg": 0.5}
    opt = tb.TaskOptimizers(
        {
            "cls": torch.optim.SGD(model.cls.parameters(), lr=0.3),
            "reg": torch.optim.SGD(model.reg.parameters(), lr=0.05),
        },
        shared=torch.optim.SGD(model.trunk.parameters(), lr=0.1),
        strategy=tb.create_strategy("static", ["cls", "reg"], weights=weights),
    )
    report = opt.backward(model.losses(x, y, t))
    opt.step()
    assert report.weights["cls"].item() == 2.0

    losses = reference.losses(x, y, t)
    trunk = list(reference.trunk.parameters())
    combined = torch.autograd.grad(
        2.0 * losses["cls"] + 0.5 * losses["reg"], trunk, retain_graph=True
    )
    for p, p0, g in zip(model.trunk.parameters(), trunk, combined):
        torch.testing.assert_close(p.detach(), p0.detach() - 0.1 * g)
    for task, lr in (("cls", 0.3), ("reg", 0.05)):
        head = list(getattr(reference, task).parameters())
        grads = torch.autograd.grad(losses[task], head, retain_graph=True)  # unweighted
        for p, p0, g in zip(getattr(model, task).parameters(), head, grads):
            torch.testing.assert_close(p.detach(), p0.detach() - lr * g)


# --------------------------------------------------------------------------- checkpoints
def build(model: Net, layout: str) -> tuple[tb.TaskOptimizers, list]:
    if layout == "all-params":
        opt = tb.TaskOptimizers(
            {
                "cls": tb.make_optimizer("lamb", model.parameters(), lr=1e-2, weight_decay=0.01),
                "reg": tb.make_optimizer("adam", model.parameters(), lr=1e-2),
            }
        )
    else:
        opt = tb.TaskOptimizers(
            {
                "cls": tb.make_optimizer("lamb", model.cls.parameters(), lr=1e-2),
                "reg": tb.make_optimizer(
                    "lookahead", model.reg.parameters(), base="adam", k=2, lr=1e-2
                ),
            },
            shared=tb.make_optimizer("adamw", model.trunk.parameters(), lr=1e-3),
            strategy="uncertainty",
        )
    schedulers = [
        torch.optim.lr_scheduler.StepLR(opt["cls"], step_size=2, gamma=0.5),
        torch.optim.lr_scheduler.ExponentialLR(opt["reg"], gamma=0.9),
    ]
    return opt, schedulers


def train(model: Net, opt: tb.TaskOptimizers, schedulers: list, steps: int, seed: int) -> None:
    for i in range(steps):
        x, y, t = batch(seed + i)
        opt.zero_grad()
        opt.backward(model.losses(x, y, t))
        opt.step()
        for scheduler in schedulers:
            scheduler.step()


@pytest.mark.parametrize("layout", ["all-params", "shared-trunk"])
def test_lamb_and_adam_resume_exactly_after_a_state_dict_round_trip(layout: str) -> None:
    model = Net()
    opt, schedulers = build(model, layout)
    train(model, opt, schedulers, 3, seed=10)
    checkpoint = roundtrip(
        {
            "model": model.state_dict(),
            "opt": opt.state_dict(),
            "schedulers": [s.state_dict() for s in schedulers],
        }
    )
    train(model, opt, schedulers, 4, seed=20)  # uninterrupted

    resumed = Net(seed=99)
    resumed.load_state_dict(checkpoint["model"])
    opt2, schedulers2 = build(resumed, layout)
    opt2.load_state_dict(checkpoint["opt"])
    for scheduler, state in zip(schedulers2, checkpoint["schedulers"]):
        scheduler.load_state_dict(state)
    train(resumed, opt2, schedulers2, 4, seed=20)

    assert same_tree(snapshot(resumed), snapshot(model))  # bit-exact
    assert same_tree(roundtrip(opt2.state_dict()), roundtrip(opt.state_dict()))
    assert opt2["cls"].param_groups[0]["lr"] == opt["cls"].param_groups[0]["lr"] == 1e-2 / 8


def test_per_task_schedulers_set_each_tasks_step_size() -> None:
    a = nn.Parameter(torch.tensor(0.5, dtype=torch.float64))
    b = nn.Parameter(torch.tensor(2.0, dtype=torch.float64))
    opt = tb.TaskOptimizers(
        {"cls": torch.optim.SGD([a], lr=0.1), "reg": tb.make_optimizer("lookahead", [b],
                                                                         base="sgd", k=1,
                                                                         alpha=1.0, lr=0.1)}
    )  # fmt: skip
    schedulers = [
        torch.optim.lr_scheduler.StepLR(opt["cls"], step_size=1, gamma=0.5),
        torch.optim.lr_scheduler.ExponentialLR(opt["reg"], gamma=0.1),
    ]
    for _ in range(3):
        a0, b0 = a.item(), b.item()
        lrs = opt["cls"].param_groups[0]["lr"], opt["reg"].base.param_groups[0]["lr"]
        opt.backward({"cls": (a - 1) ** 2, "reg": (b - 1) ** 2})
        opt.step()
        assert a.item() == pytest.approx(a0 - lrs[0] * 2 * (a0 - 1))
        assert b.item() == pytest.approx(b0 - lrs[1] * 2 * (b0 - 1))
        for scheduler in schedulers:
            scheduler.step()
    assert lrs == pytest.approx((0.025, 0.001))


# ------------------------------------------------------------- NaN / inf, mixed precision
def test_a_nan_loss_names_the_task_and_changes_nothing() -> None:
    model = Net()
    opt, schedulers = build(model, "shared-trunk")
    train(model, opt, schedulers, 2, seed=0)
    state, params = roundtrip(opt.state_dict()), snapshot(model)
    losses = model.losses(*batch())
    losses["reg"] = losses["reg"] * torch.tensor(float("nan"))
    with pytest.raises(tb.NonFiniteLossError, match="'reg'"):
        opt.backward(losses)
    with pytest.raises(tb.StrategyError, match="needs backward"):
        opt.step()
    assert same_tree(roundtrip(opt.state_dict()), state)
    assert same_tree(snapshot(model), params)


def test_sequential_rolls_back_earlier_updates_when_a_later_loss_is_nan() -> None:
    model = Net()
    x, y, t = batch()
    opt = tb.TaskOptimizers(
        {
            "cls": torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
            "reg": tb.make_optimizer("yogi", model.parameters(), lr=0.1),
        },
        mode="sequential",
    )
    opt.step(lambda: model.losses(x, y, t))
    state, params = roundtrip(opt.state_dict()), snapshot(model)
    calls = []

    def closure() -> dict[str, Tensor]:
        calls.append(1)
        losses = model.losses(x, y, t)
        if len(calls) == 2:  # after cls has stepped
            losses["reg"] = losses["reg"] + float("inf")
        return losses

    with pytest.raises(tb.NonFiniteLossError, match="'reg'"):
        opt.step(closure)
    assert len(calls) == 2
    assert same_tree(snapshot(model), params)
    assert same_tree(roundtrip(opt.state_dict()), state)


@pytest.mark.parametrize("mode", ["simultaneous", "sequential", "shared-trunk"])
def test_grad_scaler_unscales_and_skips_every_optimizer_on_overflow(mode: str) -> None:
    def run(
        scaler: torch.amp.GradScaler | None, factor: float = 1.0
    ) -> tuple[Net, tb.TaskOptimizers, tb.StepReport]:
        model = Net()
        x, y, t = batch()
        t = t * factor
        if mode == "shared-trunk":
            opt = tb.TaskOptimizers(
                {
                    "cls": torch.optim.Adam(model.cls.parameters(), lr=1e-2),
                    "reg": torch.optim.SGD(model.reg.parameters(), lr=1e-2, momentum=0.9),
                },
                shared=torch.optim.Adam(model.trunk.parameters(), lr=1e-2),
                strategy=tb.create_strategy("static", ["cls", "reg"], weights=[0.5, 2.0]),
            )
        else:
            opt = tb.TaskOptimizers(
                {
                    "cls": torch.optim.Adam(model.parameters(), lr=1e-2),
                    "reg": torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9),
                },
                mode=mode,  # type: ignore[arg-type]
            )
        if mode != "sequential":
            opt.backward(model.losses(x, y, t), scaler=scaler)
            report = opt.step()
        else:
            report = opt.step(lambda: model.losses(x, y, t), scaler=scaler)
        return model, opt, report

    plain, _, _ = run(None)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    scaled, _, report = run(scaler)
    scaler.update()
    assert report.extras["skipped"].tolist() == [0.0, 0.0]
    assert same_tree(snapshot(scaled), snapshot(plain))  # a power-of-two scale is exact
    assert scaler.get_scale() == 2.0**12

    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**120)
    model, opt, report = run(scaler, factor=1e6)  # the scaled reg loss and gradients overflow
    scaler.update()
    assert report.extras["skipped"].tolist() == [1.0, 1.0]
    assert same_tree(snapshot(model), snapshot(Net()))
    assert not opt["cls"].state and not opt["reg"].state
    assert opt.shared is None or not opt.shared.state
    assert scaler.get_scale() == 2.0**119  # backed off, as after GradScaler.step's skip


# --------------------------------------------------------------------------- bad input
def test_bad_losses_raise_naming_the_task() -> None:
    model = Net()
    losses = model.losses(*batch())
    opt = tb.TaskOptimizers(
        {"cls": torch.optim.SGD(model.parameters(), lr=0.1), "reg": torch.optim.SGD(
            model.parameters(), lr=0.1)}
    )  # fmt: skip
    with pytest.raises(tb.StrategyError, match="losses is empty"):
        opt.backward({})
    with pytest.raises(tb.StrategyError, match="unknown task 'seg'"):
        opt.backward({**losses, "seg": losses["cls"]})
    with pytest.raises(tb.StrategyError, match=r"task 'reg' must be a scalar, got shape \(2,\)"):
        opt.backward({"cls": losses["cls"], "reg": torch.ones(2, requires_grad=True)})
    with pytest.raises(tb.StrategyError, match="task 'cls' does not require grad"):
        opt.backward({"cls": losses["cls"].detach()})
    with pytest.raises(tb.StrategyError, match="task 'cls' must be a tensor"):
        opt.backward({"cls": 1.0})  # type: ignore[dict-item]
    with pytest.raises(tb.StrategyError, match="task 'reg' reaches none of the parameters"):
        other = tb.TaskOptimizers({"reg": torch.optim.SGD(model.cls.parameters(), lr=0.1)})
        other.backward({"reg": losses["reg"]})
    with pytest.raises(tb.StrategyError, match="step\\(\\) needs backward"):
        opt.step()
    with pytest.raises(tb.StrategyError, match="takes no closure"):
        opt.step(lambda: losses)
    sequential = tb.TaskOptimizers(dict(opt), mode="sequential")
    with pytest.raises(tb.StrategyError, match="takes its losses from step"):
        sequential.backward(losses)
    with pytest.raises(tb.StrategyError, match="needs step\\(closure\\)"):
        sequential.step()


def test_constructor_checks() -> None:
    model = Net()
    sgd = torch.optim.SGD(model.cls.parameters(), lr=0.1)
    with pytest.raises(tb.StrategyError, match="non-empty mapping"):
        tb.TaskOptimizers({})
    with pytest.raises(tb.StrategyError, match="mode must be 'simultaneous' or 'sequential'"):
        tb.TaskOptimizers({"cls": sgd}, mode="parallel")  # type: ignore[arg-type]
    with pytest.raises(tb.StrategyError, match="optimizer of task 'cls' must be"):
        tb.TaskOptimizers({"cls": "sgd"})  # type: ignore[dict-item]
    with pytest.raises(tb.StrategyError, match="give shared= as well"):
        tb.TaskOptimizers({"cls": sgd}, strategy="equal")
    with pytest.raises(tb.StrategyError, match="task 'cls' holds parameters of the shared"):
        tb.TaskOptimizers({"cls": sgd}, shared=torch.optim.SGD(model.parameters(), lr=0.1))
    trunk = torch.optim.SGD(model.trunk.parameters(), lr=0.1)
    with pytest.raises(tb.StrategyError, match="need mode='simultaneous'"):
        tb.TaskOptimizers({"cls": sgd}, mode="sequential", shared=trunk)
    with pytest.raises(tb.StrategyError, match="differ from the optimizers' tasks"):
        tb.TaskOptimizers(
            {"cls": sgd}, shared=trunk, strategy=tb.create_strategy("equal", ["cls", "reg"])
        )
    legacy = torch_optimizer.Lookahead(torch.optim.Adam(model.reg.parameters()))
    with pytest.raises(tb.StrategyError, match=r"task 'reg' \(Lookahead\) never called"):
        tb.TaskOptimizers({"reg": legacy})
    with pytest.raises(tb.StrategyError, match="optimizer of task 'cls' is LBFGS"):
        tb.TaskOptimizers({"cls": torch.optim.LBFGS(model.cls.parameters())})
    opt = tb.TaskOptimizers({"cls": sgd})
    with pytest.raises(tb.StrategyError, match=r"missing \['cls'\], unknown \['reg'\]"):
        opt.load_state_dict({"mode": "simultaneous", "optimizers": {"reg": sgd.state_dict()}})
    assert repr(opt) == "TaskOptimizers({'cls': SGD}, mode='simultaneous')"
    assert list(opt) == ["cls"] and len(opt) == 1 and opt["cls"] is sgd


# --------------------------------------------------------------------------- make_optimizer
def test_list_optimizers_covers_both_libraries_and_names_the_shadowed_ones() -> None:
    names = tb.list_optimizers()
    assert names == sorted(names)
    for module in (torch.optim, torch_optimizer):
        for attr in dir(module):
            cls = getattr(module, attr)
            if inspect.isclass(cls) and issubclass(cls, torch.optim.Optimizer):
                if cls is not torch.optim.Optimizer:
                    assert attr.lower() in names, attr
    assert {"lamb", "radam", "adabelief", "yogi", "ranger", "lookahead"} <= set(names)
    assert [n for n in names if "." in n] == ["torch_optimizer.adafactor", "torch_optimizer.radam"]
    w = [nn.Parameter(torch.zeros(2))]
    assert type(tb.make_optimizer("RAdam", w)) is torch.optim.RAdam  # torch.optim wins
    assert type(tb.make_optimizer("torch_optimizer.RAdam", w)) is torch_optimizer.RAdam
    assert type(tb.make_optimizer("torch.optim.radam", w)) is torch.optim.RAdam
    assert type(tb.make_optimizer("ADABELIEF", w, lr=1e-3)) is torch_optimizer.AdaBelief


def test_make_optimizer_errors() -> None:
    w = [nn.Parameter(torch.zeros(2))]
    with pytest.raises(tb.StrategyError, match=r"unknown optimizer 'adamm'; did you mean 'adam'"):
        tb.make_optimizer("adamm", w)
    with pytest.raises(tb.StrategyError, match=r"'adam' takes no argument 'beta'; did you mean"):
        tb.make_optimizer("adam", w, beta=(0.9, 0.99))
    with pytest.raises(tb.StrategyError, match="optimizer 'sgd': Invalid learning rate"):
        tb.make_optimizer("sgd", w, lr=-1.0)
    with pytest.raises(tb.StrategyError, match="state_dict\\(\\) cannot be saved"):
        tb.make_optimizer("torch_optimizer.lookahead", w)
    with pytest.raises(tb.StrategyError, match="lookahead k must be an integer >= 1"):
        tb.make_optimizer("lookahead", w, k=0)
    with pytest.raises(tb.StrategyError, match=r"lookahead alpha must be in \(0, 1\]"):
        tb.make_optimizer("lookahead", w, alpha=1.5)
    with pytest.raises(tb.StrategyError, match="unknown optimizer 'adan'"):
        tb.make_optimizer("lookahead", w, base="adan")


# --------------------------------------------------------------------------- Lookahead
def test_lookahead_follows_algorithm_1() -> None:
    # L = ½p², SGD lr 0.1: fast 1 → 0.9 → 0.81; sync φ = 1 + 0.5(0.81 − 1) = 0.905, θ = φ;
    # fast 0.8145 → 0.73305; sync φ = 0.905 + 0.5(0.73305 − 0.905) = 0.819025.
    p = nn.Parameter(torch.tensor(1.0, dtype=torch.float64))
    opt = tb.make_optimizer("lookahead", [p], base="sgd", k=2, alpha=0.5, lr=0.1)
    seen = []
    for _ in range(4):
        opt.zero_grad()
        (0.5 * p**2).backward()
        opt.step()
        seen.append(p.item())
    assert seen == pytest.approx([0.9, 0.905, 0.8145, 0.819025], abs=1e-15)
    assert opt.state[p]["slow"].item() == pytest.approx(0.819025, abs=1e-15)


def test_lookahead_state_dict_round_trip_resumes_exactly() -> None:
    def make() -> tuple[nn.Linear, Lookahead, torch.optim.lr_scheduler.LRScheduler]:
        torch.manual_seed(0)
        layer = nn.Linear(3, 2)
        opt = tb.make_optimizer("lookahead", layer.parameters(), base="adam", k=3, lr=1e-2)
        assert isinstance(opt, Lookahead)
        return layer, opt, torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.5)

    def run(layer: nn.Linear, opt: Lookahead, sched: object, steps: int, seed: int) -> None:
        for i in range(steps):
            g = torch.Generator().manual_seed(seed + i)
            opt.zero_grad()
            layer(torch.randn(4, 3, generator=g)).pow(2).mean().backward()
            opt.step()
            sched.step()  # type: ignore[attr-defined]

    layer, opt, sched = make()
    run(layer, opt, sched, 4, 0)
    saved = roundtrip({"layer": layer.state_dict(), "opt": opt.state_dict(),
                       "sched": sched.state_dict()})  # fmt: skip
    run(layer, opt, sched, 5, 100)
    layer2, opt2, sched2 = make()
    layer2.load_state_dict(saved["layer"])
    opt2.load_state_dict(saved["opt"])
    sched2.load_state_dict(saved["sched"])
    assert opt2.base.param_groups is opt2.param_groups or all(
        a is b for a, b in zip(opt2.base.param_groups, opt2.param_groups)
    )
    run(layer2, opt2, sched2, 5, 100)
    assert same_tree(layer2.state_dict(), layer.state_dict())
    assert opt2.base.param_groups[0]["lr"] == pytest.approx(1e-2 * 0.5**9)


@pytest.mark.filterwarnings("ignore::UserWarning")  # deprecated calls inside torch_optimizer
def test_every_optimizer_of_both_libraries_saves_and_loads_its_state() -> None:
    """Every optimizer's state survives torch.save/torch.load(weights_only=True): a fresh
    optimizer loaded from it continues exactly like the one that saved it."""
    skip = {"lbfgs", "sparseadam", "muon"}  # need a closure / sparse grads / 2-D-only params

    def step(layer: nn.Linear, opt: torch.optim.Optimizer, x: Tensor, name: str) -> None:
        opt.zero_grad()
        layer(x).pow(2).sum().backward(create_graph=name == "adahessian")
        opt.step()

    for name in tb.list_optimizers():
        if name in skip:
            continue
        torch.manual_seed(0)
        layer = nn.Linear(3, 2)
        kwargs: dict[str, object] = {"lr": 1e-3} if name not in ("adafactor",) else {}
        opt = tb.make_optimizer(name, layer.parameters(), **kwargs)
        step(layer, opt, torch.ones(1, 3), name)
        saved = roundtrip(opt.state_dict())
        assert same_tree(saved, opt.state_dict()), f"{name}: the state changed on the way"
        twin = copy.deepcopy(layer)
        resumed = tb.make_optimizer(name, twin.parameters(), **kwargs)
        resumed.load_state_dict(saved)
        for x in (torch.full((1, 3), 0.5), torch.full((1, 3), -2.0)):
            torch.manual_seed(1)  # optimizers that draw noise draw the same
            step(layer, opt, x, name)
            torch.manual_seed(1)
            step(twin, resumed, x, name)
        for mine, theirs in zip(layer.parameters(), twin.parameters()):
            assert torch.equal(mine, theirs), f"{name}: a resumed optimizer steps differently"
