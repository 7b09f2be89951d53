"""What every experiment script shares: config, tracking, seeds, batches, checkpoints, tables.

A script declares its settings as a dataclass (subclass :class:`RunConfig` for the common ones),
reads them with :func:`parse_config`, and writes a plain training loop with the helpers below::

    config = parse_config(MyConfig, argv)
    seed_everything(config.seed)
    tracker = start_tracking(config, name="run-0")   # W&B + <out>/runs/run-0/history.jsonl
    for step in progress(range(config.steps), desc="train"):
        ...
        tracker.log({"train/loss/left": ..., "weights/left": ...}, step=step)
    tracker.finish()
    write_table(rows, config.out, "results")
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime
import difflib
import functools
import json
import math
import os
import random
import re
import struct
import sys
import time
import types
import typing
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import torch
from torch import nn

from taskbalance.integrations.wandb import Mode, Tracker, start_run
from taskbalance.report import StepReport

__all__ = [
    "Checkpoint",
    "HistoryTracker",
    "ProgressLines",
    "RunConfig",
    "Tracker",
    "batch_indices",
    "config_dict",
    "draws_bars",
    "duration",
    "is_terminal",
    "load_checkpoint",
    "markdown_table",
    "parse_config",
    "progress",
    "read_history",
    "read_offline_run",
    "report_row",
    "rng_state",
    "save_checkpoint",
    "seed_everything",
    "select_strategies",
    "set_rng_state",
    "start_tracking",
    "write_table",
]

C = TypeVar("C")
T = TypeVar("T")


# --------------------------------------------------------------------------- config
@dataclass
class RunConfig:
    """Settings every script has. Subclass it and add your own fields (with defaults)."""

    out: str = field(default="results", metadata={"help": "directory for tables and figures"})
    wandb_mode: Literal["online", "offline", "disabled"] = field(
        default="offline", metadata={"help": "W&B mode; offline writes <out>/wandb, no network"}
    )
    wandb_project: str = field(default="taskbalance", metadata={"help": "W&B project"})
    wandb_group: str | None = field(default=None, metadata={"help": "W&B group of the runs"})
    history: bool = field(
        default=True,
        metadata={"help": "also write each run's logs to <out>/runs/<run>/history.jsonl"},
    )


def config_dict(config: Any) -> dict[str, Any]:
    """A dataclass config (or a mapping) as a plain, JSON-friendly dictionary."""
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        return dataclasses.asdict(config)
    return dict(config)


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on", "y"):
        return True
    if lowered in ("0", "false", "no", "off", "n"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (true/false), got {text!r}")


def _strip_optional(annotation: Any) -> tuple[Any, bool]:
    """(the type inside ``X | None``, whether None is allowed)."""
    origin = typing.get_origin(annotation)
    if origin is typing.Union or origin is types.UnionType:
        arguments = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(arguments) == 1 and len(arguments) < len(typing.get_args(annotation)):
            return arguments[0], True
        raise TypeError(f"unsupported config type {annotation!r}: only X | None unions")
    return annotation, False


def _converter(annotation: Any) -> tuple[Any, bool, Any]:
    """(a function str -> value for one element, whether the field is a list, the choices)."""
    inner, optional = _strip_optional(annotation)
    origin = typing.get_origin(inner)
    is_list = origin in (list, tuple, Sequence)
    if is_list:
        (inner,) = typing.get_args(inner)[:1] or (str,)
    choices = None
    if typing.get_origin(inner) is Literal:
        choices = list(typing.get_args(inner))
        element: Any = type(choices[0])
    else:
        element = inner
    if element is bool:
        convert: Any = _parse_bool
    elif element in (int, float, str):
        convert = element
    elif element is Path:
        convert = Path
    else:
        raise TypeError(f"unsupported config type {annotation!r}")

    def parse(text: Any) -> Any:
        if optional and isinstance(text, str) and text.strip().lower() in ("none", "null"):
            return None
        if not isinstance(text, str):
            return text
        try:
            value = convert(text)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None
        if choices is not None and value not in choices:
            raise argparse.ArgumentTypeError(f"{text!r} is not one of {choices}")
        return value

    parse.__name__ = getattr(element, "__name__", "value")
    return parse, is_list, choices


def _split_commas(values: Iterable[Any]) -> list[Any]:
    out: list[Any] = []
    for value in values:
        if isinstance(value, str):
            out.extend(part for part in value.split(",") if part)
        else:
            out.append(value)
    return out


def parse_config(
    cls: type[C], argv: Sequence[str] | None = None, *, description: str | None = None
) -> C:
    """Build the dataclass ``cls`` from its defaults, an optional ``--config FILE.json`` and
    ``--field value`` overrides (in that order of precedence, last wins).

    Field names take ``-`` or ``_`` (``--wandb-mode`` = ``--wandb_mode``). Booleans accept
    ``--flag`` alone (true), ``--flag false`` or ``--no-flag``; lists take several values or commas
    (``--seeds 0 1 2`` = ``--seeds 0,1,2``); ``X | None`` fields take ``none``. An unknown option or
    config key or a badly typed value ends the program with argparse's usage message; a
    ``ValueError`` from the dataclass's ``__post_init__`` (a bad value: an unknown strategy, a
    negative count) with that message alone, one line. Both exit with status 2.
    """
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"parse_config needs a dataclass, got {cls!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    parser = argparse.ArgumentParser(
        description=description or (cls.__doc__ or "").strip().split("\n")[0],
        allow_abbrev=False,
        argument_default=argparse.SUPPRESS,
    )
    parser.add_argument("--config", metavar="FILE.json", help="JSON file of field values")
    converters: dict[str, tuple[Any, bool]] = {}
    for name, spec in fields.items():
        parse, is_list, choices = _converter(hints[name])
        converters[name] = (parse, is_list)
        flags = [f"--{name.replace('_', '-')}"]
        if "_" in name:
            flags.append(f"--{name}")
        default = spec.default if spec.default is not dataclasses.MISSING else None
        if spec.default_factory is not dataclasses.MISSING:
            default = spec.default_factory()
        help_text = spec.metadata.get("help", "")
        help_text = f"{help_text} (default: {default!r})".strip()
        kwargs: dict[str, Any] = {"dest": name, "type": parse, "help": help_text}
        if choices is not None:
            kwargs["metavar"] = "{" + ",".join(map(str, choices)) + "}"
        if is_list:  # split at commas first, convert afterwards
            kwargs.update(nargs="+", type=str)
        elif hints[name] is bool:
            kwargs.update(nargs="?", const=True, metavar="BOOL")
        parser.add_argument(*flags, **kwargs)
        if hints[name] is bool:
            negative = f"--no-{name.replace('_', '-')}"
            parser.add_argument(negative, dest=name, action="store_false", help=f"{flags[0]} false")
    arguments = vars(parser.parse_args(argv))

    values: dict[str, Any] = {}
    file = arguments.pop("config", None)
    if file is not None:
        try:
            loaded = json.loads(Path(file).read_text())
        except (OSError, json.JSONDecodeError) as error:
            parser.error(f"cannot read config file {file}: {error}")
        if not isinstance(loaded, dict):
            parser.error(f"config file {file} must hold a JSON object")
        for key, value in loaded.items():
            name = key.replace("-", "_")
            if name not in fields:
                close = difflib.get_close_matches(name, list(fields), n=3)
                hint = f"; did you mean {', '.join(close)}?" if close else ""
                parser.error(f"unknown key {key!r} in config file {file}{hint}")
            parse, is_list = converters[name]
            try:
                if is_list:
                    items = value if isinstance(value, list) else [value]
                    values[name] = [parse(v) for v in _split_commas(items)]
                else:
                    values[name] = parse(value)
            except argparse.ArgumentTypeError as error:
                parser.error(f"config file {file}, key {key!r}: {error}")
    for name, value in arguments.items():
        _, is_list = converters[name]
        values[name] = _split_commas(value) if is_list else value
    for name, value in values.items():  # lists of numbers given as "0,1,2"
        parse, is_list = converters[name]
        if is_list:
            values[name] = [parse(v) for v in value]
    try:
        return cls(**values)
    except (TypeError, ValueError) as error:
        # The values parsed, one of them is wrong: the whole usage would bury the one line
        # that says which.
        parser.exit(2, f"{parser.prog}: error: {error}\n")
    raise AssertionError("unreachable")  # parser.exit exits


# --------------------------------------------------------------------------- tracking
def start_tracking(
    config: Any,
    *,
    mode: Mode | None = None,
    project: str | None = None,
    group: str | None = None,
    name: str | None = None,
    dir: str | Path | None = None,
    job_type: str | None = None,
    history: bool | None = None,
) -> Tracker:
    """Start a W&B run holding the full ``config``; a no-op tracker if W&B cannot start.

    ``mode``, ``project``, ``group`` and ``dir`` default to the config's ``wandb_mode``,
    ``wandb_project``, ``wandb_group`` and ``out`` (then ``"offline"``, ``"taskbalance"``, no
    group and ``"results"``). The run goes to ``<dir>/wandb/``.

    With ``history`` (default: the config's ``history``, else true) every call is also written
    to ``<dir>/runs/<name>/history.jsonl`` (:class:`HistoryTracker`), whatever W&B does: the
    results can be read back with :func:`read_history`, without W&B.
    """
    resolved_mode: Any = mode or getattr(config, "wandb_mode", "offline")
    settings = config_dict(config)
    resolved_project = project or getattr(config, "wandb_project", None) or "taskbalance"
    resolved_group = group if group is not None else getattr(config, "wandb_group", None)
    folder = Path(dir if dir is not None else getattr(config, "out", "results"))
    tracker = start_run(
        settings,
        mode=resolved_mode,
        project=resolved_project,
        group=resolved_group,
        name=name,
        dir=folder,
        job_type=job_type,
    )
    if not (getattr(config, "history", True) if history is None else history):
        return tracker
    run_name = name or time.strftime("run-%Y%m%d-%H%M%S")
    header = {
        "name": run_name,
        "group": resolved_group,
        "project": resolved_project,
        "job_type": job_type,
        "wandb_mode": resolved_mode,
        "wandb_run_dir": None if tracker.run_dir is None else str(tracker.run_dir),
        "config": settings,
    }
    return HistoryTracker(tracker, history_path(folder, run_name), header)


def history_path(out: str | Path, name: str) -> Path:
    """``<out>/runs/<name>/history.jsonl``; characters other than letters, digits, ``.``, ``-``,
    ``_`` and ``/`` (which nests folders) become ``-`` (``single-task:left-s0`` ->
    ``single-task-left-s0``)."""
    parts = [p for p in re.sub(r"[^\w./-]", "-", name).split("/") if p not in ("", ".", "..")]
    return Path(out, "runs", *(parts or ["run"]), "history.jsonl")


HISTORY_FORMAT = 1


def _plain(value: Any) -> Any:
    """A JSON-friendly form of what a log call or config may hold (tensors, paths, tuples)."""
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (set, frozenset)):
        return sorted(value, key=repr)
    return repr(value)


class HistoryTracker(Tracker):
    """A tracker that writes what it is given to a local JSON Lines file and forwards it to
    ``inner`` (a W&B run's tracker, or the no-op one when W&B is off or could not start).

    One JSON object per line, told apart by ``"_type"``:

    * ``"header"`` (first): ``format``, ``name``, ``group``, ``project``, ``job_type``,
      ``wandb_mode``, ``wandb_run_dir`` (the W&B run folder, ``wandb sync``'s argument; null
      without one), ``started`` (ISO 8601) and ``config`` (what W&B's config holds, with every
      :meth:`update_config` made before the first step);
    * ``"step"``: one per :meth:`log` call, the same keys as the ``wandb.log`` call plus
      ``_step`` and ``_runtime`` (seconds since the start);
    * ``"config"``: a later :meth:`update_config`, under ``config``;
    * ``"summary"`` (last, written by :meth:`finish`): ``summary`` (the run's summary values),
      ``config`` (the whole config), ``steps`` (step records written) and ``runtime``.

    Non-finite numbers are written as ``NaN`` / ``Infinity`` (what Python's ``json`` writes and
    reads). Figures (:meth:`image`) go to W&B only. A write error stops the file with one
    warning; the run goes on.
    """

    def __init__(self, inner: Tracker, path: Path, header: Mapping[str, Any]) -> None:
        self.inner = inner
        self.path = Path(path)
        self.run_dir = inner.run_dir
        self._header = dict(header)
        self._config: dict[str, Any] = dict(header.get("config", {}))
        self._summary: dict[str, Any] = {}
        self._handle: Any = None
        self._closed = False
        self._steps = 0
        self._next_step = 0
        self._began = time.monotonic()

    @property  # type: ignore[override]  # follows the W&B run, which may stop
    def active(self) -> bool:
        """Whether W&B records (the history file is written either way)."""
        return self.inner.active

    def _write(self, record: Mapping[str, Any]) -> None:
        if self._closed:
            return
        try:
            if self._handle is None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                # Line-buffered: a person can follow the file while the run goes on.
                self._handle = self.path.open("w", buffering=1)
                started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
                header = {"_type": "header", "format": HISTORY_FORMAT, **self._header}
                header.update(started=started, config=self._config)
                self._handle.write(json.dumps(header, default=_plain) + "\n")
            self._handle.write(json.dumps(record, default=_plain) + "\n")
        except (OSError, TypeError, ValueError) as error:
            self._closed = True
            print(
                f"taskbalance: writing {self.path} failed ({type(error).__name__}: {error}); "
                "the history file stops, the run goes on",
                file=sys.stderr,
                flush=True,
            )

    def log(self, data: Mapping[str, Any], step: int | None = None) -> None:
        self.inner.log(data, step=step)
        step = self._next_step if step is None else step
        self._next_step = step + 1
        runtime = round(time.monotonic() - self._began, 3)
        self._write({"_type": "step", "_step": step, "_runtime": runtime, **data})
        self._steps += 1

    def image(self, key: str, figure: Any, step: int | None = None) -> None:
        self.inner.image(key, figure, step=step)

    def summary(self, data: Mapping[str, Any]) -> None:
        self.inner.summary(data)
        self._summary.update(data)

    def update_config(self, data: Mapping[str, Any]) -> None:
        self.inner.update_config(data)
        self._config.update(data)
        if self._handle is not None:  # before the header, the header takes it
            self._write({"_type": "config", "config": dict(data)})

    def finish(self) -> None:
        self.inner.finish()
        if self._closed:
            return
        runtime = round(time.monotonic() - self._began, 3)
        self._write(
            {"_type": "summary", "summary": self._summary, "config": self._config,
             "steps": self._steps, "runtime": runtime}
        )  # fmt: skip
        if self._handle is not None:
            self._handle.close()
        self._closed = True


def read_history(path: str | Path) -> dict[str, Any]:
    """A history file of :class:`HistoryTracker` (or the run folder that holds it) as
    ``{"header", "config", "history": [{key: value, "_step": n, "_runtime": s}, ...],
    "summary", "complete"}``: ``config`` with every update applied, ``complete`` whether the run
    finished (its summary record was written)."""
    path = Path(path)
    if path.is_dir():
        path = path / "history.jsonl"
    header: dict[str, Any] = {}
    config: dict[str, Any] = {}
    history: list[dict[str, Any]] = []
    summary: dict[str, Any] = {}
    complete = False
    with path.open() as handle:
        for line in handle:
            if not line.strip():
                continue
            record = json.loads(line)
            kind = record.pop("_type", "step")
            if kind == "header":
                header = record
                config.update(record.get("config", {}))
            elif kind == "step":
                history.append(record)
            elif kind == "config":
                config.update(record["config"])
            elif kind == "summary":
                summary = record["summary"]
                config.update(record.get("config", {}))
                complete = True
    return {
        "header": header,
        "config": config,
        "history": history,
        "summary": summary,
        "complete": complete,
    }


def report_row(report: StepReport) -> dict[str, float]:
    """A step report under the scripts' W&B keys, dropping nothing (one host transfer).

    ``loss/<task>`` becomes ``train/loss/<task>``, ``weight/<task>`` becomes ``weights/<task>``,
    every other entry (per-task extras, step scalars such as ``failures``) ``strategy/<key>``.
    Built from :meth:`~taskbalance.StepReport.entries`, so no key is parsed back.

        >>> import torch
        >>> scalars = {"failures": torch.tensor(2)}
        >>> report = StepReport(("a",), torch.tensor([0.5]), torch.tensor([1.0]), scalars=scalars)
        >>> report_row(report)
        {'train/loss/a': 0.5, 'weights/a': 1.0, 'strategy/failures': 2.0}
    """
    renamed = {"loss": "train/loss", "weight": "weights"}
    row = {}
    for name, task, value in report.entries():
        group = renamed.get(name, f"strategy/{name}") if task is not None else "strategy"
        row[f"{group}/{name if task is None else task}"] = value
    return row


def is_terminal(stream: Any) -> bool:
    """Whether ``stream`` is an interactive terminal (False for files, pipes, closed streams)."""
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):
        return False


def draws_bars(stream: Any = None) -> bool:
    """Whether :func:`progress` draws tqdm bars on ``stream`` (default: standard error): it is
    a terminal and tqdm is installed. Where not, :class:`ProgressLines` writes lines instead."""
    if not is_terminal(sys.stderr if stream is None else stream):
        return False
    try:
        import tqdm  # noqa: F401
    except ImportError:
        return False
    return True


def progress(iterable: Iterable[T], *, desc: str = "", total: int | None = None, **kwargs: Any):
    """A tqdm progress bar over ``iterable`` (shown only on a terminal and unless ``disable``;
    plain iteration if tqdm is missing). Away from a terminal, :class:`ProgressLines` reports."""
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return iterable
    kwargs["disable"] = kwargs.get("disable") or not is_terminal(sys.stderr)
    kwargs.setdefault("leave", False)
    kwargs.setdefault("dynamic_ncols", True)
    return tqdm(iterable, desc=desc, total=total, **kwargs)


def duration(seconds: float) -> str:
    """``4.2 s``, ``38 s``, ``7m05s``, ``2h14m`` (``?`` when unknown).

    >>> [duration(s) for s in (4.23, 38.4, 425, 8040, math.nan)]
    ['4.2 s', '38 s', '7m05s', '2h14m', '?']
    """
    if not math.isfinite(seconds):
        return "?"
    if seconds < 10:
        return f"{seconds:.1f} s"
    if seconds < 60:
        return f"{seconds:.0f} s"
    whole = round(seconds)
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    return f"{whole // 3600}h{whole % 3600 // 60:02d}m"


def _numbers(values: Mapping[str, float], limit: int) -> str:
    shown = [f"{k} {v:.4g}" for k, v in list(values.items())[:limit]]
    if len(values) > limit:
        shown.append(f"+{len(values) - limit} more")
    return ", ".join(shown)


class ProgressLines:
    """A run's progress as plain lines, for logs (``nohup``, SLURM, a pipe): one line every
    ``every`` steps and at the last one, with the epoch, the step, the mean training loss per
    task since the previous line, the evaluation's metrics when the step has them, the time
    so far and the ETA, flushed at once::

        [mgda seed 1] epoch 2/6 | step 42/126 | loss left 0.412, right 0.53 | val left/acc
        0.812, right/acc 0.78 | 3.1 s, ETA 6.2 s

    Silent when ``every`` is 0, when not ``enabled`` (ranks other than 0), and on a terminal
    where tqdm draws its bar instead (:func:`progress`). ``stream`` defaults to standard error.
    """

    MAX_SHOWN = 8  # values per part of a line (CelebA has 40 tasks)

    def __init__(
        self,
        label: str,
        total: int,
        *,
        every: int,
        start: int = 0,
        steps_per_epoch: int | None = None,
        stream: Any = None,
        enabled: bool = True,
    ) -> None:
        self.label, self.total, self.every, self.start = label, total, every, start
        self.steps_per_epoch = steps_per_epoch
        self.stream = sys.stderr if stream is None else stream
        self.enabled = enabled and every > 0 and not draws_bars(self.stream)
        self.lines = 0
        self._sums: dict[str, float] = {}
        self._count = 0
        self._began = time.perf_counter()

    def update(self, step: int, record: Mapping[str, Any]) -> None:
        """After training step ``step`` (counted from 0) whose logged values are ``record``."""
        if not self.enabled:
            return
        for key, value in record.items():
            if key.startswith("train/loss/"):
                task = key.removeprefix("train/loss/")
                self._sums[task] = self._sums.get(task, 0.0) + float(value)
        self._count += 1
        done = step + 1
        if done % self.every and done < self.total:
            return
        parts = []
        if self.steps_per_epoch:
            epochs = math.ceil(self.total / self.steps_per_epoch)
            parts.append(f"epoch {math.ceil(done / self.steps_per_epoch)}/{epochs}")
        parts.append(f"step {done}/{self.total}")
        losses = {t: s / self._count for t, s in self._sums.items()}
        if len(losses) > self.MAX_SHOWN:
            mean = math.fsum(losses.values()) / len(losses)
            parts.append(f"loss mean {mean:.4g} ({len(losses)} tasks)")
        elif losses:
            parts.append(f"loss {_numbers(losses, self.MAX_SHOWN)}")
        metrics = {
            k.removeprefix("val/"): float(v)
            for k, v in record.items()
            if k.startswith("val/") and not k.startswith("val/loss/")
        }
        if metrics:
            parts.append(f"val {_numbers(metrics, self.MAX_SHOWN)}")
        elapsed = time.perf_counter() - self._began
        taken = done - self.start
        eta = elapsed / taken * (self.total - done) if taken > 0 else math.nan
        parts.append(f"{duration(elapsed)}, ETA {duration(eta)}")
        print(f"[{self.label}] " + " | ".join(parts), file=self.stream, flush=True)
        self.lines += 1
        self._sums.clear()
        self._count = 0


def select_strategies(patterns: Sequence[str]) -> list[str]:
    """Registered strategy names matching any fnmatch pattern, in pattern order, no repeats.

    A pattern that matches nothing raises :class:`taskbalance.StrategyError` naming the close
    matches, so a typo never silently drops a method from a comparison.
    """
    import taskbalance as tb

    registered = tb.list_strategies()
    names: list[str] = []
    for pattern in patterns:
        matched = tb.list_strategies(pattern)
        if not matched:
            everything = f"tb.list_strategies() lists all {len(registered)}"
            raise tb.StrategyError(unknown_name("strategy", pattern, registered, everything))
        names.extend(n for n in matched if n not in names)
    return names


def unknown_name(what: str, name: str, known: Sequence[str], everything: str = "") -> str:
    """``unknown benchmark 'nyu'; did you mean 'nyuv2'? (5 registered: celeba, ...)``: the close
    matches by :mod:`difflib` (for a pattern: of its text without the wildcards, also against
    the names' beginnings); the known names are listed when there are at most ten, else
    ``everything`` says where to find them."""
    wildcard = any(c in name for c in "*?[")
    plain = (re.sub(r"[*?\[\]]", "", name) if wildcard else name).lower()

    def score(candidate: str) -> float:
        whole = difflib.SequenceMatcher(None, plain, candidate).ratio()
        if not wildcard:
            return whole
        # 'grd*' means a prefix: compare it with the names' beginnings too.
        start = difflib.SequenceMatcher(None, plain, candidate[: len(plain)]).ratio()
        return max(whole, start)

    scores = {k: score(k) for k in known}
    close = sorted((k for k in known if scores[k] >= 0.6), key=lambda k: -scores[k])[:3]
    head = f"no {what} matches {name!r}" if wildcard else f"unknown {what} {name!r}"
    hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
    if len(known) <= 10 or not everything:
        everything = f"{len(known)} registered" + (
            f": {', '.join(known)}" if len(known) <= 10 else ""
        )
    return f"{head}{hint} ({everything})"


# --------------------------------------------------------------------------- seeds and batches
def seed_everything(seed: int) -> None:
    """Seed Python's ``random``, torch (CPU and CUDA) and NumPy's global generator."""
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np
    except ImportError:
        return
    np.random.seed(seed % 2**32)


@functools.lru_cache(maxsize=8)
def _epoch_permutation(count: int, seed: int, epoch: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(count, generator=generator)


def batch_indices(count: int, batch_size: int, *, seed: int, step: int) -> torch.Tensor:
    """Indices of the examples of batch ``step``: epochs are fresh permutations of ``range(count)``
    drawn from ``(seed, epoch)`` alone, the last partial batch of an epoch is dropped.

    Being a pure function of the step, the data order needs no state: a run resumed at step
    ``k`` sees exactly the batches the uninterrupted run saw.
    """
    if not 0 < batch_size <= count:
        raise ValueError(f"batch_size must be in [1, {count}], got {batch_size}")
    per_epoch = count // batch_size
    epoch, position = divmod(step, per_epoch)
    start = position * batch_size
    return _epoch_permutation(count, seed, epoch)[start : start + batch_size]


# --------------------------------------------------------------------------- checkpoints
def rng_state() -> dict[str, Any]:
    """Every global random state a training loop draws from (Python, torch CPU and CUDA)."""
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@dataclass(frozen=True)
class Checkpoint:
    """What :func:`load_checkpoint` restores besides the modules: where to go on from."""

    step: int
    config: dict[str, Any]
    extra: dict[str, Any]


def save_checkpoint(
    path: str | Path,
    *,
    config: Any,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    strategy: nn.Module | None = None,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Save everything needed to resume exactly: the model, optimizer and strategy state_dicts,
    the config, the step, the global random states and ``extra`` (plain values or tensors).

    Written to a temporary file first and renamed, so a crash never leaves half a checkpoint.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {
        "format": 1,
        "step": int(step),
        "config": config_dict(config),
        "model": model.state_dict(),
        "optimizer": None if optimizer is None else optimizer.state_dict(),
        "strategy": None if strategy is None else strategy.state_dict(),
        "rng": rng_state(),
        "extra": dict(extra or {}),
    }
    temporary = path.with_name(path.name + ".tmp")
    torch.save(state, temporary)
    os.replace(temporary, path)
    return path


def load_checkpoint(
    path: str | Path,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    strategy: nn.Module | None = None,
    restore_rng: bool = True,
    map_location: str | torch.device | None = None,
) -> Checkpoint:
    """Restore what :func:`save_checkpoint` saved into the given objects; return step and config.

    Continue the loop at ``checkpoint.step`` (the number of steps already taken).
    """
    state = torch.load(Path(path), map_location=map_location, weights_only=True)
    if state.get("format") != 1:
        raise ValueError(f"{path} is not a checkpoint written by save_checkpoint")
    model.load_state_dict(state["model"])
    for name, target in (("optimizer", optimizer), ("strategy", strategy)):
        if target is None:
            continue
        if state[name] is None:
            raise ValueError(f"{path} holds no {name} state")
        target.load_state_dict(state[name])
    if restore_rng:
        set_rng_state(state["rng"])
    return Checkpoint(step=state["step"], config=state["config"], extra=state["extra"])


# --------------------------------------------------------------------------- tables
def _cell(value: Any, float_format: str) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else format(value, float_format)
    return "" if value is None else str(value)


def markdown_table(
    rows: Sequence[Mapping[str, Any]],
    columns: Sequence[str] | None = None,
    *,
    float_format: str = ".4g",
) -> str:
    """A GitHub Markdown table; ``columns`` defaults to the keys of the rows in first-seen order.

    >>> print(markdown_table([{"method": "equal", "acc": 0.5}, {"method": "mgda", "acc": 0.75}]))
    | method | acc |
    |---|---|
    | equal | 0.5 |
    | mgda | 0.75 |
    """
    columns = list(columns) if columns is not None else _columns(rows)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = [_cell(row.get(c), float_format).replace("|", "\\|") for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _columns(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    columns: list[str] = []
    for row in rows:
        columns.extend(key for key in row if key not in columns)
    return columns


def write_table(
    rows: Sequence[Mapping[str, Any]],
    out: str | Path,
    name: str,
    *,
    columns: Sequence[str] | None = None,
    float_format: str = ".4g",
) -> tuple[Path, Path]:
    """Write ``rows`` as ``<out>/<name>.csv`` (full precision) and ``<out>/<name>.md``."""
    directory = Path(out)
    directory.mkdir(parents=True, exist_ok=True)
    columns = list(columns) if columns is not None else _columns(rows)
    csv_path = directory / f"{name}.csv"
    with csv_path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    md_path = directory / f"{name}.md"
    md_path.write_text(markdown_table(rows, columns, float_format=float_format) + "\n")
    return csv_path, md_path


# --------------------------------------------------------------------------- reading W&B back
_BLOCK = 32768
_RECORD_HEADER = struct.Struct("<IHB")  # crc32, length, chunk type (LevelDB log format)
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def _wandb_records(path: Path) -> Iterator[bytes]:
    """The records of a ``.wandb`` file: W&B writes the LevelDB log format after a 7-byte
    header (``:W&B``, magic, version)."""
    data = path.read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{path} is not a W&B record file")
    position = 7
    pending = b""
    while position + _RECORD_HEADER.size <= len(data):
        room = _BLOCK - position % _BLOCK
        if room < _RECORD_HEADER.size:  # block trailer: padding
            position += room
            continue
        _, length, kind = _RECORD_HEADER.unpack_from(data, position)
        position += _RECORD_HEADER.size
        if position + length > len(data):  # a record still being written
            return
        chunk = data[position : position + length]
        position += length
        if kind == _FULL:
            yield chunk
        elif kind == _FIRST:
            pending = chunk
        elif kind == _MIDDLE:
            pending += chunk
        elif kind == _LAST:
            yield pending + chunk
            pending = b""
        elif kind == 0 and length == 0:  # zero padding at the end of a block
            position += _BLOCK - position % _BLOCK if position % _BLOCK else 0
        else:
            raise ValueError(f"{path}: corrupt record header at byte {position}")


def _item_key(item: Any) -> str:
    return item.key if item.key else "/".join(item.nested_key)


def read_offline_run(run_dir: str | Path, *, timeout: float = 30.0) -> dict[str, Any]:
    """What W&B recorded in an offline run folder (``<dir>/wandb/offline-run-*``).

    Returns ``{"name", "group", "project", "job_type", "complete", "config": {...},
    "history": [{key: value, "_step": n}, ...], "summary": {...}}``, decoded from the run's
    ``.wandb`` record file (offline runs write config and summary only there). W&B's service
    writes the file asynchronously; this waits up to ``timeout`` seconds for the run's exit
    record (``complete`` says whether it came). Meant for tests and for inspecting a run
    without uploading it.
    """
    folder = Path(run_dir)
    deadline = time.monotonic() + timeout
    while True:
        files = sorted(folder.glob("*.wandb"))
        if files:
            decoded = _decode_run(files[0])
            if decoded["complete"] or time.monotonic() > deadline:
                return decoded
        elif time.monotonic() > deadline:
            raise FileNotFoundError(f"no .wandb record file in {folder}")
        time.sleep(0.1)


def _decode_run(path: Path) -> dict[str, Any]:
    from wandb.proto import wandb_internal_pb2 as pb

    run: dict[str, Any] = {}
    config: dict[str, Any] = {}
    history: list[dict[str, Any]] = []
    summary: dict[str, Any] = {}
    complete = False
    for raw in _wandb_records(path):
        record = pb.Record()  # type: ignore[attr-defined]  # generated protobuf class
        record.ParseFromString(raw)
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run = {"name": record.run.display_name, "group": record.run.run_group}
            run.update(project=record.run.project, job_type=record.run.job_type)
        if kind in ("run", "config"):  # the run record carries the initial config
            updates = record.run.config.update if kind == "run" else record.config.update
            for item in updates:
                config[_item_key(item)] = json.loads(item.value_json)
        elif kind == "history":
            row = {_item_key(i): json.loads(i.value_json) for i in record.history.item}
            history.append(row)
        elif kind == "summary":
            for item in record.summary.update:
                summary[_item_key(item)] = json.loads(item.value_json)
            for item in record.summary.remove:
                summary.pop(_item_key(item), None)
        elif kind == "exit":
            complete = True
    # W&B wraps each config value as {"value": v}.
    config = {
        k: v["value"] if isinstance(v, dict) and set(v) == {"value"} else v
        for k, v in config.items()
        if not k.startswith("_")
    }
    return {**run, "complete": complete, "config": config, "history": history, "summary": summary}
