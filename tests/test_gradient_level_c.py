"""GradDrop, GradVac, PCGrad, MoCo, DB-MTL, ConFIG, UPGrad, DualProj, FairGrad, Nash-MTL, CAGrad:
tests that kill the mutants the rest of the suite let live (issue 11, mutation testing).

Each test pins behaviour the papers or the docstrings state; the expected values are derived
by hand in the comments.
"""

from __future__ import annotations

import pytest
import torch

import taskbalance as tb


def state(strategy: tb.Strategy) -> dict[str, torch.Tensor]:
    return {k: v for k, v in strategy.state_dict().items() if isinstance(v, torch.Tensor)}


@pytest.mark.parametrize("name", ["graddrop", "gradvac", "pcgrad"])
def test_default_seed_is_zero(name: str) -> None:
    # the documented default: a run without a seed draws what seed=0 draws
    default = state(tb.create_strategy(name, ["a", "b"]))
    zero = state(tb.create_strategy(name, ["a", "b"], seed=0))
    assert default.keys() == zero.keys()
    assert all(torch.equal(v, zero[k]) for k, v in default.items())
