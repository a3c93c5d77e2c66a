"""The jobs the benchmark hands to each queue; their worker processes import this module."""

import os
import time

import jobqueue


def record_latency(sent: float) -> None:
    """Append how long ago ``sent`` was (measured first, then written) to $BENCH_LATENCY_LOG."""
    delay = time.time() - sent
    with open(os.environ["BENCH_LATENCY_LOG"], "a") as log:
        log.write(f"{delay!r}\n")


class NoopJob(jobqueue.Job):
    def perform(self, task):
        return None


class LatencyJob(jobqueue.Job):
    def perform(self, task):
        record_latency(task.get_parameter("sent"))


def noop(*args, **kwargs):
    """RQ's job: RQ runs plain functions."""


def rq_latency(sent):
    record_latency(sent)


class SleepJob(jobqueue.Job):
    """Waits on nothing for ``seconds``, as an I/O-bound job does."""

    def perform(self, task):
        time.sleep(task.get_parameter("seconds"))
