"""Weights & Biases logging for training loops; a run never depends on W&B being able to start.

:func:`start_run` returns a :class:`Tracker`. When W&B is installed and starts, the tracker
forwards to the W&B run; otherwise (not installed, ``mode="disabled"``, ``wandb.init`` raised,
or this process is not rank 0 of ``torch.distributed``) it is a no-op, so the training loop
does not change. ``wandb`` is imported here, lazily, and nowhere else in the package: ``import
taskbalance`` stays light.

The default mode is ``"offline"``: the run is written under ``<dir>/wandb/offline-run-*`` and can
be uploaded later with ``wandb sync``. Nothing in offline mode touches the network, and in
online mode ``wandb.init`` gives up after ``init_timeout`` seconds instead of hanging.

>>> tracker = start_run({"lr": 0.1}, mode="disabled")
>>> tracker.active
False
>>> tracker.log({"train/loss/a": 1.0}, step=0)  # a no-op, like every method of this tracker
>>> tracker.finish()
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch

__all__ = ["Mode", "Tracker", "WandbTracker", "is_main_process", "start_run"]

Mode = Literal["online", "offline", "disabled"]


def is_main_process() -> bool:
    """True unless ``torch.distributed`` is initialised and this process is not rank 0."""
    distributed = torch.distributed
    if distributed.is_available() and distributed.is_initialized():
        return distributed.get_rank() == 0
    return True


def _warn(message: str) -> None:
    # One line on stderr: a tracking problem must be visible but must not stop the run.
    print(f"taskbalance: {message}", file=sys.stderr, flush=True)


class Tracker:
    """The no-op tracker; :class:`WandbTracker` overrides every method.

    ``log`` takes one dictionary per step (call it once per step: W&B stores one history row per
    call), ``image`` a matplotlib figure, ``summary`` the run's final numbers, ``update_config``
    settings known only once the run has started (a strategy's resolved constructor arguments).
    """

    active: bool = False
    run_dir: Path | None = None

    def log(self, data: Mapping[str, Any], step: int | None = None) -> None:
        """Record ``data`` (flat ``{"train/loss/<task>": float, ...}``) as one history row."""

    def image(self, key: str, figure: Any, step: int | None = None) -> None:
        """Record a matplotlib figure as an image under ``key``."""

    def summary(self, data: Mapping[str, Any]) -> None:
        """Set the run's summary values (what the W&B runs table shows)."""

    def update_config(self, data: Mapping[str, Any]) -> None:
        """Add ``data`` to the run's config (a key already there takes the new value)."""

    def finish(self) -> None:
        """Close the run; the tracker is a no-op afterwards."""

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.finish()


class WandbTracker(Tracker):
    """Forwards to a ``wandb`` run; any error turns it into a no-op, with a warning."""

    active = True

    def __init__(self, run: Any) -> None:
        self._run = run
        directory = getattr(run, "dir", None)
        # run.dir is <run folder>/files; the run folder holds the .wandb record file.
        self.run_dir = Path(directory).parent if directory else None

    def _fail(self, action: str, error: BaseException) -> None:
        _warn(f"W&B {action} failed ({type(error).__name__}: {error}); logging stops, run goes on")
        self.active = False
        try:
            self._run.finish(exit_code=1)
        except Exception:  # the run is already broken; nothing more to save
            pass

    def log(self, data: Mapping[str, Any], step: int | None = None) -> None:
        if not self.active:
            return
        try:
            self._run.log(dict(data), step=step)
        except Exception as error:
            self._fail("log", error)

    def image(self, key: str, figure: Any, step: int | None = None) -> None:
        if not self.active:
            return
        try:
            import wandb

            self._run.log({key: wandb.Image(_figure_pixels(figure))}, step=step)
        except Exception as error:
            self._fail("image", error)

    def summary(self, data: Mapping[str, Any]) -> None:
        if not self.active:
            return
        try:
            self._run.summary.update(dict(data))
        except Exception as error:
            self._fail("summary", error)

    def update_config(self, data: Mapping[str, Any]) -> None:
        if not self.active:
            return
        try:
            self._run.config.update(dict(data), allow_val_change=True)
        except Exception as error:
            self._fail("config update", error)

    def finish(self) -> None:
        if not self.active:
            return
        self.active = False
        try:
            self._run.finish()
        except Exception as error:
            _warn(f"W&B finish failed ({type(error).__name__}: {error})")


def _figure_pixels(figure: Any) -> Any:
    """RGB pixels of a matplotlib figure (no temporary file, no dependency on PIL here)."""
    import numpy as np

    figure.canvas.draw()
    return np.asarray(figure.canvas.buffer_rgba())[..., :3].copy()


def _settings(wandb: Any, init_timeout: float) -> Any:
    """Quiet, fast settings: no system metrics, console capture or code saving (they cost time in
    short runs); the option names of older wandb versions differ, so fall back step by step."""
    for options in (
        {
            "silent": True,
            "console": "off",
            "init_timeout": init_timeout,
            "x_disable_stats": True,
            "x_disable_meta": True,
            "save_code": False,
        },
        {"silent": True, "console": "off", "init_timeout": init_timeout},
        {"silent": True},
    ):
        try:
            return wandb.Settings(**options)
        except Exception:
            continue
    return None


def start_run(
    config: Mapping[str, Any],
    *,
    mode: Mode = "offline",
    project: str = "taskbalance",
    group: str | None = None,
    name: str | None = None,
    dir: str | Path | None = None,
    job_type: str | None = None,
    tags: Sequence[str] = (),
    init_timeout: float = 60.0,
) -> Tracker:
    """Start a W&B run with ``config`` and return its tracker (a no-op one if W&B cannot start).

    Only rank 0 of ``torch.distributed`` logs; the other ranks get the no-op tracker. System
    metrics, console capture and code saving are off: they cost time in short runs and are not
    what an experiment reports. ``dir`` is where the ``wandb/`` folder goes (created if missing).
    """
    if mode not in ("online", "offline", "disabled"):
        raise ValueError(f"mode must be 'online', 'offline' or 'disabled', got {mode!r}")
    if mode == "disabled" or not is_main_process():
        return Tracker()
    try:
        import wandb
    except ImportError as error:
        _warn(f"W&B is not installed ({error}); continuing without logging")
        return Tracker()
    if dir is not None:
        Path(dir).mkdir(parents=True, exist_ok=True)
    try:
        arguments: dict[str, Any] = {
            "config": dict(config),
            "mode": mode,
            "project": project,
            "group": group,
            "name": name,
            "dir": None if dir is None else str(dir),
            "job_type": job_type,
            "tags": list(tags) or None,
            "settings": _settings(wandb, init_timeout),
        }
        try:
            # A run left open (a crashed loop, a notebook) must not swallow this one's logs.
            run = wandb.init(**arguments, reinit="create_new")
        except Exception as error:
            if "reinit" not in str(error):
                raise
            run = wandb.init(**arguments, reinit=True)  # wandb < 0.19.10: a boolean
    except Exception as error:
        _warn(f"W&B could not start ({type(error).__name__}: {error}); continuing without logging")
        return Tracker()
    if run is None:
        _warn("W&B returned no run; continuing without logging")
        return Tracker()
    return WandbTracker(run)
