"""Side-by-side benchmark of depeche-rs against depeche-db 0.13.1.

    python benches/run.py [--quick] [--dsn DSN] [--libs depeche_db,depeche_rs]
                          [--out benches/results/latest.json]

Both libraries run every workload on the same generated data, against the same
PostgreSQL, in the same run, alternating, and the table gives each one's median with its
spread and the ratio depeche-rs / depeche-db. Raw figures go to a JSON file (with the
machine recorded) and a PNG chart is drawn from it. Nothing is installed at run time:
install benches/requirements.txt (or the `bench` extra) first. See benches/README.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
if str(BENCH_DIR) not in sys.path:
    sys.path.insert(0, str(BENCH_DIR))

from harness import database, report  # noqa: E402
from harness.bench import Bench, Progress, Settings  # noqa: E402
from harness.figures import Figure  # noqa: E402
from harness.libraries import KNOWN, Library, LibraryUnavailable, load_library  # noqa: E402
from harness.workloads import (  # noqa: E402
    drain,
    held_xid,
    latency,
    memory,
    projection,
    sql_ceiling,
    write_triggers,
    writes,
)

# Run order: the 1M backlogs (held xid, memory) last, as they are the longest steps.
WORKLOADS: dict[str, ModuleType] = {
    "projection": projection,
    "ceiling": sql_ceiling,
    "latency": latency,
    "drain": drain,
    "writes": writes,
    "write_triggers": write_triggers,
    "held_xid": held_xid,
    "memory": memory,
}
# Not run by --quick unless named in --workloads: the held-xid workload creates a database
# (CREATEDB privilege) and its figure says nothing at a smoke-test size.
NOT_QUICK = ("held_xid",)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Benchmark depeche-rs against depeche-db 0.13.1, side by side.",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="small sizes, one repetition: a smoke check that finishes in under two minutes",
    )
    parser.add_argument(
        "--dsn",
        help="PostgreSQL DSN (default: $DEPECHE_RS_BENCH_DSN, then $DEPECHE_RS_TEST_DSN, "
        "then an embedded server)",
    )
    parser.add_argument(
        "--libs",
        default=",".join(KNOWN),
        help=f"comma-separated libraries to run (default: {','.join(KNOWN)})",
    )
    parser.add_argument(
        "--out",
        type=Path,
        help="results JSON (default: benches/results/latest.json, or quick.json with --quick)",
    )
    parser.add_argument(
        "--workloads",
        help=f"comma-separated subset of: {', '.join(WORKLOADS)} (default: all; with "
        f"--quick all but {', '.join(NOT_QUICK)})",
    )
    parser.add_argument("--repetitions", type=int, help="repetitions per workload")
    parser.add_argument("--messages", type=int, help="projection backlog size (default 100k)")
    parser.add_argument("--streams", type=int, help="streams in the backlog (default 10k)")
    parser.add_argument(
        "--large",
        action="store_true",
        help="1M-message projection backlog (use --streams 1000000 for 1M streams too)",
    )
    parser.add_argument(
        "--projection-kinds",
        help="comma-separated projection kinds: stream-name, python-field, "
        "stream-name-untimed (default: all; the ceilings run for the stream-name ones)",
    )
    parser.add_argument("--batch-size", type=int, help="projector update_batch_size (both)")
    parser.add_argument(
        "--subscription-batch-size", type=int, help="subscription batch_size (both)"
    )
    parser.add_argument("--drain-messages", type=int, help="subscription drain backlog size")
    parser.add_argument("--latency-rate", type=float, help="live writer rate, msg/s")
    parser.add_argument("--latency-seconds", type=float, help="live measurement duration")
    parser.add_argument(
        "--latency-writer",
        choices=["sql", "library"],
        help="live writer: plain SQL INSERTs, the same for both (default), or each "
        "library's store.write",
    )
    parser.add_argument(
        "--latency-ack",
        choices=["SINGLE", "BATCHED"],
        help="ack strategy of the live subscription (default BATCHED)",
    )
    parser.add_argument(
        "--memory-sizes", help="comma-separated backlog sizes for the memory workload"
    )
    parser.add_argument(
        "--memory-time-limit", type=float, help="seconds a memory projection may run"
    )
    parser.add_argument(
        "--held-xid-messages", type=int, help="held-xid catch-up backlog size (default 1M)"
    )
    parser.add_argument(
        "--held-xid-streams", type=int, help="streams in the held-xid backlog (default 100k)"
    )
    parser.add_argument(
        "--held-xid-time-limit",
        type=float,
        help="seconds each held-xid catch-up may run (default 1800)",
    )
    parser.add_argument(
        "--engine",
        choices=["sqlalchemy", "dsn"],
        default="sqlalchemy",
        help="what depeche-rs is given as engine: a SQLAlchemy engine, as depeche-db "
        "(the drop-in case, default), or the DSN string",
    )
    parser.add_argument("--no-chart", action="store_true", help="do not draw the PNG chart")
    parser.add_argument(
        "--report-only",
        type=Path,
        metavar="JSON",
        help="run nothing: print the table of a stored run, redraw its chart "
        "(and with --update-docs, publish it)",
    )
    parser.add_argument(
        "--update-docs",
        action="store_true",
        help="rewrite the results section of docs/benchmarks.md from this run",
    )
    parser.add_argument(
        "--require-all",
        action="store_true",
        help="exit 1 unless every requested library produced every figure (CI smoke check; "
        "never fails on a time)",
    )
    return parser.parse_args(argv)


def build_settings(args: argparse.Namespace) -> Settings:
    settings = Settings.quick_preset() if args.quick else Settings.full()
    if args.large:
        settings.messages = 1_000_000
    overrides = {
        "repetitions": args.repetitions,
        "messages": args.messages,
        "streams": args.streams,
        "projector_batch_size": args.batch_size,
        "subscription_batch_size": args.subscription_batch_size,
        "drain_messages": args.drain_messages,
        "latency_rate": args.latency_rate,
        "latency_seconds": args.latency_seconds,
        "latency_writer": args.latency_writer,
        "latency_ack": args.latency_ack,
        "memory_time_limit_s": args.memory_time_limit,
        "held_xid_messages": args.held_xid_messages,
        "held_xid_streams": args.held_xid_streams,
        "held_xid_time_limit_s": args.held_xid_time_limit,
    }
    for field, value in overrides.items():
        if value is not None:
            setattr(settings, field, value)
    if args.projection_kinds:
        settings.projection_kinds = [k.strip() for k in args.projection_kinds.split(",")]
    if args.memory_sizes:
        settings.memory_sizes = [int(size) for size in args.memory_sizes.split(",")]
    if args.workloads is None:
        skipped = NOT_QUICK if settings.quick else ()
        settings.workloads = [name for name in WORKLOADS if name not in skipped]
    else:
        settings.workloads = [name.strip() for name in args.workloads.split(",") if name.strip()]
    unknown = [name for name in settings.workloads if name not in WORKLOADS]
    if unknown:
        raise SystemExit(f"unknown workload(s): {', '.join(unknown)}")
    return settings


def load_libraries(
    names: list[str], dsn: str, engine_kind: str
) -> tuple[dict[str, Library], dict[str, str]]:
    libraries: dict[str, Library] = {}
    unavailable: dict[str, str] = {}
    for name in names:
        try:
            libraries[name] = load_library(name, dsn, engine_kind)
        except LibraryUnavailable as exc:
            unavailable[name] = str(exc)
            print(f"{name}: not run ({exc})", file=sys.stderr)
    return libraries, unavailable


def mark_unavailable(figures: list[Figure], unavailable: dict[str, str]) -> None:
    """A library that could not load gets n/a with its reason in every figure."""
    for figure in figures:
        if figure.shared:
            continue
        for name, reason in unavailable.items():
            if figure.measures(name):
                figure.fail(name, reason)


def run_workloads(bench: Bench) -> list[Figure]:
    figures: list[Figure] = []
    by_key: dict[str, Figure] = {}
    for name in bench.settings.workloads:
        module = WORKLOADS[name]
        bench.progress.note(f"--- {name}")
        produced: list[Figure] = module.run(bench)
        figures.extend(produced)
        by_key.update({figure.key: figure for figure in produced})
    for figure in by_key.values():
        note_identical_output(bench, figure, by_key)
    # Each fraction of a ceiling sits right after that ceiling in the table.
    for suffix in ("", "-untimed"):
        projected = by_key.get(f"projection/stream-name{suffix}")
        ceiling = by_key.get(f"projection/sql-ceiling{suffix}")
        if projected is not None and ceiling is not None:
            position = figures.index(ceiling) + 1
            figures.insert(position, sql_ceiling.fractions(projected, ceiling))
    return figures


# Projections compared with a ceiling: the same data, the same placement expected.
CEILING_OF = {
    "projection/stream-name": "projection/sql-ceiling",
    "projection/stream-name-untimed": "projection/sql-ceiling-untimed",
}


def note_identical_output(bench: Bench, figure: Figure, by_key: dict[str, Figure]) -> None:
    """Record whether every projection of the same data put every message in the same
    partition and position: only then do their speeds compare like with like."""
    if not figure.key.startswith("projection/") or figure.shared:
        return
    digests = {
        lib: {detail.get("digest") for detail in details} for lib, details in figure.details.items()
    }
    ceiling = by_key.get(CEILING_OF.get(figure.key, ""))
    if ceiling is not None:
        digests.update(
            {f"{lib} ceiling": {d.get("digest") for d in ds} for lib, ds in ceiling.details.items()}
        )
    distinct = set().union(*digests.values()) if digests else set()
    if len(digests) < 2:
        return
    same = len(distinct) == 1
    figure.params["identical_output"] = same
    figure.params["compared"] = sorted(digests)
    verdict = "identical" if same else "differ (same messages, other positions)"
    compared = ", ".join(sorted(digests))
    bench.progress.note(f"{figure.key}: projected rows {verdict} across {compared}")


def failed(figures: list[Figure], requested: list[str], unavailable: dict[str, str]) -> list[str]:
    problems = [f"{name}: {reason}" for name, reason in unavailable.items()]
    for figure in figures:
        libs = ["postgresql"] if figure.shared else requested
        for lib in libs:
            if not figure.measures(lib):
                continue
            if lib in unavailable:
                continue
            if not figure.values.get(lib):
                problems.append(f"{lib}: no figure for {figure.key}")
    return problems


def publish(
    document: dict[str, Any], figures: list[Figure], out: Path, args: argparse.Namespace
) -> None:
    """Print the table, draw the chart next to the JSON, update the docs if asked."""
    unavailable = {
        name: info["error"]
        for name, info in document["libraries"].items()
        if not info.get("available")
    }
    title = (
        f"depeche-rs vs depeche-db, {document['mode']} run of {document['finished_at'][:16]}, "
        f"{document['settings']['repetitions']} repetition(s), {document['duration_s']:.0f}s"
    )
    machine = report.machine_line(document["machine"])
    print(report.terminal_table(figures, unavailable, title, machine))
    print(f"\nraw figures: {out}")
    chart_path: Path | None = None
    if not args.no_chart:
        try:
            import chart

            chart_path = chart.render(document, out.with_suffix(".png"))
            print(f"chart: {chart_path}")
        except Exception as exc:
            print(f"chart not drawn: {type(exc).__name__}: {exc}", file=sys.stderr)
    if args.update_docs:
        if document["mode"] != "full":
            print("docs not updated: they show full runs only", file=sys.stderr)
            return
        docs = REPO_DIR / "docs" / "benchmarks.md"
        relative = None
        if chart_path is not None:
            relative = str(Path("..") / chart_path.resolve().relative_to(REPO_DIR))
        report.update_docs(docs, report.docs_section(document, figures, relative))
        print(f"updated: {docs}")


def report_only(path: Path, args: argparse.Namespace) -> int:
    """Re-print, re-chart and optionally publish a stored run without running anything."""
    document = json.loads(path.read_text())
    figures = [Figure.from_dict(data) for data in document["figures"]]
    publish(document, figures, path, args)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.report_only is not None:
        return report_only(args.report_only, args)
    settings = build_settings(args)
    requested = [name.strip() for name in args.libs.split(",") if name.strip()]
    out: Path = args.out or BENCH_DIR / "results" / ("quick.json" if args.quick else "latest.json")
    try:
        dsn, dsn_source = database.resolve_dsn(args.dsn)
    except database.DsnUnavailable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    started_at = dt.datetime.now(dt.timezone.utc)
    started = time.monotonic()
    libraries, unavailable = load_libraries(requested, dsn, args.engine)
    progress = Progress(total_steps=0)
    bench = Bench(
        settings=settings,
        dsn=dsn,
        libraries=libraries,
        unavailable=unavailable,
        progress=progress,
        engine_kind=args.engine,
    )
    try:
        postgres = database.server_info(bench.conn)
        machine = report.machine_info(postgres, dsn_source, dsn)
        progress.total = sum(WORKLOADS[name].steps(bench) for name in settings.workloads)
        mode = "quick" if settings.quick else "full"
        progress.note(
            f"{mode} run: {', '.join(lib.label for lib in libraries.values()) or 'no library'} "
            f"on {report.machine_line(machine)}"
        )
        # Leftovers of an interrupted run would otherwise collide with this run's names.
        database.drop_objects(bench.conn, database.NAME_MARK)
        figures = run_workloads(bench)
    finally:
        for lib in libraries.values():
            lib.close()
    mark_unavailable(figures, unavailable)
    finished_at = dt.datetime.now(dt.timezone.utc)

    document: dict[str, Any] = {
        "schema": 1,
        "mode": mode,
        "command": ["python", "benches/run.py", *(argv if argv is not None else sys.argv[1:])],
        "started_at": started_at.isoformat(),
        "finished_at": finished_at.isoformat(),
        "duration_s": time.monotonic() - started,
        "settings": settings.as_dict(),
        "machine": machine,
        "libraries": {
            **{
                name: {
                    "available": True,
                    "version": lib.version,
                    "engine": type(lib.engine).__module__ + "." + type(lib.engine).__name__,
                }
                for name, lib in libraries.items()
            },
            **{name: {"available": False, "error": reason} for name, reason in unavailable.items()},
        },
        "figures": [figure.as_dict() for figure in figures],
    }
    report.write_json(out, document)
    bench.close()
    publish(document, figures, out, args)

    if args.require_all:
        problems = failed(figures, requested, unavailable)
        if problems:
            print("missing figures:\n  " + "\n  ".join(problems), file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
