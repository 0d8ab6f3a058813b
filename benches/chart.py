"""Draw the benchmark chart (PNG) from a results JSON written by run.py.

    python benches/chart.py benches/results/latest.json [-o benches/results/latest.png]

Three panels: throughput per workload (log scale, both libraries and the SQL ceiling),
live latency percentiles, and projector peak memory.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

COLORS = {"depeche_db": "#8c8c8c", "depeche_rs": "#d9480f", "postgresql": "#1c7ed6"}
LABELS = {"depeche_db": "depeche-db 0.13.1", "depeche_rs": "depeche-rs", "postgresql": "SQL"}


def _median(figure: dict[str, Any], lib: str) -> float | None:
    entry = figure["libs"].get(lib)
    if not entry or not entry.get("summary"):
        return None
    value = entry["summary"]["median"]
    return float(value) if value is not None else None


def _spread(figure: dict[str, Any], lib: str) -> tuple[float, float]:
    entry = figure["libs"][lib]["summary"]
    median = float(entry["median"])
    return median - float(entry["min"]), float(entry["max"]) - median


def _grouped_bars(
    axis: Any, figures: list[dict[str, Any]], libs: list[str], log: bool, unit: str
) -> None:
    """Horizontal bars: one group per figure, one bar per library that has a value."""
    height = 0.8 / max(len(libs), 1)
    labels = []
    largest = 0.0
    smallest = float("inf")
    for row, figure in enumerate(figures):
        labels.append(figure["label"])
        # Bars of the libraries this figure has, centred on its row.
        present = [lib for lib in libs if _median(figure, lib) is not None]
        for index, lib in enumerate(present):
            value = _median(figure, lib)
            assert value is not None
            y = row + (index - (len(present) - 1) / 2) * height
            low, high = _spread(figure, lib)
            largest = max(largest, value + high)
            smallest = min(smallest, max(value - low, 1e-9))
            axis.barh(
                y,
                value,
                height=height * 0.9,
                color=COLORS.get(lib, "#555555"),
                xerr=[[low], [high]] if low or high else None,
                capsize=2,
                label=LABELS.get(lib, lib),
            )
            axis.text(value + high, y, f" {value:,.0f}", va="center", fontsize=7)
    axis.set_yticks(range(len(figures)))
    axis.set_yticklabels(labels, fontsize=8)
    axis.invert_yaxis()
    if log:
        axis.set_xscale("log")
    # Room on the right for the value printed after the longest bar, and on a log axis
    # a left edge well below the shortest bar, so that bar stays visible.
    if largest > 0:
        if log:
            axis.set_xlim(left=smallest / 5, right=largest * 4)
        else:
            axis.set_xlim(left=0, right=largest * 1.45)
    axis.set_xlabel(unit)
    # One legend entry per library, however many bars it has.
    handles, names = axis.get_legend_handles_labels()
    unique = dict(zip(names, handles, strict=False))
    axis.legend(unique.values(), unique.keys(), fontsize=8, loc="best")
    axis.grid(axis="x", alpha=0.3)


def render(document: dict[str, Any], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figures = document["figures"]
    libs = [lib for lib in ("depeche_db", "depeche_rs") if lib in document["libraries"]]
    throughput = [f for f in figures if f.get("throughput") and f["libs"]]
    latency = [f for f in figures if f["group"] == "latency" and f["unit"] == "ms"]
    memory = [f for f in figures if f["group"] == "memory"]
    panels = [p for p in (throughput, latency, memory) if p]
    if not panels:
        raise ValueError("no figures to chart")
    heights = [max(len(p), 2) for p in panels]
    canvas, axes = plt.subplots(
        len(panels),
        1,
        figsize=(10, 1.5 + 0.32 * sum(heights) * max(len(libs), 1)),
        gridspec_kw={"height_ratios": heights},
        squeeze=False,
    )
    index = 0
    if throughput:
        _grouped_bars(axes[index][0], throughput, [*libs, "postgresql"], True, "msg/s (log)")
        axes[index][0].set_title("Throughput (higher is better)", fontsize=10)
        index += 1
    if latency:
        _grouped_bars(axes[index][0], latency, libs, True, "ms (log)")
        axes[index][0].set_title("Live latency under steady writes (lower is better)", fontsize=10)
        index += 1
    if memory:
        _grouped_bars(axes[index][0], memory, libs, False, "MiB")
        axes[index][0].set_title("Projector peak RSS (lower is better)", fontsize=10)
    mode = document.get("mode", "")
    machine = document.get("machine", {})
    postgres = str(machine.get("postgres", {}).get("version", "")).split(" on ")[0]
    canvas.suptitle(
        f"depeche-rs vs depeche-db ({mode} run, {document.get('finished_at', '')[:10]}; "
        f"{machine.get('cores_logical')} cores, {machine.get('memory_gib')} GiB, {postgres})",
        fontsize=10,
    )
    canvas.tight_layout(rect=(0, 0, 1, 0.97))
    out.parent.mkdir(parents=True, exist_ok=True)
    canvas.savefig(out, dpi=110)
    plt.close(canvas)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("results", type=Path, help="results JSON written by run.py")
    parser.add_argument("-o", "--out", type=Path, help="PNG path (default: next to the JSON)")
    args = parser.parse_args(argv)
    document = json.loads(args.results.read_text())
    out = render(document, args.out or args.results.with_suffix(".png"))
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
