"""Count, on the CPU, the operations that would synchronise a GPU with the host.

On a GPU, an operation synchronises when the host needs a value the device computes (a Python
``bool``/``int``/``float`` of a tensor, ``.item()``, ``.tolist()``, a copy to the host), or an
output whose size depends on the values (``nonzero``, boolean-mask indexing, ``unique``,
``masked_select``), or a linear-algebra routine that reads its error code back (``cholesky``,
``inv``, ``solve``, ``eigh``, ``svd``, ``pinv``, ``lstsq``: the ``_ex`` variants do not). On the
CPU none of these waits for anything, so :class:`SyncCounter` records them instead: a
``TorchDispatchMode`` sees the ATen operations (torch 2.13 dispatches ``bool()``, ``.item()``,
``int()`` and ``float()`` to ``aten._local_scalar_dense``, ``x[mask]`` to ``aten.index`` with a
bool index, ``torch.linalg.cholesky`` to ``linalg_cholesky_ex`` + ``_linalg_check_errors``), and
``Tensor.tolist``, ``.cpu()``, ``.numpy()`` and ``.to("cpu")`` are wrapped, since they read
the data without dispatching an operation.

Not seen (on a GPU, ``torch.cuda.set_sync_debug_mode("error")`` finds them): copies between the
host and the device that the CPU cannot tell from no copy at all, such as a host tensor sent to
the device without ``non_blocking=True`` (``torch.tensor(values, device="cuda")``, a CPU draw
``.to(x.device)``) or ``.to(torch.device("cpu"))``.

Work on the host by design is left out: anything under :meth:`taskbalance.Strategy.draw`, whose
generator lives on the CPU.

    >>> import torch
    >>> with SyncCounter() as syncs:
    ...     x = torch.ones(3)
    ...     _ = bool(x.sum() > 0), x[x > 0], torch.linalg.cholesky_ex(torch.eye(2))
    >>> syncs.names
    ['aten._local_scalar_dense.default', 'aten.index.Tensor (bool index)']
"""

from __future__ import annotations

import functools
import sys
import traceback
from collections.abc import Callable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import taskbalance as tb
from taskbalance.solvers import read_if_free

__all__ = ["SyncCounter", "count_syncs"]

_aten = torch.ops.aten

# Operations that read a value back or size their output by the values.
_ALWAYS = {
    _aten._local_scalar_dense.default,  # bool(), int(), float(), .item(), if tensor:
    _aten.nonzero.default,  # also torch.where(cond), argwhere
    _aten.masked_select.default,
    _aten._unique2.default,
    _aten.unique_dim.default,
    _aten.unique_consecutive.default,
    _aten.equal.default,
    _aten.allclose.default,
    _aten.repeat_interleave.Tensor,  # output size from the repeats
    _aten.bincount.default,
    # Linear algebra that checks its error code (the _ex variants and triangular solves do not)
    _aten._linalg_check_errors.default,  # cholesky, inv, solve, lu_factor, ldl_factor
    _aten._linalg_eigh.default,  # eigh, eigvalsh
    _aten._linalg_svd.default,  # svd, svdvals, matrix_norm(ord=2), ...
    _aten.linalg_eig.default,
    _aten.linalg_eigvals.default,
    _aten.linalg_lstsq.default,
}
# pinv has several overloads (atol/rtol as floats or tensors)
_PACKETS = {_aten.linalg_pinv}
# Indexing ops that sync only with a bool (mask) index.
_MASK_INDEXING = {_aten.index.Tensor, _aten.index_put.default, _aten.index_put_.default}

# draw: the generator lives on the CPU; read_if_free: a solver's early stop, read on the CPU only
_HOST_BY_DESIGN = {tb.Strategy.draw.__code__, read_if_free.__code__}


def _reason(func: Any, args: tuple[Any, ...]) -> str | None:
    if func in _ALWAYS or func.overloadpacket in _PACKETS:
        return str(func)
    if func in _MASK_INDEXING and len(args) > 1:
        indices = args[1]
        if any(
            isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices
        ):
            return f"{func} (bool index)"
    return None


def _on_host_by_design() -> bool:
    frame = sys._getframe(2)
    while frame is not None:
        if frame.f_code in _HOST_BY_DESIGN:
            return True
        frame = frame.f_back  # type: ignore[assignment]
    return False


class SyncCounter(TorchDispatchMode):
    """Records every operation that would make a GPU wait for the host; see the module doc.

    ``events`` holds ``(name, stack)`` pairs (the stack says where, for a failing test's
    message); ``names`` the names alone; ``len(counter)`` the count.
    """

    def __init__(self) -> None:
        super().__init__()
        self.events: list[tuple[str, str]] = []
        self._saved: dict[str, Any] = {}

    @property
    def names(self) -> list[str]:
        return [name for name, _ in self.events]

    def __len__(self) -> int:
        return len(self.events)

    def report(self) -> str:
        """Every event with the last frames of its stack, for an assertion message."""
        return "\n".join(f"--- {name}\n{stack}" for name, stack in self.events) or "(none)"

    def _record(self, name: str) -> None:
        if not _on_host_by_design():
            frames = traceback.extract_stack(sys._getframe(2))
            ours = [f for f in frames if "/torch/" not in f.filename and f.filename != __file__]
            stack = traceback.format_list(ours[-8:])
            self.events.append((name, "".join(stack)))

    def __torch_dispatch__(
        self,
        func: Any,
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        reason = _reason(func, args)
        if reason is not None:
            self._record(reason)
        return func(*args, **(kwargs or {}))

    # The methods that read data without dispatching an operation.
    def _wrap(self, name: str, counts: Callable[..., bool]) -> None:
        original = getattr(torch.Tensor, name)
        self._saved[name] = torch.Tensor.__dict__.get(name)
        counter = self

        @functools.wraps(original)
        def wrapper(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            if counts(*args, **kwargs):
                counter._record(f"Tensor.{name}")
            return original(tensor, *args, **kwargs)

        setattr(torch.Tensor, name, wrapper)

    def __enter__(self) -> SyncCounter:
        self._wrap("tolist", lambda *a, **k: True)
        self._wrap("cpu", lambda *a, **k: True)
        self._wrap("numpy", lambda *a, **k: True)
        self._wrap("to", _to_host)
        super().__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        super().__exit__(*exc)
        for name, previous in self._saved.items():
            if previous is None:
                delattr(torch.Tensor, name)
            else:
                setattr(torch.Tensor, name, previous)
        self._saved.clear()


def _to_host(*args: Any, **kwargs: Any) -> bool:
    """Whether ``Tensor.to(*args, **kwargs)`` names the CPU in so many words (``"cpu"``): a
    device taken from a tensor (``.to(x.device)``) would be the GPU on a GPU."""
    given = kwargs.get("device", args[0] if args else None)
    return isinstance(given, str) and torch.device(given).type == "cpu"


def count_syncs(call: Callable[[], Any]) -> tuple[Any, SyncCounter]:
    """``call()`` under a :class:`SyncCounter`: its result and the counter."""
    with SyncCounter() as counter:
        result = call()
    return result, counter
