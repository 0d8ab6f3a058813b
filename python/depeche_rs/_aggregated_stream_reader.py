"""depeche-db's module path `_aggregated_stream_reader`; the code is in `_projection/`."""

from ._projection.stream_reader import *  # noqa: F403
