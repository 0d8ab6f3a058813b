"""Workload 6: the projector's peak memory (RSS) at two backlog sizes.

Each projection runs in a fresh child process that imports one library only, so its peak
RSS (ru_maxrss) is the projector's own. A flat line from the small to the large backlog
shows memory does not grow with the backlog. A projector still busy at the time limit is
reported with what it projected so far ("partial").
"""

from __future__ import annotations

import json
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from .. import database
from ..bench import Bench, error_text
from ..figures import Figure
from ..libraries import STREAM_NAME, Library
from ..subprocesses import child_command, start_child

_TAG = "mem"


def steps(bench: Bench) -> int:
    return len(bench.settings.memory_sizes) * len(bench.libraries)


def size_label(count: int) -> str:
    if count >= 1_000_000 and count % 1_000_000 == 0:
        return f"{count // 1_000_000}M"
    if count >= 1000 and count % 1000 == 0:
        return f"{count // 1000}k"
    return str(count)


def measure(bench: Bench, lib: Library, count: int, index: int) -> dict[str, Any]:
    settings = bench.settings
    name = bench.store_name(lib.short, f"{_TAG}{index}", 0)
    aggregated = f"{name}_a"
    with bench.scratch(name), tempfile.TemporaryDirectory(prefix="dxb-") as scratch:
        # Tables are created here so the child only projects.
        lib.aggregated_stream(
            lib.store(name), aggregated, STREAM_NAME, settings.projector_batch_size
        )
        streams = min(settings.streams, count)
        database.generate_backlog(bench.conn, name, count, streams)
        result_path = Path(scratch) / "result.json"
        command = child_command(
            "project",
            lib,
            bench.engine_kind,
            "--store",
            name,
            "--stream",
            aggregated,
            "--partitioner",
            STREAM_NAME,
            "--batch-size",
            str(settings.projector_batch_size),
            "--expected",
            str(count),
            "--time-limit",
            str(settings.memory_time_limit_s),
            "--result",
            str(result_path),
        )
        child = start_child(command)
        try:
            _, stderr = child.communicate(timeout=settings.memory_time_limit_s + 120)
        except subprocess.TimeoutExpired:
            child.kill()
            child.communicate()
            raise RuntimeError("projector child did not finish in time") from None
        if not result_path.exists():
            raise RuntimeError(f"projector child exited {child.returncode}: {stderr[-400:]}")
        result: dict[str, Any] = json.loads(result_path.read_text())
    if "error" in result:
        raise RuntimeError(result["error"])
    result["backlog"] = count
    result["streams"] = streams
    result["peak_rss_mib"] = result["peak_rss_kib"] / 1024
    result["partial"] = not result["completed"]
    return result


def run(bench: Bench) -> list[Figure]:
    settings = bench.settings
    figures = []
    for index, count in enumerate(settings.memory_sizes):
        figure = Figure(
            key=f"memory/{size_label(count)}",
            label=f"projector peak RSS, {size_label(count)} backlog",
            unit="MiB",
            better="lower",
            group="memory",
            params={
                "backlog": count,
                "streams": min(settings.streams, count),
                "partitioner": STREAM_NAME,
                "update_batch_size": settings.projector_batch_size,
                "time_limit_s": settings.memory_time_limit_s,
            },
        )
        for lib in bench.order(index):
            try:
                with bench.progress.running(f"memory {size_label(count)} {lib.label}"):
                    detail = measure(bench, lib, count, index)
            except Exception as exc:
                figure.fail(lib.name, error_text(exc))
                bench.progress.step(
                    f"memory {size_label(count)} {lib.label}: FAILED {error_text(exc)}"
                )
                continue
            figure.add(lib.name, detail["peak_rss_mib"], detail)
            partial = "" if detail["completed"] else f", partial: {detail['projected']:,} msgs"
            bench.progress.step(
                f"memory {size_label(count)} {lib.label}: peak {detail['peak_rss_mib']:.0f} MiB "
                f"(baseline {detail['baseline_rss_kib'] / 1024:.0f} MiB, "
                f"{detail['seconds']:.1f}s{partial})"
            )
        figures.append(figure)
    return figures
