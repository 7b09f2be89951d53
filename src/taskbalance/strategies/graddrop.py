"""GradDrop (Chen, Ngiam, Huang, Luong, Kretzschmar, Chai & Anguelov, NeurIPS 2020)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from taskbalance import distributed
from taskbalance.errors import StrategyError
from taskbalance.gradient_aggregation import GradientAggregation
from taskbalance.registry import register_strategy
from taskbalance.validation import per_task_vector

# Elements of a temporary of the per-task products on features: 8 MB in float32, so that the
# CPU keeps reusing its memory (the 40-task features step of the benchmark, 256×512, took 2.46×
# a plain step in one piece, 2.0× in chunks); a GPU still needs only a few kernels.
_CHUNK = 2**21


def _task_chunks(count: int, size: int) -> list[slice]:
    """Consecutive slices of ``count`` tasks, each with about ``_CHUNK`` elements of ``size``
    per task."""
    step = max(1, _CHUNK // max(size, 1))
    return [slice(start, start + step) for start in range(0, count, step)]


@register_strategy(
    "graddrop",
    paper="Chen, Ngiam, Huang, Luong, Kretzschmar, Chai & Anguelov, 'Just Pick a Sign: "
    "Optimizing Deep Multitask Models with Gradient Sign Dropout', NeurIPS 2020, "
    "arXiv:2010.06808",
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
      is then applied to every example's gradient. Under DistributedDataParallel the rule sees
      the global batch (the ranks' batches stacked along dimension 0): 2 ranks × batch ``b``
      take the step of 1 process × batch ``2b``. This costs one all-reduce of ``k`` × the
      per-example size on top of the Jacobian's all-gather, as only a rank knows the signs of
      its own activations, and needs features of the same shape on every rank (equal batches,
      as a ``DistributedSampler`` gives; otherwise every rank raises ``StrategyError``).
    * ``shared_params=`` and ``aggregate(J)``: the rule is applied to each entry of the flat
      Jacobian rows (TorchJD's aggregator). This is GradDrop on parameter gradients, which the
      paper does not study (LibMTL refuses it).

    Random numbers: each step draws one seed from a CPU generator whose state is the buffer
    ``generator_state`` (seeded with ``seed``, default 0), then ``U`` on the gradients' device
    from it: a resumed run draws the same masks, and so does every rank (the same ``seed``), for
    the global tensor.
    """

    leak: Tensor

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
        # A constructor argument, not state: kept out of the state_dict.
        self.register_buffer("leak", leaks, persistent=False)
        self.add_random_state(seed)

    def _uniform(self, shape: Sequence[int], like: Tensor) -> Tensor:
        def sample(generator: torch.Generator) -> Tensor:
            # the seed of the draw on like's device: a value of the host's generator
            seed = int(torch.randint(2**62, (), generator=generator))
            on_device = torch.Generator(device=like.device).manual_seed(seed)
            return torch.rand(
                tuple(shape), generator=on_device, device=like.device, dtype=like.dtype
            )

        return self.draw(sample)

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

    def aggregate_rows(
        self,
        jacobian: Tensor,
        losses: Tensor,
        index: Tensor,
        features: Sequence[Tensor] | None = None,
    ) -> Tensor:
        if features is None:  # shared_params or aggregate(J)
            return self._entrywise(jacobian, index)
        for tensor in features:
            if tensor.dim() < 2:
                raise StrategyError(
                    "features for graddrop must have a batch dimension first, got shape "
                    f"{tuple(tensor.shape)}"
                )
        return self._batch_marginalised(jacobian, index, features)

    def _batch_marginalised(
        self, jacobian: Tensor, index: Tensor, features: Sequence[Tensor]
    ) -> Tensor:
        """The rule on batch-first activations; under DDP on the global batch.

        The rows are ``[k, R·F]``: the ranks' blocks ``[k, F]`` side by side in rank order, each
        this rank's layout of its own feature tensors (``R = 1`` in one process). So the rows
        are the global batch, and one all-reduce of the batch-summed ``sign(A_b) ∘ ∇_{A_b} L_i``
        (``k`` × the per-example size, only this rank knows its signs) makes ``P`` and the masks
        those of one process holding the ranks' batches stacked along dimension 0.
        """
        k = jacobian.shape[0]
        sizes = [t.numel() for t in features]
        local = sum(sizes)
        gathered = jacobian.shape[1] != local
        group = self.process_group
        if gathered and not distributed.is_distributed(group):
            raise StrategyError(
                f"graddrop: the rows have {jacobian.shape[1]} columns for features with {local} "
                "entries"
            )
        group = distributed.resolve_group(group) if gathered else None
        ranks = distributed.world_size(group) if gathered else 1
        aligned = jacobian.shape[1] == ranks * local  # every rank has the same feature shapes
        if aligned:
            blocks = jacobian.reshape(k, ranks, local)
            own = blocks[:, distributed.rank(group) if gathered else 0]
        else:  # joins the all-reduce below anyway, so that every rank raises together
            own = jacobian.new_zeros(k, local)
        signed = []
        for piece, tensor in zip(own.split(sizes, dim=1), features):
            signs, shape = tensor.detach().sign(), tensor.shape
            parts = [
                (piece[chunk].reshape(-1, *shape) * signs).sum(1).reshape(-1, signs[0].numel())
                for chunk in _task_chunks(k, tensor.numel())
            ]
            signed.append(torch.cat(parts).to(jacobian.dtype))
        if gathered:
            # Non-negative per rank, so the sum is 0 only if every rank is aligned: one verdict.
            mismatch = jacobian.new_full((1,), abs(ranks * local - jacobian.shape[1]))
            flat = torch.cat([*(part.reshape(-1) for part in signed), mismatch])
            total = distributed.all_reduce_sum(flat, group)
            self.defer_check(
                total[-1] == 0,
                lambda: StrategyError(
                    "graddrop with features= under DDP needs features of the same shape on "
                    f"every rank; this rank's have {local} entries, the {ranks} ranks' "
                    f"{jacobian.shape[1]} together"
                ),
            )
            if not aligned:  # every rank fails that check; this one has no direction to give
                return jacobian.new_zeros(jacobian.shape[1])
            widths = [part.numel() for part in signed]
            signed = [part.reshape(k, -1) for part in total[:-1].split(widths)]
        pieces = []
        for piece, part, tensor in zip(blocks.split(sizes, dim=2), signed, features):
            grads = piece.reshape(k, ranks, *tensor.shape)  # [k, R, B, ...]
            keep = self._keep(part.reshape(k, *tensor.shape[1:]), index)  # one per unit
            combined = grads.new_zeros(grads.shape[1:])
            for chunk in _task_chunks(k, grads[0].numel()):
                combined += (keep[chunk, None, None] * grads[chunk]).sum(0)
            pieces.append(combined.reshape(ranks, -1))
        return torch.cat(pieces, dim=1).reshape(-1)
