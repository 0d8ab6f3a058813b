"""depeche-db's module path `_message_store`; the code is in `_store/message_store.py`."""

from ._interfaces import MessageStoreProtocol as MessageStoreProtocol
from ._interfaces import MessageStoreReaderProtocol as MessageStoreReaderProtocol
from ._store.message_store import *  # noqa: F403
