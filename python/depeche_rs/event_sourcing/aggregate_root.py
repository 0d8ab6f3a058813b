"""depeche-db's module path `event_sourcing.aggregate_root`."""

from ._aggregate_root import EventSourcedAggregateRoot

__all__ = ["EventSourcedAggregateRoot"]
