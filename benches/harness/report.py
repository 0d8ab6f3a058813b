"""Output: the terminal table, the markdown table for the docs, the JSON of raw figures."""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import textwrap
from pathlib import Path
from typing import Any

import psutil

from .figures import Figure, Summary
from .libraries import LABELS

BASE = "depeche_db"
CANDIDATE = "depeche_rs"
SQL = "postgresql"
# The held-xid slowdown the engine aims to stay within.
GOAL_RATIO = 1.2
_ARROW = {"higher": "↑", "lower": "↓"}


def database_host(dsn: str) -> str:
    """Host of the DSN, without user or password, for the record."""
    from urllib.parse import urlsplit

    try:
        return urlsplit(dsn).hostname or "local socket"
    except ValueError:
        return "unknown"


def machine_info(postgres: dict[str, Any], dsn_source: str, dsn: str) -> dict[str, Any]:
    cpu_model = ""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    repo = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return {
        "cores_logical": os.cpu_count(),
        "cores_physical": psutil.cpu_count(logical=False),
        "cpu_model": cpu_model or platform.processor(),
        "memory_bytes": psutil.virtual_memory().total,
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "os": platform.platform(),
        "python": platform.python_version(),
        "git_commit": commit,
        "postgres": postgres,
        "postgres_host": database_host(dsn),
        "dsn_source": dsn_source,
    }


def machine_line(machine: dict[str, Any]) -> str:
    postgres = machine.get("postgres", {})
    version = str(postgres.get("version", "PostgreSQL ?")).split(" on ")[0]
    return (
        f"{machine.get('cores_logical')} cores ({machine.get('cpu_model') or 'unknown CPU'}), "
        f"{machine.get('memory_gib')} GiB RAM, {version}, Python {machine.get('python')}"
    )


def format_value(value: float, unit: str) -> str:
    if not math.isfinite(value):
        return "n/a"
    if unit == "msg/s":
        if value >= 10_000:
            return f"{value / 1000:,.1f}k"
        return f"{value:,.0f}"
    if unit == "ms":
        return f"{value:.1f}" if value < 100 else f"{value:,.0f}"
    if unit == "MiB":
        return f"{value:,.0f}"
    if unit == "%":
        return f"{value:.1f}%" if value < 10 else f"{value:.0f}%"
    if unit == "s":
        return f"{value:.2f}" if value < 10 else f"{value:,.1f}"
    if unit == "x":
        return f"{value:.2f}x"
    return f"{value:.3g}"


def format_summary(summary: Summary | None, unit: str) -> str:
    if summary is None:
        return "n/a"
    text = format_value(summary.median, unit)
    if summary.n > 1:
        text += f" ±{summary.spread_pct:.0f}%"
    return text


def format_ratio(ratio: float | None) -> str:
    if ratio is None or not math.isfinite(ratio):
        return "n/a"
    return f"{ratio:.2f}x" if ratio < 10 else f"{ratio:.0f}x"


NOT_RUN = "not run"


def format_cell(figure: Figure, lib: str) -> str:
    """A library's cell; marks figures that are bounds rather than measurements."""
    if not figure.measures(lib):
        return NOT_RUN
    text = format_summary(figure.summary(lib), figure.unit)
    details = figure.details.get(lib, [])
    if any(detail.get("lower_bound") for detail in details):
        text = ">= " + text
    if any(detail.get("partial") for detail in details):
        text += " (partial)"
    return text


def table_rows(figures: list[Figure]) -> list[list[str]]:
    rows = []
    for figure in figures:
        unit = f"{figure.unit} {_ARROW[figure.better]}"
        if figure.shared:
            rows.append([figure.label, unit, format_cell(figure, SQL), "(PostgreSQL alone)", ""])
            continue
        rows.append(
            [
                figure.label,
                unit,
                format_cell(figure, BASE),
                format_cell(figure, CANDIDATE),
                format_ratio(figure.ratio(CANDIDATE, BASE))
                if figure.measures(BASE) and figure.measures(CANDIDATE)
                else "",
            ]
        )
    return rows


HEADER = ["workload", "unit", LABELS[BASE], LABELS[CANDIDATE], "rs/db"]


def errors_by_library(figures: list[Figure], unavailable: dict[str, str]) -> list[str]:
    """One line per distinct reason a library has no figure, for under the table."""
    lines: list[str] = []
    for lib, reason in unavailable.items():
        lines.append(f"{LABELS.get(lib, lib)} not run: {reason}")
    seen: set[tuple[str, str]] = set()
    for figure in figures:
        for lib, error in figure.errors.items():
            if lib in unavailable or (lib, error) in seen:
                continue
            seen.add((lib, error))
            lines.append(f"{LABELS.get(lib, lib)}, {figure.label}: {error}")
    return lines


def terminal_table(
    figures: list[Figure], unavailable: dict[str, str], title: str, machine: str
) -> str:
    rows = table_rows(figures)
    widths = [max(len(row[i]) for row in [HEADER, *rows]) for i in range(len(HEADER))]

    def line(cells: list[str]) -> str:
        first = cells[0].ljust(widths[0])
        rest = [cells[i].rjust(widths[i]) for i in range(1, len(cells))]
        return "  ".join([first, *rest]).rstrip()

    out = [title, f"machine: {machine}", "", line(HEADER), "  ".join("-" * w for w in widths)]
    out.extend(line(row) for row in rows)
    out.append("")
    out.append("median ±half-range over repetitions; ↑ higher is better, ↓ lower is better;")
    out.append("rs/db = depeche-rs median / depeche-db median; '>=' = some messages were not")
    out.append("seen before the timeout (lower bound); '(partial)' = stopped at the time limit.")
    if any(figure.only for figure in figures):
        out.append(f"'{NOT_RUN}' = the workload measures {_only_text(figures)} alone.")
    held = held_xid_note(figures)
    if held:
        out.append(textwrap.fill(held, width=88))
    notes = errors_by_library(figures, unavailable)
    if notes:
        out.append("")
        out.extend(f"n/a: {note}" for note in notes)
    return "\n".join(out)


def _only_text(figures: list[Figure]) -> str:
    libs = sorted({lib for figure in figures for lib in figure.only})
    return ", ".join(LABELS.get(lib, lib) for lib in libs)


def held_xid_note(figures: list[Figure]) -> str:
    """What the held-xid rows compare, when the run has them."""
    held = [figure for figure in figures if figure.key.startswith("held_xid/")]
    if not held:
        return ""
    params = held[0].params
    return (
        f"held xid: the same catch-up ({params.get('messages', 0):,} messages over "
        f"{params.get('streams', 0):,} streams, StreamNamePartitioner) on identical data, "
        "(a) plain and (b) while a transaction in another database of the cluster holds "
        "an xid taken before the backlog was written; the slowdown is (b)/(a) in seconds, "
        f"per repetition; the goal is <= {params.get('goal_ratio', GOAL_RATIO)}."
    )


def markdown_table(figures: list[Figure]) -> str:
    rows = table_rows(figures)
    lines = [
        "| " + " | ".join(HEADER) + " |",
        "|" + "|".join(["---", "---", "---:", "---:", "---:"]) + "|",
    ]
    lines.extend("| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows)
    return "\n".join(lines)


def write_json(path: Path, document: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    # NaN is not JSON; null keeps the file readable by every JSON parser.
    tmp.write_text(json.dumps(_finite(document), indent=2, sort_keys=False) + "\n")
    tmp.replace(path)


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(item) for item in value]
    return value


DOCS_BEGIN = "<!-- bench-results:begin -->"
DOCS_END = "<!-- bench-results:end -->"


def docs_section(document: dict[str, Any], figures: list[Figure], chart: str | None) -> str:
    machine = document["machine"]
    settings = document["settings"]
    host = machine.get("postgres_host", "")
    local = host in ("127.0.0.1", "localhost", "::1", "local socket")
    where = "on the same host" if local else f"at {host or 'an unknown host'}"
    libs = document["libraries"]
    versions = ", ".join(
        f"{LABELS.get(name, name)} {info.get('version', '')}".strip()
        for name, info in libs.items()
        if info.get("available")
    )
    lines = [
        DOCS_BEGIN,
        "",
        f"Run of {document['finished_at'][:10]} ({document['mode']} mode, "
        f"{settings['repetitions']} repetition(s), {document['duration_s'] / 60:.0f} min), "
        f"commit `{machine.get('git_commit') or 'unknown'}`: {versions}. "
        f"Projection backlog {settings['messages']:,} messages over "
        f"{settings['streams']:,} streams.",
        "",
        f"Machine: {machine_line(machine)}; PostgreSQL {where}.",
        "",
        markdown_table(figures),
        "",
        "Median ±half-range over repetitions; ↑ higher is better, ↓ lower is better; "
        "rs/db = depeche-rs median / depeche-db median; `>=`: some messages were not seen "
        "before the timeout, so the figure is a lower bound; `(partial)`: the projection "
        "was stopped at the time limit.",
    ]
    if any(figure.only for figure in figures):
        lines[-1] += f" `{NOT_RUN}`: the workload measures {_only_text(figures)} alone."
    held = held_xid_note(figures)
    if held:
        lines.extend(["", held[0].upper() + held[1:]])
    notes = errors_by_library(figures, {k: v["error"] for k, v in libs.items() if v.get("error")})
    if notes:
        lines.append("")
        lines.extend(f"- n/a: {note}" for note in notes)
    if chart:
        lines.extend(["", f"![throughput per workload]({chart})"])
    lines.extend(["", DOCS_END])
    return "\n".join(lines)


def update_docs(path: Path, section: str) -> None:
    """Replace the generated section of the docs page, keeping the hand-written rest."""
    text = path.read_text() if path.exists() else ""
    if DOCS_BEGIN in text and DOCS_END in text:
        head, rest = text.split(DOCS_BEGIN, 1)
        _, tail = rest.split(DOCS_END, 1)
        text = head + section + tail
    else:
        text = text.rstrip() + "\n\n## Latest results\n\n" + section + "\n"
    path.write_text(text)
