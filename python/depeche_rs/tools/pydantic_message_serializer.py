"""depeche-db's module path `tools.pydantic_message_serializer`."""

from ._pydantic_serializer import PydanticMessageSerializer

__all__ = ["PydanticMessageSerializer"]
