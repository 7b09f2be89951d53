"""Conformance checks that every strategy, built-in or plug-in, should pass.

    >>> import taskbalance as tb
    >>> from taskbalance.testing import check_strategy
    >>> check_strategy("static")  # a registered name, or a factory:
    >>> check_strategy(lambda tasks: tb.create_strategy("static", tasks, weights=2.0))

``check_strategy`` runs every check of :data:`CHECKS` (or the ones named in ``checks=``) on a
small two-layer model with three tasks (:class:`ToyProblem`). It runs all of them, failing or
not, and returns ``None`` when all pass. Otherwise it raises one :class:`ConformanceError` (an
``AssertionError``) whose ``failures`` maps each failed check to its cause, and whose message
has one line per failed check::

    ConformanceError: 2 of 13 conformance checks failed for MyWeighting:
    declared_state: MyWeighting.ema is a plain tensor attribute, outside declared state ...
    partial_labels: raised RuntimeError: The size of tensor a (2) must match ... (in
        backward(features=...) with tasks ('a', 'c'); at my_weighting.py:41, in extras)

An exception other than ``AssertionError`` raised inside a check (a raw torch error in the
plug-in, a ``TypeError``, a :class:`~taskbalance.StrategyError` where none was expected) is that
check's failure, ``<check>: raised <ExceptionType>: <message>``, with the call it happened in
and the last line outside torch that raised it. The project's own suite runs each check for
every name in :func:`taskbalance.list_strategies`, so a newly registered strategy is tested
without anyone adding it by hand.

What each check expects of a strategy:

* ``repr``: ``repr`` shows the class and the constructor arguments, ``tasks`` is the tuple given;
* ``backward_paths``: both backward paths (``shared_params=``, ``features=``) fill finite
  gradients everywhere, with one finite weight per task in the report;
* ``forward_matches_backward``: a loss-level strategy's ``s(losses).backward()`` equals
  ``s.backward(losses)`` (gradients and state), and its weights are the gradient of its
  objective (the message names each task whose weight differs, and by how much); a strategy
  with ``needs_grads`` refuses ``s(losses)`` in training;
* ``objective_and_gradients``: a loss-level strategy's closed form
  (:meth:`~taskbalance.LossWeighting.objective_and_gradients`), if it has one, gives with every
  task present and with a task absent the value of its objective and, for each learned
  parameter, the present tasks' rows of the gradient that autograd of the objective gives (the
  message names the parameter, each task that differs and by how much);
* ``combine_matches_backward``: on both paths, ``total, report = s.combine(losses, ...)`` then
  ``total.backward()`` gives the gradients of ``s.backward(losses, ...)`` on every model
  parameter, the same report weights and the same state afterwards (a strategy with
  ``max_norm > 0`` must instead refuse ``combine(features=...)``: that clip follows the
  backward);
* ``evaluation``: ``s(losses)`` on losses without a graph returns a finite scalar and changes no
  state;
* ``declared_state``: every tensor the strategy keeps is declared: no plain tensor attribute
  (use ``self.add_state(...)``, or ``register_buffer`` for a constant), and no parameter or
  buffer that changes in training steps without being declared with ``add_state`` (the
  buffers of a :class:`~taskbalance.strategy.TaskParameterOptimizer` count as declared);
* ``hooks``: the hook contract. A training step (``backward``, either path) calls
  ``before_train_step`` and ``on_train_step`` once each; evaluation (``s(losses)`` and
  ``s.combine(losses)`` under ``torch.no_grad()``, and with ``s.eval()``) calls neither and
  changes no tensor of the strategy; a failed step (a NaN loss) never calls ``on_train_step``
  and changes nothing; ``end_epoch()`` exists and runs on a fresh strategy and after training
  steps; calling the strategy twice on the very same loss tensors (``s(losses)`` then
  ``s.combine(losses)``, or ``combine`` twice) is one step: one ``on_train_step``, the state of
  one call, the same weights and total;
* ``partial_labels``: a step without task ``b`` leaves ``b``'s head without gradient and every
  per-task state entry of ``b`` (dimension 0 of a parameter or buffer) unchanged, and moves
  the present tasks' heads and every per-task state entry that the same step with all tasks
  present moves;
* ``nonfinite``: a NaN or infinite loss raises :class:`~taskbalance.NonFiniteLossError` naming
  the task, and leaves the strategy state and the model's gradients as they were;
* ``bad_input``: an unknown task, a non-scalar loss, no losses, a list, or losses without a
  graph raise :class:`~taskbalance.StrategyError` naming the culprit;
* ``resume``: ``state_dict()`` survives ``torch.save``/``torch.load(weights_only=True)`` and a
  resumed run continues bit for bit like one that never stopped (random strategies included);
* ``permutation``: deterministic strategies are equivariant: permuting the tasks permutes the
  weights and leaves the update as it was;
* ``aggregate_matches_backward``: a gradient-level strategy's ``aggregate(J)`` is the update
  that ``backward`` writes into the shared parameters.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import io
import math
import os
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from taskbalance.errors import NonFiniteLossError, StrategyError
from taskbalance.gradient_aggregation import GradientAggregation
from taskbalance.loss_weighting import LossWeighting
from taskbalance.registry import create_strategy
from taskbalance.report import StepReport
from taskbalance.strategy import Strategy, TaskParameterOptimizer

__all__ = ["CHECKS", "ConformanceError", "ToyProblem", "check_strategy"]

Factory = Callable[[Sequence[str]], Strategy]
TASKS = ("a", "b", "c")
PATHS = ("shared_params", "features")
HOOKS = ("before_train_step", "on_train_step")
# Tolerances of the comparisons between two ways of computing one step.
RTOL, ATOL = 1e-4, 1e-6


class ConformanceError(AssertionError):
    """One or more conformance checks failed; ``failures`` maps each check's name to its cause.

    The message has a header line, then one line ``<check>: <cause>`` per failed check (a
    cause that spans several lines continues on indented lines).
    """

    def __init__(self, failures: Mapping[str, str], subject: str = "the strategy", ran: int = 0):
        self.failures: dict[str, str] = dict(failures)
        self.subject = subject
        self.ran = ran or len(self.failures)
        header = (
            f"{len(self.failures)} of {self.ran} conformance checks failed for {subject}"
            if self.ran != 1
            else f"conformance check failed for {subject}"
        )
        lines = [f"{header}:"]
        for name, cause in self.failures.items():
            lines.append(f"{name}: " + cause.replace("\n", "\n    "))
        super().__init__("\n".join(lines))

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.failures, self.subject, self.ran))


@dataclass
class ToyProblem:
    """A two-layer tanh trunk, one linear head per task, squared errors of different scales."""

    trunk: nn.Sequential
    heads: nn.ModuleDict
    scales: dict[str, float]

    @classmethod
    def create(cls, tasks: Sequence[str], seed: int = 0) -> ToyProblem:
        generator = torch.Generator().manual_seed(seed)
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            trunk = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 5), nn.Tanh())
            heads = nn.ModuleDict({t: nn.Linear(5, 1) for t in sorted(tasks)})
        scales = {
            t: float(s)
            for t, s in zip(sorted(tasks), 0.5 + 2 * torch.rand(len(tasks), generator=generator))
        }
        return cls(trunk, heads, scales)

    def losses(
        self, step: int, tasks: Sequence[str] | None = None
    ) -> tuple[dict[str, Tensor], Tensor]:
        """Losses of the tasks (default: all) on batch ``step``, and the trunk output."""
        generator = torch.Generator().manual_seed(1000 + step)
        x = torch.randn(16, 4, generator=generator)
        targets = torch.randn(16, len(self.heads), generator=generator)
        features = self.trunk(x)
        losses = {}
        for column, task in enumerate(sorted(self.heads)):
            if tasks is None or task in tasks:
                error = self.heads[task](features).squeeze(1) - targets[:, column]
                losses[task] = self.scales[task] * (1.0 + error.pow(2).mean())
        return losses, features

    def parameters(self) -> list[nn.Parameter]:
        return [*self.trunk.parameters(), *self.heads.parameters()]

    def named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """``("trunk.0.weight", p)``, ..., ``("heads.a.weight", p)``, ... in :meth:`parameters`
        order."""
        return [
            *(("trunk." + n, p) for n, p in self.trunk.named_parameters()),
            *(("heads." + n, p) for n, p in self.heads.named_parameters()),
        ]

    def grads(self) -> list[Tensor | None]:
        return [None if p.grad is None else p.grad.clone() for p in self.parameters()]

    def zero_grad(self) -> None:
        for p in self.parameters():
            p.grad = None

    @torch.no_grad()
    def sgd_step(self, lr: float = 0.05) -> None:
        for p in self.parameters():
            if p.grad is not None:
                p.sub_(lr * p.grad)


# --------------------------------------------------------------------------- helpers
@contextlib.contextmanager
def _during(stage: str) -> Iterator[None]:
    """Note on an exception (not an assertion) the call it was raised in, for its message."""
    try:
        yield
    except AssertionError:
        raise
    except Exception as error:
        if getattr(error, "_conformance_stage", None) is None:
            with contextlib.suppress(AttributeError, TypeError):
                error._conformance_stage = stage  # type: ignore[attr-defined]
        raise


def _path_kwargs(problem: ToyProblem, features: Tensor, path: str) -> dict[str, Any]:
    if path == "features":
        return {"features": features}
    return {"shared_params": problem.trunk.parameters()}


def _call_name(method: str, path: str, tasks: Sequence[str] | None = None) -> str:
    argument = "features=..." if path == "features" else "shared_params=..."
    where = "" if tasks is None else f" with tasks {tuple(tasks)!r}"
    return f"{method}({argument}){where}"


def _step(
    strategy: Strategy,
    problem: ToyProblem,
    step: int,
    path: str,
    tasks: Sequence[str] | None = None,
) -> StepReport:
    problem.zero_grad()
    losses, features = problem.losses(step, tasks)
    with _during(_call_name("backward", path, tasks)):
        return strategy.backward(losses, **_path_kwargs(problem, features, path))


def _train(strategy: Strategy, problem: ToyProblem, steps: range, path: str) -> list[Tensor]:
    weights = []
    for step in steps:
        report = _step(strategy, problem, step, path)
        weights.append(report.weight_values.clone())
        problem.sgd_step()
    return weights


def _state(strategy: Strategy) -> dict[str, Tensor]:
    return {k: v.clone() for k, v in strategy.state_dict().items() if isinstance(v, Tensor)}


# nn.Module's own bookkeeping and the engine's caches: not state a strategy keeps.
_MODULE_INTERNALS = frozenset(vars(nn.Module()))
_ENGINE_ATTRIBUTES = frozenset(
    {"_init_args", "_index_cache", "_last_step", "_positions", "_states", "_learned"}
)


def _plain_tensors(module: nn.Module) -> list[tuple[str, Tensor]]:
    """Tensors held in plain attributes of ``module`` (directly, or in a list, tuple or dict)."""
    found: list[tuple[str, Tensor]] = []
    for name, value in vars(module).items():
        if name in _MODULE_INTERNALS or name in _ENGINE_ATTRIBUTES:
            continue
        if isinstance(value, Tensor):
            found.append((name, value))
        elif isinstance(value, (list, tuple)):
            found.extend((f"{name}[{i}]", v) for i, v in enumerate(value) if isinstance(v, Tensor))
        elif isinstance(value, dict):
            found.extend((f"{name}[{k!r}]", v) for k, v in value.items() if isinstance(v, Tensor))
    return found


def _slots(strategy: Strategy) -> dict[str, tuple[str, bool, Tensor]]:
    """Every parameter and buffer of the strategy's modules: qualified name -> (kind, declared,
    a copy). Declared: in ``_states`` of its strategy module, or a buffer of a
    :class:`TaskParameterOptimizer`."""
    found: dict[str, tuple[str, bool, Tensor]] = {}
    for prefix, module in strategy.named_modules():
        dot = f"{prefix}." if prefix else ""
        for kind, slots in (("parameter", module._parameters), ("buffer", module._buffers)):
            for name, tensor in slots.items():
                if tensor is None:
                    continue
                declared = isinstance(module, TaskParameterOptimizer) or (
                    isinstance(module, Strategy) and name in module._states
                )
                found[dot + name] = (kind, declared, tensor.detach().clone())
    return found


def _tensors(strategy: Strategy) -> dict[str, Tensor]:
    """A copy of every tensor the strategy holds: parameters and buffers, declared or not, and
    tensors in plain attributes."""
    found = {name: copy for name, (_, _, copy) in _slots(strategy).items()}
    for prefix, module in strategy.named_modules():
        dot = f"{prefix}." if prefix else ""
        for name, tensor in _plain_tensors(module):
            found[f"{dot}{name} (plain attribute)"] = tensor.detach().clone()
    return found


def _same(a: Tensor, b: Tensor) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype or a.device != b.device:
        return False
    if a.is_floating_point() or a.is_complex():
        return bool(torch.isclose(a, b, rtol=0, atol=0, equal_nan=True).all())
    return torch.equal(a, b)


def _changed(before: Mapping[str, Tensor], after: Mapping[str, Tensor]) -> list[str]:
    """Names of the tensors that differ, appeared or disappeared between two snapshots."""
    names = [n for n in before if n not in after or not _same(before[n], after[n])]
    return names + [n for n in after if n not in before]


def _assert_same_state(before: dict[str, Tensor], after: dict[str, Tensor], what: str) -> None:
    assert before.keys() == after.keys(), f"{what}: state keys changed"
    for key in before:
        assert torch.equal(before[key], after[key]), f"{what}: state {key!r} changed"


def _describe_difference(
    actual: Tensor,
    expected: Tensor,
    *,
    rtol: float,
    atol: float,
    labels: Sequence[str] | None = None,
    names: tuple[str, str] = ("", ""),
    equal_nan: bool = False,
) -> str | None:
    """``None`` if close (``|a - e| <= atol + rtol |e|``); else which entries differ, how much.

    With ``labels`` (one per entry of a vector): every entry that differs, as
    ``"<label>: <names[0]> <actual> vs <names[1]> <expected> (off by ...)"``."""
    actual, expected = actual.detach().cpu(), expected.detach().cpu()
    if actual.shape != expected.shape:
        return f"shape {tuple(actual.shape)} vs {tuple(expected.shape)}"
    if not (actual.is_floating_point() or expected.is_floating_point()):
        if torch.equal(actual, expected):
            return None
        return f"{actual.tolist()} vs {expected.tolist()}"
    a, e = actual.double(), expected.double()
    close = torch.isclose(a, e, rtol=rtol, atol=atol, equal_nan=equal_nan)
    if bool(close.all()):
        return None
    gap = (a - e).abs().nan_to_num(nan=math.inf).masked_fill(close, 0).reshape(-1)
    allowed = f"allowed {atol:g} + {rtol:g}·|expected|"
    if labels is not None and a.dim() == 1:
        mine, theirs = (f"{name} " if name else "" for name in names)
        parts = [
            f"{labels[i]}: {mine}{a[i].item():.6g} vs {theirs}{e[i].item():.6g} "
            f"(off by {gap[i].item():.3g})"
            for i in (~close).nonzero().reshape(-1).tolist()
        ]
        return f"{', '.join(parts)}; {allowed}"
    worst = int(gap.argmax())
    position = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), a.shape))
    return (
        f"{int((~close).sum())} of {a.numel()} entries differ, the most at {position}: "
        f"{a.reshape(-1)[worst].item():.6g} vs {e.reshape(-1)[worst].item():.6g} "
        f"(off by {gap[worst].item():.3g}; {allowed})"
    )


def _assert_close_state(mine: dict[str, Tensor], theirs: dict[str, Tensor], what: str) -> None:
    assert mine.keys() == theirs.keys(), (
        f"{what}: state keys differ: {sorted(mine.keys() ^ theirs.keys())}"
    )
    for key in mine:
        difference = _describe_difference(
            mine[key], theirs[key], rtol=RTOL, atol=ATOL, equal_nan=True
        )
        assert difference is None, f"{what}: state {key!r} differs: {difference}"


def _assert_finite_grads(problem: ToyProblem, what: str) -> None:
    for name, p in problem.named_parameters():
        assert p.grad is not None, f"{what}: parameter {name} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{what}: gradient of {name} is not finite"


def _expect_error(
    error: type[Exception], fragment: str, call: Callable[[], object], what: str
) -> None:
    try:
        call()
    except error as raised:
        assert fragment in str(raised), (
            f"{what}: message {str(raised)!r} does not name {fragment!r}"
        )
    else:
        raise AssertionError(f"{what}: no {error.__name__} raised")


def _count_hooks(strategy: Strategy) -> dict[str, int]:
    """Wrap the instance's training hooks with counters; return the live counts."""
    counts = dict.fromkeys(HOOKS, 0)

    def counting(name: str, hook: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(hook)
        def counted(*args: Any, **kwargs: Any) -> Any:
            counts[name] += 1
            return hook(*args, **kwargs)

        return counted

    for name in HOOKS:
        setattr(strategy, name, counting(name, getattr(strategy, name)))
    return counts


# --------------------------------------------------------------------------- checks
def check_repr(factory: Factory) -> None:
    strategy = factory(TASKS)
    text = repr(strategy)
    assert type(strategy).__name__ in text and "tasks=" in text, f"repr lacks arguments: {text}"
    assert strategy.tasks == TASKS, f"tasks is {strategy.tasks!r}, expected {TASKS!r}"


def check_backward_paths(factory: Factory) -> None:
    for path in PATHS:
        strategy, problem = factory(TASKS), ToyProblem.create(TASKS)
        for step in range(3):
            report = _step(strategy, problem, step, path)
            _assert_finite_grads(problem, f"{path} step {step}")
            assert report.tasks == TASKS, f"report tasks {report.tasks}"
            assert report.weight_values.shape == (len(TASKS),), "one weight per present task"
            assert torch.isfinite(report.weight_values).all(), f"{path}: weights not finite"
            assert set(report.to_dict()) >= {f"loss/{t}" for t in TASKS} | {
                f"weight/{t}" for t in TASKS
            }
            problem.sgd_step()


def check_forward_matches_backward(factory: Factory) -> None:
    strategy, problem = factory(TASKS), ToyProblem.create(TASKS)
    losses, _ = problem.losses(0)
    if strategy.needs_grads:
        _expect_error(
            StrategyError,
            "backward",
            lambda: strategy(losses),
            "training forward of a needs_grads strategy",
        )
        return
    twin, twin_problem = copy.deepcopy(strategy), copy.deepcopy(problem)
    with _during("s(losses).backward()"):
        strategy(losses).backward()
    twin_losses, _ = twin_problem.losses(0)
    with _during("backward(losses)"):
        twin.backward(twin_losses)
    for (name, p), theirs in zip(problem.named_parameters(), twin_problem.grads()):
        mine = p.grad
        assert mine is not None and theirs is not None, (
            f"parameter {name} got a gradient from one path only "
            f"(s(losses).backward(): {mine is not None}, s.backward(losses): {theirs is not None})"
        )
        torch.testing.assert_close(
            mine, theirs, msg="s(losses).backward() differs from s.backward(losses)"
        )
    _assert_same_state(_state(strategy), _state(twin), "forward path vs backward path")
    assert isinstance(twin, LossWeighting)
    detached, index = torch.stack(list(losses.values())).detach(), torch.arange(len(TASKS))
    # The objective and the weights each on their own copy of the state: a hook that moves the
    # state when called (the declared_state, evaluation and hooks checks name that) does not
    # make them differ here.
    probe = detached.clone().requires_grad_(True)
    with _during("objective(losses, index)"):
        value = copy.deepcopy(twin).objective(probe, index)
    assert isinstance(value, Tensor) and value.dim() == 0, (
        f"objective() must return a scalar tensor, got {value!r}"
    )
    if value.requires_grad:
        (expected,) = torch.autograd.grad(value, probe, allow_unused=True, materialize_grads=True)
    else:
        expected = torch.zeros_like(probe)  # an objective without a graph: no gradient
    with torch.no_grad(), _during("loss_weights(losses, index)"):
        weights = copy.deepcopy(twin).loss_weights(detached, index)
    difference = _describe_difference(
        weights.float(),
        expected.float(),
        rtol=1.3e-6,  # torch.testing.assert_close's float32 tolerances
        atol=1e-5,
        labels=[f"task {t!r}" for t in TASKS],
        names=("weight", "d objective / d loss"),
    )
    assert difference is None, f"weights are not d objective / d losses ({difference})"


def check_objective_and_gradients(factory: Factory) -> None:
    strategy, problem = factory(TASKS), ToyProblem.create(TASKS)
    if not isinstance(strategy, LossWeighting):
        return
    _train(strategy, problem, range(2), "features")  # learned parameters away from their start
    losses, _ = problem.losses(2)
    values = torch.stack(list(losses.values())).detach()
    names = list(strategy._learned)
    for present in (TASKS, ("a", "c")):
        index = torch.tensor([TASKS.index(t) for t in present])
        what = f"objective_and_gradients() with tasks {present!r}"
        # Each on its own copy of the state, as in forward_matches_backward.
        hook = copy.deepcopy(strategy)
        with torch.no_grad(), _during(what):
            weights = hook.loss_weights(values[index], index)
            closed = hook.objective_and_gradients(values[index], index, weights)
        if closed is None:
            return  # no closed form: the engine uses autograd
        assert isinstance(closed, tuple) and len(closed) == 2, (
            f"{what} must return (value, {{name: rows}}), got {closed!r}"
        )
        value, rows = closed
        assert isinstance(rows, Mapping) and sorted(rows) == sorted(names), (
            f"{what} must return the gradients of the learned parameters {sorted(names)}, got "
            f"{rows!r}"
        )
        probe = copy.deepcopy(strategy)
        with torch.enable_grad(), _during(f"objective(losses, index) with tasks {present!r}"):
            objective = probe.objective(values[index], index)
            parameters = [getattr(probe, n) for n in names]
            expected = (
                torch.autograd.grad(objective, parameters, materialize_grads=True)
                if parameters
                else ()
            )
        # torch.testing.assert_close's float32 tolerances
        difference = _describe_difference(value, objective, rtol=1.3e-6, atol=1e-5)
        assert difference is None, f"{what}: the value is not objective's ({difference})"
        for name, grad in zip(names, expected):
            got, want = rows[name], grad[index]
            assert isinstance(got, Tensor) and got.shape == want.shape, (
                f"{what}: the gradient of {name!r} must have the present tasks' rows, shape "
                f"{tuple(want.shape)}, got {tuple(got.shape) if isinstance(got, Tensor) else got!r}"
            )
            difference = _describe_difference(
                got,
                want,
                rtol=1.3e-6,
                atol=1e-5,
                labels=[f"task {t!r}" for t in present],  # for a vector of one entry per task
                names=("closed form", "autograd"),
            )
            assert difference is None, (
                f"{what}: {name!r} is not the gradient of objective ({difference})"
            )


def check_combine_matches_backward(factory: Factory) -> None:
    for path in PATHS:
        strategy, problem = factory(TASKS), ToyProblem.create(TASKS)
        if path == "features" and getattr(strategy, "max_norm", 0) > 0:
            _check_combine_refuses_a_clip(strategy, problem)
            continue
        twin, twin_problem = copy.deepcopy(strategy), copy.deepcopy(problem)
        for step in range(2):
            what = f"{path} step {step}"
            problem.zero_grad()
            losses, features = problem.losses(step)
            with _during(_call_name("combine", path)):
                total, report = strategy.combine(losses, **_path_kwargs(problem, features, path))
            assert isinstance(total, Tensor) and total.dim() == 0, (
                f"{what}: combine must return a scalar total, got {total!r}"
            )
            assert isinstance(report, StepReport), f"{what}: combine returned {report!r}"
            with _during(f"total.backward() of {_call_name('combine', path)}"):
                total.backward()
            expected = _step(twin, twin_problem, step, path)
            for (name, p), theirs in zip(problem.named_parameters(), twin_problem.grads()):
                mine = p.grad
                assert (mine is None) == (theirs is None), (
                    f"{what}: parameter {name} got a gradient from one path only "
                    f"(combine: {mine is not None}, backward: {theirs is not None})"
                )
                if mine is not None and theirs is not None:
                    difference = _describe_difference(mine, theirs, rtol=RTOL, atol=ATOL)
                    assert difference is None, (
                        f"{what}: combine's total.backward() and backward() give different "
                        f"gradients on {name}: {difference}"
                    )
            difference = _describe_difference(
                report.weight_values,
                expected.weight_values,
                rtol=RTOL,
                atol=ATOL,
                labels=[f"task {t!r}" for t in expected.tasks],
                names=("combine", "backward"),
                equal_nan=True,
            )
            assert report.tasks == expected.tasks and difference is None, (
                f"{what}: combine reports other weights than backward ({difference})"
            )
            _assert_close_state(_state(strategy), _state(twin), f"{what}: combine vs backward")
            problem.sgd_step()
            twin_problem.sgd_step()


def _combine_path(strategy: Strategy) -> str:
    """Where ``combine`` is checked: ``features`` unless the strategy clips with ``max_norm``,
    whose ``combine`` refuses ``features=`` (:func:`_check_combine_refuses_a_clip`)."""
    return "shared_params" if getattr(strategy, "max_norm", 0) > 0 else "features"


def _check_combine_refuses_a_clip(strategy: Strategy, problem: ToyProblem) -> None:
    """``max_norm`` on ``features=`` clips the trunk's gradient after the backward, which
    ``combine`` leaves to the caller: it must refuse, naming ``max_norm``, and change nothing."""
    before = _state(strategy)
    losses, features = problem.losses(0)
    try:
        strategy.combine(losses, features=features)
    except StrategyError as error:
        assert "max_norm" in str(error), (
            f"combine(features=...) refused without naming max_norm: {error}"
        )
    else:
        raise AssertionError("combine(features=...) with max_norm > 0 must raise StrategyError")
    _assert_close_state(before, _state(strategy), "a refused combine")


def check_evaluation(factory: Factory) -> None:
    strategy, problem = factory(TASKS), ToyProblem.create(TASKS)
    _train(strategy, problem, range(2), "features")
    before = _state(strategy)
    with torch.no_grad(), _during("s(losses) under torch.no_grad()"):
        losses, _ = problem.losses(5)
        value = strategy(losses)
    assert value.dim() == 0 and torch.isfinite(value), f"evaluation value {value}"
    _assert_same_state(before, _state(strategy), "evaluation")


def check_declared_state(factory: Factory) -> None:
    problems: dict[str, str] = {}

    def plain_attributes(strategy: Strategy) -> None:
        for prefix, module in strategy.named_modules():
            owner = type(module).__name__ if not prefix else f"{type(strategy).__name__}.{prefix}"
            for name, tensor in _plain_tensors(module):
                attribute = name.split("[")[0]
                problems.setdefault(
                    f"{prefix}:{attribute}",
                    f"{owner}.{name} is a plain tensor attribute (shape "
                    f"{tuple(tensor.shape)}), outside declared state: state_dict(), the "
                    "transaction and partial labels do not see it; declare it with "
                    f"self.add_state({attribute!r}, ...) (or register_buffer({attribute!r}, ...) "
                    "for a constant)",
                )

    for path in PATHS:
        strategy, problem = factory(TASKS), ToyProblem.create(TASKS)
        plain_attributes(strategy)
        before = _slots(strategy)
        try:
            _train(strategy, problem, range(3), path)
        except Exception as error:
            if not problems:
                raise
            problems["step"] = f"(and a training step raised {type(error).__name__}: {error})"
            break
        plain_attributes(strategy)
        for name, (kind, declared, tensor) in _slots(strategy).items():
            if declared:
                continue
            if name not in before:
                problems.setdefault(
                    name,
                    f"{kind} {name!r} appears during training but is not declared with add_state",
                )
            elif not _same(before[name][2], tensor):
                problems.setdefault(
                    name,
                    f"{kind} {name!r} changes during training but is not declared with "
                    "add_state (the transaction does not restore it after a failed step, nor "
                    "partial labels the rows of absent tasks)",
                )
    assert not problems, "; ".join(problems.values())


def check_hooks(factory: Factory) -> None:
    # end_epoch on a fresh strategy
    fresh = factory(TASKS)
    end_epoch = getattr(fresh, "end_epoch", None)
    assert callable(end_epoch), (
        f"{type(fresh).__name__}.end_epoch is missing or not callable (Strategy's is a no-op)"
    )
    with _during("end_epoch() on a fresh strategy"):
        end_epoch()

    # one training step, one call of each training hook
    for path in PATHS:
        strategy, problem = factory(TASKS), ToyProblem.create(TASKS)
        counts = _count_hooks(strategy)
        for step in range(2):
            _step(strategy, problem, step, path)
            for hook in HOOKS:
                assert counts[hook] == step + 1, (
                    f"{path}: {step + 1} training step(s) called {hook} {counts[hook]} times "
                    "(once per step expected)"
                )
            problem.sgd_step()

    # evaluation: no hook, no change (the strategy of the features path, trained two steps)
    counts.update(dict.fromkeys(HOOKS, 0))
    before = _tensors(strategy)
    losses, features = problem.losses(5)
    kwargs = _path_kwargs(problem, features, "features")
    with torch.no_grad(), _during("s(losses) under torch.no_grad()"):
        strategy(losses)
    with torch.no_grad(), _during("s.combine(losses) under torch.no_grad()"):
        strategy.combine(losses, **kwargs)
    strategy.eval()
    try:
        with _during("s(losses) after s.eval()"):
            strategy(losses)
        with _during("s.combine(losses) after s.eval()"):
            strategy.combine(losses, **kwargs)
    finally:
        strategy.train()
    called = {hook: n for hook, n in counts.items() if n}
    assert not called, f"evaluation called {called} (training hooks run in training steps only)"
    changed = _changed(before, _tensors(strategy))
    assert not changed, (
        f"evaluation changed {changed} (state moves in on_train_step, which evaluation never "
        "calls; not in loss_weights or another hook that evaluation calls)"
    )

    # a failed step: no on_train_step, no change
    problem.zero_grad()
    losses, features = problem.losses(6)
    losses["b"] = losses["b"] * float("nan")
    kwargs = _path_kwargs(problem, features, "features")
    combine_kwargs = _path_kwargs(problem, features, _combine_path(strategy))
    _expect_error(
        NonFiniteLossError,
        "'b'",
        functools.partial(strategy.backward, losses, **kwargs),
        "backward with a NaN loss",
    )
    _expect_error(
        NonFiniteLossError,
        "'b'",
        functools.partial(strategy.combine, losses, **combine_kwargs),
        "combine with a NaN loss",
    )
    assert counts["on_train_step"] == 0, (
        f"a failed step (a NaN loss) called on_train_step {counts['on_train_step']} times"
    )
    changed = _changed(before, _tensors(strategy))
    assert not changed, f"a failed step (a NaN loss) changed {changed}"

    # end_epoch after training steps, and training goes on
    with _during("end_epoch() after training steps"):
        strategy.end_epoch()
    report = _step(strategy, problem, 7, "features")
    assert torch.isfinite(report.weight_values).all(), (
        f"the weights of the step after end_epoch() are not finite: {report.weight_values}"
    )

    # the same loss tensors twice: one step
    strategy, problem = factory(TASKS), ToyProblem.create(TASKS)
    counts = _count_hooks(strategy)
    losses, features = problem.losses(0)
    kwargs = _path_kwargs(problem, features, _combine_path(strategy))
    if isinstance(strategy, LossWeighting) and not strategy.needs_grads:
        what = "s(losses) then s.combine(losses)"
        with _during("s(losses)"):
            first_total = strategy(losses)
        grads = torch.autograd.grad(
            first_total, list(losses.values()), retain_graph=True, materialize_grads=True
        )
        first_weights = torch.stack([g.reshape(()) for g in grads])
    else:
        what = "combine twice"
        with _during(_call_name("combine", _combine_path(strategy))):
            first_total, first_report = strategy.combine(losses, **kwargs)
        first_weights = first_report.weight_values
    after_one = _tensors(strategy)
    kwargs = _path_kwargs(problem, features, _combine_path(strategy))  # a generator: anew
    with _during(f"the second call of {what}"):
        second_total, second_report = strategy.combine(losses, **kwargs)
    changed = _changed(after_one, _tensors(strategy))
    assert not changed, (
        f"{what} on the very same loss tensors changed {changed} a second time (it is one step)"
    )
    assert counts["on_train_step"] == 1, (
        f"{what} on the very same loss tensors called on_train_step {counts['on_train_step']} "
        "times (it is one step)"
    )
    difference = _describe_difference(
        second_report.weight_values,
        first_weights,
        rtol=RTOL,
        atol=ATOL,
        labels=[f"task {t!r}" for t in second_report.tasks],
        names=("second call", "first call"),
        equal_nan=True,
    )
    assert difference is None, f"{what} on the same loss tensors gave other weights: {difference}"
    difference = _describe_difference(second_total, first_total, rtol=RTOL, atol=ATOL)
    assert difference is None, f"{what} on the same loss tensors gave another total: {difference}"


def check_partial_labels(factory: Factory) -> None:
    present = ("a", "c")
    for path in PATHS:
        strategy, problem = factory(TASKS), ToyProblem.create(TASKS)
        _train(strategy, problem, range(2), path)
        # The same step with every task shows which per-task state a step moves.
        full, full_problem = copy.deepcopy(strategy), copy.deepcopy(problem)
        before = _state(strategy)
        _step(full, full_problem, 2, path)
        moved = _moved_rows(before, _state(full))
        report = _step(strategy, problem, 2, path, tasks=present)
        assert report.tasks == present, f"report tasks {report.tasks}"
        assert torch.isfinite(report.weight_values).all(), f"{path}: weights not finite"
        assert all(p.grad is None for p in problem.heads["b"].parameters()), (
            "absent task's head got a gradient"
        )
        for task in present:
            assert all(p.grad is not None for p in problem.heads[task].parameters()), (
                f"{path}: the head of the present task {task!r} got no gradient"
            )
        after = _state(strategy)
        position = TASKS.index("b")
        for key in _per_task(after):
            assert torch.equal(after[key][position], before[key][position]), (
                f"{path}: state {key!r} of the absent task 'b' changed"
            )
        for key, rows in moved.items():
            for task in present:
                if TASKS.index(task) in rows:
                    row = TASKS.index(task)
                    assert not torch.equal(after[key][row], before[key][row]), (
                        f"{path}: state {key!r} of the present task {task!r} did not move "
                        "(it moves in the same step with every task present)"
                    )


def _per_task(state: dict[str, Tensor]) -> list[str]:
    """The state entries with one row per task (dimension 0)."""
    return [k for k, v in state.items() if v.dim() > 0 and v.shape[0] == len(TASKS)]


def _moved_rows(before: dict[str, Tensor], after: dict[str, Tensor]) -> dict[str, set[int]]:
    """Per per-task state entry, the rows (tasks) that differ between two states."""
    moved: dict[str, set[int]] = {}
    for key in _per_task(after):
        if key in before and before[key].shape == after[key].shape:
            rows = {i for i in range(len(TASKS)) if not torch.equal(before[key][i], after[key][i])}
            if rows:
                moved[key] = rows
    return moved


def check_nonfinite(factory: Factory) -> None:
    for bad in (float("nan"), float("inf")):
        for path in PATHS:
            strategy, problem = factory(TASKS), ToyProblem.create(TASKS)
            _train(strategy, problem, range(2), path)
            problem.zero_grad()
            before = _state(strategy)
            losses, features = problem.losses(3)
            losses["b"] = losses["b"] * bad
            _expect_error(
                NonFiniteLossError,
                "'b'",
                functools.partial(
                    strategy.backward, losses, **_path_kwargs(problem, features, path)
                ),
                f"{bad} loss",
            )
            _assert_same_state(before, _state(strategy), f"{bad} loss")
            assert all(g is None for g in problem.grads()), f"{bad} loss: gradients were written"


def check_bad_input(factory: Factory) -> None:
    strategy, problem = factory(TASKS), ToyProblem.create(TASKS)
    losses, features = problem.losses(0)
    kwargs: dict[str, Any] = {"features": features}
    _expect_error(
        StrategyError,
        "'zzz'",
        lambda: strategy.backward({**losses, "zzz": losses["a"]}, **kwargs),
        "unknown task",
    )
    _expect_error(
        StrategyError,
        "'a'",
        lambda: strategy.backward({**losses, "a": losses["a"].expand(2)}, **kwargs),
        "non-scalar loss",
    )
    _expect_error(StrategyError, "empty", lambda: strategy.backward({}, **kwargs), "empty losses")
    _expect_error(
        StrategyError,
        "mapping",
        lambda: strategy.backward(list(losses.values()), **kwargs),  # type: ignore[arg-type]
        "a list of losses",
    )
    detached = {t: v.detach() for t, v in losses.items()}
    _expect_error(
        StrategyError,
        "require grad",
        lambda: strategy.backward(detached, **kwargs),
        "losses without graph",
    )


def check_resume(factory: Factory) -> None:
    for path in PATHS:
        strategy, problem = factory(TASKS), ToyProblem.create(TASKS)
        _train(strategy, problem, range(3), path)
        buffer = io.BytesIO()
        torch.save(strategy.state_dict(), buffer)
        buffer.seek(0)
        resumed = factory(TASKS)
        with _during("load_state_dict(torch.load(..., weights_only=True))"):
            resumed.load_state_dict(torch.load(buffer, weights_only=True))
        resumed_problem = copy.deepcopy(problem)
        expected = _train(strategy, problem, range(3, 7), path)
        got = _train(resumed, resumed_problem, range(3, 7), path)
        for step, (a, b) in enumerate(zip(expected, got)):
            assert torch.equal(a, b), (
                f"{path}: resumed weights differ at step {step + 3}: {a} vs {b}"
            )
        for a, b in zip(problem.parameters(), resumed_problem.parameters()):
            assert torch.equal(a, b), f"{path}: resumed model differs"


def check_permutation(factory: Factory) -> None:
    strategy = factory(TASKS)
    if not type(strategy).deterministic:
        return
    permuted_tasks = TASKS[::-1]
    for path in PATHS:
        strategy, permuted = factory(TASKS), factory(permuted_tasks)
        problem = ToyProblem.create(TASKS)
        twin = copy.deepcopy(problem)
        for step in range(3):
            report = _step(strategy, problem, step, path)
            other = _step(permuted, twin, step, path)
            for task in TASKS:
                torch.testing.assert_close(
                    report.weights[task],
                    other.weights[task],
                    rtol=RTOL,
                    atol=ATOL,
                    msg=f"{path}: permuting the tasks changed the weight of {task!r}",
                )
            for a, b in zip(problem.grads(), twin.grads()):
                assert a is not None and b is not None
                torch.testing.assert_close(
                    a,
                    b,
                    rtol=RTOL,
                    atol=ATOL,
                    msg=f"{path}: permuting the tasks changed the update",
                )
            problem.sgd_step()
            twin.sgd_step()


def check_aggregate_matches_backward(factory: Factory) -> None:
    strategy = factory(TASKS)
    if not isinstance(strategy, GradientAggregation):
        return
    problem = ToyProblem.create(TASKS)
    twin = copy.deepcopy(strategy)
    params = list(problem.trunk.parameters())
    losses, _ = problem.losses(0)
    rows = torch.stack(
        [
            torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params, retain_graph=True)])
            for loss in losses.values()
        ]
    )
    with _during("aggregate(jacobian, losses)"):
        direction = twin.aggregate(rows, torch.stack(list(losses.values())).detach())
    assert direction.shape == (rows.shape[1],) and torch.isfinite(direction).all()
    problem.zero_grad()
    with _during("backward(shared_params=...)"):
        strategy.backward(losses, shared_params=params)
    written = torch.cat([p.grad.reshape(-1) for p in params])  # type: ignore[union-attr]
    torch.testing.assert_close(
        written, direction, rtol=RTOL, atol=ATOL, msg="aggregate(J) differs from backward's update"
    )


CHECKS: dict[str, Callable[[Factory], None]] = {
    "repr": check_repr,
    "backward_paths": check_backward_paths,
    "forward_matches_backward": check_forward_matches_backward,
    "objective_and_gradients": check_objective_and_gradients,
    "combine_matches_backward": check_combine_matches_backward,
    "evaluation": check_evaluation,
    "declared_state": check_declared_state,
    "hooks": check_hooks,
    "partial_labels": check_partial_labels,
    "nonfinite": check_nonfinite,
    "bad_input": check_bad_input,
    "resume": check_resume,
    "permutation": check_permutation,
    "aggregate_matches_backward": check_aggregate_matches_backward,
}


def _as_factory(strategy: str | Factory) -> Factory:
    if isinstance(strategy, str):
        name = strategy
        return lambda tasks: create_strategy(name, tasks)
    return strategy


def _subject(strategy: str | Factory) -> str:
    if isinstance(strategy, str):
        return repr(strategy)
    return getattr(strategy, "__qualname__", None) or repr(strategy)


_TORCH_DIR = os.path.dirname(torch.__file__) + os.sep
_OWN_FILE = os.path.abspath(__file__)


def _origin(error: BaseException) -> str | None:
    """``"at file.py:line, in function"``: the innermost frame of ``error`` outside torch and
    outside this file (the plug-in's line, or the engine's)."""
    for frame in reversed(traceback.extract_tb(error.__traceback__)):
        path = os.path.abspath(frame.filename)
        if not (path.startswith(_TORCH_DIR) or path == _OWN_FILE):
            return f"at {os.path.basename(path)}:{frame.lineno}, in {frame.name}"
    return None


def _cause(error: Exception) -> str:
    """The cause of a check's failure, as its line of :class:`ConformanceError` shows it."""
    if isinstance(error, AssertionError):
        text = str(error).strip()
        if text:
            return text
        frames = traceback.extract_tb(error.__traceback__)
        if not frames:
            return "assertion failed"
        frame = frames[-1]
        return (
            f"assertion failed at {os.path.basename(frame.filename)}:{frame.lineno}: {frame.line}"
        )
    stage = getattr(error, "_conformance_stage", None)
    notes = [note for note in (stage and f"in {stage}", _origin(error)) if note]
    where = f" ({'; '.join(notes)})" if notes else ""
    return f"raised {type(error).__name__}: {str(error).strip()}{where}"


def check_strategy(strategy: str | Factory, checks: Sequence[str] | None = None) -> None:
    """Run the conformance checks (all, or the named ones) on a registered name or a factory.

    Every selected check runs, whether others failed or not. Returns ``None`` when all pass;
    otherwise raises :class:`ConformanceError` with the cause of each failed check (an
    exception raised inside a check is its failure: ``raised <ExceptionType>: <message>``).
    """
    names = list(CHECKS) if checks is None else [checks] if isinstance(checks, str) else [*checks]
    unknown = [name for name in names if name not in CHECKS]
    if unknown:
        raise ValueError(f"unknown conformance checks {unknown}; the checks are {list(CHECKS)}")
    factory = _as_factory(strategy)
    failures: dict[str, str] = {}
    for name in names:
        try:
            CHECKS[name](factory)
        except Exception as error:  # an assertion, or anything a plug-in raised: its failure
            failures[name] = _cause(error)
    if failures:
        raise ConformanceError(failures, _subject(strategy), len(names))
