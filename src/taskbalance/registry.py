"""The strategy registry: one decorator records a strategy; names are looked up with fnmatch.

Third-party packages add strategies through the entry-point group ``taskbalance.strategies``:
each entry point names a :class:`~taskbalance.Strategy` subclass (registered under the entry
point's name unless it registered itself with ``@register_strategy``) or a module whose import
registers its strategies. Entry points are loaded once, on the first look-up.
"""

from __future__ import annotations

import difflib
import fnmatch
import inspect
import re
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import metadata
from typing import Any, TypeVar

from taskbalance.errors import StrategyError
from taskbalance.strategy import Strategy

__all__ = [
    "ENTRY_POINT_GROUP",
    "StrategyInfo",
    "create_strategy",
    "list_strategies",
    "register_strategy",
    "strategy_info",
]

ENTRY_POINT_GROUP = "taskbalance.strategies"
_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


@dataclass(frozen=True)
class StrategyInfo:
    """What the registry knows of a strategy; ``print()`` it to read the whole of it.

    ``stateful`` is derived from the strategy itself: whether an instance built from ``tasks``
    alone declares state (:meth:`Strategy.add_state`: learned weights, running statistics, a
    random generator, the last solution of a solver that may fail).

        >>> import taskbalance as tb
        >>> info = tb.strategy_info("dwa")
        >>> info.kind, info.defaults["temperature"]
        ('loss-level', 2.0)
        >>> print(info)  # doctest: +ELLIPSIS
        dwa: loss-level, stateful (Liu, Johns & Davison, 'End-to-End Multi-Task Learning ...)
        <BLANKLINE>
        tb.create_strategy("dwa", tasks, *, temperature=2.0, window=None)
        <BLANKLINE>
        Dynamic Weight Average: weight each task by how slowly its loss has been falling.
        ...
    """

    name: str
    cls: type[Strategy]
    paper: str
    needs_grads: bool
    deterministic: bool

    @property
    def stateful(self) -> bool:
        return _declares_state(self.cls)

    @property
    def kind(self) -> str:
        """``"gradient-level"`` (needs the per-task gradients) or ``"loss-level"``."""
        return "gradient-level" if self.needs_grads else "loss-level"

    @property
    def builtin(self) -> bool:
        """Whether the strategy ships with taskbalance (not a plug-in)."""
        return self.cls.__module__.startswith("taskbalance.strategies.")

    @property
    def parameters(self) -> list[inspect.Parameter]:
        """The constructor's arguments after ``tasks``: what ``create_strategy`` passes on."""
        kinds = (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
        return [
            p
            for p in inspect.signature(self.cls).parameters.values()
            if p.name != "tasks" and p.kind in kinds
        ]

    @property
    def defaults(self) -> dict[str, Any]:
        """The constructor's keyword arguments and their defaults (``tasks`` excluded)."""
        return {p.name: p.default for p in self.parameters if p.default is not p.empty}

    @property
    def signature(self) -> str:
        """The ``create_strategy`` call with every argument and its default."""
        options = [str(p.replace(annotation=p.empty)) for p in self.parameters]
        return f'tb.create_strategy("{self.name}", tasks, *, {", ".join(options)})'.replace(
            ", *, )", ")"
        )

    def __str__(self) -> str:
        flags = ", ".join(
            flag
            for flag, on in (("stateful", self.stateful), ("random", not self.deterministic))
            if on
        )
        header = f"{self.name}: {self.kind}{f', {flags}' if flags else ''}"
        if self.paper:
            header += f" ({self.paper})"
        return f"{header}\n\n{self.signature}\n\n{inspect.getdoc(self.cls) or ''}".rstrip()


_STATEFUL: dict[type[Strategy], bool] = {}


def _declares_state(cls: type[Strategy]) -> bool:
    if cls not in _STATEFUL:
        modules = cls(("a", "b")).modules()
        _STATEFUL[cls] = any(m._states for m in modules if isinstance(m, Strategy))
    return _STATEFUL[cls]


_REGISTRY: dict[str, StrategyInfo] = {}
_entry_points_loaded = False

S = TypeVar("S", bound=type[Strategy])


def register_strategy(name: str, *, paper: str = "") -> Callable[[S], S]:
    """Class decorator: register a :class:`Strategy` subclass under ``name``.

    ``paper`` cites the method's paper. ``needs_grads`` and ``deterministic`` are read from the
    class, ``stateful`` from the state an instance declares.
    """
    if not isinstance(name, str) or not _NAME.match(name):
        raise StrategyError(
            f"strategy name must be lower case letters, digits and underscores, got {name!r}"
        )

    def decorate(cls: S) -> S:
        if not (inspect.isclass(cls) and issubclass(cls, Strategy)):
            raise StrategyError(
                f"register_strategy({name!r}) needs a Strategy subclass, got {cls!r}"
            )
        known = _REGISTRY.get(name)
        if known is not None and known.cls.__qualname__ != cls.__qualname__:
            raise StrategyError(
                f"strategy {name!r} is already registered to {known.cls.__qualname__}"
            )
        _REGISTRY[name] = StrategyInfo(
            name=name,
            cls=cls,
            paper=paper,
            needs_grads=cls.needs_grads,
            deterministic=cls.deterministic,
        )
        return cls

    return decorate


def _load_entry_points() -> None:
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    for entry_point in metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            loaded = entry_point.load()
        except Exception as error:  # a broken plug-in must not break taskbalance
            warnings.warn(
                f"taskbalance: could not load strategy plug-in {entry_point.name!r} "
                f"({entry_point.value}): {error}",
                RuntimeWarning,
                stacklevel=3,
            )
            continue
        if inspect.isclass(loaded) and issubclass(loaded, Strategy):
            if not any(info.cls is loaded for info in _REGISTRY.values()):
                register_strategy(entry_point.name)(loaded)


def list_strategies(pattern: str = "*") -> list[str]:
    """Sorted names of the registered strategies matching the fnmatch ``pattern``."""
    _load_entry_points()
    return sorted(fnmatch.filter(_REGISTRY, pattern.lower()))


def strategy_info(name: str) -> StrategyInfo:
    """The registry's record for ``name``: ``print(tb.strategy_info("mgda"))`` shows the
    strategy's kind, paper, every constructor argument with its default, and its docstring.

    An unknown name lists the close matches.
    """
    _load_entry_points()
    key = name.lower() if isinstance(name, str) else name
    if key not in _REGISTRY:
        close = difflib.get_close_matches(str(name).lower(), list(_REGISTRY), n=5, cutoff=0.5)
        hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
        raise StrategyError(
            f"unknown strategy {name!r}{hint} (tb.list_strategies() lists all {len(_REGISTRY)})"
        )
    return _REGISTRY[key]


def create_strategy(name: str, tasks: Sequence[str], **kwargs: Any) -> Strategy:
    """Build the strategy registered as ``name`` for ``tasks`` with keyword arguments.

    Each strategy's arguments, defaults and paper: ``print(tb.strategy_info(name))`` (or the
    strategy's page in the documentation); ``tb.list_strategies()`` lists the names.
    """
    info = strategy_info(name)
    accepted = [p.name for p in info.parameters]
    for key in kwargs:
        if key not in accepted:
            close = difflib.get_close_matches(key, accepted, n=3)
            hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
            options = ", ".join(accepted)
            raise StrategyError(
                f"strategy {info.name!r} takes no argument {key!r}{hint} (it takes: {options})"
            )
    return info.cls(tasks, **kwargs)
