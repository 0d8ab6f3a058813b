"""Print which public names of depeche-db 0.13.1 exist in depeche_rs with a compatible
signature, and which of its public module paths import from depeche_rs under the same
dotted name with the same public names. Run: python scripts/compat_matrix.py (needs the
`test` extra)."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
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
    "depeche_db.experimental.threaded_executor.HandlerRegistration": (
        "depeche-db's record of a registered handler; ThreadedExecutor keeps the handlers "
        "in channel_register"
    ),
    "depeche_db.tools.pg_notification_listener.PgNotificationFailure": (
        "depeche-db's listener queues its connection failure; ours reconnects instead"
    ),
    "depeche_db.tools.pydantic_message_serializer.make_jsonable": (
        "depeche-db's serializer helper; ours serializes with pydantic's JSON mode"
    ),
}

# Private modules that depeche-db code imports public names from, with those names.
PRIVATE_MODULE_NAMES: dict[str, list[str]] = {
    "depeche_db._aggregated_stream": ["FullUpdateResult"],
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


def public_modules(package: ModuleType) -> list[str]:
    """Dotted names of `package` and its submodules, none with a leading underscore."""
    names = [package.__name__]
    for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
        if not any(part.startswith("_") for part in info.name.split(".")):
            names.append(info.name)
    return sorted(names)


def module_names(module: ModuleType) -> list[str]:
    """The public classes and functions `module` offers: in a package, those it
    re-exports; in a plain module, those it defines."""
    package = module.__name__.split(".")[0]
    is_package = hasattr(module, "__path__")
    names = []
    for name in dir(module):
        obj = getattr(module, name)
        if name.startswith("_") or not (inspect.isclass(obj) or inspect.isfunction(obj)):
            continue
        home = getattr(obj, "__module__", "") or ""
        if home == module.__name__ or (is_package and home.startswith(package)):
            names.append(name)
    return sorted(names)


def module_rows(db: ModuleType) -> Iterator[tuple[str, str, str]]:
    """(name, status, detail) for each public module path of `db` and its public names."""
    paths = {m: module_names(importlib.import_module(m)) for m in public_modules(db)}
    paths.update(PRIVATE_MODULE_NAMES)
    for path, names in sorted(paths.items()):
        ours_path = "depeche_rs" + path[len(db.__name__) :]
        try:
            ours = importlib.import_module(ours_path)
        except ImportError as exc:
            yield f"module {path}", "MISSING", str(exc)
            continue
        yield f"module {path}", "importable", ""
        theirs = importlib.import_module(path)
        for name in names:
            qualified = f"{path}.{name}"
            if hasattr(ours, name):
                ok, detail = compatible(getattr(theirs, name), getattr(ours, name))
                yield qualified, "same signature" if ok else "DIFFERENT", detail
            else:
                reason = MISSING_ON_PURPOSE.get(qualified)
                yield qualified, "missing on purpose" if reason else "MISSING", reason or ""


def table() -> list[tuple[str, str, str]]:
    """The whole matrix: top-level and `tools` names, then module paths."""
    import depeche_db
    import depeche_db.tools

    import depeche_rs
    import depeche_rs.tools

    return [
        *rows(depeche_db, depeche_rs),
        *rows(depeche_db.tools, depeche_rs.tools),
        *module_rows(depeche_db),
    ]


def main() -> int:
    table_ = table()
    width = max(len(n) for n, _, _ in table_)
    print(f"{'depeche-db 0.13.1 name':<{width}}  status")
    for name, status, detail in table_:
        print(f"{name:<{width}}  {status}{'  (' + detail + ')' if detail else ''}")
    bad = [r for r in table_ if r[1] in ("MISSING", "DIFFERENT")]
    print(f"{len(table_)} names: {len(table_) - len(bad)} compatible, {len(bad)} not")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
