"""Application code that the CLI tests name as `module:attr` (`tests.test_cli_app:...`).

No tests here: the `depeche-rs project` subprocesses import this module from the
repository root, as they would import an application's partitioner or serializer.
"""

from __future__ import annotations

import os
import time
from typing import Any

from depeche_rs import StoredMessage
from depeche_rs.tools import PydanticMessageSerializer

from ._models import AnyEvent

serializer = PydanticMessageSerializer(AnyEvent)


class SlowPartitioner:
    """Partition by account (raw JSON messages), 1 ms per message: catch-up takes a while."""

    def get_partition(self, message: StoredMessage[Any]) -> int:
        time.sleep(0.001)
        return int(message.message["account"]) % 3


class StuckPartitioner:
    """A batch that never finishes on its own (30 s per message)."""

    def get_partition(self, message: StoredMessage[Any]) -> int:
        time.sleep(30)
        return 0


class AccountPartitioner:
    """Partition by account, on deserialized pydantic messages (needs `serializer`)."""

    def get_partition(self, message: StoredMessage[Any]) -> int:
        return int(message.message.account) % 3


class GatedPartitioner:
    """Partition 0, waiting while the file named by `$DEPECHE_RS_TEST_GATE` exists: the
    test holds a batch open (its transaction running) for as long as it needs."""

    def get_partition(self, message: StoredMessage[Any]) -> int:
        gate = os.environ["DEPECHE_RS_TEST_GATE"]
        while os.path.exists(gate):
            time.sleep(0.01)
        return 0


class PickyPartitioner:
    """Partition by account (raw JSON messages); raises on account 13, as a partitioner
    meeting data it was not written for would."""

    def get_partition(self, message: StoredMessage[Any]) -> int:
        account = int(message.message["account"])
        if account == 13:
            raise ValueError("account 13 is not supported")
        return account % 3
