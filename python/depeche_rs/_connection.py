"""The DSN helpers' old path, which tests import; the code is in `_db/connection.py`."""

from ._db.connection import *  # noqa: F403
