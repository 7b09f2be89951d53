"""A checkpointable Lookahead optimizer: :class:`Lookahead`.

:class:`Lookahead` is a checkpointable Lookahead (Zhang, Lucas, Hinton & Ba, NeurIPS 2019) around
any base optimizer; ``make_optimizer("lookahead", ...)`` builds it by name.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch.optim import Optimizer

from taskbalance.errors import StrategyError
from taskbalance.optim.catalogue import Params, _construct, _resolve

__all__ = ["Lookahead"]


class Lookahead(Optimizer):
    """Lookahead around any base optimizer, as a proper :class:`torch.optim.Optimizer`.

    Zhang, Lucas, Hinton & Ba, "Lookahead Optimizer: k steps forward, 1 step back",
    NeurIPS 2019, arXiv:1907.08610, Algorithm 1. The base optimizer moves the fast weights ``θ``;
    every ``k`` of its steps the slow weights ``φ`` move towards them and the fast weights restart
    from the slow ones::

        φ ← φ + α (θ − φ)        θ ← φ

    Defaults ``k = 5``, ``alpha = 0.5`` (the paper's usual setting, also torch_optimizer's).

    Why not ``torch_optimizer.Lookahead``: it never calls ``Optimizer.__init__``, so on current
    torch its ``state_dict()`` raises ``AttributeError``. This class keeps the slow weights in
    ``self.state`` and the base optimizer's state under the key ``"base_state"`` of
    :meth:`state_dict`, which therefore loads with ``torch.load(weights_only=True)``.

    Choices, stated plainly:

    * ``φ₀`` is the parameter value at the start of the first step that reaches the parameter
      (Algorithm 1 sets ``φ₀`` to the initial parameters). torch_optimizer takes it after the first
      inner step instead, one step late.
    * The base optimizer's state (Adam's moments, say) is kept across synchronisations; Algorithm 1
      does not say, and torch_optimizer keeps it too.
    * Each parameter counts its own inner steps, and a step in which a parameter has no gradient
      neither counts nor moves it: a parameter this optimizer's task never reached stays untouched
      (this matters inside :class:`~taskbalance.TaskOptimizers`).
    * The parameter groups are shared with the base optimizer, so an LR scheduler attached to
      the Lookahead reaches the base optimizer's ``lr``.

    Build it by name: ``make_optimizer("lookahead", params, base="adam", k=5, alpha=0.5, lr=1e-3)``.
    """

    def __init__(
        self,
        params: Params,
        base: type[Optimizer] | str = "adam",
        *,
        k: int = 5,
        alpha: float = 0.5,
        **base_kwargs: Any,
    ) -> None:
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise StrategyError(f"lookahead k must be an integer >= 1, got {k!r}")
        if not (isinstance(alpha, (int, float)) and 0 < alpha <= 1):
            raise StrategyError(f"lookahead alpha must be in (0, 1], got {alpha!r}")
        base_cls = _resolve(base) if isinstance(base, str) else base
        if not (inspect.isclass(base_cls) and issubclass(base_cls, Optimizer)):
            raise StrategyError(f"lookahead base must be an optimizer name or class, got {base!r}")
        if base_cls is torch.optim.LBFGS:
            raise StrategyError("lookahead cannot wrap LBFGS (it re-evaluates the closure itself)")
        super().__init__(params, {"k": k, "alpha": float(alpha)})
        # The base optimizer adopts our group dicts: lr and every base option live in them.
        self.base = _construct(base_cls, base_cls.__name__.lower(), self.param_groups, base_kwargs)
        self.defaults = {**self.base.defaults, **self.defaults}

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        if "base" in self.__dict__:  # not during __init__: the base does not exist yet
            self.base.add_param_group(self.param_groups[-1])

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None and "slow" not in self.state[p]:
                    self.state[p]["slow"] = p.detach().clone()
                    self.state[p]["lookahead_step"] = 0
        self.base.step()
        for group in self.param_groups:
            fast, slow = [], []
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                state["lookahead_step"] += 1
                if state["lookahead_step"] % group["k"] == 0:
                    fast.append(p)
                    slow.append(state["slow"])
            if fast:
                torch._foreach_lerp_(slow, fast, group["alpha"])
                torch._foreach_copy_(fast, slow)
        return loss

    def state_dict(self) -> dict[str, Any]:
        out = super().state_dict()
        out["base_state"] = self.base.state_dict()["state"]
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        if "base_state" not in state_dict:
            raise StrategyError("lookahead state_dict has no 'base_state' entry")
        base_state = state_dict.pop("base_state")
        super().load_state_dict(state_dict)
        self.base.load_state_dict({"state": base_state, "param_groups": state_dict["param_groups"]})
        self.base.param_groups = self.param_groups  # share the group dicts again

    def __repr__(self) -> str:
        group = self.param_groups[0] if self.param_groups else self.defaults
        return f"Lookahead(k={group['k']}, alpha={group['alpha']}, base={self.base!r})"
