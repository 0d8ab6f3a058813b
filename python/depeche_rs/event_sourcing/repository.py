"""depeche-db's module path `event_sourcing.repository`."""

from ._repository import *  # noqa: F403
