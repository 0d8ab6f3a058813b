"""Validation of names and wildcards, and the names of the database objects derived from them.

Names end up inside SQL identifiers, so they are restricted to what needs no quoting:
ASCII letters, digits and underscores, not starting with a digit.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from ._exceptions import InvalidNameError, InvalidWildcardError

_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")

# PostgreSQL keeps the first 63 bytes of an identifier (NAMEDATALEN - 1).
MAX_IDENTIFIER_BYTES = 63

# The longest name depeche-db 0.13.1 accepts for each kind: SQLAlchemy refuses to create
# an identifier longer than 63 bytes, so its longest derived name sets the limit. Ours all
# fit within these (the longest are depeche_rs_write_<store>, 56 bytes, and
# depeche_stream_<agg>_cursor, 63). Kinds not listed (subscription names, lock provider
# names) only become advisory lock keys and any length works.
MAX_STORE_NAME_LENGTH = 39  # depeche_msgs_<store>_version_uq, depeche_msgs_<store>_global_seq
MAX_AGGREGATED_STREAM_NAME_LENGTH = 41  # depeche_stream_<agg>_maxpos
MAX_STATE_NAME_LENGTH = 41  # depeche_subscriptions_<name>
MAX_NAME_LENGTHS: dict[str, tuple[int, str]] = {
    "store name": (MAX_STORE_NAME_LENGTH, "depeche_msgs_<store>_version_uq"),
    "aggregated stream name": (MAX_AGGREGATED_STREAM_NAME_LENGTH, "depeche_stream_<name>_maxpos"),
    "subscription state provider name": (MAX_STATE_NAME_LENGTH, "depeche_subscriptions_<name>"),
    "subscription state name": (MAX_STATE_NAME_LENGTH, "depeche_subscriptions_<name>"),
}
MAX_STREAM_LENGTH = 255


def validate_name(name: Any, what: str = "name") -> str:
    """Return `name` if it is a valid name of kind `what`, else raise `InvalidNameError`.

    The kinds in `MAX_NAME_LENGTHS` are limited to what depeche-db accepts for them;
    other kinds (subscription and lock provider names) may be of any length.
    """
    if not isinstance(name, str):
        raise InvalidNameError(f"{what} must be a str, got {type(name).__name__}")
    if not is_name(name):
        raise InvalidNameError(
            f"{what} {name!r} is not a valid identifier: use ASCII letters, digits and "
            "underscores, not starting with a digit (it becomes part of table names)"
        )
    limit = MAX_NAME_LENGTHS.get(what)
    if limit is not None and len(name) > limit[0]:
        raise InvalidNameError(
            f"{what} {name!r} is {len(name)} characters long; use at most {limit[0]}, as "
            f"depeche-db does, so that {limit[1]} fits PostgreSQL's "
            f"{MAX_IDENTIFIER_BYTES}-byte identifier limit"
        )
    return name


def is_name(name: str) -> bool:
    """True if `name` has the form of our names: an ASCII identifier."""
    return bool(_IDENTIFIER.match(name)) and name.isidentifier()


def pg_identifier(name: str) -> str:
    """`name` as PostgreSQL stores it: cut to 63 bytes (names are ASCII).

    Used to refer to depeche-db's objects whose names PostgreSQL truncated, e.g. the
    trigger `depeche_stream_new_msg_<agg>` of a 41-character stream name.
    """
    return name[:MAX_IDENTIFIER_BYTES]


def fits(name: str) -> bool:
    """True if PostgreSQL keeps `name` whole."""
    return len(name.encode()) <= MAX_IDENTIFIER_BYTES


def validate_stream(stream: Any) -> str:
    """Return `stream` if it is a valid stream name, else raise `InvalidNameError`."""
    if not isinstance(stream, str):
        raise InvalidNameError(f"stream name must be a str, got {type(stream).__name__}")
    if not stream:
        raise InvalidNameError("stream name must not be empty")
    if len(stream) > MAX_STREAM_LENGTH:
        raise InvalidNameError(
            f"stream name is {len(stream)} characters long; the column holds at most "
            f"{MAX_STREAM_LENGTH}"
        )
    if "\x00" in stream:
        raise InvalidNameError("stream name must not contain NUL characters")
    return stream


def validate_wildcards(wildcards: Any) -> list[str]:
    """Return the wildcards as a list if they are valid LIKE patterns, else raise."""
    if isinstance(wildcards, str) or not isinstance(wildcards, Sequence):
        raise InvalidWildcardError(
            f"stream_wildcards must be a list of LIKE patterns such as ['account-%'], "
            f"got {wildcards!r}"
        )
    result = list(wildcards)
    if not result:
        raise InvalidWildcardError(
            "stream_wildcards is empty: give at least one LIKE pattern such as 'account-%'"
        )
    for wildcard in result:
        if not isinstance(wildcard, str):
            raise InvalidWildcardError(
                f"stream wildcard {wildcard!r} is a {type(wildcard).__name__}, not a str"
            )
        if not wildcard:
            raise InvalidWildcardError("a stream wildcard must not be the empty string")
        if "\x00" in wildcard:
            raise InvalidWildcardError(f"stream wildcard {wildcard!r} contains a NUL character")
        trailing = len(wildcard) - len(wildcard.rstrip("\\"))
        if trailing % 2 == 1:
            raise InvalidWildcardError(
                f"stream wildcard {wildcard!r} ends with an escape character; "
                "write '\\\\' for a literal backslash"
            )
    return result


# The names of the database objects of a store (`<store>`) or aggregated stream (`<agg>`);
# `_meta` and `_omax` are depeche-db 0.14's per-stream tables (first and highest global
# position per origin stream), kept by our triggers when they exist; `_cursor` is ours.
message_table = "depeche_msgs_{}".format
global_sequence = "depeche_msgs_{}_global_seq".format
store_channel = "depeche_{}_messages".format  # notified when messages are written
meta_table = "depeche_msgs_{}_meta".format
write_function = "depeche_write_message_{}".format  # depeche-db's single-message write
stream_table = "depeche_stream_{}".format
maxpos_table = "depeche_stream_{}_maxpos".format  # per-partition max position
omax_table = "depeche_stream_{}_omax".format
cursor_table = "depeche_stream_{}_cursor".format  # the projector's cursor
stream_channel = "depeche_{}_messages".format  # notified when the stream gets messages
subscription_table = "depeche_subscriptions_{}".format  # a subscription state provider's
