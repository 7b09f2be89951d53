"""Mutation testing by hand (issue 11): a seeded sample of mutmut's mutants, the mutants that
only spawned ranks can see, and a per-file report. Never run in CI.

mutmut (configured in ``pyproject.toml``, ``[tool.mutmut]``) writes every mutant of the files it
mutates into ``mutants/`` and runs, per mutant, the tests that called the mutated function in
its stats run. Run from a scratch git worktree, never from a checkout you edit::

    git worktree add /tmp/mut HEAD && cd /tmp/mut
    python .ci/mutation.py sample          # generate the mutants, write mutants/sample*.txt
    OMP_NUM_THREADS=1 nice mutmut run --max-children 2 $(cat mutants/sample-mutmut.txt)
    python .ci/mutation.py ranks           # the rest of the sample: tests/test_distributed.py
    python .ci/mutation.py report          # per file: total / sampled / killed / survived
    mutmut show <mutant name>              # the diff of one mutant

``distributed.py``'s collectives (and the base classes' code for them) run only inside the
ranks that ``tests/test_distributed.py`` spawns: mutmut's stats, recorded in the test process,
never see them. ``ranks`` runs the sampled mutants of ``distributed.py`` and every sampled
mutant that mutmut found no test for against that file, each in a fresh interpreter; the
spawned ranks inherit ``MUTANT_UNDER_TEST`` and the mutated sources, so the mutant is live in
every rank.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import subprocess
import sys
import time
from pathlib import Path

SAMPLE = Path("mutants/sample.txt")
SAMPLE_MUTMUT = Path("mutants/sample-mutmut.txt")  # the part mutmut's own run can test
EQUIVALENT = Path(__file__).with_name("mutmut_equivalent.txt")
DISTRIBUTED_PREFIX = "taskbalance.distributed."
KILLED, SURVIVED, NO_TESTS, TIMEOUT = 1, 0, 33, 36  # mutmut's codes for these verdicts


def meta_files() -> list[Path]:
    return sorted(Path("mutants").rglob("*.py.meta"))


def source_of(meta: Path) -> str:
    return str(meta.relative_to("mutants"))[: -len(".meta")]


def load_meta(meta: Path) -> dict:
    return json.loads(meta.read_text())


def generate() -> None:
    """mutmut's own mutant generation (what ``mutmut run`` does first), without running tests."""
    import mutmut.__main__ as mutmut_main
    from mutmut.utils.file_utils import copy_also_copy_files, copy_src_dir, setup_source_paths

    Path("mutants").mkdir(exist_ok=True)
    copy_src_dir()
    copy_also_copy_files()
    setup_source_paths()
    mutmut_main.create_mutants(max_children=1)


def sample(args: argparse.Namespace) -> None:
    """A uniform random sample per file: max(minimum, fraction × mutants), all if fewer."""
    generate()
    chosen: list[str] = []
    print(f"{'file':45s} {'mutants':>8s} {'sampled':>8s}")
    for meta in meta_files():
        names = sorted(load_meta(meta)["exit_code_by_key"])
        if not names:
            continue
        size = min(len(names), max(args.minimum, math.ceil(args.fraction * len(names))))
        picked = sorted(random.Random(f"{args.seed}:{source_of(meta)}").sample(names, size))
        chosen += picked
        print(f"{source_of(meta):45s} {len(names):8d} {size:8d}")
    SAMPLE.write_text("".join(f"{name}\n" for name in chosen))
    in_process = [n for n in chosen if not n.startswith(DISTRIBUTED_PREFIX)]
    SAMPLE_MUTMUT.write_text("".join(f"{name}\n" for name in in_process))
    print(f"{len(chosen)} mutants in {SAMPLE} (seed {args.seed})")


def meta_of(name: str) -> Path:
    """The ``.meta`` file that holds mutant ``name``'s verdict."""
    module = name.rsplit(".", 1)[0]
    return Path("mutants/src") / (module.replace(".", "/") + ".py.meta")


def run_ranks(args: argparse.Namespace) -> None:
    """Run ``names``, or the sampled mutants of distributed.py without a verdict and the
    sampled mutants mutmut found no test for, against tests/test_distributed.py."""
    if args.names:
        todo = list(args.names)
    else:
        todo = []
        for name in SAMPLE.read_text().split():
            code = load_meta(meta_of(name))["exit_code_by_key"].get(name)
            if code == NO_TESTS or (code is None and name.startswith(DISTRIBUTED_PREFIX)):
                todo.append(name)
    command = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider",
               "tests/test_distributed.py", "-k", "not torchrun"]  # fmt: skip
    env = dict(os.environ, PYTHONPATH="src", PY_IGNORE_IMPORTMISMATCH="1")
    clean = subprocess.run(command, cwd="mutants", env=dict(env, MUTANT_UNDER_TEST=""))
    if clean.returncode != 0:
        sys.exit("tests/test_distributed.py fails without a mutant; fix that first")
    for number, name in enumerate(todo, 1):
        start = time.monotonic()
        try:
            done = subprocess.run(
                command,
                cwd="mutants",
                env=dict(env, MUTANT_UNDER_TEST=name),
                capture_output=True,
                timeout=args.timeout,
            )
            code = KILLED if done.returncode != 0 else SURVIVED
        except subprocess.TimeoutExpired:
            code = TIMEOUT  # a rank left waiting in a collective: the mutant is detected
        meta = meta_of(name)
        data = load_meta(meta)
        data["exit_code_by_key"][name] = code
        data["durations_by_key"][name] = time.monotonic() - start
        meta.write_text(json.dumps(data, indent=4))
        verdict = {KILLED: "killed", SURVIVED: "survived", TIMEOUT: "timeout"}[code]
        print(f"[{number}/{len(todo)}] {verdict:8s} {name}", flush=True)


def argued() -> dict[str, str]:
    """Survivors argued not killable here, from ``mutmut_equivalent.txt``: ``name kind reason``
    per line, ``kind`` ``equivalent`` (no observable behaviour changes) or ``cpu-only`` (only a
    non-CPU device tells the mutant apart; this machine and CI have none)."""
    kinds = {}
    if EQUIVALENT.exists():
        for line in EQUIVALENT.read_text().splitlines():
            if line.strip() and not line.startswith("#"):
                name, kind, *_ = line.split()
                kinds[name] = kind
    return kinds


def report(args: argparse.Namespace) -> None:
    """Per file: mutants, sampled, killed (timeouts count), survived, of these argued equivalent
    or CPU-only, other verdicts, and the kill rate over the sampled mutants that are neither;
    then the survivors not argued."""
    sampled = set(SAMPLE.read_text().split())
    kinds = argued()
    header = ("file", "total", "sampled", "killed", "survived", "equiv", "cpu", "other", "rate")
    print("{:42s} {:>6s} {:>7s} {:>6s} {:>8s} {:>5s} {:>4s} {:>5s} {:>7s}".format(*header))
    open_survivors = []
    for meta in meta_files():
        codes = load_meta(meta)["exit_code_by_key"]
        if not codes:
            continue
        mine = {n: c for n, c in codes.items() if n in sampled}
        killed = [n for n, c in mine.items() if c in (1, 3, TIMEOUT, 24, -24, 152, 255)]
        survived = [n for n, c in mine.items() if c == SURVIVED]
        other = len(mine) - len(killed) - len(survived)
        equivalent = [n for n in survived if kinds.get(n) == "equivalent"]
        cpu_only = [n for n in survived if kinds.get(n) == "cpu-only"]
        open_survivors += [n for n in survived if n not in kinds]
        scored = len(killed) + len(survived) - len(equivalent) - len(cpu_only)
        rate = f"{100 * len(killed) / scored:.1f}%" if scored else "-"
        print(
            f"{source_of(meta):42s} {len(codes):6d} {len(mine):7d} {len(killed):6d} "
            f"{len(survived):8d} {len(equivalent):5d} {len(cpu_only):4d} {other:5d} {rate:>7s}"
        )
    if args.survivors:
        print("\nsurvivors not argued equivalent:")
        print("\n".join(sorted(open_survivors)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    sampler = commands.add_parser("sample", help="generate the mutants and sample them")
    sampler.add_argument("--seed", type=int, default=11)
    sampler.add_argument("--fraction", type=float, default=0.1)
    sampler.add_argument("--minimum", type=int, default=30)
    sampler.set_defaults(run=sample)
    ranks = commands.add_parser("ranks", help="run mutants against the spawned-ranks tests")
    ranks.add_argument("names", nargs="*", help="(re)run these mutants (default: see above)")
    ranks.add_argument("--timeout", type=float, default=600.0)
    ranks.set_defaults(run=run_ranks)
    reporter = commands.add_parser("report", help="per-file verdicts of the sampled mutants")
    reporter.add_argument("--survivors", action="store_true", help="list open survivors")
    reporter.set_defaults(run=report)
    args = parser.parse_args()
    args.run(args)


if __name__ == "__main__":
    main()
