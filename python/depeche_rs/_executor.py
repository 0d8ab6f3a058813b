"""depeche-db's module path `_executor`; the code is in `_runtime/executor.py`."""

from ._runtime.executor import *  # noqa: F403
