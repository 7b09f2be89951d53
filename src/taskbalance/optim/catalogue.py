"""Optimizers by name: :func:`make_optimizer` and :func:`list_optimizers`.

:func:`make_optimizer` builds any optimizer of ``torch.optim`` or ``torch_optimizer`` by name, and
``"lookahead"`` (:class:`~taskbalance.optim.Lookahead`); :func:`list_optimizers` lists the names.
"""

from __future__ import annotations

import difflib
import functools
import inspect
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from taskbalance.errors import StrategyError

__all__ = ["list_optimizers", "make_optimizer"]

Params = Iterable[Tensor] | Iterable[dict[str, Any]]

_TORCH = "torch.optim."
_TORCH_OPTIMIZER = "torch_optimizer."


@functools.cache
def _catalogue() -> tuple[dict[str, type[Optimizer]], dict[str, str]]:
    """(names -> classes, refused names -> why). Plain names: torch.optim wins over
    torch_optimizer; every class is also reachable as ``torch.optim.<name>`` or
    ``torch_optimizer.<name>``."""
    import torch_optimizer  # lazy: it is slow to import and only needed here

    # lazy: lookahead.py imports this module (Lookahead resolves its base optimizer by name)
    from taskbalance.optim.lookahead import Lookahead

    def exported(module: Any, names: Iterable[str]) -> dict[str, type[Optimizer]]:
        found = {}
        for name in names:
            obj = getattr(module, name, None)
            if inspect.isclass(obj) and issubclass(obj, Optimizer) and obj is not Optimizer:
                found[name.lower()] = obj
        return found

    from_torch = exported(torch.optim, dir(torch.optim))
    from_tjo = exported(torch_optimizer, getattr(torch_optimizer, "__all__", dir(torch_optimizer)))
    refused = {
        f"{_TORCH_OPTIMIZER}lookahead": "torch_optimizer.Lookahead never calls "
        "Optimizer.__init__, so its state_dict() cannot be saved on current torch; use "
        "'lookahead' (taskbalance's checkpointable Lookahead): "
        "make_optimizer('lookahead', params, base='adam', k=5, alpha=0.5, lr=...)"
    }
    from_tjo.pop("lookahead", None)
    names: dict[str, type[Optimizer]] = {}
    names.update({f"{_TORCH_OPTIMIZER}{n}": c for n, c in from_tjo.items()})
    names.update({f"{_TORCH}{n}": c for n, c in from_torch.items()})
    names.update(from_tjo)
    names.update(from_torch)  # torch.optim wins the plain name
    names["lookahead"] = Lookahead
    return names, refused


def list_optimizers() -> list[str]:
    """Sorted optimizer names accepted by :func:`make_optimizer`.

    Plain names (``"adam"``, ``"lamb"``, ``"lookahead"``) come from ``torch.optim`` and
    ``torch_optimizer``; where both define a name (``radam``, ``adafactor``) ``torch.optim`` wins,
    and the list also holds ``"torch_optimizer.<name>"`` for the other one.

        >>> import taskbalance as tb
        >>> names = tb.list_optimizers()
        >>> {"adam", "lamb", "lookahead", "radam", "torch_optimizer.radam"} <= set(names)
        True
    """
    names, _ = _catalogue()
    plain = {n for n in names if "." not in n}
    shadowed = {
        n
        for n in names
        if n.startswith(_TORCH_OPTIMIZER) and names[n] is not names[n.split(".")[1]]
    }
    return sorted(plain | shadowed)


def _resolve(name: str) -> type[Optimizer]:
    if not isinstance(name, str):
        raise StrategyError(f"optimizer name must be a string, got {name!r}")
    names, refused = _catalogue()
    key = name.strip().lower()
    if key in refused:
        raise StrategyError(f"optimizer {name!r} is refused: {refused[key]}")
    if key not in names:
        close = difflib.get_close_matches(key, list_optimizers(), n=5, cutoff=0.5)
        hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
        raise StrategyError(
            f"unknown optimizer {name!r}{hint} (tb.list_optimizers() lists all "
            f"{len(list_optimizers())})"
        )
    return names[key]


def _construct(
    cls: type[Optimizer], name: str, params: Any, kwargs: Mapping[str, Any]
) -> Optimizer:
    signature = inspect.signature(cls.__init__)
    parameters = list(signature.parameters.values())[2:]  # self, params
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        accepted = [p.name for p in parameters if p.kind is not inspect.Parameter.VAR_POSITIONAL]
        for key in kwargs:
            if key not in accepted:
                close = difflib.get_close_matches(key, accepted, n=3)
                hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
                raise StrategyError(
                    f"optimizer {name!r} takes no argument {key!r}{hint} "
                    f"(it takes: {', '.join(accepted)})"
                )
    try:
        return cls(params, **kwargs)
    except (TypeError, ValueError) as error:
        if isinstance(error, StrategyError):
            raise
        raise StrategyError(f"optimizer {name!r}: {error}") from error


def make_optimizer(name: str, params: Params, **kwargs: Any) -> Optimizer:
    """Build the optimizer called ``name`` (case-insensitive) over ``params``.

    Names come from ``torch.optim`` and ``torch_optimizer`` (every optimizer class either
    exports). Where both define a name, ``torch.optim`` wins; get the other one with the module
    prefix: ``"torch_optimizer.radam"`` (``"torch.optim.radam"`` names torch's explicitly).
    ``"lookahead"`` is :class:`~taskbalance.optim.Lookahead`, which wraps a base optimizer given
    by name or class; the remaining keyword arguments go to the base::

        >>> import torch, taskbalance as tb
        >>> w = torch.nn.Parameter(torch.zeros(3))
        >>> tb.make_optimizer("Lamb", [w], lr=1e-3).__class__.__module__
        'torch_optimizer.lamb'
        >>> la = tb.make_optimizer("lookahead", [w], base="adam", k=5, alpha=0.5, lr=1e-3)
        >>> type(la).__name__, type(la.base).__name__, la.param_groups[0]["lr"]
        ('Lookahead', 'Adam', 0.001)

    Unknown names and arguments raise :class:`~taskbalance.StrategyError` with the close matches.
    ``torch_optimizer.Lookahead`` is refused (its ``state_dict()`` crashes on current torch).
    """
    cls = _resolve(name)
    return _construct(cls, name, params, kwargs)
