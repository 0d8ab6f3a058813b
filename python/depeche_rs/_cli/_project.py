"""`depeche-rs project`: keep aggregated streams up to date, continuously (the steps are in
docs/cli.md). One process projects one or more aggregated streams from one thread: this
module sets it up and tears it down; `_loop` is what it adds to the live runtime
(`.._runtime.live`) that the `Executor` runs on too.
"""

from __future__ import annotations

import importlib.metadata
import logging
from typing import Any

import psycopg
import sqlalchemy as sa

from .._db.connection import redact, to_engine
from .._exceptions import DatabaseConnectionError, DatabaseError, UnsafeSequenceError
from .._store.message_store import MessageStore
from . import _catalog
from ._config import ProjectSettings
from ._control import ControlConnection
from ._json_messages import JsonSerializer, json_resolver
from ._logging import event, setup_logging
from ._loop import ProjectedStream, ProjectLoop
from ._metrics import MetricsServer, MetricsUnavailableError, ProjectorMetrics
from ._signals import Abandoned, StopSignal


def _version() -> str:
    try:
        return importlib.metadata.version("depeche-rs")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - source checkout
        return "unknown"


def _open_streams(settings: ProjectSettings, engine: sa.Engine) -> list[ProjectedStream]:
    """Create what is missing; one `StreamProjector` per stream."""
    streams: list[ProjectedStream] = []
    for spec in settings.streams:
        assert spec.partitioner is not None
        serializer: Any = spec.serializer_obj or JsonSerializer(spec.time_fields)
        store: MessageStore[Any] = MessageStore(spec.store, engine, serializer)
        aggregated = store.aggregated_stream(
            spec.stream,
            spec.partitioner.obj,
            list(spec.wildcards),
            update_batch_size=spec.batch_size,
        )
        projector = aggregated.projector
        resolve = (
            projector.resolve_rows
            if spec.serializer_obj is not None
            else json_resolver(projector.resolve_rows, spec.time_fields, spec.store)
        )
        streams.append(ProjectedStream(spec=spec, projector=projector, resolve=resolve))
    return streams


def _registry_note(stream: ProjectedStream, previous: _catalog.Registration | None) -> None:
    spec = stream.spec
    assert spec.partitioner is not None
    if previous is None:
        return
    changes = []
    if previous.store != spec.store:
        changes.append(f"store {previous.store} -> {spec.store}")
    if tuple(previous.wildcards) != spec.wildcards:
        changes.append(f"wildcards {list(previous.wildcards)} -> {list(spec.wildcards)}")
    if previous.partitioner != spec.partitioner.text:
        changes.append(f"partitioner {previous.partitioner} -> {spec.partitioner.text}")
    if changes:
        event(
            logging.WARNING,
            "config_changed",
            f"{stream.name}: projected with a different configuration before "
            f"({'; '.join(changes)}, by {previous.registered_by}); messages already "
            "projected keep their partitions",
            stream=stream.name,
            changes=changes,
        )


def run_project(settings: ProjectSettings) -> int:
    """Run `depeche-rs project` with checked settings; returns the exit status."""
    console = setup_logging(settings.log_format, settings.log_level)
    stop = StopSignal(settings.stop_timeout)
    stop.install()
    metrics = ProjectorMetrics()
    control: ControlConnection | None = None
    server: MetricsServer | None = None
    streams: list[ProjectedStream] = []
    try:
        event(
            logging.INFO,
            "start",
            f"depeche-rs {_version()} projecting {len(settings.streams)} aggregated "
            f"stream(s) on {redact(settings.dsn)}",
            dsn=redact(settings.dsn),
            streams=[s.stream for s in settings.streams],
        )
        engine = to_engine(settings.dsn)
        try:
            streams = _open_streams(settings, engine)
        except (DatabaseConnectionError, sa.exc.OperationalError) as exc:
            event(logging.ERROR, "error", f"cannot start: {exc}")
            return 1
        except (DatabaseError, sa.exc.DBAPIError) as exc:
            event(logging.ERROR, "error", f"cannot create the tables: {exc}")
            return 1
        except UnsafeSequenceError as exc:
            fix = f"; fix: {exc.fix}" if exc.fix else ""
            event(logging.ERROR, "error", f"cannot start: {exc}{fix}", sequence=exc.sequence)
            return 1
        finally:
            # Only needed to create what was missing; the engine keeps its own connections.
            engine.dispose()
        control = ControlConnection(settings.dsn, {s.notification_channel for s in streams})
        try:
            control.connect()
            for stream in streams:
                assert stream.spec.partitioner is not None
                previous = _catalog.register(
                    control.connection,
                    stream.name,
                    stream.spec.store,
                    stream.spec.wildcards,
                    stream.spec.partitioner.text,
                    stream.spec.batch_size,
                    control.name,
                )
                _registry_note(stream, previous)
        except psycopg.Error as exc:
            event(logging.ERROR, "error", f"cannot start: {str(exc).strip()}")
            return 1
        metrics.reconnects.touch("listen")
        for stream in streams:
            metrics.add_stream(stream.name)
            spec, partitioner = stream.spec, stream.spec.partitioner
            assert partitioner is not None
            serializer = spec.serializer or f"raw JSON (time from {', '.join(spec.time_fields)})"
            where = "in Rust" if partitioner.in_rust else "in Python"
            event(
                logging.INFO,
                "stream",
                f"{stream.name}: store {spec.store}, wildcards {', '.join(spec.wildcards)}, "
                f"partitioner {partitioner.text} ({where}), batch size {spec.batch_size}, "
                f"serializer {serializer}",
                stream=stream.name,
                store=spec.store,
                wildcards=list(spec.wildcards),
                partitioner=partitioner.text,
                batch_size=spec.batch_size,
                instance=control.name,
            )
        if settings.metrics_port is not None:
            try:
                server = MetricsServer(metrics, settings.metrics_host, settings.metrics_port)
            except (OSError, MetricsUnavailableError) as exc:
                event(
                    logging.ERROR,
                    "error",
                    f"cannot serve metrics on {settings.metrics_host}:"
                    f"{settings.metrics_port}: {exc}",
                )
                return 1
            event(
                logging.INFO,
                "metrics",
                f"serving Prometheus metrics on http://{settings.metrics_host}:"
                f"{server.port}/metrics",
                host=settings.metrics_host,
                port=server.port,
            )
        status = ProjectLoop(settings, streams, control, metrics, console, stop).run()
        stop.disarm()
        total = sum(s.projected_total for s in streams)
        event(
            logging.INFO if status == 0 else logging.ERROR,
            "stopped",
            f"stopped (exit status {status}); projected {total:,} messages since the start",
            status=status,
            projected=total,
        )
        return status
    except Abandoned as exc:
        stop.disarm()
        event(
            logging.WARNING,
            "stopped",
            f"stopped on {stop.signal_name}: abandoned the batch in progress ({exc}); "
            "PostgreSQL rolls it back whole",
            status=0,
            abandoned=True,
        )
        return 0
    finally:
        stop.disarm()
        for stream in streams:
            if stream.progress is not None:
                stream.progress.finish()
            stream.projector.close()
        if control is not None:
            control.close()
        if server is not None:
            server.close()
        stop.restore()
