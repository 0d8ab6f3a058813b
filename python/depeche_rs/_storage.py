"""depeche-db's module path `_storage`; the code is in `_store/storage.py`."""

from ._store.storage import *  # noqa: F403
