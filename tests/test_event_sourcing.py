"""depeche_rs.event_sourcing: aggregates saved to and loaded from their streams."""

from __future__ import annotations

import uuid

import pytest

import depeche_rs
from depeche_rs.event_sourcing import (
    EventSourcedAggregateRoot,
    EventStoreRepo,
    InMemoryCache,
    NotFound,
)

from ._models import AccountCreated, AnyEvent, Deposited


class Account(EventSourcedAggregateRoot[int, AnyEvent]):
    def __init__(self) -> None:
        super().__init__()
        self.id: int | None = None
        self.balance = 0

    def get_id(self) -> int:
        return self.id  # type: ignore[return-value]

    def _apply(self, event: AnyEvent) -> None:
        if isinstance(event, AccountCreated):
            self.id = event.account
        else:
            self.balance += event.amount

    def _check_invariants(self) -> None:
        if self.balance < 0:
            raise ValueError("negative balance")


@pytest.mark.parametrize("cache", [None, InMemoryCache(cache_every_x_version=1)])
def test_save_load_and_conflicts(store: depeche_rs.MessageStore[AnyEvent], cache: object) -> None:
    repo: EventStoreRepo[AnyEvent, Account, int] = EventStoreRepo(
        store,
        Account,
        "account",
        cache=cache,  # type: ignore[arg-type]
    )
    account = Account()
    account.apply(AccountCreated(account=7))
    account.apply(Deposited(account=7, amount=5))
    assert repo.add(account).version == 2
    loaded = repo.get(7)
    assert (loaded.balance, loaded._version) == (5, 2)
    assert loaded == account
    loaded.apply(Deposited(account=7, amount=3))
    assert repo.save(loaded, expected_version=2).version == 3
    stale = Account()
    stale.apply(AccountCreated(account=7))
    stale.apply(Deposited(account=7, amount=1))
    stale.apply(Deposited(account=7, amount=1))
    with pytest.raises(depeche_rs.MessageIdMismatchError):
        repo.save(stale, expected_version=2)
    assert repo.get(7).balance == 8
    assert [m.version for m in store.read("account-7")] == [1, 2, 3]
    with pytest.raises(NotFound):
        repo.get(99)
    with pytest.raises(ValueError):
        loaded.apply(Deposited(account=7, amount=-100, event_id=uuid.uuid4()))
