"""Settings of `depeche-rs project` and `status`, from command-line arguments and a TOML file.

Everything here is checked before a connection is opened, and every problem is a
`ConfigError`, which the command turns into exit status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import math
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .._db.connection import libpq_form, sqlalchemy_url
from .._exceptions import InvalidNameError, InvalidWildcardError
from .._names import validate_name, validate_wildcards
from .._projection.projector import DEFAULT_BATCH_SIZE, builtin_partitioner
from ..tools import StreamHashPartitioner, StreamNamePartitioner
from ._json_messages import DEFAULT_TIME_FIELDS

DSN_ENV = "DEPECHE_RS_DSN"

LOG_FORMATS = ("text", "json")
LOG_LEVELS = ("debug", "info", "warning", "error")
# Settings of the process, from the argument of the same name or the config's top level, in
# the order they are checked: TOML type, default, and the values a string may take (None: any).
_PROCESS_SETTINGS: dict[str, tuple[type, Any, tuple[str, ...] | None]] = {
    "log_format": (str, "text", LOG_FORMATS),
    "log_level": (str, "info", LOG_LEVELS),
    "metrics_port": (int, None, None),
    "poll_interval": (float, 1.0, None),
    "stop_timeout": (float, 3.0, None),
    "progress_interval": (float, 10.0, None),
    "metrics_host": (str, "0.0.0.0", None),
}
# The settings a `[[streams]]` table may give, and those it takes from the top level when not.
_STREAM_DEFAULTS = ("batch_size", "serializer", "time_fields")
_STREAM_KEYS = {"store", "stream", "wildcards", "partitioner", *_STREAM_DEFAULTS}
_TOP_LEVEL_KEYS = {"dsn", "streams", *_PROCESS_SETTINGS, *_STREAM_DEFAULTS}


class ConfigError(ValueError):
    """Bad arguments or configuration; the command exits with status 2."""


@dataclasses.dataclass(frozen=True)
class PartitionerSpec:
    """A partitioner as named on the command line (`text`: `stream-hash`, `hash-mod:8`,
    `pkg.module:attr`), resolved to the object handed to `AggregatedStream`; `in_rust`: the
    Rust engine computes its partitions, not Python."""

    text: str
    obj: Any
    in_rust: bool


@dataclasses.dataclass(frozen=True)
class StreamSpec:
    """One aggregated stream to project: `partitioner` is None for `status`, which does not
    need one; `serializer` (`module:attr`, and its object) is None for raw JSON messages, whose
    time is in the first of `time_fields` that holds one."""

    store: str
    stream: str
    wildcards: tuple[str, ...]
    partitioner: PartitionerSpec | None
    batch_size: int
    serializer: str | None = None
    serializer_obj: Any = None
    time_fields: tuple[str, ...] = DEFAULT_TIME_FIELDS


@dataclasses.dataclass(frozen=True)
class ProjectSettings:
    """Everything `depeche-rs project` runs with."""

    dsn: str
    streams: tuple[StreamSpec, ...]
    poll_interval: float
    stop_timeout: float
    progress_interval: float
    log_format: str
    log_level: str
    metrics_port: int | None
    metrics_host: str
    once: bool


def import_object(text: str, what: str) -> Any:
    """Import `module:attr` (attr may be dotted), as `python -m` would from the cwd."""
    module_name, sep, attr = text.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(f"{what} {text!r} must be given as module:attribute")
    # A console script does not put the working directory on sys.path; `python -m` does,
    # and users expect `myapp.partitioners:ByAccount` to import from where they run.
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"{what} {text!r}: cannot import module {module_name!r}: {exc}") from exc
    except Exception as exc:
        raise ConfigError(
            f"{what} {text!r}: importing module {module_name!r} raised {exc!r}"
        ) from exc
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError as exc:
            raise ConfigError(
                f"{what} {text!r}: {module_name!r} has no attribute {attr!r}"
            ) from exc
    return obj


def _instantiate(obj: Any, text: str, what: str) -> Any:
    if not isinstance(obj, type):
        return obj
    try:
        return obj()
    except Exception as exc:
        raise ConfigError(
            f"{what} {text!r} is a class that cannot be instantiated without arguments "
            f"({exc!r}); point to an instance instead"
        ) from exc


def parse_partitioner(text: str) -> PartitionerSpec:
    """`stream-hash`, `hash-mod:N` or `module:attr` to a partitioner."""
    obj: Any
    if text == "stream-hash":
        obj = StreamNamePartitioner()
    elif text.startswith("hash-mod:"):
        try:
            modulus = int(text.removeprefix("hash-mod:"))
        except ValueError:
            modulus = 0
        if not 1 <= modulus <= 2**31 - 1:
            raise ConfigError(
                f"partitioner {text!r}: the modulus must be an integer from 1 to {2**31 - 1}"
            )
        obj = StreamHashPartitioner(modulus)
    elif ":" in text and not text.startswith("hash-mod"):
        obj = _instantiate(import_object(text, "partitioner"), text, "partitioner")
        if not callable(getattr(obj, "get_partition", None)):
            raise ConfigError(
                f"partitioner {text!r} ({type(obj).__name__}) has no get_partition(message) method"
            )
    else:
        raise ConfigError(
            f"unknown partitioner {text!r}: use stream-hash (depeche-db's StreamNamePartitioner), "
            "hash-mod:N (N partitions by stream hash) or module:attr (a Python partitioner)"
        )
    return PartitionerSpec(text=text, obj=obj, in_rust=builtin_partitioner(obj) is not None)


def parse_serializer(text: str) -> Any:
    """`module:attr` to a serializer object (a class is instantiated without arguments)."""
    obj = _instantiate(import_object(text, "serializer"), text, "serializer")
    if not callable(getattr(obj, "deserialize", None)):
        raise ConfigError(f"serializer {text!r} ({type(obj).__name__}) has no deserialize method")
    return obj


def read_toml(path: str) -> dict[str, Any]:
    """The TOML file at `path` as a dict."""
    try:
        toml: Any = importlib.import_module("tomllib")
    except ModuleNotFoundError:
        try:
            toml = importlib.import_module("tomli")
        except ModuleNotFoundError:
            raise ConfigError(
                "reading a TOML config file needs Python 3.11+ (or `pip install tomli`); "
                "on this Python, pass the settings as arguments instead"
            ) from None
    try:
        with Path(path).open("rb") as f:
            data = toml.load(f)
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from exc
    except ValueError as exc:  # tomllib.TOMLDecodeError subclasses ValueError
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a TOML table")
    return data


# Checked by hand, not pydantic: the CLI would need pydantic (an optional extra of the library),
# and each message names the flag or TOML key (with its table) the user wrote.
def _typed(table: Mapping[str, Any], key: str, kind: type, where: str) -> Any:
    """`table[key]` checked to be a `kind` (a float may be written as an int; `tuple`: a list
    of strings, returned as a tuple), or None when absent."""
    value = table.get(key)
    if value is None:
        return None
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is tuple:
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return tuple(value)
        raise ConfigError(f"{where}: {key} must be a list of strings, got {value!r}")
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ConfigError(f"{where}: {key} must be a {kind.__name__}, got {value!r}")
    return value


def _first(*values: Any) -> Any:
    """The first value that is not None (0 is a value: it must be rejected, not replaced)."""
    return next((v for v in values if v is not None), None)


def _check_keys(table: Mapping[str, Any], allowed: set[str], where: str) -> None:
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise ConfigError(
            f"{where}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(allowed))}"
        )


def resolve_dsn(given: str | None, config: Mapping[str, Any]) -> str:
    """The DSN from the argument, the config file or `$DEPECHE_RS_DSN`, checked, in a form
    libpq reads (psycopg connects with it directly)."""
    dsn = given or _typed(config, "dsn", str, "config") or os.environ.get(DSN_ENV)
    if not dsn:
        raise ConfigError(f"no database: pass --dsn, set ${DSN_ENV} or put dsn in the config")
    try:
        sqlalchemy_url(dsn)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    return libpq_form(str(dsn))


def _stream_spec(
    table: Mapping[str, Any], defaults: Mapping[str, Any], where: str, projecting: bool
) -> StreamSpec:
    _check_keys(table, _STREAM_KEYS, where)
    store = _typed(table, "store", str, where)
    stream = _typed(table, "stream", str, where)
    wildcards = _typed(table, "wildcards", tuple, where)
    partitioner = _typed(table, "partitioner", str, where)
    required = (("store", store), ("stream", stream), ("wildcards", wildcards))
    missing = [key for key, value in required if not value]
    if projecting and not partitioner:
        missing.append("partitioner")
    if missing:
        raise ConfigError(f"{where}: missing {', '.join(missing)}")
    try:
        validate_name(store, "store name")
        validate_name(stream, "aggregated stream name")
        checked = tuple(validate_wildcards(list(wildcards or ())))
    except (InvalidNameError, InvalidWildcardError) as exc:
        raise ConfigError(f"{where}: {exc}") from exc
    batch_size = _first(
        _typed(table, "batch_size", int, where), defaults.get("batch_size"), DEFAULT_BATCH_SIZE
    )
    if batch_size < 1:
        raise ConfigError(f"{where}: batch_size must be at least 1, got {batch_size}")
    serializer = _typed(table, "serializer", str, where) or defaults.get("serializer")
    time_fields = _typed(table, "time_fields", tuple, where)
    time_fields = time_fields or defaults.get("time_fields") or DEFAULT_TIME_FIELDS
    return StreamSpec(
        store=str(store),
        stream=str(stream),
        wildcards=checked,
        # `status` only needs names and wildcards: it imports no application code.
        partitioner=parse_partitioner(partitioner) if partitioner and projecting else None,
        batch_size=int(batch_size),
        serializer=serializer,
        serializer_obj=parse_serializer(serializer) if serializer and projecting else None,
        time_fields=tuple(time_fields),
    )


def stream_specs(
    args: argparse.Namespace, config: Mapping[str, Any], projecting: bool
) -> tuple[StreamSpec, ...]:
    """The streams named by `--store/--stream/--wildcard/...` or by the config's `[[streams]]`."""
    defaults: dict[str, Any] = {
        "batch_size": _first(
            getattr(args, "batch_size", None), _typed(config, "batch_size", int, "config")
        ),
        "serializer": getattr(args, "serializer", None)
        or _typed(config, "serializer", str, "config"),
        "time_fields": tuple(getattr(args, "time_field", None) or ())
        or _typed(config, "time_fields", tuple, "config"),
    }
    single = {
        "store": args.store,
        "stream": getattr(args, "stream", None),
        "wildcards": list(getattr(args, "wildcard", None) or []) or None,
        "partitioner": getattr(args, "partitioner", None),
    }
    tables = config.get("streams")
    if tables is not None and (
        not isinstance(tables, list) or not all(isinstance(t, dict) for t in tables)
    ):
        raise ConfigError("config: streams must be an array of tables ([[streams]])")
    given = {k: v for k, v in single.items() if v}
    if tables and (given.keys() - {"store"}):
        raise ConfigError(
            "give the streams either in the config file ([[streams]]) or with "
            "--stream/--wildcard/--partitioner, not both"
        )
    specs: list[StreamSpec]
    if tables:
        specs = [
            _stream_spec(t, defaults, f"config [[streams]] #{i + 1}", projecting)
            for i, t in enumerate(tables)
        ]
    elif given.keys() - {"store"}:
        specs = [_stream_spec(given, defaults, "arguments", projecting)]
    else:
        return ()
    names = [s.stream for s in specs]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ConfigError(f"aggregated stream(s) listed twice: {', '.join(duplicates)}")
    return tuple(specs)


def _setting(args: argparse.Namespace, config: Mapping[str, Any], name: str) -> Any:
    """A setting of `_PROCESS_SETTINGS`: the argument, else the config's, else the default."""
    kind, default, choices = _PROCESS_SETTINGS[name]
    value = getattr(args, name)
    if value is None:
        value = _typed(config, name, kind, "config")
    value = default if value is None else value
    if choices is not None and value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}, got {value!r}")
    if kind is int and value is not None and not 0 <= value <= 65535:
        raise ConfigError(f"metrics port must be from 0 to 65535, got {value}")
    if kind is float:
        value = float(value)
        if not math.isfinite(value) or value <= 0:
            what = name.replace("_", " ")
            raise ConfigError(f"{what} must be a positive number of seconds, got {value}")
    return value


def project_settings(args: argparse.Namespace) -> ProjectSettings:
    """Check the arguments (and config file) of `depeche-rs project`."""
    config: dict[str, Any] = read_toml(args.config) if args.config else {}
    if config:
        _check_keys(config, _TOP_LEVEL_KEYS, "config")
    settings = {name: _setting(args, config, name) for name in _PROCESS_SETTINGS}
    streams = stream_specs(args, config, projecting=True)
    if not streams:
        raise ConfigError(
            "nothing to project: give --store, --stream, --wildcard and --partitioner, "
            "or --config with [[streams]] tables"
        )
    dsn = resolve_dsn(args.dsn, config)
    return ProjectSettings(dsn=dsn, streams=streams, once=bool(args.once), **settings)
