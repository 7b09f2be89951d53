"""Foundation: base classes, the four core strategies, MultiTaskLoss, the Jacobian engine."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import taskbalance as tb
from taskbalance.jacobian import accumulate_grad, gramian, jacobian
from taskbalance.report import StepReport
from taskbalance.strategy import TaskParameterOptimizer


# --------------------------------------------------------------------------- static / equal
def test_static_is_exactly_the_articles_alpha_beta_sum() -> None:
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    x, y_cls, y_reg = torch.randn(8, 3), torch.randint(0, 2, (8,)), torch.randn(8)
    alpha, beta = 0.3, 1.7

    def losses() -> dict[str, torch.Tensor]:
        out = model(x)
        return {
            "cls": nn.functional.cross_entropy(out, y_cls),
            "reg": nn.functional.mse_loss(out[:, 0], y_reg),
        }

    reference = losses()
    total = alpha * reference["cls"] + beta * reference["reg"]
    total.backward()
    expected = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()

    s = tb.create_strategy("static", tasks=["cls", "reg"], weights={"cls": alpha, "reg": beta})
    combined = s(losses())
    assert torch.equal(combined, total)
    combined.backward()
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), expected))

    model.zero_grad()
    report = s.backward(losses())
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), expected))
    assert report.to_dict()["weight/cls"] == pytest.approx(alpha)


def test_static_argument_checks() -> None:
    with pytest.raises(tb.StrategyError, match="non-negative"):
        tb.create_strategy("static", tasks=["a", "b"], weights=[1.0, -1.0])
    with pytest.raises(tb.StrategyError, match=r"weights names unknown tasks \['c'\]"):
        tb.create_strategy("static", tasks=["a", "b"], weights={"a": 1.0, "c": 2.0})
    with pytest.raises(tb.StrategyError, match=r"weights gives no value for tasks \['b'\]"):
        tb.create_strategy("static", tasks=["a", "b"], weights={"a": 1.0})
    with pytest.raises(tb.StrategyError, match="weights has 3 values for 2 tasks"):
        tb.create_strategy("static", tasks=["a", "b"], weights=[1.0, 2.0, 3.0])
    with pytest.raises(tb.StrategyError, match="weights must be finite"):
        tb.create_strategy("static", tasks=["a"], weights=[math.inf])
    with pytest.raises(tb.StrategyError, match=r"weights must hold numbers, got \['x'\]"):
        tb.create_strategy("static", tasks=["a"], weights=["x"])
    assert tb.create_strategy("static", tasks=["a", "b"]).task_weights.tolist() == [1.0, 1.0]
    # non-negative, not positive: a zero weight switches a task off
    off = tb.create_strategy("static", tasks=["a", "b"], weights=[0.0, 2.0])
    assert off({"a": torch.tensor(5.0), "b": torch.tensor(1.0)}).item() == 2.0


def test_equal_and_evaluation_without_graph() -> None:
    s = tb.create_strategy("equal", tasks=["a", "b"])
    value = s({"a": torch.tensor(1.5), "b": torch.tensor(2.0)})
    assert value.item() == 3.5 and not value.requires_grad


@pytest.mark.parametrize(
    ("tasks", "message"),
    [([], "at least one"), (["a", "a"], "unique"), ("ab", "sequence"), (["a", ""], "non-empty")],
)
def test_task_list_checks(tasks: object, message: str) -> None:
    with pytest.raises(tb.StrategyError, match=message):
        tb.create_strategy("equal", tasks=tasks)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- uncertainty
def _one_parameter_losses(theta: nn.Parameter) -> dict[str, torch.Tensor]:
    # theta = 3: L_reg = (θ − 1)² = 4, L_cls = 4(θ − 2.5)² = 1.
    return {"reg": (theta - 1) ** 2, "cls": 4 * (theta - 2.5) ** 2}


def test_uncertainty_one_step_by_hand_sgd() -> None:
    theta = nn.Parameter(torch.tensor(3.0))
    s = tb.create_strategy(
        "uncertainty",
        tasks=["reg", "cls"],
        task_types={"cls": "classification"},
        optimizer="sgd",
        lr=0.1,
    )
    report = s.backward(_one_parameter_losses(theta))
    # Objective ½e^(−s_r)L_r + ½s_r + e^(−s_c)L_c + ½s_c at s = 0:
    # d/dθ = ½·2(θ−1) + 8(θ−2.5) = 2 + 4 = 6
    assert theta.grad.item() == pytest.approx(6.0)
    # d/ds_r = −½L_r + ½ = −1.5, d/ds_c = −L_c + ½ = −0.5; SGD lr 0.1 → s = (0.15, 0.05)
    assert s.log_var.tolist() == pytest.approx([0.15, 0.05])
    assert report.weights["reg"].item() == 0.5 and report.weights["cls"].item() == 1.0
    assert report.to_dict()["log_var/reg"] == pytest.approx(0.15)
    assert s.log_var.grad is None  # never handed to the model's optimizer


def test_uncertainty_one_step_by_hand_adam_and_forward_path() -> None:
    theta = nn.Parameter(torch.tensor(3.0))
    s = tb.create_strategy("uncertainty", tasks=["reg", "cls"], lr=0.01)
    total = s(_one_parameter_losses(theta))  # both regression: ½e^(−s)L + ½s
    assert total.item() == pytest.approx(0.5 * 4 + 0.5 * 1)
    total.backward()
    # Adam's first step is −lr·g/(|g| + eps): gradients −1.5 and −½·1 + ½ = 0
    # (float32 bias corrections: 1 − 0.999 is not exact, hence rel=1e-5)
    assert s.log_var[0].item() == pytest.approx(0.01 * 1.5 / (1.5 + 1e-8), rel=1e-5)
    assert s.log_var[1].item() == 0.0
    assert theta.grad.item() == pytest.approx(0.5 * 2 * 2 + 0.5 * 8 * 0.5)


def test_uncertainty_learns_log_variance_of_the_loss() -> None:
    # With constant losses, s converges to argmin ½e^(−s)L + ½s = log L.
    s = tb.create_strategy("uncertainty", tasks=["a", "b"], lr=0.05)
    for _ in range(1500):
        losses = {k: torch.tensor(v, requires_grad=True) for k, v in {"a": 9.0, "b": 0.25}.items()}
        s(losses)
    assert s.log_var.tolist() == pytest.approx([math.log(9.0), math.log(0.25)], abs=0.02)


def test_uncertainty_task_types_are_an_argument_not_state() -> None:
    # loading a regression checkpoint keeps the classification weight e^(−s) (not ½e^(−s))
    regression = tb.create_strategy("uncertainty", tasks=["a"])
    classification = tb.create_strategy(
        "uncertainty", tasks=["a"], task_types={"a": "classification"}
    )
    classification.load_state_dict(regression.state_dict())
    with torch.no_grad():
        assert classification({"a": torch.tensor(2.0)}).item() == pytest.approx(2.0)


def test_uncertainty_checks_and_failed_step_keeps_state() -> None:
    with pytest.raises(tb.StrategyError, match=r"task_types\['a'\] must be"):
        tb.create_strategy("uncertainty", tasks=["a"], task_types={"a": "ranking"})
    with pytest.raises(tb.StrategyError, match="unknown tasks"):
        tb.create_strategy("uncertainty", tasks=["a"], task_types={"z": "regression"})
    theta = nn.Parameter(torch.tensor(3.0))
    s = tb.create_strategy("uncertainty", tasks=["reg", "cls"])
    losses = _one_parameter_losses(theta)
    s.backward(losses)
    state = copy.deepcopy(s.state_dict())
    with pytest.raises(RuntimeError):  # the graph was freed by the first backward
        s.backward(losses)
    for key, value in s.state_dict().items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, state[key]), key


# --------------------------------------------------------------------------- GradNorm
def test_gradnorm_two_steps_by_hand() -> None:
    # Shared θ, L_a = 2θ², L_b = θ; α = 1.5, plain SGD on w with lr 0.1.
    theta = nn.Parameter(torch.tensor(1.0))
    s = tb.create_strategy("gradnorm", tasks=["a", "b"], optimizer="sgd", lr=0.1)

    report = s.backward({"a": 2 * theta**2, "b": theta}, shared_params=[theta])
    # ‖∇L‖ = (4, 1); G = (4, 1), Ḡ = 2.5; r = (1, 1) at step 0 → target 2.5
    # ∇_w = sign(G − target)·‖∇L‖ = (4, −1) → w = (0.6, 1.1) → ·2/1.7 = (12/17, 22/17)
    assert theta.grad.item() == pytest.approx(5.0)  # w(t) = (1, 1): 4 + 1
    assert report.weights["a"].item() == 1.0
    assert s.task_weights.tolist() == pytest.approx([12 / 17, 22 / 17])

    with torch.no_grad():
        theta.fill_(0.5)
    theta.grad = None
    s.backward({"a": 2 * theta**2, "b": theta}, shared_params=[theta])
    # L = (0.5, 0.5), L(0) = (2, 1): L̃ = (0.25, 0.5), r = (2/3, 4/3); ‖∇L‖ = (2, 1)
    # G = (24/17, 22/17) , target = Ḡ·r^1.5 = (0.736, 2.083) → signs (+, −), ∇_w = (2, −1)
    # w = (12/17 − 0.2, 22/17 + 0.1) = (43/85, 237/170), sum 1.9 → ·2/1.9 = (172/323, 474/323)
    assert theta.grad.item() == pytest.approx(12 / 17 * 2 + 22 / 17 * 1)
    assert s.task_weights.tolist() == pytest.approx([172 / 323, 474 / 323])
    assert s.task_weights.sum().item() == pytest.approx(2.0)


def test_gradnorm_alpha_sets_the_target_rates() -> None:
    # As above, but α = 0.12 (the paper's toy value) and the second step at θ = 0.2, where the
    # sign of G_i − Ḡ·r_i^α depends on α (with α = 1 both signs flip).
    theta = nn.Parameter(torch.tensor(1.0))
    s = tb.create_strategy("gradnorm", tasks=["a", "b"], optimizer="sgd", lr=0.1, alpha=0.12)
    s.backward({"a": 2 * theta**2, "b": theta}, shared_params=[theta])
    assert s.task_weights.tolist() == pytest.approx([12 / 17, 22 / 17])  # r = 1: α is idle
    with torch.no_grad():
        theta.fill_(0.2)
    s.backward({"a": 2 * theta**2, "b": theta}, shared_params=[theta])
    # L = (0.08, 0.2), L(0) = (2, 1): L̃ = (0.04, 0.2), r = (1/3, 5/3); ‖∇L‖ = (0.8, 1)
    # G = (0.8·12/17, 22/17) = (0.5647, 1.2941), Ḡ = 0.9294; Ḡ·r^0.12 = (0.8146, 0.9881)
    # signs (−, +): ∇_w = (−0.8, 1) → w = (334/425, 203/170), sum 1.98 → ·2/1.98
    assert s.task_weights.tolist() == pytest.approx([1336 / 1683, 2030 / 1683])


def test_gradnorm_partial_labels_keep_the_present_tasks_total() -> None:
    # Σ w = T is kept by renormalising the present tasks to their own previous total.
    theta = nn.Parameter(torch.tensor([1.0, 2.0, 3.0]))
    s = tb.create_strategy("gradnorm", tasks=["a", "b", "c"], optimizer="sgd", lr=0.1)
    scales = {"a": 1.0, "b": 4.0, "c": 0.5}

    def losses(tasks: str) -> dict[str, torch.Tensor]:
        return {t: scales[t] * theta.pow(2).sum() * (1 + i) for i, t in enumerate(tasks)}

    s.backward(losses("abc"), shared_params=[theta])
    with torch.no_grad():
        theta.mul_(0.5)
    before = s.task_weights.clone()
    assert not torch.allclose(before, torch.ones(3))
    s.backward(losses("ac"), shared_params=[theta])
    after = s.task_weights
    assert after[1] == before[1]  # the absent task keeps its weight
    assert not torch.equal(after[[0, 2]], before[[0, 2]])  # the present ones moved
    assert float(after[[0, 2]].sum()) == pytest.approx(float(before[[0, 2]].sum()))
    assert float(after.sum()) == pytest.approx(3.0)


def test_gradnorm_features_path_matches_parameter_path_for_identity_trunk() -> None:
    theta = nn.Parameter(torch.tensor([1.0, 2.0]))
    head = torch.tensor([3.0, -1.0])
    by_params = tb.create_strategy("gradnorm", tasks=["a", "b"])
    by_features = copy.deepcopy(by_params)
    for strategy, kwargs in ((by_params, "params"), (by_features, "features")):
        z = theta * 1.0  # identity trunk: ∇_z L = ∇_θ L
        losses = {"a": (z * head).sum() ** 2, "b": z.pow(2).sum()}
        if kwargs == "params":
            strategy.backward(losses, shared_params=[theta])
        else:
            strategy.backward(losses, features=z)
    torch.testing.assert_close(by_params.task_weights, by_features.task_weights)


def test_gradnorm_default_adam_moves_the_weights_by_lr_first() -> None:
    # Step 1: r_i = 1, G = ‖∇L‖ = (3, 1), Ḡ = 2: grad = sign(G − Ḡ)·‖∇L‖ = (3, −1). Adam's
    # first step is lr·sign(grad) with the documented lr = 0.025: w = (0.975, 1.025), sum 2.
    s = tb.create_strategy("gradnorm", tasks=["a", "b"])
    w = torch.tensor([1.0, 1.0], requires_grad=True)
    s.backward({"a": 3 * w[0], "b": w[1]}, shared_params=[w])
    assert s.task_weights.tolist() == pytest.approx([0.975, 1.025], rel=1e-4)


def test_gradnorm_needs_gradients_and_checks_alpha() -> None:
    s = tb.create_strategy("gradnorm", tasks=["a", "b"])
    theta = nn.Parameter(torch.tensor(1.0))
    with pytest.raises(tb.StrategyError, match="exactly one of shared_params"):
        s.backward({"a": theta * 2, "b": theta})
    with pytest.raises(tb.StrategyError, match="needs per-task gradients"):
        s({"a": theta * 2, "b": theta})
    with torch.no_grad():
        assert s({"a": theta * 2, "b": theta}).item() == 3.0
    with pytest.raises(tb.StrategyError, match="alpha must be"):
        tb.create_strategy("gradnorm", tasks=["a"], alpha=-1.0)


# --------------------------------------------------------------------------- own optimizer
@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
def test_task_parameter_optimizer_matches_torch_adam(weight_decay: float) -> None:
    torch.manual_seed(0)
    mine = torch.randn(3)
    reference = nn.Parameter(mine.clone())
    adam = torch.optim.Adam([reference], lr=0.05, weight_decay=weight_decay)
    updater = TaskParameterOptimizer((3,), lr=0.05, weight_decay=weight_decay)
    everyone = torch.ones(3, dtype=torch.bool)
    for _ in range(5):
        grad = torch.randn(3)
        reference.grad = grad.clone()
        adam.step()
        updater.step(mine, grad, everyone)
    torch.testing.assert_close(mine, reference.detach())


def test_task_parameter_optimizer_masks_absent_tasks() -> None:
    updater = TaskParameterOptimizer((2,), lr=0.1)
    value = torch.zeros(2)
    updater.step(value, torch.tensor([1.0, 1.0]), torch.tensor([True, False]))
    assert value[1].item() == 0.0 and updater.exp_avg[1].item() == 0.0
    assert updater.step_count.tolist() == [1.0, 0.0]
    # Task 1's first step later behaves like a fresh Adam's first step: −lr·sign(g)
    updater.step(value, torch.tensor([0.0, -3.0]), torch.tensor([False, True]))
    assert value[1].item() == pytest.approx(0.1, rel=1e-5)  # float32 bias corrections


def test_task_parameter_optimizer_checks() -> None:
    with pytest.raises(tb.StrategyError, match="optimizer must be"):
        TaskParameterOptimizer((2,), kind="lbfgs", lr=0.1)  # type: ignore[arg-type]
    with pytest.raises(tb.StrategyError, match="lr must be"):
        TaskParameterOptimizer((2,), lr=0.0)


# --------------------------------------------------------------------------- state
def test_state_dict_carries_the_task_order() -> None:
    s = tb.create_strategy("uncertainty", tasks=["a", "b"])
    other = tb.create_strategy("uncertainty", tasks=["b", "a"])
    with pytest.raises(tb.StrategyError, match=r"saved for tasks \['a', 'b'\]"):
        other.load_state_dict(s.state_dict())


def test_step_report_to_dict_is_one_flat_mapping() -> None:
    report = StepReport(
        ("a", "b"),
        torch.tensor([1.0, 2.0]),
        torch.tensor([0.5, 1.5]),
        {"log_var": torch.tensor([0.1, 0.2])},
    )
    assert report.to_dict("mtl/") == pytest.approx(
        {
            "mtl/loss/a": 1.0,
            "mtl/loss/b": 2.0,
            "mtl/weight/a": 0.5,
            "mtl/weight/b": 1.5,
            "mtl/log_var/a": 0.1,
            "mtl/log_var/b": 0.2,
        }
    )
    assert report.weights["b"].item() == 1.5


def test_repr_shows_every_argument() -> None:
    s = tb.create_strategy("gradnorm", tasks=["a", "b"], alpha=0.12)
    assert "tasks=['a', 'b'], alpha=0.12, lr=0.025, optimizer='adam'" in repr(s)


def test_repr_of_a_strategy_defined_after_import() -> None:
    # the constructor arguments are recorded for any subclass, not only the built-in ones
    class Scaled(tb.LossWeighting):
        def __init__(self, tasks: list[str], *, factor: float = 2.0) -> None:
            super().__init__(tasks)
            self.factor = factor

        def loss_weights(self, losses: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
            return torch.full_like(losses, self.factor)

    assert repr(Scaled(["a"], factor=3.0)) == "Scaled(tasks=['a'], factor=3.0)"
    assert repr(Scaled(["a"])) == "Scaled(tasks=['a'], factor=2.0)"
    with pytest.raises(tb.StrategyError, match="Scaled: got an unexpected keyword"):
        Scaled(["a"], scale=1.0)  # type: ignore[call-arg]


class LearnedScales(tb.LossWeighting):
    """A plug-in with a learned per-task weight s: objective Σ s_i L_i, so ∂/∂s_i = L_i."""

    def __init__(self, tasks: list[str], **optimizer: object) -> None:
        super().__init__(tasks)
        self.add_learned_parameter("s", torch.ones(len(self.tasks)), lr=0.1, **optimizer)

    def loss_weights(self, losses: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        return self.s[index]


def test_add_learned_parameter_adam_default_and_sgd_weight_decay() -> None:
    losses = {
        "a": torch.tensor(2.0, requires_grad=True),
        "b": torch.tensor(3.0, requires_grad=True),
    }
    adam = LearnedScales(["a", "b"])
    adam.backward(losses)  # Adam's first step: s − lr·sign(L)
    assert adam.s.tolist() == pytest.approx([0.9, 0.9], rel=1e-6)
    sgd = LearnedScales(["a", "b"], optimizer="sgd", weight_decay=0.5)
    sgd.backward(losses)  # s − lr·(L + 0.5·s) = 1 − 0.1·(2.5, 3.5)
    assert sgd.s.tolist() == pytest.approx([0.75, 0.65], rel=1e-6)


def test_a_learned_parameter_the_objective_does_not_use_stays_put() -> None:
    # its gradient is zero, not missing: the step goes on and leaves it (and its moments) alone
    class WithSpare(LearnedScales):
        def __init__(self, tasks: list[str]) -> None:
            super().__init__(tasks)
            self.add_learned_parameter("spare", torch.ones(len(self.tasks)), lr=0.1)

    s = WithSpare(["a", "b"])
    s.backward(
        {"a": torch.tensor(2.0, requires_grad=True), "b": torch.tensor(3.0, requires_grad=True)}
    )
    assert s.s.tolist() == pytest.approx([0.9, 0.9], rel=1e-6)
    assert s.spare.tolist() == [1.0, 1.0]


def test_a_linear_algebra_failure_is_a_solver_error_naming_the_strategy() -> None:
    class Singular(tb.GradientAggregation):
        def gramian_weights(
            self, gramian: torch.Tensor, losses: torch.Tensor, index: torch.Tensor
        ) -> torch.Tensor:
            return torch.linalg.inv(torch.zeros_like(gramian)).sum(0)

    with pytest.raises(tb.SolverError, match="Singular could not compute its weights"):
        Singular(["a", "b"]).aggregate(torch.eye(2))


# --------------------------------------------------------------------------- MultiTaskLoss
def test_multitask_loss_partial_labels_and_gradient_strategies() -> None:
    criteria = {"cls": nn.CrossEntropyLoss(), "reg": nn.MSELoss()}
    outputs = {"cls": torch.tensor([[2.0, 0.0]], requires_grad=True), "reg": torch.tensor([1.5])}
    targets = {"cls": torch.tensor([0]), "reg": torch.tensor([1.0])}
    mtl = tb.MultiTaskLoss(criteria, "static", weights=[2.0, 3.0])
    total, losses = mtl(outputs, {"reg": targets["reg"]})
    assert set(losses) == {"reg"} and total.item() == pytest.approx(3.0 * 0.25)
    gradnorm = tb.MultiTaskLoss(criteria, "gradnorm")
    total, losses = gradnorm(outputs, targets)
    assert total is None and set(losses) == {"cls", "reg"}
    with pytest.raises(tb.StrategyError, match="unknown task 'depth' in targets"):
        mtl(outputs, {"depth": torch.tensor(1.0)})
    with pytest.raises(tb.StrategyError, match="differ from criteria tasks"):
        tb.MultiTaskLoss(criteria, tb.create_strategy("equal", tasks=["cls"]))


# --------------------------------------------------------------------------- Jacobian engine
@pytest.mark.parametrize("method", ["loop", "batched"])
def test_jacobian_by_hand(method: str) -> None:
    w = torch.tensor([1.0, 2.0], requires_grad=True)
    b = torch.tensor(3.0, requires_grad=True)
    unused = torch.zeros(2, requires_grad=True)
    losses = torch.stack([(w**2).sum(), w[0] * b])
    rows = jacobian(losses, [w, b, unused], method=method)  # type: ignore[arg-type]
    expected = torch.tensor([[2.0, 4.0, 0.0, 0.0, 0.0], [3.0, 0.0, 1.0, 0.0, 0.0]])
    torch.testing.assert_close(rows, expected)
    torch.testing.assert_close(gramian(rows), expected @ expected.T)


def test_accumulate_grad_adds_into_existing_gradients() -> None:
    a, b = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(1))
    a.grad = torch.ones(2)
    accumulate_grad([a, b], torch.tensor([1.0, 2.0, 3.0]))
    assert a.grad.tolist() == [2.0, 3.0] and b.grad.tolist() == [3.0]
    with pytest.raises(ValueError, match="3 entries"):
        accumulate_grad([a], torch.tensor([1.0, 2.0, 3.0]))


# --------------------------------------------------------------------------- heads
def test_heads_get_their_own_weighted_gradient() -> None:
    torch.manual_seed(0)
    trunk, head_a, head_b = nn.Linear(3, 4), nn.Linear(4, 1), nn.Linear(4, 1)
    x = torch.randn(5, 3)
    z = trunk(x)
    losses = {"a": head_a(z).pow(2).mean(), "b": head_b(z).abs().mean()}
    expected = torch.autograd.grad(losses["a"], list(head_a.parameters()), retain_graph=True)
    s = tb.create_strategy("static", tasks=["a", "b"], weights=[0.5, 2.0])
    s.backward(losses)
    for p, g in zip(head_a.parameters(), expected):
        torch.testing.assert_close(p.grad, 0.5 * g)


def test_zero_gradient_of_a_task_that_reaches_the_parameters_is_no_error() -> None:
    # at w = 0 task a's gradient 2w vanishes (an exact optimum): legitimate, unlike a task
    # whose loss does not depend on shared_params at all
    w = torch.zeros(2, requires_grad=True)
    elsewhere = torch.ones(2, requires_grad=True)
    s = tb.create_strategy("mgda", tasks=["a", "b"])
    s.backward({"a": (w**2).sum() + 1.0, "b": w.sum() + 2.0}, shared_params=[w])
    assert w.grad is not None and torch.isfinite(w.grad).all()
    message = "task 'a' does not depend on any tensor of shared_params"
    with pytest.raises(tb.StrategyError, match=message):
        s.backward({"a": (elsewhere**2).sum(), "b": w.sum() + 2.0}, shared_params=[w])


@pytest.mark.parametrize(("name", "path"), [("mgda", "features"), ("moco", "shared_params")])
def test_a_task_that_misses_the_inputs_is_named_with_the_argument(name: str, path: str) -> None:
    # the per-task rows' check (features=, or a method that is not a Gramian weighting)
    w = torch.ones(2, requires_grad=True)
    z = w * 2.0  # features computed from w
    elsewhere = torch.ones(2, requires_grad=True)
    losses = {"a": (z**2).sum(), "b": (elsewhere**2).sum()}
    inputs = {"features": z} if path == "features" else {"shared_params": [w]}
    message = f"task 'b' does not depend on any tensor of {path};"
    with pytest.raises(tb.StrategyError, match=message):
        tb.create_strategy(name, tasks=["a", "b"]).backward(losses, **inputs)  # type: ignore[arg-type]


def test_failed_step_restores_a_buffer_the_step_replaced() -> None:
    # Strategies size some state on first use (MoCo's running gradients): a step that fails
    # after the sizing must leave the old, unsized buffer, shape included.
    s = tb.create_strategy("moco", tasks=["a", "b"])
    assert s.tracked.shape == (0, 0)
    with pytest.raises(RuntimeError, match="after sizing"), s.transaction():
        s.tracked = torch.ones(2, 5)
        s.tracked.mul_(3)
        raise RuntimeError("after sizing")
    assert s.tracked.shape == (0, 0)
    s.tracked = torch.ones(2, 3)
    with pytest.raises(RuntimeError), s.transaction():
        s.tracked.mul_(3)
        raise RuntimeError
    assert torch.equal(s.tracked, torch.ones(2, 3))
