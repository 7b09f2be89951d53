"""Step time of TaskOptimizers against one combined backward.

``python -m experiments.bench_task_optimizers [--rounds 30] [--tasks 10] [--threads 1]``

Model: a 3×512 MLP trunk (input 512, three Linear(512, 512)+ReLU layers), one Linear(512, 1)
head per task, batch 256, MSE losses. One step = zero the gradients, forward, backward, optimizer
step. Paths, interleaved in one process (the order reversed every other round), median after
warm-up; ratios are what count:

* ``combined``: one Adam over every parameter, ``sum(losses).backward()``, ``step()``;
* ``heads+<strategy>``: ``TaskOptimizers`` with one Adam per head and ``shared=`` Adam over the
  trunk driven by the strategy (the heads are the only task-specific parameters);
* ``all-params``: every task's optimizer holds every parameter (the article's layout): one
  backward through the trunk per task, so about ``T`` times the combined step.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

import taskbalance as tb


def build(tasks: int) -> tuple[nn.Sequential, nn.ModuleList]:
    layers: list[nn.Module] = []
    for _ in range(3):
        layers += [nn.Linear(512, 512), nn.ReLU()]
    return nn.Sequential(*layers), nn.ModuleList(nn.Linear(512, 1) for _ in range(tasks))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--tasks", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--skip-all-params", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    names = [f"t{i}" for i in range(args.tasks)]
    x = torch.randn(256, 512)
    targets = torch.randn(args.tasks, 256, 1)

    def losses_of(trunk: nn.Module, heads: nn.ModuleList) -> dict[str, torch.Tensor]:
        z = trunk(x)
        return {n: nn.functional.mse_loss(h(z), targets[i]) for i, (n, h) in enumerate(
            zip(names, heads))}  # fmt: skip

    steps: dict[str, Callable[[], None]] = {}

    trunk0, heads0 = build(args.tasks)
    adam = torch.optim.Adam([*trunk0.parameters(), *heads0.parameters()], lr=1e-4)

    def combined() -> None:
        adam.zero_grad()
        sum(losses_of(trunk0, heads0).values()).backward()  # type: ignore[union-attr]
        adam.step()

    steps["combined"] = combined

    for strategy in ("equal", "static", "uncertainty"):
        trunk, heads = build(args.tasks)
        opt = tb.TaskOptimizers(
            {n: torch.optim.Adam(h.parameters(), lr=1e-3) for n, h in zip(names, heads)},
            shared=torch.optim.Adam(trunk.parameters(), lr=1e-4),
            strategy=strategy,
        )

        def heads_step(opt: tb.TaskOptimizers = opt, trunk=trunk, heads=heads) -> None:
            opt.zero_grad()
            opt.backward(losses_of(trunk, heads))
            opt.step()

        steps[f"heads+{strategy}"] = heads_step

    if not args.skip_all_params:
        trunk2, heads2 = build(args.tasks)
        params = [*trunk2.parameters(), *heads2.parameters()]
        every = tb.TaskOptimizers({n: torch.optim.Adam(params, lr=1e-4) for n in names})

        def all_params() -> None:
            every.zero_grad()
            every.backward(losses_of(trunk2, heads2))
            every.step()

        steps["all-params"] = all_params

    times: dict[str, list[float]] = {k: [] for k in steps}
    order = list(steps)
    for round_ in range(args.warmup + args.rounds):
        for key in order if round_ % 2 == 0 else reversed(order):
            start = time.perf_counter()
            steps[key]()
            elapsed = time.perf_counter() - start
            if round_ >= args.warmup:
                times[key].append(elapsed)
    base = statistics.median(times["combined"])
    print(f"threads={args.threads} tasks={args.tasks} rounds={args.rounds} (median)")
    for key, values in times.items():
        median = statistics.median(values)
        print(f"{key:20s} {median * 1e3:8.2f} ms   {median / base:5.2f}x")


if __name__ == "__main__":
    main()
