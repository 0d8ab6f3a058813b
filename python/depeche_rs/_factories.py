"""depeche-db's module path `_factories`; each factory lives beside what it creates."""

from ._interfaces import *  # noqa: F403
from ._projection.aggregated_stream import AggregatedStreamFactory as AggregatedStreamFactory
from ._subscriptions.factory import SubscriptionFactory as SubscriptionFactory
