"""Runs depeche-db 0.14 (in its own virtual environment) for the tests, as a subprocess.

Called as `python _depeche_db_014_driver.py '<json request>'`; prints one JSON reply.
It imports only depeche_db, SQLAlchemy and the tests' pydantic models, never depeche_rs.
Requests (`op`):
- `write`: write `messages` ([stream, account, amount] each) one per call; reply the
  global positions.
- `project`: open the store and aggregated stream (creating what depeche-db 0.14 creates)
  and run its projector: `update_full()` or, with `batches`, that many batches under its
  table lock; reply the messages projected.
- `subscribe`: run a subscription's `run_once()` until it handles nothing more; reply
  each handled message as [partition, position, message id].
- `migrate`: print and run depeche-db 0.14's own migration script from `from` to 0.14.
- `signatures`: the public names of depeche-db 0.14's modules, with their parameters.
"""

from __future__ import annotations

import importlib
import inspect
import json
import pkgutil
import sys
from pathlib import Path
from typing import Any

import sqlalchemy as sa

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import depeche_db
from depeche_db import tools

from tests._models import AnyEvent, Deposited


def _engine(dsn: str) -> sa.Engine:
    return sa.create_engine(dsn.replace("postgresql://", "postgresql+psycopg://", 1))


def _store(request: dict[str, Any], engine: sa.Engine) -> Any:
    return depeche_db.MessageStore(
        request["store"], engine, tools.PydanticMessageSerializer(AnyEvent)
    )


def _stream(request: dict[str, Any], engine: sa.Engine) -> Any:
    return _store(request, engine).aggregated_stream(
        name=request["agg"],
        partitioner=tools.StreamNamePartitioner(),
        stream_wildcards=request["wildcards"],
        update_batch_size=request.get("batch_size"),
    )


def write(request: dict[str, Any]) -> list[int]:
    store = _store(request, _engine(request["dsn"]))
    return [
        store.write(stream, Deposited(account=account, amount=amount)).global_position
        for stream, account, amount in request["messages"]
    ]


def project(request: dict[str, Any]) -> int:
    projector = _stream(request, _engine(request["dsn"])).projector
    batches = request.get("batches")
    if batches is None:
        total = 0
        while True:
            done, more = projector.update_full()
            total += done
            if not more:
                return total
    # update_full() with a fixed number of batches: its lock, its per-batch upkeep.
    stream = projector.stream
    total = 0
    with stream._store.engine.connect() as conn:
        cutoff = stream._store._storage.get_global_position(conn)
        conn.execute(sa.text(f"LOCK TABLE {stream._table.name} IN EXCLUSIVE MODE NOWAIT"))
        projector._check_and_create_maxpos_table(conn)
        maxpos = stream.get_max_aggregated_stream_positions(conn)
        touched: set[int] = set()
        for _ in range(batches):
            total += projector._update_batch(
                conn, cutoff, maxpos=maxpos, touched_partitions=touched
            )
        if touched:
            stream._update_max_aggregated_stream_positions(
                conn=conn, positions={p: maxpos[p] for p in touched}
            )
        conn.commit()
    return total


def subscribe(request: dict[str, Any]) -> list[list[Any]]:
    seen: list[list[Any]] = []
    handlers = depeche_db.MessageHandlerRegister()

    def handle(message: Any) -> None:
        seen.append([message.partition, message.position, str(message.stored_message.message_id)])

    handle.__annotations__ = {"message": depeche_db.SubscriptionMessage[Deposited], "return": None}
    handlers.register(handle)
    subscription = _stream(request, _engine(request["dsn"])).subscription(
        name=request["subscription"], handlers=handlers
    )
    while True:
        before = len(seen)
        subscription.runner.run_once()
        if len(seen) == before:
            return seen


def migrate(request: dict[str, Any]) -> str:
    version = tuple(int(p) for p in request["from"].split("."))
    script = "\n".join(
        generator(request["agg"], request["store"])
        for step, generators in depeche_db.AggregatedStream.migration_script_generators().items()
        if version <= step <= (0, 14)
        for generator in generators
    )
    with _engine(request["dsn"]).begin() as conn:
        conn.exec_driver_sql(script.replace("%%", "%"))
    return script


def signatures(request: dict[str, Any]) -> dict[str, dict[str, list[str] | None]]:
    del request
    out: dict[str, dict[str, list[str] | None]] = {}
    paths = ["depeche_db", "depeche_db._timings", "depeche_db._aggregated_stream"]
    paths += [
        info.name
        for info in pkgutil.walk_packages(depeche_db.__path__, "depeche_db.")
        if not any(part.startswith("_") for part in info.name.split("."))
    ]
    for path in paths:
        module = importlib.import_module(path)
        is_package = hasattr(module, "__path__")
        names: dict[str, list[str] | None] = {}
        for name in dir(module):
            obj = getattr(module, name)
            if name.startswith("_") or not (inspect.isclass(obj) or inspect.isfunction(obj)):
                continue
            # A package offers what it re-exports; a module what it defines.
            home = getattr(obj, "__module__", "") or ""
            if not (home == path or (is_package and home.startswith("depeche_db"))):
                continue
            target = obj.__init__ if inspect.isclass(obj) else obj
            try:
                names[name] = [
                    p.name
                    for p in inspect.signature(target).parameters.values()
                    if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
                ]
            except (TypeError, ValueError):
                names[name] = None
        out[path] = names
    return out


if __name__ == "__main__":
    request = json.loads(sys.argv[1])
    operation = {
        "write": write,
        "project": project,
        "subscribe": subscribe,
        "migrate": migrate,
        "signatures": signatures,
    }[request["op"]]
    print(json.dumps(operation(request)))
