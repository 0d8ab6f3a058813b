"""depeche-db's module path `_subscription`; the code is in `_subscriptions/`."""

from ._subscriptions.ack import NoAckOp as NoAckOp
from ._subscriptions.error_handlers import (
    ExitSubscriptionErrorHandler as ExitSubscriptionErrorHandler,
)
from ._subscriptions.error_handlers import (
    LogAndIgnoreSubscriptionErrorHandler as LogAndIgnoreSubscriptionErrorHandler,
)
from ._subscriptions.start_points import StartAtNextMessage as StartAtNextMessage
from ._subscriptions.start_points import StartAtPointInTime as StartAtPointInTime
from ._subscriptions.subscription import *  # noqa: F403
