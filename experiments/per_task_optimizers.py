"""The article's per-task optimizer recipe, why it fails, and the TaskOptimizers version.

``python -m experiments.per_task_optimizers [--steps 300]``

A two-layer trunk with a classification head and a regression head on synthetic data:

1. the article's ``class_loss.backward(retain_graph=True); optimizer.step();
   regress_loss.backward(); optimizer.step()`` raises "modified by an inplace operation";
2. ``TaskOptimizers(mode="simultaneous")``: Lamb for the classes, SGD for the regression, both
   gradients at the same parameters;
3. ``TaskOptimizers(mode="sequential")``: the chain the article's code meant;
4. the research layout: Adam on the trunk driven by uncertainty weighting, one optimizer and one
   LR scheduler per head.

Prints the losses before and after training for each variant.
"""

from __future__ import annotations

import argparse

import torch
from torch import Tensor, nn

import taskbalance as tb


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU())
        self.cls = nn.Linear(32, 3)
        self.reg = nn.Linear(32, 1)

    def losses(self, x: Tensor, y_cls: Tensor, y_reg: Tensor) -> dict[str, Tensor]:
        z = self.trunk(x)
        return {
            "cls": nn.functional.cross_entropy(self.cls(z), y_cls),
            "reg": nn.functional.mse_loss(self.reg(z), y_reg),
        }


def data(seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(256, 10, generator=g)
    w = torch.randn(10, 3, generator=g)
    return (
        x,
        (x @ w).argmax(1),
        (x[:, :1] * 2 + x[:, 1:2].sin()) + 0.1 * torch.randn(256, 1, generator=g),
    )


def articles_recipe() -> str:
    torch.manual_seed(0)
    model = Net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    losses = model.losses(*data())
    losses["cls"].backward(retain_graph=True)
    optimizer.step()
    try:
        losses["reg"].backward()
        optimizer.step()
    except RuntimeError as error:
        return str(error).split(":")[0]
    return "no error"


def train(name: str, model: Net, opt: tb.TaskOptimizers, steps: int, schedulers=()) -> None:
    x, y_cls, y_reg = data()
    with torch.no_grad():
        start = {k: round(v.item(), 4) for k, v in model.losses(x, y_cls, y_reg).items()}
    for _ in range(steps):
        if opt.mode == "sequential":
            opt.step(lambda: model.losses(x, y_cls, y_reg))
        else:
            opt.zero_grad()
            opt.backward(model.losses(x, y_cls, y_reg))
            opt.step()
        for scheduler in schedulers:
            scheduler.step()
    with torch.no_grad():
        end = {k: round(v.item(), 4) for k, v in model.losses(x, y_cls, y_reg).items()}
    print(f"{name:28s} losses {start} -> {end}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args()

    print(f"{'article recipe':28s} {articles_recipe()}")

    torch.manual_seed(0)
    model = Net()
    opt = tb.TaskOptimizers(
        {
            "cls": tb.make_optimizer("lamb", model.parameters(), lr=2e-3),
            "reg": tb.make_optimizer("sgd", model.parameters(), lr=1e-2, momentum=0.9),
        }
    )
    train("simultaneous (Lamb + SGD)", model, opt, args.steps)

    torch.manual_seed(0)
    model = Net()
    opt = tb.TaskOptimizers(
        {
            "cls": tb.make_optimizer("sgd", model.parameters(), lr=5e-2),
            "reg": tb.make_optimizer("adam", model.parameters(), lr=1e-3),
        },
        mode="sequential",
    )
    train("sequential (SGD, then Adam)", model, opt, args.steps)

    torch.manual_seed(0)
    model = Net()
    opt = tb.TaskOptimizers(
        {
            "cls": tb.make_optimizer("adam", model.cls.parameters(), lr=1e-2),
            "reg": tb.make_optimizer(
                "lookahead", model.reg.parameters(), base="sgd", lr=1e-2, k=5, alpha=0.5
            ),
        },
        shared=tb.make_optimizer("adamw", model.trunk.parameters(), lr=1e-3),
        strategy="uncertainty",
    )
    schedulers = [
        torch.optim.lr_scheduler.StepLR(opt["cls"], step_size=100, gamma=0.5),
        torch.optim.lr_scheduler.ExponentialLR(opt["reg"], gamma=0.999),
    ]
    train("trunk+uncertainty, heads", model, opt, args.steps, schedulers)


if __name__ == "__main__":
    main()
