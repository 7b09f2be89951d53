"""The paper reproductions (experiments/reproduce.py) and their synthetic problems (toys.py)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

# The experiments are scripts beside the package: plain `pytest` does not put the repository
# root on sys.path.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments import reproduce
from experiments.reproduce import NAMES, VERDICTS, Check, Result, main
from experiments.runner import read_offline_run
from experiments.toys import (
    PARETO_X2,
    cagrad_losses,
    distance_to_pareto,
    gradnorm_problem,
    kendall_data,
    min_norm_two,
    pareto_set,
)

# ----------------------------------------------------------------------------- the CAGrad toy


def _grads(
    theta: torch.Tensor, scale: tuple[float, float] = (1.0, 1.0)
) -> tuple[torch.Tensor, ...]:
    theta = theta.detach().double().requires_grad_(True)
    losses = cagrad_losses(theta, scale)
    g1 = torch.autograd.grad(losses[..., 0].sum(), theta, retain_graph=True)[0]
    g2 = torch.autograd.grad(losses[..., 1].sum(), theta)[0]
    return losses.detach(), g1, g2


def test_cagrad_toy_values_by_hand() -> None:
    # θ2 = 0: c1 = c2 = 0, both losses vanish.
    assert cagrad_losses(torch.tensor([3.0, 0.0])).tolist() == [0.0, 0.0]
    # θ2 = 20: c1 = tanh(10) ≈ 1, c2 = 0, tanh(−20) ≈ −1:
    # f1 = log|0.5(9 − 7) + 1| + 6 = log 2 + 6, f2 = log|0.5(9 + 3) − 1 + 2| + 6 = log 7 + 6
    # (the official code's "+ tanh(−θ2)"; the paper's "−" would give log 9 + 6).
    l1, l2 = cagrad_losses(torch.tensor([-9.0, 20.0], dtype=torch.float64)).tolist()
    assert l1 == pytest.approx(math.log(2) + 6, abs=1e-7)
    assert l2 == pytest.approx(math.log(7) + 6, abs=1e-7)
    # θ2 = −40: c2 ≈ 1, the quadratics: ((7 − x1)² + 0.1·32²)/10 − 20 at x1 = 1.
    l1, l2 = cagrad_losses(torch.tensor([1.0, -40.0], dtype=torch.float64)).tolist()
    assert l1 == pytest.approx((36 + 102.4) / 10 - 20, abs=1e-9)
    assert l2 == pytest.approx((64 + 102.4) / 10 - 20, abs=1e-9)
    # The clamp at LOWER = 5e-6: 0.5(−x1 − 7) + 1 = 0 at x1 = −5 (θ2 large).
    l1 = cagrad_losses(torch.tensor([-5.0, 30.0], dtype=torch.float64))[0].item()
    assert l1 == pytest.approx(math.log(5e-6) + 6, abs=1e-9)
    # The FAMO variant scales the first loss only.
    theta = torch.tensor([2.0, 3.0])
    assert torch.allclose(
        cagrad_losses(theta, (0.1, 1.0)), cagrad_losses(theta) * torch.tensor([0.1, 1.0])
    )


def test_cagrad_toy_mean_loss_optimum() -> None:
    losses, g1, g2 = _grads(torch.tensor([0.0, PARETO_X2]))
    assert losses[0].item() == pytest.approx(losses[1].item())  # symmetric in θ1 there
    assert ((g1 + g2) / 2).norm().item() < 1e-5  # the mean loss is stationary at (0, −8.3552)
    # and not stationary a little off it
    _, h1, h2 = _grads(torch.tensor([0.5, PARETO_X2 + 0.3]))
    assert ((h1 + h2) / 2).norm().item() > 1e-3


def test_pareto_set_is_pareto_stationary() -> None:
    front = pareto_set(141)
    assert front[0, 0].item() == -7.0 and front[-1, 0].item() == 7.0
    assert front[70, 1].item() == pytest.approx(PARETO_X2, abs=2e-4)
    assert front[0, 1].item() == pytest.approx(front[-1, 1].item(), abs=1e-9)  # symmetric
    _, g1, g2 = _grads(front)
    assert min_norm_two(g1, g2).max().item() < 1e-6
    # The same set for the FAMO variant: scaling a loss does not move Pareto points.
    _, s1, s2 = _grads(front, (0.1, 1.0))
    assert min_norm_two(s1, s2).max().item() < 1e-6
    # Outside the set, the task gradients are not opposed: clearly not stationary.
    _, o1, o2 = _grads(torch.tensor([[0.0, -7.0], [8.0, -8.43], [-9.0, 9.0]]))
    assert (min_norm_two(o1, o2) > 1e-3).all()


def test_distance_to_pareto() -> None:
    points = torch.tensor([[0.0, PARETO_X2], [0.0, 0.0], [9.0, -8.4345]])
    distance = distance_to_pareto(points)
    assert distance[0].item() < 1e-3
    assert distance[1].item() == pytest.approx(-PARETO_X2, abs=1e-3)
    assert distance[2].item() == pytest.approx(2.0, abs=1e-3)  # past the end at θ1 = 7


def test_min_norm_two_by_hand() -> None:
    g1 = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [3.0, 4.0]])
    g2 = torch.tensor([[0.0, 1.0], [-1.0, 0.0], [2.0, 0.0], [3.0, 4.0]])
    expected = [math.sqrt(0.5), 0.0, 1.0, 5.0]  # midpoint; opposed; the shorter one; equal
    assert min_norm_two(g1, g2).tolist() == pytest.approx(expected, abs=1e-6)


# ----------------------------------------------------------------------------- Kendall / GradNorm


def test_kendall_data_follows_the_notebook() -> None:
    x, y1, y2 = kendall_data(100, seed=0)
    draws = np.random.RandomState(0).randn(300)  # x, then the y1 noise, then the y2 noise
    assert x.shape == y1.shape == y2.shape == (100, 1)
    assert x[:, 0].numpy() == pytest.approx(draws[:100].astype(np.float32), abs=1e-6)
    noise1 = (y1 - 2 * x - 8)[:, 0].double().numpy()
    noise2 = (y2 - 3 * x - 3)[:, 0].double().numpy()
    assert noise1 == pytest.approx(10 * draws[100:200], abs=1e-4)
    assert noise2 == pytest.approx(draws[200:300], abs=1e-5)


def test_gradnorm_problem() -> None:
    problem = gradnorm_problem([1.0, 100.0], n_train=64, n_test=16, seed=3)
    assert problem.x_train.shape == (64, 250) and problem.y_train.shape == (64, 2, 100)
    assert torch.allclose(problem.x_train.norm(dim=1), torch.ones(64))
    # |σ_i tanh(·)| <= σ_i, and each task fills a good part of its range
    for task, sigma in enumerate((1.0, 100.0)):
        values = problem.y_train[:, task].abs()
        assert values.max().item() <= sigma
        assert values.mean().item() > 0.3 * sigma
    # The two tasks differ by more than their scale: ε_i is drawn per task.
    assert not torch.allclose(problem.y_train[:, 1] / 100, problem.y_train[:, 0], atol=1e-2)
    again = gradnorm_problem([1.0, 100.0], n_train=64, n_test=16, seed=3)
    assert torch.equal(again.y_test, problem.y_test)


# ----------------------------------------------------------------------------- results


def test_verdict_rules() -> None:
    def result(checks: list[Check], missing: list[str]) -> Result:
        return Result("x", "t", {}, {}, "c", checks, {}, missing=missing)

    passed, failed = Check("a", 1, True), Check("b", 2, False)
    assert result([passed], []).verdict == "reproduced"
    assert result([passed, failed], []).verdict == "not reproduced"
    assert result([passed], ["mgda: strategy not available"]).verdict == "not reproduced"
    assert result([], []).verdict == "not reproduced"  # nothing checked, nothing reproduced


def test_toy_paths_agree_and_a_failing_start_stops_alone() -> None:
    config = reproduce.ReproduceConfig(wandb_mode="disabled")
    starts = [(0.0, PARETO_X2), (9.0, 9.0), (-8.5, -5.0)]

    def run(method: str, path: str, **kwargs: float) -> reproduce.ToyRun:
        return reproduce.run_toy(
            config, method, kwargs, starts, steps=5, scale=(0.1, 1.0), path=path, group="t"
        )

    # A user's loop (backward per start) and the batched one take the same steps.
    for method, kwargs in (("equal", {}), ("famo", {"gamma": 0.0, "min_losses": -21.0})):
        batched, loop = run(method, "batched", **kwargs), run(method, "backward", **kwargs)
        assert torch.allclose(batched.final, loop.final, atol=1e-6)
        assert not batched.errors
    # Nash-MTL has no bargaining solution for opposite gradients (the mean-loss optimum): that
    # start stops with the error and where it was; the others go on.
    nash = run("nash_mtl", "batched")
    assert set(nash.errors) == {0} and nash.errors[0].startswith("step 0: Nash-MTL")
    assert nash.final[0].tolist() == pytest.approx([0.0, PARETO_X2])
    assert (nash.final[1:] != torch.tensor(starts[1:])).all()


def test_unknown_reproduction_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as error:
        main(["kendal_toy", "--wandb-mode", "disabled"])
    assert error.value.code == 2
    assert "kendall_toy" in capsys.readouterr().err


def _check_result_file(path: Path) -> dict:
    data = json.loads(path.read_text())
    assert data["verdict"] in VERDICTS
    assert data["published"]["source"]
    assert data["criterion"]
    assert data["checks"] and all(isinstance(c["passed"], bool) for c in data["checks"])
    assert (path.parent / data["figure"]).stat().st_size > 1000
    return data


def test_reproduce_kendall_quick_reads_back_wandb(tmp_path: Path) -> None:
    """The default suite runs the shortened reproduction: 100 of the paper's 2000 epochs."""
    main(["kendall_toy", "--quick", "--out", str(tmp_path), "--wandb-mode", "offline"])
    data = _check_result_file(tmp_path / "kendall_toy.json")
    assert data["quick"] and not data["paper_settings"] and data["deviations"]
    sigma = data["measured"]["sigma"]
    assert all(math.isfinite(v) and v > 0 for v in sigma.values())
    # After 100 epochs from σ = 1 with Adam lr 1e-3, log σ² moved by at most 500·1e-3.
    assert all(abs(math.log(v**2)) <= 0.5 + 1e-6 for v in sigma.values())
    assert data["published"]["sigma"] == {"y1": 8.5875, "y2": 0.9198}

    (run_dir,) = (tmp_path / "wandb").glob("offline-run-*")
    recorded = read_offline_run(run_dir)
    assert recorded["config"]["name"] == "kendall_toy" and recorded["config"]["quick"] is True
    rows = [r for r in recorded["history"] if "sigma/y1" in r]
    assert len(rows) == 100  # one log per epoch
    assert {"train/loss/y1", "train/loss/y2", "weights/y1", "weights/y2"} <= set(rows[-1])
    assert rows[-1]["sigma/y1"] == pytest.approx(sigma["y1"], rel=1e-6)
    summary = recorded["summary"]
    assert summary["verdict"] == data["verdict"]
    assert summary["measured/sigma/y2"] == pytest.approx(sigma["y2"], rel=1e-6)


@pytest.mark.slow
def test_reproduce_all(tmp_path: Path) -> None:
    """Every reproduction at the papers' settings. Long: about 45 minutes on one quiet CPU core,
    most of it the CAGrad toy (4 methods × 100 000 steps × 5 starts, 1.6-3.5 ms per step)."""
    results = main(["all", "--out", str(tmp_path), "--wandb-mode", "offline"])
    assert [r.name for r in results] == list(NAMES)
    for name in NAMES:
        data = _check_result_file(tmp_path / f"{name}.json")
        assert data["paper_settings"]
    kendall = json.loads((tmp_path / "kendall_toy.json").read_text())
    # The authors' data, initialisation and batch order: their numbers to 3 decimals.
    assert kendall["verdict"] == "reproduced"
    assert kendall["measured"]["sigma"]["y1"] == pytest.approx(8.5875, abs=1e-3)
    assert kendall["measured"]["sigma"]["y2"] == pytest.approx(0.9198, abs=1e-3)


def test_module_lists_every_reproduction() -> None:
    assert set(reproduce.RUNNERS) == set(NAMES)
