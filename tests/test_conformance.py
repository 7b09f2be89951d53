"""The shared property suite: every registered strategy, every conformance check."""

from __future__ import annotations

import pytest

import taskbalance as tb
from taskbalance.testing import CHECKS, check_strategy


@pytest.mark.parametrize("check", sorted(CHECKS))
@pytest.mark.parametrize("name", tb.list_strategies())
def test_conformance(name: str, check: str) -> None:
    check_strategy(name, checks=[check])
