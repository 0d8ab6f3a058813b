"""Handler registers and the message handler: dispatch by annotation, errors at
registration time, call middleware, error handlers. No database needed."""

from __future__ import annotations

import datetime as dt
import logging
import uuid
from typing import Any, Union

import pytest

from depeche_rs import (
    CallMiddleware,
    DuplicateHandlerError,
    ErrorAction,
    ExitSubscriptionErrorHandler,
    InvalidHandlerError,
    LogAndIgnoreSubscriptionErrorHandler,
    MessageHandler,
    MessageHandlerRegister,
    MessageProtocol,
    NoAckOp,
    StoredMessage,
    SubscriptionErrorHandler,
    SubscriptionMessage,
    SubscriptionMessageHandler,
)

from ._models import AccountCreated, Deposited


class _Base:
    def __init__(self) -> None:
        self.id = uuid.uuid4()

    def get_message_id(self) -> uuid.UUID:
        return self.id

    def get_message_time(self) -> dt.datetime:
        return dt.datetime(2024, 1, 1, tzinfo=dt.timezone.utc)


class Opened(_Base):
    pass


class Closed(_Base):
    pass


class Reopened(Opened):
    pass


class NotAMessage:
    pass


def _wrap(message: Any, position: int = 0) -> SubscriptionMessage[Any]:
    stored = StoredMessage(
        message_id=message.get_message_id(),
        stream="s-1",
        version=position + 1,
        message=message,
        global_position=position + 1,
        added_at=dt.datetime(2024, 1, 1),
    )
    return SubscriptionMessage(partition=0, position=position, stored_message=stored, ack=NoAckOp())


def test_dispatches_on_the_annotation_in_the_form_it_names() -> None:
    register: MessageHandlerRegister[Any] = MessageHandlerRegister()
    seen: list[tuple[str, Any]] = []

    @register.register
    def plain(message: Opened) -> None:
        seen.append(("plain", message))

    @register.register
    def stored(message: StoredMessage[Closed]) -> None:
        seen.append(("stored", message))

    @register.register
    def wrapped(message: SubscriptionMessage[AccountCreated]) -> None:
        seen.append(("subscription", message))

    handler = SubscriptionMessageHandler(register)
    opened, closed, created = _wrap(Opened()), _wrap(Closed()), _wrap(AccountCreated(account=1))
    for message in (opened, closed, created):
        handler.handle(message)
    assert seen == [
        ("plain", opened.stored_message.message),
        ("stored", closed.stored_message),
        ("subscription", created),
    ]


def test_union_annotation_handles_each_member() -> None:
    register: MessageHandlerRegister[Any] = MessageHandlerRegister()
    seen: list[type[Any]] = []

    @register.register
    def both(message: StoredMessage[Opened | Closed]) -> None:
        seen.append(type(message.message))

    handler = SubscriptionMessageHandler(register)
    handler.handle(_wrap(Closed()))
    handler.handle(_wrap(Opened()))
    handler.handle(_wrap(Deposited(account=1, amount=1)))
    assert seen == [Closed, Opened]
    assert next(iter(register.get_all_handlers())).pass_stored_message is True


def test_typing_union_is_accepted_too() -> None:
    register: MessageHandlerRegister[Any] = MessageHandlerRegister()

    @register.register
    def both(message: Union[Opened, Closed]) -> None:  # noqa: UP007
        pass

    descriptor = register.get_handler(Closed)
    assert descriptor is not None and descriptor.handler is both


def test_most_specific_handler_wins_and_a_base_class_handler_is_the_fallback() -> None:
    register: MessageHandlerRegister[Any] = MessageHandlerRegister()

    def fallback(message: MessageProtocol) -> None:
        pass

    def base(message: Opened) -> None:
        pass

    def special(message: Reopened) -> None:
        pass

    # Registration order does not matter: fallback first, most specific last.
    register.register(fallback)
    register.register(base)
    register.register(special)

    def handler_of(message_type: type[Any]) -> Any:
        descriptor = register.get_handler(message_type)
        return descriptor.handler if descriptor else None

    assert handler_of(Reopened) is special
    assert handler_of(Opened) is base
    assert handler_of(Closed) is fallback
    assert handler_of(Deposited) is fallback


def test_any_annotation_is_a_fallback() -> None:
    register: MessageHandlerRegister[Any] = MessageHandlerRegister()

    @register.register
    def anything(message: SubscriptionMessage[Any]) -> None:
        pass

    descriptor = register.get_handler(Closed)
    assert descriptor is not None and descriptor.pass_subscription_message is True


def test_two_handlers_for_one_type_fail_at_registration() -> None:
    register: MessageHandlerRegister[Any] = MessageHandlerRegister()

    @register.register
    def first(message: Opened | Closed) -> None:
        pass

    with pytest.raises(DuplicateHandlerError, match="Closed is already handled by handler"):

        @register.register
        def second(message: StoredMessage[Closed]) -> None:
            pass

    # depeche-db raises ValueError: still caught as such.
    with pytest.raises(ValueError):
        register.register_manual(lambda m: None, Opened)


def test_a_failed_registration_registers_nothing() -> None:
    register: MessageHandlerRegister[Any] = MessageHandlerRegister()
    register.register_manual(lambda m: None, Closed)
    with pytest.raises(DuplicateHandlerError):
        register.register_manual(lambda m: None, Opened | Closed)
    # Opened was not registered by the failed call.
    assert register.get_handler(Opened) is None
    assert len(list(register.get_all_handlers())) == 1


def test_handler_without_annotation_fails_at_registration() -> None:
    register: MessageHandlerRegister[Any] = MessageHandlerRegister()

    def untyped(message):  # type: ignore[no-untyped-def]
        pass

    with pytest.raises(InvalidHandlerError, match="no type annotation on its parameter 'message'"):
        register.register(untyped)
    with pytest.raises(TypeError):
        register.register(untyped)


def test_handler_without_parameters_fails_at_registration() -> None:
    register: MessageHandlerRegister[Any] = MessageHandlerRegister()
    with pytest.raises(InvalidHandlerError, match="takes no parameter"):
        register.register(lambda: None)
    # depeche-db raises ValueError here.
    with pytest.raises(ValueError):
        register.register(lambda: None)


def test_annotation_that_is_not_a_message_type_fails() -> None:
    register: MessageHandlerRegister[Any] = MessageHandlerRegister()

    def wrong(message: NotAMessage) -> None:
        pass

    def number(message: int) -> None:
        pass

    with pytest.raises(InvalidHandlerError, match="NotAMessage is not a message type"):
        register.register(wrong)
    with pytest.raises(TypeError, match="int is not a message type"):
        register.register(number)
    assert list(register.get_all_handlers()) == []


def test_postponed_annotations_are_resolved() -> None:
    register: MessageHandlerRegister[Any] = MessageHandlerRegister()

    def handler(message: StoredMessage[Opened]) -> None:
        pass

    # This module uses `from __future__ import annotations`: the annotation is a string.
    assert isinstance(handler.__annotations__["message"], str)
    register.register(handler)
    descriptor = register.get_handler(Opened)
    assert descriptor is not None and descriptor.pass_stored_message is True


def test_unresolvable_postponed_annotation_is_a_clear_error() -> None:
    register: MessageHandlerRegister[Any] = MessageHandlerRegister()

    def handler(message: DoesNotExist) -> None:  # type: ignore[name-defined] # noqa: F821
        pass

    with pytest.raises(InvalidHandlerError, match="cannot resolve the annotation 'DoesNotExist'"):
        register.register(handler)


def test_class_based_handler_registers_marked_methods_at_construction() -> None:
    calls: list[str] = []

    class Handlers(MessageHandler[Any]):
        @MessageHandler.register
        def on_opened(self, message: Opened) -> None:
            calls.append("opened")

        @MessageHandler.register
        def on_closed(self, message: SubscriptionMessage[Closed]) -> None:
            calls.append("closed")

        def helper(self, message: Closed) -> None:
            raise AssertionError("not registered")

        @property
        def boom(self) -> int:
            raise AssertionError("properties are not evaluated while registering")

    handler = SubscriptionMessageHandler(Handlers())
    handler.handle(_wrap(Closed()))
    handler.handle(_wrap(Opened()))
    assert calls == ["closed", "opened"]


def test_class_based_handler_with_duplicate_fails_at_construction() -> None:
    class Handlers(MessageHandler[Any]):
        @MessageHandler.register
        def one(self, message: Opened) -> None:
            pass

        @MessageHandler.register
        def two(self, message: Opened) -> None:
            pass

    with pytest.raises(DuplicateHandlerError):
        Handlers()


def test_extra_parameters_require_a_call_middleware() -> None:
    register: MessageHandlerRegister[Any] = MessageHandlerRegister()
    seen: list[tuple[Any, int]] = []

    @register.register
    def needs_more(message: Opened, extra: int) -> None:
        seen.append((message, extra))

    with pytest.raises(InvalidHandlerError, match="pass a call_middleware"):
        SubscriptionMessageHandler(register)

    class Middleware(CallMiddleware[Any]):
        def call(self, handler: Any, message: Any) -> None:
            handler(message, 42)

    opened = _wrap(Opened())
    SubscriptionMessageHandler(register, call_middleware=Middleware()).handle(opened)
    assert seen == [(opened.stored_message.message, 42)]


def test_message_without_handler_is_skipped() -> None:
    register: MessageHandlerRegister[Any] = MessageHandlerRegister()

    @register.register
    def opened(message: Opened) -> None:
        raise AssertionError("not for Closed")

    SubscriptionMessageHandler(register).handle(_wrap(Closed()))


def _failing_register() -> MessageHandlerRegister[Any]:
    register: MessageHandlerRegister[Any] = MessageHandlerRegister()

    @register.register
    def fails(message: Opened) -> None:
        raise KeyError("broken handler")

    return register


def test_exit_error_handler_reraises() -> None:
    handler = SubscriptionMessageHandler(
        _failing_register(), error_handler=ExitSubscriptionErrorHandler()
    )
    with pytest.raises(KeyError, match="broken handler"):
        handler.handle(_wrap(Opened()))
    # The default is to exit.
    with pytest.raises(KeyError):
        SubscriptionMessageHandler(_failing_register()).handle(_wrap(Opened()))


def test_log_and_ignore_error_handler_logs_and_returns(caplog: pytest.LogCaptureFixture) -> None:
    handler = SubscriptionMessageHandler(
        _failing_register(), error_handler=LogAndIgnoreSubscriptionErrorHandler("orders")
    )
    message = _wrap(Opened())
    with caplog.at_level(logging.ERROR, logger="depeche_db.subscription.orders"):
        handler.handle(message)
    assert [r.getMessage() for r in caplog.records] == [
        f"Error while handling message {message.stored_message.message_id}:Opened"
    ]
    assert caplog.records[0].exc_info is not None


def test_error_handler_returning_garbage_is_an_error() -> None:
    class Forgetful(SubscriptionErrorHandler[Any]):
        def handle_error(self, error: Exception, message: SubscriptionMessage[Any]) -> Any:
            return None

    handler = SubscriptionMessageHandler(_failing_register(), error_handler=Forgetful())
    with pytest.raises(TypeError, match=r"must return ErrorAction\.EXIT or ErrorAction\.IGNORE"):
        handler.handle(_wrap(Opened()))
    assert ErrorAction.IGNORE.value == "ignore"


def test_no_ack_op_refuses() -> None:
    with pytest.raises(RuntimeError, match=r"choose AckStrategy\.SINGLE"):
        NoAckOp().execute()
