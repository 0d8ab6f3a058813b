"""Print which public names of depeche-db 0.13.1 exist in depeche_rs with a compatible
signature. Run: python scripts/compat_matrix.py (needs the `test` extra)."""

from __future__ import annotations

import inspect
import sys
from collections.abc import Iterator
from types import ModuleType
from typing import Any

# Names left out on purpose, with the reason.
MISSING_ON_PURPOSE: dict[str, str] = {
    "depeche_db.StreamProjector.get_aggregate_stream_positions": (
        "internals of depeche-db's per-stream look-back algorithm; ours uses a cursor"
    ),
    "depeche_db.StreamProjector.get_origin_stream_positions": (
        "internals of depeche-db's per-stream look-back algorithm; ours uses a cursor"
    ),
    **{
        f"depeche_db.Storage.{method}": "depeche-db row layer under MessageStore; use MessageStore"
        for method in (
            "add add_all get_global_position get_max_version get_message_by_id "
            "get_message_ids get_messages_by_ids read read_multiple read_wildcard truncate"
        ).split()
    },
}


def _signature(obj: Any) -> inspect.Signature | None:
    target = obj.__init__ if inspect.isclass(obj) else obj
    if not callable(target):
        return None
    try:
        return inspect.signature(target)
    except (TypeError, ValueError):
        return None


def compatible(theirs: Any, ours: Any) -> tuple[bool, str]:
    """Whether every call valid for `theirs` is valid for `ours` (by parameter names)."""
    a, b = _signature(theirs), _signature(ours)
    if a is None or b is None:
        return True, ""
    ours_params = b.parameters
    has_var_kw = any(p.kind is p.VAR_KEYWORD for p in ours_params.values())
    problems = []
    for name, param in a.parameters.items():
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        if name not in ours_params and not has_var_kw:
            problems.append(f"missing parameter {name!r}")
        elif name in ours_params and param.default is not param.empty:
            if ours_params[name].default is param.empty:
                problems.append(f"{name!r} is optional there, required here")
    return not problems, "; ".join(problems)


def rows(db: ModuleType, rs: ModuleType) -> Iterator[tuple[str, str, str]]:
    """(name, status, detail) for each public name of `db`."""
    for name in sorted(n for n in dir(db) if not n.startswith("_")):
        theirs = getattr(db, name)
        if inspect.ismodule(theirs):
            continue
        qualified = f"{db.__name__}.{name}"
        if not hasattr(rs, name):
            reason = MISSING_ON_PURPOSE.get(qualified)
            yield qualified, "missing on purpose" if reason else "MISSING", reason or ""
            continue
        ours = getattr(rs, name)
        ok, detail = compatible(theirs, ours)
        yield qualified, "same signature" if ok else "DIFFERENT", detail
        if inspect.isclass(theirs) and inspect.isclass(ours):
            for attr in sorted(a for a in vars(theirs) if not a.startswith("_")):
                member = getattr(theirs, attr)
                if not callable(member) and not isinstance(member, property):
                    continue
                if not hasattr(ours, attr):
                    reason = MISSING_ON_PURPOSE.get(f"{qualified}.{attr}")
                    status = "missing on purpose" if reason else "MISSING"
                    yield f"{qualified}.{attr}", status, reason or ""
                    continue
                ok, detail = compatible(member, getattr(ours, attr))
                yield f"{qualified}.{attr}", "same signature" if ok else "DIFFERENT", detail


def main() -> int:
    import depeche_db
    import depeche_db.tools

    import depeche_rs
    import depeche_rs.tools

    table = list(rows(depeche_db, depeche_rs)) + list(rows(depeche_db.tools, depeche_rs.tools))
    width = max(len(n) for n, _, _ in table)
    print(f"{'depeche-db 0.13.1 name':<{width}}  status")
    for name, status, detail in table:
        print(f"{name:<{width}}  {status}{'  (' + detail + ')' if detail else ''}")
    bad = [r for r in table if r[1] in ("MISSING", "DIFFERENT")]
    print(f"{len(table)} names: {len(table) - len(bad)} compatible, {len(bad)} not")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
