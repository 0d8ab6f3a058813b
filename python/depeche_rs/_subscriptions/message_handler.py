"""Handler registers: which function handles which message type, read from annotations.

A handler's first parameter says what it handles and in which form: `MyEvent` (the
message itself), `StoredMessage[MyEvent]` or `SubscriptionMessage[MyEvent]`; `MyEvent`
may be a union (`A | B`). Every mistake is reported when the handler is registered, not
when the first message arrives.

Dispatch picks the most specific handler: the one registered for the message's own
class, else for its nearest base class in method resolution order, else one registered
for a protocol or abstract type it satisfies (e.g. `MessageProtocol`): a handler for a
base class or for `MessageProtocol` (or `Any`) is therefore a fallback for every message
without a more specific handler. (depeche-db refuses a subclass handler registered after
a base class handler; we accept it and let the subclass win.)
"""

from __future__ import annotations

import inspect
import types
import typing
from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

from .._exceptions import DepecheError
from .._interfaces import (
    CallMiddleware,
    ErrorAction,
    HandlerDescriptor,
    MessageHandlerRegisterProtocol,
    MessageProtocol,
    StoredMessage,
    SubscriptionErrorHandler,
    SubscriptionMessage,
)
from .error_handlers import ExitSubscriptionErrorHandler

E = TypeVar("E", bound=MessageProtocol)
H = TypeVar("H", bound=Callable[..., Any])

_UNION_TYPES: tuple[Any, ...] = (typing.Union, types.UnionType)
_MARKER = "__message_handler__"


class InvalidHandlerError(DepecheError, TypeError, ValueError):
    """A handler cannot be registered: no parameter, no usable type annotation, or an
    annotation that is not a message type.

    Subclasses both `TypeError` and `ValueError` because depeche-db raises either,
    depending on the mistake.
    """


class DuplicateHandlerError(DepecheError, ValueError):
    """A second handler was registered for a message type that already has one."""


def _describe(handler: Callable[..., Any]) -> str:
    return f"handler {getattr(handler, '__qualname__', None) or repr(handler)}"


def _first_parameter_annotation(handler: Callable[..., Any]) -> tuple[Any, int]:
    """Return the resolved annotation of the first parameter and the parameter count."""
    try:
        signature = inspect.signature(handler)
    except (TypeError, ValueError) as exc:
        raise InvalidHandlerError(f"{_describe(handler)} has no inspectable signature") from exc
    parameters = list(signature.parameters.values())
    if not parameters:
        raise InvalidHandlerError(
            f"{_describe(handler)} takes no parameter; it must take the message as its first "
            "parameter"
        )
    first = parameters[0]
    if first.kind not in (first.POSITIONAL_ONLY, first.POSITIONAL_OR_KEYWORD):
        raise InvalidHandlerError(
            f"{_describe(handler)}: the message parameter {first.name!r} must be positional"
        )
    annotation = first.annotation
    if annotation is inspect.Parameter.empty:
        raise InvalidHandlerError(
            f"{_describe(handler)} has no type annotation on its parameter {first.name!r}: "
            "annotate it with the message type, StoredMessage[T] or SubscriptionMessage[T]"
        )
    if isinstance(annotation, str):
        annotation = _resolve_postponed(handler, first.name, annotation)
    return annotation, len(parameters)


def _resolve_postponed(handler: Callable[..., Any], parameter: str, annotation: str) -> Any:
    target: Any = getattr(handler, "__func__", handler)
    if not inspect.isfunction(target) and callable(target):
        # A callable object: its annotations are on its class's __call__.
        target = type(target).__call__
    try:
        hints = typing.get_type_hints(inspect.unwrap(target))
    except Exception as exc:
        raise InvalidHandlerError(
            f"{_describe(handler)}: cannot resolve the annotation {annotation!r} of "
            f"{parameter!r} ({exc}); define the message type at module level or import it "
            "outside `if TYPE_CHECKING:`"
        ) from exc
    return hints[parameter]


def _message_types(handled_type: Any, where: str) -> list[type[Any]]:
    """The message classes `handled_type` stands for (one per union member)."""
    if handled_type is Any:
        return [MessageProtocol]
    if typing.get_origin(handled_type) in _UNION_TYPES:
        return [t for arg in typing.get_args(handled_type) for t in _message_types(arg, where)]
    if not isinstance(handled_type, type):
        raise InvalidHandlerError(
            f"{where}: {handled_type!r} is not a message type (a class implementing "
            "get_message_id() and get_message_time(), or a union of such classes)"
        )
    try:
        is_message = issubclass(handled_type, MessageProtocol)
    except TypeError:
        is_message = False
    if not is_message:
        raise InvalidHandlerError(
            f"{where}: {handled_type.__name__} is not a message type: it needs "
            "get_message_id() and get_message_time() (see depeche_rs.MessageProtocol)"
        )
    return [handled_type]


class MessageHandlerRegister(Generic[E]):
    """A registry of message handlers, keyed by the type their first parameter names.

        handlers = MessageHandlerRegister()

        @handlers.register
        def handle_message(message: MyMessage):
            ...

        @handlers.register
        def handle_other_message(message: StoredMessage[MyOtherMessage]):
            ...

    Implements `MessageHandlerRegisterProtocol`.
    """

    def __init__(self) -> None:
        self._handlers: dict[type[Any], HandlerDescriptor[E]] = {}
        self._descriptors: list[HandlerDescriptor[E]] = []
        self._cache: dict[type[Any], HandlerDescriptor[E] | None] = {}

    def register(self, handler: H) -> H:
        """Register `handler` for the type its first parameter is annotated with.

        The annotation can be `E`, `StoredMessage[E]` or `SubscriptionMessage[E]`, `E`
        being a message class or a union of them; the handler receives the message in
        that form. A handler with more parameters needs a `CallMiddleware` to supply
        them.

        Raises:
            InvalidHandlerError: no parameter, no annotation, not a message type.
            DuplicateHandlerError: a type already has a handler.

        Returns:
            The handler, unchanged.
        """
        annotation, count = _first_parameter_annotation(handler)
        self.register_manual(handler, annotation, requires_middleware=count > 1)
        return handler

    def register_manual(
        self, handler: H, handled_type: Any, requires_middleware: bool = False
    ) -> H:
        """Register `handler` for `handled_type` (same forms and rules as `register`).

        Set `requires_middleware` if the handler takes more than the message.
        """
        where = _describe(handler)
        origin = typing.get_origin(handled_type)
        if handled_type in (SubscriptionMessage, StoredMessage):
            origin, handled_type = handled_type, Any
        elif origin in (SubscriptionMessage, StoredMessage):
            handled_type = typing.get_args(handled_type)[0]
        message_types = _message_types(handled_type, where)
        self._assert_types_free(message_types, where)
        descriptor: HandlerDescriptor[E] = HandlerDescriptor(
            handler, origin is SubscriptionMessage, origin is StoredMessage, requires_middleware
        )
        for message_type in message_types:
            self._handlers[message_type] = descriptor
        self._descriptors.append(descriptor)
        self._cache.clear()
        return handler

    def assert_not_registered(self, handled_type: Any) -> None:
        """Raise `DuplicateHandlerError` if a type of `handled_type` already has a handler."""
        self._assert_types_free(_message_types(handled_type, repr(handled_type)), "")

    def _assert_types_free(self, message_types: list[type[Any]], where: str) -> None:
        seen: set[type[Any]] = set()
        for message_type in message_types:
            if message_type in self._handlers or message_type in seen:
                existing = self._handlers.get(message_type)
                by = f" by {_describe(existing.handler)}" if existing else ""
                raise DuplicateHandlerError(
                    f"{where + ': ' if where else ''}{message_type.__name__} is already "
                    f"handled{by}; register one handler per message type"
                )
            seen.add(message_type)

    def get_handler(self, message_type: type[E]) -> HandlerDescriptor[E] | None:
        """The handler for `message_type` (the most specific one), or None."""
        try:
            return self._cache[message_type]
        except KeyError:
            found = self._cache[message_type] = self._find(message_type)
            return found

    def _find(self, message_type: type[Any]) -> HandlerDescriptor[E] | None:
        for base in getattr(message_type, "__mro__", (message_type,)):
            if base in self._handlers:
                return self._handlers[base]
        # Protocols and ABCs (virtual subclasses), in registration order.
        for registered, descriptor in self._handlers.items():
            try:
                if issubclass(message_type, registered):
                    return descriptor
            except TypeError:
                continue
        return None

    def get_all_handlers(self) -> Iterator[HandlerDescriptor[E]]:
        """Yield every registered handler once, in registration order."""
        yield from self._descriptors


class MessageHandler(Generic[E]):
    """A class-based handler register: methods marked with `@MessageHandler.register`
    are registered when an instance is created.

        class MyMessageHandler(MessageHandler):
            @MessageHandler.register
            def handle_message(self, message: MyMessage):
                ...

            @MessageHandler.register
            def handle_other_message(self, message: StoredMessage[MyOtherMessage]):
                ...

    Registration errors (see `MessageHandlerRegister.register`) are raised by the
    constructor. Implements `MessageHandlerRegisterProtocol`.
    """

    _register: MessageHandlerRegister[E]

    def __init__(self) -> None:
        self._register = MessageHandlerRegister()
        cls = type(self)
        for name in dir(cls):
            # getattr_static: do not run properties or other descriptors while looking.
            raw = inspect.getattr_static(cls, name, None)
            function = getattr(raw, "__func__", raw)
            if getattr(function, _MARKER, False):
                self._register.register(getattr(self, name))

    @staticmethod
    def register(handler: H) -> H:
        """Mark a method as a handler (see `MessageHandlerRegister.register`)."""
        setattr(handler, _MARKER, True)
        return handler

    def get_handler(self, message_type: type[E]) -> HandlerDescriptor[E] | None:
        """The handler for `message_type`, or None."""
        return self._register.get_handler(message_type)

    def get_all_handlers(self) -> Iterator[HandlerDescriptor[E]]:
        """Yield every registered handler."""
        yield from self._register.get_all_handlers()


class SubscriptionMessageHandler(Generic[E]):
    """Calls the registered handler of each message and applies the error handler.

    Args:
        handler_register: The handlers (`MessageHandlerRegister` or `MessageHandler`).
        error_handler: Decides what a handler error does; defaults to
            `ExitSubscriptionErrorHandler`.
        call_middleware: Wraps each handler call; required when a handler takes more
            than the message.

    Raises:
        InvalidHandlerError: a handler takes more parameters and no middleware is given.
    """

    def __init__(
        self,
        handler_register: MessageHandlerRegisterProtocol[E],
        error_handler: SubscriptionErrorHandler[E] | None = None,
        call_middleware: CallMiddleware[E] | None = None,
    ) -> None:
        if not callable(getattr(handler_register, "get_handler", None)):
            raise TypeError(
                f"handlers must be a MessageHandlerRegister or MessageHandler, got "
                f"{type(handler_register).__name__}"
            )
        self._register = handler_register
        self._error_handler: SubscriptionErrorHandler[E] = (
            error_handler or ExitSubscriptionErrorHandler()
        )
        self._call_middleware = call_middleware
        if call_middleware is None:
            for descriptor in handler_register.get_all_handlers():
                if descriptor.requires_middleware:
                    name = getattr(descriptor.handler, "__qualname__", repr(descriptor.handler))
                    raise InvalidHandlerError(
                        f"handler {name} takes more than the message: pass a call_middleware "
                        "that supplies the other arguments"
                    )

    def handle(self, message: SubscriptionMessage[E]) -> None:
        """Handle `message`; a message without a handler is skipped.

        Raises the handler's error if the error handler says `ErrorAction.EXIT`.
        """
        descriptor = self._register.get_handler(type(message.stored_message.message))
        if descriptor is None:
            return
        try:
            argument = descriptor.adapt_message_type(message)
            if self._call_middleware is not None:
                self._call_middleware.call(descriptor.handler, argument)
            else:
                descriptor.handler(argument)
        except Exception as error:
            action = self._error_handler.handle_error(error=error, message=message)
            if action == ErrorAction.IGNORE:
                return
            if action == ErrorAction.EXIT:
                raise
            raise TypeError(
                f"{type(self._error_handler).__name__}.handle_error returned {action!r}; "
                "it must return ErrorAction.EXIT or ErrorAction.IGNORE"
            ) from error
