"""Prometheus metrics of `depeche-rs project`, exposed by `prometheus_client`.

`prometheus_client` is the optional `metrics` extra (`pip install 'depeche-rs[metrics]'`):
without it the projector runs and keeps no metrics, and asking for `--metrics-port` is an
error that says what to install. The metrics live in their own registry, so a scrape shows
exactly the families below (no process or platform collectors).
"""

from __future__ import annotations

from typing import Any

try:
    import prometheus_client
except ImportError:  # the `metrics` extra is not installed: no metrics, nothing served
    prometheus_client = None  # type: ignore[assignment]

BATCH_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
INSTALL_HINT = "serving metrics needs prometheus_client: pip install 'depeche-rs[metrics]'"


class MetricsUnavailableError(RuntimeError):
    """`--metrics-port` was asked for without the `metrics` extra installed."""


class Family:
    """One metric family of prometheus_client's `kind` (`Counter`, `Gauge` or `Histogram`)
    with one label, whose value each method takes; every method is a no-op without
    prometheus_client (`registry` None)."""

    def __init__(
        self,
        registry: Any,
        kind: str,
        name: str,
        help_text: str,
        label_name: str = "stream",
        **options: Any,
    ) -> None:
        self._family: Any = None
        if registry is not None:
            make = getattr(prometheus_client, kind)
            self._family = make(name, help_text, [label_name], registry=registry, **options)

    def _series(self, label: str) -> Any:
        return None if self._family is None else self._family.labels(label)

    def touch(self, label: str) -> None:
        """Show the series (at 0, with no observations) before its first change: rate()
        needs the start."""
        self._series(label)

    def inc(self, label: str, amount: float = 1.0) -> None:
        """Add `amount` (>= 0) to a counter."""
        if self._family is not None:
            self._series(label).inc(amount)

    def set(self, label: str, value: float) -> None:
        """Set a gauge."""
        if self._family is not None:
            self._series(label).set(value)

    def observe(self, label: str, value: float) -> None:
        """Record one observation of a histogram."""
        if self._family is not None:
            self._series(label).observe(value)


class ProjectorMetrics:
    """The metrics of `depeche-rs project`, labelled by aggregated stream."""

    def __init__(self) -> None:
        registry = None
        if prometheus_client is not None:
            # The `_created` series would add a family per counter and histogram to the
            # scrape; this process is the command line's own, so the switch is ours to flip.
            prometheus_client.disable_created_metrics()  # type: ignore[no-untyped-call]
            registry = prometheus_client.CollectorRegistry()
        self.registry = registry
        self.projected = Family(
            registry,
            "Counter",
            "depeche_rs_projected_messages_total",
            "Messages written to the aggregated stream by this process.",
        )
        self.backlog = Family(
            registry,
            "Gauge",
            "depeche_rs_backlog_messages",
            "Matching messages above the projector's cursor not yet in the aggregated stream.",
        )
        self.batch_duration = Family(
            registry,
            "Histogram",
            "depeche_rs_batch_duration_seconds",
            "Duration of the batches that projected messages (one transaction each).",
            buckets=BATCH_BUCKETS,
        )
        self.last_batch = Family(
            registry,
            "Gauge",
            "depeche_rs_last_batch_timestamp_seconds",
            "Unix time this process last completed a batch, including one that found nothing.",
        )
        self.lock_holder = Family(
            registry,
            "Gauge",
            "depeche_rs_lock_holder",
            "1 while this process holds the stream's projector lock (active), 0 on standby.",
        )
        self.reconnects = Family(
            registry,
            "Counter",
            "depeche_rs_reconnects_total",
            "Connections re-established after being lost ('listen' is the LISTEN/lock one).",
            label_name="connection",
        )
        self.stuck = Family(
            registry,
            "Gauge",
            "depeche_rs_stuck",
            "1 while the stream's batches fail with an error no retry fixes (a message the "
            "serializer cannot read, a failing partitioner, ...) on this active instance.",
        )

    def add_stream(self, stream: str) -> None:
        """Show every series of `stream` from the start."""
        self.projected.touch(stream)
        self.batch_duration.touch(stream)
        self.lock_holder.set(stream, 0)
        self.reconnects.touch(stream)
        self.stuck.set(stream, 0)


class MetricsServer:
    """Serves the metrics at `/metrics` over HTTP from a daemon thread, so a scrape never waits
    for a batch (`prometheus_client.start_http_server`: it listens as soon as it is built)."""

    def __init__(self, metrics: ProjectorMetrics, host: str, port: int) -> None:
        if metrics.registry is None:
            raise MetricsUnavailableError(INSTALL_HINT)
        self._server, self._thread = prometheus_client.start_http_server(
            port, host, registry=metrics.registry
        )

    @property
    def port(self) -> int:
        """The port listened on (useful when 0 was asked for)."""
        return int(self._server.server_address[1])

    def close(self) -> None:
        """Stop serving and release the port."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
