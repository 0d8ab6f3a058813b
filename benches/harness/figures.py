"""Figures: the raw values of one measured quantity for each library, and their summary."""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections.abc import Sequence
from typing import Any, Literal

Better = Literal["higher", "lower"]


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (q in 0..100), as numpy's default does."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100.0
    low = math.floor(rank)
    high = math.ceil(rank)
    if low == high:
        return ordered[low]
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


@dataclasses.dataclass
class Summary:
    median: float
    low: float
    high: float
    n: int

    @property
    def spread_pct(self) -> float:
        """Half the range, as a percentage of the median: one number a reader can weigh."""
        if self.n < 2 or self.median == 0:
            return 0.0
        return (self.high - self.low) / 2 / abs(self.median) * 100

    def as_dict(self) -> dict[str, Any]:
        return {
            "median": self.median,
            "min": self.low,
            "max": self.high,
            "n": self.n,
            "spread_pct": self.spread_pct,
        }


def summarize(values: Sequence[float]) -> Summary | None:
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return None
    return Summary(statistics.median(finite), min(finite), max(finite), len(finite))


@dataclasses.dataclass
class Figure:
    """One row of the result table.

    `values[lib]` holds one value per repetition; `errors[lib]` why a library has none;
    `details[lib]` the raw per-repetition records (counts, timings) kept for the JSON.
    A figure with `shared=True` is library-independent (the SQL ceiling) and lives under the
    pseudo-library "postgresql". A figure with `only` set measures those libraries alone
    (a workload too slow to run with depeche-db); the others are shown as not run.
    """

    key: str
    label: str
    unit: str
    better: Better
    group: str
    throughput: bool = False
    shared: bool = False
    values: dict[str, list[float]] = dataclasses.field(default_factory=dict)
    errors: dict[str, str] = dataclasses.field(default_factory=dict)
    details: dict[str, list[dict[str, Any]]] = dataclasses.field(default_factory=dict)
    params: dict[str, Any] = dataclasses.field(default_factory=dict)
    only: list[str] = dataclasses.field(default_factory=list)

    def measures(self, lib: str) -> bool:
        """Whether this figure is meant to have a value for `lib`."""
        return not self.only or lib in self.only

    def add(self, lib: str, value: float, detail: dict[str, Any] | None = None) -> None:
        self.values.setdefault(lib, []).append(value)
        self.details.setdefault(lib, []).append(detail or {})

    def fail(self, lib: str, error: str) -> None:
        # Keep the first error: later repetitions usually fail the same way.
        self.errors.setdefault(lib, error)

    def summary(self, lib: str) -> Summary | None:
        return summarize(self.values.get(lib, []))

    def ratio(self, numerator: str, denominator: str) -> float | None:
        top = self.summary(numerator)
        bottom = self.summary(denominator)
        if top is None or bottom is None or bottom.median == 0:
            return None
        return top.median / bottom.median

    def as_dict(self) -> dict[str, Any]:
        libs = sorted(set(self.values) | set(self.errors))
        result: dict[str, Any] = {
            "key": self.key,
            "label": self.label,
            "unit": self.unit,
            "better": self.better,
            "group": self.group,
            "throughput": self.throughput,
            "shared": self.shared,
            "params": self.params,
            "only": self.only,
            "libs": {},
        }
        for lib in libs:
            summary = self.summary(lib)
            result["libs"][lib] = {
                "values": self.values.get(lib, []),
                "summary": summary.as_dict() if summary else None,
                "error": self.errors.get(lib),
                "details": self.details.get(lib, []),
            }
        ratio = self.ratio("depeche_rs", "depeche_db")
        result["ratio_rs_over_db"] = ratio
        return result

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Figure:
        """Rebuild a figure from `as_dict()` output (JSON nulls back to NaN)."""
        figure = cls(
            key=data["key"],
            label=data["label"],
            unit=data["unit"],
            better=data["better"],
            group=data["group"],
            throughput=bool(data.get("throughput")),
            shared=bool(data.get("shared")),
            params=dict(data.get("params") or {}),
            only=list(data.get("only") or []),
        )
        for lib, entry in data.get("libs", {}).items():
            values = [math.nan if v is None else float(v) for v in entry.get("values") or []]
            if values:
                figure.values[lib] = values
                figure.details[lib] = list(entry.get("details") or [{} for _ in values])
            if entry.get("error"):
                figure.errors[lib] = entry["error"]
        return figure
