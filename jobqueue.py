"""jobqueue: a job queue for Python that fits in one file.

Applications add tasks; workers on one machine or fifty fetch and run them.
Tasks live in Redis (through redis-py, imported only then) or in an
embedded SQLite file, always as JSON, never pickled. With SQLite the
standard library is all it needs.

The file reads top to bottom in the order data flows; each section uses only
what is defined above it, but for Assets, read at call time (``grep -n '^# == ' jobqueue.py``
prints this map):

    Constants      names and defaults shared below
    Errors         JobQueueError and its children
    Domain         Status, profiles, Job, @job, Task (its fields are the field table), cron, Schedule
    Events         EventDispatcher and the events a worker emits
    Queue          the contract both backends implement
    Queue: Redis   RedisQueue through redis-py: one slot per profile, one script library, RedisDSN
    Queue: SQLite  SQLiteQueue, one WAL file, one connection per thread
    DSN            queue_from_dsn, the only place that names a backend
    Worker         fetch, run set_up/perform/tear_down, record the outcome
    Configuration  Config.from_env and the ServiceContainer
    HTTP           the routing table, WebService (auth, errors as JSON), OpenAPI from both tables, the server
    CLI            python jobqueue.py worker|manager|serve, main(argv) -> exit code
    Assets         the dashboard page (HTML, CSS, JS): long text the HTTP section serves, kept out of the way
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import copy
import dataclasses
import functools
import hashlib
import importlib
import itertools
import json
import logging
import math
import os
import random
import re
import signal
import socket
import socketserver
import sys
import threading
import time
import traceback
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import MISSING, InitVar, dataclass, field
from datetime import datetime, timedelta, timezone
from enum import Enum
from typing import TYPE_CHECKING, Any, Callable, Union
from urllib.parse import parse_qs, parse_qsl, unquote, urlsplit

if TYPE_CHECKING:
    import sqlite3

__version__ = "0.1.0"

__all__ = [
    "Status", "Task", "Job", "job", "validate_profile", "resolve_job",
    "JobQueueError", "ValidationError", "TaskNotFound", "TaskConflict", "ParameterNotFound", "ScheduleNotFound",
    "Schedule", "CronExpression",
    "JobError", "JobNotAllowed", "BackendUnavailable", "ConfigurationError",
    "EventDispatcher", "WorkerEvent", "TaskEvent",
    "WORKER_START", "WORKER_FINISHED", "TASK_FETCHED", "TASK_EXECUTED", "TASK_FAILED", "TASK_RETRIED",
    "TASK_RECOVERED", "JobTimeout", "JobCancelled",
    "Queue", "RedisQueue", "RedisDSN", "SQLiteQueue", "queue_from_dsn",
    "Worker", "Config", "ServiceContainer", "WebService", "main",
]

# == Constants ===============================================================

DEFAULT_PREFIX = "jobqueue"
DEFAULT_DB = "jobqueue.db"
PROFILE_PATTERN = re.compile(r"[_a-z0-9-]+")
PROFILE_MAX_LENGTH = 64
PROFILE_MESSAGE = (
    "Profile name only allows lowercase alphanumerical, dash and underscore characters"
)
JOB_PATH_PATTERN = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*([.:][A-Za-z_]\w*)(\.[A-Za-z_]\w*)*")
ORDERS = ("date", "profile", "status")
DEFAULT_LEASE = 30.0
DEFAULT_OUTAGE_WAIT = 10.0  # how long a manager command waits for an unavailable backend (a failover)
DEFAULT_RETRY_DELAY = 5.0
RETRY_DELAY_MAX = 3600.0
DEFAULT_MAX_LOST = 3
ISOLATIONS = ("thread", "process")
ERROR_MAX_BYTES = 64 * 1024
RESULT_MAX_BYTES = 1024 * 1024
SQLITE_BUSY_TIMEOUT = 30.0
DURATION_MAX = 100 * 365 * 86400.0
RETRIES_MAX = 1_000_000
SQLITE_MIN_VERSION = (3, 35, 0)
PRIORITY_MAX = 1_000_000
UNIQUE_KEY_MAX = 256
EXPIRED_ERROR = "Expired before it started"
RATE_PERIODS = {"s": 1.0, "m": 60.0, "h": 3600.0}
CANCELLED = "Cancelled"  # the error of a cancelled task
CANCEL_CHECK_INTERVAL = 0.5  # how often a worker asks whether a task in hand was cancelled
WAIT_MAX = 60.0  # the longest GET /task/{id}?wait=S
MAX_FETCH = 1000  # the most tasks one fetch_many or complete_many claims
DEFAULT_PREFETCH = 20  # the most tasks a worker claims at once (see Worker)
PREFETCH_WINDOW = 0.01  # a worker holds as many tasks as it expects to start within this many seconds
PROGRESS_MESSAGE_MAX = 1000

Scalar = Union[str, int, float, bool, None]

logger = logging.getLogger("jobqueue")

# == Errors ==================================================================


class JobQueueError(Exception):
    """Root of every error jobqueue raises on purpose."""


class ValidationError(JobQueueError, ValueError):
    """Input jobqueue refuses: a bad status, profile, parameter, tag, job or order."""


class _MessageKeyError(KeyError):
    """A KeyError whose str() is its message, not the message's repr."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class TaskNotFound(JobQueueError, _MessageKeyError):
    """No task has this identifier in the queue."""

    def __init__(self, identifier: str):
        super().__init__(f"Task {identifier} does not exists")
        self.identifier = identifier


class ParameterNotFound(JobQueueError, _MessageKeyError):
    """A task has no parameter of that name."""

    def __init__(self, name: str):
        super().__init__(f'There is no value for "{name}" key')
        self.name = name


class ScheduleNotFound(JobQueueError, _MessageKeyError):
    """No schedule has this name in the queue."""

    def __init__(self, name: str):
        super().__init__(f'Schedule "{name}" does not exist')
        self.name = name


class TaskConflict(ValidationError):
    """A change the queue's state does not allow now: retrying a task not failed, depending on an unknown one."""


class JobError(JobQueueError):
    """A job path that cannot be run: not importable, or not a Job nor a @job function."""


class BackendUnavailable(JobQueueError):
    """The storage (Redis, the SQLite file) cannot be reached or used right now."""


class ConfigurationError(JobQueueError):
    """A DSN or setting jobqueue cannot use, or a missing optional dependency."""


class JobNotAllowed(JobQueueError):
    """A job path outside the ``JOBQUEUE_JOBS`` allow-list."""


class JobTimeout(BaseException):
    """Raised inside a job that ran past its timeout.

    A BaseException, like KeyboardInterrupt, so that a job's own
    ``except Exception`` cannot swallow it.
    """


class JobCancelled(BaseException):
    """Raised inside a job whose task was cancelled (``queue.cancel``) while it ran; a BaseException like JobTimeout."""


class UsageError(JobQueueError):
    """A command used in a way it refuses, such as ``flush`` with nobody to confirm it."""


# What each error means to an HTTP client and to a shell: (HTTP status, exit code).
# The HTTP layer and the CLI both read this table; anything not in it is a bug (500, exit 1).
ERROR_CODES: dict[type, tuple[int, int]] = {
    ValidationError: (400, 2),
    TaskNotFound: (404, 2),
    ScheduleNotFound: (404, 2),
    ParameterNotFound: (400, 2),
    JobError: (400, 2),
    JobNotAllowed: (403, 2),
    TaskConflict: (409, 2),
    UsageError: (400, 2),
    ConfigurationError: (500, 2),
    BackendUnavailable: (503, 1),
}


def error_codes(error: BaseException) -> tuple[int, int]:
    """The (HTTP status, exit code) of an error, by the first class in its MRO that the table knows."""
    for cls in type(error).__mro__:
        if cls in ERROR_CODES:
            return ERROR_CODES[cls]
    return 500, 1


# == Domain ==================================================================


class Status(str, Enum):
    """Where a task is in its life, in the order ``order='status'`` sorts by."""

    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"
    FAILED = "failed"

    @classmethod
    def _missing_(cls, value: object) -> Status:
        raise ValidationError(f'Status "{value}" does not exists')

    @property
    def rank(self) -> int:
        return _STATUS_RANKS[self]

    def __str__(self) -> str:
        return self.value


_STATUS_RANKS = {status: rank for rank, status in enumerate(Status)}
ENDED_STATUSES = frozenset({Status.FINISHED, Status.FAILED})


def validate_profile(name: object) -> str:
    """Return ``name`` if it is a valid profile, else raise ValidationError."""
    if (
        not isinstance(name, str)
        or len(name) > PROFILE_MAX_LENGTH
        or not PROFILE_PATTERN.fullmatch(name)
    ):
        raise ValidationError(PROFILE_MESSAGE)
    return name


def _is_text(value: str) -> bool:
    """Whether ``value`` can be stored and sent: no lone surrogate such as JSON's "\\ud800"."""
    if value.isascii():
        return True
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _is_scalar(value: object) -> bool:
    if value is None or isinstance(value, (bool, int)):
        return True
    if isinstance(value, str):
        return _is_text(value)
    return isinstance(value, float) and math.isfinite(value)


def validate_parameters(parameters: object) -> dict[str, Scalar]:
    if parameters is None:
        return {}
    if not isinstance(parameters, Mapping):
        raise ValidationError("Malformed parameters")
    for key, value in parameters.items():
        if not isinstance(key, str) or not _is_text(key):
            raise ValidationError("The key must be a string")
        if not _is_scalar(value):
            raise ValidationError(f'The "{key}" value must be a scalar or null')
    return dict(parameters)


def validate_dependencies(depends_on: object, identifier: str) -> list[str]:
    """The identifiers a task waits for (a Task stands for its own), without repeats, never itself."""
    if depends_on is None:
        return []
    if isinstance(depends_on, (str, Task)) or not isinstance(depends_on, (list, tuple)):
        raise ValidationError("depends_on must be a list of task identifiers")
    unique: list[str] = []
    for item in depends_on:
        item = item.identifier if isinstance(item, Task) else item
        if not isinstance(item, str) or not item or not _is_text(item) or len(item) > 200:
            raise ValidationError("depends_on must be a list of task identifiers")
        if item == identifier:
            raise ValidationError(f"Task {identifier} can not depend on itself")
        if item not in unique:
            unique.append(item)
    return unique


def validate_tags(tags: object) -> list[str]:
    if tags is None:
        return []
    if isinstance(tags, str):
        raise ValidationError(f'Tags must be a list of strings, such as ["{tags}"], not one string')
    if not isinstance(tags, (list, tuple, set, frozenset)):
        raise ValidationError("Tag value must be a string")
    unique: list[str] = []
    for tag in tags:
        if not isinstance(tag, str) or not _is_text(tag):
            raise ValidationError("Tag value must be a string")
        if not tag:
            raise ValidationError("Tag value must not be empty")
        if tag not in unique:
            unique.append(tag)
    return unique


def snake_case(name: str) -> str:
    name = re.sub(r"([A-Z]+)([A-Z][a-z])", r"\1_\2", name)
    return re.sub(r"([a-z\d])([A-Z])", r"\1_\2", name).lower()


@functools.lru_cache(maxsize=1024)
def job_name(path: str) -> str:
    """The human name of a job path: ``app.jobs.SendMailJob`` -> ``send_mail``."""
    last = re.split(r"[.:]", path)[-1]
    if last.endswith("Job") and len(last) > 3:
        last = last[: -len("Job")]
    return snake_case(last)


class Job:
    """Code a worker runs for a task: subclass it and implement ``perform``.

    The worker builds one instance per task, sets ``logger``, then calls
    ``set_up(task)``, ``perform(task)`` and, even when perform raised,
    ``tear_down(task)``. What ``perform`` returns, if JSON-serialisable, is
    stored as the task's ``result``.
    """

    logger: logging.Logger = logging.getLogger("jobqueue.job")

    def set_up(self, task: Task) -> None:
        """Prepare the job; called before ``perform``."""

    def perform(self, task: Task) -> Any:
        raise NotImplementedError(f"{type(self).__name__} must implement perform(task)")

    def tear_down(self, task: Task) -> None:
        """Clean up after ``perform``, whether it succeeded or not."""


def job(function: Callable[[Task], Any]) -> Callable[[Task], Any]:
    """Mark a module-level function as a job a worker may run as ``function(task)``."""
    function.__jobqueue_job__ = True  # type: ignore[attr-defined]
    return function


def _is_job_function(target: object) -> bool:
    return callable(target) and getattr(target, "__jobqueue_job__", False) is True


def _module_name(target: Any) -> str:
    """The module a worker would import for ``target``; a script's own jobs have none."""
    module = target.__module__
    if module == "__main__":
        spec = getattr(sys.modules["__main__"], "__spec__", None)
        if spec is not None and spec.name:
            return spec.name
        raise ValidationError(
            f'Job "{target.__qualname__}" is defined in the script being run (__main__), which a worker cannot'
            " import: move it to a module and import it from there"
        )
    return module


def _checked_job_path(path: str) -> str:
    if not JOB_PATH_PATTERN.fullmatch(path):
        raise ValidationError(
            f'Job "{path}" must be an import path such as "myapp.jobs.SendMailJob"'
        )
    if path.startswith(("__main__.", "__main__:")):
        raise ValidationError(f'Job "{path}" names the script being run (__main__), which a worker cannot'
                              " import: move the job to a module")
    return path


# Every task built checks its job's path; a program names a few jobs, checked once each here.
_known_job_path = functools.lru_cache(maxsize=1024)(_checked_job_path)


def job_path(target: object) -> str:
    """The import path that names ``target``: a Job subclass or instance, a @job function or a path."""
    if target.__class__ is str:
        return _known_job_path(target)
    if isinstance(target, str):
        return _checked_job_path(target)
    if isinstance(target, Job):
        target = type(target)
    if (isinstance(target, type) and issubclass(target, Job)) or _is_job_function(target):
        qualname = target.__qualname__  # type: ignore[union-attr]
        if "<locals>" in qualname:
            raise ValidationError(
                f'Job "{qualname}" is defined inside a function; workers can only import module-level jobs'
            )
        return f"{_module_name(target)}.{qualname}"
    raise ValidationError(
        "Job must be a jobqueue.Job subclass, an instance of one, a @jobqueue.job function or an import path"
    )


def _import_job_module(module_name: str, path: str) -> Any:
    """The module, or None when the module itself does not exist (a bug inside it is a JobError)."""
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        missing = error.name or ""
        if module_name == missing or module_name.startswith(missing + "."):
            return None
        raise JobError(f'Job "{path}" cannot be imported: {error}') from error
    except Exception as error:
        raise JobError(f'Job "{path}" cannot be imported: {type(error).__name__}: {error}') from error


def _split_list(value: str | None) -> tuple:
    """The items of a comma-separated setting, trimmed; none for an empty or missing one."""
    return tuple(item.strip() for item in (value or "").split(",") if item.strip())


def allowed_jobs(environ: Mapping[str, str] | None = None) -> tuple:
    """The ``JOBQUEUE_JOBS`` prefixes (comma-separated); empty means every job path is allowed."""
    return _split_list((os.environ if environ is None else environ).get("JOBQUEUE_JOBS"))


def check_allowed(path: str, allowed: Sequence[str]) -> str:
    """``path`` if the allow-list is empty or one of its prefixes starts it; else JobNotAllowed.

    Called before anything is imported, so a path outside the list never runs
    a module's import-time code.
    """
    if allowed and not any(path.replace(":", ".").startswith(prefix) for prefix in allowed):
        raise JobNotAllowed(f'Job "{path}" is not allowed: JOBQUEUE_JOBS allows {", ".join(allowed)}')
    return path


def resolve_job(path: str, allowed: Sequence[str] | None = None) -> Any:
    """Import the Job subclass or @job function that ``path`` names; nothing else is ever returned.

    ``allowed`` (default: ``JOBQUEUE_JOBS`` from the environment) is checked
    first: a path outside it raises JobNotAllowed and imports nothing.
    """
    check_allowed(job_path(path), allowed_jobs() if allowed is None else allowed)
    if ":" in path:
        module_name, _, attributes = path.partition(":")
        candidates = [(module_name, attributes.split("."))]
    else:
        parts = path.split(".")
        candidates = [(".".join(parts[:i]), parts[i:]) for i in range(len(parts) - 1, 0, -1)]
    imported = ((name, rest, _import_job_module(name, path)) for name, rest in candidates)
    found = next((entry for entry in imported if entry[2] is not None), None)
    if found is None:
        raise JobError(f'Job "{path}" cannot be imported: no module named "{candidates[-1][0]}"')
    module_name, names, target = found
    for name in names:
        try:
            target = getattr(target, name)
        except AttributeError:
            raise JobError(f'Job "{path}" does not exist: "{module_name}" has nothing named "{name}"') from None
    if (isinstance(target, type) and issubclass(target, Job)) or _is_job_function(target):
        return target
    raise JobError(f'"{path}" is neither a jobqueue.Job subclass nor a @jobqueue.job function')


_DAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def _rfc2822(value: datetime) -> str:
    """``Fri, 23 Feb 2018 13:45:22 +0000``, whatever the locale."""
    value = value.astimezone(timezone.utc)
    return (f"{_DAYS[value.weekday()]}, {value.day:02d} {_MONTHS[value.month - 1]} {value.year} "
            f"{value.hour:02d}:{value.minute:02d}:{value.second:02d} +0000")


def _utcnow() -> datetime:
    return datetime.now(timezone.utc)


def _from_timestamp(value: Any) -> datetime | None:
    if value is None or value == "":
        return None
    return datetime.fromtimestamp(float(value), timezone.utc)


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()


def _parse_datetime(value: Any) -> datetime | None:
    if value is None:
        return None
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=timezone.utc)
    if not isinstance(value, str):
        raise ValidationError(f"{json.dumps(value, default=repr)} is not a date")
    try:
        parsed = datetime.fromisoformat(value)
    except (TypeError, ValueError):
        try:
            import email.utils

            parsed = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            raise ValidationError(f'"{value}" is not a date') from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)


def _moment(seconds: float | None, at: Any, relative: str, absolute: str) -> datetime | None:
    """A time given in seconds from now (``relative``) or as a date (``absolute``), not both; None if neither."""
    if seconds is not None:
        if at is not None:
            raise ValidationError(f"Give {relative} or {absolute}, not both")
        return _utcnow() + timedelta(seconds=seconds)
    try:
        return _parse_datetime(at)
    except ValidationError as error:
        raise ValidationError(f"{absolute}: {error}") from None


def _integer_in(value: Any, lowest: int, highest: int, message: str) -> int:
    """A whole number from lowest to highest (a float such as 2.0 counts; a bool does not), else ValidationError."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not lowest <= value <= highest:
        raise ValidationError(message)
    return value


def _seconds(name: str, value: Any, *, allow_zero: bool = True) -> float | None:
    """A duration in seconds from a number (None stays None); ValidationError otherwise."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValidationError(f"{name} must be a number of seconds")
    if value < 0 or (value == 0 and not allow_zero):
        raise ValidationError(f"{name} must be {'0 or more' if allow_zero else 'more than 0'} seconds")
    if value > DURATION_MAX:
        raise ValidationError(f"{name} must be at most {DURATION_MAX:.0f} seconds (100 years)")
    return float(value)


DURATION_PATTERN = re.compile(r"(\d+(?:\.\d+)?)([smhd]?)")
DURATION_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> float:
    """Seconds from ``90``, ``90s``, ``15m``, ``2h`` or ``7d``."""
    match = DURATION_PATTERN.fullmatch(text.strip().lower()) if isinstance(text, str) else None
    if match is None:
        raise ValidationError(
            f'Duration "{text}" must be a number of seconds, or a number with s, m, h or d (90, 90s, 15m, 2h, 7d)'
        )
    return float(match[1]) * DURATION_UNITS[match[2]]


def _stamp(value: datetime | None) -> str:
    return "" if value is None else repr(value.timestamp())


def _flat_json_encoder() -> Callable[[Any], str]:
    """``json.dumps`` for an object or list of strings and numbers, at a third of its cost per call.

    What the enqueue path encodes a few times per task (parameters, tags, the stored form) is flat and
    validated: it can never be circular nor hold other types. json.dumps builds CPython's C encoder anew on
    each call; this one is built once. Plain json.dumps where there is none or it does not answer the same.
    """
    make = getattr(json.encoder, "c_make_encoder", None)
    try:
        encoder = make(None, None, json.encoder.encode_basestring_ascii, None, ": ", ", ", False, False, True)
        sample = {"a": ["é\u2028", 1, 2.5, None, True]}
        if "".join(encoder(sample, 0)) == json.dumps(sample):
            return lambda value: "".join(encoder(value, 0))
    except (TypeError, ValueError):  # no C encoder (PyPy: None is not callable), or one whose arguments changed
        pass
    return json.dumps


_flat_json = _flat_json_encoder()


def _flat_json_text(value: Any) -> str:
    """Parameters and tags as stored: at once for the empty object and list most tasks have."""
    if not value and value.__class__ in (dict, list):
        return "{}" if value.__class__ is dict else "[]"
    return _flat_json(value)


_EMPTY_JSON = {"[]": list, "{}": dict}


def _flat_json_value(text: str) -> Any:
    """Parameters and tags read back: at once for the empty list and object most tasks have."""
    empty = _EMPTY_JSON.get(text)
    return json.loads(text) if empty is None else empty()


def _new_identifier() -> str:
    """``str(uuid.uuid4())`` in half the time: 122 random bits, the version (4) and the variant (10) bits."""
    digits = os.urandom(16).hex()
    return (f"{digits[:8]}-{digits[8:12]}-4{digits[13:16]}-{'89ab'[int(digits[16], 16) & 3]}{digits[17:20]}"
            f"-{digits[20:]}")


@dataclass(frozen=True)
class Codec:
    """How one kind of task field is stored (text in Redis, a typed SQLite column) and shown in JSON.

    ``load`` reads either form: Redis gives text, SQLite its column's number or text.
    """

    sql: str
    store: Callable[[Any], str]
    load: Callable[[Any], Any]
    dump: Callable[[Any], Any] = copy.copy
    parse: Callable[[Any], Any] = copy.copy


TEXT = Codec("TEXT", str, str)
JSON_TEXT = Codec("TEXT", json.dumps, json.loads)
FLAT_JSON_TEXT = Codec("TEXT", _flat_json_text, _flat_json_value)  # an object or list of scalars (validated)
EPOCH = Codec("REAL", _stamp, _from_timestamp, _iso, _parse_datetime)
NUMBER = Codec("REAL", lambda value: repr(float(value)), float)
COUNT = Codec("INTEGER", str, int)
LIST_OR_NOTHING = Codec("TEXT", lambda value: json.dumps(value) if value else "", json.loads)  # [] is stored as ''
STATUS = Codec("TEXT", lambda value: value.value, Status, lambda value: value.value)
NULLABLE = {"type": ["string", "null"]}
PROFILE_SCHEMA = {"type": "string", "pattern": f"^{PROFILE_PATTERN.pattern}$", "maxLength": PROFILE_MAX_LENGTH}
SCALAR_SCHEMA = {"type": ["string", "number", "integer", "boolean", "null"]}
SECONDS_SCHEMA = {"type": ["number", "null"], "minimum": 0, "maximum": DURATION_MAX}
POSITIVE_SECONDS = {"type": ["number", "null"], "exclusiveMinimum": 0, "maximum": DURATION_MAX}


def _column(codec: Codec, default: Any = MISSING, *, schema: dict, sql: str = "", state: bool = False,
            then: Mapping[str, dict] | None = None, show: tuple = (), alias: str | None = None,
            first: bool = False, new: dict | None = None, **options: Any) -> Any:
    """A Task field and its row in the field table.

    ``codec`` stores and shows it; ``sql`` adds column constraints; ``state`` marks what queues and
    workers fill in (never stored on add); ``schema`` is its OpenAPI schema; ``then`` names properties
    the JSON form shows right after it (name -> schema), ``first`` puts it at the head of the JSON form as
    in the seed; ``show`` holds ``manager show`` lines as
    ``(rank, label, render(task) -> text or None)``; ``alias`` is a second JSON name ``from_json`` reads;
    ``new`` is its schema in a create request (POST /tasks), if that request may set it.
    """
    metadata = {"codec": codec, "schema": schema, "sql": f"{codec.sql} {sql}".strip(), "state": state,
                "then": then or {}, "show": show, "alias": alias,
                "first": first, "new": new}
    return field(default=default, metadata=metadata, **options)


def _seconds_shown(value: float | None, otherwise: str) -> str:
    return f"{value:g}s" if value else otherwise


def _parameters_shown(task: Task) -> str:
    lines = [f"{number}) {name}: {value if isinstance(value, str) else json.dumps(value)}"
             for number, (name, value) in enumerate(task.parameters.items(), 1)]  # type: ignore[union-attr]
    return ("\n" + " " * len("Parameters : ")).join(lines) or "(none)"


def _if_set(name: str, render: Callable[[Any], str] = str) -> Callable[[Task], str | None]:
    return lambda task: None if getattr(task, name) is None else render(getattr(task, name))


def make_progress(fraction: Any, message: Any = None, at: float | None = None) -> dict[str, Any]:
    """A task's progress as stored and shown: ``{"fraction": 0..1, "message": text or None, "at": ISO 8601}``."""
    if (isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not math.isfinite(fraction)
            or not 0 <= fraction <= 1):
        raise ValidationError(f"Progress is a fraction from 0 to 1, not {fraction!r}")
    if message is not None and (not isinstance(message, str) or not _is_text(message)):
        raise ValidationError("A progress message is a string")
    if message is not None and len(message) > PROGRESS_MESSAGE_MAX:
        raise ValidationError(f"A progress message is at most {PROGRESS_MESSAGE_MAX} characters")
    when = _utcnow() if at is None else _from_timestamp(at)
    return {"fraction": float(fraction), "message": message, "at": _iso(when)}


def _progress_shown(task: Task) -> str | None:
    progress = task.progress
    if not progress:
        return None
    message = f" {progress['message']}" if progress.get("message") else ""
    return f"{progress['fraction']:.0%}{message} (at {progress['at']})"


_RETRIES_MESSAGE = f"retries must be a whole number, 0 or more (at most {RETRIES_MAX})"
_PRIORITY_MESSAGE = f"priority must be a whole number from {-PRIORITY_MAX} to {PRIORITY_MAX}"


def _is_required(column: dataclasses.Field) -> bool:
    return column.default is dataclasses.MISSING and column.default_factory is dataclasses.MISSING


@dataclass
class Task:
    """A unit of work: which ``job`` to run, for which ``profile``, with which ``parameters``.

    ``job`` may be a Job subclass, an instance of one, a @job function or an
    import path; it is kept as the path. Options, all keyword arguments:
    ``retries`` (how many failed runs to try again, default 0), ``retry_delay``
    (seconds before the first retry, doubling after each failure, with jitter),
    ``timeout`` (seconds a run may take), ``lease`` (seconds a worker holds the
    task without renewing it), ``delay`` (seconds before it may run, counted from when the queue stores it) or
    ``run_at`` (a datetime), ``depends_on`` (identifiers of tasks that must finish
    first), ``priority`` (higher runs first within the profile, default 0), ``unique_key``
    (nothing is added while a task of the profile with this key waits or runs), ``expires`` (seconds from
    when the queue stores it) or ``expires_at`` (a datetime): not started by then, it fails unrun.
    The other fields are filled in by queues and workers.

    The fields are the field table (``_column``): their order is the JSON form's, and their rows
    drive storage on both backends, the SQLite columns, ``manager show`` and the OpenAPI schema.
    """

    profile: str = _column(TEXT, sql="NOT NULL", show=((5, "Profile", _if_set("profile")),), schema=PROFILE_SCHEMA,
                           new=PROFILE_SCHEMA)
    job: Any = _column(TEXT, sql="NOT NULL", schema={"type": "string"},
                       new={"type": "string", "pattern": f"^(?!__main__[.:]){JOB_PATH_PATTERN.pattern}$"},
                       then={"date": {"type": "string", "description": "RFC 2822"}},
                       show=((3, "Job class", _if_set("job")), (4, "Job name", lambda task: task.job_name)))
    parameters: dict[str, Scalar] | None = _column(
        FLAT_JSON_TEXT, None, sql="NOT NULL", show=((8, "Parameters", _parameters_shown),),
        schema={"type": "object", "additionalProperties": SCALAR_SCHEMA},
        new={"type": ["object", "null"], "additionalProperties": SCALAR_SCHEMA})
    tags: Sequence[str] | None = _column(
        FLAT_JSON_TEXT, None, sql="NOT NULL", schema={"type": "array", "items": {"type": "string"}},
        then={"job_name": {"type": "string"}},
        new={"type": ["array", "null"], "items": {"type": "string", "minLength": 1}},
        show=((7, "Tags", lambda task: ", ".join(task.tags) or "(none)"),))  # type: ignore[arg-type]
    identifier: str = _column(TEXT, sql="NOT NULL UNIQUE", first=True, default_factory=_new_identifier,
                              schema={"type": "string", "format": "uuid"},
                              show=((1, "Identifier", _if_set("identifier")),))
    status: Status = _column(STATUS, Status.WAITING, sql="NOT NULL", state=True, first=True,
                             schema={"type": "string", "enum": [s.value for s in Status]},
                             show=((6, "Status", lambda task: task.status.value),))
    created_at: datetime = _column(EPOCH, sql="NOT NULL", default_factory=_utcnow, alias="date",
                                   schema={"type": "string", "format": "date-time"},
                                   show=((2, "Date", lambda task: task.date),))
    attempts: int = _column(COUNT, 0, sql="NOT NULL DEFAULT 0", state=True, schema={"type": "integer"},
                            show=((14, "Attempts", _if_set("attempts")),))
    worker: str | None = _column(TEXT, None, state=True, schema=NULLABLE,
                                 show=((16, "Worker", _if_set("worker")),))
    started_at: datetime | None = _column(EPOCH, None, state=True, schema=NULLABLE,
                                          show=((17, "Started", _if_set("started_at", _rfc2822)),))
    finished_at: datetime | None = _column(EPOCH, None, state=True, schema=NULLABLE,
                                           show=((18, "Finished", _if_set("finished_at", _rfc2822)),))
    error: str | None = _column(TEXT, None, state=True, schema=NULLABLE, show=((20, "Error", lambda task: (
        task.error.rstrip("\n").replace("\n", "\n        ") if task.error else None)),))
    result: Any = _column(JSON_TEXT, None, state=True, schema={},
                          show=((19, "Result", _if_set("result", json.dumps)),))
    retries: int = _column(COUNT, 0, sql="NOT NULL DEFAULT 0", schema={"type": "integer"},
                           new={"type": ["integer", "null"], "minimum": 0, "maximum": RETRIES_MAX}, show=(
        (9, "Retries", lambda task: f"{task.retries} (failed so far: {task.failures})"),))
    retry_delay: float = _column(NUMBER, DEFAULT_RETRY_DELAY, schema={"type": "number"}, new=SECONDS_SCHEMA, show=(
        (10, "Retry delay", lambda task: f"{task.retry_delay or 0:g}s, doubled after each failure"),))
    timeout: float | None = _column(NUMBER, None, schema={"type": ["number", "null"]}, new=POSITIVE_SECONDS, show=(
        (11, "Timeout", lambda task: _seconds_shown(task.timeout, "(none; the worker --timeout applies)")),))
    lease: float | None = _column(NUMBER, None, schema={"type": ["number", "null"]}, new=POSITIVE_SECONDS, show=(
        (12, "Lease", lambda task: _seconds_shown(task.lease, "(the worker --lease, 30s by default)")),))
    run_at: datetime | None = _column(EPOCH, None, schema={**NULLABLE, "format": "date-time"}, show=(
        (13, "Run at", lambda task: _rfc2822(task.run_at) if task.run_at else "(as soon as a worker is free)"),))
    failures: int = _column(COUNT, 0, sql="NOT NULL DEFAULT 0", state=True, schema={"type": "integer"})
    lost: int = _column(COUNT, 0, sql="NOT NULL DEFAULT 0", state=True, schema={"type": "integer"},
                        show=((15, "Lost", lambda task: str(task.lost) if task.lost else None),))
    depends_on: list[str] | None = _column(
        LIST_OR_NOTHING, None, schema={"type": "array", "items": {"type": "string"}},
        new={"type": ["array", "null"], "items": {"type": "string", "minLength": 1}},
        show=((21, "Depends on", lambda task: ", ".join(task.depends_on) or None),))  # type: ignore[arg-type]
    schedule: str | None = _column(TEXT, None, schema=NULLABLE, show=((13.5, "Schedule", _if_set("schedule")),))
    priority: int = _column(COUNT, 0, sql="NOT NULL DEFAULT 0", schema={"type": "integer"},
                            new={"type": ["integer", "null"], "minimum": -PRIORITY_MAX, "maximum": PRIORITY_MAX},
                            show=((8.1, "Priority", lambda task: f"{task.priority} (higher runs first)"),))
    unique_key: str | None = _column(TEXT, None, schema=NULLABLE, show=((8.2, "Unique key", _if_set("unique_key")),),
                                     new={"type": ["string", "null"], "minLength": 1, "maxLength": UNIQUE_KEY_MAX})
    expires_at: datetime | None = _column(EPOCH, None, schema={**NULLABLE, "format": "date-time"},
                                          new={**NULLABLE, "format": "date-time"},
                                          show=((13.1, "Expires", _if_set("expires_at", _rfc2822)),))
    progress: dict[str, Any] | None = _column(
        JSON_TEXT, None, state=True, show=((6.5, "Progress", _progress_shown),), schema={
            "type": ["object", "null"], "properties": {
                "fraction": {"type": "number", "minimum": 0, "maximum": 1}, "message": NULLABLE,
                "at": {"type": "string", "format": "date-time"}}})
    delay: InitVar[float | None] = None
    expires: InitVar[float | None] = None

    def __post_init__(self, delay: float | None, expires: float | None) -> None:
        # Every task is built here, on add and whenever one is read back (a worker's claim): the checks
        # skip what a value of the usual type, in range, already is (a None option, a float in range...).
        self.profile = validate_profile(self.profile)
        self.job = job_path(self.job)
        self.parameters = validate_parameters(self.parameters)
        self.tags = [] if self.tags is None else validate_tags(self.tags)
        if self.status.__class__ is not Status:
            self.status = Status(self.status)
        if not isinstance(self.identifier, str) or not self.identifier:
            raise ValidationError("Task identifier must be a non-empty string")
        self.depends_on = [] if self.depends_on is None else validate_dependencies(self.depends_on, self.identifier)
        if self.retries.__class__ is not int or not 0 <= self.retries <= RETRIES_MAX:
            self.retries = _integer_in(self.retries, 0, RETRIES_MAX, _RETRIES_MESSAGE)
        if self.retry_delay.__class__ is not float or not 0 <= self.retry_delay <= DURATION_MAX:
            self.retry_delay = _seconds("retry_delay", self.retry_delay)  # type: ignore[assignment]
        if self.timeout is not None:
            self.timeout = _seconds("timeout", self.timeout, allow_zero=False)
        if self.lease is not None:
            self.lease = _seconds("lease", self.lease, allow_zero=False)
        if delay is not None or self.run_at is not None:
            delay = _seconds("delay", delay)
            self.run_at = _moment(delay, self.run_at, "delay", "run_at")
            if delay is not None:
                self.__dict__["_delay"] = delay  # counted again from when the queue stores it
        self._check_scheduling(None if expires is None else _seconds("expires", expires, allow_zero=False))

    def _check_scheduling(self, expires: float | None) -> None:
        """The scheduling options: priority, unique_key, expires (seconds from when it is stored), expires_at."""
        if self.priority.__class__ is not int or not -PRIORITY_MAX <= self.priority <= PRIORITY_MAX:
            self.priority = _integer_in(self.priority, -PRIORITY_MAX, PRIORITY_MAX, _PRIORITY_MESSAGE)
        if self.unique_key is not None and (not isinstance(self.unique_key, str) or not self.unique_key
                                            or len(self.unique_key) > UNIQUE_KEY_MAX or not _is_text(self.unique_key)):
            raise ValidationError(f"unique_key must be a non-empty string of at most {UNIQUE_KEY_MAX} characters")
        if expires is not None or self.expires_at is not None:
            self.expires_at = _moment(expires, self.expires_at, "expires", "expires_at")
            if expires is not None:
                self.__dict__["_expires"] = expires

    @property
    def job_name(self) -> str:
        return job_name(self.job)

    @property
    def date(self) -> str:
        """The creation date in RFC 2822 form, as the seed's JSON shows it."""
        return _rfc2822(self.created_at)

    def get_parameter(self, name: str) -> Scalar:
        try:
            return self.parameters[name]  # type: ignore[index]
        except KeyError:
            raise ParameterNotFound(name) from None

    def has_parameter(self, name: str) -> bool:
        return name in self.parameters  # type: ignore[operator]

    def has_tag(self, tag: str) -> bool:
        return tag in self.tags  # type: ignore[operator]

    def set_progress(self, fraction: float, message: str | None = None) -> None:
        """Inside a job: how far it got, from 0 to 1, and what it does now; the worker stores it at once.

        A fraction outside 0..1 or a message that is not a string raises ValidationError (a ValueError).
        """
        self.progress = make_progress(fraction, message)
        report = self.__dict__.get("_report_progress")
        if report is not None:
            report(fraction, message)

    def to_json(self) -> dict[str, Any]:
        """The task as the API and ``--json`` show it: the seed's fields, then ours."""
        data: dict[str, Any] = {}
        for column in TASK_JSON_ORDER:
            data[column.name] = column.metadata["codec"].dump(getattr(self, column.name))
            data.update({name: getattr(self, name) for name in column.metadata["then"]})
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Task:
        """Build a task from its JSON form (``to_json``), validating every field."""
        if not isinstance(data, Mapping):
            raise ValidationError("A task must be a JSON object")
        values: dict[str, Any] = {}
        for column in TASK_FIELDS:
            if column.name not in data and _is_required(column):
                raise ValidationError(f"Missing {column.name}")
            value = data.get(column.name)
            if column.metadata["alias"]:
                value = value or data.get(column.metadata["alias"])
            if value is not None:
                values[column.name] = column.metadata["codec"].parse(value)
        return cls(**values)


TASK_FIELDS = dataclasses.fields(Task)
TASK_JSON_ORDER = sorted(TASK_FIELDS, key=lambda column: not column.metadata["first"])


_STORED_FIELDS = tuple((column.name, column.default, column.metadata["codec"].store)
                       for column in TASK_FIELDS if not column.metadata["state"])


def _encode_task(task: Task) -> dict[str, str]:
    """The storage form: text (JSON, epoch seconds), never pickle; Redis keeps it as it is, SQLite types
    each field for its column (``_sql_row``, the same rules in one pass).

    A field at its default, or stored as '' (no dependencies), is left out: the default is what a missing
    field reads back as, and a task most often has few options, so Redis decodes and stores less.
    """
    return {name: text for name, default, store in _STORED_FIELDS
            if (value := getattr(task, name)) is not None and value != default and (text := store(value))}


_LOADED_FIELDS = tuple((column.name, column.metadata["codec"].load) for column in TASK_FIELDS)


def _decode_task(stored: Mapping[str, Any]) -> Task:
    """Rebuild a stored task, validated as every task is; a missing or '' field takes its default."""
    return Task(**{name: load(value) for name, load in _LOADED_FIELDS
                   if (value := stored.get(name)) is not None and value != ""})


# -- Schedules: cron expressions and time zones --------------------------------

if TYPE_CHECKING:
    from datetime import tzinfo

# One row per field of a cron expression: name, lowest, highest, names (the first is `lowest`).
CRON_FIELDS = (
    ("minute", 0, 59, ()),
    ("hour", 0, 23, ()),
    ("day", 1, 31, ()),
    ("month", 1, 12, ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec")),
    ("weekday", 0, 7, ("sun", "mon", "tue", "wed", "thu", "fri", "sat")),
)
CRON_SHORTHANDS = {
    "@hourly": "0 * * * *", "@daily": "0 0 * * *", "@midnight": "0 0 * * *", "@weekly": "0 0 * * 0",
    "@monthly": "0 0 1 * *", "@yearly": "0 0 1 1 *", "@annually": "0 0 1 1 *",
}
_LONGEST_MONTH = (31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)
_GREGORIAN_CYCLE = 400  # years after which the calendar repeats, weekdays included


def _wall_clock_instant(local: datetime, where: tzinfo) -> datetime:
    """The UTC instant of a wall-clock time: its first occurrence, or the end of the gap it falls in."""
    while True:
        instant = local.replace(tzinfo=where, fold=0).astimezone(timezone.utc)
        if instant.astimezone(where).replace(tzinfo=None) == local:
            return instant
        local += timedelta(minutes=1)


def schedule_zone(name: str) -> tzinfo:
    """The IANA time zone `name` (a ``zoneinfo.ZoneInfo``); ``"UTC"`` works even without a zone database."""
    if name == "UTC":
        return timezone.utc
    import zoneinfo

    try:
        return zoneinfo.ZoneInfo(name)
    except (LookupError, ValueError, TypeError, OSError):
        pass
    try:
        zoneinfo.ZoneInfo("UTC")
    except LookupError:
        raise ValidationError(f'Time zone "{name}" needs a time zone database and this machine has none: '
                              "install the tzdata package (pip install tzdata)") from None
    raise ValidationError(f'Unknown time zone "{name}"')


def _cron_number(text: str, name: str, lowest: int, highest: int, names: tuple[str, ...]) -> int:
    allowed = f"{lowest}-{highest}" + (f" or {names[0]}-{names[-1]}" if names else "")
    if text.lower() in names:
        return lowest + names.index(text.lower())
    if not (text.isascii() and text.isdigit()):
        raise ValidationError(f'Cron field "{name}" allows {allowed}, not "{text}"')
    if not lowest <= int(text) <= highest:
        raise ValidationError(f'Cron field "{name}" allows {allowed}, not {int(text)}')
    return int(text)


def _cron_field(text: str, name: str, lowest: int, highest: int, names: tuple[str, ...]) -> frozenset[int]:
    """The values one field allows: a list of `*`, `N` or `N-M`, each with an optional `/STEP`.

    `N/STEP` runs from N to the field's highest value, as `*/STEP` runs from its lowest.
    """
    values: set[int] = set()
    for item in text.split(","):
        span, has_step, step = item.partition("/")
        if span == "*":
            start, end = lowest, highest
        else:
            first, has_end, last = span.partition("-")
            start = _cron_number(first, name, lowest, highest, names)
            end = _cron_number(last, name, lowest, highest, names) if has_end else highest if has_step else start
            if start > end:
                raise ValidationError(f'Cron field "{name}" has the range {span} backwards: write it low-high')
        if has_step and not (step.isascii() and step.isdigit() and int(step) > 0):
            raise ValidationError(f'Cron field "{name}" allows steps of 1 or more, not "{step}"')
        values.update(range(start, end + 1, int(step) if has_step else 1))
    return frozenset(value % 7 for value in values) if name == "weekday" else frozenset(values)


@dataclass(frozen=True)
class CronExpression:
    """A five-field cron expression (minute hour day month weekday) or an ``@`` shorthand, parsed once.

    Fields take ``*``, lists, ranges, steps and the names ``jan``-``dec`` and ``sun``-``sat``;
    weekday 0 and 7 are both Sunday. As in Vixie cron, when both day and weekday are restricted
    (neither starts with ``*``) a day matching either one matches; otherwise it must match both.
    """

    text: str
    allowed: Mapping[str, frozenset[int]] = field(init=False, repr=False, compare=False)
    day_or_weekday: bool = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.text, str):
            raise ValidationError("A cron expression is a string")
        text = self.text.strip()
        if text.startswith("@"):
            if text.lower() not in CRON_SHORTHANDS:
                raise ValidationError(f'Unknown cron shorthand "{text}": use one of {", ".join(CRON_SHORTHANDS)}')
            text = CRON_SHORTHANDS[text.lower()]
        parts = text.split()
        if len(parts) != len(CRON_FIELDS):
            raise ValidationError(
                f"A cron expression has five fields (minute hour day month weekday), not {len(parts)}")
        allowed = {row[0]: _cron_field(part, *row) for part, row in zip(parts, CRON_FIELDS)}
        object.__setattr__(self, "allowed", allowed)
        object.__setattr__(self, "day_or_weekday", not parts[2].startswith("*") and not parts[4].startswith("*"))
        if not self.day_or_weekday and not any(day <= _LONGEST_MONTH[month - 1]
                                               for month in allowed["month"] for day in allowed["day"]):
            raise ValidationError(f'Cron expression "{self.text}" never matches: '
                                  'no month in field "month" has a day in field "day"')

    def _matches_day(self, moment: datetime) -> bool:
        in_month = moment.day in self.allowed["day"]
        in_week = moment.isoweekday() % 7 in self.allowed["weekday"]
        return in_month or in_week if self.day_or_weekday else in_month and in_week

    def _next_local(self, local: datetime, before_year: int) -> datetime | None:
        """The first matching wall-clock minute from `local` on, skipping whole months, days and hours."""
        while local.year < before_year:
            if local.month not in self.allowed["month"]:
                local = datetime(local.year + local.month // 12, local.month % 12 + 1, 1)
            elif not self._matches_day(local):
                local = datetime(local.year, local.month, local.day) + timedelta(days=1)
            elif local.hour not in self.allowed["hour"]:
                local = local.replace(minute=0) + timedelta(hours=1)
            elif local.minute not in self.allowed["minute"]:
                local += timedelta(minutes=1)
            else:
                return local
        return None

    def next_after(self, moment: datetime, zone: str = "UTC") -> datetime:
        """The first matching minute strictly after `moment`, read on the clocks of `zone`, in UTC.

        A wall-clock time that the clocks skip (spring forward) runs once, at the end of the gap;
        one they show twice (fall back) runs once, at its first occurrence. A naive `moment` is UTC.
        """
        where = schedule_zone(zone)
        moment = _parse_datetime(moment)  # type: ignore[assignment]
        local = moment.astimezone(where).replace(tzinfo=None, second=0, microsecond=0, fold=0)
        local += timedelta(minutes=1)
        before_year = min(local.year + _GREGORIAN_CYCLE, 9999)
        while (found := self._next_local(local, before_year)) is not None:
            instant = _wall_clock_instant(found, where)
            if instant > moment:
                return instant
            local = found + timedelta(minutes=1)  # the second pass of an hour the clocks repeat
        raise ValidationError(f'Cron expression "{self.text}" never matches after {moment.isoformat()}')


# -- Schedules: periodic tasks -------------------------------------------------

SCHEDULE_NAME_PATTERN = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.:-]{0,127}")
SCHEDULE_NAME_MESSAGE = ('A schedule name is 1 to 128 letters, digits, "_", "-", "." or ":", starting with a letter,'
                         ' a digit or "_"')
# Task arguments that are not a schedule's options: what it states anyway, what a queue or a worker fills in,
# and what would pin every run to one moment or one task (when it runs: the schedule says; an absolute expiry,
# where ``expires`` in seconds suits a recurring task; dependencies on given tasks).
_NOT_SCHEDULE_OPTIONS = frozenset({"profile", "job", "parameters", "tags", "identifier", "created_at", "schedule",
                                   "delay", "run_at", "expires_at", "depends_on", "progress"})


@functools.cache
def schedule_options() -> tuple[str, ...]:
    """The Task keyword arguments a Schedule passes on to each of its tasks (retries, timeout, lease...)."""
    import inspect

    state = {column.name for column in TASK_FIELDS if column.metadata["state"]}
    return tuple(name for name in inspect.signature(Task).parameters if name not in _NOT_SCHEDULE_OPTIONS | state)


class Schedule:
    """A task added again and again: at each minute a ``cron`` expression matches on the clocks of
    ``timezone``, or ``every`` so many seconds (at least 1); exactly one of the two.

    The other arguments are Task's, task options included (``retries``, ``timeout``, ``lease``...): each
    task the schedule adds is built from them and carries the schedule's name in its ``schedule`` field.
    A queue keeps schedules (``queue.add_schedule``); those it returns have ``next_run_at`` and
    ``last_run_at`` set, and ``revision``, which changes each time the schedule is added again.
    """

    def __init__(self, name: str, profile: str, job: Any, parameters: Mapping[str, Scalar] | None = None,
                 tags: Sequence[str] | None = None, *, cron: str | None = None, every: float | None = None,
                 timezone: str = "UTC", **options: Any):
        if not isinstance(name, str) or not SCHEDULE_NAME_PATTERN.fullmatch(name):
            raise ValidationError(SCHEDULE_NAME_MESSAGE)
        if (cron is None) == (every is None):
            raise ValidationError("A schedule needs either cron or every, not both")
        unknown = sorted(set(options) - set(schedule_options()))
        if unknown:
            raise ValidationError(f'Unknown task option "{unknown[0]}": a schedule takes '
                                  f'{", ".join(schedule_options())}')
        probe = Task(profile, job, parameters, tags, **options)
        try:
            json.dumps(options, allow_nan=False)
        except (TypeError, ValueError):
            raise ValidationError("A schedule's task options must be JSON values (numbers, text, null)") from None
        self.name = name
        self.profile, self.job, self.parameters, self.tags = probe.profile, probe.job, probe.parameters, probe.tags
        self.cron: str | None = None
        self.every: float | None = None
        if cron is not None:
            try:
                self._expression = CronExpression(cron)
            except ValidationError as error:
                raise ValidationError(f"cron: {error}") from None
            self.cron = cron.strip()
        else:
            if isinstance(every, bool) or not isinstance(every, (int, float)) or not 1 <= every <= DURATION_MAX:
                raise ValidationError(f"every must be a number of seconds from 1 to {DURATION_MAX:.0f}")
            self.every = int(every) if float(every).is_integer() else float(every)
        if not isinstance(timezone, str):
            raise ValidationError('timezone must be a time zone name such as "Europe/Paris"')
        schedule_zone(timezone)
        self.timezone = timezone
        self.options = dict(options)
        self.next_run_at: datetime | None = None
        self.last_run_at: datetime | None = None
        self.revision = ""

    def __repr__(self) -> str:
        when = f"cron={self.cron!r}" if self.cron is not None else f"every={self.every!r}"
        return f"<Schedule {self.name!r} {self.profile} {self.job} {when} {self.timezone}>"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Schedule) and self.to_json() == other.to_json()

    def first_run(self, now: float) -> float:
        """When a schedule added at ``now`` (epoch seconds) runs first: a period later, or the next matching minute."""
        if self.every is not None:
            return now + self.every
        return self._expression.next_after(_from_timestamp(now), self.timezone).timestamp()  # type: ignore[arg-type]

    def run_after(self, due: float, now: float) -> float:
        """The run after the one due at ``due``, later than ``now``: runs missed meanwhile are skipped."""
        if self.cron is not None:
            return self._expression.next_after(_from_timestamp(max(due, now)), self.timezone).timestamp()  # type: ignore[arg-type]
        following = due + self.every * (math.floor((now - due) / self.every) + 1)  # type: ignore[operator]
        return following if following > now else following + self.every  # type: ignore[operator]

    def task(self, due: float) -> Task:
        """The task of the run due at ``due``; its identifier is the same whoever builds it, so the queue
        refuses a second copy of one run."""
        digest = hashlib.sha256(f"jobqueue:schedule:{self.revision}:{due!r}".encode()).digest()
        identifier = str(uuid.UUID(bytes=digest[:16], version=4))
        return Task(self.profile, self.job, self.parameters, self.tags, identifier=identifier, schedule=self.name,
                    **self.options)

    def to_json(self) -> dict[str, Any]:
        """The schedule as the API and ``--json`` show it; times are ISO 8601 or null."""
        data: dict[str, Any] = {"name": self.name, "profile": self.profile, "job": self.job,
                                "parameters": dict(self.parameters or {}), "tags": list(self.tags or ())}
        data.update({"cron": self.cron} if self.cron is not None else {"every": self.every})
        data.update(timezone=self.timezone, **self.options)
        data.update(next_run_at=_iso(self.next_run_at), last_run_at=_iso(self.last_run_at))
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Schedule:
        """A schedule from its JSON form (``to_json``), validated; ``next_run_at`` and ``last_run_at`` are read."""
        if not isinstance(data, Mapping):
            raise ValidationError("A schedule must be a JSON object")
        values = {key: value for key, value in data.items()
                  if value is not None and key not in ("next_run_at", "last_run_at", "revision")}
        for key in ("name", "profile", "job"):
            if values.get(key) in (None, ""):
                raise ValidationError(f"Missing {key}")
        schedule = cls(**values)
        schedule.next_run_at = _parse_datetime(data.get("next_run_at"))
        schedule.last_run_at = _parse_datetime(data.get("last_run_at"))
        schedule.revision = str(data.get("revision") or "")
        return schedule

    def stored(self) -> str:
        """The definition both backends keep (JSON, with the revision; the times are kept beside it)."""
        return json.dumps({**self.to_json(), "next_run_at": None, "last_run_at": None, "revision": self.revision})


# == Events ==================================================================

WORKER_START = "worker.start"
WORKER_FINISHED = "worker.finished"
TASK_FETCHED = "task.fetched"
TASK_EXECUTED = "task.executed"
TASK_FAILED = "task.failed"
TASK_RETRIED = "task.retried"
TASK_RECOVERED = "task.recovered"


@dataclass
class WorkerEvent:
    """``worker.start`` and ``worker.finished``: ``event.worker`` is the Worker."""

    name: str
    worker: Any


@dataclass
class TaskEvent:
    """``task.fetched``, ``task.executed``, ``task.failed``, ``task.retried`` and ``task.recovered``."""

    name: str
    task: Task
    worker: Any = None


class EventDispatcher:
    """Listeners by event name; higher ``priority`` first, then in the order added.

    A listener that raises is logged and skipped: an event never stops a worker.
    """

    def __init__(self) -> None:
        self._listeners: dict[str, list[tuple]] = {}
        self._order = itertools.count()

    def add_listener(self, name: str, listener: Callable[[Any], Any], priority: int = 0) -> None:
        entries = self._listeners.setdefault(name, [])
        entries.append((-priority, next(self._order), listener))
        entries.sort(key=lambda entry: entry[:2])

    def remove_listener(self, name: str, listener: Callable[[Any], Any]) -> None:
        entries = self._listeners.get(name, [])
        entries[:] = [entry for entry in entries if entry[2] != listener]

    def listeners(self, name: str) -> list[Callable[[Any], Any]]:
        return [entry[2] for entry in self._listeners.get(name, [])]

    def dispatch(self, name: str, event: Any = None) -> Any:
        for listener in self.listeners(name):
            try:
                listener(event)
            except Exception:
                logger.exception('A listener of "%s" raised; carrying on', name)
        return event


# == Queue ===================================================================


@dataclass(frozen=True)
class Filter:
    """What ``search`` and ``count`` select, validated once for both backends."""

    profile: str | None = None
    status: Status | None = None
    tags: tuple = ()
    order: str = "status"
    limit: int | None = None
    offset: int = 0


def _build_filter(profile, status, tags, order="status", limit=None, offset=0) -> Filter:
    if order not in ORDERS:
        raise ValidationError(f'Impossible to order by "{order}"')
    for name, value in (("limit", limit), ("offset", offset)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
            raise ValidationError(f"{name} must be a whole number, 0 or more")
    return Filter(
        profile=None if profile is None else validate_profile(profile),
        status=None if status is None else Status(status),
        tags=tuple(validate_tags(tags)),
        order=order,
        limit=limit,
        offset=offset or 0,
    )


def _check_no_cycle(tasks: Sequence[Task]) -> None:
    """Tasks of one batch that depend on each other in a circle could never run: refuse them."""
    batch = {task.identifier: task for task in tasks if task.depends_on}
    done: set[str] = set()
    for start in batch:
        path, stack = set(), [(start, False)]
        while stack:
            identifier, leaving = stack.pop()
            if leaving:
                path.discard(identifier)
                done.add(identifier)
                continue
            if identifier in path:
                raise ValidationError(f"Task {identifier} depends on itself through other tasks of the batch")
            if identifier in done or identifier not in batch:
                continue
            path.add(identifier)
            stack.append((identifier, True))
            stack.extend((dependency, False) for dependency in batch[identifier].depends_on)  # type: ignore[union-attr]


def _default_worker_name() -> str:
    return f"{socket.gethostname().split('.')[0]}-{os.getpid()}"


class Queue:
    """The contract every backend keeps; the public methods validate, the ``_hooks`` store.

    - ``add(*tasks)``: enqueue as ``waiting``, FIFO per profile, one round trip per
      call. A task with a future ``run_at`` waits in a delayed set until then,
      and joins the back of its profile's queue when due, in ``run_at`` order.
      Returns the stored tasks in the given order: for a task whose
      ``unique_key`` a waiting or running task of its profile holds, nothing is
      stored and that task comes back instead.
    - ``fetch(profile, timeout=None, worker=None, lease=30)``: claim the next
      ready task of the profile, highest ``priority`` first, oldest first among
      equals: it becomes ``running`` under a lease held by ``worker`` for
      ``lease`` seconds (the task's own ``lease`` wins). Blocks up to ``timeout``
      seconds (forever if None); None on timeout. One task, one worker. With a
      list of profiles, the first of them that has a ready task gives it. A
      task whose ``expires_at`` passed before it ever started is failed on the
      way (``Expired before it started``), never handed out. The profile's
      limits hold every task back while they are reached.
    - ``fetch_many(profile, count, timeout=None, worker=None, lease=30)``: the
      same, up to ``count`` tasks in one round trip (a worker's prefetch), each
      under its own lease; an empty list on timeout.
    - ``set_limits(profile, concurrency=None, rate=None)``, ``limits(profile)``:
      at most ``concurrency`` tasks of the profile running at once, at most
      ``rate`` (``"10/s"``, ``"600/m"``, ``"1000/h"``) started in any window of
      that period; decided where tasks are claimed, atomically.
    - ``renew(task, lease)``: extend the lease of a task its worker still holds.
    - ``complete(task)``: record how a run ended: ``finished`` (with result),
      ``failed`` (with error), or ``waiting`` with ``run_at`` (a retry later).
      Fenced by ``attempts``: False, and nothing written, if the task is no
      longer held by that run (recovered, restored, edited or deleted meanwhile).
    - ``complete_many(tasks, fetch=0, worker=None, lease=30, profiles=None)``:
      ``complete`` each task, in order, then a non-blocking ``fetch_many`` of up
      to ``fetch`` tasks of ``profiles`` (default: the first task's), in one
      round trip per profile; returns (recorded, one bool a task; the tasks
      claimed). What keeps a busy worker fast.
    - ``complete_and_fetch(task, worker, lease)``: ``complete_many`` of one task
      and one fetch; returns (recorded, the next task or None).
    - ``give_back(tasks)``: runs claimed and never started go back to waiting
      as they were (first in their queue, in the given order, the attempt not
      counted, their expiry kept); one bool a task: False if that run no longer
      held it.
    - ``recover(max_lost=3)``: tasks whose lease expired go back to waiting at
      the head of their queue, ``lost`` counting it, or fail once lost
      ``max_lost`` times. Returns them. Waiting tasks past their ``expires_at``
      fail here too, even with no worker fetching their profile.
    - ``find(identifier)``: the task, or TaskNotFound.
    - ``update_status(task, status)``: move a task by hand; ``running`` is refused;
      back to ``waiting`` re-enqueues it at the back of its profile, counters reset.
    - ``retry(identifier)``: a failed task back to waiting, counters reset.
    - ``wait(identifier, timeout=None)``: the task once it is finished or failed;
      TimeoutError after ``timeout`` seconds. Redis tells waiters when a task
      ends (within 50 ms); SQLite is polled (within 200 ms).
    - ``cancel(identifier)``: a waiting or running task ends failed with the
      error ``Cancelled`` and is never retried; TaskConflict if it had ended.
    - ``cancelled(tasks)``: which of these runs were cancelled since they were
      fetched, so their worker interrupts them; ``gone(tasks)``: which no
      longer hold their task at all (cancelled, recovered, restored, changed by
      hand or deleted), so their worker never starts them.
    - ``set_progress(task, fraction, message=None)``: store a run's progress.
    - ``search(...)`` and ``count(...)``: tasks matching every filter given
      (``tags``: at least one of them), served from indexes.
    - ``delete(identifier)``, ``flush()``: remove one task, or all of this queue's data.
    - ``purge(older_than, status=None)``: delete finished and failed tasks (or
      those of ``status``) that ended more than ``older_than`` seconds ago.
    - ``restore(include_leased=True)``: every task not finished goes back to
      ``waiting``; with ``include_leased=False``, running tasks whose lease is
      still live are left to their workers.
    - ``stats()``: ``{profile: {status: count}}``, all four statuses present.
    - Dependencies: a task with ``depends_on`` stays ``waiting``, out of its
      profile's ready queue, until every task it names is ``finished``; it is
      released in the step that records the last finish. A dependency that
      fails for good or is deleted fails it (``Dependency <id> failed`` or
      ``was deleted``), and so on down the line. An unknown identifier is a
      ValidationError at ``add``; a batch may hold a task and its dependencies
      in any order. A task put back to waiting by hand (``retry``,
      ``restore``, ``update_status``) no longer waits for its dependencies.
    - ``completed()``: ``{profile: {"finished": n, "failed": n}}``, how many runs
      workers completed since the queue began (or was flushed); counters, so
      deleting tasks does not lower them.
    - ``add_schedule(schedule)``, ``schedules()``, ``remove_schedule(name)``: keep
      periodic tasks by name (adding one of a name replaces it); ``flush`` leaves them.
    - ``run_schedules(now=None)``: add the task of each schedule that is due and
      move its next run on, the two together: callers at once add each run once,
      and runs missed meanwhile (nothing ran) give one task. Returns the tasks added.

    Every state change is one atomic step in the backend. Driver errors come
    out as BackendUnavailable, with the driver's exception as the cause.
    ``clock`` (epoch seconds) is injectable so tests can move time.
    """

    clock: Callable[[], float] = staticmethod(time.time)

    def add(self, *tasks: Task) -> list[Task]:
        if not tasks:
            return []
        dependent = False
        for task in tasks:
            if not isinstance(task, Task):
                raise ValidationError(f"Only Task objects can be added, not {type(task).__name__}")
            dependent = dependent or bool(task.depends_on)
        if len(tasks) > 1 and len({task.identifier for task in tasks}) != len(tasks):
            raise ValidationError("The same task is added twice")
        if dependent:
            _check_no_cycle(tasks)
        for task in tasks:
            task.status, task.attempts, task.failures, task.lost, task.worker = Status.WAITING, 0, 0, 0, None
            task.started_at = task.finished_at = task.error = task.result = task.progress = None
        with self._errors():
            now = self.clock()
            for task in tasks:
                if "_delay" in task.__dict__:
                    task.run_at = _from_timestamp(now + task.__dict__.pop("_delay"))
                if "_expires" in task.__dict__:
                    task.expires_at = _from_timestamp(now + task.__dict__.pop("_expires"))
            existing = self._add(tasks, now)
            if dependent:
                self._as_stored([task for index, task in enumerate(tasks) if task.depends_on and index not in existing])
        if not existing:
            return list(tasks)
        return [existing.get(index, task) for index, task in enumerate(tasks)]

    def _as_stored(self, tasks: list[Task]) -> None:
        """What adding decided for tasks with dependencies: failed at once (one failed), or waiting for
        the task that holds a unique key in place of a redundant one of the batch. One read for them all."""
        for task, stored in zip(tasks, self._read_back(tasks)):
            if stored is not None:
                task.status, task.error, task.finished_at = stored.status, stored.error, stored.finished_at
                task.depends_on = stored.depends_on

    def _read_back(self, tasks: list[Task]) -> list[Task | None]:
        """The stored form of tasks just added (their profile known), in their order."""
        raise NotImplementedError

    def chain(self, *tasks: Task) -> list[Task]:
        """Add the tasks in one batch, each depending on the one before: they run in this order."""
        for before, task in zip(tasks, tasks[1:]):
            if isinstance(before, Task) and isinstance(task, Task) and before.identifier not in task.depends_on:
                task.depends_on = [*task.depends_on, before.identifier]  # type: ignore[misc]
        return self.add(*tasks)

    def fetch(
        self, profile: str | Sequence[str], timeout: float | None = None, worker: str | None = None,
        lease: float = DEFAULT_LEASE
    ) -> Task | None:
        claimed = self.fetch_many(profile, 1, timeout, worker, lease)
        return claimed[0] if claimed else None

    def fetch_many(
        self, profile: str | Sequence[str], count: int, timeout: float | None = None, worker: str | None = None,
        lease: float = DEFAULT_LEASE
    ) -> list[Task]:
        profiles = _profiles(profile)
        count = _integer_in(count, 1, MAX_FETCH, f"count must be a whole number from 1 to {MAX_FETCH}")
        if timeout is not None and timeout < 0:
            raise ValidationError("timeout must be 0 or more seconds")
        _seconds("lease", lease, allow_zero=False)
        with self._errors():
            return self._fetch(profiles, timeout, worker or _default_worker_name(), float(lease), count)

    def set_limits(self, profile: str, concurrency: int | None = None, rate: str | None = None) -> dict[str, Any]:
        """Set both limits of a profile (None lifts one); return them as ``limits`` shows them."""
        validate_profile(profile)
        if concurrency is not None:
            concurrency = _integer_in(concurrency, 1, RETRIES_MAX,
                                      f"concurrency must be a whole number from 1 to {RETRIES_MAX}, or null")
        parsed = None if rate is None else parse_rate(rate)
        with self._errors():
            self._set_limits(profile, concurrency, parsed)
        return self.limits(profile)

    def limits(self, profile: str) -> dict[str, Any]:
        """``{"concurrency": n or None, "rate": "10/s" or None}``."""
        validate_profile(profile)
        with self._errors():
            return _limits_shown_as_json(*self._limits(profile))

    def all_limits(self) -> dict[str, dict[str, Any]]:
        """The limits of every profile that has some, as ``limits`` shows them, in one read."""
        with self._errors():
            return {profile: _limits_shown_as_json(*limits) for profile, limits in sorted(self._all_limits().items())
                    if any(limit is not None for limit in limits)}

    def renew(self, task: Task, lease: float = DEFAULT_LEASE) -> bool:
        with self._errors():
            return self._renew(task, self.clock() + (task.lease or lease))

    def complete(self, task: Task) -> bool:
        return self.complete_many([task])[0][0]

    def complete_many(self, tasks: Sequence[Task], fetch: int = 0, worker: str | None = None,
                      lease: float = DEFAULT_LEASE, profiles: str | Sequence[str] | None = None) -> tuple:
        for task in tasks:
            self._check_outcome(task)
        fetch = _integer_in(fetch, 0, MAX_FETCH, f"fetch must be a whole number from 0 to {MAX_FETCH}")
        if profiles:
            chosen = _profiles(profiles)
        elif tasks:
            chosen = [tasks[0].profile]
        elif fetch:
            raise ValidationError("complete_many needs profiles to fetch from when it is given no task")
        else:
            return [], []
        worker = worker or _default_worker_name()
        with self._errors():
            recorded, claimed = self._complete_many(tasks, worker, float(lease), fetch, chosen[0] if fetch else None)
            if fetch and not claimed and len(chosen) > 1:
                claimed = self._fetch(chosen[1:], 0, worker, float(lease), fetch)
            return recorded, claimed

    def complete_and_fetch(self, task: Task, worker: str, lease: float = DEFAULT_LEASE,
                           profiles: Sequence[str] | None = None) -> tuple:
        recorded, claimed = self.complete_many([task], 1, worker, lease, profiles)
        return recorded[0], claimed[0] if claimed else None

    def give_back(self, tasks: Sequence[Task]) -> list[bool]:
        if not tasks:
            return []
        with self._errors():
            return self._give_back(tasks, self.clock())

    def _check_outcome(self, task: Task) -> None:
        if task.status is Status.RUNNING or (task.status is Status.WAITING and task.run_at is None):
            raise ValidationError("A run completes as finished, failed, or waiting with a run_at (a retry)")
        if task.finished_at is None and task.status is not Status.WAITING:
            task.finished_at = _from_timestamp(self.clock())

    def recover(self, max_lost: int = DEFAULT_MAX_LOST) -> list[Task]:
        with self._errors():
            return self._recover(self.clock(), max_lost)

    def find(self, identifier: str) -> Task:
        with self._errors():
            task = self._find(str(identifier))
        if task is None:
            raise TaskNotFound(identifier)
        return task

    def update_status(self, task: Task | str, status: Status | str) -> Task:
        status = Status(status)
        if status is Status.RUNNING:
            raise ValidationError('A task can not be marked as "running"')
        return self._change(task, status, only_failed=False)

    def retry(self, task: Task | str) -> Task:
        """Put a failed task back to waiting; TaskConflict (a ValidationError) if it is not failed."""
        return self._change(task, Status.WAITING, only_failed=True)

    def wait(self, identifier: str, timeout: float | None = None) -> Task:
        """The task once it is finished or failed (at once if it is); TimeoutError after ``timeout`` seconds."""
        timeout = _seconds("timeout", timeout)
        identifier = str(identifier)
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._errors():
            task = self._wait(identifier, deadline)
        if task is None:
            raise TaskNotFound(identifier)
        if task.status not in ENDED_STATUSES:
            raise TimeoutError(f"Task {identifier} is still {task.status.value} after {timeout:g} s")
        return task

    def cancel(self, task: Task | str) -> Task:
        """End a waiting or running task as failed with the error ``Cancelled``; it is never retried.

        A running task's worker learns of it within a second and interrupts the
        job. A task that has ended is left as it is: TaskConflict.
        """
        identifier = task.identifier if isinstance(task, Task) else str(task)
        with self._errors():
            cancelled = self._cancel(identifier, self.clock())
        if cancelled is None:
            raise TaskNotFound(identifier)
        return cancelled

    def cancelled(self, tasks: Sequence[Task]) -> set[str]:
        """The identifiers of those runs (tasks as their worker fetched them) that were cancelled since."""
        return {task.identifier for task, (status, attempts, error) in zip(tasks, self._states(tasks))
                if status == Status.FAILED.value and error == CANCELLED and attempts == str(task.attempts)}

    def gone(self, tasks: Sequence[Task]) -> set[str]:
        """The identifiers of those runs that no longer hold their task (the run is not the task's current one)."""
        return {task.identifier for task, (status, attempts, _) in zip(tasks, self._states(tasks))
                if status != Status.RUNNING.value or attempts != str(task.attempts)}

    def _states(self, tasks: Sequence[Task]) -> list[tuple]:
        if not tasks:
            return []
        with self._errors():
            return [(status, None if attempts is None else str(attempts), error)
                    for status, attempts, error in self._run_states(tasks)]

    def set_progress(self, task: Task, fraction: float, message: str | None = None) -> bool:
        """Store how far a run got (``task`` as its worker fetched it); False if that run no longer holds it."""
        progress = make_progress(fraction, message, self.clock())
        with self._errors():
            stored = self._set_progress(task, json.dumps(progress))
        task.progress = progress
        return stored

    def _change(self, task: Task | str, status: Status, only_failed: bool) -> Task:
        identifier = task.identifier if isinstance(task, Task) else str(task)
        with self._errors():
            updated = self._update_status(identifier, status, self.clock(), only_failed)
        if updated is None:
            raise TaskNotFound(identifier)
        if isinstance(task, Task):
            task.__dict__.update(updated.__dict__)
        return updated

    def search(
        self,
        profile: str | None = None,
        status: Status | str | None = None,
        tags: Iterable[str] = (),
        order: str = "status",
        limit: int | None = None,
        offset: int = 0,
    ) -> list[Task]:
        query = _build_filter(profile, status, tags, order, limit, offset)
        if query.limit == 0:
            return []
        with self._errors():
            return self._search(query)

    def count(
        self,
        profile: str | None = None,
        status: Status | str | None = None,
        tags: Iterable[str] = (),
    ) -> int:
        with self._errors():
            return self._count(_build_filter(profile, status, tags))

    def delete(self, identifier: str) -> None:
        with self._errors():
            deleted = self._delete(str(identifier))
        if not deleted:
            raise TaskNotFound(identifier)

    def purge(self, older_than: float, status: Status | str | None = None) -> int:
        """Delete ended tasks (finished and failed, or ``status``) older than ``older_than`` seconds."""
        older_than = _seconds("older_than", older_than)  # type: ignore[assignment]
        statuses = (Status.FINISHED, Status.FAILED) if status is None else (Status(status),)
        if not set(statuses) <= {Status.FINISHED, Status.FAILED}:
            raise ValidationError("purge deletes finished or failed tasks only")
        with self._errors():
            return self._purge(self.clock() - older_than, statuses)

    def flush(self) -> int:
        """Remove every task of this queue; return how many there were."""
        with self._errors():
            return self._flush()

    def restore(self, include_leased: bool = True) -> int:
        """Put tasks that are not finished back to waiting; return how many moved."""
        with self._errors():
            return self._restore(self.clock(), include_leased)

    def stats(self) -> dict[str, dict[str, int]]:
        with self._errors():
            counts = self._stats()
        table: dict[str, dict[str, int]] = {}
        for (profile, status), number in sorted(counts.items()):
            table.setdefault(profile, {s.value: 0 for s in Status})[status] = number
        return table

    def completed(self) -> dict[str, dict[str, int]]:
        with self._errors():
            counts = self._completed()
        table: dict[str, dict[str, int]] = {}
        for (profile, outcome), number in sorted(counts.items()):
            table.setdefault(profile, {"finished": 0, "failed": 0})[outcome] = number
        return table

    def add_schedule(self, schedule: Schedule) -> Schedule:
        """Keep ``schedule`` (replacing one of its name); it runs first one period from now, or at its
        next matching minute. Returns it with ``next_run_at`` set."""
        if not isinstance(schedule, Schedule):
            raise ValidationError(f"Only Schedule objects can be added, not {type(schedule).__name__}")
        with self._errors():
            now = self.clock()
            schedule.revision, schedule.last_run_at = uuid.uuid4().hex, None
            first = schedule.first_run(now)
            schedule.next_run_at = _from_timestamp(first)
            self._put_schedule(schedule, first, now)
        return schedule

    def schedules(self) -> list[Schedule]:
        """Every schedule, by name, with its ``next_run_at`` and ``last_run_at``."""
        with self._errors():
            return sorted(self._schedules(), key=lambda schedule: schedule.name)

    def remove_schedule(self, name: str) -> None:
        with self._errors():
            removed = isinstance(name, str) and self._remove_schedule(name)
        if not removed:
            raise ScheduleNotFound(name)

    def run_schedules(self, now: datetime | float | None = None) -> list[Task]:
        """Add the task of every schedule due at ``now`` (default: the queue's clock); return them.

        ``now`` is epoch seconds or a datetime; a datetime holds microseconds only, so it counts up to the end
        of its microsecond: ``now=schedule.next_run_at`` finds the schedule due.
        """
        with self._errors():
            if isinstance(now, datetime):
                now = _parse_datetime(now).timestamp() + 1e-6  # type: ignore[union-attr]
            return self._run_schedules(self.clock() if now is None else float(now))

    def _stored_schedule(self, definition: Any, next_run_at: Any, last_run_at: Any) -> Schedule:
        schedule = Schedule.from_json(json.loads(definition))
        schedule.next_run_at, schedule.last_run_at = _from_timestamp(next_run_at), _from_timestamp(last_run_at)
        return schedule

    def ping(self) -> None:
        """Raise BackendUnavailable unless the backend answers."""
        with self._errors():
            self._ping()

    def close(self) -> None:
        """Release connections; the queue reconnects if used again."""

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.describe()}>"

    def describe(self) -> str:
        """Where the data lives, for messages (no password)."""
        raise NotImplementedError

    @contextlib.contextmanager
    def _errors(self) -> Iterator[None]:
        yield

    def _add(self, tasks: Sequence[Task], now: float) -> dict[int, Task]:
        """Store the tasks; return, by position, the existing task each one a unique_key made redundant."""
        raise NotImplementedError

    def _fetch(self, profiles: list[str], timeout: float | None, worker: str, lease: float,
               count: int = 1) -> list[Task]:
        """Claim up to ``count`` ready tasks of the first of ``profiles`` that has one; wait up to ``timeout``
        (None: for ever) for one."""
        raise NotImplementedError

    def _set_limits(self, profile: str, concurrency: int | None, rate: tuple | None) -> None:
        raise NotImplementedError

    def _limits(self, profile: str) -> tuple:
        """(concurrency or None, (count, period seconds) or None)."""
        raise NotImplementedError

    def _all_limits(self) -> dict[str, tuple]:
        """``_limits`` of every profile that may have some."""
        raise NotImplementedError

    def _renew(self, task: Task, until: float) -> bool:
        raise NotImplementedError

    def _complete_many(self, tasks: Sequence[Task], worker: str, lease: float, count: int,
                       profile: str | None) -> tuple:
        """Record each outcome, then claim up to ``count`` ready tasks of ``profile`` (without waiting)."""
        raise NotImplementedError

    def _recover(self, now: float, max_lost: int) -> list[Task]:
        raise NotImplementedError

    def _find(self, identifier: str) -> Task | None:
        raise NotImplementedError

    def _update_status(self, identifier: str, status: Status, now: float, only_failed: bool) -> Task | None:
        """Move the task (only a failed one if ``only_failed``); return it as it now is, or None."""
        raise NotImplementedError

    def _wait(self, identifier: str, deadline: float | None) -> Task | None:
        """The task once it ended, else as it is at the deadline; None if there is none. Here: polled."""
        pause = 0.005
        while True:
            task = self._find(identifier)
            remaining = _remaining(deadline)
            if task is None or task.status in ENDED_STATUSES or remaining == 0:
                return task
            time.sleep(pause if remaining is None else min(pause, remaining))
            pause = min(pause * 2, 0.1)

    def _cancel(self, identifier: str, now: float) -> Task | None:
        """Cancel the task (TaskConflict if it ended); return it as it now is, or None if there is none."""
        raise NotImplementedError

    def _run_states(self, tasks: Sequence[Task]) -> list[tuple]:
        """(status, attempts, error) of each task as stored now; Nones for a task that is gone."""
        raise NotImplementedError

    def _give_back(self, tasks: Sequence[Task], now: float) -> list[bool]:
        raise NotImplementedError

    def _set_progress(self, task: Task, progress: str) -> bool:
        raise NotImplementedError

    def _search(self, query: Filter) -> list[Task]:
        raise NotImplementedError

    def _count(self, query: Filter) -> int:
        raise NotImplementedError

    def _delete(self, identifier: str) -> bool:
        raise NotImplementedError

    def _purge(self, ended_before: float, statuses: tuple) -> int:
        raise NotImplementedError

    def _flush(self) -> int:
        raise NotImplementedError

    def _restore(self, now: float, include_leased: bool) -> int:
        raise NotImplementedError

    def _stats(self) -> dict[tuple, int]:
        raise NotImplementedError

    def _completed(self) -> dict[tuple, int]:
        raise NotImplementedError

    def _ping(self) -> None:
        raise NotImplementedError

    def _put_schedule(self, schedule: Schedule, first: float, now: float) -> None:
        raise NotImplementedError

    def _schedules(self) -> list[Schedule]:
        raise NotImplementedError

    def _remove_schedule(self, name: str) -> bool:
        raise NotImplementedError

    def _run_schedules(self, now: float) -> list[Task]:
        return []  # a backend that keeps no schedules has none due


def _profiles(profile: str | Sequence[str]) -> list[str]:
    """One profile or several, in the order a worker prefers them (``"high,default"`` works too)."""
    names = profile.split(",") if isinstance(profile, str) else list(profile)
    if not names or len(set(names)) != len(names):
        raise ValidationError("Profiles must be one or more different names")
    return [validate_profile(name) for name in names]


RATE_PATTERN = re.compile(r"([1-9][0-9]{0,8})/([smh])")


def parse_rate(text: object) -> tuple[int, float]:
    """(count, period in seconds) from ``"10/s"``, ``"600/m"`` or ``"1000/h"``."""
    match = RATE_PATTERN.fullmatch(text.strip()) if isinstance(text, str) else None
    if match is None:
        raise ValidationError(f'rate must be N/s, N/m or N/h with N a whole number of 1 or more (such as "10/s"),'
                              f" not {json.dumps(text) if isinstance(text, str) else type(text).__name__}")
    return int(match[1]), RATE_PERIODS[match[2]]


def format_rate(count: int, period: float) -> str:
    return f"{count}/{next(unit for unit, seconds in RATE_PERIODS.items() if seconds == period)}"


def _stored_limits(concurrency: Any, rate: Any, period: Any) -> tuple:
    """(concurrency or None, (count, period seconds) or None) from how a backend keeps them."""
    return (None if concurrency is None else int(concurrency),
            None if rate is None else (int(rate), float(period)))


def _limits_shown_as_json(concurrency: int | None, rate: tuple | None) -> dict[str, Any]:
    return {"concurrency": concurrency, "rate": None if rate is None else format_rate(*rate)}


def _remaining(deadline: float | None) -> float | None:
    return None if deadline is None else max(0.0, deadline - time.monotonic())


def _not_cancellable(identifier: str, status: str) -> TaskConflict:
    return TaskConflict(f"Task {identifier} is {status}: only waiting and running tasks can be cancelled")


def _not_retryable(identifier: str, status: str) -> TaskConflict:
    return TaskConflict(f"Task {identifier} is {status}: only failed tasks can be retried")


# == Queue: Redis ============================================================

# Keys. Each profile's keys share one cluster hash tag, "{prefix:profile}", so
# every state change of a task is one script on one slot and a Redis Cluster
# spreads profiles over its masters. Per profile: a hash per task, a sorted
# set per status scored by creation time, a FIFO list of ready ids ("queue"),
# a sorted set of delayed ids by run_at, running ids by lease expiry
# ("leases"), ended ids by end time, a sorted set per tag, a "wake" list that
# idle workers block on, the finished/failed counters, and an "outbox" of news
# for tasks of other profiles that depend on this one's. The only key
# outside a profile is "{prefix}:profiles", the set of profile names that
# cross-profile reads visit.
#
# The scripts are one library of handlers, loaded once as Redis Functions
# (FCALL jobqueue_<version>_<handler>), or run by EVALSHA where the server has
# none. Every change runs through ``once``: the reply is remembered under the
# caller's key, so a call sent again after its reply was lost (by redis-py,
# or by us after an outage) gets that reply instead of a second run. Each
# handler that changes state takes ``now`` first, after the caller and token.
HELD_CONNECTIONS = 4
_REDIS_LIBRARY = """
local H = {}
local STATUSES = {'waiting', 'running', 'finished', 'failed'}
local WAKE_MAX = 100
-- The profile's key names, bound at the start of each call from KEYS[1], "{prefix:profile}".
local base, QUEUE, DELAYED, WAKE, LEASES, ENDED, TAGS, COMPLETED
local LEVELS, UNIQUE, EXPIRES, LIMITS, STARTS
local expired_news  -- a claim expired a task whose dependents are in other slots (see claim_next)
local function bind(keys)
  base, expired_news = keys[1], false
  QUEUE, DELAYED, WAKE = base .. ':queue', base .. ':delayed', base .. ':wake'
  LEASES, ENDED, TAGS, COMPLETED = base .. ':leases', base .. ':ended', base .. ':tags', base .. ':completed'
  LEVELS, UNIQUE, EXPIRES = base .. ':levels', base .. ':unique', base .. ':expires'
  LIMITS, STARTS = base .. ':limits', base .. ':starts'
end
local function task_key(id) return base .. ':task:' .. id end
local function status_key(s) return base .. ':status:' .. s end
local function tag_key(t) return base .. ':tag:' .. t end
local function ended(s) return s == 'finished' or s == 'failed' end

-- A handler's arguments, named in the order they are sent; a name starting with '...' takes the rest.
-- Python reads these declarations (the calls below) to send each handler its arguments in order.
local function named(names, args, first)
  local values = {}
  for i, name in ipairs(names) do
    if string.sub(name, 1, 3) == '...' then
      local rest = {}
      for j = first + i - 1, #args do rest[#rest + 1] = args[j] end
      values[string.sub(name, 4)] = rest
    else
      values[name] = args[first + i - 1]
    end
  end
  return values
end

-- A change runs once per (caller, token), its two first arguments: sent again, it returns the first
-- reply. The caller names a thread of a client and a handler; each remembers its last reply a while.
local MEMO_SECONDS = 120
local function change(names, apply)
  return function(keys, args)
    bind(keys)
    local memo, token = base .. ':call:' .. args[1], args[2] .. '\\n'
    local last = redis.call('GET', memo)
    if last and string.sub(last, 1, #token) == token then return string.sub(last, #token + 1) end
    local reply = apply(named(names, args, 3))
    if type(reply) == 'table' and reply.err then return reply end
    reply = cjson.encode(reply)
    -- An empty reply (nothing claimed, nothing recovered) changed nothing worth remembering.
    if reply ~= '{}' then redis.call('SET', memo, token .. reply, 'EX', MEMO_SECONDS) end
    return reply
  end
end

-- A change that is the same when sent twice needs no memo.
local function plain(names, apply)
  return function(keys, args)
    bind(keys)
    return apply(named(names, args, 1))
  end
end

local function fields(key)
  local flat = redis.call('HGETALL', key)
  local task = {}
  for i = 1, #flat, 2 do task[flat[i]] = flat[i + 1] end
  return task
end

-- Waiting for a task's end (queue.wait): each waiter adds itself to the set ':waiting:<id>' and blocks on
-- the list ':done:<id>'; whatever ends or removes the task pushes one token per waiter there. Both expire.
local DONE_SECONDS = 60
local function tell_waiters(id)
  local waiters = redis.call('SCARD', base .. ':waiting:' .. id)
  if waiters > 0 then
    local done, tokens = base .. ':done:' .. id, {}
    for i = 1, math.min(waiters, WAKE_MAX) do tokens[i] = 1 end
    redis.call('LPUSH', done, unpack(tokens))
    redis.call('EXPIRE', done, DONE_SECONDS)
  end
end

local function wake(count)
  local tokens = {}
  for i = 1, math.min(count, WAKE_MAX) do tokens[i] = 1 end
  if redis.call('LPUSH', WAKE, unpack(tokens)) > WAKE_MAX then redis.call('LTRIM', WAKE, 0, WAKE_MAX - 1) end
end

-- A running task ended or left: under a concurrency limit, a waiting worker may go.
local function freed()
  if redis.call('HEXISTS', LIMITS, 'concurrency') == 1 then wake(1) end
end

local function release(id, unique_key)
  if unique_key and redis.call('HGET', UNIQUE, unique_key) == id then redis.call('HDEL', UNIQUE, unique_key) end
end

-- The index moves every status change shares; the FIFO list is the callers'.
local function move(id, score, old, new, now)
  local key = task_key(id)
  redis.call('ZREM', status_key(old), id)
  redis.call('ZADD', status_key(new), score, id)
  redis.call('HSET', key, 'status', new)
  if old == 'running' then
    redis.call('ZREM', LEASES, id)
    redis.call('HDEL', key, 'lease_until')
    freed()
  end
  if ended(old) then redis.call('ZREM', ENDED, id) end
  if ended(new) then
    redis.call('ZADD', ENDED, now, id)
    redis.call('HSET', key, 'finished_at', now)
    tell_waiters(id)
    if not ended(old) then  -- its unique key and its expiry go with it
      release(id, redis.call('HGET', key, 'unique_key'))
      redis.call('ZREM', EXPIRES, id)
    end
  end
end


-- Ready tasks: priority 0 in the FIFO list QUEUE (pushed left, popped right), any other priority in a list
-- of its own, QUEUE .. ':' .. priority; LEVELS holds those priorities, scored -priority (highest first).
-- ready_list() names the list of a priority, noting the priority in LEVELS; ready() is the one way a waiting
-- task becomes ready (an add pushes its ids there by the thousand); head (a recovered task, one given back)
-- puts it before its equals.
local function ready_list(priority)
  if priority == 0 then return QUEUE end
  redis.call('ZADD', LEVELS, -priority, priority)
  return QUEUE .. ':' .. priority
end

local function ready(id, priority, head)
  priority = tonumber(priority) or tonumber(redis.call('HGET', task_key(id), 'priority')) or 0
  redis.call(head and 'RPUSH' or 'LPUSH', ready_list(priority), id)
end

-- The next ready id (false if none): highest priority first, oldest first among equals.
local function pop_ready()
  while true do
    local level = redis.call('ZRANGE', LEVELS, 0, 0)[1]
    if not level or tonumber(level) < 0 then
      local id = redis.call('RPOP', QUEUE)
      if id or not level then return id end
    end
    local id = redis.call('RPOP', QUEUE .. ':' .. level)
    if id then return id end
    redis.call('ZREM', LEVELS, level)
  end
end

local function unqueue(id)
  local priority = tonumber(redis.call('HGET', task_key(id), 'priority')) or 0
  redis.call('LREM', priority == 0 and QUEUE or QUEUE .. ':' .. priority, 0, id)
  redis.call('ZREM', DELAYED, id)
end

-- unique_key -> the task holding it while that task waits or runs (an entry left by another status is stale).
local function holder(unique_key)
  local id = redis.call('HGET', UNIQUE, unique_key)
  local status = id and redis.call('HGET', task_key(id), 'status')
  if status == 'waiting' or status == 'running' then return id end
  return nil
end

-- What depends on a redundant task of the batch depends on the task holding its key (same profile) instead.
local function redirect(tasks, holders)
  for _, task in ipairs(tasks) do
    if task.waits then
      local waits, listed = cjson.decode(task.waits), cjson.decode(task.depends_on)
      for id, holder_id in pairs(holders) do
        if waits[id] then waits[holder_id], waits[id] = waits[id], nil end
      end
      local seen, depends_on = {}, {}
      for _, id in ipairs(listed) do
        id = holders[id] or id
        if not seen[id] then seen[id] = true; depends_on[#depends_on + 1] = id end
      end
      task.waits, task.depends_on = cjson.encode(waits), cjson.encode(depends_on)
    end
  end
end

-- The tasks of an add that no unique_key makes redundant; each redundant one adds to existing {its position
-- in the call, the holder's id, the holder's fields (none when the holder comes earlier in the same call)}.
-- A kept task takes its key, and its place in EXPIRES.
local function kept(tasks, existing)
  local taken, stored, holders = {}, {}, {}
  for position, task in ipairs(tasks) do
    local key = task.unique_key
    local held = key and (taken[key] or holder(key))
    if held then
      holders[task.identifier] = held
      existing[#existing + 1] = {position - 1, held, taken[key] and {} or fields(task_key(held))}
    else
      if key then
        taken[key] = task.identifier
        redis.call('HSET', UNIQUE, key, task.identifier)
      end
      if task.expires_at then redis.call('ZADD', EXPIRES, task.expires_at, task.identifier) end
      stored[#stored + 1] = task
    end
  end
  if next(holders) then redirect(stored, holders) end
  return stored
end


local function requeue(id, score, old, now)
  move(id, score, old, 'waiting', now)
  -- Put back by hand, it runs when a worker is free: no run_at, no expiry, whatever it had.
  redis.call('HDEL', task_key(id), 'worker', 'started_at', 'finished_at', 'error', 'result', 'run_at', 'progress',
             'expires_at')
  redis.call('ZREM', EXPIRES, id)
  redis.call('HSET', task_key(id), 'failures', 0, 'lost', 0)
  local unique_key = redis.call('HGET', task_key(id), 'unique_key')
  if unique_key and not holder(unique_key) then redis.call('HSET', UNIQUE, unique_key, id) end
  ready(id)
  wake(1)
end

local function promote(now)
  local due = redis.call('ZRANGEBYSCORE', DELAYED, '-inf', now, 'LIMIT', 0, 100)
  for _, id in ipairs(due) do
    redis.call('ZREM', DELAYED, id)
    ready(id)
  end
  if #due > 0 then wake(#due) end
end

-- What waits for a task that ended hears of it (defined with the dependencies, below).
local settle

-- A waiting task that never started fails once its expires_at passes.
local function expire(id, created_at, now)
  move(id, created_at, 'waiting', 'failed', now)
  redis.call('HSET', task_key(id), 'error', 'Expired before it started')
  if settle(id, 'failed', now) == 2 then expired_news = true end
end

local function expire_due(now)
  for _, id in ipairs(redis.call('ZRANGEBYSCORE', EXPIRES, '-inf', now, 'LIMIT', 0, 1000)) do
    local f = redis.call('HMGET', task_key(id), 'status', 'created_at', 'attempts')
    redis.call('ZREM', EXPIRES, id)
    if f[1] == 'waiting' and not f[3] then
      -- Not LREM from the ready list (a scan of it per task): a claim drops ids that are no longer waiting.
      redis.call('ZREM', DELAYED, id)
      expire(id, f[2], now)
    end
  end
end

-- The profile's limits. limited(now) says whether they hold every task back now: nil if not, else the claim's
-- reply ({due = when the rate lets the next one start}; a concurrency limit opens when a task ends, which
-- wakes a waiter). It notes whether starts are counted, for started().
local counting = false
local function limited(now)
  local l = redis.call('HMGET', LIMITS, 'concurrency', 'rate', 'period')
  counting = l[2] and true or false
  if not l[1] and not l[2] then return nil end
  if l[1] and redis.call('ZCARD', status_key('running')) >= tonumber(l[1]) then
    redis.call('DEL', WAKE)
    return {held = 'concurrency'}
  end
  if l[2] then
    local period = tonumber(l[3])
    redis.call('ZREMRANGEBYSCORE', STARTS, '-inf', '(' .. (tonumber(now) - period))
    if redis.call('ZCARD', STARTS) >= tonumber(l[2]) then
      redis.call('DEL', WAKE)
      return {due = tonumber(redis.call('ZRANGE', STARTS, 0, 0, 'WITHSCORES')[2]) + period + 0.001}
    end
  end
  return nil
end

local function started(id, now)
  if counting then redis.call('ZADD', STARTS, now, id .. '@' .. now) end
end


local function claim(id, worker, now, lease)
  local key = task_key(id)
  local f = redis.call('HMGET', key, 'status', 'created_at', 'lease', 'expires_at', 'attempts')
  if f[1] ~= 'waiting' then return false end
  if f[4] and not f[5] then
    redis.call('ZREM', EXPIRES, id)
    if tonumber(f[4]) <= tonumber(now) then expire(id, f[2], now) return false end
  end
  move(id, f[2], 'waiting', 'running', now)
  local expiry = tonumber(now) + (tonumber(f[3]) or tonumber(lease))
  redis.call('HSET', key, 'worker', worker, 'started_at', now, 'lease_until', expiry)
  redis.call('HINCRBY', key, 'attempts', 1)
  redis.call('ZADD', LEASES, expiry, id)
  redis.call('LPOP', WAKE)
  started(id, now)
  return fields(key)
end

-- {tasks = up to count of the oldest ready tasks, claimed, the limits allowing}, else what holds them back
-- (see limited), else {due = when the next delayed one is}, else {}; with posted = 2 when tasks it found
-- expired have news for other slots (the client delivers it).
local function claim_next(now, worker, lease, count)
  if count < 1 then return {} end
  -- Under a limit, one at a time: a limit counts tasks as they start, and a task claimed ahead starts later.
  if count > 1 and redis.call('EXISTS', LIMITS) == 1 then count = 1 end
  promote(now)
  local claimed, held = {}, nil
  while #claimed < count do
    held = limited(now)
    if held then break end
    local id = pop_ready()
    if not id then break end
    local task = claim(id, worker, now, lease)
    if task then claimed[#claimed + 1] = task end
  end
  local reply = held or {due = redis.call('ZRANGE', DELAYED, 0, 0, 'WITHSCORES')[2]}
  if #claimed > 0 then reply = {tasks = claimed} end
  if expired_news then reply.posted = 2 end
  return reply
end

-- Dependencies. A held task (one waiting for others) has the field 'waits', JSON {dependency: its profile}
-- of those not finished yet, and is in neither QUEUE nor DELAYED. A task others wait for has 'dependents',
-- a JSON list of {profile, id}. Dependencies cross profiles, hence slots: news for a task of another profile
-- is posted to this slot's outbox, a sorted set that the client delivers right after the call (and recover()
-- again, if a client died first). Messages, each harmless to deliver twice:
-- {'link', profile, dependency, dependent's profile, dependent}: note a dependent, or answer at once if ended;
-- {'release', profile, dependent, dependency} and {'fail', profile, dependent, dependency, why}.
local function outbox() return base .. ':outbox' end

local function news(now)
  return {work = {}, posted = 0, now = now, here = string.match(base, ':([^:]+)}$')}
end

-- Handle a message here if its task is in this slot, else post it.
local function tell(ctx, message)
  if message[2] == ctx.here then
    ctx.work[#ctx.work + 1] = message
  else
    redis.call('ZADD', outbox(), ctx.now, cjson.encode(message))
    ctx.posted = 1
  end
end

-- What waits for id hears that it finished ('release') or failed or is gone ('fail', why).
local function tell_dependents(ctx, id, what, why)
  local list = redis.call('HGET', task_key(id), 'dependents')
  if not list then return end
  redis.call('HDEL', task_key(id), 'dependents')
  for _, dependent in ipairs(cjson.decode(list)) do tell(ctx, {what, dependent[1], dependent[2], id, why}) end
end

local function handle(ctx, m)
  local id, key = m[3], task_key(m[3])
  if m[1] == 'link' then
    local status = redis.call('HGET', key, 'status')
    if status == 'finished' then
      tell(ctx, {'release', m[4], m[5], id})
    elseif status == 'failed' or not status then
      tell(ctx, {'fail', m[4], m[5], id, status and 'failed' or 'was deleted'})
    else
      local list = cjson.decode(redis.call('HGET', key, 'dependents') or '[]')
      for _, known in ipairs(list) do if known[1] == m[4] and known[2] == m[5] then return end end
      list[#list + 1] = {m[4], m[5]}
      redis.call('HSET', key, 'dependents', cjson.encode(list))
    end
    return
  end
  local f = redis.call('HMGET', key, 'status', 'waits', 'created_at', 'run_at')
  if f[1] ~= 'waiting' or not f[2] then return end
  local waits = cjson.decode(f[2])
  if waits[m[4]] == nil then return end
  if m[1] == 'release' then
    waits[m[4]] = nil
    if next(waits) then return redis.call('HSET', key, 'waits', cjson.encode(waits)) end
    redis.call('HDEL', key, 'waits')
    if f[4] and tonumber(f[4]) > tonumber(ctx.now) then
      redis.call('ZADD', DELAYED, f[4], id)
      wake(1)
    else
      ready(id)
      wake(1)
    end
  else
    move(id, f[3], 'waiting', 'failed', ctx.now)
    redis.call('HDEL', key, 'waits')
    redis.call('HSET', key, 'error', 'Dependency ' .. m[4] .. ' ' .. m[5])
    tell_dependents(ctx, id, 'fail', 'failed')
  end
end

-- Handle the messages for this slot, those they lead to too; 1 if some were posted to other slots.
local function spread(ctx)
  local i = 1
  while ctx.work[i] do
    handle(ctx, ctx.work[i])
    i = i + 1
  end
  return ctx.posted
end

-- Tasks just added with 'waits' ask each of their dependencies to note them (or answer at once).
local function hold(tasks, now)
  local ctx = news(now)
  for _, task in ipairs(tasks) do
    for dependency, profile in pairs(task.waits and cjson.decode(task.waits) or {}) do
      tell(ctx, {'link', profile, dependency, ctx.here, task.identifier, now})
    end
  end
  return spread(ctx)
end

-- A task ended (finished, failed, or deleted: status nil) and what waits for it hears so now.
-- Returns 1, or 2 if the outbox holds news (this call's, or some a client left behind) to deliver.
function settle(id, status, now)
  if status == 'waiting' or status == 'running' or not redis.call('HEXISTS', task_key(id), 'dependents') then
    return 1
  end
  local ctx = news(now)
  if status == 'finished' then tell_dependents(ctx, id, 'release') else
    tell_dependents(ctx, id, 'fail', status and 'failed' or 'was deleted')
  end
  if spread(ctx) == 1 or redis.call('ZCARD', outbox()) > 0 then return 2 end
  return 1
end

-- Record how a run ended (a.now is when), if the run (its attempt number) still holds the task.
local function complete(a)
  local now, id, new, err, result = a.now, a.id, a.status, a.error, a.result
  local key = task_key(id)
  local f = redis.call('HMGET', key, 'status', 'created_at', 'attempts')
  if f[1] ~= 'running' or f[3] ~= a.attempts then return 0 end
  move(id, f[2], 'running', new, now)
  redis.call('HSET', key, 'failures', a.failures)
  if err ~= '' then redis.call('HSET', key, 'error', err) else redis.call('HDEL', key, 'error') end
  if result ~= '' then redis.call('HSET', key, 'result', result) end
  if new == 'waiting' then
    redis.call('HSET', key, 'run_at', a.run_at)
    redis.call('ZADD', DELAYED, a.run_at, id)
    wake(1)
  else
    redis.call('HINCRBY', COMPLETED, new, 1)
  end
  return settle(id, new, now)
end

local function remove(id)
  local key = task_key(id)
  local f = redis.call('HMGET', key, 'status', 'tags', 'unique_key')
  if not f[1] then return 0 end
  if f[1] == 'waiting' then unqueue(id) end
  if f[1] == 'running' then freed() end
  release(id, f[3])
  redis.call('ZREM', EXPIRES, id)
  for _, index in ipairs({status_key(f[1]), LEASES, ENDED}) do redis.call('ZREM', index, id) end
  for _, tag in ipairs(cjson.decode(f[2])) do
    redis.call('ZREM', tag_key(tag), id)
    if redis.call('EXISTS', tag_key(tag)) == 0 then redis.call('SREM', TAGS, tag) end
  end
  redis.call('DEL', key)
  tell_waiters(id)
  return 1
end

-- redis.call(command, key, items...) for a long list of items, a thousand at a time (Lua's unpack takes a few
-- thousand values at most); without key, redis.call(command, items...). The sum of the replies.
local function chunked(command, key, items)
  local total = 0
  for i = 1, #items, 1000 do
    local last = math.min(i + 999, #items)
    total = total + (key and redis.call(command, key, unpack(items, i, last))
                         or redis.call(command, unpack(items, i, last)))
  end
  return total
end

-- Each task comes as its stored fields, a JSON object of strings; a field at its default is left out.
-- The indexes every task joins (the waiting set, the ready lists) take the whole call's ids in one command.
H.add = change({'now', '...tasks'}, function(a)
  local now, tasks, existing, dependent, keys = tonumber(a.now), {}, {}, false, {}
  for i, text in ipairs(a.tasks) do
    tasks[i] = cjson.decode(text)
    keys[i] = task_key(tasks[i].identifier)
  end
  if chunked('EXISTS', nil, keys) > 0 then
    for i, key in ipairs(keys) do
      if redis.call('EXISTS', key) == 1 then return redis.error_reply('EXISTS ' .. tasks[i].identifier) end
    end
  end
  tasks = kept(tasks, existing)
  local ready_count, delayed, waiting, ready_ids = 0, 0, {}, {}
  for _, task in ipairs(tasks) do
    local id, hash = task.identifier, {'status', 'waiting'}
    for name, value in pairs(task) do
      if value ~= '' then hash[#hash + 1] = name; hash[#hash + 1] = value end
    end
    redis.call('HSET', task_key(id), unpack(hash))
    waiting[#waiting + 1] = task.created_at
    waiting[#waiting + 1] = id
    if task.tags and task.tags ~= '[]' then
      for _, tag in ipairs(cjson.decode(task.tags)) do
        redis.call('ZADD', tag_key(tag), task.created_at, id)
        redis.call('SADD', TAGS, tag)
      end
    end
    if task.waits then  -- held by its dependencies: see hold()
      dependent = true
    elseif task.run_at and tonumber(task.run_at) > now then
      redis.call('ZADD', DELAYED, task.run_at, id)
      delayed = delayed + 1
    else
      local priority = tonumber(task.priority) or 0
      ready_ids[priority] = ready_ids[priority] or {}
      table.insert(ready_ids[priority], id)
      ready_count = ready_count + 1
    end
  end
  if #waiting > 0 then chunked('ZADD', status_key('waiting'), waiting) end
  for priority, ids in pairs(ready_ids) do chunked('LPUSH', ready_list(priority), ids) end
  -- A delayed task wakes one idle worker too, so that it learns the new due time.
  if ready_count + delayed > 0 then wake(math.max(ready_count, 1)) end
  return {dependent and hold(tasks, now) == 1 and 2 or 1, existing}
end)

-- now '' is the server's clock at the time the claim runs: a claim sent behind a blocking wait (see _fetch).
H.claim = change({'now', 'worker', 'lease', 'count'}, function(a)
  local now = a.now
  if now == '' then
    local t = redis.call('TIME')
    now = t[1] .. string.format('.%06d', tonumber(t[2]))
  end
  return claim_next(now, a.worker, a.lease, tonumber(a.count))
end)

-- Both limits at once ('' lifts one); period is the rate's, in seconds.
H.limits = plain({'concurrency', 'rate', 'period'}, function(a)
  redis.call('DEL', LIMITS)
  if a.concurrency ~= '' then redis.call('HSET', LIMITS, 'concurrency', a.concurrency) end
  if a.rate ~= '' then redis.call('HSET', LIMITS, 'rate', a.rate, 'period', a.period) else redis.call('DEL', STARTS) end
  wake(math.max(redis.call('ZCARD', status_key('waiting')), 1))
  return 1
end)

-- The outcomes of runs, each a JSON object {now (when it ended; '': a.now), id, attempts, status, error,
-- result, failures, run_at}, recorded in order; then up to a.count claims (a worker's next tasks) in the
-- same round trip. Returns {what complete() said of each outcome, claim_next's reply}.
H.complete = change({'now', 'worker', 'lease', 'count', '...outcomes'}, function(a)
  local recorded = {}
  for i, text in ipairs(a.outcomes) do
    local outcome = cjson.decode(text)
    if outcome.now == '' then outcome.now = a.now end
    recorded[i] = complete(outcome)
  end
  return {recorded, claim_next(a.now, a.worker, a.lease, tonumber(a.count))}
end)

-- held: identifier and attempts of each run claimed and never started. Each goes back to waiting as it
-- was: first in its queue, in the given order, its attempt not counted, its expiry kept. Returns 1 or 0 each.
H.give_back = change({'now', '...held'}, function(a)
  local given = {}
  for i = #a.held - 1, 1, -2 do
    local id, key = a.held[i], task_key(a.held[i])
    local f = redis.call('HMGET', key, 'status', 'created_at', 'attempts', 'expires_at', 'started_at')
    given[(i + 1) / 2] = 0
    if f[1] == 'running' and f[3] == a.held[i + 1] then
      if f[5] then redis.call('ZREM', STARTS, id .. '@' .. f[5]) end  -- never started: no start counted
      move(id, f[2], 'running', 'waiting', a.now)
      redis.call('HDEL', key, 'worker', 'started_at')
      if redis.call('HINCRBY', key, 'attempts', -1) == 0 then
        redis.call('HDEL', key, 'attempts')
        if f[4] then redis.call('ZADD', EXPIRES, f[4], id) end
      end
      ready(id, nil, true)
      wake(1)
      given[(i + 1) / 2] = 1
    end
  end
  return given
end)

-- held: identifier and attempts of each task its worker still runs.
H.renew = plain({'until', '...held'}, function(a)
  local renewed = 0
  for i = 1, #a.held, 2 do
    local id, key = a.held[i], task_key(a.held[i])
    local f = redis.call('HMGET', key, 'status', 'attempts')
    if f[1] == 'running' and f[2] == a.held[i + 1] then
      redis.call('HSET', key, 'lease_until', a['until'])
      redis.call('ZADD', LEASES, a['until'], id)
      renewed = renewed + 1
    end
  end
  return renewed
end)

-- Each recovered task with the worker it was lost from.
H.recover = change({'now', 'max_lost'}, function(a)
  local now, max_lost, recovered = a.now, tonumber(a.max_lost), {}
  for _, id in ipairs(redis.call('ZRANGEBYSCORE', LEASES, '-inf', now, 'LIMIT', 0, 1000)) do
    local key = task_key(id)
    local f = redis.call('HMGET', key, 'status', 'created_at', 'worker')
    if f[1] ~= 'running' then
      redis.call('ZREM', LEASES, id)
    else
      local lost = redis.call('HINCRBY', key, 'lost', 1)
      local worker = f[3] or '?'
      if lost >= max_lost then
        move(id, f[2], 'running', 'failed', now)
        redis.call('HSET', key, 'error', 'Worker lost ' .. lost .. ' times (last: ' .. worker .. ')')
        redis.call('HINCRBY', COMPLETED, 'failed', 1)
        settle(id, 'failed', now)
      else
        move(id, f[2], 'running', 'waiting', now)
        redis.call('HDEL', key, 'started_at')
        ready(id, nil, true)
        wake(1)
      end
      recovered[#recovered + 1] = {task = fields(key), worker = worker}
    end
  end
  expire_due(now)
  return recovered
end)

-- only_failed: '1' to move only a failed task (a retry).
H.update = change({'now', 'id', 'status', 'only_failed'}, function(a)
  local now, id, new = a.now, a.id, a.status
  local key = task_key(id)
  local f = redis.call('HMGET', key, 'status', 'created_at')
  if not f[1] then return {} end
  local old, score = f[1], f[2]
  if a.only_failed == '1' and old ~= 'failed' then return redis.error_reply('NOTFAILED ' .. id .. ' ' .. old) end
  if old ~= new then
    if old == 'waiting' then unqueue(id) end
    if new == 'waiting' then requeue(id, score, old, now) else move(id, score, old, new, now) end
    redis.call('HDEL', key, 'waits')
    return {task = fields(key), posted = settle(id, new, now)}
  end
  return {task = fields(key)}
end)

H.delete = change({'now', 'id'}, function(a)
  local posted = settle(a.id, nil, a.now)
  return remove(a.id) * posted
end)

-- Messages from other slots' outboxes (see hold); returns how many this slot's outbox holds now.
-- Returns {how many this slot's outbox holds now, the messages left for later}: a link to a task not here
-- yet (a batch across profiles stores one profile at a time) waits a while before it means "deleted".
local LINK_GRACE = 10
H.deliver = plain({'now', '...messages'}, function(a)
  local ctx, later = news(a.now), {}
  for _, text in ipairs(a.messages) do
    local m = cjson.decode(text)
    if m[1] == 'link' and m[6] and tonumber(a.now) - tonumber(m[6]) < LINK_GRACE
        and redis.call('EXISTS', task_key(m[3])) == 0 then
      later[#later + 1] = text
    else
      tell(ctx, m)
    end
  end
  spread(ctx)
  return {redis.call('ZCARD', outbox()), later}
end)

-- A waiter's turn (queue.wait): count it among the task's waiters for a while, then the task's fields.
H.watch = plain({'id', 'waiter', 'seconds'}, function(a)
  local waiting = base .. ':waiting:' .. a.id
  redis.call('SADD', waiting, a.waiter)
  redis.call('EXPIRE', waiting, a.seconds)
  return cjson.encode(fields(task_key(a.id)))
end)

-- A waiting or running task ends failed with a.error ('Cancelled'); its worker sees it and stops the job.
H.cancel = change({'now', 'id', 'error'}, function(a)
  local key = task_key(a.id)
  local f = redis.call('HMGET', key, 'status', 'created_at')
  if not f[1] then return {} end
  if ended(f[1]) then return redis.error_reply('ENDED ' .. a.id .. ' ' .. f[1]) end
  if f[1] == 'waiting' then unqueue(a.id) end
  move(a.id, f[2], f[1], 'failed', a.now)
  redis.call('HSET', key, 'error', a.error)
  redis.call('HDEL', key, 'result', 'waits')
  return {task = fields(key), posted = settle(a.id, 'failed', a.now)}
end)

-- A run's progress (JSON), stored if that run (its attempt number) still holds the task.
H.progress = plain({'id', 'attempts', 'progress'}, function(a)
  local key = task_key(a.id)
  local f = redis.call('HMGET', key, 'status', 'attempts')
  if f[1] ~= 'running' or f[2] ~= a.attempts then return 0 end
  redis.call('HSET', key, 'progress', a.progress)
  return 1
end)

-- Tasks of the statuses that ended before a.now, a page at a time. Returns {removed, scanned}.
H.purge = change({'now', 'offset', 'limit', '...statuses'}, function(a)
  local wanted = {}
  for _, status in ipairs(a.statuses) do wanted[status] = true end
  local ids = redis.call('ZRANGEBYSCORE', ENDED, '-inf', a.now, 'LIMIT', a.offset, a.limit)
  local removed = 0
  for _, id in ipairs(ids) do
    if wanted[redis.call('HGET', task_key(id), 'status')] then removed = removed + remove(id) end
  end
  return {removed, #ids}
end)

-- everything: '1' to take tasks under a live lease too. Oldest first, to the tail.
H.restore = change({'now', 'everything'}, function(a)
  local now, everything = tonumber(a.now), a.everything == '1'
  local stale = {}
  for _, s in ipairs({'running', 'failed'}) do
    local entries = redis.call('ZRANGE', status_key(s), 0, -1, 'WITHSCORES')
    for i = 1, #entries, 2 do
      local id = entries[i]
      local expiry = tonumber(redis.call('ZSCORE', LEASES, id))
      if everything or s ~= 'running' or not expiry or expiry <= now then
        stale[#stale + 1] = {id, tonumber(entries[i + 1]), entries[i + 1], s}
      end
    end
  end
  table.sort(stale, function(a, b) return a[2] < b[2] end)
  for _, entry in ipairs(stale) do requeue(entry[1], entry[3], entry[4], a.now) end
  return #stale
end)

-- Removes up to batch tasks, then the indexes once none is left (meanwhile a claim skips the ids
-- whose task is gone). Returns {removed, left}; the call memos expire by themselves.
H.flush = change({'now', 'batch'}, function(a)
  local budget = tonumber(a.batch)
  local removed = 0
  for _, s in ipairs(STATUSES) do
    local ids = redis.call('ZRANGE', status_key(s), 0, budget - removed - 1)
    for i, id in ipairs(ids) do ids[i] = task_key(id) end
    if #ids > 0 then
      redis.call('DEL', unpack(ids))
      redis.call('ZREMRANGEBYRANK', status_key(s), 0, #ids - 1)
    end
    removed = removed + #ids
    if removed >= budget then return {removed, 1} end
  end
  for _, tag in ipairs(redis.call('SMEMBERS', TAGS)) do redis.call('DEL', tag_key(tag)) end
  for _, level in ipairs(redis.call('ZRANGE', LEVELS, 0, -1)) do redis.call('DEL', QUEUE .. ':' .. level) end
  redis.call('DEL', QUEUE, DELAYED, WAKE, LEASES, ENDED, TAGS, COMPLETED, LEVELS, UNIQUE, EXPIRES, LIMITS, STARTS,
             outbox())
  return {removed, 0}
end)

-- Schedules live on the queue's own slot, "{prefix}" (KEYS[1] of these handlers): the definitions (name ->
-- JSON with its revision), the next run times (a sorted set), the last run times, and the runs claimed whose
-- task may not be stored yet ("pending": name -> due time). A run's task goes to its profile's slot in a
-- second call, with an identifier made from the run; so the next run_schedules adds a pending run again,
-- and the add that comes second is refused (EXISTS): each run is stored once.
local function schedule_keys()
  local defs = base .. ':schedules'
  return defs, defs .. ':next', defs .. ':last', defs .. ':pending'
end

H.schedule_put = change({'now', 'name', 'definition', 'next'}, function(a)
  local defs, nexts, last, pending = schedule_keys()
  redis.call('HSET', defs, a.name, a.definition)
  redis.call('ZADD', nexts, a.next, a.name)
  redis.call('HDEL', last, a.name)
  redis.call('HDEL', pending, a.name)
  return 1
end)

H.schedule_remove = change({'now', 'name'}, function(a)
  local defs, nexts, last, pending = schedule_keys()
  redis.call('ZREM', nexts, a.name)
  redis.call('HDEL', last, a.name)
  redis.call('HDEL', pending, a.name)
  return redis.call('HDEL', defs, a.name)
end)

-- Claim the run of a.name (at a.revision) due at a.due, unless another caller did: 1 and its next run is
-- a.next, or 0.
H.schedule_claim = change({'now', 'name', 'revision', 'due', 'next'}, function(a)
  local defs, nexts, last, pending = schedule_keys()
  local due, definition = redis.call('ZSCORE', nexts, a.name), redis.call('HGET', defs, a.name)
  if not due or not definition or tonumber(due) ~= tonumber(a.due)
      or cjson.decode(definition).revision ~= a.revision then
    return 0
  end
  redis.call('ZADD', nexts, a.next, a.name)
  redis.call('HSET', last, a.name, a.now)
  redis.call('HSET', pending, a.name, a.due)
  return 1
end)

-- The task of the run due at a.due is stored: the claim is settled (unless a later one replaced it).
H.schedule_settle = plain({'name', 'due'}, function(a)
  local _, _, _, pending = schedule_keys()
  if redis.call('HGET', pending, a.name) == a.due then redis.call('HDEL', pending, a.name) end
  return 1
end)
"""

# Each handler's argument names, read from its declaration in the library: the one source of the order.
def _handler_arguments(kind: str, declared: str) -> tuple:
    """(remembered, names, rest): how ``_call`` lays out a handler's arguments, from its declaration."""
    names = re.findall(r"'([.\w]+)'", declared)
    rest = names.pop()[3:] if names and names[-1].startswith("...") else None
    return kind == "change", tuple(names), rest


_REDIS_HANDLERS = {
    name: _handler_arguments(kind, declared)
    for name, kind, declared in re.findall(r"^H\.(\w+) = (change|plain)\(\{([^}]*)\}", _REDIS_LIBRARY, re.M)
}

# How the library is installed: as Redis Functions (loaded once, then FCALL
# jobqueue_<version>_<handler>), or where the server has none (before Redis 7)
# as one script whose first argument names the handler.
_REDIS_AS_SCRIPT = """
local args = {}
for i = 2, #ARGV do args[i - 1] = ARGV[i] end
return H[ARGV[1]](KEYS, args)
"""

# Replies that mean the server cannot take writes for now (a failover, a load, a cluster change).
# Error replies that redis-py passes on as plain ResponseErrors but that mean "not now": a failover, a
# load, a long script, a full memory. They are outages, waited out like a lost connection.
_REDIS_OUTAGE_REPLIES = ("BUSY", "LOADING", "MASTERDOWN", "READONLY", "NOREPLICAS", "UNBLOCKED", "CLUSTERDOWN",
                         "TRYAGAIN", "OOM")

_REDIS_SCHEMES = ("redis", "rediss", "unix", "tcp", "redis+sentinel", "redis+cluster")
_REDIS_TLS_OPTIONS = ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_cert_reqs")
# A reply later than this is an outage; with one retry, a silent server is reported within 10 s.
_REDIS_SOCKET_TIMEOUT = 4.5
# Connections a process keeps to one Redis server; more threads than that wait for one.
_REDIS_CONNECTIONS = 32
# How many tasks one call of a long operation (flush) handles, so Redis is never blocked for long.
_REDIS_BATCH = 1000


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _import_redis() -> Any:
    try:
        import redis
    except ImportError:
        raise ConfigurationError(
            "The Redis backend needs redis-py: pip install redis (or pip install 'jobqueue[redis]')"
        ) from None
    return redis


def redact(dsn: str) -> str:
    """The DSN with its password replaced by ``***``, for messages and logs."""
    scheme, separator, rest = dsn.partition("://")
    credentials, at, hosts = rest.rpartition("@")
    if not separator or not at or ":" not in credentials:
        return dsn
    return f"{scheme}://{credentials.split(':', 1)[0]}:***@{hosts}"


@dataclass(frozen=True)
class RedisDSN:
    """A Redis DSN taken apart once: what ``queue_from_dsn`` needs to build the client and the queue."""

    scheme: str
    hosts: tuple = ()
    path: str | None = None
    service: str | None = None
    db: int = 0
    username: str | None = None
    password: str | None = None
    prefix: str = DEFAULT_PREFIX
    replicas: int = 0
    tls: tuple = ()
    text: str = ""

    @classmethod
    def parse(cls, dsn: str) -> RedisDSN:
        scheme, _, rest = dsn.partition("://")
        scheme = scheme.lower()
        rest, _, query = rest.partition("?")
        credentials, _, location = rest.rpartition("@")
        username, password = cls._credentials(credentials)
        options = cls._options(scheme, query, dsn)
        fields: dict[str, Any] = {
            "scheme": scheme, "username": username, "password": password, "text": redact(dsn),
            "prefix": options.pop("prefix", DEFAULT_PREFIX), "replicas": cls._whole("replicas", options, dsn),
        }
        if scheme == "unix":
            if not location.strip("/"):
                raise ConfigurationError(f"The Redis DSN {redact(dsn)} names no socket: unix:///path/redis.sock")
            fields.update(path=unquote(location), db=cls._whole("db", options, dsn))
        else:
            netloc, _, path = location.partition("/")
            fields["hosts"] = tuple(cls._host(part, dsn) for part in netloc.split(","))
            segments = [unquote(segment) for segment in path.split("/") if segment]
            if scheme == "redis+sentinel":
                if not segments:
                    raise ConfigurationError(f"The Sentinel DSN {redact(dsn)} names no service: add /SERVICE")
                fields["service"], segments = segments[0], segments[1:]
            if segments and scheme == "redis+cluster":
                raise ConfigurationError(f"A Redis Cluster has no databases: remove /{segments[0]} from {redact(dsn)}")
            if len(segments) > 1:
                raise ConfigurationError(f'The Redis DSN {redact(dsn)} has more path than a database: "/{path}"')
            if segments:
                fields["db"] = cls._number("database", segments[0], dsn)
            if len(fields["hosts"]) > 1 and scheme not in ("redis+sentinel", "redis+cluster"):
                raise ConfigurationError(
                    f"Only redis+sentinel:// and redis+cluster:// take several hosts: {redact(dsn)}"
                )
        fields["tls"] = tuple(sorted(options.items()))
        if fields["replicas"] > 100:
            raise ConfigurationError(f"replicas in the Redis DSN {redact(dsn)} must be from 0 to 100")
        if not fields["prefix"] or "{" in fields["prefix"] or "}" in fields["prefix"]:
            raise ConfigurationError("A Redis prefix is a non-empty name without braces")
        return cls(**fields)

    @staticmethod
    def _credentials(text: str) -> tuple:
        if not text:
            return None, None
        user, colon, password = text.partition(":")
        return unquote(user) or None, unquote(password) if colon else None

    @staticmethod
    def _options(scheme: str, query: str, dsn: str) -> dict[str, str]:
        known = {"prefix", "replicas"} | ({"db"} if scheme == "unix" else set())
        known |= set(_REDIS_TLS_OPTIONS) if scheme == "rediss" else set()
        pairs = parse_qsl(query, keep_blank_values=True)
        options = dict(pairs)
        unknown = sorted(set(options) - known)
        if unknown:
            names = ", ".join(f'"{name}"' for name in unknown)
            raise ConfigurationError(f"Unknown option{'s' * (len(unknown) > 1)} {names} in the Redis DSN "
                                     f"{redact(dsn)} (known here: {', '.join(sorted(known))})")
        if len(options) < len(pairs):
            raise ConfigurationError(f"An option is given twice in the Redis DSN {redact(dsn)}")
        if options.get("ssl_cert_reqs", "required") not in ("none", "optional", "required"):
            raise ConfigurationError('ssl_cert_reqs in a rediss:// DSN is "none", "optional" or "required"')
        for name in ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile"):
            if name in options and not os.path.isfile(options[name]):
                raise ConfigurationError(f'{name} in the Redis DSN names no file: "{options[name]}"')
        return options

    @staticmethod
    def _number(name: str, text: str, dsn: str) -> int:
        if not text.isascii() or not text.isdigit():
            raise ConfigurationError(f'The {name} in the Redis DSN {redact(dsn)} must be a whole number, not "{text}"')
        return int(text)

    @classmethod
    def _whole(cls, name: str, options: dict[str, str], dsn: str) -> int:
        return cls._number(name, options.pop(name), dsn) if name in options else 0

    @classmethod
    def _host(cls, text: str, dsn: str) -> tuple:
        host, port = text, "6379"
        if text.startswith("["):
            host, _, port = text[1:].partition("]")
            port = port[1:] or "6379"
        elif ":" in text:
            host, _, port = text.rpartition(":")
        if not host:
            raise ConfigurationError(f"The Redis DSN {redact(dsn)} names no host")
        number = cls._number("port", port, dsn)
        if not 0 < number < 65536:
            raise ConfigurationError(f"The port in the Redis DSN {redact(dsn)} must be from 1 to 65535")
        return host, number

    def connect(self) -> Any:
        """The redis-py client this DSN describes; nothing is sent until it is used."""
        redis = _import_redis()
        from redis.backoff import ExponentialBackoff
        from redis.retry import Retry

        common: dict[str, Any] = {
            "username": self.username, "password": self.password, "socket_timeout": _REDIS_SOCKET_TIMEOUT,
            "socket_connect_timeout": 5.0, "retry": Retry(ExponentialBackoff(cap=0.5, base=0.05), 1),
            "decode_responses": True,
        }
        if self.scheme == "redis+cluster":
            from redis.cluster import ClusterNode, RedisCluster

            return RedisCluster(startup_nodes=[ClusterNode(host, port) for host, port in self.hosts], **common)
        if self.scheme == "redis+sentinel":
            from redis.sentinel import Sentinel

            timeouts = {"socket_timeout": common["socket_timeout"], "socket_connect_timeout": 5.0}
            return Sentinel(list(self.hosts), sentinel_kwargs=timeouts).master_for(
                self.service, db=self.db, max_connections=10 * _REDIS_CONNECTIONS, **common)
        if self.scheme == "unix":
            client = redis.Redis(unix_socket_path=self.path, db=self.db, **common)
        else:
            host, port = self.hosts[0]
            tls = {"ssl": True, **dict(self.tls)} if self.scheme == "rediss" else {}
            client = redis.Redis(host=host, port=port, db=self.db, **common, **tls)
        # Many threads (a busy serve) wait their turn for one of a few connections, instead of opening
        # one each until redis-py refuses with "Too many connections".
        pool = client.connection_pool
        client.connection_pool = redis.BlockingConnectionPool(
            max_connections=_REDIS_CONNECTIONS, timeout=_REDIS_SOCKET_TIMEOUT,
            connection_class=pool.connection_class, **pool.connection_kwargs)
        return client


def _describe_client(client: Any) -> str:
    """Where a redis-py client points, without credentials."""
    if hasattr(client, "get_nodes"):
        return "Redis Cluster at " + ",".join(f"{node.host}:{node.port}" for node in client.get_nodes()[:3])
    pool = getattr(client, "connection_pool", None)
    if hasattr(pool, "service_name"):
        return f"Redis Sentinel master {pool.service_name}"
    kwargs = getattr(pool, "connection_kwargs", {})
    if "path" in kwargs:
        return f"unix://{kwargs['path']}?db={kwargs.get('db', 0)}"
    return f"redis://{kwargs.get('host', 'localhost')}:{kwargs.get('port', 6379)}/{kwargs.get('db', 0)}"


def _direct_pool(client: Any) -> Any:
    """The connection pool of a plain ``redis.Redis`` (a Sentinel master's too), else None.

    A cluster routes by slot, and a subclass may change how commands are sent
    (the tests' double-sending client): those go through ``execute_command``.
    """
    import redis

    if type(client).execute_command is not redis.Redis.execute_command or not hasattr(client, "connection_pool"):
        return None
    return client.connection_pool


def _socket_timeout(client: Any) -> float | None:
    """How long the client waits for one reply (None: forever), so blocking commands stay under it."""
    if hasattr(client, "get_default_node"):
        client = client.get_default_node().redis_connection or client
    kwargs = getattr(getattr(client, "connection_pool", None), "connection_kwargs", {})
    return kwargs.get("socket_timeout")


def _score_pairs(reply: Any) -> list[tuple]:
    """(score, member) pairs from a WITHSCORES reply, in its order."""
    if reply and not isinstance(reply[0], (list, tuple)):
        reply = list(zip(reply[::2], reply[1::2]))
    return [(float(score), _text(member)) for member, score in reply]


def _positions_by_profile(tasks: Sequence[Task]) -> dict[str, list[int]]:
    """Where each profile's tasks are in ``tasks``, in order: a call per profile, each on the profile's slot."""
    positions: dict[str, list[int]] = {}
    for position, task in enumerate(tasks):
        positions.setdefault(task.profile, []).append(position)
    return positions


class _Waker:
    """Waits on the wake lists of several profiles of a Redis Cluster: a thread per list, each blocking in
    BLPOP (at most 1 s at a time) while someone waits on that list. A token taken when nobody waits any more
    is pushed back, for another worker."""

    def __init__(self, client: Any):
        self.client = client
        self._condition = threading.Condition()
        self._tokens: dict[str, int] = {}
        self._waiting: dict[str, int] = {}
        self._threads: dict[str, threading.Thread] = {}

    def wait(self, keys: list[str], block: float) -> None:
        deadline = time.monotonic() + block
        with self._condition:
            for key in keys:
                self._waiting[key] = self._waiting.get(key, 0) + 1
                if key not in self._threads:
                    self._threads[key] = threading.Thread(target=self._listen, args=(key,), daemon=True,
                                                          name=f"jobqueue-wake-{key}")
                    self._threads[key].start()
            try:
                while not any(self._tokens.get(key) for key in keys):
                    left = deadline - time.monotonic()
                    if left <= 0:
                        return
                    self._condition.wait(left)
                key = next(key for key in keys if self._tokens.get(key))
                self._tokens[key] -= 1
            finally:
                for key in keys:
                    self._waiting[key] -= 1

    def _listen(self, key: str) -> None:
        while True:
            with self._condition:
                if not self._waiting.get(key):
                    del self._threads[key]
                    return
            try:
                token = self.client.blpop([key], timeout=1)
            except Exception:  # noqa: BLE001 - an outage: the fetch loop sees it on its own calls
                token = None
                time.sleep(0.5)
            if token:
                with self._condition:
                    if self._waiting.get(key):
                        self._tokens[key] = self._tokens.get(key, 0) + 1
                        self._condition.notify_all()
                        continue
                with contextlib.suppress(Exception):
                    self.client.lpush(key, 1)


class RedisQueue(Queue):
    """A queue in Redis through redis-py: every state change is one script on its profile's slot.

    ``client`` is a ``redis.Redis``, a ``redis.cluster.RedisCluster`` or a
    Sentinel master (``Sentinel(...).master_for(name)``); ``prefix`` names the
    queue, so two prefixes on one server never see each other's tasks. With
    ``replicas=N`` every change waits until N replicas have it (Redis
    ``WAIT``, 1 s at most), so an acknowledged change survives its master.
    Times are the Redis server's: ``clock()`` is the local clock plus an
    offset to the server's, measured again every 30 seconds.
    """

    def __init__(self, client: Any, prefix: str = DEFAULT_PREFIX, *, replicas: int = 0,
                 description: str | None = None):
        if not isinstance(prefix, str) or not prefix or "{" in prefix or "}" in prefix:
            raise ConfigurationError("A Redis prefix is a non-empty name without braces")
        if isinstance(replicas, bool) or not isinstance(replicas, int) or replicas < 0:
            raise ConfigurationError("replicas must be a whole number, 0 or more")
        self.client, self.prefix, self.replicas = client, prefix, replicas
        self._description = description or _describe_client(client)
        self._exceptions = _import_redis().exceptions
        self._cluster = hasattr(client, "get_nodes")
        self._pool = _direct_pool(client)
        self._held: tuple[int, collections.deque] = (os.getpid(), collections.deque())
        self._library = "jobqueue_" + hashlib.sha1(_REDIS_LIBRARY.encode()).hexdigest()[:12]
        self._functions = True
        self._script = client.register_script(_REDIS_LIBRARY + _REDIS_AS_SCRIPT)
        self._calls = threading.local()
        self._known_profiles: frozenset = frozenset()
        self._registered: set[str] = set()
        self._offset, self._offset_due = 0.0, 0.0
        self._block_limit = _socket_timeout(client)
        self._lock = threading.Lock()
        self._waker: _Waker | None = None
        # Waits that may block a connection at once (BLPOP), so that many waiters (long polls) leave the
        # connection pool to everyone else; a waiter beyond them reads the task every 20 ms instead.
        self._blocking_waits = threading.BoundedSemaphore(_REDIS_CONNECTIONS // 2)

    def describe(self) -> str:
        return f"{self._description} (prefix {self.prefix})"

    # -- time, errors and calls ---------------------------------------------

    _local_clock = staticmethod(time.time)

    def clock(self) -> float:  # type: ignore[override]
        """Now on the server's clock; BackendUnavailable when the offset is due again and Redis is out."""
        local = self._local_clock()
        if local >= self._offset_due:
            with self._errors():
                before = time.monotonic()
                seconds, microseconds = self.client.time()
                middle = self._local_clock() - (time.monotonic() - before) / 2
            self._offset, self._offset_due = seconds + microseconds / 1e6 - middle, local + 30.0
        return local + self._offset

    @contextlib.contextmanager
    def _errors(self) -> Iterator[None]:
        try:
            yield
        except JobQueueError:
            raise
        except Exception as error:
            translated = self._translate(error)
            if translated is None:
                raise
            raise translated from error

    def _translate(self, error: Exception) -> JobQueueError | None:
        """The one place that turns redis-py's errors into ours; None for an error that is not Redis's (a bug)."""
        exceptions = self._exceptions
        code = str(error).split(" ", 1)[0]
        if isinstance(error, exceptions.AuthenticationError) or code in ("WRONGPASS", "NOAUTH"):
            return ConfigurationError(f"{self.describe()} refused the credentials: {error}")
        if code == "EXISTS":
            return ValidationError(f"Task {str(error).split()[1]} already exists")
        if code == "ENDED":
            return _not_cancellable(*str(error).split()[1:3])
        if code == "NOTFAILED":
            return _not_retryable(*str(error).split()[1:3])
        if isinstance(error, exceptions.MovedError) and not self._cluster:
            return ConfigurationError(f"{self.describe()} is a node of a Redis Cluster: use redis+cluster://host:port")
        outages = (exceptions.ConnectionError, exceptions.TimeoutError, exceptions.ClusterError, exceptions.AskError,
                   exceptions.TryAgainError, exceptions.ReadOnlyError, exceptions.OutOfMemoryError,
                   exceptions.RedisClusterException, OSError)
        if isinstance(error, outages) or code in _REDIS_OUTAGE_REPLIES:
            return BackendUnavailable(f"{self.describe()} is unavailable: {error or type(error).__name__}")
        if isinstance(error, exceptions.RedisError):
            return JobQueueError(f"{self.describe()} refused a command: {error}")
        return None

    def _token(self, handler: str, call: tuple) -> tuple:
        """(caller, token, pending): the key of this call's remembered reply on the server.

        The caller names this thread and handler; the token is new, unless the
        same call raised before (then it stays in ``pending`` until it succeeds).
        """
        calls = self._calls
        if getattr(calls, "pid", None) != os.getpid():
            calls.pid, calls.caller = os.getpid(), uuid.uuid4().hex[:16]
            calls.numbers, calls.pending = itertools.count(), {}
        key = call
        if key not in calls.pending:
            if len(calls.pending) >= 64:
                calls.pending.clear()
            calls.pending[key] = next(calls.numbers)
        return f"{calls.caller}:{handler}", calls.pending[key], calls.pending

    def _base(self, profile: str | None) -> str:
        """The hash tag of a profile's keys; None: the queue's own (profile names, schedules)."""
        return f"{{{self.prefix}}}" if profile is None else f"{{{self.prefix}:{profile}}}"

    def _decoded(self, reply: Any) -> Any:
        return json.loads(reply) if isinstance(reply, (bytes, str)) else reply

    def _call(self, profile: str, handler: str, wait_first: tuple | None = None, **values: Any) -> Any:
        """Run one handler of the library on the profile's slot, once, acknowledged by ``replicas``.

        ``values`` are the handler's arguments by the names its declaration
        gives. A call that raised may have run (its reply lost): sent again
        from this thread with the same values (``now`` aside), it reuses its
        token, so the server answers with the first run's reply.
        ``wait_first``, a blocking command on the same slot, goes just before
        it on the same connection (see ``_claims_behind_wait``): the server
        runs the call when that returns.
        """
        remembered, names, rest = _REDIS_HANDLERS[handler]
        ordered = [values[name] for name in names]
        if rest is not None:
            ordered += values[rest]
        arguments = [handler, *ordered]
        if remembered:
            call = (handler, profile, *ordered[1:])  # the same call but for ``now``, every change's first argument
            caller, token, pending = self._token(handler, call)
            arguments = [handler, caller, token, *ordered]
        base = self._base(profile)
        for _ in range(3):
            try:
                if self.replicas:
                    reply = self._acknowledged(base, arguments)
                elif self._pool is not None:
                    reply = self._direct(self._command(base, arguments), wait_first)
                else:
                    reply = self.client.execute_command(*self._command(base, arguments))
                if remembered:
                    pending.pop(call, None)
                return self._decoded(reply)
            except self._exceptions.ResponseError as error:
                if not self._repair(error, base):
                    raise
                wait_first = None  # the wait, if any, has returned: the call alone goes again
        raise BackendUnavailable(f"{self.describe()} keeps losing the jobqueue library")

    def _direct(self, command: tuple, first: tuple | None = None) -> Any:
        """Send one command (after ``first``, in the same write) on a connection of the client's pool, retried
        as its retry policy says; its reply.

        The same as ``client.execute_command`` for a command whose reply needs
        no callback (FCALL and EVALSHA reply with one JSON string), but a few
        connections stay checked out between calls: taking one from the pool
        and giving it back costs 60 µs a call here, a round trip 20 µs.
        A connection that saw anything but a whole reply is disconnected, so
        no stale reply is ever read by the next call.
        """
        held = self._held
        if held[0] != os.getpid():
            held = self._held = (os.getpid(), collections.deque())
        try:
            connection = held[1].pop()
        except IndexError:
            connection = self._pool.get_connection()
        commands = [command] if first is None else [first, command]

        def retrying(error: Exception) -> None:
            # Sent again, ``first`` (a wait) may have returned already, its wake taken: wait no more.
            connection.disconnect()
            commands[:] = [command]

        try:
            reply = connection.retry.call_with_retry(lambda: self._exchange(connection, commands), retrying)
        except self._exceptions.ResponseError:
            if first is None:  # one command, one (error) reply: nothing left to read
                self._keep_connection(connection)
                raise
            connection.disconnect()
            self._pool.release(connection)
            raise
        except BaseException:
            connection.disconnect()
            self._pool.release(connection)
            raise
        self._keep_connection(connection)
        return reply

    @staticmethod
    def _exchange(connection: Any, commands: list[tuple]) -> Any:
        """Send the commands in one write, read every reply; the last one."""
        if len(commands) == 1:
            connection.send_command(*commands[0])
            return connection.read_response()
        connection.send_packed_command(connection.pack_commands(commands))
        return [connection.read_response() for _ in commands][-1]

    def _keep_connection(self, connection: Any) -> None:
        idle = self._held[1]
        if len(idle) < HELD_CONNECTIONS:
            idle.append(connection)
        else:
            self._pool.release(connection)

    def _command(self, base: str, arguments: list) -> tuple:
        if self._functions:
            return ("FCALL", f"{self._library}_{arguments[0]}", 1, base, *arguments[1:])
        return ("EVALSHA", self._script.sha, 1, base, *arguments)

    def _node(self, base: str) -> Any:
        """The client of the server that holds this key: the client itself unless it is a cluster."""
        return self.client.get_redis_connection(self.client.get_node_from_key(base)) if self._cluster else self.client

    def _repair(self, error: Exception, base: str) -> bool:
        """Mend what a call found missing or stale (the library, a cluster's slot map); False if that is not it."""
        message = str(error).lower()
        if self._cluster and isinstance(error, self._exceptions.AskError):
            self.client.nodes_manager.initialize()
        elif "unknown command" in message and "fcall" in message:
            self._functions = False
        elif "function not found" in message:
            register = "".join(f"redis.register_function('{self._library}_{name}', H.{name})\n"
                               for name in _REDIS_HANDLERS)
            self._node(base).function_load(f"#!lua name={self._library}\n{_REDIS_LIBRARY}{register}", replace=True)
        elif isinstance(error, self._exceptions.NoScriptError):
            self._node(base).script_load(self._script.script)
        else:
            return False
        return True

    def _acknowledged(self, base: str, arguments: list) -> Any:
        """The call and a ``WAIT`` on one connection, so the replicas counted are those of this change."""
        pipe = self._node(base).pipeline(transaction=False)
        pipe.execute_command(*self._command(base, arguments))
        pipe.execute_command("WAIT", self.replicas, 1000)
        reply, acknowledged = pipe.execute(raise_on_error=False)
        if isinstance(reply, Exception):
            raise reply
        if int(acknowledged) < self.replicas:
            raise BackendUnavailable(
                f"{self.describe()}: only {acknowledged} of {self.replicas} replicas acknowledged the change "
                "within 1 s; it may be lost if the master fails (sending it again is safe)"
            )
        return reply

    def _register(self, profile: str) -> None:
        """List the profile where cross-profile reads look (once per process: names are never unlisted)."""
        if profile not in self._registered:
            self.client.sadd(f"{{{self.prefix}}}:profiles", profile)
            self._registered.add(profile)

    def _read(self, commands: Iterable[tuple]) -> list[Any]:
        """Send read commands in one pipeline: one round trip, or one per master on a cluster."""
        pipe = self.client.pipeline(transaction=False)
        for command in commands:
            pipe.execute_command(*command)
        return pipe.execute()

    def _profiles(self) -> list[str]:
        names = sorted(_text(name) for name in self.client.smembers(f"{{{self.prefix}}}:profiles"))
        self._known_profiles = frozenset(names)
        return names

    def _task(self, fields: Any) -> Task | None:
        if not fields:
            return None
        if not all(isinstance(key, str) and isinstance(value, str) for key, value in fields.items()):
            fields = {_text(key): _text(value) for key, value in fields.items()}
        return _decode_task(fields)

    # -- the contract ---------------------------------------------------------

    def _add(self, tasks: Sequence[Task], now: float) -> dict[int, Task]:
        where = self._dependencies(tasks)
        payloads = []
        for task in tasks:
            encoded = _encode_task(task)
            if task.depends_on:
                encoded["waits"] = json.dumps({dependency: where[dependency] for dependency in task.depends_on})
            payloads.append(_flat_json(encoded))
        existing: dict[int, Task] = {}
        news: set[str] = set()
        for profile, positions in _positions_by_profile(tasks).items():
            self._register(profile)
            posted, redundant = self._call(profile, "add", now=repr(now), tasks=[payloads[p] for p in positions])
            if posted == 2:
                news.add(profile)
            given = {task.identifier: task for task in tasks} if redundant else {}
            for position, holder, fields in redundant or ():
                existing[positions[position]] = given.get(holder) or self._task(fields)  # type: ignore[assignment]
        if news:
            self._deliver(news)
        return existing

    # -- dependencies: the library's outboxes carry news between slots --------------

    def _dependencies(self, tasks: Sequence[Task]) -> dict[str, str]:
        """The profile of each task the batch depends on: one round trip per master; ValidationError if none."""
        if not any(task.depends_on for task in tasks):
            return {}
        where = {task.identifier: task.profile for task in tasks}
        wanted = sorted({dependency for task in tasks for dependency in task.depends_on} - set(where))  # type: ignore[union-attr]
        if wanted:
            profiles, replies = self._across(None, lambda p: [("EXISTS", f"{self._base(p)}:task:{d}") for d in wanted])
            for profile, found in zip(profiles, replies):
                where.update((dependency, profile) for dependency, hit in zip(wanted, found) if hit)
            for dependency in wanted:
                if dependency not in where:
                    raise TaskConflict(f"Unknown dependency {dependency}: no task has this identifier")
        return {dependency: where[dependency] for task in tasks for dependency in task.depends_on}  # type: ignore[union-attr]

    def _deliver(self, profiles: Iterable[str]) -> None:
        """Carry the news these profiles' outboxes hold to the profiles it is for, until none is left.

        A message is taken off its outbox only once delivered, and delivering
        one twice does nothing more: a client that dies midway loses nothing,
        for ``recover`` (which workers call as they go) delivers what is left.
        So an outage here is logged, not raised: the change itself is made.
        """
        try:
            self._deliver_now(set(profiles))
        except Exception as error:
            if not isinstance(error, BackendUnavailable) and not isinstance(self._translate(error), BackendUnavailable):
                raise
            logger.warning("News for other profiles waits in an outbox until recover() delivers it: %s", error)

    def _deliver_now(self, pending: set[str]) -> None:
        while pending:
            profile = pending.pop()
            outbox = f"{self._base(profile)}:outbox"
            messages = [_text(message) for message in self.client.zrange(outbox, 0, _REDIS_BATCH - 1)]
            targets: dict[str, list[str]] = {}
            for message in messages:
                targets.setdefault(json.loads(message)[1], []).append(message)
            left: set[str] = set()
            for target, batch in targets.items():
                waiting, later = self._call(target, "deliver", now=repr(self.clock()), messages=batch)
                if waiting:
                    pending.add(target)
                left.update(_text(message) for message in later)
            delivered = [message for message in messages if message not in left]
            if delivered:
                self.client.zrem(outbox, *delivered)
            if len(messages) == _REDIS_BATCH and delivered:
                pending.add(profile)

    def _claim_reply(self, profile: str, reply: Any) -> list[Task] | float | None:
        """The tasks a claim took; else when the next one is due (a delay, a rate), or None."""
        if reply.get("posted") == 2:
            self._deliver([profile])
        if "tasks" in reply:
            return [self._task(fields) for fields in reply["tasks"]]
        return float(reply["due"]) if "due" in reply else None

    def _fetch(self, profiles: list[str], timeout: float | None, worker: str, lease: float,
               count: int = 1) -> list[Task]:
        """Claim from each profile in turn; idle, block on their wake lists until a token or the next due time."""
        deadline = None if timeout is None else time.monotonic() + timeout
        behind_wait = self._claims_behind_wait(profiles)
        due: float | None = None  # when the claim sent behind the last wait says the next task is due
        while True:
            now = self.clock()
            if due is None:
                due = math.inf
                for profile in profiles:
                    claimed = self._claim_reply(profile, self._call(profile, "claim", now=repr(now), worker=worker,
                                                                    lease=repr(lease), count=count))
                    if isinstance(claimed, list):
                        return claimed
                    due = min(due, math.inf if claimed is None else claimed)
            remaining = _remaining(deadline)
            if remaining is not None and remaining <= 0:
                return []
            block = min(5.0 if remaining is None else remaining, max(due - now, 0.01))
            if self._block_limit:
                block = min(block, max(self._block_limit - 1.0, self._block_limit / 2))
            keys = [f"{self._base(profile)}:wake" for profile in profiles]
            if not behind_wait:
                self._block_on_wake(keys, max(block, 0.01))
                due = None
                continue
            # The claim rides behind the wait (it reads the server's clock when it runs): no round trip
            # between a wake and the claim, which is most of the time from an add to its start.
            claimed = self._claim_reply(profiles[0], self._call(
                profiles[0], "claim", ("BLPOP", keys[0], max(block, 0.01)), now="", worker=worker,
                lease=repr(lease), count=count))
            if isinstance(claimed, list):
                return claimed
            due = math.inf if claimed is None else claimed

    def _claims_behind_wait(self, profiles: list[str]) -> bool:
        """Whether an idle fetch sends its claim behind its wait, in one write: one profile, a connection held
        here (not a cluster's, no replicas to wait for), and the server's clock (not one a test put in)."""
        return (len(profiles) == 1 and self._pool is not None and not self.replicas
                and "clock" not in self.__dict__ and type(self).clock is RedisQueue.clock)

    def _block_on_wake(self, keys: list[str], block: float) -> None:
        """Block until a wake token on one of ``keys``, or ``block`` seconds.

        One BLPOP over them all, but on a cluster, where each profile is a slot
        of its own (a BLPOP over several would be CROSSSLOT): there, a thread
        per key waits (``_Waker``), each on a connection to its key's master.
        """
        if len(keys) == 1 or not self._cluster:
            self.client.blpop(keys, timeout=block)
            return
        with self._lock:
            if self._waker is None:
                self._waker = _Waker(self.client)
        self._waker.wait(keys, block)

    def _set_limits(self, profile: str, concurrency: int | None, rate: tuple | None) -> None:
        self._register(profile)
        self._call(profile, "limits", concurrency="" if concurrency is None else concurrency,
                   rate="" if rate is None else rate[0], period="" if rate is None else repr(rate[1]))

    def _limits(self, profile: str) -> tuple:
        return _stored_limits(*self.client.hmget(f"{self._base(profile)}:limits", "concurrency", "rate", "period"))

    def _all_limits(self) -> dict[str, tuple]:
        profiles, replies = self._across(None, lambda p: [("HMGET", f"{self._base(p)}:limits", "concurrency", "rate",
                                                           "period")])
        return {profile: _stored_limits(*reply) for profile, (reply,) in zip(profiles, replies)}

    def _renew(self, task: Task, until: float) -> bool:
        return bool(self._call(task.profile, "renew", until=repr(until), held=[task.identifier, task.attempts]))

    @staticmethod
    def _outcome(task: Task) -> str:
        """One run's outcome as the complete handler reads it (a retry's ``now`` is the call's)."""
        finished = task.finished_at if task.status is not Status.WAITING else None
        return json.dumps({
            "now": _stamp(finished), "id": task.identifier, "attempts": str(task.attempts),
            "status": task.status.value, "error": task.error or "", "failures": str(task.failures),
            "result": "" if task.result is None else json.dumps(task.result), "run_at": _stamp(task.run_at),
        })

    def _complete_many(self, tasks: Sequence[Task], worker: str, lease: float, count: int,
                       profile: str | None) -> tuple:
        """One call per profile of the outcomes; the claims ride with those of ``profile`` (its slot's), last,
        so that no call that fails after them can leave tasks claimed that the caller never hears of."""
        groups = _positions_by_profile(tasks)
        if count and profile is not None:
            groups[profile] = groups.pop(profile, [])
        recorded, claimed = [False] * len(tasks), []
        for name, positions in groups.items():
            take = count if name == profile else 0
            results, reply = self._call(name, "complete", now=repr(self.clock()), worker=worker, lease=repr(lease),
                                        count=take, outcomes=[self._outcome(tasks[p]) for p in positions])
            for position, result in zip(positions, results or ()):
                recorded[position] = bool(result)
            if 2 in (results or ()):
                self._deliver([name])
            if take:
                following = self._claim_reply(name, reply)
                claimed = following if isinstance(following, list) else []
        return recorded, claimed

    def _recover(self, now: float, max_lost: int) -> list[Task]:
        recovered = []
        for profile in self._profiles():
            for entry in self._call(profile, "recover", now=repr(now), max_lost=max_lost) or []:
                task = self._task(entry["task"])
                task.worker = entry["worker"]
                recovered.append(task)
        profiles, sizes = self._across(None, lambda p: [("ZCARD", f"{self._base(p)}:outbox")])
        self._deliver([profile for profile, (size,) in zip(profiles, sizes) if size])
        return recovered

    def _read_back(self, tasks: list[Task]) -> list[Task | None]:
        return [self._task(fields) for fields in
                self._read([("HGETALL", f"{self._base(task.profile)}:task:{task.identifier}") for task in tasks])]

    def _locate(self, identifier: str) -> tuple:
        """(profile, stored fields) of a task: one pipeline over the profiles, one round trip per master."""
        profiles, replies = self._across(None, lambda p: [("HGETALL", f"{self._base(p)}:task:{identifier}")])
        for profile, (fields,) in zip(profiles, replies):
            if fields:
                return profile, fields
        return None, None

    def _find(self, identifier: str) -> Task | None:
        return self._task(self._locate(identifier)[1])

    def _update_status(self, identifier: str, status: Status, now: float, only_failed: bool) -> Task | None:
        profile = self._locate(identifier)[0]
        if profile is None:
            return None
        reply = self._call(profile, "update", now=repr(now), id=identifier, status=status.value,
                           only_failed="1" if only_failed else "0")
        if reply.get("posted") == 2:
            self._deliver([profile])
        return self._task(reply.get("task"))

    def _delete(self, identifier: str) -> bool:
        profile = self._locate(identifier)[0]
        deleted = profile is not None and self._call(profile, "delete", now=repr(self.clock()), id=identifier)
        if deleted == 2:
            self._deliver([profile])
        return bool(deleted)

    def _wait(self, identifier: str, deadline: float | None) -> Task | None:
        """Block on the task's ``done`` list, in slices the client's socket timeout allows, re-reading the
        task between them; the script that ends the task pushes a token there (``tell_waiters``)."""
        profile = self._locate(identifier)[0]
        if profile is None:
            return None
        waiter, done = uuid.uuid4().hex, f"{self._base(profile)}:done:{identifier}"
        while True:
            remaining = _remaining(deadline)
            block = 5.0 if remaining is None else remaining
            if self._block_limit:
                block = min(block, max(self._block_limit - 1.0, self._block_limit / 2))
            task = self._task(self._call(profile, "watch", id=identifier, waiter=waiter, seconds=math.ceil(block) + 5))
            if task is None or task.status in ENDED_STATUSES or remaining == 0:
                return task
            if not self._blocking_waits.acquire(blocking=False):
                time.sleep(min(block, 0.02))
                continue
            try:
                self.client.blpop([done], timeout=max(block, 0.01))
            finally:
                self._blocking_waits.release()

    def _cancel(self, identifier: str, now: float) -> Task | None:
        profile = self._locate(identifier)[0]
        if profile is None:
            return None
        reply = self._call(profile, "cancel", now=repr(now), id=identifier, error=CANCELLED)
        if reply.get("posted") == 2:
            self._deliver({profile})
        return self._task(reply.get("task"))

    def _run_states(self, tasks: Sequence[Task]) -> list[tuple]:
        replies = self._read([("HMGET", f"{self._base(task.profile)}:task:{task.identifier}", "status", "attempts",
                               "error") for task in tasks])
        return [tuple(None if value is None else _text(value) for value in reply) for reply in replies]

    def _give_back(self, tasks: Sequence[Task], now: float) -> list[bool]:
        given = [False] * len(tasks)
        for profile, positions in _positions_by_profile(tasks).items():
            held = [value for p in positions for value in (tasks[p].identifier, tasks[p].attempts)]
            for position, result in zip(positions, self._call(profile, "give_back", now=repr(now), held=held) or ()):
                given[position] = bool(result)
        return given

    def _set_progress(self, task: Task, progress: str) -> bool:
        return bool(self._call(task.profile, "progress", id=task.identifier, attempts=task.attempts,
                               progress=progress))

    def _groups(self, query: Filter) -> list[tuple]:
        profiles = [query.profile] if query.profile else self._profiles()
        statuses = [query.status] if query.status else list(Status)
        return [(profile, status) for profile in profiles for status in statuses]

    def _tagged(self, query: Filter, groups: list[tuple]) -> dict[tuple, list[tuple]]:
        """Each group's tasks having one of the tags, as (created, id), oldest first."""
        profiles = sorted({profile for profile, _ in groups})
        unions = self._read([("ZUNION", len(query.tags), *[f"{self._base(p)}:tag:{t}" for t in query.tags],
                              "AGGREGATE", "MIN", "WITHSCORES") for p in profiles])
        candidates = {profile: _score_pairs(reply) for profile, reply in zip(profiles, unions)}
        asked = [(profile, status) for profile, status in groups if candidates[profile]]
        members = self._read([("ZMSCORE", f"{self._base(p)}:status:{s.value}", *[i for _, i in candidates[p]])
                              for p, s in asked])
        found: dict[tuple, list[tuple]] = {group: [] for group in groups}
        for (profile, status), scores in zip(asked, members):
            found[(profile, status)] = [entry for entry, score in zip(candidates[profile], scores) if score is not None]
        return found

    def _count(self, query: Filter) -> int:
        if query.tags:
            return sum(len(entries) for entries in self._tagged(query, self._groups(query)).values())
        return sum(self._per_group(query, lambda key: ("ZCARD", key))[1])

    def _search(self, query: Filter) -> list[Task]:
        """Merge the groups (profile, status) in the query's order; read only the windows the page needs."""
        block = {"status": lambda group: group[1].rank, "profile": lambda group: group[0],
                 "date": lambda group: 0}[query.order]
        if not query.tags and query.limit is not None and query.offset + query.limit <= _REDIS_BATCH:
            return self._first_pages(query, block)
        groups = self._groups(query)
        tagged = self._tagged(query, groups) if query.tags else None
        sizes = ([len(tagged[group]) for group in groups] if tagged is not None
                 else self._read([("ZCARD", f"{self._base(p)}:status:{s.value}") for p, s in groups]))
        offset, wanted = query.offset, query.limit
        chosen: list[tuple] = []
        for _, members in itertools.groupby(sorted(zip(groups, sizes), key=lambda pair: block(pair[0])),
                                            key=lambda pair: block(pair[0])):
            members = [(group, size) for group, size in members if size]
            total = sum(size for _, size in members)
            if offset >= total:
                offset -= total
                continue
            stop = -1 if wanted is None else offset + wanted - 1
            if tagged is not None:
                windows = [tagged[group][: None if stop < 0 else stop + 1] for group, _ in members]
            else:
                replies = self._read([("ZRANGE", f"{self._base(p)}:status:{s.value}", 0, stop, "WITHSCORES")
                                      for (p, s), _ in members])
                windows = [_score_pairs(reply) for reply in replies]
            merged = sorted((created, identifier, group[0]) for (group, _), window in zip(members, windows)
                            for created, identifier in window)
            page = merged[offset: None if wanted is None else offset + wanted]
            chosen += page
            offset = 0
            if wanted is not None:
                wanted -= len(page)
                if wanted <= 0:
                    break
        return self._tasks(chosen)

    def _first_pages(self, query: Filter, block: Callable) -> list[Task]:
        """A page near the start in two round trips: every group's first offset + limit entries, then the tasks.

        The profile names are read in the same pipeline as the windows, for
        the profiles known already; a profile new since then costs one more.
        """
        stop = query.offset + query.limit - 1  # type: ignore[operator]
        groups, replies = self._per_group(query, lambda key: ("ZRANGE", key, 0, stop, "WITHSCORES"))
        merged = sorted((block(group), created, identifier, group[0])
                        for group, reply in zip(groups, replies) for created, identifier in _score_pairs(reply))
        return self._tasks([entry[1:] for entry in merged[query.offset: stop + 1]])

    def _per_group(self, query: Filter, command: Callable[[str], tuple]) -> tuple:
        """(groups, replies): ``command`` on the status set of each (profile, status) group the query names."""
        statuses = [query.status] if query.status else list(Status)
        profiles, replies = self._across(
            query.profile, lambda p: [command(f"{self._base(p)}:status:{s.value}") for s in statuses])
        groups = [(profile, status) for profile in profiles for status in statuses]
        return groups, [reply for batch in replies for reply in batch]

    def _across(self, profile: str | None, commands: Callable[[str], list]) -> tuple:
        """(profiles, the replies of each): ``commands(profile)`` for ``profile``, or for every profile.

        One pipeline: for every profile, the profile names are read in it too,
        for the profiles known already; a profile new since costs one more.
        """
        profiles = [profile] if profile else sorted(self._known_profiles)
        while True:
            batches = [commands(name) for name in profiles]
            listed = [] if profile else [("SMEMBERS", f"{{{self.prefix}}}:profiles")]
            replies = self._read(listed + [command for batch in batches for command in batch])
            names = set(profiles) if profile else {_text(name) for name in replies.pop(0)}
            if names <= set(profiles):
                grouped = iter(replies)
                return profiles, [[next(grouped) for _ in batch] for batch in batches]
            self._known_profiles = frozenset(names)
            profiles = sorted(names)

    def _tasks(self, chosen: list[tuple]) -> list[Task]:
        """The tasks of (created, identifier, profile) entries, in that order, in one round trip."""
        replies = self._read([("HGETALL", f"{self._base(p)}:task:{i}") for _, i, p in chosen]) if chosen else []
        return [task for task in map(self._task, replies) if task is not None]

    def _purge(self, ended_before: float, statuses: tuple) -> int:
        total = 0
        for profile in self._profiles():
            offset, batch = 0, 500
            while True:
                removed, scanned = self._call(profile, "purge", now=repr(ended_before), offset=offset,
                                              limit=batch, statuses=[s.value for s in statuses])
                total += removed
                offset += scanned - removed
                if scanned < batch:
                    break
        return total

    def _flush(self) -> int:
        """Each profile in batches, so Redis is never blocked long; the profile names stay listed.

        Keeping the names means a task that another process adds meanwhile is
        never left out of the cross-profile reads.
        """
        removed = 0
        for profile in self._profiles():
            left = True
            while left:
                count, left = self._call(profile, "flush", now=repr(self.clock()), batch=_REDIS_BATCH)
                removed += count
        return removed

    def _restore(self, now: float, include_leased: bool) -> int:
        return sum(int(self._call(profile, "restore", now=repr(now), everything="1" if include_leased else "0"))
                   for profile in self._profiles())

    def _stats(self) -> dict[tuple, int]:
        groups, sizes = self._per_group(Filter(), lambda key: ("ZCARD", key))
        used = {profile for (profile, _), size in zip(groups, sizes) if size}
        return {(p, s.value): size for (p, s), size in zip(groups, sizes) if p in used}

    def _completed(self) -> dict[tuple, int]:
        profiles, replies = self._across(None, lambda p: [("HGETALL", f"{self._base(p)}:completed")])
        return {(profile, _text(outcome)): int(number) for profile, (counts,) in zip(profiles, replies)
                for outcome, number in counts.items()}

    def _ping(self) -> None:
        self.client.ping()

    # -- schedules: on the queue's own slot; a run's task goes to its profile's slot afterwards

    def _schedule_keys(self) -> tuple:
        definitions = f"{self._base(None)}:schedules"
        return definitions, f"{definitions}:next", f"{definitions}:last", f"{definitions}:pending"

    def _put_schedule(self, schedule: Schedule, first: float, now: float) -> None:
        self._call(None, "schedule_put", now=repr(now), name=schedule.name, definition=schedule.stored(),
                   next=repr(first))

    def _schedules(self) -> list[Schedule]:
        definitions, nexts, lasts, _ = self._schedule_keys()
        stored, due, last = self._read([("HGETALL", definitions), ("ZRANGE", nexts, 0, -1, "WITHSCORES"),
                                        ("HGETALL", lasts)])
        due_at = {name: at for at, name in _score_pairs(due)}
        last = {_text(name): _text(at) for name, at in last.items()}
        return [self._stored_schedule(_text(text), due_at.get(_text(name)), last.get(_text(name)))
                for name, text in stored.items()]

    def _remove_schedule(self, name: str) -> bool:
        return bool(self._call(None, "schedule_remove", now=repr(self.clock()), name=name))

    def _run_schedules(self, now: float) -> list[Task]:
        """Claim each due run on the schedules' slot, then add its task; first, add again the runs a caller
        claimed without getting to add their task (it stopped in between)."""
        definitions, nexts, _, pending = self._schedule_keys()
        due, claimed = self._read([("ZRANGEBYSCORE", nexts, "-inf", repr(now), "WITHSCORES"), ("HGETALL", pending)])
        runs = [(name, float(_text(at)), False) for name, at in claimed.items()]
        runs += [(name, at, True) for at, name in _score_pairs(due)]
        if not runs:
            return []
        names = sorted({_text(name) for name, _, _ in runs})
        stored = dict(zip(names, self.client.hmget(definitions, names)))
        added = []
        for name, at, to_claim in runs:
            name = _text(name)
            if stored.get(name) is None:
                continue
            schedule = self._stored_schedule(_text(stored[name]), None, None)
            if to_claim and not self._call(None, "schedule_claim", now=repr(now), name=name,
                                           revision=schedule.revision, due=repr(at),
                                           next=repr(schedule.run_after(at, now))):
                continue
            task = schedule.task(at)
            try:
                if self.add(task)[0] is task:  # else a task holding its unique_key stands in for it
                    added.append(task)
            except ValidationError:
                if self._find(task.identifier) is None:
                    raise
            self._call(None, "schedule_settle", name=name, due=repr(at))
        return added

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.client.close()


# == Queue: SQLite ===========================================================

# One row per task. A waiting task has a FIFO ``position``, or none while it
# is delayed (until ``run_at``) or held by dependencies (``waits``: how many
# are not finished yet); a running one has ``lease_until``. Partial indexes
# serve the FIFO, the delayed set, expired leases and ended tasks. A row of
# jobqueue_dependents says a task waits for another, until that one ends.
_SQLITE_TYPES = {"TEXT": str, "REAL": float, "INTEGER": int}
_SQLITE_ADDED = [column for column in TASK_FIELDS if not column.metadata["state"]]
_SQLITE_COLUMNS = ",\n    ".join(f"{column.name} {column.metadata['sql']}" for column in TASK_FIELDS)
_SQLITE_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS jobqueue_tasks (
    seq INTEGER PRIMARY KEY,
    {_SQLITE_COLUMNS},
    status_rank INTEGER NOT NULL,
    position INTEGER,
    lease_until REAL,
    waits INTEGER
);
DROP INDEX IF EXISTS jobqueue_fifo;
CREATE INDEX IF NOT EXISTS jobqueue_ready ON jobqueue_tasks (profile, priority DESC, position)
    WHERE status = 'waiting' AND position IS NOT NULL;
CREATE INDEX IF NOT EXISTS jobqueue_unique ON jobqueue_tasks (profile, unique_key) WHERE unique_key IS NOT NULL;
CREATE INDEX IF NOT EXISTS jobqueue_expires ON jobqueue_tasks (profile, expires_at)
    WHERE status = 'waiting' AND expires_at IS NOT NULL;
CREATE INDEX IF NOT EXISTS jobqueue_delayed ON jobqueue_tasks (profile, run_at)
    WHERE status = 'waiting' AND position IS NULL;
CREATE INDEX IF NOT EXISTS jobqueue_leases ON jobqueue_tasks (lease_until) WHERE status = 'running';
CREATE INDEX IF NOT EXISTS jobqueue_ended ON jobqueue_tasks (status_rank, finished_at)
    WHERE finished_at IS NOT NULL;
CREATE INDEX IF NOT EXISTS jobqueue_by_date ON jobqueue_tasks (created_at);
CREATE INDEX IF NOT EXISTS jobqueue_by_status ON jobqueue_tasks (status_rank, created_at);
CREATE INDEX IF NOT EXISTS jobqueue_by_profile ON jobqueue_tasks (profile, created_at);
CREATE INDEX IF NOT EXISTS jobqueue_by_profile_status
    ON jobqueue_tasks (profile, status_rank, created_at);
CREATE TABLE IF NOT EXISTS jobqueue_tags (
    tag TEXT NOT NULL,
    seq INTEGER NOT NULL,
    PRIMARY KEY (tag, seq)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS jobqueue_tags_by_task ON jobqueue_tags (seq);
CREATE TABLE IF NOT EXISTS jobqueue_dependents (
    dependency TEXT NOT NULL,
    dependent TEXT NOT NULL,
    PRIMARY KEY (dependency, dependent)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS jobqueue_counters (
    name TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
INSERT OR IGNORE INTO jobqueue_counters (name, value) VALUES ('position', 0);
CREATE TABLE IF NOT EXISTS jobqueue_schedules (
    name TEXT PRIMARY KEY,
    definition TEXT NOT NULL,
    next_run_at REAL NOT NULL,
    last_run_at REAL
);
CREATE INDEX IF NOT EXISTS jobqueue_schedules_due ON jobqueue_schedules (next_run_at);
CREATE TABLE IF NOT EXISTS jobqueue_limits (
    profile TEXT PRIMARY KEY,
    concurrency INTEGER,
    rate INTEGER,
    period REAL
);
CREATE TABLE IF NOT EXISTS jobqueue_starts (
    profile TEXT NOT NULL,
    at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS jobqueue_starts_by_profile ON jobqueue_starts (profile, at);
"""

# Columns a file made by an older version may lack: every field's, and the dependency count.
# A NOT NULL column without a DEFAULT cannot be added to rows that exist: it is added nullable ('' is its default).
_SQLITE_LATER_COLUMNS = [*((column.name, column.metadata["sql"] if "DEFAULT" in column.metadata["sql"]
                            or "NOT NULL" not in column.metadata["sql"] else column.metadata["codec"].sql)
                           for column in TASK_FIELDS), ("waits", "INTEGER")]

_SQLITE_ORDERS = {
    "date": "created_at, seq",
    "status": "status_rank, created_at, seq",
    "profile": "profile, created_at, seq",
}

_SQLITE_READY = """
SELECT EXISTS (SELECT 1 FROM jobqueue_tasks
               WHERE status = 'waiting' AND position IS NOT NULL AND profile = :profile)
    OR EXISTS (SELECT 1 FROM jobqueue_tasks
               WHERE status = 'waiting' AND position IS NULL AND profile = :profile AND run_at <= :now
               AND waits IS NULL) AS ready
"""

_SQLITE_CLAIM = """
UPDATE jobqueue_tasks
SET status = 'running', status_rank = 1, attempts = attempts + 1, worker = :worker, started_at = :now,
    lease_until = :now + COALESCE(lease, :lease)
WHERE seq = (
    SELECT seq FROM jobqueue_tasks
    WHERE status = 'waiting' AND position IS NOT NULL AND profile = :profile
    ORDER BY priority DESC, position LIMIT 1
)
RETURNING *
"""

_SQLITE_EXPIRE = f"""
UPDATE jobqueue_tasks
SET status = 'failed', status_rank = 3, error = '{EXPIRED_ERROR}', finished_at = :now, position = NULL, waits = NULL
WHERE status = 'waiting' AND expires_at <= :now AND attempts = 0
RETURNING identifier
"""

_SQLITE_REQUEUE = """
UPDATE jobqueue_tasks
SET status = 'waiting', status_rank = 0, position = ?, failures = 0, lost = 0, worker = NULL,
    started_at = NULL, finished_at = NULL, error = NULL, result = NULL, run_at = NULL, lease_until = NULL,
    waits = NULL, progress = NULL, expires_at = NULL
WHERE seq = ?
"""

_SQLITE_COMPLETE = """
UPDATE jobqueue_tasks
SET status = :status, status_rank = :rank, finished_at = :finished_at, error = :error, result = :result,
    failures = :failures, run_at = :run_at, position = NULL, lease_until = NULL
WHERE identifier = :identifier AND status = 'running' AND attempts = :attempts
RETURNING profile
"""

_SQLITE_COUNT_COMPLETED = """
INSERT INTO jobqueue_counters (name, value) VALUES (?, 1) ON CONFLICT (name) DO UPDATE SET value = value + 1
"""


_ADDED_NAMES = [column.name for column in _SQLITE_ADDED]
_SQLITE_INSERT = (f"INSERT INTO jobqueue_tasks ({', '.join(_ADDED_NAMES)}, status, status_rank, position)"
                  f" VALUES ({'?, ' * len(_ADDED_NAMES)}'waiting', 0, ?)")


def _sql_default(column: dataclasses.Field) -> Any:
    """What the column holds for a field left out of the encoded form: its default, typed (NULL for None)."""
    if column.default is MISSING or column.default is None:
        return None
    return _SQLITE_TYPES[column.metadata["codec"].sql](column.metadata["codec"].store(column.default))


# Each added column: its field's name, default and store (as in _STORED_FIELDS), the column's type from the
# stored text, and its value when the encoded form leaves the field out.
_SQLITE_ADDED_VALUES = tuple((column.name, column.default, column.metadata["codec"].store,
                              _SQLITE_TYPES[column.metadata["codec"].sql], _sql_default(column))
                             for column in _SQLITE_ADDED)


def _sql_row(task: Task, position: int | None) -> list[Any]:
    """The values of ``_SQLITE_INSERT`` for a task: ``_encode_task``'s form, typed, in one pass."""
    row = [absent if (value := getattr(task, name)) is None or value == default or not (text := store(value))
           else typed(text) for name, default, store, typed, absent in _SQLITE_ADDED_VALUES]
    row.append(position)
    return row


def _row_dict(cursor: sqlite3.Cursor, row: tuple) -> dict[str, Any]:
    return {column[0]: value for column, value in zip(cursor.description, row)}


def _add_missing_columns(connection: sqlite3.Connection) -> None:
    """Give a file made by an older version the columns of fields added since (their defaults).

    Runs before the schema script, whose indexes may name the new columns.
    """
    present = {row["name"] for row in connection.execute("PRAGMA table_info(jobqueue_tasks)")}
    if not present:
        return
    missing = [(name, sql) for name, sql in _SQLITE_LATER_COLUMNS if name not in present]
    if not missing:
        return
    connection.execute("BEGIN IMMEDIATE")
    try:
        present = {row["name"] for row in connection.execute("PRAGMA table_info(jobqueue_tasks)")}
        for name, sql in missing:
            if name not in present:
                connection.execute(f"ALTER TABLE jobqueue_tasks ADD COLUMN {name} {sql}")
    except BaseException:
        connection.execute("ROLLBACK")
        raise
    connection.execute("COMMIT")


def _sqlite3() -> Any:
    """The sqlite3 module, if its library can run our statements (RETURNING needs 3.35)."""
    import sqlite3

    if sqlite3.sqlite_version_info < SQLITE_MIN_VERSION:
        raise ConfigurationError(
            f"This Python's SQLite library is {sqlite3.sqlite_version}; jobqueue needs"
            f" {'.'.join(map(str, SQLITE_MIN_VERSION))} or newer. Use a Python built with a newer SQLite,"
            " or Redis (JOBQUEUE_REDIS_DSN)"
        )
    return sqlite3


class SQLiteQueue(Queue):
    """A queue in one SQLite file: WAL, a busy timeout, one connection per thread.

    Several worker processes and the server can share the file. ``fetch``
    polls, backing off from 1 ms up to ``poll_interval`` seconds while idle.
    Only the first connection sets up the file, so a new thread connects fast.
    """

    def __init__(self, path: str | os.PathLike, poll_interval: float = 0.05):
        self.path = os.fspath(path)
        self.poll_interval = poll_interval
        self._local = threading.local()
        self._schema_ready = False
        self._writers = (os.getpid(), threading.Lock())
        with self._errors():
            self._connection()

    def describe(self) -> str:
        return f"SQLite database {os.path.abspath(self.path)}"

    def _connection(self) -> sqlite3.Connection:
        local = self._local
        if getattr(local, "pid", None) != os.getpid():
            local.connection, local.pid = self._open(), os.getpid()
        return local.connection

    def _open(self) -> sqlite3.Connection:
        """Connect, switch to WAL and create the schema if needed.

        Switching a new file to WAL can fail with "database is locked" at once,
        without waiting, while another process does the same: so set-up is
        tried again until the busy timeout, like any other write.
        """
        sqlite3 = _sqlite3()
        deadline, pause = time.monotonic() + SQLITE_BUSY_TIMEOUT, 0.005
        while True:
            connection = None
            try:
                connection = sqlite3.connect(
                    self.path, timeout=SQLITE_BUSY_TIMEOUT, isolation_level=None, check_same_thread=False
                )
                connection.row_factory = _row_dict
                connection.execute(f"PRAGMA busy_timeout = {int(SQLITE_BUSY_TIMEOUT * 1000)}")
                connection.execute("PRAGMA synchronous = NORMAL")
                if not self._schema_ready:
                    if connection.execute("PRAGMA journal_mode").fetchone()["journal_mode"] != "wal":
                        connection.execute("PRAGMA journal_mode = WAL")
                    _add_missing_columns(connection)
                    connection.executescript(_SQLITE_SCHEMA)
                    self._schema_ready = True
                return connection
            except sqlite3.OperationalError as error:
                if connection is not None:
                    connection.close()
                busy = "locked" in str(error) or "busy" in str(error)
                if not busy or time.monotonic() > deadline:
                    raise
                time.sleep(pause)
                pause = min(pause * 2, 0.1)

    @contextlib.contextmanager
    def _errors(self) -> Iterator[None]:
        try:
            yield
        except _sqlite3().IntegrityError as error:
            raise ValidationError(f"{self.describe()} refused the change: {error}") from error
        except _sqlite3().Error as error:
            raise BackendUnavailable(f"{self.describe()} is unavailable: {error}") from error

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction. Threads of this process take turns on a lock first: SQLite's own
        busy handler sleeps up to 100 ms between tries, which under many writers makes a long tail."""
        if self._writers[0] != os.getpid():
            self._writers = (os.getpid(), threading.Lock())
        connection = self._connection()
        if connection.in_transaction:  # a write inside this thread's own (run_schedules adds its tasks so)
            yield connection
            return
        with self._writers[1]:
            connection.execute("BEGIN IMMEDIATE")
            try:
                yield connection
            except BaseException:
                connection.execute("ROLLBACK")
                raise
            connection.execute("COMMIT")

    def _positions(self, connection: sqlite3.Connection, count: int) -> range:
        """Reserve ``count`` places at the back of the FIFO (inside a write transaction)."""
        last = connection.execute(
            "UPDATE jobqueue_counters SET value = value + ? WHERE name = 'position' RETURNING value",
            (count,),
        ).fetchone()["value"]
        return range(last - count + 1, last + 1)

    def _head(self, connection: sqlite3.Connection, profile: str) -> int:
        """A place before every waiting task of the profile."""
        first = connection.execute(
            "SELECT MIN(position) AS first FROM jobqueue_tasks"
            " WHERE status = 'waiting' AND position IS NOT NULL AND profile = ?", (profile,)
        ).fetchone()["first"]
        return self._positions(connection, 1)[0] if first is None else first - 1

    def _add(self, tasks: Sequence[Task], now: float) -> dict[int, Task]:
        with self._write() as connection:
            existing = self._redundant(connection, tasks)
            holders = {tasks[index].identifier: held.identifier for index, held in existing.items()}
            tasks = [task for index, task in enumerate(tasks) if index not in existing]
            for task in tasks:  # what depends on a redundant task of the batch depends on its key's holder
                if holders and task.depends_on:
                    task.depends_on = list(dict.fromkeys(holders.get(d, d) for d in task.depends_on))
            delayed = [(task.run_at is not None and task.run_at.timestamp() > now) or bool(task.depends_on)
                       for task in tasks]
            positions = iter(self._positions(connection, delayed.count(False)))
            try:
                connection.executemany(_SQLITE_INSERT, [_sql_row(task, None if later else next(positions))
                                                        for task, later in zip(tasks, delayed)])
            except _sqlite3().IntegrityError:
                raise ValidationError("A task with the same identifier already exists") from None
            tagged = [(tag, task.identifier) for task in tasks for tag in task.tags]  # type: ignore[union-attr]
            if tagged:
                connection.executemany("INSERT INTO jobqueue_tags (tag, seq)"
                                       " SELECT ?, seq FROM jobqueue_tasks WHERE identifier = ?", tagged)
            self._hold(connection, [task for task in tasks if task.depends_on], now)
        return existing

    def _redundant(self, connection: sqlite3.Connection, tasks: Sequence[Task]) -> dict[int, Task]:
        """By position, the task holding the unique_key of each task that one makes redundant."""
        existing: dict[int, Task] = {}
        taken: dict[tuple, Task] = {}
        for index, task in enumerate(tasks):
            if task.unique_key is None:
                continue
            key = (task.profile, task.unique_key)
            held = taken.get(key) or connection.execute(
                "SELECT * FROM jobqueue_tasks WHERE profile = ? AND unique_key = ? AND status_rank < 2 LIMIT 1",
                key).fetchone()
            if held is None:
                taken[key] = task
            else:
                existing[index] = held if isinstance(held, Task) else _decode_task(held)
        return existing

    def _promote(self, connection: sqlite3.Connection, profile: str, now: float) -> None:
        """Due delayed tasks join the back of the FIFO, in run_at order."""
        due = connection.execute(
            "SELECT seq FROM jobqueue_tasks WHERE status = 'waiting' AND position IS NULL AND profile = ?"
            " AND run_at <= ? AND waits IS NULL ORDER BY run_at, seq LIMIT 100", (profile, now)
        ).fetchall()
        if due:
            positions = self._positions(connection, len(due))
            connection.executemany("UPDATE jobqueue_tasks SET position = ? WHERE seq = ?",
                                   [(p, row["seq"]) for p, row in zip(positions, due)])

    # -- dependencies: held tasks have ``waits`` and no position; jobqueue_dependents links them

    def _hold(self, connection: sqlite3.Connection, tasks: Sequence[Task], now: float) -> None:
        """Link just-added tasks to what they depend on; release, fail or keep each (caller's transaction)."""
        if not tasks:
            return
        links = [(dependency, task.identifier) for task in tasks for dependency in task.depends_on]  # type: ignore[union-attr]
        known = {}
        for dependency in dict.fromkeys(dependency for dependency, _ in links):
            row = connection.execute("SELECT status FROM jobqueue_tasks WHERE identifier = ?", (dependency,)).fetchone()
            if row is None:
                raise TaskConflict(f"Unknown dependency {dependency}: no task has this identifier")
            known[dependency] = row["status"]
        connection.executemany("INSERT OR IGNORE INTO jobqueue_dependents (dependency, dependent) VALUES (?, ?)",
                               [(dependency, dependent) for dependency, dependent in links
                                if known[dependency] not in ("finished", "failed")])
        connection.executemany("UPDATE jobqueue_tasks SET waits = ? WHERE identifier = ?", [
            (sum(known[dependency] != "finished" for dependency in task.depends_on), task.identifier)  # type: ignore[union-attr]
            for task in tasks])
        for task in tasks:
            failed = next((d for d in task.depends_on if known[d] == "failed"), None)  # type: ignore[union-attr]
            if failed is not None:
                self._fail_held(connection, [(task.identifier, failed, "failed")], now)
            elif all(known[dependency] == "finished" for dependency in task.depends_on):  # type: ignore[union-attr]
                self._release(connection, task.identifier, now)

    def _release(self, connection: sqlite3.Connection, identifier: str, now: float) -> None:
        """A held task whose dependencies all finished joins its profile's FIFO (or the delayed set)."""
        row = connection.execute(
            "UPDATE jobqueue_tasks SET waits = NULL WHERE identifier = ? AND status = 'waiting' AND waits IS NOT NULL"
            " RETURNING seq, run_at", (identifier,)).fetchone()
        if row is not None and (row["run_at"] is None or row["run_at"] <= now):
            connection.execute("UPDATE jobqueue_tasks SET position = ? WHERE seq = ?",
                               (self._positions(connection, 1)[0], row["seq"]))

    def _dependents(self, connection: sqlite3.Connection, identifier: str) -> list[str]:
        """The tasks waiting for ``identifier``, unlinked from it: it ended, they hear of it now."""
        return [row["dependent"] for row in connection.execute(
            "DELETE FROM jobqueue_dependents WHERE dependency = ? RETURNING dependent", (identifier,)).fetchall()]

    def _settle(self, connection: sqlite3.Connection, identifier: str, status: Status | None, now: float) -> None:
        """A task finished, failed or was deleted (None): release or fail the tasks that wait for it."""
        if status is Status.FINISHED:
            for dependent in self._dependents(connection, identifier):
                left = connection.execute(
                    "UPDATE jobqueue_tasks SET waits = waits - 1 WHERE identifier = ? AND status = 'waiting'"
                    " AND waits > 0 RETURNING waits", (dependent,)).fetchone()
                if left is not None and left["waits"] == 0:
                    self._release(connection, dependent, now)
        elif status is not Status.WAITING:
            why = "failed" if status else "was deleted"
            self._fail_held(connection, [(d, identifier, why) for d in self._dependents(connection, identifier)], now)

    def _fail_held(self, connection: sqlite3.Connection, pending: list[tuple], now: float) -> None:
        """Fail each held (dependent, dependency, why), then what waits for those, and so on down."""
        while pending:
            dependent, dependency, why = pending.pop()
            failed = connection.execute(
                "UPDATE jobqueue_tasks SET status = 'failed', status_rank = 3, error = ?, finished_at = ?, waits = NULL"
                " WHERE identifier = ? AND status = 'waiting' AND waits IS NOT NULL RETURNING identifier",
                (f"Dependency {dependency} {why}", now, dependent)).fetchone()
            if failed is not None:
                pending += [(d, dependent, "failed") for d in self._dependents(connection, dependent)]

    def _claim(self, profiles: list[str], worker: str, lease: float, count: int) -> list[Task]:
        """Claim without taking the write lock when a cheap read shows nothing is ready; the profiles in turn."""
        for name in profiles:
            now = self.clock()
            ready = self._connection().execute(_SQLITE_READY, {"profile": name, "now": now}).fetchone()["ready"]
            if ready:
                with self._write() as connection:
                    claimed = self._claim_next(connection, name, worker, lease, now, count)
                if claimed:
                    return claimed
        return []

    def _claim_next(self, connection: sqlite3.Connection, profile: str, worker: str, lease: float,
                    now: float, count: int) -> list[Task]:
        """Promote due delayed tasks, then claim up to ``count`` of the oldest ready ones, the limits allowing
        (inside the caller's transaction)."""
        self._promote(connection, profile, now)
        limits = connection.execute("SELECT * FROM jobqueue_limits WHERE profile = ?", (profile,)).fetchone()
        if limits is not None:
            count = 1  # a limit counts tasks as they start, and a task claimed ahead starts later
        claimed: list[Task] = []
        claim = {"profile": profile, "now": now, "worker": worker, "lease": lease}
        while len(claimed) < count:
            counting = limits is not None and self._limited(connection, limits, now)
            if counting is None:
                break
            row = connection.execute(_SQLITE_CLAIM, claim).fetchone()
            while row is not None and self._expired(connection, row, now):
                row = connection.execute(_SQLITE_CLAIM, claim).fetchone()
            if row is None:
                break
            if counting:
                connection.execute("INSERT INTO jobqueue_starts (profile, at) VALUES (?, ?)", (profile, now))
            claimed.append(_decode_task(row))
        return claimed

    def _expired(self, connection: sqlite3.Connection, row: dict, now: float) -> bool:
        """Whether a task just claimed had expired before it ever started: then it is failed instead."""
        if row["expires_at"] is None or row["expires_at"] > now or row["attempts"] != 1:
            return False
        connection.execute("UPDATE jobqueue_tasks SET status = 'failed', status_rank = 3, error = ?, finished_at = ?,"
                           " attempts = 0, worker = NULL, started_at = NULL, lease_until = NULL WHERE seq = ?",
                           (EXPIRED_ERROR, now, row["seq"]))
        self._settle(connection, row["identifier"], Status.FAILED, now)
        return True

    @staticmethod
    def _limited(connection: sqlite3.Connection, limits: dict, now: float) -> bool | None:
        """None if the profile's limits (its row) hold every task back now, else whether its starts are counted."""
        profile = limits["profile"]
        if limits["concurrency"] is not None and connection.execute(
                "SELECT COUNT(*) AS n FROM jobqueue_tasks WHERE profile = ? AND status_rank = 1",
                (profile,)).fetchone()["n"] >= limits["concurrency"]:
            return None
        if limits["rate"] is None:
            return False
        connection.execute("DELETE FROM jobqueue_starts WHERE profile = ? AND at < ?",
                           (profile, now - limits["period"]))
        started = connection.execute("SELECT COUNT(*) AS n FROM jobqueue_starts WHERE profile = ?",
                                     (profile,)).fetchone()["n"]
        return None if started >= limits["rate"] else True

    def _set_limits(self, profile: str, concurrency: int | None, rate: tuple | None) -> None:
        with self._write() as connection:
            connection.execute("DELETE FROM jobqueue_limits WHERE profile = ?", (profile,))
            if rate is None:
                connection.execute("DELETE FROM jobqueue_starts WHERE profile = ?", (profile,))
            if concurrency is not None or rate is not None:
                connection.execute("INSERT INTO jobqueue_limits (profile, concurrency, rate, period)"
                                   " VALUES (?, ?, ?, ?)", (profile, concurrency, *(rate or (None, None))))

    def _limits(self, profile: str) -> tuple:
        row = self._connection().execute("SELECT * FROM jobqueue_limits WHERE profile = ?", (profile,)).fetchone()
        return (None, None) if row is None else _stored_limits(row["concurrency"], row["rate"], row["period"])

    def _all_limits(self) -> dict[str, tuple]:
        return {row["profile"]: _stored_limits(row["concurrency"], row["rate"], row["period"])
                for row in self._connection().execute("SELECT * FROM jobqueue_limits").fetchall()}

    def _fetch(self, profiles: list[str], timeout: float | None, worker: str, lease: float,
               count: int = 1) -> list[Task]:
        deadline = None if timeout is None else time.monotonic() + timeout
        pause = 0.001
        while True:
            claimed = self._claim(profiles, worker, lease, count)
            if claimed:
                return claimed
            remaining = _remaining(deadline)
            if remaining is not None and remaining <= 0:
                return []
            time.sleep(pause if remaining is None else min(pause, remaining))
            pause = min(pause * 2, self.poll_interval)

    def _renew(self, task: Task, until: float) -> bool:
        with self._write() as connection:
            cursor = connection.execute(
                "UPDATE jobqueue_tasks SET lease_until = ?"
                " WHERE identifier = ? AND status = 'running' AND attempts = ?",
                (until, task.identifier, task.attempts),
            )
        return cursor.rowcount == 1

    def _complete_many(self, tasks: Sequence[Task], worker: str, lease: float, count: int,
                       profile: str | None) -> tuple:
        with self._write() as connection:
            recorded = [self._record(connection, task) for task in tasks]
            if not count or profile is None:
                return recorded, []
            return recorded, self._claim_next(connection, profile, worker, lease, self.clock(), count)

    def _record(self, connection: sqlite3.Connection, task: Task) -> bool:
        """Write a run's outcome inside the caller's transaction, if the run still holds the task."""
        retrying = task.status is Status.WAITING
        row = connection.execute(_SQLITE_COMPLETE, {
            "status": task.status.value, "rank": task.status.rank, "identifier": task.identifier,
            "finished_at": None if retrying else task.finished_at.timestamp(),  # type: ignore[union-attr]
            "error": task.error, "result": None if task.result is None else json.dumps(task.result),
            "failures": task.failures, "attempts": task.attempts,
            "run_at": task.run_at.timestamp() if retrying else None,  # type: ignore[union-attr]
        }).fetchone()
        if row is not None and not retrying:
            connection.execute(_SQLITE_COUNT_COMPLETED, (f"completed:{row['profile']}:{task.status.value}",))
            self._settle(connection, task.identifier, task.status, task.finished_at.timestamp())  # type: ignore[union-attr]
        return row is not None

    def _recover(self, now: float, max_lost: int) -> list[Task]:
        recovered = []
        with self._write() as connection:
            for gone in connection.execute(_SQLITE_EXPIRE, {"now": now}).fetchall():
                self._settle(connection, gone["identifier"], Status.FAILED, now)
            expired = connection.execute(
                "SELECT * FROM jobqueue_tasks WHERE status = 'running' AND lease_until <= ?"
                " ORDER BY lease_until LIMIT 1000", (now,)
            ).fetchall()
            for row in expired:
                lost = row["lost"] + 1
                if lost >= max_lost:
                    error = f"Worker lost {lost} times (last: {row['worker']})"
                    connection.execute(
                        "UPDATE jobqueue_tasks SET status = 'failed', status_rank = 3, lost = ?, error = ?,"
                        " finished_at = ?, lease_until = NULL WHERE seq = ?", (lost, error, now, row["seq"]))
                    connection.execute(_SQLITE_COUNT_COMPLETED, (f"completed:{row['profile']}:failed",))
                    self._settle(connection, row["identifier"], Status.FAILED, now)
                    row.update(status="failed", error=error, finished_at=now)
                else:
                    connection.execute(
                        "UPDATE jobqueue_tasks SET status = 'waiting', status_rank = 0, lost = ?, position = ?,"
                        " started_at = NULL, lease_until = NULL WHERE seq = ?",
                        (lost, self._head(connection, row["profile"]), row["seq"]))
                    row.update(status="waiting", started_at=None)
                row["lost"] = lost
                recovered.append(_decode_task(row))
        return recovered

    def _find(self, identifier: str) -> Task | None:
        row = self._connection().execute(
            "SELECT * FROM jobqueue_tasks WHERE identifier = ?", (identifier,)
        ).fetchone()
        return None if row is None else _decode_task(row)

    def _read_back(self, tasks: list[Task]) -> list[Task | None]:
        found: dict[str, Task] = {}
        for start in range(0, len(tasks), 500):
            chunk = [task.identifier for task in tasks[start:start + 500]]
            rows = self._connection().execute(
                f"SELECT * FROM jobqueue_tasks WHERE identifier IN ({', '.join('?' * len(chunk))})", chunk)
            found.update((row["identifier"], _decode_task(row)) for row in rows.fetchall())
        return [found.get(task.identifier) for task in tasks]

    @staticmethod
    def _seq_and_status(connection: sqlite3.Connection, identifier: str) -> dict | None:
        return connection.execute("SELECT seq, status FROM jobqueue_tasks WHERE identifier = ?",
                                  (identifier,)).fetchone()

    def _update_status(self, identifier: str, status: Status, now: float, only_failed: bool) -> Task | None:
        with self._write() as connection:
            row = self._seq_and_status(connection, identifier)
            if row is None:
                return None
            if only_failed and row["status"] != Status.FAILED.value:
                raise _not_retryable(identifier, row["status"])
            if row["status"] != status.value:
                if status is Status.WAITING:
                    connection.execute(_SQLITE_REQUEUE, (self._positions(connection, 1)[0], row["seq"]))
                else:
                    connection.execute(
                        "UPDATE jobqueue_tasks SET status = ?, status_rank = ?, finished_at = ?, position = NULL,"
                        " lease_until = NULL WHERE seq = ?", (status.value, status.rank, now, row["seq"]),
                    )
                    self._settle(connection, identifier, status, now)
            updated = connection.execute("SELECT * FROM jobqueue_tasks WHERE seq = ?", (row["seq"],)).fetchone()
        return _decode_task(updated)

    def _cancel(self, identifier: str, now: float) -> Task | None:
        with self._write() as connection:
            row = self._seq_and_status(connection, identifier)
            if row is None:
                return None
            if Status(row["status"]) in ENDED_STATUSES:
                raise _not_cancellable(identifier, row["status"])
            updated = connection.execute(
                "UPDATE jobqueue_tasks SET status = 'failed', status_rank = ?, error = ?, result = NULL,"
                " finished_at = ?, position = NULL, lease_until = NULL, waits = NULL WHERE seq = ? RETURNING *",
                (Status.FAILED.rank, CANCELLED, now, row["seq"])).fetchone()
            self._settle(connection, identifier, Status.FAILED, now)
        return _decode_task(updated)

    def _run_states(self, tasks: Sequence[Task]) -> list[tuple]:
        rows = self._connection().execute(
            f"SELECT identifier, status, attempts, error FROM jobqueue_tasks"
            f" WHERE identifier IN ({', '.join('?' * len(tasks))})", [task.identifier for task in tasks]).fetchall()
        stored = {row["identifier"]: (row["status"], row["attempts"], row["error"]) for row in rows}
        return [stored.get(task.identifier, (None, None, None)) for task in tasks]

    def _give_back(self, tasks: Sequence[Task], now: float) -> list[bool]:
        """A claim keeps the task's place in its queue (``position``): undoing it is enough."""
        with self._write() as connection:
            return [self._unclaim(connection, task) for task in tasks]

    @staticmethod
    def _unclaim(connection: sqlite3.Connection, task: Task) -> bool:
        claimed = connection.execute(
            "SELECT profile, started_at FROM jobqueue_tasks WHERE identifier = ? AND status = 'running'"
            " AND attempts = ?", (task.identifier, task.attempts)).fetchone()
        if claimed is None:
            return False
        connection.execute(
            "UPDATE jobqueue_tasks SET status = 'waiting', status_rank = 0, attempts = attempts - 1, worker = NULL,"
            " started_at = NULL, lease_until = NULL WHERE identifier = ?", (task.identifier,))
        connection.execute(  # never started: no start counted against a rate
            "DELETE FROM jobqueue_starts WHERE rowid IN"
            " (SELECT rowid FROM jobqueue_starts WHERE profile = ? AND at = ? LIMIT 1)",
            (claimed["profile"], claimed["started_at"]))
        return True

    def _set_progress(self, task: Task, progress: str) -> bool:
        with self._write() as connection:
            cursor = connection.execute(
                "UPDATE jobqueue_tasks SET progress = ? WHERE identifier = ? AND status = 'running' AND attempts = ?",
                (progress, task.identifier, task.attempts))
        return cursor.rowcount == 1

    def _where(self, query: Filter) -> tuple:
        clauses, args = [], []
        if query.profile is not None:
            clauses.append("profile = ?")
            args.append(query.profile)
        if query.status is not None:
            clauses.append("status_rank = ?")
            args.append(query.status.rank)
        if query.tags:
            marks = ", ".join("?" * len(query.tags))
            clauses.append(f"seq IN (SELECT seq FROM jobqueue_tags WHERE tag IN ({marks}))")
            args.extend(query.tags)
        return (" WHERE " + " AND ".join(clauses) if clauses else ""), args

    def _search(self, query: Filter) -> list[Task]:
        where, args = self._where(query)
        limit = -1 if query.limit is None else query.limit
        rows = self._connection().execute(
            f"SELECT * FROM jobqueue_tasks{where} ORDER BY {_SQLITE_ORDERS[query.order]} LIMIT ? OFFSET ?",
            (*args, limit, query.offset),
        ).fetchall()
        return [_decode_task(row) for row in rows]

    def _count(self, query: Filter) -> int:
        where, args = self._where(query)
        return self._connection().execute(f"SELECT COUNT(*) AS n FROM jobqueue_tasks{where}", args).fetchone()["n"]

    def _delete(self, identifier: str) -> bool:
        with self._write() as connection:
            row = self._seq_and_status(connection, identifier)
            if row is None:
                return False
            self._settle(connection, identifier, None, self.clock())
            connection.execute("DELETE FROM jobqueue_tags WHERE seq = ?", (row["seq"],))
            connection.execute("DELETE FROM jobqueue_tasks WHERE seq = ?", (row["seq"],))
        return True

    def _purge(self, ended_before: float, statuses: tuple) -> int:
        removed = 0
        with self._write() as connection:
            for status in statuses:
                ended = ("FROM jobqueue_tasks WHERE status_rank = ? AND finished_at IS NOT NULL"
                         " AND finished_at < ?")
                connection.execute(f"DELETE FROM jobqueue_tags WHERE seq IN (SELECT seq {ended})",
                                   (status.rank, ended_before))
                removed += connection.execute(f"DELETE {ended}", (status.rank, ended_before)).rowcount
        return removed

    def _flush(self) -> int:
        with self._write() as connection:
            connection.execute("DELETE FROM jobqueue_tags")
            connection.execute("DELETE FROM jobqueue_dependents")
            connection.execute("DELETE FROM jobqueue_counters WHERE name LIKE 'completed:%'")
            connection.execute("DELETE FROM jobqueue_limits")
            connection.execute("DELETE FROM jobqueue_starts")
            return connection.execute("DELETE FROM jobqueue_tasks").rowcount

    def _restore(self, now: float, include_leased: bool) -> int:
        with self._write() as connection:
            stale = connection.execute(
                "SELECT seq FROM jobqueue_tasks WHERE status = 'failed' OR (status = 'running'"
                " AND (? OR lease_until IS NULL OR lease_until <= ?)) ORDER BY created_at, seq",
                (include_leased, now),
            ).fetchall()
            positions = self._positions(connection, len(stale))
            connection.executemany(_SQLITE_REQUEUE, [(p, row["seq"]) for p, row in zip(positions, stale)])
        return len(stale)

    def _stats(self) -> dict[tuple, int]:
        rows = self._connection().execute(
            "SELECT profile, status, COUNT(*) AS n FROM jobqueue_tasks GROUP BY profile, status_rank"
        ).fetchall()
        return {(row["profile"], row["status"]): row["n"] for row in rows}

    def _completed(self) -> dict[tuple, int]:
        rows = self._connection().execute(
            "SELECT name, value FROM jobqueue_counters WHERE name LIKE 'completed:%'"
        ).fetchall()
        return {tuple(row["name"].split(":")[1:]): row["value"] for row in rows}

    def _ping(self) -> None:
        self._connection().execute("SELECT 1").fetchone()

    def _put_schedule(self, schedule: Schedule, first: float, now: float) -> None:
        with self._write() as connection:
            connection.execute(
                "INSERT INTO jobqueue_schedules (name, definition, next_run_at) VALUES (?, ?, ?) ON CONFLICT (name)"
                " DO UPDATE SET definition = excluded.definition, next_run_at = excluded.next_run_at,"
                " last_run_at = NULL", (schedule.name, schedule.stored(), first))

    def _schedules(self) -> list[Schedule]:
        rows = self._connection().execute("SELECT * FROM jobqueue_schedules").fetchall()
        return [self._stored_schedule(row["definition"], row["next_run_at"], row["last_run_at"]) for row in rows]

    def _remove_schedule(self, name: str) -> bool:
        with self._write() as connection:
            return connection.execute("DELETE FROM jobqueue_schedules WHERE name = ?", (name,)).rowcount == 1

    def _run_schedules(self, now: float) -> list[Task]:
        """One transaction moves each due schedule on and adds its task; a cheap read first when none is due."""
        due = "SELECT * FROM jobqueue_schedules WHERE next_run_at <= ? ORDER BY next_run_at, name"
        if self._connection().execute(due + " LIMIT 1", (now,)).fetchone() is None:
            return []
        tasks = []
        with self._write() as connection:
            for row in connection.execute(due, (now,)).fetchall():
                schedule = self._stored_schedule(row["definition"], None, None)
                connection.execute("UPDATE jobqueue_schedules SET next_run_at = ?, last_run_at = ? WHERE name = ?",
                                   (schedule.run_after(row["next_run_at"], now), now, row["name"]))
                tasks.append(schedule.task(row["next_run_at"]))
            stored = self.add(*tasks)
        return [task for task, kept in zip(tasks, stored) if kept is task]

    def close(self) -> None:
        connection = getattr(self._local, "connection", None)
        if connection is not None:
            connection.close()
            self._local.__dict__.clear()


# == DSN =====================================================================

def _sqlite_file(dsn: str) -> str:
    """The file of ``sqlite:///relative.db``, ``sqlite:////absolute.db`` or a bare path; '' for anything else."""
    if dsn.lower().startswith("sqlite:///"):
        return dsn[len("sqlite:///"):]
    return "" if "://" in dsn else dsn


def queue_from_dsn(dsn: str) -> Queue:
    """Build a queue from a DSN.

    ``redis://``, ``rediss://``, ``unix://``, ``tcp://host:port``,
    ``redis+sentinel://`` and ``redis+cluster://`` select Redis through
    redis-py (``?prefix=name`` names the queue, ``?replicas=N`` waits for N
    replicas); ``sqlite:///relative.db``, ``sqlite:////absolute.db`` or a
    bare path select SQLite.
    """
    if not isinstance(dsn, str) or not dsn.strip():
        raise ConfigurationError("A queue DSN is needed, such as redis://localhost:6379 or jobqueue.db")
    scheme = dsn.split("://", 1)[0].lower() if "://" in dsn else ""
    if scheme in _REDIS_SCHEMES:
        parsed = RedisDSN.parse(dsn)
        try:
            client = parsed.connect()
        except JobQueueError:
            raise
        except Exception as error:
            raise BackendUnavailable(f"{parsed.text} is unavailable: {error}") from error
        return RedisQueue(client, parsed.prefix, replicas=parsed.replicas, description=parsed.text.split("?")[0])
    if scheme == "sqlite":
        path = _sqlite_file(dsn)
        if not path:
            raise ConfigurationError(f'"{dsn}" names no file: use sqlite:///path/to/jobqueue.db')
        return SQLiteQueue(path)
    if scheme:
        raise ConfigurationError(
            f'Unsupported DSN "{redact(dsn)}": use redis://, rediss://, unix://, tcp://host:port, '
            "redis+sentinel://, redis+cluster:// or sqlite:///path"
        )
    return SQLiteQueue(dsn)


# == Worker ==================================================================


def format_error(error: BaseException) -> str:
    """The stored error: type and message, then the traceback, at most 64 KiB."""
    text = f"{type(error).__name__}: {error}\n" + "".join(
        traceback.format_exception(type(error), error, error.__traceback__)
    )
    encoded = text.encode("utf-8")
    if len(encoded) <= ERROR_MAX_BYTES:
        return text
    marker = "\n[... cut to 64 KiB ...]"
    return encoded[: ERROR_MAX_BYTES - len(marker)].decode("utf-8", "ignore") + marker


def _encode_result(value: Any) -> Any:
    """Check that a job's return value can be stored; raise JobError saying why not."""
    try:
        text = json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as error:
        raise JobError(f"The job returned a result that is not JSON-serialisable: {error}") from None
    if len(text.encode("utf-8")) > RESULT_MAX_BYTES:
        raise JobError("The job returned a result over 1 MiB of JSON")
    return value


_UNAVAILABLE = object()


def _asyncio() -> Any:
    import asyncio

    return asyncio


def _run_loop(loop: Any) -> None:
    try:
        loop.run_forever()
    finally:
        loop.close()


def _simple_queue() -> Any:
    import queue

    return queue.SimpleQueue()


def _is_coroutine_job(target: Any) -> bool:
    import inspect

    return inspect.iscoroutinefunction(target.perform if isinstance(target, type) else target)


def _job_instance(target: type, task: Task) -> Job:
    instance = target()
    instance.logger = logging.getLogger(f"jobqueue.job.{task.job_name}")
    return instance


def _perform(target: Any, task: Task) -> Any:
    if not isinstance(target, type):
        return target(task)
    instance = _job_instance(target, task)
    instance.set_up(task)
    try:
        return instance.perform(task)
    finally:
        instance.tear_down(task)


async def _perform_async(target: Any, task: Task) -> Any:
    """A coroutine job: ``async def perform`` (set_up and tear_down may be either) or an async @job function."""
    import inspect

    if not isinstance(target, type):
        return await target(task)
    instance = _job_instance(target, task)
    if inspect.isawaitable(prepared := instance.set_up(task)):
        await prepared
    try:
        return await instance.perform(task)
    finally:
        if inspect.isawaitable(cleaned := instance.tear_down(task)):
            await cleaned


async def _outcome_of(coroutine: Any) -> tuple[bool, Any]:
    """(True, value) or (False, error): a job's SystemExit must fail its task, not stop the event loop."""
    try:
        return True, await coroutine
    except _asyncio().CancelledError:
        raise
    except BaseException as error:  # noqa: BLE001 - handed to the worker thread that waits for it
        return False, error


class _Quota:
    """How many tasks the runners of one ``consume`` may still take, shared between them."""

    def __init__(self, limit: int | None):
        self.limit, self.taken, self.done = limit, 0, 0
        self._lock = threading.Lock()

    def take(self, wanted: int = 1) -> int:
        """Up to ``wanted`` tasks more, as many as the limit leaves (0: none)."""
        with self._lock:
            granted = wanted if self.limit is None else max(min(wanted, self.limit - self.taken), 0)
            self.taken += granted
            return granted

    def release(self, count: int = 1) -> None:
        with self._lock:
            self.taken -= count

    def finish(self) -> None:
        with self._lock:
            self.done += 1

    @property
    def exhausted(self) -> bool:
        return self.limit is not None and self.taken >= self.limit


def _async_raise(thread_id: int, exception: type | None) -> None:
    """Raise ``exception`` in another thread at its next Python instruction (None cancels)."""
    import ctypes

    ctypes.pythonapi.PyThreadState_SetAsyncExc(
        ctypes.c_ulong(thread_id), ctypes.py_object(exception) if exception is not None else None
    )


class _Guard:
    """Delivers an exception into one runner thread only while that thread runs job code.

    The runner sets ``inside`` around the job. The watchdog raises (with
    PyThreadState_SetAsyncExc) only while it is set, marking ``arming`` around
    its check-and-raise; the runner, leaving, clears ``inside``, waits out
    ``arming`` and cancels anything still pending, in a loop that absorbs an
    exception landing meanwhile. So a timeout lands in the job or in these few
    lines, never in a lock, a ``finally`` of the worker, or between tasks, and
    at most once per task. In the main thread, when the CLI installed a
    handler for ``wake_signal``, the watchdog sends that signal instead and the
    handler (``wake``) raises, which also stops a sleep or a blocking call.
    """

    def __init__(self, wake_signal: int | None):
        self.thread = threading.get_ident()
        self.wake_signal = wake_signal
        self.inside = self.arming = False
        self.due: type | None = None
        self.fired: type | None = None

    def reset(self) -> None:
        """A new run begins: forget what was fired at the last one."""
        self.due = self.fired = None

    def call(self, function: Callable[[], Any]) -> tuple[Any, BaseException | None]:
        """Run ``function()``; return (value, None) or (None, the exception it raised or was interrupted by).

        An exception fired since ``reset`` but before the job began (its import
        took all its time) is delivered at once, without running the job.
        """
        value, error, late = None, None, None
        try:
            try:
                self.inside = True
                while self.arming:
                    time.sleep(0)
                if self.due is not None and self.fired is None:
                    self.fired = self.due
                    return None, self.fired()
                value = function()
            except BaseException as caught:  # noqa: BLE001 - the caller decides what each means
                error = caught
            finally:
                late = self._leave()
        except BaseException as caught:  # noqa: BLE001 - an interruption that landed after the job
            late = self._leave() or caught
        if self.fired is not None:
            return None, self.fired()
        return value, late if isinstance(late, KeyboardInterrupt) else error

    def fire(self, exception: type) -> None:
        """From another thread: interrupt the job, if one runs, with ``exception``."""
        if self.wake_signal is not None:
            self.due = exception
            signal.pthread_kill(self.thread, self.wake_signal)
            return
        self.arming = True
        self.due = exception
        if self.inside and self.fired is None:
            self.fired = exception
            _async_raise(self.thread, exception)
        self.arming = False

    def wake(self) -> None:
        """In the guarded thread (a signal handler): raise what ``fire`` asked for, if the job still runs."""
        if self.inside and self.due is not None and self.fired is None:
            self.fired = self.due
            raise self.fired

    def _leave(self) -> BaseException | None:
        """Leave the job; return an interruption that landed here (a timeout is also recorded in ``fired``)."""
        landed = None
        while True:
            try:
                self.inside = False
                while self.arming:
                    time.sleep(0)
                if self.wake_signal is None and self.fired is not None:
                    _async_raise(self.thread, None)
                return landed
            except BaseException as caught:  # noqa: BLE001
                landed = caught


class _JobAbandoned(BaseException):
    """The worker stops at once (a second interrupt): the task in hand goes back to the queue."""


# The start of a Python process that loads this very file (by its path, whatever sys.path would find) as
# the module jobqueue, answering to every name a job may import it by.
_LOAD_BY_PATH = """\
import importlib, importlib.util, json, os, sys
def load(path):
    spec = importlib.util.spec_from_file_location("jobqueue", path)
    module = sys.modules["jobqueue"] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module._answer_to_import_names()
    return module
"""

_CHILD_BOOT = _LOAD_BY_PATH + """\
name, path, sys.path[:], level = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), int(sys.argv[4])
module = load(path) if name in ("__main__", "jobqueue") else importlib.import_module(name)
module._serve_isolated(level, int(sys.argv[5]))
"""


class _Child:
    """A long-lived process that runs a worker thread's tasks one at a time (``isolation="process"``).

    The worker sends each task as a JSON line and reads the outcome back as
    one; meanwhile its watchdog renews the lease. At the timeout, or when the
    task is cancelled, the child is killed (SIGKILL) and the next task starts
    a new one, as it does after a child died (a signal, an exit, memory
    exhausted). The job's progress comes back as lines of its own, which the
    worker stores. bench/RESULTS.md has the measurement that chose this over
    a fork per task.
    """

    def __init__(self, worker: Worker):
        self.worker = worker
        self.process: Any = None
        self.cancelled = False
        self._buffer = b""

    def run(self, task: Task, timeout: float | None) -> tuple[Any, str | None]:
        deadline = None if timeout is None else time.monotonic() + timeout
        if self.process is None or self.process.poll() is not None:
            self._start()
        try:
            self.process.stdin.write(json.dumps(task.to_json()).encode() + b"\n")
            self.process.stdin.flush()
            while (line := self._read_line(deadline)) and "progress" in (outcome := json.loads(line)):
                self.worker._store_progress(task, *outcome["progress"])
        except BaseException:
            self.close()
            raise
        if line is None:
            self.close()
            return None, CANCELLED if self.cancelled else f"Timed out after {timeout:g} s (job process killed)\n"
        if not line:
            return None, self._death()
        return outcome.get("result"), outcome.get("error")

    def _start(self) -> None:
        import subprocess

        root = logging.getLogger()
        self.process = subprocess.Popen(
            [sys.executable, "-c", _CHILD_BOOT, __name__, os.path.abspath(__file__), json.dumps(sys.path),
             str(root.getEffectiveLevel() if root.handlers else 0), str(os.getpid())],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        )
        self._buffer = b""

    def _read_line(self, deadline: float | None) -> bytes | None:
        """One line from the child, b"" if it died, None at the deadline or once cancelled (the child still runs)."""
        import select

        fd = self.process.stdout.fileno()
        while b"\n" not in self._buffer:
            if self.worker._aborting:
                raise _JobAbandoned
            if self.cancelled:
                return None
            wait = 0.25 if deadline is None else min(max(deadline - time.monotonic(), 0), 0.25)
            if not select.select([fd], [], [], wait)[0]:
                if deadline is not None and time.monotonic() >= deadline:
                    return None
                continue
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                return b""
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line

    def _death(self) -> str:
        code = self.process.wait()
        self.process = None
        if code < 0:
            name = signal.Signals(-code).name if -code in signal.valid_signals() else str(-code)
            return f"Job process died: killed by signal {name}\n"
        return f"Job process died: exit status {code}\n"

    def close(self) -> None:
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            process.kill()
        if process is not None:
            process.wait()
            for stream in (process.stdin, process.stdout):
                with contextlib.suppress(OSError):
                    stream.close()


def _die_with_parent(signum: int, parent: int) -> bool:
    """Ask Linux to send ``signum`` to this process when ``parent`` ends; False where that is not offered."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(1, signum, 0, 0, 0)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # it ended before we asked
        os.kill(os.getpid(), signum)
    return True


class _Slot:
    """Where one runner executes its tasks: its own thread (guarded), or its own child process."""

    def __init__(self, worker: Worker):
        self.worker = worker
        main = threading.current_thread() is threading.main_thread()
        self.guard = _Guard(worker.wake_signal if main else None)
        self.child = _Child(worker) if worker.isolation == "process" else None
        self.cancelled = False
        worker._guards[self.guard.thread] = self.guard

    def prepare(self) -> None:
        """Before a task: nothing cancelled yet."""
        self.cancelled = False
        if self.child is not None:
            self.child.cancelled = False

    def cancel(self) -> None:
        """From the watchdog: the task in hand was cancelled; kill its child, or raise JobCancelled in its job."""
        self.cancelled = True
        if self.child is not None:
            self.child.cancelled = True
        else:
            self.guard.fire(JobCancelled)

    def execute(self, task: Task, timeout: float | None) -> tuple[Any, str | None]:
        """Run the job; return (result, None) or (None, the error text to record)."""
        if self.child is not None:
            return self.child.run(task, timeout)
        try:
            target = self.worker._target(task)
        except (Exception, SystemExit) as error:  # noqa: BLE001 - a job that cannot be imported fails its task
            return None, format_error(error)
        task.__dict__["_report_progress"] = functools.partial(self.worker._store_progress, task)
        value, error = self.guard.call(lambda: self.worker._execute(target, task))
        task.__dict__.pop("_report_progress", None)
        if isinstance(error, JobTimeout):
            return None, f"Timed out after {timeout:g} s\n"
        if isinstance(error, JobCancelled):
            return None, CANCELLED
        if isinstance(error, (KeyboardInterrupt, _JobAbandoned)):
            raise error
        return value, None if error is None else format_error(error)

    def close(self) -> None:
        self.worker._guards.pop(self.guard.thread, None)
        if self.child is not None:
            self.child.close()


def _serve_isolated(log_level: int, worker_pid: int) -> None:
    """The loop of an isolated child: a task per line on stdin, its outcome per line on the original stdout.

    The job's own prints go to stderr. SIGINT is ignored: the worker decides
    whether a task ends or is abandoned; if the worker dies, so does the child.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _die_with_parent(signal.SIGKILL, worker_pid)
    if log_level:
        logging.basicConfig(level=log_level, format=LOG_FORMAT)
    replies = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    targets: dict[str, Any] = {}
    loop = None

    def report(fraction: float, message: str | None) -> None:
        replies.write(json.dumps({"progress": [fraction, message]}) + "\n")
        replies.flush()

    for line in sys.stdin:
        task = Task.from_json(json.loads(line))
        task.__dict__["_report_progress"] = report
        try:
            target = targets.get(task.job) or targets.setdefault(task.job, resolve_job(task.job))
            if _is_coroutine_job(target):
                loop = loop or _asyncio().new_event_loop()
                ok, value = loop.run_until_complete(_outcome_of(_perform_async(target, task)))
                if not ok:
                    raise value
            else:
                value = _perform(target, task)
            outcome = {"result": _encode_result(value)}
        except BaseException as error:  # noqa: BLE001 - SystemExit too: every error fails the task
            outcome = {"error": format_error(error)}
        replies.write(json.dumps(outcome) + "\n")
        replies.flush()


@dataclass
class _WatchedRun:
    task: Task
    guard: _Guard | None
    deadline: float | None
    renew_at: float
    on_cancel: Callable[[], None] | None = None
    check_at: float = math.inf

    @property
    def due(self) -> float:
        return min(self.renew_at, self.deadline or math.inf, self.check_at)


class _Batch:
    """One runner's tasks claimed but not started yet (``held``), and outcomes not recorded yet.

    A runner claims as many tasks as it expects to start within
    PREFETCH_WINDOW, judged by how long its recent runs took (at most the
    worker's ``prefetch``), and records their outcomes together, with its next
    claim, once it has run them: one round trip for a batch of short jobs.
    The watchdog keeps the promise that makes this safe: what is still held
    when the window has passed goes back at once (other workers take those
    tasks, in their order, and a task of an earlier profile or a higher
    priority waits no longer than the window); outcomes left unrecorded that
    long are recorded, and their events dispatched; held tasks' leases are
    renewed, and those cancelled or taken back meanwhile are skipped. Events
    are dispatched once outcomes are stored.
    """

    def __init__(self, prefetch: int, quota: _Quota):
        self.prefetch, self.quota = prefetch, quota
        self.skipped: set[tuple[str, int]] = set()  # held runs cancelled or taken back meanwhile: never to start
        self.flush_at = math.inf  # when the oldest unrecorded outcome is due to be recorded
        self.held_since = math.inf  # when the tasks held now were claimed
        self.recording = threading.Lock()  # one record at a time: none is left half done when the runner stops
        self._held: collections.deque[Task] = collections.deque()
        self._ended: list[tuple[Task, bool, float]] = []  # (task, cancelled, seconds) not recorded yet
        self._recorded: list[tuple[Task, bool, float, bool]] = []  # ... and stored: events still to dispatch
        self._typical: float | None = None
        self._lock = threading.Lock()

    def size(self) -> int:
        """How many tasks to claim next."""
        if self.prefetch <= 1 or self._typical is None:
            return 1
        return max(1, min(self.prefetch, int(PREFETCH_WINDOW / max(self._typical, 1e-6))))

    @property
    def due(self) -> float:
        """When the watchdog should look at this batch next."""
        return min(self.flush_at, self.held_since + PREFETCH_WINDOW)

    @property
    def held(self) -> bool:
        return bool(self._held)

    @property
    def unrecorded(self) -> bool:
        return bool(self._ended)

    def hold(self, tasks: Sequence[Task]) -> None:
        with self._lock:
            self._held.extend(tasks)
            self.held_since = time.monotonic()

    def next(self) -> Task | None:
        """The next held task to start; None if there is none (or it was cancelled or taken back meanwhile)."""
        with self._lock:
            if not self._held:
                return None
            task = self._held.popleft()
            if not self._held:
                self.held_since = math.inf
            run = (task.identifier, task.attempts)
        if run in self.skipped:
            self.skipped.discard(run)
            self.quota.release()
            return None
        return task

    def take_held(self, claimed_at: float | None = None) -> list[Task]:
        """All held tasks; with ``claimed_at``, only if they are still those claimed then."""
        with self._lock:
            if claimed_at is not None and claimed_at != self.held_since:
                return []
            held, self._held, self.held_since = list(self._held), collections.deque(), math.inf
            return held

    def end(self, task: Task, cancelled: bool, seconds: float) -> None:
        """Keep a run's outcome for the next record."""
        self._typical = seconds if self._typical is None else (self._typical + seconds) / 2
        with self._lock:
            self._ended.append((task, cancelled, seconds))
            if len(self._ended) == 1:
                self.flush_at = time.monotonic() + PREFETCH_WINDOW

    def take_ended(self) -> list[tuple[Task, bool, float]]:
        with self._lock:
            ended, self._ended, self.flush_at = self._ended, [], math.inf
            return ended

    def put_back(self, ended: list[tuple[Task, bool, float]]) -> None:
        """Outcomes whose record failed (an outage), to be tried again in a second, or with the next claim."""
        with self._lock:
            self._ended[:0] = ended
            self.flush_at = time.monotonic() + 1.0

    def stored(self, ended: list[tuple[Task, bool, float]], recorded: Sequence[bool]) -> None:
        with self._lock:
            self._recorded += [(*run, bool(stored)) for run, stored in zip(ended, recorded)]

    def take_recorded(self) -> list[tuple[Task, bool, float, bool]]:
        with self._lock:
            recorded, self._recorded = self._recorded, []
            return recorded


class _Watchdog:
    """Renews the lease of every task in hand and fires the timeouts of in-thread jobs, from a thread of its own.

    It never blocks on the job: a job that holds the GIL in C code delays it
    (that is what ``isolation="process"`` is for). A renewal that fails, for
    any reason, is logged and tried again at the next third of the lease.
    """

    def __init__(self, worker: Worker):
        self.worker = worker
        self._condition = threading.Condition()
        self._thread: threading.Thread | None = None  # the watchdog thread; one that is no longer it ends
        self._runs: dict[int, _WatchedRun] = {}
        self._held: dict[int, _WatchedRun] = {}  # by id(task): tasks claimed, not started yet (see _Batch)
        self._batches: list[_Batch] = []
        self._wakes_at = -math.inf  # when the watchdog thread, waiting, wakes next (-inf: it is not waiting)

    @contextlib.contextmanager
    def watching(self, task: Task, guard: _Guard | None, timeout: float | None,
                 on_cancel: Callable[[], None] | None = None) -> Iterator[None]:
        """Renew the task's lease and fire its timeout meanwhile; call ``on_cancel`` if it gets cancelled."""
        if guard is not None:
            guard.reset()
        now = time.monotonic()
        run = _WatchedRun(task, guard, None if timeout is None else now + timeout, now + self._lease(task) / 3,
                          on_cancel, math.inf if on_cancel is None else now + CANCEL_CHECK_INTERVAL)
        with self._condition:
            self._runs[id(run)] = run
            self._start(run.due)
        try:
            yield
        finally:
            with self._condition:
                self._runs.pop(id(run), None)

    def hold(self, batch: _Batch, tasks: Sequence[Task]) -> None:
        """Renew the leases of tasks claimed ahead, and note in ``batch`` those cancelled or taken back (gone),
        until they start."""
        now = time.monotonic()
        with self._condition:
            for task in tasks:
                self._held[id(task)] = _WatchedRun(
                    task, None, None, now + self._lease(task) / 3,
                    lambda task=task: (batch.skipped.add((task.identifier, task.attempts)),
                                       self._held.pop(id(task), None)),
                    now + CANCEL_CHECK_INTERVAL)
            if batch not in self._batches:
                self._batches.append(batch)
            self._start(now + CANCEL_CHECK_INTERVAL)

    def unhold(self, task: Task) -> None:
        with self._condition:
            self._held.pop(id(task), None)

    def look_at(self, batch: _Batch) -> None:
        """``batch`` has a new due time (an outcome waits while tasks are held)."""
        with self._condition:
            self._start(batch.due)

    def forget(self, batch: _Batch) -> None:
        with self._condition:
            if batch in self._batches:
                self._batches.remove(batch)

    def _start(self, due: float) -> None:
        """(With the condition held.) Start the watchdog thread, or wake it if ``due`` comes before it would
        wake anyway: not once a task, which would cost the runner a thread switch each time."""
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._loop, name=f"{self.worker.name}-watchdog", daemon=True)
            self._thread.start()
        elif due < self._wakes_at:
            self._condition.notify()

    def close(self) -> None:
        with self._condition:
            self._thread = None  # a closing thread that a new consume() finds still alive is not reused
            self._condition.notify_all()

    def _lease(self, task: Task) -> float:
        return task.lease or self.worker.lease  # type: ignore[return-value]

    def _loop(self) -> None:
        me = threading.current_thread()
        while True:
            with self._condition:
                while self._thread is me:
                    now = time.monotonic()
                    runs = [*self._runs.values(), *self._held.values()]
                    due = min(min((run.due for run in runs), default=math.inf),
                              min((batch.due for batch in self._batches), default=math.inf))
                    if now >= due:
                        break
                    self._wakes_at = due
                    self._condition.wait(None if due == math.inf else due - now)
                    if self._thread is me:
                        self._wakes_at = -math.inf
                if self._thread is not me:
                    return
                renewals = []
                batches = [batch for batch in self._batches if now >= batch.due]
                for run in runs:
                    if run.deadline is not None and now >= run.deadline:
                        run.deadline = None
                        if run.guard is not None:
                            run.guard.fire(JobTimeout)
                    if now >= run.renew_at:
                        run.renew_at = now + self._lease(run.task) / 3
                        renewals.append(run.task)
                checks = [run for run in runs if now >= run.check_at]
                for run in checks:
                    run.check_at = now + CANCEL_CHECK_INTERVAL
            for task in renewals:
                self._renew(task)
            if checks:
                self._stop_cancelled(checks)
            for batch in batches:
                self._look_after(batch, now)

    def _look_after(self, batch: _Batch, now: float) -> None:
        """Give back what was held past the window; record outcomes that waited as long, and tell of them."""
        claimed_at = batch.held_since
        if now >= claimed_at + PREFETCH_WINDOW:
            self.worker._return_held(batch, "held past the prefetch window", logging.DEBUG, claimed_at)
        if now >= batch.flush_at:
            try:
                self.worker._record(batch)
            except Exception as error:  # noqa: BLE001 - the watchdog must outlive any backend error
                self.worker.logger.debug("Outcomes not recorded yet: %s", error)
                return
            # The runner is in a long job: its listeners hear of these now, from a thread of their own.
            threading.Thread(target=self.worker._report_recorded, args=(batch,), daemon=True,
                             name=f"{self.worker.name}-events").start()

    def _stop_cancelled(self, runs: list[_WatchedRun]) -> None:
        """Ask the queue which runs were cancelled, and which held ones are gone; stop those still in hand, once."""
        running = [run.task for run in runs if self._runs.get(id(run)) is run]
        held = [run.task for run in runs if self._held.get(id(run.task)) is run]
        try:  # an empty list reads nothing: held tasks rarely live to a check (given back after 10 ms)
            cancelled = self.worker.queue.cancelled(running) | self.worker.queue.gone(held)
        except Exception as error:  # noqa: BLE001 - the watchdog must outlive any backend error
            self.worker.logger.debug("Cancellations not checked: %s", error)
            return
        with self._condition:
            for run in runs:
                held = self._held.get(id(run.task)) is run
                if run.task.identifier in cancelled and (held or self._runs.get(id(run)) is run) and run.on_cancel:
                    self.worker.logger.warning("%s %s %s", run.task.identifier, run.task.job_name,
                                               "no longer ours: it will not start" if held
                                               else "cancelled: stopping its job")
                    run.on_cancel()
                    run.on_cancel, run.check_at = None, math.inf

    def _renew(self, task: Task) -> None:
        try:
            if not self.worker.queue.renew(task, self.worker.lease):  # type: ignore[arg-type]
                self.worker.logger.warning("%s %s: lease lost (recovered or changed elsewhere)",
                                           task.identifier, task.job_name)
        except Exception as error:  # noqa: BLE001 - the watchdog must outlive any backend error
            self.worker.logger.debug("%s: lease not renewed: %s", task.identifier, error)


class Worker:
    """Takes tasks of one profile, or of several, from a queue and runs them.

    With several profiles (a list, or ``"high,default"``) it always takes the
    next ready task of the first profile in the list that has one.

    ``consume(quantity)`` loops until ``quantity`` tasks ran (forever if None),
    or until the profile is empty with ``burst=True``, or until ``stop()``.
    ``run(task)`` handles one fetched task and returns it, so tests can drive
    a worker in-process.

    ``threads=N`` runs up to N tasks at once, each in a thread of the worker
    (coroutine jobs run on one event loop the worker owns). ``isolation``
    says where a job's code runs: ``"thread"`` (in this process, fastest) or
    ``"process"`` (in a long-lived child process per thread, replaced when
    it dies or is killed at a timeout), for jobs that may crash, leak, or hold
    the GIL.

    While jobs are short it claims up to ``prefetch`` tasks at once and
    records their outcomes with its next claim (see ``_Batch``); ``prefetch=1``
    takes one at a time.

    A watchdog thread renews the lease of every task in hand every third of
    it and interrupts in-process jobs at their timeout; the interruption lands
    only in the job's own code (see ``_Guard``). Every ``maintenance_interval``
    seconds the worker returns tasks of lost workers to the queue (``recover``)
    and, with ``finished_ttl``, deletes finished tasks older than that. When
    the backend is unreachable, or does not answer, it waits and tries again,
    with capped backoff, logging one line per outage; a result it could not
    record is recorded once the backend is back.
    """

    def __init__(
        self,
        name: str | None,
        queue: Queue,
        profile: str | Sequence[str],
        dispatcher: EventDispatcher | None = None,
        *,
        poll: float = 1.0,
        lease: float = DEFAULT_LEASE,
        timeout: float | None = None,
        max_lost: int = DEFAULT_MAX_LOST,
        finished_ttl: float | None = None,
        isolation: str = "thread",
        threads: int = 1,
        prefetch: int = DEFAULT_PREFETCH,
    ):
        self.name = name or _default_worker_name()
        self.queue = queue
        self.profiles = _profiles(profile)
        self.profile = ",".join(self.profiles)
        self.dispatcher = dispatcher if dispatcher is not None else EventDispatcher()
        self.poll = poll
        self.lease = _seconds("lease", lease, allow_zero=False)
        self.timeout = _seconds("timeout", timeout, allow_zero=False)
        self.max_lost = max_lost
        self.finished_ttl = finished_ttl
        if isolation not in ISOLATIONS:
            raise ValidationError(f'isolation must be "thread" or "process", not "{isolation}"')
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise ValidationError("threads must be a whole number, 1 or more")
        self.isolation, self.threads = isolation, threads
        self.prefetch = _integer_in(prefetch, 1, MAX_FETCH, f"prefetch must be a whole number from 1 to {MAX_FETCH}")
        self.maintenance_interval = min(self.lease / 2, 5.0)  # type: ignore[operator]
        self.schedule_interval = 1.0
        self.logger = logging.getLogger("jobqueue.worker")
        self.wake_signal: int | None = None
        self.watchdog = _Watchdog(self)
        self._stopping = threading.Event()
        self._aborting = False
        self._maintenance = threading.Lock()
        self._next_maintenance = 0.0
        self._outage_since: float | None = None
        self._targets: dict[str, Any] = {}
        self._guards: dict[int, _Guard] = {}
        self._loop: Any = None
        self._loop_lock = threading.Lock()

    def stop(self) -> None:
        """Ask the worker to stop once the tasks in hand are done."""
        self._stopping.set()

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    def consume(self, quantity: int | None = None, *, burst: bool = False) -> int:
        """Run tasks until one of the stop conditions; return how many ran."""
        self.dispatcher.dispatch(WORKER_START, WorkerEvent(WORKER_START, self))
        quota = _Quota(quantity)
        schedules = self._run_schedules_meanwhile()
        try:
            if self.threads == 1:
                self._serve(quota, burst)
            else:
                self._serve_in_threads(quota, burst)
        finally:
            schedules.set()
            self.watchdog.close()
            self._close_loop()
            self.dispatcher.dispatch(WORKER_FINISHED, WorkerEvent(WORKER_FINISHED, self))
        return quota.done

    def _run_schedules_meanwhile(self) -> threading.Event:
        """Run the queue's due schedules every ``schedule_interval`` seconds, from a thread of its own, until
        the returned event is set: while any worker runs, busy or idle, a due run is added within a second."""
        done, last_error = threading.Event(), [""]

        def tick() -> None:
            while True:
                try:
                    for task in self.queue.run_schedules():
                        self.logger.info("%s %s added by schedule %s", task.identifier, task.job_name, task.schedule)
                    last_error[0] = ""
                except Exception as error:  # noqa: BLE001 - an outage is the fetch loop's to report
                    if str(error) != last_error[0] and not isinstance(error, (BackendUnavailable, OSError)):
                        self.logger.warning("Schedules not run: %s: %s", type(error).__name__, error)
                    last_error[0] = str(error)
                if done.wait(self.schedule_interval):
                    return

        threading.Thread(target=tick, name=f"{self.name}-schedules", daemon=True).start()
        return done

    def run(self, task: Task) -> Task:
        """Run one fetched task, record its outcome and emit its events."""
        slot, batch = _Slot(self), _Batch(1, _Quota(None))
        try:
            self._run(task, slot, batch)
            self._backend(lambda: self._record(batch))
            self._report_recorded(batch)
        finally:
            slot.close()
        return task

    def interrupt_timed_out_job(self) -> None:
        """Raise JobTimeout if this thread's job is past its timeout: the handler of ``wake_signal``."""
        guard = self._guards.get(threading.get_ident())
        if guard is not None:
            guard.wake()

    def _serve_in_threads(self, quota: _Quota, burst: bool) -> None:
        """Run ``threads`` runners; a second interruption here stops their jobs and gives their tasks back."""
        runners = [threading.Thread(target=self._serve, args=(quota, burst), name=f"{self.name}-{number}",
                                    daemon=True) for number in range(1, self.threads + 1)]
        for runner in runners:
            runner.start()
        try:
            while any(runner.is_alive() for runner in runners):
                runners[0].join(0.1) if runners[0].is_alive() else runners.pop(0)
        except BaseException:
            self._aborting = True
            self._stopping.set()
            for guard in list(self._guards.values()):
                guard.fire(KeyboardInterrupt)
            for runner in runners:
                runner.join(10)
            raise

    def _serve(self, quota: _Quota, burst: bool) -> None:
        """One runner: claim, run, record, until the quota, the end of a burst, or a stop (see _Batch)."""
        slot, batch, interrupted = _Slot(self), _Batch(self.prefetch, quota), False
        try:
            while not self.stopping:
                self._report_recorded(batch)
                if not batch.held:
                    if not self._claim(batch, quota, burst) and (burst or quota.exhausted):
                        break
                    continue
                task = batch.next()
                if task is None:
                    continue
                self.watchdog.unhold(task)
                self._run(task, slot, batch)
                quota.finish()
        except (KeyboardInterrupt, _JobAbandoned):
            interrupted = True
            if threading.current_thread() is threading.main_thread():
                raise
        finally:
            try:
                self._let_go(batch, interrupted)
            finally:
                slot.close()

    def _claim(self, batch: _Batch, quota: _Quota, burst: bool) -> bool:
        """Record what the batch ran and claim the next tasks in one round trip; idle, wait for some."""
        wanted = 0 if self.stopping else quota.take(batch.size())
        claimed = self._backend(lambda: self._record(batch, wanted)) if batch.unrecorded else []
        claimed = [] if claimed is _UNAVAILABLE else claimed
        self._report_recorded(batch)
        if not claimed and wanted and not self.stopping:
            self.maintain()
            claimed = self._backend(
                lambda: self.queue.fetch_many(self.profiles, wanted, timeout=0 if burst else self.poll,
                                              worker=self.name, lease=self.lease),
                give_up_when_stopping=True,
            )
            claimed = [] if claimed is _UNAVAILABLE else claimed
        quota.release(wanted - len(claimed))
        if claimed:
            self.watchdog.hold(batch, claimed)
            batch.hold(claimed)
            self.watchdog.look_at(batch)
        return bool(claimed)

    def _record(self, batch: _Batch, fetch: int = 0) -> list[Task]:
        """Record the outcomes the batch keeps, claiming up to ``fetch`` tasks in the same round trip."""
        with batch.recording:
            ended = batch.take_ended()
            if not ended and not fetch:
                return []
            try:
                recorded, claimed = self.queue.complete_many([run[0] for run in ended], fetch, self.name,
                                                             self.lease, self.profiles)
            except BaseException:
                batch.put_back(ended)
                raise
            batch.stored(ended, recorded)
            return claimed

    def _report_recorded(self, batch: _Batch) -> None:
        """The events and log lines of runs whose outcomes are stored now (listeners find them so)."""
        for task, cancelled, seconds, stored in batch.take_recorded():
            if not stored and not cancelled:
                self.logger.warning("%s %s ended, but its lease had passed to another run: outcome not recorded",
                                    task.identifier, task.job_name)
            self._report(task, seconds)

    def _return_held(self, batch: _Batch, why: str, level: int = logging.WARNING,
                     claimed_at: float | None = None) -> None:
        """Give back, in one call, the tasks the batch holds (if still those claimed at ``claimed_at``)."""
        with batch.recording:
            tasks = batch.take_held(claimed_at)
            for task in tasks:
                self.watchdog.unhold(task)
            batch.quota.release(len(tasks))
            runs = {(task.identifier, task.attempts) for task in tasks}
            tasks = [task for task in tasks if (task.identifier, task.attempts) not in batch.skipped]
            batch.skipped -= runs
            if not tasks:
                return
            try:
                given = self.queue.give_back(tasks)
            except (JobQueueError, OSError) as error:
                self.logger.error("%d tasks %s and not given back (%s): their leases will expire", len(tasks), why,
                                  error)
                return
        for task, back in zip(tasks, given):
            if back:
                self.logger.log(level, "%s %s %s; back to waiting", task.identifier, task.job_name, why)

    def _let_go(self, batch: _Batch, interrupted: bool) -> None:
        """On the way out: record what ran (waiting out an outage, unless interrupted), give back what was
        claimed and never started."""
        self.watchdog.forget(batch)
        self._backend(lambda: self._record(batch), give_up_when_stopping=interrupted)
        self._report_recorded(batch)
        self._return_held(batch, "claimed but not started")

    def _run(self, task: Task, slot: _Slot, batch: _Batch) -> None:
        """Run ``task``; its outcome is kept in ``batch``, to be recorded with the next claim (or sooner)."""
        self.dispatcher.dispatch(TASK_FETCHED, TaskEvent(TASK_FETCHED, task, self))
        started = time.monotonic()
        timeout = task.timeout or self.timeout
        slot.prepare()
        try:
            with self.watchdog.watching(task, slot.guard, timeout, slot.cancel):
                result, error = slot.execute(task, timeout)
        except BaseException:
            self._give_back(task, "interrupted")
            raise
        if slot.cancelled:
            task.status, task.error, task.result = Status.FAILED, CANCELLED, None
        elif error is None:
            try:
                task.result, task.error = _encode_result(result), None
                task.status = Status.FINISHED
            except JobError as refused:
                self._failed(task, format_error(refused))
        else:
            self._failed(task, error)
        task.finished_at = None if task.status is Status.WAITING else self._now()
        batch.end(task, slot.cancelled, time.monotonic() - started)
        if batch.held:
            self.watchdog.look_at(batch)

    def maintain(self, force: bool = False) -> None:
        """Recover tasks of lost workers and expire old finished tasks, when it is time to."""
        now = time.monotonic()
        if (not force and now < self._next_maintenance) or not self._maintenance.acquire(blocking=False):
            return
        try:
            self._next_maintenance = now + self.maintenance_interval
            recovered = self._backend(lambda: self.queue.recover(self.max_lost), give_up_when_stopping=True)
            for task in recovered if isinstance(recovered, list) else []:
                outcome = "failed for good" if task.status is Status.FAILED else "back to waiting"
                self.logger.warning("%s %s recovered from lost worker %s: %s (lost %d times)",
                                    task.identifier, task.job_name, task.worker, outcome, task.lost)
                self.dispatcher.dispatch(TASK_RECOVERED, TaskEvent(TASK_RECOVERED, task, self))
            if self.finished_ttl:
                self._backend(lambda: self.queue.purge(self.finished_ttl, Status.FINISHED),
                              give_up_when_stopping=True)
        finally:
            self._maintenance.release()

    def _failed(self, task: Task, error: str) -> None:
        task.failures += 1
        task.error, task.result = error, None
        if task.failures <= task.retries:
            delay = min(task.retry_delay * 2 ** (task.failures - 1), RETRY_DELAY_MAX) * random.uniform(0.5, 1.0)
            task.status, task.run_at = Status.WAITING, self._now() + timedelta(seconds=delay)
        else:
            task.status = Status.FAILED

    def _now(self) -> datetime:
        """The queue's time (the Redis server's clock on Redis), so a worker's own clock never counts.

        During an outage the local clock stands in: the outcome it stamps is
        recorded only once the backend is back anyway.
        """
        try:
            return _from_timestamp(self.queue.clock())  # type: ignore[return-value]
        except (JobQueueError, OSError):
            return _utcnow()

    def _report(self, task: Task, seconds: float) -> None:
        summary = (task.error or "").split("\n", 1)[0]
        if task.status is Status.FINISHED:
            self.logger.info("%s %s finished in %.3fs", task.identifier, task.job_name, seconds)
            self.dispatcher.dispatch(TASK_EXECUTED, TaskEvent(TASK_EXECUTED, task, self))
        elif task.status is Status.WAITING:
            wait = (task.run_at - self._now()).total_seconds()  # type: ignore[operator]
            self.logger.warning("%s %s failed in %.3fs (failure %d of %d allowed; retrying in %.1fs): %s",
                                task.identifier, task.job_name, seconds, task.failures, task.retries + 1,
                                max(wait, 0), summary)
            self.dispatcher.dispatch(TASK_RETRIED, TaskEvent(TASK_RETRIED, task, self))
        else:
            self.logger.error("%s %s failed in %.3fs after %d attempts: %s",
                              task.identifier, task.job_name, seconds, task.attempts, summary)
            self.dispatcher.dispatch(TASK_FAILED, TaskEvent(TASK_FAILED, task, self))

    def _give_back(self, task: Task, why: str) -> None:
        """A task this worker will not finish (interrupted, or claimed last) goes back to waiting, due now."""
        task.status, task.run_at, task.error = Status.WAITING, self._now(), None
        try:
            given = self.queue.complete(task)
        except (JobQueueError, OSError) as error:
            self.logger.error("%s %s %s and not given back (%s): its lease will expire",
                              task.identifier, task.job_name, why, error)
            return
        if given:
            self.logger.warning("%s %s %s; back to waiting", task.identifier, task.job_name, why)

    def _backend(self, action: Callable[[], Any], give_up_when_stopping: bool = False) -> Any:
        """Run ``action`` until the backend answers, waiting with capped backoff meanwhile.

        Any BackendUnavailable, and any OSError (a refused or timed-out
        socket, an answer that never came) that a client lets out, is an
        outage. Returns _UNAVAILABLE instead of waiting further once the
        worker is stopping, if ``give_up_when_stopping``.
        """
        pause = 0.1
        while True:
            try:
                result = action()
            except (BackendUnavailable, OSError) as error:
                self._outage(error)
                if give_up_when_stopping and self.stopping:
                    return _UNAVAILABLE
                self._stopping.wait(pause) if give_up_when_stopping else time.sleep(pause)
                pause = min(pause * 2, 5.0)
                continue
            if self._outage_since is not None:
                self.logger.warning("Backend is back after %.1fs", time.monotonic() - self._outage_since)
                self._outage_since = None
            return result

    def _outage(self, error: BaseException) -> None:
        if self._outage_since is not None:
            return
        self._outage_since = time.monotonic()
        if not isinstance(error, BackendUnavailable):
            error = BackendUnavailable(f"{self.queue.describe()} is unavailable: {type(error).__name__}: {error}")
        self.logger.error("%s; worker %s keeps trying", error, self.name)

    def _store_progress(self, task: Task, fraction: float, message: str | None) -> None:
        """Store a job's progress at once; a backend that cannot take it now costs a log line, not the job."""
        try:
            self.queue.set_progress(task, fraction, message)
        except (JobQueueError, OSError) as error:
            self.logger.warning("%s %s: progress not stored: %s", task.identifier, task.job_name, error)

    def _target(self, task: Task) -> Any:
        target = self._targets.get(task.job)
        if target is None:
            target = self._targets[task.job] = resolve_job(task.job)
        return target

    def _execute(self, target: Any, task: Task) -> Any:
        """Run the task's job here; a coroutine job runs on the worker's event loop while this thread waits."""
        if not _is_coroutine_job(target):
            return _perform(target, task)
        future = _asyncio().run_coroutine_threadsafe(_outcome_of(_perform_async(target, task)), self._event_loop())
        done: Any = _simple_queue()
        future.add_done_callback(done.put)
        try:
            while True:
                with contextlib.suppress(Exception):
                    done.get(timeout=0.1)
                    break
        except BaseException:
            future.cancel()
            raise
        ok, value = future.result()
        if ok:
            return value
        raise value

    def _event_loop(self) -> Any:
        """The worker's own event loop, in a thread of its own, started with the first coroutine job."""
        with self._loop_lock:
            if self._loop is None:
                loop = _asyncio().new_event_loop()
                threading.Thread(target=_run_loop, args=(loop,), name=f"{self.name}-loop", daemon=True).start()
                self._loop = loop
            return self._loop

    def _close_loop(self) -> None:
        loop, self._loop = self._loop, None
        if loop is not None:
            loop.call_soon_threadsafe(loop.stop)


# == Configuration ===========================================================


def _whole_number(text: str) -> int:
    if not text.strip().isdigit() or int(text) < 1:
        raise ValidationError(f'"{text}" is not a whole number of 1 or more')
    return int(text)


def _setting(environ: Mapping[str, str], name: str, default: Any, convert: Callable[[str], Any]) -> Any:
    text = environ.get(name)
    if not text:
        return default
    try:
        return convert(text)
    except ValidationError as error:
        raise ConfigurationError(f"{name}: {error}") from None



@dataclass(frozen=True)
class Config:
    """Settings read from the environment in one place (``Config.from_env``)."""

    redis_dsn: str | None = None
    db: str = DEFAULT_DB
    env: str = "dev"
    jobs: tuple = ()
    imports: tuple = ()
    token: str | None = field(default=None, repr=False)
    origins: tuple = ()
    max_lost: int = DEFAULT_MAX_LOST
    finished_ttl: float | None = None
    outage_wait: float = DEFAULT_OUTAGE_WAIT

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Config:
        environ = os.environ if environ is None else environ
        return cls(
            redis_dsn=environ.get("JOBQUEUE_REDIS_DSN") or None,
            db=environ.get("JOBQUEUE_DB") or DEFAULT_DB,
            env=environ.get("JOBQUEUE_ENV") or "dev",
            jobs=allowed_jobs(environ),
            imports=_split_list(environ.get("JOBQUEUE_IMPORTS")),
            token=environ.get("JOBQUEUE_TOKEN") or None,
            origins=tuple(origin.lower().rstrip("/") for origin in _split_list(environ.get("JOBQUEUE_ORIGINS"))),
            max_lost=_setting(environ, "JOBQUEUE_MAX_LOST", DEFAULT_MAX_LOST, _whole_number),
            finished_ttl=_setting(environ, "JOBQUEUE_FINISHED_TTL", None, parse_duration),
            outage_wait=_setting(environ, "JOBQUEUE_OUTAGE_WAIT", DEFAULT_OUTAGE_WAIT, parse_duration),
        )

    def check_job(self, target: object) -> str:
        """The job's path, if ``JOBQUEUE_JOBS`` (when set) allows it; else JobNotAllowed."""
        return check_allowed(job_path(target), self.jobs)

    @property
    def dsn(self) -> str:
        return self.redis_dsn or self.db

    def missing_database(self) -> str | None:
        """The SQLite file's absolute path if that is the queue and the file does not exist yet."""
        if self.redis_dsn:
            return None
        path = _sqlite_file(self.db)
        return None if not path or os.path.exists(path) else os.path.abspath(path)

    def queue(self) -> Queue:
        return queue_from_dsn(self.dsn)


class ServiceContainer:
    """The configured queue and the shared event dispatcher, for user code.

    ``ServiceContainer.get_instance()`` is the one documented global: workers
    started from the command line dispatch their events on its dispatcher, so
    a module loaded with ``--import`` can listen to them. ``reset()`` drops it.
    """

    _instance: ServiceContainer | None = None
    _lock = threading.Lock()

    def __init__(self, config: Config | None = None):
        self.config = config if config is not None else Config.from_env()
        self.dispatcher = EventDispatcher()
        self._queue: Queue | None = None

    @property
    def queue(self) -> Queue:
        if self._queue is None:
            self._queue = self.config.queue()
        return self._queue

    @classmethod
    def get_instance(cls) -> ServiceContainer:
        with cls._lock:
            if cls._instance is None:
                cls._instance = cls()
            return cls._instance

    @classmethod
    def reset(cls) -> None:
        with cls._lock:
            cls._instance = None


# == HTTP ====================================================================

MAX_BODY_BYTES = 1024 * 1024
MAX_INTEGER = 2**63 - 1
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "[::1]")
BODY_METHODS = ("POST", "PUT", "PATCH", "DELETE")
LISTEN_BACKLOG = 1024
IDLE_THREAD_SECONDS = 10.0
DEFAULT_PAGE = 1000
MAX_PAGE = 10000
REQUEST_TIMEOUT = 30.0
HANDLERS_AT_ONCE = 2
http_log = logging.getLogger("jobqueue.http")


class FairGate:
    """Lets at most ``permits`` threads in at once, in the order they arrived.

    Fifty request threads all running at once queue for the GIL in no
    particular order (and SQLite releases it on every call), so a few
    requests wait behind many others again and again: a long tail. Through
    the gate each request waits its turn once and then runs nearly alone.
    """

    def __init__(self, permits: int) -> None:
        self._lock = threading.Lock()
        self._free = permits
        self._waiting: collections.deque = collections.deque()

    def __enter__(self) -> None:
        with self._lock:
            if self._free and not self._waiting:
                self._free -= 1
                return
            turn = threading.Lock()
            turn.acquire()
            self._waiting.append(turn)
        turn.acquire()

    def __exit__(self, *exc_info: object) -> None:
        with self._lock:
            if self._waiting:
                self._waiting.popleft().release()
            else:
                self._free += 1

    @contextlib.contextmanager
    def stepped_out(self) -> Iterator[None]:
        """Leave the gate while blocking on something else (a long poll), then queue again."""
        self.__exit__()
        try:
            yield
        finally:
            self.__enter__()


class HTTPError(JobQueueError):
    """An answer decided by the HTTP layer itself: 401, 404, 405, 411, 413…"""

    def __init__(self, status: int, message: str, headers: Mapping[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.headers = dict(headers or {})


@dataclass
class Request:
    """What a route handler sees of an HTTP request."""

    method: str
    path: str
    query: dict[str, list[str]] = field(default_factory=dict)
    headers: Mapping[str, str] = field(default_factory=dict)
    body: bytes = b""
    body_error: HTTPError | None = None
    params: dict[str, str] = field(default_factory=dict)

    def header(self, name: str) -> str | None:
        """The first value of a header, whatever its case (``headers`` is the server's HTTPMessage)."""
        return self.headers.get(name)

    def arg(self, name: str) -> str | None:
        """The value of a query parameter given at most once; an empty value counts as absent."""
        values = self.query.get(name)
        if values and len(values) > 1:
            raise ValidationError(f"{name} must be given once")
        return values[0] if values and values[0] != "" else None

    def list_arg(self, name: str) -> list[str]:
        """A list parameter, comma-separated (``tags=a,b``) or repeated (``tags=a&tags=b``)."""
        return [item for value in self.query.get(name, []) for item in value.split(",") if item]

    def int_arg(self, name: str, default: int, most: int = MAX_INTEGER) -> int:
        """A whole number in ASCII digits from 0 to ``most``; anything else is ValidationError."""
        text = self.arg(name)
        if text is None and not self.query.get(name):
            return default
        if text is None or not (text.isascii() and text.isdigit() and len(text) <= len(str(most))) or int(text) > most:
            raise ValidationError(f"{name} must be a whole number from 0 to {most}")
        return int(text)

    def json(self, known: Iterable[str] | None = None) -> dict[str, Any]:
        """The body as a JSON object, or ValidationError with the message a client can act on.

        With ``known``, a key outside it is refused by name: a typo must not pass as a missing option.
        """
        try:
            data = json.loads(self.body)
        except (ValueError, RecursionError):
            raise ValidationError("Malformed JSON") from None
        if not isinstance(data, dict):
            raise ValidationError("The JSON body must be an object")
        unknown = [key for key in data if known is not None and key not in known]
        if unknown:
            raise ValidationError(f'Unknown key "{unknown[0]}": this route knows {", ".join(known)}')  # type: ignore
        return data


@dataclass
class Response:
    status: int
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    content_type: str = "application/json"

    def payload(self) -> bytes:
        if self.status == 204 or self.body is None:
            return b""
        if isinstance(self.body, str):
            return self.body.encode("utf-8")
        try:
            return json.dumps(self.body, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            return json.dumps(self.body).encode("ascii")


@dataclass(frozen=True)
class Route:
    """A row of the routing table: what it matches, the WebService method that answers, and what
    /openapi.json says of it (``reply``: media type -> schema; ``errors``: codes besides 401 and 503;
    ``also``: other success codes, with the same reply, and what each means)."""

    method: str
    template: str
    handler: str
    summary: str
    public: bool = False
    ok: int = 200
    reply: Mapping[str, dict] = field(default_factory=lambda: {"application/json": {"type": "object"}})
    errors: tuple[int, ...] = ()
    body: dict | None = None
    query: tuple[tuple[str, dict, str], ...] = ()
    headers: Mapping[str, str] = field(default_factory=dict)
    also: Mapping[int, str] = field(default_factory=dict)

    @property
    def pattern(self) -> re.Pattern:
        return re.compile("^" + re.sub(r"\{(\w+)\}", r"(?P<\1>[^/]+)", self.template) + "$")


NEW_TASK_SCHEMAS = {**{column.name: column.metadata["new"] for column in TASK_FIELDS if column.metadata["new"]},
                    "delay": SECONDS_SCHEMA, "expires": POSITIVE_SECONDS}
NEW_TASK_KEYS = tuple(NEW_TASK_SCHEMAS)


@functools.cache
def time_zone_names() -> tuple[str, ...]:
    """The IANA zones this machine knows (what ``timezone`` may name over HTTP), UTC always."""
    import zoneinfo

    return tuple(sorted(zoneinfo.available_timezones() | {"UTC"}))


# PUT /schedule/{name}: a new task's keys, less when it runs, plus the schedule's; exactly one of cron and every.
def new_schedule_schemas() -> dict[str, Any]:
    return {
        **{name: NEW_TASK_SCHEMAS[name] for name in ("profile", "job", "parameters", "tags")},
        "cron": {"type": "string", "minLength": 1,
                 "description": "minute hour day month weekday, as cron reads them, or @hourly, @daily...;"
                                " an expression cron would refuse is a 400 naming the field at fault"},
        "every": {"type": "number", "minimum": 1, "maximum": DURATION_MAX, "description": "seconds"},
        "timezone": {"type": ["string", "null"], "enum": [*time_zone_names(), None],
                     "description": "the IANA time zone the cron expression reads; default UTC"},
        **{name: NEW_TASK_SCHEMAS.get(name, {}) for name in schedule_options()},
    }


NEW_SCHEDULE_KEYS = ("profile", "job", "parameters", "tags", "cron", "every", "timezone", *schedule_options())
SCHEDULE_NAME_SCHEMA = {"type": "string", "pattern": f"^{SCHEDULE_NAME_PATTERN.pattern}$"}


def host_name(host: str) -> str:
    """The name in a ``Host`` header or ``--host``: ``localhost:8080`` -> ``localhost``, ``[::1]:80`` -> ``[::1]``."""
    host = host.strip().lower()
    if host.startswith("["):
        return host.split("]", 1)[0] + "]"
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a name or address, any port) is this machine only: localhost, 127.0.0.0/8, ::1."""
    import ipaddress

    name = host_name(host).strip("[]")
    try:
        return name == "localhost" or ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False

@functools.cache
def _dashboard_headers() -> dict[str, str]:
    import base64
    import hashlib

    script = DASHBOARD_HTML.split("<script>", 1)[1].split("</script>", 1)[0]
    digest = base64.b64encode(hashlib.sha256(script.encode("utf-8")).digest()).decode("ascii")
    return {
        "Content-Security-Policy": f"default-src 'self'; script-src 'sha256-{digest}'; style-src 'unsafe-inline';"
                                   " img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
        "X-Content-Type-Options": "nosniff",
        "Cache-Control": "no-store",
    }

TASK_REPLY = {"application/json": {"$ref": "#/components/schemas/Task"}}
PATH_SCHEMAS = {"name": SCHEDULE_NAME_SCHEMA}
LIMITS_SCHEMA = {"type": "object", "additionalProperties": False, "properties": {
    "concurrency": {"type": ["integer", "null"], "minimum": 1, "maximum": RETRIES_MAX},
    "rate": {"type": ["string", "null"], "pattern": f"^{RATE_PATTERN.pattern}$"}}}
STATUS_COUNTS = {s.value: {"type": "integer"} for s in Status}
ROUTES = (
    Route("GET", "/", "dashboard", "The dashboard page (HTML; holds no data)", public=True,
          reply={"text/html": {"type": "string"}}),
    Route("GET", "/tasks", "list_tasks", "List tasks", errors=(400,), reply={"application/json": {
        "type": "array", "items": {"$ref": "#/components/schemas/Task"}}}, query=(
        ("profile", {**PROFILE_SCHEMA, "pattern": "^[_a-z0-9-]*$"}, "only this profile (empty: any)"),
        ("status", {"type": "string", "enum": [*STATUS_COUNTS, ""]}, "only this status (empty: any)"),
        ("tags", {"type": "string"}, "comma-separated; tasks with any of them"),
        ("order", {"type": "string", "enum": [*ORDERS, ""]}, "sort order, default status"),
        ("limit", {"type": "integer", "minimum": 0, "maximum": MAX_PAGE}, f"default {DEFAULT_PAGE}"),
        ("offset", {"type": "integer", "minimum": 0, "maximum": MAX_INTEGER}, "tasks to skip")),
          headers={"X-Total-Count": "how many match"}),
    Route("POST", "/tasks", "create_task", "Create a task", ok=201, reply=TASK_REPLY, errors=(400, 403, 409, 411, 413),
          body={"$ref": "#/components/schemas/NewTask"},
          also={200: "Nothing created: the task that holds the unique_key, waiting or running"}),
    Route("GET", "/task/{identifier}", "show_task", "Show a task; with wait=S, once it ends or after S seconds",
          reply=TASK_REPLY, errors=(400, 404), query=(
              ("wait", {"type": "number", "minimum": 0, "maximum": WAIT_MAX},
               f"seconds (up to {WAIT_MAX:g}) to wait for the task to end; it is answered as it is then"),)),
    Route("PATCH", "/task/{identifier}", "patch_task", "Set a task's status", reply=TASK_REPLY, errors=(400, 404),
          body={"type": "object", "required": ["status"], "additionalProperties": False, "properties": {
              "status": {"type": "string", "enum": [s for s in STATUS_COUNTS if s != Status.RUNNING]}}}),
    Route("DELETE", "/task/{identifier}", "delete_task", "Delete a task", ok=204, reply={}, errors=(404,)),
    Route("POST", "/task/{identifier}/retry", "retry_task", "Put a failed task back to waiting", reply=TASK_REPLY,
          errors=(400, 404, 409)),
    Route("GET", "/schedules", "list_schedules", "List schedules (periodic tasks) with their next and last runs",
          reply={"application/json": {"type": "array", "items": {"$ref": "#/components/schemas/Schedule"}}}),
    Route("PUT", "/schedule/{name}", "put_schedule", "Add a schedule, or replace the one of that name",
          reply={"application/json": {"$ref": "#/components/schemas/Schedule"}}, errors=(400, 403, 411, 413),
          body={"$ref": "#/components/schemas/NewSchedule"}),
    Route("DELETE", "/schedule/{name}", "delete_schedule", "Delete a schedule (its tasks stay)", ok=204, reply={},
          errors=(404,)),
    Route("GET", "/limits", "list_limits", "The limits of every profile that has some",
          reply={"application/json": {"type": "object", "additionalProperties": LIMITS_SCHEMA}}),
    Route("GET", "/profile/{profile}/limits", "show_limits", "A profile's limits",
          reply={"application/json": LIMITS_SCHEMA}, errors=(404,)),
    Route("PUT", "/profile/{profile}/limits", "set_limits", "Set a profile's limits (null or absent lifts one)",
          reply={"application/json": LIMITS_SCHEMA}, errors=(400, 404, 411, 413), body=LIMITS_SCHEMA),
    Route("POST", "/task/{identifier}/cancel", "cancel_task", "Cancel a waiting or running task (it ends failed)",
          reply=TASK_REPLY, errors=(404, 409)),
    Route("GET", "/stats", "stats", "Counts per profile and status", reply={"application/json": {
        "type": "object", "additionalProperties": {"type": "object", "properties": STATUS_COUNTS}}}),
    Route("GET", "/completed", "completed", "Runs completed per profile, finished and failed (counters)"),
    Route("GET", "/health", "health", "Whether the backend answers", public=True),
    Route("GET", "/metrics", "metrics", "Prometheus metrics", reply={"text/plain": {"type": "string"}}),
    Route("GET", "/openapi.json", "openapi", "This document (OpenAPI 3.1)"),
)


def _operation(route: Route) -> dict[str, Any]:
    """One route as an OpenAPI operation; errors answer the Error schema."""
    answer: dict[str, Any] = {"description": route.summary}
    if route.reply:
        answer["content"] = {media: {"schema": schema} for media, schema in route.reply.items()}
    if route.headers:
        answer["headers"] = {name: {"description": text, "schema": {"type": "integer"}}
                             for name, text in route.headers.items()}
    answers = {str(route.ok): answer}
    answers.update({str(code): {**answer, "description": text} for code, text in route.also.items()})
    for code in (*route.errors, *(() if route.public else (401,)), 503):
        answers[str(code)] = {"$ref": "#/components/responses/Error"}
    operation = {"summary": route.summary, "operationId": re.sub(r"_(\w)", lambda m: m[1].upper(), route.handler),
                 "responses": answers}
    if route.query:
        operation["parameters"] = [{"name": name, "in": "query", "required": False, "schema": schema,
                                    "description": description} for name, schema, description in route.query]
    if route.body:
        operation["requestBody"] = {"required": True, "content": {"application/json": {"schema": route.body}}}
    if route.public:
        operation["security"] = []
    return operation


def openapi_document() -> dict[str, Any]:
    """The OpenAPI 3.1 description of ROUTES and of the task's fields (TASK_FIELDS)."""
    task_properties: dict[str, Any] = {}
    for column in TASK_JSON_ORDER:
        task_properties[column.name] = column.metadata["schema"]
        task_properties.update(column.metadata["then"])
    paths: dict[str, Any] = {}
    for route in ROUTES:
        item = paths.setdefault(route.template, {})
        names = re.findall(r"\{(\w+)\}", route.template)
        if names:
            item["parameters"] = [{"name": name, "in": "path", "required": True,
                                   "schema": PATH_SCHEMAS.get(name, {"type": "string"})} for name in names]
        item[route.method.lower()] = _operation(route)
    error = {"description": "An error",
             "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
    return {
        "openapi": "3.1.0",
        "info": {"title": "jobqueue", "version": __version__,
                 "description": "Tasks for workers: list, create, inspect and steer them."},
        "components": {
            "securitySchemes": {"bearer": {
                "type": "http", "scheme": "bearer",
                "description": "Required on every route but /health and / when JOBQUEUE_TOKEN is set"}},
            "schemas": {
                "Error": {"type": "object", "required": ["message", "code"],
                          "properties": {"message": {"type": "string"}, "code": {"type": "integer"}}},
                "Task": {"type": "object", "required": list(task_properties), "properties": task_properties},
                "NewTask": {"type": "object", "required": [c.name for c in TASK_FIELDS if _is_required(c)],
                            "additionalProperties": False, "properties": NEW_TASK_SCHEMAS,
                            "not": {"required": ["expires", "expires_at"], "properties": {
                                "expires": {"type": "number"}, "expires_at": {"type": "string"}}}},
                "Schedule": {"type": "object", "required": [
                    "name", "profile", "job", "parameters", "tags", "timezone", "next_run_at", "last_run_at"],
                    "properties": {"name": {"type": "string"}, **new_schedule_schemas(), "cron": {"type": "string"},
                                   "timezone": {"type": "string"}, "next_run_at": {**NULLABLE, "format": "date-time"},
                                   "last_run_at": {**NULLABLE, "format": "date-time"}}},
                "NewSchedule": {"type": "object", "required": ["profile", "job"], "additionalProperties": False,
                                "properties": new_schedule_schemas(),
                                "oneOf": [{"required": ["cron"]}, {"required": ["every"]}]},
            },
            "responses": {"Error": error},
        },
        "security": [{"bearer": []}, {}],
        "paths": paths,
    }


class WebService:
    """The JSON API over a queue: one routing table, one place that turns errors into answers."""

    def __init__(self, queue: Queue, config: Config | None = None, insecure: bool = False):
        self.queue = queue
        self.config = config if config is not None else Config()
        self.insecure = insecure
        self.requests: dict[tuple, int] = {}
        self.gate = FairGate(HANDLERS_AT_ONCE)
        self.closing = threading.Event()  # set by Server.stop: long polls answer at once
        self._lock = threading.Lock()
        self._routes = [(route, route.pattern) for route in ROUTES]

    def handle(self, request: Request) -> Response:
        matches = [(route, match) for route, pattern in self._routes if (match := pattern.match(request.path))]
        template = matches[0][0].template if matches else "unmatched"
        try:
            self._guard(request)
            route, params = self._route(request, matches)
            if not route.public:
                self._authorize(request)
            if request.body_error is not None:
                raise request.body_error
            media_type = (request.header("Content-Type") or "").split(";", 1)[0].strip().lower()
            if request.body and request.method in BODY_METHODS and media_type != "application/json":
                raise HTTPError(415, "A body must be JSON, sent with Content-Type: application/json")
            request.params = params
            with self.gate:
                response = getattr(self, route.handler)(request)
        except Exception as error:  # noqa: BLE001 - the one choke point: every error becomes JSON
            response = self.error_response(error)
        with self._lock:
            key = (request.method, template, response.status)
            self.requests[key] = self.requests.get(key, 0) + 1
        return response

    def error_response(self, error: BaseException) -> Response:
        production = self.config.env == "prod"
        headers: dict[str, str] = {}
        if isinstance(error, HTTPError):
            status, message, headers = error.status, str(error), error.headers
        elif isinstance(error, JobQueueError):
            status, message = error_codes(error)[0], str(error)
            if status >= 500:
                http_log.warning("%s", error)
                if production:
                    message = "The queue's storage is unavailable" if status == 503 else "Internal server error"
        else:
            status = 500
            http_log.error("Unexpected error", exc_info=error)
            message = "Internal server error"
            if not production:
                message += f": {type(error).__name__}: {error}"
        return Response(status, {"message": message, "code": status}, headers)

    def _route(self, request: Request, matches: list) -> tuple:
        for route, match in matches:
            if route.method == request.method:
                return route, match.groupdict()
        if matches:
            allowed = ", ".join(route.method for route, _ in matches)
            raise HTTPError(405, f"Method {request.method} is not allowed on {request.path}", {"Allow": allowed})
        raise HTTPError(404, f"No route for {request.path}")

    def _guard(self, request: Request) -> None:
        """Answer no web page but our own (Origin), and no DNS-rebinding name without a token (Host)."""
        host = request.header("Host")
        if host is not None and not (self.config.token or self.insecure or host_name(host) in LOOPBACK_NAMES):
            raise HTTPError(403, f'Host "{host}" is refused: without JOBQUEUE_TOKEN, only localhost, 127.0.0.1 and'
                                 " [::1] are served (a DNS-rebinding guard)")
        origin = request.header("Origin")
        if origin is None:
            return
        own = {f"{scheme}://{(host or '').strip().lower()}" for scheme in ("http", "https")}
        if origin.strip().lower().rstrip("/") not in own.union(self.config.origins):
            raise HTTPError(403, f'Origin "{origin}" is refused: only pages of this server, or of the origins'
                                 " JOBQUEUE_ORIGINS lists, may call it")

    def _authorize(self, request: Request) -> None:
        token = self.config.token
        if not token:
            return
        given = request.header("Authorization") or ""
        scheme, _, credentials = given.partition(" ")
        import hmac

        if scheme.lower() != "bearer" or not hmac.compare_digest(credentials.strip().encode(), token.encode()):
            raise HTTPError(401, "A valid bearer token is required", {"WWW-Authenticate": 'Bearer realm="jobqueue"'})

    # -- routes

    def list_tasks(self, request: Request) -> Response:
        filters = {"profile": request.arg("profile"), "status": request.arg("status"), "tags": request.list_arg("tags")}
        limit = request.int_arg("limit", DEFAULT_PAGE, MAX_PAGE)
        offset = request.int_arg("offset", 0)
        tasks = self.queue.search(**filters, order=request.arg("order") or "status", limit=limit, offset=offset)
        total = self.queue.count(**filters)
        return Response(200, [task.to_json() for task in tasks], {"X-Total-Count": str(total)})

    def _new_task_values(self, data: dict[str, Any]) -> dict[str, Any]:
        """A task's keys from a body (POST /tasks, PUT /schedule): job and profile given, nulls dropped,
        the job path allowed."""
        for key in ("job", "profile"):
            if data.get(key) in (None, ""):
                raise ValidationError(f"Missing {key}")
        if not isinstance(data["job"], str):
            raise ValidationError('Job must be an import path such as "myapp.jobs.SendMailJob"')
        values = {name: value for name, value in data.items() if value is not None}
        return {**values, "job": self.config.check_job(data["job"])}

    def create_task(self, request: Request) -> Response:
        task = Task(**self._new_task_values(request.json(NEW_TASK_KEYS)))
        stored = self.queue.add(task)[0]
        return Response(201 if stored is task else 200, stored.to_json(), {"Location": f"/task/{stored.identifier}"})

    def show_task(self, request: Request) -> Response:
        identifier, wait = request.params["identifier"], self._wait_seconds(request)
        deadline = time.monotonic() + wait
        if wait:
            with self.gate.stepped_out():  # a long poll must not hold a place other requests queue for
                while (remaining := deadline - time.monotonic()) > 0 and not self.closing.is_set():
                    with contextlib.suppress(TimeoutError):
                        return Response(200, self.queue.wait(identifier, min(remaining, 1.0)).to_json())
        return Response(200, self.queue.find(identifier).to_json())

    @staticmethod
    def _wait_seconds(request: Request) -> float:
        text = request.arg("wait")
        if text is None:
            return 0.0
        try:
            seconds = float(text) if re.fullmatch(r"[0-9.eE+-]{1,40}", text, re.ASCII) else -1.0
        except ValueError:
            seconds = -1.0
        if not 0 <= seconds <= WAIT_MAX:
            raise ValidationError(f"wait must be a number of seconds from 0 to {WAIT_MAX:g}")
        return seconds

    def cancel_task(self, request: Request) -> Response:
        return Response(200, self.queue.cancel(request.params["identifier"]).to_json())

    def patch_task(self, request: Request) -> Response:
        data = request.json(("status",))
        if "status" not in data:
            raise ValidationError("Missing status")
        if not isinstance(data["status"], str):
            raise ValidationError(f'Status "{data["status"]}" does not exists')
        return Response(200, self.queue.update_status(request.params["identifier"], data["status"]).to_json())

    def retry_task(self, request: Request) -> Response:
        return Response(200, self.queue.retry(request.params["identifier"]).to_json())

    def delete_task(self, request: Request) -> Response:
        self.queue.delete(request.params["identifier"])
        return Response(204)

    def list_schedules(self, request: Request) -> Response:
        return Response(200, [schedule.to_json() for schedule in self.queue.schedules()])

    def put_schedule(self, request: Request) -> Response:
        data = request.json(NEW_SCHEDULE_KEYS)
        for key in ("cron", "every"):
            if key in data and data[key] is None:
                raise ValidationError(f"{key} must not be null: give either cron or every")
        schedule = Schedule(request.params["name"], **self._new_task_values(data))
        if schedule.timezone not in time_zone_names():
            raise ValidationError(f'Unknown time zone "{schedule.timezone}"')
        return Response(200, self.queue.add_schedule(schedule).to_json())

    def delete_schedule(self, request: Request) -> Response:
        self.queue.remove_schedule(request.params["name"])
        return Response(204)
    def _profile(self, request: Request) -> str:
        """The profile a path names; a name no profile can have names nothing there (404)."""
        try:
            return validate_profile(request.params["profile"])
        except ValidationError as error:
            raise HTTPError(404, f"No such profile: {error}") from None

    def list_limits(self, request: Request) -> Response:
        return Response(200, self.queue.all_limits())

    def show_limits(self, request: Request) -> Response:
        return Response(200, self.queue.limits(self._profile(request)))

    def set_limits(self, request: Request) -> Response:
        profile = self._profile(request)
        data = request.json(("concurrency", "rate"))
        concurrency, rate = data.get("concurrency"), data.get("rate")
        if rate is not None and not isinstance(rate, str):
            raise ValidationError(f"rate must be a string such as \"10/s\" or null, not {json.dumps(rate)}")
        return Response(200, self.queue.set_limits(profile, concurrency, rate))

    def stats(self, request: Request) -> Response:
        return Response(200, self.queue.stats())

    def completed(self, request: Request) -> Response:
        return Response(200, self.queue.completed())

    def dashboard(self, request: Request) -> Response:
        return Response(200, DASHBOARD_HTML, dict(_dashboard_headers()), content_type="text/html; charset=utf-8")

    def health(self, request: Request) -> Response:
        self.queue.ping()
        return Response(200, {"status": "ok"})

    def metrics(self, request: Request) -> Response:
        lines = [
            "# HELP jobqueue_tasks Tasks stored, by profile and status.",
            "# TYPE jobqueue_tasks gauge",
        ]
        for profile, counts in self.queue.stats().items():
            lines += [f'jobqueue_tasks{{profile="{profile}",status="{s}"}} {n}' for s, n in counts.items()]
        completed = self.queue.completed()
        for outcome, name in (("finished", "executed"), ("failed", "failed")):
            lines += [f"# HELP jobqueue_tasks_{name}_total Task runs that ended {outcome}, by profile.",
                      f"# TYPE jobqueue_tasks_{name}_total counter"]
            lines += [f'jobqueue_tasks_{name}_total{{profile="{p}"}} {c[outcome]}' for p, c in completed.items()]
        lines += ["# HELP jobqueue_http_requests_total HTTP requests answered, by method, route and code.",
                  "# TYPE jobqueue_http_requests_total counter"]
        with self._lock:
            requests = sorted(self.requests.items())
        lines += [f'jobqueue_http_requests_total{{method="{m}",route="{r}",code="{c}"}} {n}'
                  for (m, r, c), n in requests]
        return Response(200, "\n".join(lines) + "\n", content_type="text/plain; version=0.0.4; charset=utf-8")

    def openapi(self, request: Request) -> Response:
        return Response(200, openapi_document())


class RequestHandler:
    """Reads one request at a time off a keep-alive connection and hands it to the WebService.

    Server mixes it with http.server's BaseHTTPRequestHandler when it starts, so that importing
    jobqueue (in a worker, say) never loads http.server, http.client, email and ssl.
    """

    protocol_version = "HTTP/1.1"
    server_version = f"jobqueue/{__version__}"
    disable_nagle_algorithm = True
    busy = False
    server: Server

    def setup(self) -> None:
        self.timeout = self.server.request_timeout
        super().setup()

    def handle(self) -> None:
        self.server.track(self, True)
        try:
            super().handle()
        finally:
            self.server.track(self, False)

    def _answer(self) -> None:
        if self.request_version == "HTTP/0.9":
            self.send_error(400, "HTTP/0.9 requests are not supported")
            return
        self.busy, started = True, time.monotonic()
        try:
            parts = urlsplit(self.path)
            body, body_error = self._read_body()
            try:
                path, query = unquote(parts.path, errors="strict"), parse_qs(
                    parts.query, keep_blank_values=True, errors="strict", max_num_fields=1000)
            except (UnicodeDecodeError, ValueError):
                path, query = unquote(parts.path), {}
                body_error = body_error or HTTPError(
                    400, "The path and query must be UTF-8, percent-encoded, with at most 1000 fields")
            request = Request(method="GET" if self.command == "HEAD" else self.command, path=path,
                              query=query, headers=self.headers, body=body, body_error=body_error)
            if body_error is not None:
                self.close_connection = True
            response = self.server.service.handle(request)
            self._send(response)
            http_log.info('%s "%s" %d %.1fms', self.client_address[0], self.requestline, response.status,
                          (time.monotonic() - started) * 1000)
        finally:
            self.busy = False
            if self.server.stopping:
                self.close_connection = True

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = do_OPTIONS = _answer

    def __getattr__(self, name: str) -> Any:
        """Any other method (TRACE, CONNECT, FOO) reaches the routes too, for a 405 with Allow or a 404."""
        if name.startswith("do_"):
            return self._answer
        raise AttributeError(name)

    def _read_body(self) -> tuple:
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            return b"", HTTPError(411, "A body must come with Content-Length (chunked bodies are not accepted)")
        length = (self.headers.get("Content-Length") or "0").strip()
        if not (length.isascii() and length.isdigit()):
            return b"", HTTPError(400, "Content-Length must be a whole number")
        size = int(length)
        if size > MAX_BODY_BYTES:
            return b"", HTTPError(413, "The body is over 1 MiB")
        body = self.rfile.read(size)
        if len(body) < size:
            raise ConnectionError("the client closed the connection mid-body")
        return body, None

    def _send(self, response: Response) -> None:
        payload = response.payload()
        self.send_response(response.status)
        if response.status != 204:
            self.send_header("Content-Type", response.content_type)
            self.send_header("Content-Length", str(len(payload)))
        for name, value in response.headers.items():
            self.send_header(name, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        elif self.request_version == "HTTP/1.0":
            self.send_header("Connection", "keep-alive")
        self._headers_buffer.append(b"\r\n" + (payload if self.command != "HEAD" else b""))
        self.flush_headers()

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """Errors http.server finds itself (bad request line, huge headers…) answered in JSON too."""
        self.close_connection = True
        self.request_version = self.protocol_version
        from http import HTTPStatus

        self._send(Response(code, {"message": message or HTTPStatus(code).phrase, "code": code}))

    def log_request(self, code: Any = "-", size: Any = "-") -> None:
        """Access lines are written by _answer, with the time taken."""

    def log_message(self, format: str, *args: Any) -> None:
        http_log.debug("%s %s", self.address_string(), format % args)

class Server(socketserver.ThreadingMixIn, socketserver.TCPServer):
    """A threaded HTTP/1.1 server whose ``stop()`` lets in-flight requests finish.

    A thread serves one connection at a time and then waits a while for
    the next, so a stream of short connections reuses threads (and their
    database connections) instead of starting one each; accepting never
    waits for a new thread to be scheduled.
    """

    daemon_threads = False
    allow_reuse_address = True
    request_queue_size = LISTEN_BACKLOG

    def __init__(self, address: tuple, service: WebService, request_timeout: float = REQUEST_TIMEOUT) -> None:
        import queue

        self.service = service
        self.request_timeout = request_timeout
        self.stopping = False
        self._handlers: set[RequestHandler] = set()
        self._handlers_lock = threading.Lock()
        self._accepted: queue.SimpleQueue = queue.SimpleQueue()
        self._idle, self._closed, self._threads_alive = 0, False, set()
        from http.server import BaseHTTPRequestHandler

        super().__init__(address, type("RequestHandler", (RequestHandler, BaseHTTPRequestHandler), {}))

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._handlers_lock:
            if self._idle:
                self._idle -= 1
                self._accepted.put((request, client_address))
                return
            thread = threading.Thread(target=self._serve_connections, args=(request, client_address))
            self._threads_alive.add(thread)
        thread.start()

    def _serve_connections(self, request: Any, client_address: Any) -> None:
        import queue

        try:
            while request is not None:
                self.process_request_thread(request, client_address)
                with self._handlers_lock:
                    if self._closed:
                        return
                    self._idle += 1
                try:
                    request, client_address = self._accepted.get(timeout=IDLE_THREAD_SECONDS)
                except queue.Empty:
                    with self._handlers_lock:
                        try:
                            request, client_address = self._accepted.get_nowait()
                        except queue.Empty:
                            self._idle -= 1
                            return
        finally:
            with self._handlers_lock:
                self._threads_alive.discard(threading.current_thread())

    def server_close(self) -> None:
        """Close the socket; wake idle threads to end; wait for busy ones."""
        with self._handlers_lock:
            self._closed = True
            for _ in range(self._idle):
                self._accepted.put((None, None))
            self._idle = 0
            threads = list(self._threads_alive)
        super().server_close()
        for thread in threads:
            thread.join()

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    def track(self, handler: RequestHandler, open_: bool) -> None:
        with self._handlers_lock:
            (self._handlers.add if open_ else self._handlers.discard)(handler)

    def stop(self) -> None:
        """Stop accepting, close idle keep-alive connections, wait for requests in flight."""
        self.stopping = True
        self.service.closing.set()
        self.shutdown()
        with self._handlers_lock:
            idle = [handler for handler in self._handlers if not handler.busy]
        for handler in idle:
            with contextlib.suppress(OSError):
                handler.connection.shutdown(socket.SHUT_RDWR)
        self.server_close()


# == CLI =====================================================================

STATUS_COLOURS = {Status.WAITING: "34", Status.RUNNING: "33", Status.FINISHED: "32", Status.FAILED: "31"}
COLOUR_NAMES = {"34": "blue", "33": "yellow", "32": "green", "31": "red"}
MARK = "\u25a0"
ORDER_KEYS: dict[str, Callable[[Task], Any]] = {
    "date": lambda task: task.created_at,
    "status": lambda task: (task.status.rank, task.created_at),
    "profile": lambda task: (task.profile, task.created_at),
}
GROUP_KEYS: dict[str, Callable[[Task], Any]] = {
    "date": lambda task: None,
    "status": lambda task: task.status,
    "profile": lambda task: task.profile,
}
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr and exit status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def use_colour(stream: Any) -> bool:
    """Colour only on a terminal, never with NO_COLOR; FORCE_COLOR asks for it anywhere."""
    if os.environ.get("NO_COLOR"):
        return False
    if os.environ.get("FORCE_COLOR"):
        return True
    return bool(getattr(stream, "isatty", lambda: False)())


def _paint(text: str, status: Status, colour: bool) -> str:
    return f"\033[{STATUS_COLOURS[status]}m{text}\033[0m" if colour else text


def _when(value: datetime | None) -> str:
    return "-" if value is None else value.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def format_task(task: Task) -> str:
    """The task block that ``add``, ``show`` and ``edit`` print: each field's ``show`` lines, by rank."""
    lines = sorted(line for column in TASK_FIELDS for line in column.metadata["show"])
    return "\n".join(f"{label} : {text}" for _, label, render in lines if (text := render(task)) is not None)


def parse_parameter(text: str) -> tuple:
    """``name:value`` gives a string; ``name:=JSON`` a number, boolean, null or quoted string."""
    name, colon, value = text.partition(":")
    if not colon or not name:
        raise ValidationError(
            f'Malformed parameter "{text}": use name:value, or name:=JSON for numbers, booleans and null'
        )
    if not value.startswith("="):
        return name, value
    try:
        parsed = json.loads(value[1:])
    except ValueError:
        raise ValidationError(
            f'Malformed parameter "{text}": after ":=" comes JSON, such as 3, true, null or "text"'
        ) from None
    if not _is_scalar(parsed):
        raise ValidationError(f'The "{name}" value must be a scalar or null')
    return name, parsed


def confirm(question: str, refusal: str) -> bool:
    """Ask ``question [y/N]`` on the terminal; without one, refuse with ``refusal``."""
    if not sys.stdin.isatty():
        raise UsageError(refusal)
    try:
        answer = input(f"{question} [y/N] ")
    except EOFError:
        answer = ""
    return answer.strip().lower() in ("y", "yes")


def _queue(reading: bool = False) -> Queue:
    """The configured queue; ``reading`` commands refuse to create a SQLite file that is not there."""
    services = ServiceContainer.get_instance()
    missing = services.config.missing_database()
    if reading and missing:
        raise UsageError(f"There is no queue at {missing}: the file does not exist (nothing was added yet). Set"
                         " JOBQUEUE_DB to the file your application uses, or JOBQUEUE_REDIS_DSN for Redis")
    queue = services.queue
    queue.ping()
    return queue


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, ensure_ascii=False))


# -- manager ------------------------------------------------------------------


def _parameters_and_tags(args: argparse.Namespace) -> tuple[dict[str, Scalar], list[str]]:
    """The name:value words (after --tags too, where a person may type them) and the plain tags."""
    words = [*args.parameters, *[tag for tag in args.tags if ":" in tag]]
    return dict(parse_parameter(text) for text in words), [tag for tag in args.tags if ":" not in tag]


def cmd_add(args: argparse.Namespace) -> int:
    config = ServiceContainer.get_instance().config
    parameters, tags = _parameters_and_tags(args)
    options = {name: getattr(args, name) for name in ("retries", "retry_delay", "timeout", "lease", "delay",
                                                      "depends_on", "priority", "unique_key", "expires")
               if getattr(args, name) is not None}
    task = Task(args.profile, config.check_job(args.job), parameters, tags, **options)
    if args.wait_timeout is not None and not args.wait:
        raise UsageError("--wait-timeout goes with --wait")
    queue = _queue()
    stored = queue.add(task)[0]
    if stored is not task:
        print(f'Nothing added: task {stored.identifier} holds unique key "{task.unique_key}"', file=sys.stderr)
    print(format_task(stored), flush=True)
    return _print_outcome(queue, stored.identifier, args.wait_timeout) if args.wait else 0


def _print_outcome(queue: Queue, identifier: str, timeout: float | None) -> int:
    """Wait for the task to end and print its result: 0 finished, 1 failed (its error on stderr), 124 timed out.

    An outage meanwhile is waited out like any manager command's, without adding the task again.
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    outage_since = None
    while True:
        try:
            task = queue.wait(identifier, _remaining(deadline))
            break
        except TimeoutError:
            print(f"jobqueue: task {identifier} did not end within {timeout:g} s", file=sys.stderr)
            return 124
        except BackendUnavailable as error:
            outage_since = outage_since or time.monotonic()
            if time.monotonic() - outage_since >= Config.from_env().outage_wait:
                raise JobQueueError(f"{error} (while waiting for task {identifier})") from error
            time.sleep(0.5)
    print(f"Status : {task.status.value}")
    if task.status is Status.FINISHED:
        print(f"Result : {json.dumps(task.result)}")
        return 0
    print(f"jobqueue: task {identifier} failed: {(task.error or '-').splitlines()[0]}", file=sys.stderr)
    return 1


def cmd_cancel(args: argparse.Namespace) -> int:
    print(format_task(_queue().cancel(args.identifier)))
    return 0


def cmd_limits(args: argparse.Namespace) -> int:
    queue = _queue()
    limits = {} if args.clear else queue.limits(args.profile)
    named = {name: getattr(args, name) for name in ("concurrency", "rate") if getattr(args, name) is not None}
    if named or args.clear:
        limits = queue.set_limits(args.profile, **{**limits, **named})
    print(f"Profile {args.profile}: {_limits_shown(limits)}")
    return 0


def _limits_shown(limits: Mapping[str, Any]) -> str:
    shown = [f"{name} {value}" for name, value in limits.items() if value is not None]
    return ", ".join(shown) or "no limits"


def cmd_show(args: argparse.Namespace) -> int:
    task = _queue(reading=True).find(args.identifier)
    if args.json:
        _print_json(task.to_json())
    else:
        print(format_task(task))
    return 0


def cmd_edit(args: argparse.Namespace) -> int:
    print(format_task(_queue().update_status(args.identifier, args.status)))
    return 0


def cmd_delete(args: argparse.Namespace) -> int:
    _queue().delete(args.identifier)
    print(f"Task {args.identifier} deleted")
    return 0


def listed_tasks(queue: Queue, args: argparse.Namespace) -> tuple:
    """The tasks ``list`` shows and how many match; finished ones only when asked by ``--status``."""
    statuses = [args.status] if args.status else [Status.WAITING, Status.RUNNING, Status.FAILED]
    tasks: list[Task] = []
    for status in statuses:
        tasks += queue.search(args.profile, status, args.tags, args.order, args.limit)
    tasks.sort(key=ORDER_KEYS[args.order])
    total = sum(queue.count(args.profile, status, args.tags) for status in statuses)
    return tasks[: args.limit], total


def render_list(tasks: list[Task], total: int, args: argparse.Namespace, colour: bool) -> str:
    tags = list(args.tags)
    header = ["Job", "Profile", "Date", *[f"T{n}" for n in range(1, len(tags) + 1)], "Identifier"]
    if not colour:
        header.insert(1, "Status")
    rows = []
    for task in tasks:
        row = [f"{MARK} {task.job_name}", task.profile, _when(task.created_at),
               *["\u2714" if task.has_tag(tag) else "\u2718" for tag in tags], task.identifier]
        if not colour:
            row.insert(1, task.status.value)
        rows.append((task, row))
    widths = [max([len(header[i])] + [len(row[i]) for _, row in rows]) for i in range(len(header))]
    separator = "  ".join("-" * width for width in widths)
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(header, widths)).rstrip(), separator]
    group = GROUP_KEYS[args.order]
    for index, (task, row) in enumerate(rows):
        if index and group(task) != group(rows[index - 1][0]):
            lines.append(separator)
        cells = [cell.ljust(width) for cell, width in zip(row, widths)]
        cells[0] = _paint(MARK, task.status, colour) + cells[0][len(MARK):]
        lines.append("  ".join(cells).rstrip())
    lines += ["", f"There is {total} tasks in queue"]
    if total > len(tasks) and args.limit is not None and len(tasks) == args.limit:
        lines.append(f"(showing the first {len(tasks)}; use --limit to see more)")
    if args.legend:
        lines += ["", "Legend:"]
        lines += [f"  {_paint(MARK, status, colour)} {status.value} ({COLOUR_NAMES[STATUS_COLOURS[status]]})"
                  for status in Status]
        if not colour:
            lines.append("  (no colour here: the Status column names each task's status)")
        lines += [f'  T{n}: tag "{tag}"' for n, tag in enumerate(tags, 1)]
    return "\n".join(lines)


def cmd_list(args: argparse.Namespace) -> int:
    queue = _queue(reading=True)
    colour = use_colour(sys.stdout)
    while True:
        tasks, total = listed_tasks(queue, args)
        if args.json:
            _print_json([task.to_json() for task in tasks])
        else:
            if args.follow and sys.stdout.isatty():
                print("\033[H\033[2J", end="")
            print(render_list(tasks, total, args, colour), flush=True)
        if not args.follow:
            return 0
        try:
            time.sleep(1)
        except KeyboardInterrupt:
            return 0
        if not sys.stdout.isatty():
            print()


def cmd_stats(args: argparse.Namespace) -> int:
    queue = _queue(reading=True)
    stats = queue.stats()
    if args.json:
        _print_json(stats)
        return 0
    statuses = [status.value for status in Status]
    totals = {status: sum(counts[status] for counts in stats.values()) for status in statuses}
    rows = [[profile, *[str(counts[s]) for s in statuses], str(sum(counts.values()))]
            for profile, counts in stats.items()]
    rows.append(["Total", *[str(totals[s]) for s in statuses], str(sum(totals.values()))])
    header = ["Profile", *statuses, "total"]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = [header, *rows[:-1], ["-" * width for width in widths], rows[-1]]
    for line in lines:
        print("  ".join([line[0].ljust(widths[0])] + [cell.rjust(w) for cell, w in zip(line[1:], widths[1:])]))
    limited = queue.all_limits()
    if limited:
        print("\nLimits:")
        for profile, limits in limited.items():
            print(f"  {profile}: {_limits_shown(limits)}")
    return 0


def _go_ahead(args: argparse.Namespace, verb: str, question: str) -> bool:
    """True with ``--force``, ``--yes`` or a yes on the terminal; without a terminal, UsageError."""
    wider = ", and restores tasks under a live lease" if verb == "restore" else ""
    if args.force or getattr(args, "yes", False) or confirm(
        question, f"Refusing to {verb} without confirmation: no terminal to ask on. Add --yes to answer yes"
                  f" (--force also skips the question{wider})."
    ):
        return True
    print(f"Nothing done: {verb} cancelled.")
    return False


def cmd_restore(args: argparse.Namespace) -> int:
    """--force: everything not finished, as the seed did. Otherwise tasks whose worker is alive stay theirs."""
    queue = _queue()
    if not _go_ahead(args, "restore", "Put every task that is not finished (running and failed too) back to waiting?"):
        return 1
    print(f"{queue.restore(include_leased=args.force)} tasks restored to waiting")
    left = 0 if args.force else queue.count(status=Status.RUNNING)
    if left:
        print(f"{left} running tasks left alone: their workers are alive and renewing their leases"
              " (--force restores them too)")
    return 0


def cmd_recover(args: argparse.Namespace) -> int:
    config = ServiceContainer.get_instance().config
    recovered = _queue().recover(config.max_lost)
    for task in recovered:
        outcome = "failed" if task.status is Status.FAILED else "back to waiting"
        print(f"Task {task.identifier} ({task.job_name}): worker {task.worker} lost; {outcome}")
    print(f"{len(recovered)} tasks recovered")
    return 0


def cmd_retry(args: argparse.Namespace) -> int:
    queue = _queue()
    if args.identifier:
        print(format_task(queue.retry(args.identifier)))
        return 0
    if not args.failed:
        raise UsageError("Name a task to retry, or use --failed to retry every failed task")
    retried = 0
    while batch := queue.search(profile=args.profile, status=Status.FAILED, order="date", limit=500):
        for task in batch:
            queue.retry(task)
            retried += 1
    print(f"{retried} failed tasks back to waiting")
    return 0


def cmd_purge(args: argparse.Namespace) -> int:
    queue = _queue()
    which = args.status.value if args.status else "finished and failed"
    if not _go_ahead(args, "purge", f"Delete {which} tasks that ended more than {args.older_than:g} s ago?"):
        return 1
    print(f"{queue.purge(args.older_than, args.status)} tasks deleted")
    return 0


def cmd_flush(args: argparse.Namespace) -> int:
    queue = _queue()
    if not _go_ahead(args, "flush", f"Delete every task of {queue.describe()}?"):
        return 1
    print(f"Queue flushed: {queue.flush()} tasks deleted")
    return 0


# -- manager schedule -----------------------------------------------------------


def _schedule_when(schedule: Schedule) -> str:
    if schedule.cron is not None:
        return f"cron {schedule.cron} ({schedule.timezone})"
    return f"every {schedule.every:g}s"


def format_schedule(schedule: Schedule) -> str:
    """The block ``manager schedule add`` prints, lined up like a task's."""
    task = schedule.task(0.0)
    options = ", ".join(f"{name}={value}" for name, value in schedule.options.items())
    lines = [("Schedule", schedule.name), ("Profile", schedule.profile), ("Job class", schedule.job),
             ("When", _schedule_when(schedule)), ("Tags", ", ".join(schedule.tags or ()) or "(none)"),
             ("Parameters", _parameters_shown(task)), ("Options", options or "(none)"),
             ("Next run", _when(schedule.next_run_at) + " UTC"), ("Last run", _when(schedule.last_run_at))]
    return "\n".join(f"{label} : {text}" for label, text in lines)


def cmd_schedule_add(args: argparse.Namespace) -> int:
    config = ServiceContainer.get_instance().config
    parameters, tags = _parameters_and_tags(args)
    options = {name: getattr(args, name) for name in schedule_options() if getattr(args, name, None) is not None}
    schedule = Schedule(args.name, args.profile, config.check_job(args.job), parameters, tags, cron=args.cron,
                        every=args.every, timezone=args.timezone, **options)
    print(format_schedule(_queue().add_schedule(schedule)))
    return 0


def cmd_schedule_list(args: argparse.Namespace) -> int:
    schedules = _queue(reading=True).schedules()
    if args.json:
        _print_json([schedule.to_json() for schedule in schedules])
        return 0
    header = ["Name", "Profile", "Job", "When", "Next run (UTC)", "Last run (UTC)"]
    rows = [[s.name, s.profile, job_name(s.job), _schedule_when(s), _when(s.next_run_at), _when(s.last_run_at)]
            for s in schedules]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, ["-" * width for width in widths], *rows]:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    print(f"\nThere is {len(schedules)} schedules")
    return 0


def cmd_schedule_delete(args: argparse.Namespace) -> int:
    _queue().remove_schedule(args.name)
    print(f'Schedule "{args.name}" deleted')
    return 0


# -- worker -------------------------------------------------------------------


def _configure_logging(args: argparse.Namespace) -> None:
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(level=level, format=LOG_FORMAT, stream=sys.stderr)


def _import_modules(names: Iterable[str]) -> None:
    """Load user modules (``--import``, JOBQUEUE_IMPORTS) so they can register listeners."""
    for name in names:
        try:
            importlib.import_module(name)
        except Exception as error:
            raise ConfigurationError(f'Cannot import "{name}": {type(error).__name__}: {error}') from error


def _stop_on_signals(worker: Worker) -> None:
    """First SIGINT/SIGTERM: finish the current task, then stop. Second: interrupt the job."""

    def handle(signum: int, frame: Any) -> None:
        if worker.stopping:
            raise KeyboardInterrupt
        worker.logger.warning(
            "%s received: worker %s stops after the current task (again to interrupt it)",
            signal.Signals(signum).name, worker.name,
        )
        worker.stop()

    signal.signal(signal.SIGINT, handle)
    signal.signal(signal.SIGTERM, handle)
    signal.signal(signal.SIGALRM, lambda signum, frame: worker.interrupt_timed_out_job())
    worker.wake_signal = signal.SIGALRM


def _stop_with_supervisor(worker: Worker, supervisor: int) -> None:
    """Where no parent-death signal exists: stop as on SIGTERM once the supervising process is gone."""

    def watch() -> None:
        while os.getppid() == supervisor and not worker.stopping:
            time.sleep(1)
        if not worker.stopping:
            worker.logger.warning("Supervisor %d is gone: worker %s stops after the current task",
                                  supervisor, worker.name)
            worker.stop()

    threading.Thread(target=watch, name=f"{worker.name}-parent-watch", daemon=True).start()


def _child_command(args: argparse.Namespace, name: str) -> list[str]:
    command = [sys.executable, os.path.abspath(__file__), "worker", args.profile, "--name", name,
               "--lease", repr(args.lease), "--isolation", args.isolation, "--threads", str(args.threads),
               "--prefetch", str(args.prefetch), "--supervisor", str(os.getpid())]
    if args.timeout is not None:
        command += ["--timeout", repr(args.timeout)]
    if args.quantity is not None:
        command += ["--quantity", str(args.quantity)]
    if args.burst:
        command.append("--burst")
    for module in args.imports:
        command += ["--import", module]
    if args.verbose:
        command.append("-v")
    if args.quiet:
        command.append("-q")
    return command


def supervise(args: argparse.Namespace) -> int:
    """Run ``--concurrency`` worker processes; start again any that dies unexpectedly.

    Children run in their own session, so a terminal's Ctrl-C reaches only the
    supervisor, which passes on SIGTERM (finish the task) and, the second
    time, SIGINT (interrupt it). If the supervisor dies, even by SIGKILL, its
    children stop as on SIGTERM (a parent-death signal on Linux, a watch of
    the parent elsewhere). A child slot that keeps dying is restarted at once
    three times, then after 1, 2, 4... seconds (at most 30); a child that ran
    a minute starts its slot's count again.
    """
    log = logging.getLogger("jobqueue.supervisor")
    base = args.name or _default_worker_name()
    import subprocess

    children: dict[str, subprocess.Popen] = {}
    signals: list[int] = []
    deaths: dict[str, int] = {}
    started_at: dict[str, float] = {}
    pending: dict[str, float] = {}

    def start(name: str) -> None:
        children[name] = subprocess.Popen(_child_command(args, name), start_new_session=True)
        started_at[name] = time.monotonic()
        log.info("Started worker %s (pid %d)", name, children[name].pid)

    def restart_later(name: str, code: int) -> None:
        deaths[name] = 1 if time.monotonic() - started_at[name] > 60 else deaths.get(name, 0) + 1
        delay = 0.0 if deaths[name] <= 3 else min(2.0 ** (deaths[name] - 4), 30.0)
        log.warning("Worker %s died (exit status %s); starting it again%s", name, code,
                    f" in {delay:g}s" if delay else "")
        pending[name] = time.monotonic() + delay

    def handle(signum: int, frame: Any) -> None:
        signals.append(signum)
        forwarded = signal.SIGTERM if len(signals) == 1 else signal.SIGINT
        for child in list(children.values()):
            if child.poll() is None:
                child.send_signal(forwarded)

    signal.signal(signal.SIGINT, handle)
    signal.signal(signal.SIGTERM, handle)
    for number in range(1, args.concurrency + 1):
        start(f"{base}-{number}")
    status = 0
    while children or (pending and not signals):
        time.sleep(0.1)
        for name, at in list(pending.items()):
            if signals:
                pending.clear()
            elif time.monotonic() >= at:
                del pending[name]
                start(name)
        for name, child in list(children.items()):
            code = child.poll()
            if code is None:
                continue
            del children[name]
            if signals or code == 0:
                continue
            if code == 2:
                log.error("Worker %s refused its arguments; stopping", name)
                status = 2
                handle(signal.SIGTERM, None)
                continue
            restart_later(name, code)
    return status


# -- serve --------------------------------------------------------------------


def _return_freed_memory() -> None:
    """Give the C heap's free pages back to the system (glibc only), before a worker settles down to wait.

    Where no compiled bytecode is cached (a read-only folder,
    ``PYTHONDONTWRITEBYTECODE``), this file is compiled at every start; the
    compiler's trees, freed by now, leave about 12 MiB of heap that glibc
    keeps unless asked.
    """
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import gc

    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).malloc_trim(0)


def cmd_worker(args: argparse.Namespace) -> int:
    _configure_logging(args)
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    services = ServiceContainer.get_instance()
    _profiles(args.profile)
    _import_modules([*services.config.imports, *args.imports])
    queue = services.queue
    if args.concurrency > 1:
        return supervise(args)
    config = services.config
    worker = Worker(args.name, queue, args.profile, services.dispatcher, lease=args.lease, timeout=args.timeout,
                    max_lost=config.max_lost, finished_ttl=config.finished_ttl, isolation=args.isolation,
                    threads=args.threads, prefetch=args.prefetch)
    _stop_on_signals(worker)
    if args.supervisor is not None:
        _die_with_parent(signal.SIGTERM, args.supervisor)
        _stop_with_supervisor(worker, args.supervisor)
    # One write per line: the workers of --concurrency share this pipe, and a separate "\n" could interleave.
    print(f'Worker {worker.name} handles "{worker.profile}" tasks...\n', end="", flush=True)
    print(f"Queue: {queue.describe()}", file=sys.stderr, flush=True)
    _return_freed_memory()
    worker.consume(args.quantity, burst=args.burst)
    print(f"Worker {worker.name} is done.\n", end="", flush=True)
    return 0


def _log_requests_off_thread() -> Any:
    """Access lines go through a queue to one writer thread: request threads never wait on the log's lock."""
    import logging.handlers
    import queue

    records: queue.SimpleQueue = queue.SimpleQueue()
    listener = logging.handlers.QueueListener(records, *logging.getLogger().handlers, respect_handler_level=True)
    http_log.addHandler(logging.handlers.QueueHandler(records))
    http_log.propagate = False
    listener.start()
    return listener


def _run_schedules_until(queue: Queue, stop: threading.Event) -> None:
    """``serve`` adds due schedules' tasks too, as workers do, once a second; an outage is /health's to report."""
    while not stop.wait(1.0):
        with contextlib.suppress(JobQueueError, OSError):
            queue.run_schedules()


def cmd_serve(args: argparse.Namespace) -> int:
    _configure_logging(args)
    services = ServiceContainer.get_instance()
    if not (services.config.token or args.insecure or is_loopback(args.host)):
        raise UsageError(f"Refusing to serve {args.host} without a token: anyone who can reach it could change the"
                         " queue. Set JOBQUEUE_TOKEN (clients then send Authorization: Bearer <token>), or add"
                         " --insecure if something else guards this address")
    service = WebService(services.queue, services.config, insecure=args.insecure)
    try:
        server = Server((args.host.strip("[]"), args.port), service)
    except OSError as error:
        raise UsageError(f"Cannot listen on {args.host}:{args.port}: {error.strerror or error}") from None
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    thread.start()
    listener = _log_requests_off_thread()
    print(f"Serving {services.queue.describe()} on {server.url} (Ctrl-C to stop)", flush=True)
    threading.Thread(target=_run_schedules_until, args=(services.queue, stop), name="schedules", daemon=True).start()
    while not stop.wait(0.5):
        pass
    server.stop()
    thread.join(10)
    listener.stop()
    print("Server stopped.", flush=True)
    return 0


def _add_verbosity(parser: argparse.ArgumentParser) -> None:
    noise = parser.add_mutually_exclusive_group()
    noise.add_argument("-v", "--verbose", action="store_true", help="log debug details")
    noise.add_argument("-q", "--quiet", action="store_true", help="log warnings and errors only")


# -- parser -------------------------------------------------------------------


def _examples(*lines: str) -> str:
    return "examples:\n" + "\n".join(f"  {line}" for line in lines)


def _command(subparsers: Any, name: str, handler: Callable, help: str, *examples: str) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        name, help=help, description=help, epilog=_examples(*examples),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.set_defaults(handler=handler)
    return parser


def _whole(text: str) -> int:
    if not (text.isascii() and text.isdigit()):
        raise ValidationError(f'"{text}" is not a whole number of 0 or more')
    return int(text)


def _integer(text: str) -> int:
    if not re.fullmatch(r"-?[0-9]{1,18}", text.strip()):
        raise ValidationError(f'"{text}" is not a whole number')
    return int(text)


def _positive_number(text: str) -> int:
    if not (text.isascii() and text.isdigit()) or int(text) < 1:
        raise ValidationError(f'concurrency must be a whole number of 1 or more, not "{text}"')
    return int(text)


def _rate(text: str) -> str:
    parse_rate(text)
    return text.strip()


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f'"{text}" is not a whole number of 1 or more')
    return value


def _port(text: str) -> int:
    if not (text.isascii() and text.isdigit()) or int(text) > 65535:
        raise argparse.ArgumentTypeError(f'"{text}" is not a port number from 0 to 65535')
    return int(text)


def _checked(convert: Callable[[str], Any]) -> Callable[[str], Any]:
    """An argparse type that keeps our validation message."""

    def check(text: str) -> Any:
        try:
            return convert(text)
        except ValidationError as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    check.__name__ = convert.__name__
    return check


def _add_filters(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--profile", type=_checked(validate_profile), metavar="P", help="only tasks of this profile")
    parser.add_argument("--status", type=_checked(Status), metavar="S", help="waiting, running, finished or failed")
    parser.add_argument("--tags", nargs="+", default=[], metavar="T", help="only tasks with any of these tags")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="jobqueue",
        description="Distribute tasks to workers; see and steer the queue.",
        epilog=_examples(
            "jobqueue worker mail                  # run tasks of profile 'mail'",
            "jobqueue manager add mail myapp.jobs.SendMailJob to:ada@example.com",
            "jobqueue manager list --legend",
            "jobqueue serve --port 8080             # the JSON API",
        ) + "\n\nThe queue is SQLite at $JOBQUEUE_DB (./jobqueue.db), or Redis at $JOBQUEUE_REDIS_DSN.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"jobqueue {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    worker = _command(
        commands, "worker", cmd_worker,
        "Run tasks of one profile, or of several (the first listed first), until stopped.",
        "jobqueue worker mail",
        "jobqueue worker mail --name mailer-1 --quantity 100",
        "jobqueue worker mail --burst                 # stop when 'mail' has no waiting task",
        "jobqueue worker mail --concurrency 4 --import myapp.listeners",
        "jobqueue worker high,default           # a task of 'high' whenever there is one",
    )
    worker.add_argument("profile", help="the profile whose tasks to run, or several: high,default")
    worker.add_argument("--name", help="worker name (default: host-pid)")
    worker.add_argument("--quantity", type=_positive, metavar="N", help="stop after N tasks")
    worker.add_argument("--burst", action="store_true", help="stop when the profile has no waiting task")
    worker.add_argument("--lease", type=_checked(parse_duration), default=DEFAULT_LEASE, metavar="DURATION",
                        help="how long a task stays ours without a heartbeat (default 30s)")
    worker.add_argument("--timeout", type=_checked(parse_duration), metavar="DURATION",
                        help="interrupt a job running longer (default: no limit; a task's own timeout wins)")
    worker.add_argument("--concurrency", type=_positive, default=1, metavar="N",
                        help="run N worker processes under one supervisor")
    worker.add_argument("--threads", type=_positive, default=1, metavar="N",
                        help="run up to N tasks at once in each worker process, for jobs that wait on I/O")
    worker.add_argument("--prefetch", type=_positive, default=DEFAULT_PREFETCH, metavar="N",
                        help=f"claim up to N tasks at once while jobs are short (default {DEFAULT_PREFETCH}; "
                             "1: one at a time)")
    worker.add_argument("--isolation", choices=ISOLATIONS, default="thread",
                        help="run each job in this process (thread, the default) or in a child process (process)")
    worker.add_argument("--supervisor", type=int, help=argparse.SUPPRESS)
    worker.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE",
                        help="import MODULE first, e.g. to add listeners (repeatable; also $JOBQUEUE_IMPORTS)")
    _add_verbosity(worker)

    serve = _command(
        commands, "serve", cmd_serve,
        "Serve the dashboard at / and the JSON API (GET/POST /tasks, /task/ID, /stats, /health, /metrics),"
        " described at /openapi.json. Without JOBQUEUE_TOKEN it serves loopback names only;"
        " JOBQUEUE_ORIGINS lists other web origins allowed to call it.",
        "jobqueue serve                          # http://127.0.0.1:8080",
        "JOBQUEUE_TOKEN=s3cret jobqueue serve --host 0.0.0.0 --port 9000 -q   # require Authorization: Bearer s3cret",
    )
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=_port, default=8080, help="port to listen on (default 8080; 0 picks a free one)")
    serve.add_argument("--insecure", action="store_true",
                       help="serve a non-loopback address without JOBQUEUE_TOKEN, and any Host name (behind a proxy"
                            " that does its own checks)")
    _add_verbosity(serve)

    manager = commands.add_parser(
        "manager", help="See and change tasks.", description="See and change tasks.",
        epilog=_examples("jobqueue manager list", "jobqueue manager add mail myapp.jobs.SendMailJob to:ada@example.com",
                         "jobqueue manager show 47a5b21d-0a02-4e6e-b8c9-51dc1534cb68"),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    actions = manager.add_subparsers(dest="action", metavar="ACTION", required=True)

    add = _command(
        actions, "add", cmd_add, "Add a task. Parameters are name:value (a string) or name:=JSON (3, true, null).",
        "jobqueue manager add mail myapp.jobs.SendMailJob to:ada@example.com",
        "jobqueue manager add reports myapp.jobs:BuildJob --tags nightly finance year:=2024 draft:=true",
        "jobqueue manager add reports myapp.jobs.BuildJob --wait --wait-timeout 5m   # print its result",
    )
    add.add_argument("profile", help="the profile whose workers run it")
    add.add_argument("job", help="import path of a Job subclass or @job function (myapp.jobs.SendMailJob)")
    add.add_argument("parameters", nargs="*", metavar="name:value",
                     help="parameters, before or after the options; name:=JSON for numbers, booleans, null")
    add.add_argument("--tags", nargs="+", default=[], metavar="T",
                     help="tags of the task (a word with a colon is a parameter, name:value)")
    add.add_argument("--delay", type=_checked(parse_duration), metavar="DURATION", help="run no sooner than this")
    add.add_argument("--retries", type=_checked(_whole), metavar="N", help="run again up to N times if it fails")
    add.add_argument("--retry-delay", type=_checked(parse_duration), metavar="DURATION",
                     help="wait before the first retry, doubled after each (default 5s)")
    add.add_argument("--timeout", type=_checked(parse_duration), metavar="DURATION", help="interrupt a longer run")
    add.add_argument("--lease", type=_checked(parse_duration), metavar="DURATION",
                     help="how long a worker holds it without a heartbeat")
    add.add_argument("--priority", type=_checked(_integer), metavar="N",
                     help="higher runs first within the profile (default 0; negative runs after)")
    add.add_argument("--unique-key", metavar="KEY",
                     help="add nothing while a task of the profile with this key waits or runs")
    add.add_argument("--expires", type=_checked(parse_duration), metavar="DURATION",
                     help="fail it, unrun, if no worker started it within this time")
    add.add_argument("--depends-on", nargs="+", action="extend", metavar="ID",
                     help="run only once these tasks have finished (fails if one of them fails)")
    add.add_argument("--wait", action="store_true",
                     help="wait for it to end and print its result: exit 0 finished, 1 failed, 124 wait ran out")
    add.add_argument("--wait-timeout", type=_checked(parse_duration), metavar="DURATION",
                     help="with --wait: stop waiting after this long (exit 124); --timeout limits the run itself")

    _schedule_commands(actions, add)

    show = _command(actions, "show", cmd_show, "Show one task.",
                    "jobqueue manager show 47a5b21d-0a02-4e6e-b8c9-51dc1534cb68 --json")
    show.add_argument("identifier", help="the task's identifier (a UUID)")
    show.add_argument("--json", action="store_true", help="print the task's JSON form")

    listing = _command(
        actions, "list", cmd_list, "List tasks (finished ones only with --status finished).",
        "jobqueue manager list --profile mail --order date",
        "jobqueue manager list --tags urgent nightly --legend",
        "jobqueue manager list --status failed --json",
        "jobqueue manager list --follow              # redraw every second; Ctrl-C to stop",
    )
    _add_filters(listing)
    listing.add_argument("--order", choices=ORDERS, default="status", help="sort order (default: status)")
    listing.add_argument("--limit", type=_positive, default=1000, metavar="N", help="show at most N (default 1000)")
    listing.add_argument("--follow", action="store_true", help="redraw every second until Ctrl-C")
    listing.add_argument("--legend", action="store_true", help="explain the colours and tag columns")
    listing.add_argument("--json", action="store_true", help="print a JSON array of tasks")

    edit = _command(actions, "edit", cmd_edit, "Set a task's status (waiting re-enqueues it).",
                    "jobqueue manager edit 47a5b21d-0a02-4e6e-b8c9-51dc1534cb68 waiting")
    edit.add_argument("identifier", help="the task's identifier (a UUID)")
    edit.add_argument("status", type=_checked(Status), help="waiting, finished or failed")

    cancel = _command(actions, "cancel", cmd_cancel,
                      "Cancel a waiting or running task: it ends failed (Cancelled), its job stops, never retried.",
                      "jobqueue manager cancel 47a5b21d-0a02-4e6e-b8c9-51dc1534cb68")
    cancel.add_argument("identifier", help="the task's identifier (a UUID)")

    delete = _command(actions, "delete", cmd_delete, "Delete a task.",
                      "jobqueue manager delete 47a5b21d-0a02-4e6e-b8c9-51dc1534cb68")
    delete.add_argument("identifier", help="the task's identifier (a UUID)")

    restore = _command(actions, "restore", cmd_restore,
                       "Put every task that is not finished back to waiting (crash repair). Running tasks"
                       " whose worker is alive are left alone unless --force.",
                       "jobqueue manager restore",
                       "jobqueue manager restore --yes     # no question (for cron); live workers' tasks stay",
                       "jobqueue manager restore --force   # no question; live workers' tasks too")
    restore.add_argument("--yes", "-y", action="store_true",
                         help="answer yes to the question; running tasks under a live lease stay theirs")
    restore.add_argument("--force", action="store_true",
                         help="do not ask, and restore running tasks under a live lease too")

    recover = _command(actions, "recover", cmd_recover,
                       "Put tasks whose worker was lost (lease expired) back to waiting, now.",
                       "jobqueue manager recover")
    recover.set_defaults(force=False)

    retry = _command(actions, "retry", cmd_retry, "Put failed tasks back to waiting.",
                     "jobqueue manager retry 47a5b21d-0a02-4e6e-b8c9-51dc1534cb68",
                     "jobqueue manager retry --failed --profile mail")
    retry.add_argument("identifier", nargs="?", help="the failed task's identifier")
    retry.add_argument("--failed", action="store_true", help="every failed task (of --profile)")
    retry.add_argument("--profile", type=_checked(validate_profile), metavar="P",
                       help="with --failed: this profile only")

    purge = _command(actions, "purge", cmd_purge, "Delete finished and failed tasks that ended long ago.",
                     "jobqueue manager purge --older-than 7d",
                     "jobqueue manager purge --older-than 12h --status failed --force")
    purge.add_argument("--older-than", type=_checked(parse_duration), required=True, metavar="DURATION",
                       help="tasks that ended longer ago than this (90s, 15m, 2h, 7d)")
    purge.add_argument("--status", type=_checked(Status), metavar="S", help="finished or failed (default: both)")
    purge.add_argument("--force", "--yes", "-y", dest="force", action="store_true",
                       help="do not ask for confirmation")

    flush = _command(actions, "flush", cmd_flush, "Delete every task of the queue.",
                     "jobqueue manager flush", "jobqueue manager flush --force     # no question")
    flush.add_argument("--force", "--yes", "-y", dest="force", action="store_true",
                       help="do not ask for confirmation")

    limits = _command(actions, "limits", cmd_limits,
                      "Show or change a profile's limits: at most N tasks running at once, at most N started per"
                      " second, minute or hour. Only the limits named change.",
                      "jobqueue manager limits mail",
                      "jobqueue manager limits mail --concurrency 2 --rate 10/s",
                      "jobqueue manager limits mail --clear")
    limits.add_argument("profile", type=_checked(validate_profile), help="the profile")
    limits.add_argument("--concurrency", type=_checked(_positive_number), metavar="N",
                        help="at most N of its tasks running at once, across all workers")
    limits.add_argument("--rate", type=_checked(_rate), metavar="N/PERIOD",
                        help="at most N started per s, m or h (10/s, 600/m, 1000/h)")
    limits.add_argument("--clear", action="store_true", help="lift both limits (then apply those named)")

    stats = _command(actions, "stats", cmd_stats, "Count tasks per profile and status.",
                     "jobqueue manager stats", "jobqueue manager stats --json")
    stats.add_argument("--json", action="store_true", help="print {profile: {status: count}}")
    return parser


def _schedule_commands(actions: Any, add: argparse.ArgumentParser) -> None:
    """``manager schedule add|list|delete``; ``add`` takes the task option flags of ``manager add``."""
    schedule = actions.add_parser(
        "schedule", help="Keep periodic tasks: add, list and delete schedules.",
        description="Keep periodic tasks: add, list and delete schedules. Workers add their tasks when due.",
        epilog=_examples("jobqueue manager schedule add poll feeds myapp.jobs.PollJob --every 5m",
                         "jobqueue manager schedule list"),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    steps = schedule.add_subparsers(dest="step", metavar="STEP", required=True, help="add, list or delete")
    adding = _command(
        steps, "add", cmd_schedule_add,
        "Add a schedule (or replace the one of that name): its task is added on a cron expression or every"
        " DURATION. Parameters are name:value or name:=JSON, as for manager add.",
        "jobqueue manager schedule add nightly reports myapp.jobs.BuildJob --cron '0 3 * * *' --timezone Europe/Paris",
        "jobqueue manager schedule add poll feeds myapp.jobs.PollJob url:https://example.com --every 5m --retries 2",
    )
    adding.add_argument("name", help="the schedule's name (letters, digits, _ - . :)")
    adding.add_argument("profile", help="the profile whose workers run its tasks")
    adding.add_argument("job", help="import path of a Job subclass or @job function")
    adding.add_argument("parameters", nargs="*", metavar="name:value", help="parameters of each task")
    when = adding.add_mutually_exclusive_group(required=True)
    when.add_argument("--cron", metavar="EXPR", help="minute hour day month weekday, or @hourly, @daily...")
    when.add_argument("--every", type=_checked(parse_duration), metavar="DURATION",
                      help="a period of at least 1s (90, 90s, 15m, 2h, 7d); the first run is one period from now")
    adding.add_argument("--timezone", default="UTC", metavar="TZ",
                        help="the time zone the cron expression reads (default UTC), such as Europe/Paris")
    adding.add_argument("--tags", nargs="+", default=[], metavar="T", help="tags of each task")
    for action in add._actions:  # the task options of manager add (retries, timeout...), one definition
        if action.dest in schedule_options():
            adding._add_action(action)
    listing = _command(steps, "list", cmd_schedule_list, "List schedules with their next and last runs.",
                       "jobqueue manager schedule list", "jobqueue manager schedule list --json")
    listing.add_argument("--json", action="store_true", help="print a JSON array of schedules")
    deleting = _command(steps, "delete", cmd_schedule_delete, "Delete a schedule (its tasks stay).",
                        "jobqueue manager schedule delete nightly")
    deleting.add_argument("name", help="the schedule's name")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status (0 ok, 2 bad input, 1 backend or other failure)."""
    parser = build_parser()
    args, extras = parser.parse_known_args(argv)
    if extras and isinstance(getattr(args, "parameters", None), list):  # manager add, manager schedule add
        args.parameters += [word for word in extras if not word.startswith("-")]
        extras = [word for word in extras if word.startswith("-")]
    if extras:
        parser.error(f"unrecognized arguments: {' '.join(extras)}")
    try:
        return _patiently(args)
    except JobQueueError as error:
        print(f"jobqueue: {error}", file=sys.stderr)
        return error_codes(error)[1]
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        sys.stderr.close()
        return 0


def _patiently(args: argparse.Namespace) -> int:
    """Run the command, waiting out an unavailable backend (a failover, a restart).

    ``worker`` and ``serve`` wait as long as it takes to reach it at start
    (once running, they ride out outages themselves); ``manager`` commands
    wait ``JOBQUEUE_OUTAGE_WAIT`` (10 s), then fail saying for how long.
    """
    started = time.monotonic()
    patience = None if args.command in ("worker", "serve") else Config.from_env().outage_wait
    told = False
    while True:
        try:
            return args.handler(args)
        except BackendUnavailable as error:
            waited = time.monotonic() - started
            if patience is not None and waited >= patience:
                raise BackendUnavailable(f"{error} (tried for {waited:.0f} s)") from error
            if not told and (patience is None or sys.stderr.isatty()):
                print(f"jobqueue: {error}; trying again", file=sys.stderr)
                told = True
            time.sleep(0.5)


def _answer_to_import_names() -> None:
    """Make every name of ``_import_names`` give this module, when it runs as ``__main__``."""
    for name in _import_names():
        sys.modules.setdefault(name, sys.modules[__name__])
        parent, _, child = name.rpartition(".")
        if parent in sys.modules:
            setattr(sys.modules[parent], child, sys.modules[__name__])


# Runs this file as a module named jobqueue: argv[1] is its path, the rest the command line.
_IMPORTED_BOOT = _LOAD_BY_PATH + """\
path = sys.argv.pop(1)
sys.argv[0] = path
if sys.path and sys.path[0] == "":  # a script's folder comes first, as it did (unless -I or -P said not)
    sys.path[0] = os.path.dirname(path)
sys.exit(load(path).main())
"""


def _run_again_imported() -> None:
    """Replace this process (same pid, same signals) with one that imports this file instead of running it.

    CPython keeps a script's syntax tree for as long as the script runs (it
    frees it when the top-level code returns): about 14 MiB for this file, in
    every long-lived ``worker`` and ``serve`` started as ``python
    jobqueue.py``. An imported module's tree is freed once compiled.
    """
    import subprocess

    options = subprocess._args_from_interpreter_flags()  # -O, -X, -W...: what multiprocessing passes on too
    if getattr(sys.stdout, "write_through", False) and not os.environ.get("PYTHONUNBUFFERED"):
        options.append("-u")
    os.execv(sys.executable, [sys.executable, *options, "-c", _IMPORTED_BOOT, os.path.abspath(__file__),
                              *sys.argv[1:]])


def _import_names() -> list[str]:
    """Every name user code may import this file by: ``jobqueue``, its ``-m`` name, its package path.

    Run as a script or with ``python -m vendor.jobqueue``, this module is
    ``__main__``; jobs that ``import jobqueue`` or ``from vendor import
    jobqueue`` must get this very module (one Job class, one ServiceContainer),
    not a second copy.
    """
    names = ["jobqueue"]
    if __spec__ is not None and __spec__.name:
        names.append(__spec__.name)
    path = os.path.abspath(__file__)
    for base in (os.getcwd(), *sys.path):
        relative = os.path.relpath(path, os.path.abspath(base or os.getcwd()))
        parts = relative.removesuffix(".py").split(os.sep)
        if relative.endswith(".py") and all(part.isidentifier() for part in parts):
            names.append(".".join(parts))
    return names


# == Assets ==================================================================

# The dashboard at GET /: one page, no data of its own (it reads the API with the
# token it asks for), nothing loaded from elsewhere. Values reach the DOM through
# textContent only, and the CSP admits no script but this one.
DASHBOARD_HTML = r"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>jobqueue</title>
<link rel="icon" href="data:,">
<style>
:root { font-family: system-ui, sans-serif; color: #1d232a; background: #f6f7f9; }
body { margin: 0; }
[hidden] { display: none !important; }
header { background: #1d232a; color: #fff; padding: .6rem 1rem; display: flex; gap: 1rem; align-items: baseline;
         flex-wrap: wrap; }
header h1 { font-size: 1.2rem; margin: 0; }
main { max-width: 1700px; margin: 0 auto; padding: 1rem; display: grid; gap: 1rem; }
section { background: #fff; border: 1px solid #dde1e6; border-radius: 6px; padding: .8rem 1rem; min-width: 0; }
h2 { font-size: 1rem; margin: 0 0 .6rem; }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; width: 100%; font-size: .9rem; }
th, td { text-align: left; padding: .3rem .5rem; border-bottom: 1px solid #eceff2; white-space: nowrap; }
td.number, th.number { text-align: right; font-variant-numeric: tabular-nums; }
form { display: flex; flex-wrap: wrap; gap: .6rem; align-items: flex-end; }
label { display: flex; flex-direction: column; font-size: .8rem; gap: .2rem; }
input, select, textarea, button { font: inherit; padding: .3rem .4rem; }
button { cursor: pointer; border: 1px solid #8a96a3; border-radius: 4px; background: #fff; }
button.danger { border-color: #c0392b; color: #c0392b; }
.mark { font-size: 1.1em; }
.waiting { color: #1f6fd0; } .running { color: #b58900; } .finished { color: #2e8b3e; } .failed { color: #c0392b; }
.identifier { font-family: ui-monospace, monospace; font-size: .8rem; }
.progress { display: inline-flex; gap: .3rem; align-items: center; margin-left: .4rem; font-size: .8rem; }
.progress progress { width: 5rem; }
pre { white-space: pre-wrap; word-break: break-word; background: #f3f4f6; padding: .5rem; font-size: .8rem; }
dl { display: grid; grid-template-columns: max-content 1fr; gap: .2rem 1rem; margin: 0; }
dt { font-weight: 600; } dd { margin: 0; word-break: break-word; }
#message { min-height: 1.2em; margin: 0; color: #c0392b; }
.pager { display: flex; gap: .6rem; align-items: center; margin-top: .5rem; }
@media (min-width: 1000px) {
  main { grid-template-columns: minmax(0, 2fr) minmax(0, 1fr); align-items: start; }
  #message, #token-form { grid-column: 1 / -1; }
  #tasks-section { grid-column: 1; grid-row: span 3; }
  main > section:not(#tasks-section) { grid-column: 2; }
}
</style>
</head>
<body>
<header><h1>jobqueue</h1><span id="throughput" aria-live="polite"></span></header>
<main>
  <form id="token-form" hidden>
    <label for="token">API token<input id="token" name="token" type="password" autocomplete="off" required></label>
    <button type="submit">Use this token</button>
  </form>
  <p id="message" role="status"></p>
  <section id="tasks-section" aria-labelledby="tasks-title">
    <h2 id="tasks-title">Tasks</h2>
    <form id="filters">
      <label for="filter-profile">Profile<input id="filter-profile" name="profile" placeholder="any"></label>
      <label for="filter-status">Status<select id="filter-status" name="status">
        <option value="">any</option><option>waiting</option><option>running</option>
        <option>finished</option><option>failed</option>
      </select></label>
      <label for="filter-tag">Tag<input id="filter-tag" name="tags" placeholder="any"></label>
      <label for="filter-order">Order<select id="filter-order" name="order">
        <option value="status">status</option><option value="date">date</option>
        <option value="profile">profile</option>
      </select></label>
      <button type="submit">Filter</button>
    </form>
    <div class="scroll">
      <table id="tasks">
        <caption hidden>Tasks matching the filters</caption>
        <thead><tr><th>Status</th><th>Job</th><th>Profile</th><th>Date</th><th>Tags</th>
          <th class="number">Attempts</th><th>Identifier</th></tr></thead>
        <tbody></tbody>
      </table>
    </div>
    <div class="pager">
      <button type="button" id="previous">Previous</button>
      <span id="page" aria-live="polite"></span>
      <button type="button" id="next">Next</button>
    </div>
  </section>
  <section aria-labelledby="counts-title">
    <h2 id="counts-title">Counts</h2>
    <div class="scroll">
      <table id="counts">
        <thead><tr><th>Profile</th><th class="number waiting">waiting</th><th class="number running">running</th>
          <th class="number finished">finished</th><th class="number failed">failed</th><th>limits</th></tr></thead>
        <tbody></tbody>
      </table>
    </div>
  </section>
  <section aria-labelledby="schedules-title">
    <h2 id="schedules-title">Schedules</h2>
    <div class="scroll">
      <table id="schedules">
        <thead><tr><th>Name</th><th>Profile</th><th>When</th><th>Next run</th><th>Last run</th></tr></thead>
        <tbody></tbody>
      </table>
    </div>
    <p id="no-schedule" hidden>no schedule</p>
  </section>
  <section id="detail" aria-labelledby="detail-title" hidden>
    <h2 id="detail-title">Task</h2>
    <dl id="detail-fields"></dl>
    <div class="pager">
      <button type="button" id="retry" hidden>Retry</button>
      <button type="button" id="cancel" class="danger" hidden>Cancel</button>
      <button type="button" id="delete" class="danger">Delete</button>
      <button type="button" id="close">Close</button>
    </div>
  </section>
  <section aria-labelledby="add-title">
    <h2 id="add-title">Add a task</h2>
    <form id="add">
      <label for="add-profile">Profile<input id="add-profile" name="profile" required></label>
      <label for="add-job">Job<input id="add-job" name="job" required placeholder="myapp.jobs.SendMailJob"></label>
      <label for="add-parameters">Parameters (JSON)
        <textarea id="add-parameters" name="parameters" rows="2">{}</textarea></label>
      <label for="add-tags">Tags (comma-separated)<input id="add-tags" name="tags"></label>
      <button type="submit">Add</button>
    </form>
  </section>
</main>
<script>
"use strict";
const TOKEN = "jobqueue-token";
const state = { offset: 0, limit: 50, total: 0, selected: null, history: [], busy: false, locked: false };
const $ = (id) => document.getElementById(id);

function element(tag, attributes, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes || {})) {
    if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else node.setAttribute(name, value);
  }
  for (const child of children) node.append(child instanceof Node ? child : String(child ?? ""));
  return node;
}

async function api(method, path, body) {
  const headers = { Accept: "application/json" };
  const token = sessionStorage.getItem(TOKEN);
  if (token) headers.Authorization = "Bearer " + token;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const response = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  if (response.status === 401) {
    // A request sent before the token was given answers 401 after it: only a refusal of the current token asks.
    if (sessionStorage.getItem(TOKEN) === token) {
      state.locked = true;
      $("token-form").hidden = false;
    }
    throw new Error("This server needs an API token.");
  }
  const data = response.status === 204 ? null : await response.json();
  if (!response.ok) throw new Error((data && data.message) || response.statusText);
  return { data, response };
}

function say(text) { $("message").textContent = text || ""; }

function when(iso) { return iso ? new Date(iso).toLocaleString() : "-"; }

function progressOf(task) {
  const progress = task.progress;
  if (!progress) return "";
  const percent = Math.round(progress.fraction * 100) + "%";
  return element("span", { class: "progress" },
    element("progress", { max: "1", value: String(progress.fraction), "aria-label": "progress " + percent }),
    percent + (progress.message ? " " + progress.message : ""));
}

async function refreshCounts() {
  const [{ data: stats }, { data: completed }, { data: limits }] = await Promise.all(
    [api("GET", "/stats"), api("GET", "/completed"), api("GET", "/limits")]);
  const profiles = Object.keys(stats);
  const body = $("counts").tBodies[0];
  body.replaceChildren(...profiles.map((profile) => element("tr", {},
    element("td", {}, profile),
    ...["waiting", "running", "finished", "failed"].map((s) => element("td", { class: "number" }, stats[profile][s])),
    element("td", { class: "limits" }, limitsText(limits[profile] || { concurrency: null, rate: null })))));
  let executed = 0, failed = 0;
  for (const counts of Object.values(completed)) { executed += counts.finished; failed += counts.failed; }
  const now = Date.now();
  state.history.push({ now, executed, failed });
  state.history = state.history.filter((sample) => now - sample.now <= 61000);
  const first = state.history[0];
  $("throughput").textContent = `last minute: ${executed - first.executed} executed, ` +
    `${failed - first.failed} failed`;
}

async function refreshSchedules() {
  const { data: schedules } = await api("GET", "/schedules");
  $("schedules").tBodies[0].replaceChildren(...schedules.map((schedule) => element("tr", {},
    element("td", {}, schedule.name),
    element("td", {}, schedule.profile),
    element("td", {}, schedule.cron === undefined ? `every ${schedule.every} s` :
      `${schedule.cron} (${schedule.timezone})`),
    element("td", {}, when(schedule.next_run_at)),
    element("td", {}, when(schedule.last_run_at)))));
  $("no-schedule").hidden = schedules.length > 0;
}

function limitsText(limits) {
  const parts = [];
  if (limits.concurrency !== null) parts.push(`at most ${limits.concurrency} running`);
  if (limits.rate !== null) parts.push(`${limits.rate} started`);
  return parts.join(", ");
}

function query() {
  const form = new FormData($("filters"));
  const params = new URLSearchParams();
  for (const [name, value] of form) if (value) params.set(name, value);
  params.set("limit", state.limit);
  params.set("offset", state.offset);
  return params.toString();
}

async function refreshTasks() {
  const { data: tasks, response } = await api("GET", "/tasks?" + query());
  state.total = Number(response.headers.get("X-Total-Count") || tasks.length);
  $("tasks").tBodies[0].replaceChildren(...tasks.map((task) => element("tr", {},
    element("td", {}, element("span", { class: "mark " + task.status, "aria-hidden": "true" }, "■"), " ", task.status,
      task.status === "running" ? progressOf(task) : ""),
    element("td", {}, task.job_name),
    element("td", {}, task.profile),
    element("td", {}, when(task.created_at)),
    element("td", {}, task.tags.join(", ")),
    element("td", { class: "number" }, task.attempts),
    element("td", {}, element("button", { type: "button", class: "identifier", onclick: () => show(task.identifier) },
      task.identifier)))));
  const last = Math.min(state.offset + state.limit, state.total);
  $("page").textContent = state.total ? `${state.offset + 1} to ${last} of ${state.total}` : "no task";
  $("previous").disabled = state.offset === 0;
  $("next").disabled = last >= state.total;
}

async function show(identifier) {
  try {
    const { data: task } = await api("GET", "/task/" + encodeURIComponent(identifier));
    state.selected = task;
    const rows = [["Identifier", task.identifier], ["Status", task.status], ["Progress", progressOf(task) || "-"],
      ["Job", task.job],
      ["Profile", task.profile],
      ["Created", when(task.created_at)], ["Started", when(task.started_at)], ["Finished", when(task.finished_at)],
      ["Run at", when(task.run_at)], ["Schedule", task.schedule || "-"], ["Priority", task.priority],
      ["Unique key", task.unique_key ?? "-"],
      ["Expires", when(task.expires_at)], ["Worker", task.worker || "-"], ["Attempts", task.attempts],
      ["Failures", `${task.failures} (retries allowed: ${task.retries})`], ["Tags", task.tags.join(", ") || "(none)"],
      ["Depends on", task.depends_on.length ? element("span", { class: "dependencies" }, ...task.depends_on.map(
        (id) => element("button", { type: "button", title: id, onclick: () => show(id) }, id.slice(0, 8)))) : "(none)"],
      ["Parameters", element("pre", {}, JSON.stringify(task.parameters, null, 2))],
      ["Result", task.result === null ? "-" : element("pre", {}, JSON.stringify(task.result, null, 2))],
      ["Error", task.error ? element("pre", { id: "error" }, task.error) : "-"]];
    $("detail-fields").replaceChildren(
      ...rows.flatMap(([name, value]) => [element("dt", {}, name), element("dd", {}, value)]));
    $("retry").hidden = task.status !== "failed";
    $("cancel").hidden = !["waiting", "running"].includes(task.status);
    $("detail").hidden = false;
    $("detail-title").focus();
  } catch (error) { say(error.message); }
}

async function act(confirmation, method, path, done) {
  if (!window.confirm(confirmation)) return;
  try { await api(method, path); say(""); done(); await refresh(); } catch (error) { say(error.message); }
}

async function refresh() {
  if (state.busy || state.locked) return;
  state.busy = true;
  try { await Promise.all([refreshCounts(), refreshTasks(), refreshSchedules()]); say(""); }
  catch (error) { say(error.message); }
  finally { state.busy = false; }
}

$("filters").addEventListener("submit", (event) => { event.preventDefault(); state.offset = 0; refresh(); });
for (const id of ["filter-status", "filter-order"]) {
  $(id).addEventListener("change", () => { state.offset = 0; refresh(); });
}
$("previous").addEventListener("click", () => { state.offset = Math.max(0, state.offset - state.limit); refresh(); });
$("next").addEventListener("click", () => { state.offset += state.limit; refresh(); });
$("close").addEventListener("click", () => { $("detail").hidden = true; state.selected = null; });
$("retry").addEventListener("click", () => act(`Retry task ${state.selected.identifier}?`, "POST",
  `/task/${encodeURIComponent(state.selected.identifier)}/retry`, () => show(state.selected.identifier)));
$("cancel").addEventListener("click", () => act(`Cancel task ${state.selected.identifier}?`, "POST",
  `/task/${encodeURIComponent(state.selected.identifier)}/cancel`, () => show(state.selected.identifier)));
$("delete").addEventListener("click", () => act(`Delete task ${state.selected.identifier}?`, "DELETE",
  `/task/${encodeURIComponent(state.selected.identifier)}`, () => { $("detail").hidden = true; }));
$("add").addEventListener("submit", async (event) => {
  event.preventDefault();
  const form = new FormData(event.target);
  let parameters;
  try { parameters = JSON.parse(form.get("parameters") || "{}"); }
  catch { say("Parameters must be a JSON object"); return; }
  const tags = String(form.get("tags") || "").split(",").map((tag) => tag.trim()).filter(Boolean);
  if (!window.confirm(`Add a ${form.get("job")} task to ${form.get("profile")}?`)) return;
  try {
    const body = { profile: form.get("profile"), job: form.get("job"), parameters, tags };
    const { data: task } = await api("POST", "/tasks", body);
    say(""); await refresh(); show(task.identifier);
  } catch (error) { say(error.message); }
});
$("token-form").addEventListener("submit", (event) => {
  event.preventDefault();
  sessionStorage.setItem(TOKEN, $("token").value);
  $("token").value = "";
  $("token-form").hidden = true;
  state.locked = false;
  refresh();
});
$("detail-title").tabIndex = -1;
refresh();
setInterval(refresh, 2000);
</script>
</body>
</html>
"""


if __name__ == "__main__":
    if __spec__ is None and sys.argv[1:2] in (["worker"], ["serve"]) and hasattr(os, "execv"):
        _run_again_imported()
    _answer_to_import_names()
    sys.exit(main())
