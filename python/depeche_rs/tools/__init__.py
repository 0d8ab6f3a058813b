"""Ready-made parts: serializer, partitioners, lock and state providers, the listener."""

from ._partitioners import StreamHashPartitioner, StreamNamePartitioner
from ._pydantic_serializer import PydanticMessageSerializer

__all__ = [
    "PydanticMessageSerializer",
    "StreamHashPartitioner",
    "StreamNamePartitioner",
]
