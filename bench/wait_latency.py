#!/usr/bin/env python
"""From add to ``queue.wait`` returning, with a real worker process, on Redis and on SQLite.

    python bench/wait_latency.py            # 300 tasks on each backend
    python bench/wait_latency.py --tasks 50

One worker process (``jobqueue worker bench``) runs a job that does nothing;
this process adds a task, waits for it with ``queue.wait`` and times the
whole round: add, claim, run, record, and the waiter hearing of the end
(pushed on Redis, polled on SQLite). Prints p50, p99 and the slowest.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(ROOT), str(HERE)]

import jobqueue  # noqa: E402
from bench import RedisServer, wait_until  # noqa: E402


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def measure(dsn: str, tasks: int) -> list[float]:
    queue = jobqueue.queue_from_dsn(dsn)
    env = {**os.environ, "PYTHONPATH": str(ROOT / "bench")}
    env.pop("JOBQUEUE_DB", None)
    env.pop("JOBQUEUE_REDIS_DSN", None)
    env["JOBQUEUE_REDIS_DSN" if dsn.startswith("redis") else "JOBQUEUE_DB"] = dsn
    worker = subprocess.Popen([sys.executable, str(ROOT / "jobqueue.py"), "worker", "bench", "-q"], env=env,
                              cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        warm = queue.add(jobqueue.Task("bench", "jobs.NoopJob"))[0]
        wait_until(lambda: queue.find(warm.identifier).status is jobqueue.Status.FINISHED, 30, "the worker")
        rounds = []
        for _ in range(tasks):
            started = time.perf_counter()
            task = queue.add(jobqueue.Task("bench", "jobs.NoopJob"))[0]
            queue.wait(task.identifier, timeout=10)
            rounds.append((time.perf_counter() - started) * 1000)
        return rounds
    finally:
        worker.terminate()
        worker.wait(20)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=300)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="jobqueue-wait-") as tmp:
        redis = RedisServer(Path(tmp))
        try:
            for name, dsn in (("Redis", f"redis://127.0.0.1:{redis.port}/0?prefix=wait"),
                              ("SQLite", f"sqlite:///{tmp}/wait.db")):
                rounds = measure(dsn, args.tasks)
                print(f"{name}: add to wait() returning, {len(rounds)} tasks: p50 {percentile(rounds, 0.5):.1f} ms,"
                      f" p99 {percentile(rounds, 0.99):.1f} ms, slowest {max(rounds):.1f} ms")
        finally:
            redis.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
