#!/usr/bin/env python
"""Measure jobqueue against RQ and Huey, side by side, in one run on this machine.

    python bench/bench.py               # the full run, a few minutes
    python bench/bench.py --quick       # under a minute, smaller samples
    python bench/bench.py --smoke       # seconds: only checks that every figure runs
    python bench/bench.py --json FILE   # also save every figure as JSON

It starts its own redis-server on a free port (and uses temporary SQLite
files), runs each figure several times and prints one table: median, min and
max, and on jobqueue's rows how many times better jobqueue does than RQ and
Huey (above 1: faster, or smaller). RQ and Huey are measured when installed
(``pip install -e '.[bench]'``); without them the table shows jobqueue alone.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

STARTED = time.monotonic()
HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(ROOT), str(HERE)]

import jobqueue  # noqa: E402


@dataclass(frozen=True)
class Sizes:
    repeats: int
    enqueue: int
    batches: int
    drain: int
    drain_slow: int
    latency: int
    stored: int
    posts: int


FULL = Sizes(repeats=5, enqueue=5000, batches=20, drain=10000, drain_slow=400, latency=300, stored=100_000, posts=2000)
QUICK = Sizes(repeats=2, enqueue=1000, batches=3, drain=1000, drain_slow=10, latency=25, stored=5_000, posts=200)
SMOKE = Sizes(repeats=1, enqueue=100, batches=1, drain=100, drain_slow=4, latency=8, stored=1_000, posts=40)


@dataclass
class Row:
    figure: str
    system: str
    unit: str
    better: str  # "higher" or "lower"
    values: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.values)

    def times_better_than(self, other: Row) -> float:
        if self.better == "higher":
            return self.median / other.median
        return other.median / self.median


def progress(line: str) -> None:
    """One line on stderr as each figure is measured, with the seconds since the start."""
    print(f"{time.monotonic() - STARTED:6.1f}s {line}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_until(condition: Callable[[], object], timeout: float, what: str) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = condition()
        if result:
            return result
        time.sleep(0.005)
    raise RuntimeError(f"timed out waiting for {what}")


class RedisServer:
    def __init__(self, directory: Path):
        self.port = free_port()
        self.process = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(directory)], stdout=subprocess.DEVNULL)
        import redis

        self.client = redis.Redis(port=self.port)
        self.redis_errors = redis.exceptions.ConnectionError
        wait_until(self._answers, 10, "redis-server")

    def _answers(self) -> bool:
        try:
            return bool(self.client.ping())
        except OSError:
            return False
        except self.redis_errors:
            return False

    def used_memory(self) -> int:
        return int(self.client.info("memory")["used_memory"])

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(10)


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


class Bench:
    def __init__(self, sizes: Sizes, redis: RedisServer, tmp: Path, peers: dict[str, bool]):
        self.sizes, self.redis, self.tmp, self.peers = sizes, redis, tmp, peers
        self.rows: list[Row] = []
        self.redis_dsn = f"redis://127.0.0.1:{redis.port}/0?prefix=bench"

    # -- plumbing

    def record(self, figure: str, system: str, unit: str, better: str, measure: Callable[[], float],
               repeats: int | None = None) -> Row:
        row = Row(figure, system, unit, better)
        for _ in range(repeats or self.sizes.repeats):
            self.redis.client.flushall()
            row.values.append(measure())
        self.rows.append(row)
        progress(f"{figure:<42} {system:<22} {row.median:>12,.2f} {unit}")
        return row

    def backends(self) -> list[tuple[str, Callable[[], jobqueue.Queue], dict]]:
        """(name, a fresh empty queue, the environment a worker process needs for it)."""

        def sqlite_path() -> str:
            return str(self.tmp / f"bench-{uuid.uuid4().hex[:8]}.db")

        state: dict[str, str] = {}

        def fresh_sqlite() -> jobqueue.Queue:
            state["db"] = sqlite_path()
            return jobqueue.SQLiteQueue(state["db"])

        redis_env = {"JOBQUEUE_REDIS_DSN": self.redis_dsn}
        return [
            ("jobqueue redis", lambda: jobqueue.queue_from_dsn(self.redis_dsn), redis_env),
            ("jobqueue sqlite", fresh_sqlite, state),
        ]

    def env(self, extra: dict) -> dict:
        env = {k: v for k, v in os.environ.items() if not k.startswith("JOBQUEUE_")}
        env.update({"BENCH_REDIS_PORT": str(self.redis.port), "PYTHONPATH": f"{ROOT}:{HERE}"})
        if "db" in extra:
            env["JOBQUEUE_DB"] = extra["db"]
        env.update({k: v for k, v in extra.items() if k.startswith("JOBQUEUE_")})
        return env

    def worker_command(self, profile: str, *extra: str) -> list[str]:
        return [sys.executable, str(ROOT / "jobqueue.py"), "worker", profile, "-q", *extra]

    def rq_queue(self, name: str = "bench"):
        import redis
        import rq

        return rq.Queue(name, connection=redis.Redis(port=self.redis.port))

    def rq_worker(self, name: str, simple: bool = True) -> list[str]:
        command = [peer_command("rq"), "worker", name, "-u", f"redis://127.0.0.1:{self.redis.port}", "-q"]
        return command + (["-w", "rq.worker.SimpleWorker"] if simple else [])

    @staticmethod
    def huey_consumer(*options: str) -> list[str]:
        return [peer_command("huey_consumer"), "huey_app.huey", "-q", *options]

    # -- 1, 2: enqueue

    def enqueue(self) -> None:
        n, batches = self.sizes.enqueue, self.sizes.batches
        figure, batch_figure = "enqueue, one add per task", "enqueue, batches of 1,000"
        client = self.redis.client

        def floor() -> float:
            started = time.perf_counter()
            for _ in range(n):
                client.ping()
            return n / (time.perf_counter() - started)

        def pipeline_floor() -> float:
            started = time.perf_counter()
            for _ in range(batches):
                pipe = client.pipeline(transaction=False)
                for _ in range(1000):
                    pipe.ping()
                pipe.execute()
            return batches * 1000 / (time.perf_counter() - started)

        self.record("redis-py round trip (the floor)", "redis-py PING", "commands/s", "higher", floor)
        self.record("redis-py pipeline (the floor)", "redis-py PING", "commands/s", "higher", pipeline_floor)
        for name, fresh, _ in self.backends():
            def one_by_one(fresh=fresh) -> float:
                queue = fresh()
                started = time.perf_counter()
                for i in range(n):
                    queue.add(jobqueue.Task("bench", "jobs.NoopJob", {"i": i}))
                return n / (time.perf_counter() - started)

            def in_batches(fresh=fresh) -> float:
                queue = fresh()
                started = time.perf_counter()
                for _ in range(batches):
                    queue.add(*[jobqueue.Task("bench", "jobs.NoopJob", {"i": i}) for i in range(1000)])
                return batches * 1000 / (time.perf_counter() - started)

            self.record(figure, name, "tasks/s", "higher", one_by_one)
            self.record(batch_figure, name, "tasks/s", "higher", in_batches)
        if self.peers["rq"]:
            import jobs
            import rq

            def rq_enqueue() -> float:
                queue = self.rq_queue()
                started = time.perf_counter()
                for i in range(n):
                    queue.enqueue(jobs.noop, i)
                return n / (time.perf_counter() - started)

            def rq_enqueue_many() -> float:
                queue = self.rq_queue()
                started = time.perf_counter()
                for _ in range(batches):
                    queue.enqueue_many([rq.Queue.prepare_data(jobs.noop, (i,)) for i in range(1000)])
                return batches * 1000 / (time.perf_counter() - started)

            self.record(figure, "rq enqueue", "tasks/s", "higher", rq_enqueue)
            self.record(batch_figure, "rq enqueue_many", "tasks/s", "higher", rq_enqueue_many)
        if self.peers["huey"]:
            import huey_app

            def huey_enqueue() -> float:
                started = time.perf_counter()
                for i in range(n):
                    huey_app.noop(i)
                return n / (time.perf_counter() - started)

            self.record(figure, "huey", "tasks/s", "higher", huey_enqueue)

    # -- 3: drain

    def drain_rate(self, fill: Callable[[], None], pending: Callable[[], int], command: list[str], env: dict) -> float:
        """Tasks/s from the moment the consumer takes the first task to the moment the queue is empty."""
        fill()
        total = pending()
        process = subprocess.Popen(command, cwd=HERE, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            first = wait_until(lambda: (lambda left: (time.perf_counter(), left) if left < total else None)(pending()),
                               60, "the first task to be taken")
            wait_until(lambda: pending() == 0, 600, "the queue to drain")
            ended = time.perf_counter()
        finally:
            process.terminate()
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)
        started, left = first  # type: ignore[misc]
        return left / (ended - started)

    def drain(self) -> None:
        n, slow = self.sizes.drain, self.sizes.drain_slow
        one, two = "drain, 1 worker process", "drain, 2 worker processes"
        for name, fresh, extra in self.backends():
            for figure, options in ((one, ()), (two, ("--concurrency", "2"))):
                def measure(fresh=fresh, extra=extra, options=options) -> float:
                    queue = fresh()

                    def fill() -> None:
                        for b in range(0, n, 1000):
                            queue.add(*[jobqueue.Task("bench", "jobs.NoopJob") for _ in range(min(1000, n - b))])

                    return self.drain_rate(fill, lambda: queue.count(profile="bench", status="waiting"),
                                           self.worker_command("bench", *options), self.env(extra))

                self.record(figure, name, "tasks/s", "higher", measure)
        if self.peers["rq"]:
            import jobs
            import rq

            for system, count, simple in (("rq SimpleWorker", n // 5, True), ("rq fork Worker", slow, False)):
                def rq_measure(count=count, simple=simple) -> float:
                    queue = self.rq_queue()

                    def fill() -> None:
                        for b in range(0, count, 1000):
                            queue.enqueue_many([rq.Queue.prepare_data(jobs.noop, ())
                                                for _ in range(min(1000, count - b))])

                    return self.drain_rate(fill, lambda: queue.count, self.rq_worker("bench", simple), self.env({}))

                self.record(one, system, "tasks/s", "higher", rq_measure, repeats=1 if not simple else None)
        if self.peers["huey"]:
            import huey_app

            for figure, options in ((one, ("-w", "1", "-k", "thread")), (two, ("-w", "2", "-k", "process"))):
                def huey_measure(options=options) -> float:
                    def fill() -> None:
                        for _ in range(n):
                            huey_app.noop()

                    return self.drain_rate(fill, huey_app.huey.pending_count, self.huey_consumer(*options),
                                           self.env({}))

                label = "huey 1 thread" if figure == one else "huey 2 processes"
                self.record(figure, label, "tasks/s", "higher", huey_measure)

    # -- 4: latency

    def latency_samples(self, enqueue: Callable[[float], None], command: list[str], env: dict) -> list[float]:
        log = self.tmp / f"latency-{uuid.uuid4().hex[:8]}.log"
        env = {**env, "BENCH_LATENCY_LOG": str(log)}
        process = subprocess.Popen(command, cwd=HERE, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

        def lines() -> int:
            return log.read_text().count("\n") if log.exists() else 0

        try:
            enqueue(time.time())
            wait_until(lambda: lines() >= 1, 60, "the consumer to start")
            time.sleep(0.2)
            for i in range(self.sizes.latency):
                enqueue(time.time())
                wait_until(lambda i=i: lines() >= i + 2, 30, "a task to start")
                time.sleep(0.005)
        finally:
            process.terminate()
            process.wait(20)
        return [float(line) * 1000 for line in log.read_text().split()[1:]]

    def latency(self) -> None:
        def add_rows(system: str, samples: list[float]) -> None:
            ordered = sorted(samples)
            p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
            self.rows.append(Row("add-to-start latency, p50", system, "ms", "lower", [statistics.median(samples)]))
            self.rows.append(Row("add-to-start latency, p99", system, "ms", "lower", [p99]))
            progress(f"{'add-to-start latency p50/p99':<42} {system:<22} {statistics.median(samples):>8.2f}"
                     f" / {p99:.2f} ms")

        for name, fresh, extra in self.backends():
            queue = fresh()
            samples = self.latency_samples(
                lambda sent, queue=queue: queue.add(jobqueue.Task("lat", "jobs.LatencyJob", {"sent": sent})),
                self.worker_command("lat"), self.env(extra))
            add_rows(name, samples)
        if self.peers["rq"]:
            import jobs

            queue = self.rq_queue("lat")
            add_rows("rq SimpleWorker", self.latency_samples(lambda sent: queue.enqueue(jobs.rq_latency, sent),
                                                             self.rq_worker("lat"), self.env({})))
        if self.peers["huey"]:
            import huey_app

            add_rows("huey 1 thread", self.latency_samples(huey_app.latency, self.huey_consumer("-w", "1"),
                                                           self.env({})))

    # -- 5, 6: search and the webservice

    def serve(self, extra: dict) -> tuple[subprocess.Popen, int]:
        process = subprocess.Popen([sys.executable, str(ROOT / "jobqueue.py"), "serve", "--port", "0", "-q"],
                                   cwd=HERE, env=self.env(extra), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                   text=True)
        line = process.stdout.readline()
        return process, int(line.rsplit(":", 1)[1].split()[0])

    def search(self) -> None:
        stored = self.sizes.stored
        figure = f"search(status, profile, limit=100), {stored:,} stored"
        http_figure = f"GET /tasks same filters, {stored:,} stored"
        for name, fresh, extra in self.backends():
            self.redis.client.flushall()
            queue = fresh()
            for b in range(0, stored, 1000):
                queue.add(*[jobqueue.Task(f"p{i % 5}", "jobs.NoopJob", {"i": i}, [f"t{i % 7}"])
                            for i in range(b, b + 1000)])
            for _ in range(stored // 10):
                queue.fetch(f"p{_ % 5}", timeout=0)

            def searching(queue=queue) -> float:
                started = time.perf_counter()
                for _ in range(20):
                    assert len(queue.search(profile="p1", status="waiting", limit=100)) == 100
                return (time.perf_counter() - started) / 20 * 1000

            self.rows.append(Row(figure, name, "ms", "lower", [searching() for _ in range(self.sizes.repeats)]))
            server, port = self.serve(extra)
            try:
                connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)

                def getting(connection=connection) -> float:
                    started = time.perf_counter()
                    for _ in range(20):
                        connection.request("GET", "/tasks?profile=p1&status=waiting&limit=100")
                        response = connection.getresponse()
                        assert response.status == 200 and len(json.loads(response.read())) == 100
                    return (time.perf_counter() - started) / 20 * 1000

                self.rows.append(Row(http_figure, name, "ms", "lower", [getting() for _ in range(self.sizes.repeats)]))
            finally:
                server.terminate()
                server.wait(20)
            for row in self.rows[-2:]:
                progress(f"{row.figure:<42} {row.system:<22} {row.median:>12,.2f} ms")

    def posts(self) -> None:
        for name, fresh, extra in self.backends():
            fresh()
            server, port = self.serve(extra)
            try:
                for clients in (1, 4):
                    def measure(clients=clients, port=port) -> float:
                        runs = [subprocess.Popen([sys.executable, __file__, "--post-client", str(port),
                                                  str(self.sizes.posts)], stdout=subprocess.PIPE, text=True)
                                for _ in range(clients)]
                        elapsed = [float(run.communicate(timeout=300)[0]) for run in runs]
                        return clients * self.sizes.posts / max(elapsed)

                    self.record(f"POST /tasks keep-alive, {clients} client{'s' if clients > 1 else ''}", name,
                                "requests/s", "higher", measure)
            finally:
                server.terminate()
                server.wait(20)

    # -- 7: memory

    def memory(self) -> None:
        figure = "idle worker RSS"
        consumers = [(name, self.worker_command("idle"), extra) for name, fresh, extra in self.backends()
                     if fresh() is not None]
        if self.peers["rq"]:
            consumers.append(("rq SimpleWorker", self.rq_worker("idle"), {}))
        if self.peers["huey"]:
            consumers.append(("huey 1 thread", self.huey_consumer("-w", "1"), {}))
        for name, command, extra in consumers:
            process = subprocess.Popen(command, cwd=HERE, env=self.env(extra), stdout=subprocess.DEVNULL,
                                       stderr=subprocess.DEVNULL)
            try:
                time.sleep(3.0 if self.sizes is FULL else 1.0)
                self.rows.append(Row(figure, name, "MiB", "lower", [rss_mib(process.pid)]))
            finally:
                process.terminate()
                process.wait(20)
            progress(f"{figure:<42} {name:<22} {self.rows[-1].median:>12,.1f} MiB")
        self.bytes_per_task()

    def bytes_per_task(self) -> None:
        figure, count = "Redis bytes per task (3 parameters)", 10_000 if self.sizes is FULL else 2_000
        systems: list[tuple[str, Callable[[int], None]]] = []
        queue = jobqueue.queue_from_dsn(self.redis_dsn)
        systems.append(("jobqueue redis", lambda i: queue.add(
            jobqueue.Task("mem", "jobs.NoopJob", {"a": i, "b": "some text", "c": True}))))
        if self.peers["rq"]:
            import jobs

            rq_queue = self.rq_queue("mem")
            systems.append(("rq", lambda i: rq_queue.enqueue(jobs.noop, a=i, b="some text", c=True)))
        if self.peers["huey"]:
            import huey_app

            systems.append(("huey", lambda i: huey_app.noop(a=i, b="some text", c=True)))
        for name, enqueue in systems:
            self.redis.client.flushall()
            before = self.redis.used_memory()
            for i in range(count):
                enqueue(i)
            self.rows.append(Row(figure, name, "bytes", "lower", [(self.redis.used_memory() - before) / count]))
            progress(f"{figure:<42} {name:<22} {self.rows[-1].median:>12,.0f} bytes")


def post_client(port: int, count: int) -> None:
    """One client process: ``count`` POST /tasks over one keep-alive connection; prints the seconds taken."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    body = json.dumps({"profile": "web", "job": "jobs.NoopJob", "parameters": {"a": 1}})
    started = time.perf_counter()
    for _ in range(count):
        connection.request("POST", "/tasks", body=body, headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        response.read()
        assert response.status == 201
    print(time.perf_counter() - started)


def render(rows: list[Row]) -> str:
    header = f"| {'figure':<44} | {'system':<20} | {'median':>10} | {'min':>10} | {'max':>10} | {'unit':<10} " \
             f"| {'x RQ':>6} | {'x Huey':>6} |"
    lines = [header, "|" + "|".join("-" * (len(cell) + 2) for cell in header.split("|")[1:-1]) + "|"]
    for row in rows:
        peers = {"rq": None, "huey": None}
        if row.system.startswith("jobqueue"):
            for other in rows:
                kind = other.system.split()[0]
                if other.figure == row.figure and kind in peers and peers[kind] is None:
                    peers[kind] = row.times_better_than(other)
        ratios = [f"{value:.2f}" if value is not None else "" for value in peers.values()]
        lines.append(f"| {row.figure:<44} | {row.system:<20} | {row.median:>10,.2f} | {min(row.values):>10,.2f} "
                     f"| {max(row.values):>10,.2f} | {row.unit:<10} | {ratios[0]:>6} | {ratios[1]:>6} |")
    return "\n".join(lines)


def peer_command(name: str) -> str:
    """A peer's console script from this Python's environment, even when it is not activated (not on PATH)."""
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.exists() else shutil.which(name) or name


def versions(peers: dict) -> str:
    """What a reader needs to repeat the run: the clients' and peers' versions, and whether hiredis parsed."""
    from importlib.metadata import PackageNotFoundError, version

    found = []
    for name in ("redis", "hiredis", *(peer for peer, installed in peers.items() if installed)):
        try:
            found.append(f"{name} {version(name)}")
        except PackageNotFoundError:
            found.append(f"{name} not installed")
    try:
        from redis.utils import HIREDIS_AVAILABLE
    except ImportError:
        HIREDIS_AVAILABLE = False
    return ", ".join(found) + f"; hiredis {'used' if HIREDIS_AVAILABLE else 'not used'} by redis-py"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller samples, under a minute")
    parser.add_argument("--smoke", action="store_true", help="tiny samples: checks that every figure runs")
    parser.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    parser.add_argument("--only", nargs="+", choices=["enqueue", "drain", "latency", "search", "posts", "memory"],
                        help="measure only these figures")
    parser.add_argument("--post-client", nargs=2, type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.post_client:
        post_client(*args.post_client)
        return 0
    if shutil.which("redis-server") is None:
        print("bench: redis-server is needed (apt-get install redis-server)", file=sys.stderr)
        return 2
    peers = {}
    for name in ("rq", "huey"):
        try:
            __import__(name)
            peers[name] = True
        except ImportError:
            peers[name] = False
            print(f"bench: {name} is not installed (pip install {name}): measuring without it", file=sys.stderr)
    sizes = SMOKE if args.smoke else QUICK if args.quick else FULL
    with tempfile.TemporaryDirectory(prefix="jobqueue-bench-") as tmp:
        redis = RedisServer(Path(tmp))
        os.environ["BENCH_REDIS_PORT"] = str(redis.port)
        bench = Bench(sizes, redis, Path(tmp), peers)
        try:
            for figure in args.only or ["enqueue", "drain", "latency", "search", "posts", "memory"]:
                getattr(bench, figure)()
        finally:
            redis.stop()
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    size = ", smoke" if args.smoke else ", quick" if args.quick else ""
    print(f"\njobqueue {jobqueue.__version__} benchmark, {stamp}, {os.cpu_count()} cores, Python "
          f"{sys.version.split()[0]}{size}; ratios above 1: jobqueue does better\n{versions(peers)}\n")
    print(render(bench.rows))
    if args.json:
        Path(args.json).write_text(json.dumps({"date": stamp, "quick": args.quick or args.smoke, "sizes": asdict(sizes),
                                               "rows": [asdict(row) for row in bench.rows]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
