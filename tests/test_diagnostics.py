"""Gradient-conflict diagnostics against values computed by hand."""

from __future__ import annotations

import math

import pytest
import torch

from taskbalance.diagnostics import cosine_similarity, gradient_diagnostics, magnitude_similarity


def test_cosine_by_hand() -> None:
    # g1 = (3, 4), g2 = (4, 3): cos = 24/25; g3 = (0, -2): cos(g1, g3) = -8/10, cos(g2, g3) = -6/10
    jacobian = torch.tensor([[3.0, 4.0], [4.0, 3.0], [0.0, -2.0]], dtype=torch.float64)
    expected = torch.tensor(
        [[1.0, 0.96, -0.8], [0.96, 1.0, -0.6], [-0.8, -0.6, 1.0]], dtype=torch.float64
    )
    torch.testing.assert_close(cosine_similarity(jacobian), expected)


def test_magnitude_similarity_by_hand() -> None:
    # norms 5, 5, 2: equal norms give 1; 2·5·2 / (25 + 4) = 20 / 29.
    jacobian = torch.tensor([[3.0, 4.0], [4.0, 3.0], [0.0, -2.0]], dtype=torch.float64)
    expected = torch.tensor(
        [[1.0, 1.0, 20 / 29], [1.0, 1.0, 20 / 29], [20 / 29, 20 / 29, 1.0]], dtype=torch.float64
    )
    torch.testing.assert_close(magnitude_similarity(jacobian), expected)


def test_gramian_input_gives_the_same_values() -> None:
    jacobian = torch.randn(4, 30, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    gram = jacobian @ jacobian.T
    torch.testing.assert_close(cosine_similarity(gramian=gram), cosine_similarity(jacobian))
    torch.testing.assert_close(magnitude_similarity(gramian=gram), magnitude_similarity(jacobian))


def test_scaling_one_gradient() -> None:
    # Scaling g2 by 10 keeps every cosine and changes the magnitude similarity from 1 to
    # 2·10 / (1 + 100) for two unit-norm gradients.
    jacobian = torch.tensor([[1.0, 0.0], [0.6, 0.8]], dtype=torch.float64)
    scaled = jacobian * torch.tensor([[1.0], [10.0]], dtype=torch.float64)
    torch.testing.assert_close(cosine_similarity(scaled), cosine_similarity(jacobian))
    assert magnitude_similarity(jacobian)[0, 1].item() == pytest.approx(1.0)
    assert magnitude_similarity(scaled)[0, 1].item() == pytest.approx(20 / 101)


def test_zero_gradient_conventions() -> None:
    jacobian = torch.tensor([[0.0, 0.0], [1.0, 2.0], [0.0, 0.0]])
    cosine = cosine_similarity(jacobian)
    magnitude = magnitude_similarity(jacobian)
    assert torch.isfinite(cosine).all() and torch.isfinite(magnitude).all()
    assert cosine[0, 1].item() == 0.0  # no direction: no conflict
    assert cosine[0, 0].item() == 1.0
    assert magnitude[0, 1].item() == 0.0  # 2·0·‖g‖ / ‖g‖²
    assert magnitude[0, 2].item() == 1.0  # two zero gradients: equal norms


def test_parallel_gradients_stay_within_bounds() -> None:
    row = torch.tensor([0.1, 0.7, 1e-3, 3.3])
    cosine = cosine_similarity(torch.stack([row, 3 * row, -7 * row]))
    assert cosine.max().item() <= 1.0 and cosine.min().item() >= -1.0
    assert cosine[0, 2].item() == pytest.approx(-1.0)


def test_flat_dict_for_logging() -> None:
    jacobian = torch.tensor([[3.0, 4.0], [4.0, 3.0], [0.0, -2.0]])
    logged = gradient_diagnostics(jacobian, ["seg", "depth", "normal"])
    assert set(logged) == {
        "grad/cos/seg-depth",
        "grad/cos/seg-normal",
        "grad/cos/depth-normal",
        "grad/mag_sim/seg-depth",
        "grad/mag_sim/seg-normal",
        "grad/mag_sim/depth-normal",
        "grad/norm/seg",
        "grad/norm/depth",
        "grad/norm/normal",
    }
    assert all(isinstance(v, float) for v in logged.values())
    assert logged["grad/cos/seg-depth"] == pytest.approx(0.96)
    assert logged["grad/cos/seg-normal"] == pytest.approx(-0.8)
    assert logged["grad/cos/depth-normal"] == pytest.approx(-0.6)
    assert logged["grad/mag_sim/depth-normal"] == pytest.approx(20 / 29)
    assert logged["grad/norm/normal"] == pytest.approx(2.0)
    prefixed = gradient_diagnostics(gramian=jacobian @ jacobian.T, tasks="abc", prefix="x/")
    assert prefixed["x/cos/a-c"] == pytest.approx(-0.8)


def test_single_task_has_norm_only() -> None:
    logged = gradient_diagnostics(torch.tensor([[3.0, 4.0]]), ["only"])
    assert logged == {"grad/norm/only": pytest.approx(5.0)}
    assert not math.isnan(logged["grad/norm/only"])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, "exactly one of"),
        ({"jacobian": torch.ones(2, 3), "gramian": torch.ones(2, 2)}, "exactly one of"),
        ({"jacobian": torch.ones(3)}, "jacobian must be 2-D"),
        ({"gramian": torch.ones(2, 3)}, "gramian must be square"),
    ],
)
def test_bad_input(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        cosine_similarity(**kwargs)


def test_task_count_must_match() -> None:
    with pytest.raises(ValueError, match="2 task gradients but 3 task names"):
        gradient_diagnostics(torch.ones(2, 3), ["a", "b", "c"])
