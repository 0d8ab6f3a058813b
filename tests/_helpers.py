"""Helpers shared by the tests: reading the aggregated table back, waiting for a session
to block on an advisory lock."""

from __future__ import annotations

import hashlib
import time
from typing import Any

import sqlalchemy as sa


def sha_partition(stream: str) -> int:
    return int.from_bytes(hashlib.sha256(stream.encode()).digest()[:2], "little")


def projected_rows(engine: sa.Engine, agg: str) -> list[Any]:
    """All rows of the aggregated table, ordered by partition and position."""
    with engine.connect() as conn:
        return list(
            conn.exec_driver_sql(
                "SELECT message_id, origin_stream, origin_stream_version, partition, position, "
                "message_occurred_at, origin_stream_global_position, origin_stream_added_at "
                f"FROM depeche_stream_{agg} ORDER BY partition, position"
            )
        )


def check_invariants(engine: sa.Engine, store: str, agg: str, wildcard: str = "%") -> list[Any]:
    """Assert the projection is exactly the committed matching messages, gapless and ordered."""
    rows = projected_rows(engine, agg)
    with engine.connect() as conn:
        origin = {
            r[0]: r
            for r in conn.exec_driver_sql(
                f"SELECT message_id, stream, version, global_position FROM depeche_msgs_{store} "
                "WHERE stream LIKE %s",
                (wildcard,),
            )
        }
        maxpos = dict(
            conn.exec_driver_sql(
                f"SELECT partition, max_position FROM depeche_stream_{agg}_maxpos"
            ).all()
        )
    ids = [r[0] for r in rows]
    assert len(ids) == len(set(ids)), "a message was projected twice"
    assert set(ids) == set(origin), (
        f"lost={len(set(origin) - set(ids))} extra={len(set(ids) - set(origin))}"
    )
    by_partition: dict[int, list[Any]] = {}
    for r in rows:
        by_partition.setdefault(r[3], []).append(r)
    for partition, prows in by_partition.items():
        assert [r[4] for r in prows] == list(range(len(prows))), f"gap in partition {partition}"
        assert maxpos[partition] == len(prows) - 1
        last_version: dict[str, int] = {}
        for r in prows:
            assert (r[1], r[2], r[6]) == origin[r[0]][1:4]
            assert r[2] > last_version.get(r[1], 0), f"version order broken in {r[1]}"
            last_version[r[1]] = r[2]
    return rows


def wait_until_blocked_on_advisory_lock(
    engine: sa.Engine, pid: int, what: str, timeout: float = 30
) -> None:
    """Return once session `pid` waits for an advisory lock; fail after `timeout`
    seconds, saying `what` never waited."""
    deadline = time.monotonic() + timeout
    while True:
        with engine.connect() as conn:
            waiting = conn.exec_driver_sql(
                "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE pid = %(pid)s "
                "AND locktype = 'advisory' AND NOT granted)",
                {"pid": pid},
            ).scalar()
        if waiting:
            return
        assert time.monotonic() < deadline, f"{what} never waited on the lock"
        time.sleep(0.01)
