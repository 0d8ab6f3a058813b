"""Stubs of the Rust extension module. Users import `depeche_rs`, never this."""

import datetime
from collections.abc import Callable
from typing import Any, final

__all__ = ["Projector", "__version__", "hash_mod_partition", "stream_name_partition"]

__version__: str

def stream_name_partition(stream: str) -> int:
    """First two bytes of sha256(stream), little endian."""

def hash_mod_partition(stream: str, n: int) -> int:
    """First eight bytes of sha256(stream), little endian, modulo n."""

@final
class Projector:
    """One aggregated stream's projector, holding one connection."""

    def __new__(
        cls,
        dsn: str,
        store: str,
        stream: str,
        wildcards: list[str],
        batch_size: int,
        partitioner: str | None = None,
        modulus: int | None = None,
    ) -> Projector: ...
    def run(
        self,
        resolve: Callable[[list[tuple[Any, ...]], bool], list[tuple[int | None, datetime.datetime]]]
        | None = None,
        budget: Any = None,
        max_batches: int | None = None,
    ) -> tuple[int, bool, bool]:
        """Project batches; returns (projected, more, locked)."""
    def close(self) -> None:
        """Close the connection."""
