"""The projector under configuration changes: wildcards added, removed and added back,
overlapping wildcards, rolling deploys with old and new configurations side by side, and
depeche-db's own projector on the same tables. Every test checks the whole outcome with
`assert_projection`."""

from __future__ import annotations

from typing import Any

import pytest
import sqlalchemy as sa

from depeche_rs import AggregatedStream, MessageStore, StreamProjector
from depeche_rs.tools import StreamHashPartitioner, StreamNamePartitioner

from ._models import AnyEvent, Deposited
from ._operations import (
    Store,
    assert_projection,
    depeche_db_store,
    depeche_db_stream,
    projected_streams,
    run_concurrently,
    write,
    write_mixed,
)

BOTH = ["acc-%", "loan-%"]


def _aggregate(
    store: Store, name: str, wildcards: list[str], batch_size: int = 3
) -> AggregatedStream[AnyEvent]:
    """The aggregated stream `name` as a process configured with `wildcards` opens it."""
    return store.aggregated_stream(
        name, StreamHashPartitioner(3), wildcards, update_batch_size=batch_size
    )


def _project(store: Store, name: str, wildcards: list[str]) -> tuple[int, bool]:
    """One `update_full` by a process configured with `wildcards`."""
    return _aggregate(store, name, wildcards).projector.update_full()


def test_added_wildcard_projects_its_history_and_new_writes(
    store: Store, stream_name: str, engine: sa.Engine
) -> None:
    write(store, "acc-1", "loan-1", "acc-2")
    assert _project(store, stream_name, ["acc-%"]) == (2, False)
    assert_projection(engine, store.name, stream_name, ["acc-%"])
    write(store, "loan-2")
    assert _project(store, stream_name, BOTH) == (2, False)
    assert_projection(engine, store.name, stream_name, BOTH)
    assert projected_streams(engine, stream_name) == [
        ("acc-1", 1),
        ("acc-2", 1),
        ("loan-1", 1),
        ("loan-2", 1),
    ]


def test_removed_wildcard_stops_and_readded_wildcard_catches_up(
    store: Store, stream_name: str, engine: sa.Engine
) -> None:
    write(store, "acc-1", "loan-1", "acc-2", "loan-2")
    assert _project(store, stream_name, BOTH) == (4, False)
    [loan_3] = write(store, "loan-3")
    write(store, "acc-3")
    assert _project(store, stream_name, ["acc-%"]) == (1, False)
    assert_projection(engine, store.name, stream_name, BOTH, unprojected={loan_3})
    write(store, "acc-4")
    assert _project(store, stream_name, BOTH) == (2, False)
    assert_projection(engine, store.name, stream_name, BOTH)


def test_overlapping_wildcards_never_project_a_message_twice(
    store: Store, stream_name: str, engine: sa.Engine
) -> None:
    # Each step projects with another combination of `acc-%` and `acc-1%` (each with its
    # own progress) over messages that both match; everything matches `acc-%`.
    steps: list[tuple[list[str], tuple[str, ...]]] = [
        (["acc-%", "acc-1%"], ("acc-1", "acc-10", "acc-2")),
        (["acc-1%"], ("acc-11", "acc-1")),
        (["acc-%"], ("acc-12", "acc-3", "acc-1")),
        (["acc-1%", "acc-%"], ("acc-13", "acc-10")),
        (["acc-1%", "acc-%", "acc-1%"], ("acc-14", "acc-4")),
    ]
    for wildcards, streams in steps:
        write(store, *streams)
        assert _project(store, stream_name, wildcards) == (len(streams), False)
        assert_projection(engine, store.name, stream_name, ["acc-%"])


@pytest.mark.parametrize("kept", ["acc-%", "%-1"])
def test_overlapping_wildcards_cut_by_the_batch_size_then_one_removed(
    store: Store, stream_name: str, engine: sa.Engine, kept: str
) -> None:
    # `acc-%` (ahead: it projected acc-0) and `%-1` (new) both want acc-1, the last of
    # three candidates in a batch of two. Whichever of them stays configured afterwards
    # must still project it: each wildcard's progress stops before it.
    write(store, "acc-0")
    assert _project(store, stream_name, ["acc-%"]) == (1, False)
    write(store, "loan-1", "acc-2", "acc-1")
    both = store.aggregated_stream(
        stream_name, StreamHashPartitioner(3), ["acc-%", "%-1"], update_batch_size=2
    )
    assert both.projector.update_batch() == (2, True)
    assert projected_streams(engine, stream_name) == [("acc-0", 1), ("acc-2", 1), ("loan-1", 1)]
    assert _project(store, stream_name, [kept]) == (1, False)
    assert_projection(engine, store.name, stream_name, ["acc-%", "%-1"])


CONFIG_CHANGES = {
    "new-prefix": (["acc-%"], ["acc-%", "loan-%"]),
    "new-overlapping": (["acc-%"], ["acc-1%", "acc-%", "loan-%"]),
}
config_changes = pytest.mark.parametrize(
    ("old", "new"), list(CONFIG_CHANGES.values()), ids=list(CONFIG_CHANGES)
)


@config_changes
def test_rolling_deploy_with_alternating_old_and_new_projectors(
    store: Store, stream_name: str, engine: sa.Engine, old: list[str], new: list[str]
) -> None:
    projectors = [_aggregate(store, stream_name, w).projector for w in (old, new)]
    with engine.connect() as late:
        # Takes its global positions first and commits in the middle of the deploy.
        write(store, "loan-late", "acc-late", conn=late)
        for i in range(12):
            write(store, f"acc-{i}", f"loan-{i % 4}", f"acc-1{i % 3}", "other-1")
            projectors[i % 2].update_full()
            if i == 6:
                late.commit()
    projectors[1].update_full()
    assert_projection(engine, store.name, stream_name, new)


@config_changes
def test_rolling_deploy_with_concurrent_old_and_new_projectors(
    store: Store,
    stream_name: str,
    engine: sa.Engine,
    serializer: Any,
    old: list[str],
    new: list[str],
) -> None:
    def projector(wildcards: list[str]) -> StreamProjector[AnyEvent]:
        # A process of its own: its own store object and projector connection.
        own = MessageStore(store.name, engine, serializer)
        return _aggregate(own, stream_name, wildcards, batch_size=5).projector

    loops = [projector(w).update_full for w in (old, new, old, new)]
    run_concurrently([lambda w=w: write_mixed(store, engine, w, 80) for w in range(2)], loops)
    _aggregate(store, stream_name, new).projector.update_full()
    assert_projection(engine, store.name, stream_name, new)


def test_depeche_db_projector_in_between_loses_and_duplicates_nothing(
    store: Store, stream_name: str, engine: sa.Engine
) -> None:
    db_store = depeche_db_store(store)
    db_projector = depeche_db_stream(store, stream_name, BOTH).projector

    def ours(wildcards: list[str]) -> None:
        store.aggregated_stream(
            stream_name, StreamNamePartitioner(), wildcards, update_batch_size=2
        ).projector.update_full()

    def theirs() -> None:
        db_projector.update_full()

    with engine.connect() as late:
        write(store, "acc-late", conn=late)
        rounds: list[tuple[tuple[str, ...], Any]] = [
            (("acc-1", "loan-1", "acc-2"), lambda: ours(["acc-%"])),
            (("loan-2", "acc-1", "acc-3"), theirs),
            (("acc-3", "loan-1", "loan-3"), lambda: ours(BOTH)),
            (("acc-4", "loan-4"), lambda: ours(["acc-%"])),
            (("loan-4", "acc-4"), theirs),
            (("acc-5", "loan-5"), lambda: ours(["loan-%"])),
            (("acc-5", "loan-5", "acc-6"), lambda: ours(BOTH)),
        ]
        for i, (streams, project) in enumerate(rounds):
            for stream in streams:  # both libraries write, too
                if i % 2:
                    db_store.write(stream, Deposited(account=i, amount=1))
                else:
                    write(store, stream)
            project()
            if i == 3:
                late.commit()
    theirs()
    ours(BOTH)
    assert_projection(engine, store.name, stream_name, BOTH)


def test_depeche_db_projector_concurrently_with_old_and_new_projectors(
    store: Store, stream_name: str, engine: sa.Engine, serializer: Any
) -> None:
    def ours(wildcards: list[str]) -> Any:
        own = MessageStore(store.name, engine, serializer)
        return own.aggregated_stream(
            stream_name, StreamNamePartitioner(), wildcards, update_batch_size=5
        ).projector.update_full

    def depeche_db_writer() -> None:
        db_store = depeche_db_store(store)
        for i in range(60):
            db_store.write(f"loan-db{i % 4}", Deposited(account=i, amount=1))

    # depeche-db's run() returns when the other holds the lock (update_full raises).
    theirs = depeche_db_stream(store, stream_name, BOTH).projector.run
    writers = [lambda: write_mixed(store, engine, 0, 80), depeche_db_writer]
    run_concurrently(writers, [ours(["acc-%"]), ours(BOTH), theirs])
    ours(BOTH)()
    assert_projection(engine, store.name, stream_name, BOTH)
