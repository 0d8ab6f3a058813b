"""Workload 8: what the message table's triggers cost a write.

depeche-rs notifies once per message, as depeche-db does (a listener acting on each
payload must see every message), from one statement-level trigger over the transition
table; and it keeps depeche-db 0.14's `_meta` table when that table exists. The same
writes as the writes workload (1 and 100 messages per transaction, depeche-rs's `write`
and `write_many`) run on the store as depeche-rs creates it and on three variants of it,
each on a fresh store in the same run:

- `shipped`: as created (one NOTIFY per message; no `_meta` table, so its upkeep is one
  catalog lookup per statement);
- `notify-per-statement`: the notify trigger replaced by one sending a single NOTIFY per
  statement with its last message (what depeche-rs did before: cheaper, but a per-payload
  listener misses messages);
- `no-notify`: the notify trigger dropped (the floor: what notifying costs at all);
- `with-0.14-meta`: as created, plus depeche-db 0.14's `_meta` table, which the upkeep
  trigger then keeps (the cost of sharing the tables with depeche-db 0.14).

depeche-rs only: the comparison is between variants of its own tables.
"""

from __future__ import annotations

import time
from typing import Any

from ..bench import Bench, error_text
from ..figures import Figure
from ..libraries import Library
from .writes import prepare, write_batches

LIB = "depeche_rs"
BATCH_SIZES = (1, 100)
VARIANTS = ("shipped", "notify-per-statement", "no-notify", "with-0.14-meta")
_TAGS = {"shipped": "s", "notify-per-statement": "p", "no-notify": "n", "with-0.14-meta": "m"}


def steps(bench: Bench) -> int:
    if LIB not in bench.libraries:
        return 0
    return len(BATCH_SIZES) * len(VARIANTS) * bench.settings.repetitions


def _alter(bench: Bench, name: str, variant: str) -> None:
    """Turn the freshly created store `name` into `variant`."""
    table = f"depeche_msgs_{name}"
    if variant in ("notify-per-statement", "no-notify"):
        bench.conn.execute(f"DROP TRIGGER depeche_rs_notify_messages ON {table}".encode())
    if variant == "notify-per-statement":
        bench.conn.execute(
            f"""
CREATE FUNCTION bench_notify_last_{name}() RETURNS trigger AS $$
BEGIN
  PERFORM pg_notify('depeche_{name}_messages', json_build_object(
      'message_id', n.message_id, 'stream', n.stream,
      'version', n.version, 'global_position', n.global_position)::text)
  FROM (SELECT * FROM new_rows ORDER BY global_position DESC LIMIT 1) AS n;
  RETURN NULL;
END;
$$ LANGUAGE plpgsql;
CREATE TRIGGER bench_notify_last AFTER INSERT ON {table} REFERENCING NEW TABLE AS new_rows
  FOR EACH STATEMENT EXECUTE FUNCTION bench_notify_last_{name}();""".encode()
        )
    if variant == "with-0.14-meta":
        bench.conn.execute(
            f"CREATE TABLE {table}_meta (stream varchar(255) PRIMARY KEY, "
            "min_global_position integer NOT NULL, max_global_position integer NOT NULL)".encode()
        )


def measure(
    bench: Bench, lib: Library, variant: str, batch: int, repetition: int
) -> dict[str, Any]:
    settings = bench.settings
    count = settings.write_messages if batch == 1 else settings.write_batched_messages
    batches = prepare(count, batch, settings.write_streams)
    name = bench.store_name(lib.short, f"wt{_TAGS[variant]}{batch}", repetition)
    with bench.scratch(name):
        store = lib.store(name)
        _alter(bench, name, variant)
        started = time.perf_counter()
        method = write_batches(lib, store, batches)
        elapsed = time.perf_counter() - started
        row = bench.conn.execute(f"SELECT count(*) FROM depeche_msgs_{name}".encode()).fetchone()
        meta = None
        if variant == "with-0.14-meta":
            meta = bench.conn.execute(
                f"SELECT count(*) FROM depeche_msgs_{name}_meta".encode()
            ).fetchone()
        bench.conn.execute(f"DROP FUNCTION IF EXISTS bench_notify_last_{name}() CASCADE".encode())
    written = int(row[0]) if row else 0
    if written != count:
        raise RuntimeError(f"table holds {written} of {count} written messages")
    if meta is not None and int(meta[0]) != min(settings.write_streams, len(batches)):
        raise RuntimeError(f"_meta holds {meta[0]} streams, not one per stream written")
    return {
        "variant": variant,
        "messages": count,
        "batch": batch,
        "method": method,
        "seconds": elapsed,
        "msg_per_s": count / elapsed,
    }


def run(bench: Bench) -> list[Figure]:
    if LIB not in bench.libraries:
        return []
    lib = bench.libraries[LIB]
    settings = bench.settings
    figures = {
        (variant, batch): Figure(
            key=f"write-triggers/{variant}/batch-{batch}",
            label=f"writes x{batch}, message table {variant}",
            unit="msg/s",
            better="higher",
            group="write triggers",
            throughput=True,
            only=[LIB],
            params={
                "variant": variant,
                "batch": batch,
                "messages": settings.write_messages
                if batch == 1
                else settings.write_batched_messages,
                "streams": settings.write_streams,
            },
        )
        for variant in VARIANTS
        for batch in BATCH_SIZES
    }
    for repetition in range(settings.repetitions):
        for batch in BATCH_SIZES:
            # Variants interleaved within a repetition, so drift affects them alike.
            order = VARIANTS[repetition % len(VARIANTS) :] + VARIANTS[: repetition % len(VARIANTS)]
            for variant in order:
                figure = figures[(variant, batch)]
                what = f"write triggers x{batch} {variant}"
                try:
                    with bench.progress.running(what):
                        detail = measure(bench, lib, variant, batch, repetition)
                except Exception as exc:
                    figure.fail(LIB, error_text(exc))
                    bench.progress.step(f"{what} rep {repetition + 1}: FAILED {error_text(exc)}")
                    continue
                figure.add(LIB, detail["msg_per_s"], detail)
                bench.progress.step(
                    f"{what} rep {repetition + 1}: {detail['msg_per_s']:,.0f} msg/s "
                    f"({detail['seconds']:.2f}s)"
                )
    return list(figures.values())
