#!/usr/bin/env python
"""Two versions of jobqueue.py side by side on one Redis: enqueue and drain, interleaved.

    git show d127ffd:jobqueue.py > /tmp/old_jobqueue.py
    python bench/compare.py /tmp/old_jobqueue.py jobqueue.py            # 5 rounds of 2,000 tasks
    python bench/compare.py OLD NEW --rounds 9 --tasks 5000
    python bench/compare.py OLD NEW --sqlite                            # a SQLite file each instead

Both run in this process, against one redis-server it starts on a free port
(or, with ``--sqlite``, each on a new SQLite file in a temporary folder),
in turns (old, new, old, new...), so that a busy machine slows both alike.
Enqueue is one ``add`` per task; drain is what a worker's loop does, in
process: ``fetch`` once, then ``complete_and_fetch`` until the queue is empty.
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


def one_round(module: ModuleType, dsn: str, tasks: int) -> tuple[float, float]:
    """(tasks/s enqueued one add at a time, tasks/s drained by fetch and complete_and_fetch)."""
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
    return enqueue, drain


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("first", help="a jobqueue.py (the baseline)")
    parser.add_argument("second", help="another jobqueue.py")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tasks", type=int, default=2000)
    parser.add_argument("--sqlite", action="store_true", help="compare on SQLite files instead of Redis")
    args = parser.parse_args()
    versions = {"first": load(args.first, "jobqueue_first"), "second": load(args.second, "jobqueue_second")}
    figures: dict[str, list[tuple[float, float]]] = {name: [] for name in versions}
    with tempfile.TemporaryDirectory(prefix="jobqueue-compare-") as tmp:
        redis = RedisServer(Path(tmp))
        try:
            for _ in range(args.rounds):
                for name, module in versions.items():
                    dsn = (f"sqlite:///{tmp}/{name}.db" if args.sqlite
                           else f"redis://127.0.0.1:{redis.port}/0?prefix=compare-{name}")
                    figures[name].append(one_round(module, dsn, args.tasks))
        finally:
            redis.stop()
    medians = {}
    for name, path in (("first", args.first), ("second", args.second)):
        enqueue, drain = ([round_[index] for round_ in figures[name]] for index in (0, 1))
        medians[name] = (statistics.median(enqueue), statistics.median(drain))
        backend = "SQLite" if args.sqlite else "Redis"
        print(f"{name} ({path}, {backend}): enqueue {medians[name][0]:,.0f}/s"
              f" ({min(enqueue):,.0f}-{max(enqueue):,.0f}), drain {medians[name][1]:,.0f}/s"
              f" ({min(drain):,.0f}-{max(drain):,.0f})")
    change = [100 * (medians["second"][index] / medians["first"][index] - 1) for index in (0, 1)]
    load_average = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    print(f"second vs first: enqueue {change[0]:+.0f}%, drain {change[1]:+.0f}%  ({load_average})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
