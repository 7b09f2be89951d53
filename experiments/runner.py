"""What every experiment script shares: config, tracking, seeds, batches, checkpoints, tables.

A script declares its settings as a dataclass (subclass :class:`RunConfig` for the common ones),
reads them with :func:`parse_config`, and writes a plain training loop with the helpers below::

    config = parse_config(MyConfig, argv)
    seed_everything(config.seed)
    tracker = start_tracking(config, name="run-0")
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
import difflib
import functools
import json
import math
import os
import random
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
    "RunConfig",
    "Tracker",
    "batch_indices",
    "config_dict",
    "load_checkpoint",
    "markdown_table",
    "parse_config",
    "progress",
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
    config key, a badly typed value, or a ``ValueError`` from the dataclass's ``__post_init__``
    ends the program with argparse's usage message (``SystemExit(2)``).
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
        parser.error(str(error))
    raise AssertionError("unreachable")  # parser.error exits


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
) -> Tracker:
    """Start a W&B run holding the full ``config``; a no-op tracker if W&B cannot start.

    ``mode``, ``project``, ``group`` and ``dir`` default to the config's ``wandb_mode``,
    ``wandb_project``, ``wandb_group`` and ``out`` (then ``"offline"``, ``"taskbalance"``, no
    group and ``"results"``). The run goes to ``<dir>/wandb/``.
    """
    resolved_mode: Any = mode or getattr(config, "wandb_mode", "offline")
    return start_run(
        config_dict(config),
        mode=resolved_mode,
        project=project or getattr(config, "wandb_project", None) or "taskbalance",
        group=group if group is not None else getattr(config, "wandb_group", None),
        name=name,
        dir=dir if dir is not None else getattr(config, "out", "results"),
        job_type=job_type,
    )


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


def progress(iterable: Iterable[T], *, desc: str = "", total: int | None = None, **kwargs: Any):
    """A tqdm progress bar over ``iterable`` (shown only on a terminal and unless ``disable``;
    plain iteration if tqdm is missing)."""
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return iterable
    kwargs["disable"] = kwargs.get("disable") or not sys.stderr.isatty()
    kwargs.setdefault("leave", False)
    kwargs.setdefault("dynamic_ncols", True)
    return tqdm(iterable, desc=desc, total=total, **kwargs)


def select_strategies(patterns: Sequence[str]) -> list[str]:
    """Registered strategy names matching any fnmatch pattern, in pattern order, no repeats.

    A pattern that matches nothing raises :class:`taskbalance.StrategyError` (with the close
    matches), so a typo never silently drops a method from a comparison.
    """
    import taskbalance as tb
    from taskbalance.registry import strategy_info

    names: list[str] = []
    for pattern in patterns:
        matched = tb.list_strategies(pattern)
        if not matched:
            strategy_info(pattern)  # raises with the close matches
        names.extend(n for n in matched if n not in names)
    return names


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
