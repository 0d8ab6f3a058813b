"""Where a catch-up projection spends its time, batch by batch (depeche-rs only).

    python benches/profile_projection.py --messages 1000000 --streams 1000000
    python benches/profile_projection.py --messages 3000000 --streams 1000000 --untimed

Creates a store and an aggregated stream through the library (`dxb_prof*` tables), seeds the
backlog in SQL as `run.py` does, takes a CHECKPOINT, then projects it one batch per call
and prints: the throughput, batch times per tenth of the run, the client's CPU time, the
WAL written (records, full-page images, bytes) and the checkpoints during the run, the
CPU time the server's processes used (when the server runs on this host: unlike wall time,
it does not grow when other work shares the cores), and,
unless `--no-sample`, what the projector's server process was doing (statement and wait
event from `pg_stat_activity`, sampled every 5 ms). For the time of each statement on the
server, run it against a database with `log_min_duration_statement = 0` and sum the log.
`--reuse` keeps the seeded backlog of an earlier run and drops only the aggregated stream.
"""

from __future__ import annotations

import argparse
import collections
import os
import resource
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import psycopg

import depeche_rs
from harness import database
from harness.messages import STREAM_WILDCARD, AccountCredited

_SAMPLE = (
    "SELECT left(regexp_replace(query, '\\s+', ' ', 'g'), 60), state, "
    "coalesce(wait_event_type || ':' || wait_event, 'cpu') FROM pg_stat_activity "
    "WHERE application_name LIKE 'depeche-rs projector%%'"
)
_WAL = "SELECT wal_records, wal_fpi, wal_bytes FROM pg_stat_wal"
_CHECKPOINTS = "SELECT checkpoints_timed, checkpoints_req FROM pg_stat_bgwriter"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dsn", default=None, help="default: as run.py resolves it")
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--streams", type=int, default=10_000)
    parser.add_argument("--store", default="dxb_prof")
    parser.add_argument("--batch-size", type=int, default=1000)
    parser.add_argument("--untimed", action="store_true", help="rows without occurred_at")
    parser.add_argument("--reuse", action="store_true", help="keep an earlier run's backlog")
    parser.add_argument("--no-sample", action="store_true", help="no pg_stat_activity sampling")
    return parser.parse_args()


def sample(dsn: str, counts: collections.Counter[tuple[str, ...]], stop: threading.Event) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        while not stop.is_set():
            for query, state, wait in conn.execute(_SAMPLE):
                counts[(state, wait, query if state == "active" else "")] += 1
            time.sleep(0.005)


def counters(conn: psycopg.Connection[Any]) -> tuple[Any, ...]:
    wal = conn.execute(_WAL).fetchone()
    checkpoints = conn.execute(_CHECKPOINTS).fetchone()
    assert wal is not None and checkpoints is not None
    return (*wal, *checkpoints)


def server_cpu(conn: psycopg.Connection[Any]) -> float | None:
    """CPU seconds used so far by the server's processes (the postmaster's children, live
    and exited), or None when the server is not a process of this host."""
    row = conn.execute("SELECT pg_backend_pid()").fetchone()
    assert row is not None
    try:
        status = Path(f"/proc/{row[0]}/status").read_text()
        postmaster = int(next(x for x in status.splitlines() if x.startswith("PPid:")).split()[1])
        stat = Path(f"/proc/{postmaster}/stat").read_text().rsplit(")", 1)[1].split()
        ticks = int(stat[13]) + int(stat[14]) + int(stat[15]) + int(stat[16])  # incl. children
        for child in Path(f"/proc/{postmaster}/task/{postmaster}/children").read_text().split():
            try:
                fields = Path(f"/proc/{child}/stat").read_text().rsplit(")", 1)[1].split()
            except FileNotFoundError:
                continue
            ticks += int(fields[11]) + int(fields[12])
    except (OSError, StopIteration, ValueError):
        return None
    return ticks / os.sysconf("SC_CLK_TCK")


def main() -> None:
    args = parse_args()
    dsn = database.plain_dsn(args.dsn or database.resolve_dsn(None)[0])
    conn = database.connect(dsn)
    store_name = database.check_name(args.store)
    aggregated = f"{store_name}_a"
    database.drop_objects(conn, aggregated if args.reuse else store_name)
    serializer = depeche_rs.tools.PydanticMessageSerializer(AccountCredited)
    store = depeche_rs.MessageStore(name=store_name, engine=dsn, serializer=serializer)
    stream = store.aggregated_stream(
        name=aggregated,
        partitioner=depeche_rs.tools.StreamNamePartitioner(),
        stream_wildcards=[STREAM_WILDCARD],
        update_batch_size=args.batch_size,
    )
    if not args.reuse:
        started = time.perf_counter()
        database.generate_backlog(
            conn, store_name, args.messages, args.streams, record_time=not args.untimed
        )
        print(f"seeded in {time.perf_counter() - started:.1f}s", flush=True)
    database.checkpoint(conn)

    samples: collections.Counter[tuple[str, ...]] = collections.Counter()
    stop = threading.Event()
    sampler = threading.Thread(target=sample, args=(dsn, samples, stop), daemon=True)
    if not args.no_sample:
        sampler.start()
    before = counters(conn)
    server_before = server_cpu(conn)
    batches: list[float] = []
    total = 0
    started, cpu = time.perf_counter(), time.process_time()
    while True:
        batch_started = time.perf_counter()
        result = stream.projector.update_batch()
        batches.append(time.perf_counter() - batch_started)
        total += result.n_updated_messages
        if not result.more_messages_available:
            break
    elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
    after = counters(conn)
    server_after = server_cpu(conn)
    stop.set()
    if not args.no_sample:
        sampler.join()
    store.close()

    records, fpi, wal_bytes, timed, requested = (b - a for a, b in zip(before, after, strict=True))
    print(
        f"{total:,} messages ({args.messages:,} over {args.streams:,} streams"
        f"{', untimed' if args.untimed else ''}) in {elapsed:.1f}s: {total / elapsed:,.0f} msg/s,"
        f" {len(batches)} batches; client CPU {cpu:.1f}s, peak RSS"
        f" {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:,.0f} MiB"
    )
    if server_before is not None and server_after is not None:
        server = server_after - server_before
        print(f"server CPU {server:.1f}s: {server / max(total, 1) * 1e6:.1f} us per message")
    print(
        f"WAL: {records:,} records, {fpi:,} full-page images, {float(wal_bytes) / 1e6:,.0f} MB;"
        f" checkpoints: {timed} timed, {requested} requested"
    )
    tenth = max(1, len(batches) // 10)
    for first in range(0, len(batches), tenth):
        chunk = batches[first : first + tenth]
        print(
            f"  batches {first}-{first + len(chunk)}: median {statistics.median(chunk) * 1e3:.1f}"
            f" ms, mean {statistics.mean(chunk) * 1e3:.1f} ms"
        )
    seen = sum(samples.values()) or 1
    for (state, wait, query), count in samples.most_common(12):
        print(f"  {count / seen * 100:5.1f}%  {state:20} {wait:22} {query}")


if __name__ == "__main__":
    main()
