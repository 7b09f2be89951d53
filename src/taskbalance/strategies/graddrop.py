"""GradDrop (Chen, Ngiam, Huang, Luong, Kretzschmar, Chai & Anguelov, NeurIPS 2020)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from taskbalance.registry import register_strategy
from taskbalance.strategies.gradvac import draw, new_generator_state
from taskbalance.strategy import GradientAggregation, StrategyError, per_task_vector


@register_strategy(
    "graddrop",
    paper="Chen, Ngiam, Huang, Luong, Kretzschmar, Chai & Anguelov, 'Just Pick a Sign: "
    "Optimizing Deep Multitask Models with Gradient Sign Dropout', NeurIPS 2020, "
    "arXiv:2010.06808",
    stateful=True,
)
class GradDrop(GradientAggregation):
    """GradDrop: per element, keep only the positive or only the negative task gradients.

    Zhao Chen, Jiquan Ngiam, Yanping Huang, Thang Luong, Henrik Kretzschmar, Yuning Chai & Dragomir
    Anguelov, "Just Pick a Sign: Optimizing Deep Multitask Models with Gradient Sign Dropout",
    NeurIPS 2020, arXiv:2010.06808, Algorithm 1. For the gradients ``∇_A L_i`` reaching a
    tensor ``A``:

    * sign purity ``P = ½ (1 + Σ_i ∇L_i / Σ_i |∇L_i|)`` per element (``½`` where every gradient is
      zero), and ``U ~ Uniform(0, 1)`` of the same shape;
    * mask ``M_i = [P > U]·[∇L_i > 0] + [P < U]·[∇L_i < 0]``;
    * update ``Σ_i (ℓ_i + (1 − ℓ_i) M_i) ∇L_i`` with the leak ``ℓ_i`` (default 0: pure GradDrop).

    GradDrop is not a combination of the task gradients with per-task weights, so ``backward``
    writes its update into the gradient that reaches the shared tensors (and heads get their
    own task's plain gradient); the reported weights are 1.

    The two paths:

    * ``features=`` (the paper's setting: a layer of activations ``A`` with the batch first). As
      in the paper for batch-separated activations (and LibMTL), ``P`` and the masks use the
      batch-marginalised gradients ``Σ_b sign(A_b) ∘ ∇_{A_b} L_i``; one mask per activation unit
      is then applied to every example's gradient. (Under DistributedDataParallel, where the
      feature rows are gathered across ranks, the per-entry rule below is used instead.)
    * ``shared_params=`` and ``aggregate(J)``: the rule is applied to each entry of the flat
      Jacobian rows (TorchJD's aggregator). This is GradDrop on parameter gradients, which the
      paper does not study (LibMTL refuses it).

    Random numbers: each step draws one seed from a CPU generator whose state is the buffer
    ``rng_state`` (seeded with ``seed``), then ``U`` on the gradients' device from it: a resumed
    run draws the same masks.
    """

    leak: Tensor
    rng_state: Tensor

    deterministic = False

    def __init__(
        self,
        tasks: Sequence[str],
        *,
        leak: Mapping[str, float] | Sequence[float] | float = 0.0,
        seed: int = 0,
    ) -> None:
        super().__init__(tasks)
        leaks = per_task_vector(leak, self.tasks, argument="leak")
        if ((leaks < 0) | (leaks > 1)).any():
            raise StrategyError(f"leak must be in [0, 1], got {leaks.tolist()}")
        if not isinstance(seed, int):
            raise StrategyError(f"seed must be an integer, got {seed!r}")
        # A constructor argument, not state: kept out of the state_dict.
        self.register_buffer("leak", leaks, persistent=False)
        self.register_buffer("rng_state", new_generator_state(seed))

    def _uniform(self, shape: Sequence[int], like: Tensor) -> Tensor:
        seed = draw(self.rng_state, lambda gen: torch.randint(2**62, (), generator=gen))
        generator = torch.Generator(device=like.device).manual_seed(int(seed))
        return torch.rand(tuple(shape), generator=generator, device=like.device, dtype=like.dtype)

    def _keep(self, signed: Tensor, index: Tensor) -> Tensor:
        """The factors ``ℓ_i + (1 − ℓ_i) M_i`` ``[k, ...]``, masks from ``signed`` ``[k, ...]``."""
        total = signed.sum(0)
        magnitude = signed.abs().sum(0)
        purity = 0.5 * (1 + total / torch.where(magnitude > 0, magnitude, 1.0))
        uniform = self._uniform(purity.shape, purity)
        mask = ((purity > uniform) & (signed > 0)) | ((purity < uniform) & (signed < 0))
        leak = self.leak[index].to(signed.dtype).reshape(-1, *([1] * (mask.dim() - 1)))
        return leak + (1 - leak) * mask.to(signed.dtype)

    def _entrywise(self, jacobian: Tensor, index: Tensor) -> Tensor:
        """The rule on every entry of ``J`` ``[k, P]``, written with sums over the tasks so that
        only one temporary of ``J``'s size is made: with ``R = max(J, 0)``,
        ``Σ_i M_i g_i = [P > U]·Σ_i R_i + [P < U]·Σ_i (g_i − R_i)`` (weighted by ``1 − ℓ_i``)."""
        leak = self.leak[index].to(jacobian.dtype)
        positive = jacobian.clamp(min=0)
        total, positives = jacobian.sum(0), positive.sum(0)
        magnitude = 2 * positives - total  # Σ_i |g_i|
        purity = 0.5 * (1 + total / torch.where(magnitude > 0, magnitude, 1.0))
        uniform = self._uniform(purity.shape, purity)
        kept_positive = (1 - leak) @ positive
        kept_negative = (1 - leak) @ jacobian - kept_positive
        zero = torch.zeros((), dtype=jacobian.dtype, device=jacobian.device)
        return (
            leak @ jacobian
            + torch.where(purity > uniform, kept_positive, zero)
            + torch.where(purity < uniform, kept_negative, zero)
        )

    def _aggregate_rows(
        self,
        jacobian: Tensor,
        losses: Tensor,
        index: Tensor,
        features: Sequence[Tensor] | None = None,
    ) -> Tensor:
        if features is not None:
            for tensor in features:
                if tensor.dim() < 2:
                    raise StrategyError(
                        "features for graddrop must have a batch dimension first, got shape "
                        f"{tuple(tensor.shape)}"
                    )
        if features is None or jacobian.shape[1] != sum(t.numel() for t in features):
            # shared_params, aggregate(J), or features whose rows were gathered across ranks
            return self._entrywise(jacobian, index)
        pieces = []
        for block, tensor in zip(jacobian.split([t.numel() for t in features], dim=1), features):
            grads = block.reshape(block.shape[0], *tensor.shape)  # [k, B, ...]
            signed = (grads * tensor.detach().sign()).sum(1)  # batch-marginalised [k, ...]
            keep = self._keep(signed, index).unsqueeze(1)  # one mask per unit, every example
            pieces.append((keep * grads).sum(0).reshape(-1))
        return torch.cat(pieces)
