"""Start points: where a new subscription starts reading."""

from __future__ import annotations

import datetime as _dt
from typing import Any

from .._exceptions import NaiveDatetimeError
from .._interfaces import AggregatedStreamView, SubscriptionStartPoint, SubscriptionStateProvider


class StartAtNextMessage(SubscriptionStartPoint):
    """A new subscription starts after the last message of each partition: it receives
    only messages projected after it was first run."""

    def init_state(
        self,
        subscription_name: str,
        stream: AggregatedStreamView[Any],
        state_provider: SubscriptionStateProvider,
    ) -> None:
        """Store each partition's max position as the subscription's position."""
        for partition, position in stream.get_max_aggregated_stream_positions().items():
            state_provider.store(
                subscription_name=subscription_name, partition=partition, position=position
            )


class StartAtPointInTime(SubscriptionStartPoint):
    """A new subscription starts at the first message whose time (the message's own
    `get_message_time()`) is at or after `point_in_time`, in every partition.

    Args:
        point_in_time: A timezone-aware datetime.

    Raises:
        NaiveDatetimeError: `point_in_time` has no timezone.
    """

    def __init__(self, point_in_time: _dt.datetime) -> None:
        if not isinstance(point_in_time, _dt.datetime):
            raise TypeError(f"point_in_time must be a datetime, got {type(point_in_time).__name__}")
        if point_in_time.tzinfo is None or point_in_time.utcoffset() is None:
            raise NaiveDatetimeError(
                "Point in time must be timezone aware, e.g. datetime.now(timezone.utc)"
            )
        self._point_in_time = point_in_time

    @property
    def point_in_time(self) -> _dt.datetime:
        """Where the subscription starts."""
        return self._point_in_time

    def init_state(
        self,
        subscription_name: str,
        stream: AggregatedStreamView[Any],
        state_provider: SubscriptionStateProvider,
    ) -> None:
        """Store, per partition, the position just before the first message at or after
        the point in time."""
        for partition, position in stream.time_to_positions(self._point_in_time).items():
            if position > 0:
                state_provider.store(
                    subscription_name=subscription_name,
                    partition=partition,
                    position=position - 1,
                )
