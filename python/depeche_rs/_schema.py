"""The schema's old path, which tests import; the code is in `_db/schema.py`."""

from ._db.schema import *  # noqa: F403
