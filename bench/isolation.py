#!/usr/bin/env python
"""Drain rates of one worker by isolation and threads, and what a task costs in a child process.

    python bench/isolation.py           # about two minutes
    python bench/isolation.py --quick   # smaller samples

Starts its own redis-server on a free port and uses a temporary SQLite file.
Each drain is one ``jobqueue worker PROFILE --burst`` process over tasks added
beforehand, timed from its start to the last task finished (median of runs).
The per-task figures compare the two designs ``--isolation process`` could
use: a fork per task, and one long-lived child fed over a pipe (the one chosen).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(ROOT), str(HERE)]

import jobqueue  # noqa: E402


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def drain(dsn: str, job: str, count: int, parameters: dict, *flags: str) -> float:
    queue = jobqueue.queue_from_dsn(dsn)
    queue.flush()
    queue.add(*[jobqueue.Task("bench", job, parameters) for _ in range(count)])
    backend = {"JOBQUEUE_REDIS_DSN": dsn} if dsn.startswith("redis") else {"JOBQUEUE_REDIS_DSN": "", "JOBQUEUE_DB": dsn}
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{HERE}", **backend}
    started = time.monotonic()
    subprocess.run([sys.executable, str(ROOT / "jobqueue.py"), "worker", "bench", "--burst", "-q", *flags],
                   env=env, check=True, cwd=HERE, stdout=subprocess.DEVNULL)
    elapsed = time.monotonic() - started
    assert queue.count(status="finished") == count
    return count / elapsed


def fork_per_task(count: int) -> float:
    """Seconds per task: fork, run a no-op, send a JSON outcome on a pipe, exit, reap."""
    started = time.perf_counter()
    for _ in range(count):
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.write(write, json.dumps({"result": None}).encode() + b"\n")
            os._exit(0)
        os.close(write)
        json.loads(os.read(read, 4096))
        os.close(read)
        os.waitpid(pid, 0)
    return (time.perf_counter() - started) / count


def long_lived_child(count: int) -> float:
    """Seconds per task: one JSON line to a waiting child and one back."""
    child = subprocess.Popen([sys.executable, "-c", "import sys\nfor line in sys.stdin:\n"
                              "    sys.stdout.write('{\"result\": null}\\n'); sys.stdout.flush()"],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    task = json.dumps(jobqueue.Task("bench", "jobs.NoopJob").to_json())
    started = time.perf_counter()
    for _ in range(count):
        child.stdin.write(task + "\n")
        child.stdin.flush()
        json.loads(child.stdout.readline())
    elapsed = time.perf_counter() - started
    child.stdin.close()
    child.wait()
    return elapsed / count


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    runs, noops, sleeps = (1, 300, 40) if args.quick else (3, 2000, 160)
    redis = subprocess.Popen([shutil.which("redis-server"), "--port", str(port := free_port()), "--save", "",
                              "--appendonly", "no"], stdout=subprocess.DEVNULL)
    time.sleep(0.5)
    try:
        with tempfile.TemporaryDirectory() as folder:
            backends = {"sqlite": str(Path(folder) / "bench.db"), "redis": f"redis://127.0.0.1:{port}/0"}
            print(f"| figure | backend | tasks/s (median of {runs}) |\n|---|---|---|")
            for name, dsn in backends.items():
                for label, job, count, parameters, flags in (
                    ("no-op jobs, default (thread, 1)", "jobs.NoopJob", noops, {}, ()),
                    ("no-op jobs, --isolation process", "jobs.NoopJob", noops, {}, ("--isolation", "process")),
                    ("no-op jobs, --threads 8", "jobs.NoopJob", noops, {}, ("--threads", "8")),
                    ("50 ms sleeping jobs, default", "jobs.SleepJob", sleeps // 4, {"seconds": 0.05}, ()),
                    ("50 ms sleeping jobs, --threads 8", "jobs.SleepJob", sleeps, {"seconds": 0.05},
                     ("--threads", "8")),
                    ("50 ms sleeping jobs, --isolation process --threads 8", "jobs.SleepJob", sleeps,
                     {"seconds": 0.05}, ("--isolation", "process", "--threads", "8")),
                ):
                    rates = [drain(dsn, job, count, parameters, *flags) for _ in range(runs)]
                    print(f"| {label} | {name} | {statistics.median(rates):,.0f} |", flush=True)
        count = 300 if args.quick else 2000
        print(f"\nper task, fork per task: {fork_per_task(count) * 1e3:.2f} ms; "
              f"long-lived child over a pipe: {long_lived_child(count) * 1e3:.3f} ms")
    finally:
        redis.kill()
        redis.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
