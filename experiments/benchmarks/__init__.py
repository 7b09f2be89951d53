"""Multi-task benchmarks behind one protocol (:mod:`.base`), by name or a user's own.

    >>> from experiments.benchmarks import get_benchmark, list_benchmarks
    >>> list_benchmarks()
    ['celeba', 'cityscapes', 'multi_digits', 'multimnist', 'nyuv2']
    >>> bench = get_benchmark("multi_digits")
    >>> bench.tasks, sorted(bench.metrics)
    (('left', 'right'), ['left/acc', 'right/acc'])

``get_benchmark(name, data_dir=None, **options)``: ``name`` is a registered name or
``"package.module:attribute"``, where ``attribute`` is a :class:`Benchmark` subclass or a
function returning a :class:`Benchmark`; it is called with ``data_dir=`` (when given) and the
options.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
from collections.abc import Callable
from typing import Any

from experiments.benchmarks.base import (
    Benchmark,
    DataError,
    Evaluator,
    Metric,
    MultiTaskModel,
    Recipe,
    Reference,
    delta_m,
)

__all__ = [
    "Benchmark",
    "DataError",
    "Evaluator",
    "Metric",
    "MultiTaskModel",
    "Recipe",
    "Reference",
    "delta_m",
    "get_benchmark",
    "list_benchmarks",
]

# name -> "module:attribute" inside this package; imported only when asked for, so that a
# benchmark's dependencies (PIL for CelebA) are needed only by that benchmark.
_REGISTERED = {
    "celeba": "celeba:CelebA",
    "cityscapes": "cityscapes:Cityscapes",
    "multi_digits": "multi_digits:MultiDigitsBenchmark",
    "multimnist": "multimnist:MultiMNIST",
    "nyuv2": "nyuv2:NYUv2",
}


def list_benchmarks() -> list[str]:
    """The registered benchmark names, sorted."""
    return sorted(_REGISTERED)


def _load(target: str) -> Callable[..., Any]:
    module_name, _, attribute = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        raise ValueError(f"benchmark {target!r}: cannot import {module_name!r} ({error})") from None
    try:
        return getattr(module, attribute)
    except AttributeError:
        raise ValueError(f"benchmark {target!r}: {module_name} has no {attribute!r}") from None


def get_benchmark(name: str, data_dir: str | None = None, **options: Any) -> Benchmark:
    """The benchmark ``name`` (registered or ``"module:attribute"``) built with ``options``."""
    if name in _REGISTERED:
        factory = _load(f"{__name__}.{_REGISTERED[name]}")
    elif ":" in name:
        factory = _load(name)
    else:
        close = difflib.get_close_matches(name, list(_REGISTERED), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ValueError(
            f"unknown benchmark {name!r}: registered are {', '.join(list_benchmarks())}, "
            f"or give 'package.module:attribute'{hint}"
        )
    if isinstance(factory, Benchmark):
        if options or data_dir is not None:
            raise ValueError(f"benchmark {name!r} is an instance: it takes no options")
        return factory
    kwargs = dict(options)
    if data_dir is not None:
        kwargs["data_dir"] = data_dir
    try:
        inspect.signature(factory).bind(**kwargs)
    except TypeError as error:
        raise ValueError(f"benchmark {name!r} does not take these options: {error}") from None
    bench = factory(**kwargs)
    if not isinstance(bench, Benchmark):
        raise ValueError(
            f"benchmark {name!r} gave a {type(bench).__name__}, not an "
            "experiments.benchmarks.Benchmark"
        )
    return bench
