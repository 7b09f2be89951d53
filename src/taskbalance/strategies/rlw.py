"""Random loss weighting (Lin, Ye, Zhang & Tsang, TMLR 2022)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import ClassVar, Literal

import torch
from torch import Tensor

from taskbalance.errors import StrategyError
from taskbalance.loss_weighting import LossWeighting
from taskbalance.registry import register_strategy

Distribution = Literal["normal", "uniform", "dirichlet", "bernoulli", "constrained_bernoulli"]
_DISTRIBUTIONS = ("normal", "uniform", "dirichlet", "bernoulli", "constrained_bernoulli")


@register_strategy(
    "rlw",
    paper="Lin, Ye, Zhang & Tsang, 'Reasonable Effectiveness of Random Weighting: A "
    "Litmus Test for Multi-Task Learning', TMLR 2022, arXiv:2111.10603",
)
class RLW(LossWeighting):
    """Random loss weighting: fresh random task weights at every training step.

    Lin, Ye, Zhang & Tsang, "Reasonable Effectiveness of Random Weighting: A Litmus
    Test for Multi-Task Learning", TMLR 2022, arXiv:2111.10603. Each training step draws
    ``λ̃ ~ p(λ̃)`` and trains on ``Σ_i λ_i L_i`` with ``λ = f(λ̃)`` normalised to the simplex.
    ``distribution=`` picks ``p`` (with the normalisation ``f`` used here):

    * ``"normal"`` (default; LibMTL's and the Nash-MTL code's choice): ``softmax(N(0, I))``;
    * ``"uniform"``: ``softmax(U(0, 1))``;
    * ``"dirichlet"``: ``Dir(1, …, 1)``, already on the simplex (drawn as normalised
      ``Exp(1)`` variables);
    * ``"bernoulli"``: ``λ̃_i ~ Bernoulli(½)``, ``λ = λ̃ / Σ λ̃`` (the draw where every
      ``λ̃_i = 0``, probability ``2^−k``, gives zero weights: that step trains nothing);
    * ``"constrained_bernoulli"``: one task drawn uniformly gets weight 1, the others 0.

    **Scale.** The weights sum to ``total`` (default 1, as LibMTL's ``softmax``), so the
    update is ``total/k`` times the plain sum's in expectation; ``total=k`` (the number of
    tasks) matches the scale of the plain sum. The normalisations of the non-default
    distributions are this package's (weights on the simplex); check them against the paper's
    tables before comparing numbers with it.

    **Randomness and resuming.** The package's one convention for random strategies
    (:meth:`~taskbalance.Strategy.add_random_state`): ``seed: int = 0``, a private CPU
    ``torch.Generator`` whose state is the ``generator_state`` buffer. ``state_dict()`` carries
    it, so a resumed run draws exactly the weights an uninterrupted one would, and the same
    ``seed`` on every rank draws the same weights under DDP. ``torch.manual_seed`` does not
    change the draws: pass a different ``seed`` per run of a seed sweep.

    **One draw per step, committed with the step.** A training step (training mode, grad
    enabled, losses with a graph) draws once; the generator advances only when the step
    succeeds (a step that raises leaves the state as it was). :meth:`loss_weights` and
    :meth:`objective` return the weights the *next* training step will use without advancing
    the generator, so the objective's gradient is exactly the weights.

    **Evaluation** (eval mode, ``torch.no_grad()`` or losses without a graph) draws nothing and
    leaves the state alone: it uses the mean weights ``total/k`` for each task (the expectation
    of every distribution above), so validation losses are comparable across steps.

        >>> import torch, taskbalance as tb
        >>> s = tb.create_strategy("rlw", tasks=["a", "b"], seed=0)
        >>> losses = {"a": torch.tensor(1.0, requires_grad=True),
        ...           "b": torch.tensor(3.0, requires_grad=True)}
        >>> w = s.backward(losses).weight_values
        >>> torch.allclose(w.sum(), torch.tensor(1.0)), bool((w > 0).all())
        (True, True)
        >>> with torch.no_grad():  # evaluation: mean weights, nothing drawn
        ...     s({"a": torch.tensor(1.0), "b": torch.tensor(3.0)})
        tensor(2.)
    """

    deterministic: ClassVar[bool] = False

    def __init__(
        self,
        tasks: Sequence[str],
        *,
        distribution: Distribution = "normal",
        total: float = 1.0,
        seed: int = 0,
    ) -> None:
        super().__init__(tasks)
        if distribution not in _DISTRIBUTIONS:
            raise StrategyError(
                f"distribution must be one of {', '.join(map(repr, _DISTRIBUTIONS))}, "
                f"got {distribution!r}"
            )
        if not (isinstance(total, (int, float)) and math.isfinite(total) and total > 0):
            raise StrategyError(f"total must be a positive number, got {total!r}")
        self.distribution = distribution
        self.total = float(total)
        self.add_random_state(seed)

    def _sample(self, count: int) -> Callable[[torch.Generator], Tensor]:
        """The draw of ``count`` weights (float32, CPU) from a generator."""

        def sample(generator: torch.Generator) -> Tensor:
            if self.distribution == "normal":
                weights = torch.softmax(torch.randn(count, generator=generator), dim=0)
            elif self.distribution == "uniform":
                weights = torch.softmax(torch.rand(count, generator=generator), dim=0)
            elif self.distribution == "dirichlet":
                gammas = torch.empty(count).exponential_(generator=generator)
                weights = gammas / gammas.sum()
            elif self.distribution == "bernoulli":
                picked = (torch.rand(count, generator=generator) < 0.5).float()
                weights = picked / picked.sum().clamp(min=1.0)
            else:
                chosen = torch.randint(count, (), generator=generator)
                weights = torch.nn.functional.one_hot(chosen, count).float()
            return self.total * weights

        return sample

    def loss_weights(self, losses: Tensor, index: Tensor) -> Tensor:
        # The next draw, without using it up: on_train_step does, once the step succeeded.
        weights = self.draw(self._sample(losses.numel()), advance=False, device=losses.device)
        return weights.to(losses.dtype)

    def eval_weights(self, losses: Tensor, index: Tensor) -> Tensor:
        return torch.full_like(losses, self.total / losses.numel())

    def on_train_step(self, losses: Tensor, index: Tensor) -> None:
        self.draw(self._sample(losses.numel()))
