"""Huey's application for the benchmark: its consumer imports ``huey_app.huey``."""

import os

from huey import RedisHuey
from jobs import record_latency

huey = RedisHuey("bench", host="127.0.0.1", port=int(os.environ["BENCH_REDIS_PORT"]))


@huey.task()
def noop(*args, **kwargs):
    return None


@huey.task()
def latency(sent):
    record_latency(sent)
