"""depeche-db's module path `_message_handler`; the code is in `_subscriptions/`."""

from ._subscriptions.message_handler import *  # noqa: F403
