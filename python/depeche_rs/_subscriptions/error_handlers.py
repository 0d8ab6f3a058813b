"""The ready-made error handlers: what a subscription does when a handler raises."""

from __future__ import annotations

import logging
from typing import Any

from .._interfaces import ErrorAction, SubscriptionErrorHandler, SubscriptionMessage


class ExitSubscriptionErrorHandler(SubscriptionErrorHandler[Any]):
    """On a handler error, stop: the error propagates out of `run_once` (and stops an
    `Executor`); the failed message is not acknowledged and is delivered again."""

    def handle_error(self, error: Exception, message: SubscriptionMessage[Any]) -> ErrorAction:
        """Return `ErrorAction.EXIT`."""
        return ErrorAction.EXIT


class LogAndIgnoreSubscriptionErrorHandler(SubscriptionErrorHandler[Any]):
    """On a handler error, log it and go on: the failed message is acknowledged."""

    def __init__(self, subscription_name: str) -> None:
        self._logger = logging.getLogger(f"depeche_db.subscription.{subscription_name}")

    def handle_error(self, error: Exception, message: SubscriptionMessage[Any]) -> ErrorAction:
        """Log `error` with its traceback and return `ErrorAction.IGNORE`."""
        self._logger.error(
            "Error while handling message %s:%s",
            message.stored_message.message_id,
            type(message.stored_message.message).__name__,
            exc_info=error,
        )
        return ErrorAction.IGNORE
