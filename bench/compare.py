#!/usr/bin/env python
"""Two versions of jobqueue.py side by side on one Redis: enqueue and drain, interleaved.

    git show d127ffd:jobqueue.py > /tmp/old_jobqueue.py
    python bench/compare.py /tmp/old_jobqueue.py jobqueue.py            # 5 rounds of 2,000 tasks
    python bench/compare.py OLD NEW --rounds 9 --tasks 5000
    python bench/compare.py OLD NEW --sqlite                            # a SQLite file each instead
    python bench/compare.py OLD NEW --batches 20                        # and 20 adds of 1,000 tasks a round

Both run in this process, against one redis-server it starts on a free port
(or, with ``--sqlite``, each on a new SQLite file in a temporary folder),
in turns (old, new, old, new...), so that a busy machine slows both alike.
Enqueue is one ``add`` per task; drain is what a worker's loop does, in
process: ``fetch`` once, then ``complete_and_fetch`` until the queue is empty;
batches is ``--batches`` adds of 1,000 tasks each (0: not measured), on an
empty queue, as bench.py measures them.
Each figure is the median of the rounds (with the range); the last line is
how far the second file is from the first.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType

from bench import RedisServer


def load(path: str, name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    sys.modules[name] = module
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def one_round(module: ModuleType, dsn: str, tasks: int, batches: int) -> tuple[float, float, float]:
    """Tasks/s: (enqueued one add at a time, drained by fetch and complete_and_fetch, enqueued 1,000 an add)."""
    queue = module.queue_from_dsn(dsn)
    queue.flush()
    started = time.perf_counter()
    for number in range(tasks):
        queue.add(module.Task("bench", "jobs.NoopJob", {"i": number}))
    enqueue = tasks / (time.perf_counter() - started)
    started, done = time.perf_counter(), 0
    task = queue.fetch("bench", timeout=0, worker="compare")
    while task is not None:
        task.status = module.Status.FINISHED
        _, task = queue.complete_and_fetch(task, "compare")
        done += 1
    drain = done / (time.perf_counter() - started)
    queue.flush()
    in_batches = 0.0
    if batches:
        started = time.perf_counter()
        for _ in range(batches):
            queue.add(*[module.Task("bench", "jobs.NoopJob", {"i": number}) for number in range(1000)])
        in_batches = batches * 1000 / (time.perf_counter() - started)
        queue.flush()
    return enqueue, drain, in_batches


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("first", help="a jobqueue.py (the baseline)")
    parser.add_argument("second", help="another jobqueue.py")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tasks", type=int, default=2000)
    parser.add_argument("--batches", type=int, default=0, help="also time this many adds of 1,000 tasks a round")
    parser.add_argument("--sqlite", action="store_true", help="compare on SQLite files instead of Redis")
    args = parser.parse_args()
    versions = {"first": load(args.first, "jobqueue_first"), "second": load(args.second, "jobqueue_second")}
    figures: dict[str, list[tuple[float, float, float]]] = {name: [] for name in versions}
    with tempfile.TemporaryDirectory(prefix="jobqueue-compare-") as tmp:
        redis = RedisServer(Path(tmp))
        try:
            for _ in range(args.rounds):
                for name, module in versions.items():
                    dsn = (f"sqlite:///{tmp}/{name}.db" if args.sqlite
                           else f"redis://127.0.0.1:{redis.port}/0?prefix=compare-{name}")
                    figures[name].append(one_round(module, dsn, args.tasks, args.batches))
        finally:
            redis.stop()
    labels = ("enqueue", "drain", "batches") if args.batches else ("enqueue", "drain")
    medians = {}
    for name, path in (("first", args.first), ("second", args.second)):
        columns = [[round_[index] for round_ in figures[name]] for index in range(len(labels))]
        medians[name] = [statistics.median(column) for column in columns]
        backend = "SQLite" if args.sqlite else "Redis"
        print(f"{name} ({path}, {backend}): " + ", ".join(
            f"{label} {median:,.0f}/s ({min(column):,.0f}-{max(column):,.0f})"
            for label, median, column in zip(labels, medians[name], columns)))
    change = [100 * (second / first - 1) for first, second in zip(medians["first"], medians["second"])]
    load_average = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    print("second vs first: " + ", ".join(f"{label} {percent:+.0f}%" for label, percent in zip(labels, change))
          + f"  ({load_average})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
