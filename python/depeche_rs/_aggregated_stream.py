"""depeche-db's module path `_aggregated_stream`; the code is in `_projection/`."""

from ._projection.aggregated_stream import *  # noqa: F403
