"""Partitioners by stream name. The projector recognises these and runs them in Rust."""

from __future__ import annotations

from typing import Generic, TypeVar

from .._interfaces import MessageProtocol, StoredMessage
from .._native import hash_mod_partition, stream_name_partition

E = TypeVar("E", bound=MessageProtocol)


class StreamNamePartitioner(Generic[E]):
    """depeche-db's partitioner: the first two bytes of sha256(stream), little endian.

    Gives the same numbers as depeche-db (0 to 65535), so both can project one stream.
    """

    def get_partition(self, message: StoredMessage[E]) -> int:
        """The partition of `message`, from its stream name only."""
        return stream_name_partition(message.stream)


class StreamHashPartitioner(Generic[E]):
    """sha256(stream) modulo `partitions`: a fixed number of partitions, by stream."""

    def __init__(self, partitions: int) -> None:
        if not isinstance(partitions, int) or isinstance(partitions, bool) or partitions < 1:
            raise ValueError(f"partitions must be an int >= 1, got {partitions!r}")
        if partitions > 2**31 - 1:
            raise ValueError("partitions must be below 2**31")
        self.partitions = partitions

    def get_partition(self, message: StoredMessage[E]) -> int:
        """The partition of `message`, from its stream name only."""
        return hash_mod_partition(message.stream, self.partitions)
