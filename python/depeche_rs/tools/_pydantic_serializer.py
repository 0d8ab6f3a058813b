"""depeche-db's wire format for pydantic models: the model's JSON plus `__typename__`."""

from __future__ import annotations

import operator
import types
import typing
from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

T = TypeVar("T")

_UNION_TYPES: tuple[Any, ...] = (typing.Union, types.UnionType)


def _union_members(tp: Any) -> Iterator[type[Any]]:
    if typing.get_origin(tp) in _UNION_TYPES:
        for member in typing.get_args(tp):
            yield from _union_members(member)
    else:
        yield tp


def _is_subtype(cls: Any, of: Any) -> bool:
    members = set(_union_members(of))
    return all(
        any(isinstance(c, type) and issubclass(c, m) for m in members if isinstance(m, type))
        for c in _union_members(cls)
    )


class PydanticMessageSerializer(Generic[T]):
    """Serializes pydantic v2 models (or a union of them) as depeche-db does.

    Args:
        message_type: A model class or a union of model classes.
        aliases: Extra type names accepted when deserializing (e.g. renamed classes).
    """

    def __init__(self, message_type: Any, aliases: dict[str, type[Any]] | None = None) -> None:
        self.message_type = message_type
        self.message_types: set[str] = set()
        self.serializers: dict[str, Callable[[Any], dict[str, Any]]] = {}
        self.deserializers: dict[str, Callable[[dict[str, Any]], Any]] = {}
        for member in _union_members(message_type):
            if not hasattr(member, "model_validate"):
                raise TypeError(f"{member!r} is not a pydantic v2 model")
            if member.__name__ in self.message_types:
                raise ValueError(f"Duplicate class name {member.__name__} in union {message_type}")
            self._add(member.__name__, member)
        for alias, member in (aliases or {}).items():
            if alias in self.message_types:
                raise ValueError(
                    f"Alias {alias} conflicts with existing class name in union {message_type}"
                )
            if not _is_subtype(member, message_type):
                raise ValueError(f"Type {member} is not a subclass of {message_type}")
            self._add(alias, member)

    def _add(self, name: str, model: Any) -> None:
        self.message_types.add(name)
        self.serializers[name] = operator.methodcaller("model_dump", mode="json")
        self.deserializers[name] = model.model_validate

    def serialize(self, message: T) -> dict[str, Any]:
        """The model's JSON form plus `"__typename__": <class name>`."""
        typename = type(message).__name__
        if typename not in self.message_types:
            raise TypeError(
                f"Unknown message type {typename} (expected one of {sorted(self.message_types)})"
            )
        result = self.serializers[typename](message)
        result["__typename__"] = typename
        return result

    def deserialize(self, message: dict[str, Any]) -> T:
        """The model named by `__typename__`, validated from the rest of the dict."""
        data = dict(message)
        typename = data.pop("__typename__", None)
        if typename not in self.message_types:
            raise TypeError(
                f"Unknown message type {typename} (expected one of {sorted(self.message_types)})"
            )
        result: T = self.deserializers[typename](data)
        return result
