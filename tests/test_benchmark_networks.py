"""The benchmark networks (experiments/benchmarks/networks.py): parameter counts against the
reference code, the trunk/head split, outputs, where the gradient flows, and one training step
with a gradient-level strategy on both of its paths."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import taskbalance as tb
from experiments.benchmarks.base import MultiTaskModel
from experiments.benchmarks.networks import MTANHead, MultiLeNet, ResNet18, SegNet, SegNetMTAN

NYUV2 = {"segmentation": "segmentation", "depth": "depth", "normal": "normal"}
CITYSCAPES = {"segmentation": "segmentation", "depth": "depth"}
SMALL = 0.125  # width for anything that runs a forward pass
Model = TypeVar("Model", bound=MultiTaskModel)


def count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def on_meta(build: Callable[[], Model]) -> Model:
    """Build without allocating or initialising (only the shapes matter for a count)."""
    with torch.device("meta"):
        return build()


# --------------------------------------------------------------------------- parameter counts
def test_segnet_counts_match_the_mtan_code() -> None:
    # lorenmt/mtan, im2im_pred/model_segnet_*.py, print the parameter count relative to
    # 24 981 069, the single-task SegNet (shared network + one 13-class prediction layer), which
    # pins the backbone exactly. The 3-task split model: 25 055 185 as in Nash-MTL's SegNetSplit
    # (experiments/nyuv2/models.py), 25 055 188 in model_segnet_split.py, whose 3 extra are its
    # logsigma (uncertainty weights, a strategy's business here). Counted by hand from that
    # architecture: trunk 24 943 296, heads (64·64·9 + 64) + (64·out + out) each.
    assert count(on_meta(lambda: SegNet({"segmentation": "segmentation"}))) == 24_981_069
    model = on_meta(lambda: SegNet(NYUV2))
    assert count(model.trunk) == 24_943_296
    heads = {t: count(h) for t, h in model.heads.items()}
    assert heads == {"segmentation": 37_773, "depth": 36_993, "normal": 37_123}
    assert count(model) == 25_055_185


def test_segnet_mtan_count_matches_the_mtan_code() -> None:
    # SegNet-MTAN, NYUv2, 3 tasks: 44 229 073 in Nash-MTL's SegNetMtan and CAGrad's / MTAN's
    # model_segnet_mtan.py less their 3-value logsigma (those print 44 229 076, i.e. 1.77× the
    # single-task 24 981 069). The "about 44M parameters" of our tracker is Nash-MTL's
    # shared_parameters(): everything but the prediction layers (44 117 184), task attention
    # included. Here the trunk is what all tasks share (CAGrad's shared_modules(): the SegNet
    # and the attention branches' shared units), and each head owns 2 984 576 attention
    # parameters plus its prediction layer.
    model = on_meta(lambda: SegNetMTAN(NYUV2))
    assert count(model) == 44_229_073
    assert count(model.trunk) == 35_163_456
    assert count(model.trunk.backbone) == 24_943_296  # the same SegNet as the split model
    heads = [h for h in model.heads.values() if isinstance(h, MTANHead)]
    assert len(heads) == 3
    assert all(count(h) - count(h.prediction) == 2_984_576 for h in heads)
    assert count(model) - sum(count(h.prediction) for h in heads) == 44_117_184


def test_multilenet_count_matches_sener_koltun() -> None:
    # isl-org/MultiObjectiveOptimization, multi_task/models/multi_lenet.py (no published count):
    # trunk 10·25+10 + 20·10·25+20 + 320·50+50 = 21 330; head 50·50+50 + 50·10+10 = 3 060.
    model = MultiLeNet(["L", "R"])
    assert count(model.trunk) == 21_330
    assert {t: count(h) for t, h in model.heads.items()} == {"L": 3_060, "R": 3_060}
    assert count(model) == 27_450


def test_resnet18_count_matches_sener_koltun() -> None:
    # multi_task/models/multi_faces_resnet.py (no published count): torchvision's ResNet-18
    # without its fc has 11 176 512; the 3×3 stride-1 stem (3·64·9) instead of the 7×7 one
    # (3·64·49) is 7 680 fewer: 11 168 832. Heads: Linear(2048, 2) = 4 098 each, 40 attributes.
    model = on_meta(lambda: ResNet18([f"a{i}" for i in range(40)]))
    assert count(model.trunk) == 11_176_512 - 3 * 64 * (49 - 9) == 11_168_832
    assert all(count(h) == 2048 * 2 + 2 for h in model.heads.values())
    assert count(model) == 11_168_832 + 40 * 4_098
    assert model.trunk.out_features == 512 * 2 * 2  # 64×64 → 8×8 → avg_pool2d(4) → 2×2
    # The same layout, run at a small width: (512 · 0.125) · 2 · 2 features on 64×64 images.
    features, logits = ResNet18(["a0"], width=SMALL)(torch.randn(1, 3, 64, 64))
    assert tuple(features.shape) == (1, 64 * 2 * 2) and tuple(logits["a0"].shape) == (1, 2)


# --------------------------------------------------------------------------- models to run
def small_segnet() -> MultiTaskModel:
    return SegNet(NYUV2, width=SMALL)


def small_mtan() -> SegNetMTAN:
    return SegNetMTAN(NYUV2, width=SMALL)


def small_resnet() -> MultiTaskModel:
    return ResNet18(["a", "b", "c"], width=SMALL, image_size=32)


def lenet() -> MultiTaskModel:
    return MultiLeNet(["left", "right"])


def batch_for(model: MultiTaskModel) -> tuple[Tensor, dict[str, Tensor]]:
    """A small input and targets for every task of ``model``."""
    g = torch.Generator().manual_seed(0)
    if isinstance(model, (SegNet, SegNetMTAN)):
        x = torch.randn(2, 3, 32, 64, generator=g)
        targets = {
            "segmentation": torch.randint(-1, 13, (2, 32, 64), generator=g),
            "depth": torch.rand(2, 1, 32, 64, generator=g),
            "normal": F.normalize(torch.randn(2, 3, 32, 64, generator=g), dim=1),
        }
        return x, targets
    if isinstance(model, ResNet18):
        x = torch.randn(4, 3, 32, 32, generator=g)
        return x, {t: torch.randint(0, 2, (4,), generator=g) for t in model.tasks}
    x = torch.randn(4, 1, 28, 28, generator=g)
    return x, {t: torch.randint(0, 10, (4,), generator=g) for t in model.tasks}


def losses_of(outputs: dict[str, Tensor], targets: dict[str, Tensor]) -> dict[str, Tensor]:
    """Cross-entropy (−1 ignored), L1 depth, 1 − cosine normals."""
    losses = {}
    for task, y in outputs.items():
        if task == "depth":
            losses[task] = (y - targets[task]).abs().mean()
        elif task == "normal":
            losses[task] = 1 - (y * targets[task]).sum(dim=1).mean()
        else:
            losses[task] = F.cross_entropy(y, targets[task], ignore_index=-1)
    return losses


MODELS = [small_segnet, small_mtan, small_resnet, lenet]
IDS = ["segnet", "mtan", "resnet18", "multilenet"]


@pytest.mark.parametrize("build", MODELS, ids=IDS)
def test_heads_and_trunk_share_no_parameter(build: Callable[[], MultiTaskModel]) -> None:
    model = build()
    trunk = {id(p) for p in model.shared_parameters()}
    heads = [{id(p) for p in head.parameters()} for head in model.heads.values()]
    assert trunk and all(heads)
    assert all(not (trunk & head) for head in heads)
    assert all(not (a & b) for i, a in enumerate(heads) for b in heads[i + 1 :])
    assert set().union(trunk, *heads) == {id(p) for p in model.parameters()}


# --------------------------------------------------------------------------- outputs
@pytest.mark.parametrize("build", [small_segnet, small_mtan], ids=["segnet", "mtan"])
def test_dense_outputs(build: Callable[[], MultiTaskModel]) -> None:
    model = build()
    x, _ = batch_for(model)
    features, outputs = model(x)
    assert tuple(features.shape) == (2, 8, 32, 64)  # 64 · 0.125 channels
    shapes = {t: tuple(y.shape) for t, y in outputs.items()}
    assert shapes == {
        "segmentation": (2, 13, 32, 64),
        "depth": (2, 1, 32, 64),
        "normal": (2, 3, 32, 64),
    }
    torch.testing.assert_close(outputs["normal"].norm(dim=1), torch.ones(2, 32, 64))
    # Raw logits, not log-probabilities: the exponentials do not sum to one.
    assert not torch.allclose(outputs["segmentation"].exp().sum(dim=1), torch.ones(2, 32, 64))


def test_cityscapes_segnet_and_width_rounding() -> None:
    model = SegNet(CITYSCAPES, classes=7, width=0.01)  # every width rounds to at least 1
    assert model.trunk.channels == (1, 1, 3, 5, 5)
    _, outputs = model(torch.randn(1, 3, 32, 32))
    assert tuple(outputs["segmentation"].shape) == (1, 7, 32, 32)


def test_classification_outputs() -> None:
    model = MultiLeNet(["left", "right"], classes=10).eval()
    features, logits = model(torch.randn(4, 1, 28, 28))
    assert tuple(features.shape) == (4, 50)
    assert {t: tuple(y.shape) for t, y in logits.items()} == {"left": (4, 10), "right": (4, 10)}
    resnet = small_resnet()
    features, logits = resnet(torch.randn(2, 3, 32, 32))
    assert tuple(features.shape) == (2, resnet.trunk.out_features) == (2, 64)
    assert all(tuple(y.shape) == (2, 2) for y in logits.values())


# --------------------------------------------------------------------------- gradient flow
@pytest.mark.parametrize("build", MODELS, ids=IDS)
def test_every_output_reaches_the_features(build: Callable[[], MultiTaskModel]) -> None:
    model = build()
    x, _ = batch_for(model)
    features, outputs = model(x)
    for task, y in outputs.items():
        (grad,) = torch.autograd.grad(y.square().sum(), features, retain_graph=True)
        assert grad.abs().sum() > 0, task


def _trunk_gradients(model: MultiTaskModel) -> tuple[list[Tensor], list[Tensor]]:
    """The trunk's gradient of the summed loss, directly and through ``features`` alone."""
    model.eval()  # BatchNorm on running statistics: the two passes see the same function
    x, targets = batch_for(model)
    features, outputs = model(x)
    total = torch.stack(list(losses_of(outputs, targets).values())).sum()
    params = model.shared_parameters()
    direct = torch.autograd.grad(total, params, retain_graph=True, allow_unused=True)
    (at_features,) = torch.autograd.grad(total, features, retain_graph=True)
    through = torch.autograd.grad(features, params, at_features, allow_unused=True)
    zero = torch.zeros(())
    return (
        [zero if g is None else g for g in direct],
        [zero if g is None else g for g in through],
    )


def test_segnet_trunk_gradient_passes_through_features() -> None:
    direct, through = _trunk_gradients(small_segnet())
    for a, b in zip(direct, through):
        torch.testing.assert_close(a, b)


def test_mtan_trunk_gradient_also_bypasses_features() -> None:
    # The attention branches read earlier shared maps (documented): features= sees only part
    # of the trunk's gradient. The shared attention units are reached only that way.
    model = small_mtan()
    direct, through = _trunk_gradients(model)
    differs = [not torch.allclose(a, b) for a, b in zip(direct, through)]
    assert any(differs)
    shared_units = {id(p) for p in model.trunk.attention.parameters()}
    for p, g, h in zip(model.shared_parameters(), direct, through):
        if id(p) in shared_units:
            assert h.abs().sum() == 0 and g.abs().sum() > 0


# --------------------------------------------------------------------------- a training step
@pytest.mark.parametrize("path", ["features", "shared_params"])
@pytest.mark.parametrize("build", MODELS, ids=IDS)
def test_training_step_with_mgda(build: Callable[[], MultiTaskModel], path: str) -> None:
    torch.manual_seed(0)
    model = build()
    x, targets = batch_for(model)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    strategy = tb.create_strategy("mgda", tasks=list(model.tasks))
    features, outputs = model(x)
    losses = losses_of(outputs, targets)
    if path == "features":
        report = strategy.backward(losses, features=features)
    else:
        report = strategy.backward(losses, shared_params=model.shared_parameters())
    optimizer.step()
    weights = torch.stack([report.weights[t] for t in model.tasks])
    assert torch.isfinite(weights).all() and torch.isclose(weights.sum(), torch.tensor(1.0))

    def moved(prefix: str) -> bool:
        return any(
            not torch.equal(p, before[name])
            for name, p in model.named_parameters()
            if name.startswith(prefix)
        )

    assert moved("trunk.")
    for task in model.tasks:
        # A task MGDA weights at 0 gets no gradient: its head need not move.
        if report.weights[task] > 0:
            assert moved(f"heads.{task}."), task


# --------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("cls", [SegNet, SegNetMTAN])
def test_dense_models_refuse_bad_input(cls: type[MultiTaskModel]) -> None:
    model = cls(CITYSCAPES, width=SMALL)
    with pytest.raises(ValueError, match=r"divisible by 32.*48×64"):
        model(torch.randn(1, 3, 48, 64))
    with pytest.raises(ValueError, match=r"divisible by 32.*32×40"):
        model(torch.randn(1, 3, 32, 40))
    with pytest.raises(ValueError, match=r"RGB images \[B, 3, H, W\]"):
        model(torch.randn(1, 1, 32, 32))
    with pytest.raises(ValueError, match=r"task 'edges': unknown task kind 'edge'"):
        cls({"segmentation": "segmentation", "edges": "edge"})
    with pytest.raises(ValueError, match="must map each task name to its kind"):
        cls(["segmentation", "depth"])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="tasks is empty"):
        cls({})
    with pytest.raises(ValueError, match="width must be positive"):
        cls(CITYSCAPES, width=0)


def test_classifiers_refuse_bad_input() -> None:
    with pytest.raises(ValueError, match=r"\[B, 1, 28, 28\]"):
        MultiLeNet(["L", "R"])(torch.randn(2, 1, 32, 32))
    with pytest.raises(ValueError, match=r"\[B, 3, 32, 32\].*image_size=32"):
        small_resnet()(torch.randn(2, 3, 64, 64))
    with pytest.raises(ValueError, match="image_size must be a positive multiple of 32"):
        ResNet18(["a"], image_size=48)
    with pytest.raises(ValueError, match="duplicate"):
        MultiLeNet(["L", "L"])
    with pytest.raises(ValueError, match="dropout"):
        MultiLeNet(["L"], dropout=1.0)
