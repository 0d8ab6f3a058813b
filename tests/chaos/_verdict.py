"""The verdict of a chaos run: the writers' ledger, and the tables compared with it and
with each other."""

from __future__ import annotations

import dataclasses
from collections import Counter, defaultdict
from collections.abc import Callable
from typing import Any

import psycopg

from ._harness import WILDCARDS, Supervisor


@dataclasses.dataclass
class Ledger:
    """What the writers say happened to each message id."""

    committed: set[str]
    rolled_back: set[str]
    uncertain: set[str]
    # The messages of each transaction whose COMMIT was interrupted (all or none stored).
    uncertain_transactions: list[set[str]]

    @classmethod
    def read(cls, supervisor: Supervisor) -> Ledger:
        ids_of: dict[str, list[str]] = {}
        state: dict[str, str] = {}
        rolled_back: set[str] = set()
        for _, event in supervisor.events("writer"):
            kind = event.get("ev")
            if kind == "pending":
                ids_of[event["tx"]] = event["ids"]
                state.setdefault(event["tx"], "pending")
            elif kind == "committed":
                state[event["tx"]] = "committed"
            elif kind == "unknown" and state.get(event["tx"]) != "committed":
                state[event["tx"]] = "unknown"
            elif kind == "rolled_back":
                rolled_back.update(event["ids"])
        committed = {i for tx, s in state.items() if s == "committed" for i in ids_of[tx]}
        transactions = [set(ids_of[tx]) for tx, s in state.items() if s != "committed"]
        uncertain = set().union(*transactions)
        return cls(committed, rolled_back - committed - uncertain, uncertain, transactions)


@dataclasses.dataclass
class Verdict:
    """Figures of a run and what is wrong with it (nothing, hopefully)."""

    figures: dict[str, Any]
    problems: list[str]

    def line(self) -> str:
        return " ".join(f"{k}={v}" for k, v in self.figures.items())


def verify(
    dsn: str,
    store: str,
    agg: str,
    partitions: int,
    matching: set[str],
    ledger: Ledger,
    subscriptions: dict[str, bool],
    deliveries_table: str,
    hash_partition: Callable[[str], int],
) -> Verdict:
    """Compare the tables with each other and with the writers' ledger.

    `subscriptions` maps each subscription name to whether it must have delivered every
    message exactly once (acknowledged in the handler's transaction).
    """
    problems: list[str] = []
    with psycopg.connect(dsn) as conn:
        messages = {
            str(r[0]): (r[1], r[2], r[3])
            for r in conn.execute(
                f"SELECT message_id, stream, version, global_position FROM depeche_msgs_{store}"
            )
        }
        like_matching = {
            str(r[0])
            for r in conn.execute(
                f"SELECT message_id FROM depeche_msgs_{store} WHERE stream LIKE ANY(%s)",
                (WILDCARDS,),
            )
        }
        projected = conn.execute(
            "SELECT message_id, origin_stream, origin_stream_version, partition, position, "
            f"origin_stream_global_position FROM depeche_stream_{agg} ORDER BY partition, position"
        ).fetchall()
        maxpos = dict(
            conn.execute(f"SELECT partition, max_position FROM depeche_stream_{agg}_maxpos")
        )
        deliveries = conn.execute(
            f"SELECT sub, partition, position, message_id FROM {deliveries_table} ORDER BY seq"
        ).fetchall()
        states = {
            name: dict(
                conn.execute(
                    f"SELECT partition, position FROM depeche_subscriptions_{name} "
                    "WHERE partition >= 0"
                )
            )
            if conn.execute("SELECT to_regclass(%s)", (f"depeche_subscriptions_{name}",)).fetchone()
            != (None,)
            else {}
            for name in subscriptions
        }

    # The message store itself: what was committed is there, nothing else is.
    expected = {i for i, (stream, _, _) in messages.items() if stream in matching}
    if expected != like_matching:
        problems.append("the test's idea of the matching streams differs from LIKE")
    missing_commits = ledger.committed - set(messages)
    if missing_commits:
        problems.append(f"{len(missing_commits)} committed writes are not in the store")
    resurrected = ledger.rolled_back & set(messages)
    if resurrected:
        problems.append(f"{len(resurrected)} rolled-back writes are in the store")
    stored = set(messages)
    torn = [t for t in ledger.uncertain_transactions if t & stored and not t <= stored]
    if torn:
        problems.append(f"{len(torn)} interrupted transactions are stored in part")
    uncertain_stored = sum(1 for t in ledger.uncertain_transactions if t and t <= stored)
    unaccounted = set(messages) - ledger.committed - ledger.uncertain
    if unaccounted:
        problems.append(f"{len(unaccounted)} stored messages were never committed by a writer")
    versions: dict[str, list[int]] = defaultdict(list)
    for stream, version, _ in messages.values():
        versions[stream].append(version)
    for stream, got in versions.items():
        if sorted(got) != list(range(1, len(got) + 1)):
            problems.append(f"stream {stream!r} versions are not 1..n: {sorted(got)[:10]}...")

    # The projection: exactly the committed matching messages, gapless, in order.
    ids = [str(r[0]) for r in projected]
    duplicated = len(ids) - len(set(ids))
    lost = expected - set(ids)
    spurious = set(ids) - expected
    if ledger.rolled_back & set(ids):
        problems.append("a rolled-back message was projected")
    order_violations = 0
    by_partition: dict[int, list[Any]] = defaultdict(list)
    for row in projected:
        by_partition[row[3]].append(row)
    partition_of_stream: dict[str, set[int]] = defaultdict(set)
    for partition, rows in by_partition.items():
        positions = [r[4] for r in rows]
        if positions != list(range(len(rows))):
            order_violations += 1
            problems.append(f"partition {partition}: positions are not 0..{len(rows) - 1}")
        if maxpos.get(partition) != len(rows) - 1:
            order_violations += 1
            problems.append(f"partition {partition}: max_position {maxpos.get(partition)}")
        last: dict[str, int] = {}
        for message_id, stream, version, _, position, global_position in rows:
            partition_of_stream[stream].add(partition)
            if version <= last.get(stream, 0):
                order_violations += 1
                problems.append(f"partition {partition} position {position}: {stream} v{version}")
            last[stream] = version
            origin = messages.get(str(message_id))
            if origin is not None and origin != (stream, version, global_position):
                problems.append(f"projected row of {message_id} does not match its origin")
        if not 0 <= partition < partitions:
            problems.append(f"partition {partition} is out of range")
    for stream, parts in partition_of_stream.items():
        if parts != {hash_partition(stream)}:
            problems.append(f"stream {stream!r} is in partitions {sorted(parts)}")
    if set(maxpos) != set(by_partition):
        problems.append(f"maxpos partitions {sorted(maxpos)} != {sorted(by_partition)}")

    # Subscriptions: every projected message delivered, first deliveries in order.
    layout = {(r[3], r[4]): str(r[0]) for r in projected}
    undelivered = 0
    redelivered: dict[str, int] = {}
    delivered_total = 0
    for name, exactly_once in subscriptions.items():
        mine = [d for d in deliveries if d[0] == name]
        delivered_total += len(mine)
        counts = Counter((p, pos) for _, p, pos, _ in mine)
        redelivered[name] = sum(c - 1 for c in counts.values())
        missing = set(layout) - set(counts)
        undelivered += len(missing)
        if missing:
            problems.append(f"{name}: {len(missing)} projected messages never delivered")
        for _, p, pos, message_id in mine:
            if layout.get((p, pos)) != str(message_id):
                problems.append(f"{name}: delivered {message_id} as {p}:{pos}")
                break
        first_seen: dict[int, list[int]] = defaultdict(list)
        seen: set[tuple[int, int]] = set()
        for _, p, pos, _ in mine:
            if (p, pos) not in seen:
                seen.add((p, pos))
                first_seen[p].append(pos)
        for p, order in first_seen.items():
            if order != sorted(order):
                order_violations += 1
                problems.append(f"{name}: partition {p} first delivered out of order")
        if exactly_once and redelivered[name]:
            problems.append(
                f"{name}: {redelivered[name]} messages delivered twice although acknowledged "
                "in the handler's transaction"
            )
        if states[name] != maxpos:
            problems.append(f"{name}: state {states[name]} != max positions {maxpos}")

    if lost:
        problems.append(f"lost {len(lost)} messages, e.g. {sorted(lost)[:3]}")
    if duplicated:
        problems.append(f"{duplicated} messages projected twice")
    if spurious:
        problems.append(f"{len(spurious)} projected messages are not committed matching ones")
    figures = {
        "committed": len(messages),
        "projected": len(ids),
        "lost": len(lost),
        "duplicated": duplicated,
        "order_violations": order_violations,
        "undelivered": undelivered,
        "spurious": len(spurious),
        "matching": len(expected),
        "rolled_back": len(ledger.rolled_back),
        "uncertain_commits": f"{uncertain_stored}/{len(ledger.uncertain_transactions)}",
        "partitions": len(by_partition),
        "deliveries": delivered_total,
        "redelivered": "/".join(str(v) for v in redelivered.values()),
    }
    return Verdict(figures, problems)
