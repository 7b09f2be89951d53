"""The benchmark protocol: registry, user benchmarks, every benchmark end to end on files written
in its source format, training on a device, AMP and under torchrun."""

from __future__ import annotations

import csv
import math
import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import taskbalance as tb
from experiments import compare, train
from experiments.benchmarks import (
    Benchmark,
    DataError,
    Metric,
    MultiTaskModel,
    Recipe,
    get_benchmark,
    list_benchmarks,
    synthetic,
)
from experiments.benchmarks.classification import TaskTensors
from experiments.reproduce import main as reproduce
from experiments.training import BenchmarkConfig, parse_options, train_run
from taskbalance.integrations.wandb import Tracker

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _quiet(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.setenv("WANDB_SILENT", "true")


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Small data sets in the exact source formats (real image sizes)."""
    root = tmp_path_factory.mktemp("benchmarks")
    synthetic.write_nyuv2(root / "nyuv2", train=4, test=2)
    synthetic.write_cityscapes(root / "cityscapes", train=8, test=2)
    synthetic.write_mnist(root / "mnist", train=300, test=20, gzip=True)
    synthetic.write_celeba(root / "celeba", images=12)
    return {name: root / name for name in ("nyuv2", "cityscapes", "mnist", "celeba")}


# --------------------------------------------------------------------------- a user's benchmark
class Regression(MultiTaskModel):
    def __init__(self, tasks: Sequence[str]) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(4, 16), nn.Tanh())
        self.heads = nn.ModuleDict({t: nn.Linear(16, 1) for t in tasks})

    def forward(self, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        z = self.trunk(x)
        return z, {t: head(z).squeeze(1) for t, head in self.heads.items()}


class MSE:
    def __init__(self, tasks: Sequence[str]) -> None:
        self.tasks, self.errors, self.count = tuple(tasks), {}, 0

    def update(self, outputs: Mapping[str, Tensor], targets: Mapping[str, Tensor]) -> None:
        for t in self.tasks:
            self.errors[t] = self.errors.get(t, 0.0) + float(
                (outputs[t] - targets[t]).square().sum()
            )
        self.count += len(targets[self.tasks[0]])

    def compute(self) -> dict[str, float]:
        return {f"{t}/mse": self.errors[t] / self.count for t in self.tasks}


class TwoSines(Benchmark):
    """What a user writes: two regression tasks on generated data."""

    name = "two_sines"
    tasks = ("sin", "cos")
    metrics = {"sin/mse": Metric(higher_is_better=False), "cos/mse": Metric(False)}  # noqa: RUF012
    recipe = Recipe(optimizer="adam", lr=1e-2, epochs=2, batch_size=16)

    def __init__(self, scale: float = 1.0) -> None:
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(96, 4, generator=generator)
        self.x, self.y = x, {"sin": scale * x.sum(1).sin(), "cos": x[:, 0].cos()}

    def dataset(self, split: str) -> TaskTensors:
        self.check_split(split)
        part = slice(0, 64) if split == "train" else slice(64, None)
        return TaskTensors(self.x[part], {t: y[part] for t, y in self.y.items()})

    def model(self, tasks: Sequence[str] | None = None) -> Regression:
        return Regression(tasks or self.tasks)

    def losses(self, outputs, targets) -> dict[str, Tensor]:
        return {t: F.mse_loss(o, targets[t]) for t, o in outputs.items()}

    def evaluator(self, tasks: Sequence[str] | None = None) -> MSE:
        return MSE(tasks or self.tasks)


def make_two_sines(scale: float = 1.0) -> TwoSines:
    return TwoSines(scale)


# --------------------------------------------------------------------------- registry
def test_registry_names_user_benchmarks_and_errors() -> None:
    assert list_benchmarks() == ["celeba", "cityscapes", "multi_digits", "multimnist", "nyuv2"]
    user = get_benchmark(f"{__name__}:make_two_sines", scale=2.0)
    assert isinstance(user, TwoSines) and user.y["sin"].abs().max() > 1.0
    assert isinstance(get_benchmark(f"{__name__}:TwoSines"), TwoSines)
    with pytest.raises(ValueError, match="did you mean nyuv2"):
        get_benchmark("nyu_v2")
    with pytest.raises(ValueError, match="cannot import 'no_such_module'"):
        get_benchmark("no_such_module:make")
    with pytest.raises(ValueError, match="has no 'missing'"):
        get_benchmark(f"{__name__}:missing")
    with pytest.raises(ValueError, match="does not take these options"):
        get_benchmark("multi_digits", colour="red")
    with pytest.raises(ValueError, match=r"not an experiments\.benchmarks\.Benchmark"):
        get_benchmark(f"{__name__}:MSE", tasks=("a",))


def test_options_parse_as_literals() -> None:
    assert parse_options(["width=0.25", "model=segnet", "augment=False"]) == {
        "width": 0.25,
        "model": "segnet",
        "augment": False,
    }
    with pytest.raises(ValueError, match="not KEY=VALUE"):
        parse_options(["width"])


@pytest.mark.parametrize(
    ("name", "folder", "expected"),
    [
        ("nyuv2", None, "needs --data-dir. NYUv2 is the preprocessed NYUv2 of the MTAN"),
        ("cityscapes", None, "needs --data-dir. Cityscapes is the preprocessed"),
        ("multimnist", None, "needs --data-dir. MNIST is the four IDX files"),
        ("celeba", None, "needs --data-dir. CelebA is the official release"),
        ("nyuv2", "empty", "nyuv2"),
        ("multimnist", "empty", "train-images-idx3-ubyte"),
        ("celeba", "empty", "list_attr_celeba.txt"),
    ],
)
def test_missing_data_names_the_file_and_its_source(
    name: str, folder: str | None, expected: str, tmp_path: Path
) -> None:
    with pytest.raises(DataError, match=expected):
        get_benchmark(name, None if folder is None else str(tmp_path)).dataset("train")


# --------------------------------------------------------------------------- each benchmark
SMALL = {  # options that keep the networks small; the data is at its real size
    "nyuv2": {"width": 0.0625},
    "cityscapes": {"width": 0.0625},
    "multimnist": {},
    "celeba": {"width": 0.0625},
}


def _bench(name: str, data: dict[str, Path]) -> Benchmark:
    folder = data["mnist" if name == "multimnist" else name]
    return get_benchmark(name, str(folder), **SMALL[name])


@pytest.mark.parametrize("name", sorted(SMALL))
def test_protocol_of_each_benchmark(name: str, data: dict[str, Path]) -> None:
    """Items, model outputs, losses, evaluator metrics, directions, reference and recipe agree
    with each other for every task and for single-task subsets."""
    bench = _bench(name, data)
    assert set(bench.splits) >= {"train", "test"}
    assert {m.split("/")[0] for m in bench.metrics} == set(bench.tasks)
    assert set(bench.reference.values) <= set(bench.metrics)
    assert bench.recipe.lr > 0 and bench.recipe.epochs >= 1 and bench.recipe.source
    loader = torch.utils.data.DataLoader(bench.dataset("test"), batch_size=2)
    inputs, targets = next(iter(loader))
    assert set(targets) == set(bench.tasks)
    for tasks in (bench.tasks, bench.tasks[:1]):
        model = bench.model(tasks).eval()
        assert model.tasks == tuple(tasks)
        with torch.no_grad():
            features, outputs = model(inputs)
        assert features.shape[0] == 2 and set(outputs) == set(tasks)
        losses = bench.losses(outputs, targets)
        assert set(losses) == set(tasks)
        assert all(loss.dim() == 0 and torch.isfinite(loss) for loss in losses.values())
        evaluator = bench.evaluator(tasks)
        evaluator.update(outputs, targets)
        values = evaluator.compute()
        assert set(values) == {m for t in tasks for m in bench.task_metrics(t)}
        assert all(isinstance(v, float) and math.isfinite(v) for v in values.values())


@pytest.mark.parametrize("source", ["features", "shared_params"])
@pytest.mark.parametrize("name", sorted(SMALL))
def test_one_step_of_a_gradient_strategy(name: str, source: str, data: dict[str, Path]) -> None:
    """PCGrad (not a combination of the losses) on each path moves trunk and heads."""
    bench = _bench(name, data)
    torch.manual_seed(0)
    model = bench.model()
    optimizer = bench.recipe.make_optimizer(model.parameters())
    strategy = tb.create_strategy("pcgrad", bench.tasks)
    loader = torch.utils.data.DataLoader(bench.dataset("train"), batch_size=2)
    inputs, targets = next(iter(loader))
    before = [p.detach().clone() for p in model.parameters()]
    features, outputs = model(inputs)
    losses = bench.losses(outputs, targets)
    if source == "features":
        report = strategy.backward(losses, features=features)
    else:
        report = strategy.backward(losses, shared_params=model.shared_parameters())
    optimizer.step()
    assert set(report.tasks) == set(bench.tasks)
    moved = {id(p) for p, b in zip(model.parameters(), before) if not torch.equal(p, b)}
    assert any(id(p) in moved for p in model.shared_parameters())
    assert all(any(id(p) in moved for p in model.heads[t].parameters()) for t in bench.tasks)


# --------------------------------------------------------------------------- the scripts
def _compare(out: Path, *arguments: str) -> dict[str, dict[str, str]]:
    compare.main(["--quick", "--out", str(out), "--timing-steps", "3", *arguments])
    with (out / "results.csv").open() as handle:
        return {row["method"]: row for row in csv.DictReader(handle)}


@pytest.mark.parametrize(
    ("name", "options", "extra"),
    [
        # the published reference: no baselines trained; the split SegNet
        ("nyuv2", ["model=segnet"], ["--batch-size", "2"]),
        # SegNet-MTAN, gradients on the trunk's parameters
        ("cityscapes", [], ["--batch-size", "4", "--grad-source", "shared_params"]),
        ("multimnist", [], ["--batch-size", "16"]),  # no reference: single-task nets trained
        ("celeba", [], ["--batch-size", "4", "--baselines", "off"]),
    ],
)
def test_compare_quick_on_every_benchmark(
    name: str, options: list[str], extra: list[str], data: dict[str, Path], tmp_path: Path
) -> None:
    options = [f"{k}={v}" for k, v in SMALL[name].items()] + options
    folder = data["mnist" if name == "multimnist" else name]
    table = _compare(
        tmp_path, "--benchmark", name, "--data-dir", str(folder), "--steps", "2",
        "--strategies", "equal", "mgda", *(["--option", *options] if options else []), *extra,
    )  # fmt: skip
    bench = _bench(name, data)
    trained = name == "multimnist"
    assert set(table) == {"equal", "mgda"} | ({"single-task"} if trained else set())
    for row in table.values():
        assert row["status"] == "ok", row["error"]
        assert all(math.isfinite(float(row[f"{m}_mean"])) for m in bench.metrics)
        assert math.isfinite(float(row["step_ms"]))
    reference = (
        [float(table["single-task"][f"{m}_mean"]) for m in bench.metrics]
        if trained
        else list(bench.reference.values.values())
    )
    has_delta = bool(reference) and 0 not in reference  # relative to 0 is undefined (NaN)
    assert math.isfinite(float(table["equal"]["delta_m_mean"])) == has_delta
    assert (tmp_path / "metrics.png").stat().st_size > 1000


def test_compare_and_train_on_a_user_benchmark(tmp_path: Path) -> None:
    """A benchmark defined in a test module runs through every script by "module:attribute"."""
    name = f"{__name__}:make_two_sines"
    table = _compare(tmp_path / "cmp", "--benchmark", name, "--strategies", "equal", "pcgrad")
    assert set(table) == {"single-task", "equal", "pcgrad"}
    for row in table.values():
        assert row["status"] == "ok" and float(row["sin/mse_mean"]) >= 0
    # lower is better: Δm% counts an error above the single-task one as negative
    single = (
        float(table["single-task"]["sin/mse_mean"]),
        float(table["single-task"]["cos/mse_mean"]),
    )
    equal = float(table["equal"]["sin/mse_mean"]), float(table["equal"]["cos/mse_mean"])
    expected = sum(-(e - s) / s * 100 for e, s in zip(equal, single)) / 2
    assert float(table["equal"]["delta_m_mean"]) == pytest.approx(expected)

    metrics = train.main(
        ["--benchmark", name, "--option", "scale=2.0", "--strategy", "mgda", "--steps", "8",
         "--out", str(tmp_path / "train")]
    )  # fmt: skip
    assert set(metrics) == {"sin/mse", "cos/mse"}
    assert (tmp_path / "train" / "metrics.json").exists()


def test_single_task_training_through_train(tmp_path: Path) -> None:
    metrics = train.main(["--strategy", "single-task:left", "--steps", "5", "--out", str(tmp_path)])
    assert set(metrics) == {"left/acc"}
    with pytest.raises(SystemExit):
        train.main(["--strategy", "single-task:middle", "--steps", "1", "--out", str(tmp_path)])


def test_amp_training_runs_in_bf16_on_cpu(data: dict[str, Path]) -> None:
    """--amp: the forward in bf16 autocast, losses and metrics in float32, every step finite."""
    bench = _bench("cityscapes", data)
    config = BenchmarkConfig(steps=2, batch_size=2, amp=True, diagnostics_every=0)
    seen: list[torch.dtype] = []
    handle = torch.nn.modules.module.register_module_forward_hook(
        lambda module, args, output: (
            seen.append(output.dtype) if isinstance(module, nn.Conv2d) else None
        )
    )
    try:
        result, _ = train_run(config, bench, "mgda", 0, Tracker())
    finally:
        handle.remove()
    assert torch.bfloat16 in seen
    assert all(math.isfinite(w) for step in result.weights for w in step)
    assert all(math.isfinite(v) for v in result.metrics.values())


def test_reproduce_multimnist_quick_on_generated_files(data: dict[str, Path], tmp_path) -> None:
    results = reproduce(
        ["multimnist", "--quick", "--steps", "3", "--data-dir", str(data["mnist"]),
         "--out", str(tmp_path)]
    )  # fmt: skip
    (result,) = results
    assert result.quick and result.deviations and not result.missing
    means = result.measured["accuracy_percent_mean"]
    assert set(means) == {"single-task", "equal", "uncertainty", "gradnorm", "mgda"}
    assert all(0 <= means[m][t] <= 100 for m in means for t in ("left", "right"))
    assert len(result.checks) == 5
    with pytest.raises(SystemExit, match="benchmark reproductions"):
        reproduce(["kendall_toy", "--data-dir", str(data["mnist"]), "--out", str(tmp_path)])


@pytest.mark.slow
def test_compare_under_torchrun_matches_ranks(tmp_path: Path) -> None:
    """Two processes (gloo): every rank trains its half of each global batch; rank 0 writes the
    table, and its metrics equal those of the same run in one process to float tolerance."""
    arguments = ["--quick", "--steps", "6", "--strategies", "equal", "mgda", "--timing-steps",
                 "0", "--diagnostics-every", "3", "--wandb-mode", "disabled"]  # fmt: skip
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node=2", "-m", "experiments.compare"]  # fmt: skip
    subprocess.run(
        [*command, *arguments, "--out", str(tmp_path / "ddp")],
        cwd=ROOT, env=env, check=True, timeout=600, capture_output=True,
    )  # fmt: skip
    single = compare.main([*arguments, "--out", str(tmp_path / "one")])
    with (tmp_path / "ddp" / "results.csv").open() as handle:
        ddp = {row["method"]: row for row in csv.DictReader(handle)}
    for row in single:
        for key in ("left/acc_mean", "right/acc_mean"):
            assert float(ddp[row["method"]][key]) == pytest.approx(row[key], abs=0.01)
