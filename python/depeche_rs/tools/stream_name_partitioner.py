"""depeche-db's module path `tools.stream_name_partitioner`."""

from ._partitioners import StreamNamePartitioner

__all__ = ["StreamNamePartitioner"]
