"""Prometheus metrics of `depeche-rs project`, in the text exposition format (0.0.4).

No client library: counters, gauges and one histogram are a few dictionaries, served by
`http.server` from a daemon thread, so a scrape never waits for a batch.
"""

from __future__ import annotations

import abc
import http.server
import math
import threading
from collections.abc import Sequence
from typing import Any

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
BATCH_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

Labels = tuple[str, ...]


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if math.isnan(value):
        return "NaN"
    if value == int(value) and abs(value) < 2**53:
        return str(int(value))
    return repr(value)


def _labels(names: Sequence[str], values: Sequence[str], extra: str = "") -> str:
    parts = [f'{n}="{_escape(v)}"' for n, v in zip(names, values, strict=True)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


class _Metric(abc.ABC):
    kind = "untyped"

    def __init__(self, name: str, help_text: str, label_names: Sequence[str]) -> None:
        self.name = name
        self.help = help_text
        self.label_names = tuple(label_names)
        self._lock = threading.Lock()

    def _header(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]

    @abc.abstractmethod
    def render(self) -> list[str]:
        """The metric's lines in the Prometheus text format."""


class Counter(_Metric):
    """A value that only goes up."""

    kind = "counter"

    def __init__(self, name: str, help_text: str, label_names: Sequence[str]) -> None:
        super().__init__(name, help_text, label_names)
        self._values: dict[Labels, float] = {}

    def inc(self, labels: Labels, amount: float = 1.0) -> None:
        """Add `amount` (>= 0)."""
        with self._lock:
            self._values[labels] = self._values.get(labels, 0.0) + amount

    def touch(self, labels: Labels) -> None:
        """Show the series at 0 before its first increment (rate() needs the start)."""
        with self._lock:
            self._values.setdefault(labels, 0.0)

    def render(self) -> list[str]:
        """The exposition lines."""
        with self._lock:
            items = sorted(self._values.items())
        return self._header() + [
            f"{self.name}{_labels(self.label_names, k)} {_number(v)}" for k, v in items
        ]


class Gauge(_Metric):
    """A value that goes up and down."""

    kind = "gauge"

    def __init__(self, name: str, help_text: str, label_names: Sequence[str]) -> None:
        super().__init__(name, help_text, label_names)
        self._values: dict[Labels, float] = {}

    def set(self, labels: Labels, value: float) -> None:
        """Set the value."""
        with self._lock:
            self._values[labels] = float(value)

    def render(self) -> list[str]:
        """The exposition lines."""
        with self._lock:
            items = sorted(self._values.items())
        return self._header() + [
            f"{self.name}{_labels(self.label_names, k)} {_number(v)}" for k, v in items
        ]


class Histogram(_Metric):
    """Observations counted in cumulative buckets, with their sum and count."""

    kind = "histogram"

    def __init__(
        self,
        name: str,
        help_text: str,
        label_names: Sequence[str],
        buckets: Sequence[float] = BATCH_BUCKETS,
    ) -> None:
        super().__init__(name, help_text, label_names)
        self.buckets = tuple(sorted(buckets))
        self._counts: dict[Labels, list[int]] = {}
        self._sums: dict[Labels, float] = {}

    def touch(self, labels: Labels) -> None:
        """Show the series with zero observations."""
        with self._lock:
            self._counts.setdefault(labels, [0] * (len(self.buckets) + 1))
            self._sums.setdefault(labels, 0.0)

    def observe(self, labels: Labels, value: float) -> None:
        """Record one observation."""
        with self._lock:
            counts = self._counts.setdefault(labels, [0] * (len(self.buckets) + 1))
            index = next((i for i, b in enumerate(self.buckets) if value <= b), len(self.buckets))
            counts[index] += 1
            self._sums[labels] = self._sums.get(labels, 0.0) + value

    def render(self) -> list[str]:
        """The exposition lines (`_bucket` with `le`, `_sum`, `_count`)."""
        with self._lock:
            items = sorted((k, list(v), self._sums.get(k, 0.0)) for k, v in self._counts.items())
        lines = self._header()
        for labels, counts, total in items:
            running = 0
            for bound, count in zip((*self.buckets, math.inf), counts, strict=True):
                running += count
                le = f'le="{_number(bound)}"'
                lines.append(f"{self.name}_bucket{_labels(self.label_names, labels, le)} {running}")
            lines.append(f"{self.name}_sum{_labels(self.label_names, labels)} {_number(total)}")
            lines.append(f"{self.name}_count{_labels(self.label_names, labels)} {running}")
        return lines


class ProjectorMetrics:
    """The metrics of `depeche-rs project`, labelled by aggregated stream."""

    def __init__(self) -> None:
        self.projected = Counter(
            "depeche_rs_projected_messages_total",
            "Messages written to the aggregated stream by this process.",
            ["stream"],
        )
        self.backlog = Gauge(
            "depeche_rs_backlog_messages",
            "Matching messages above the projector's cursor not yet in the aggregated stream.",
            ["stream"],
        )
        self.batch_duration = Histogram(
            "depeche_rs_batch_duration_seconds",
            "Duration of the batches that projected messages (one transaction each).",
            ["stream"],
        )
        self.last_batch = Gauge(
            "depeche_rs_last_batch_timestamp_seconds",
            "Unix time this process last completed a batch, including one that found nothing.",
            ["stream"],
        )
        self.lock_holder = Gauge(
            "depeche_rs_lock_holder",
            "1 while this process holds the stream's projector lock (active), 0 on standby.",
            ["stream"],
        )
        self.reconnects = Counter(
            "depeche_rs_reconnects_total",
            "Connections re-established after being lost ('listen' is the LISTEN/lock one).",
            ["connection"],
        )
        self.stuck = Gauge(
            "depeche_rs_stuck",
            "1 while the stream's batches fail with an error no retry fixes (a message the "
            "serializer cannot read, a failing partitioner, ...) on this active instance.",
            ["stream"],
        )
        self._all: list[_Metric] = [
            self.projected,
            self.backlog,
            self.batch_duration,
            self.last_batch,
            self.lock_holder,
            self.reconnects,
            self.stuck,
        ]

    def add_stream(self, stream: str) -> None:
        """Show every series of `stream` from the start."""
        labels = (stream,)
        self.projected.touch(labels)
        self.batch_duration.touch(labels)
        self.lock_holder.set(labels, 0)
        self.reconnects.touch(labels)
        self.stuck.set(labels, 0)

    def render(self) -> str:
        """The whole exposition text."""
        lines: list[str] = []
        for metric in self._all:
            lines.extend(metric.render())
        return "\n".join(lines) + "\n"


class MetricsServer:
    """Serves `GET /metrics` from a daemon thread."""

    def __init__(self, metrics: ProjectorMetrics, host: str, port: int) -> None:
        render = metrics.render

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path.split("?", 1)[0] not in ("/metrics", "/"):
                    self.send_error(404, "only /metrics is served here")
                    return
                body = render().encode()
                self.send_response(200)
                self.send_header("Content-Type", CONTENT_TYPE)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                # Scrapes every few seconds would drown the event lines.
                pass

        self._server = http.server.ThreadingHTTPServer((host, port), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="depeche-rs metrics", daemon=True
        )

    @property
    def port(self) -> int:
        """The port listened on (useful when 0 was asked for)."""
        return int(self._server.server_address[1])

    def start(self) -> None:
        """Start serving."""
        self._thread.start()

    def close(self) -> None:
        """Stop serving and release the port."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
