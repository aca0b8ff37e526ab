"""The registry lock: everything that reads and moves a model's aliases (registration, promote,
rollback) runs under it, on one machine (an OS file lock for a sqlite store) or many (a lock kept in
the shared MLflow store itself).
"""

from __future__ import annotations

import contextlib
import os
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import filelock
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from kd_core import tracking
from kd_core.errors import TransientError
from kd_core.provenance import current_user

LOCK_LEASE_S = 600.0  # a registration takes seconds; a lock held ten minutes belongs to a dead process

LOCK_TIMEOUT_S = 900.0  # a waiter outlasts one full lease, then gives up with one line (LockTimeout, exit 75)

LOCK_POLL_S = 0.5


class LockTimeout(TransientError):
    """The lock stayed held past the wait: its holder is still working or its lease has yet to run
    out (a holder cut off by an outage cannot release), so a later attempt succeeds: exit 75, retried."""


def _now_ms() -> int:
    return int(time.time() * 1000)


class _RegistryLock:
    """A lock that every machine sharing the MLflow store sees: the registered model `<name>.lock`.

    MLflow has no compare-and-swap on tags, but creating a registered model is atomic: the name is the
    table's unique key, so of racing creators (through one server or several, on sqlite or PostgreSQL)
    exactly one succeeds and the rest get RESOURCE_ALREADY_EXISTS. The lock's tags say who holds it and
    until when. A lock past its lease belongs to a dead process and is broken by renaming it to
    `<name>.lock.broken.<token>`: that name can be taken once, so two breakers cannot both win, and a
    late breaker cannot break the next holder's lock. Clocks must agree to well within the lease (NTP).
    """

    def __init__(self, client: MlflowClient, name: str, lease_s: float, timeout_s: float) -> None:
        self.client, self.name = client, f"{name}.lock"
        self.lease_s, self.timeout_s = lease_s, timeout_s
        self.token: str | None = None

    def _held(self) -> dict[str, str] | None:
        try:
            rm = self.client.get_registered_model(self.name)
        except MlflowException as exc:
            if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
                return None
            raise
        expires = rm.tags.get("expires_at") or str(rm.creation_timestamp + int(self.lease_s * 1000))
        return {**rm.tags, "expires_at": expires}

    def _take_aside(self, new_name: str, token: str) -> bool:
        """Rename the lock to `new_name` if it is still the one whose token is `token`.

        MLflow has no compare-and-swap: between reading the lock's token and renaming it, the lock
        may have been released and taken by someone else. So rename first (atomic: `new_name` can be
        taken once), then check the token of what was renamed, and hand a lock that was not the
        expected one straight back. The remaining window — a third process creating `<name>.lock`
        between those two calls, so the hand-back fails — needs a holder that overran its lease
        (10 min) to meet two other processes within one round trip; it is documented, not closed.
        """
        try:
            self.client.rename_registered_model(self.name, new_name)
        except MlflowException as exc:
            if exc.error_code not in ("RESOURCE_ALREADY_EXISTS", "RESOURCE_DOES_NOT_EXIST"):
                raise  # else another waiter broke it first, or the holder released it
            return False
        if self.client.get_registered_model(new_name).tags.get("token") == token:
            return True
        with contextlib.suppress(MlflowException):  # not the lock we meant: give it back to its holder
            self.client.rename_registered_model(new_name, self.name)
        return False

    def _break(self, token: str) -> None:
        """Break the expired lock with `token`, never a newer holder's: it stays aside under its token,
        for the record."""
        self._take_aside(f"{self.name}.broken.{token}", token)

    def acquire(self) -> None:
        deadline = time.monotonic() + self.timeout_s
        while True:
            token, now = uuid.uuid4().hex, _now_ms()
            tags = {"token": token, "holder": f"{current_user()} pid {os.getpid()}",
                    "acquired_at": str(now), "expires_at": str(now + int(self.lease_s * 1000))}
            try:
                self.client.create_registered_model(self.name, tags=tags,
                                                    description="kd: registration lock (see kd_core/lock.py)")
                self.token = token
                return
            except MlflowException as exc:
                if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
            held = self._held()
            if held is not None and int(held["expires_at"]) < _now_ms():
                self._break(held.get("token", "unknown"))
                continue
            if time.monotonic() > deadline:
                who = held.get("holder", "an unknown process") if held else "another process"
                raise LockTimeout(f"registry lock {self.name} is held by {who}; gave up after {self.timeout_s:.0f} s")
            time.sleep(LOCK_POLL_S)

    def release(self) -> None:
        """Delete our lock; if it was broken after an overrun lease, leave the new holder's alone."""
        if self.token is None:
            return
        aside = f"{self.name}.released.{self.token}"
        if self._take_aside(aside, self.token):
            with contextlib.suppress(MlflowException):
                self.client.delete_registered_model(aside)


@contextmanager
def registry_lock(uri: str, name: str, lease_s: float = LOCK_LEASE_S,
                  timeout_s: float = LOCK_TIMEOUT_S) -> Iterator[None]:
    """Serialize everything that reads and moves `name`'s aliases: registration, promote, rollback.

    A sqlite store is a file on one machine: an OS file lock (released even if the process dies) in
    the temp dir, named after the store, not beside it where git would see a new untracked file and
    the code fingerprint would change. Any other store (an MLflow server, PostgreSQL, ...) is shared
    by machines: _RegistryLock.
    """
    if uri.startswith("sqlite:///"):
        path = tracking.sqlite_lock_path(uri, name)
        try:
            with filelock.FileLock(path, timeout=timeout_s):
                yield
        except filelock.Timeout:
            raise LockTimeout(f"{path}: another registration has held the lock for {timeout_s:.0f} s") from None
        return
    lock = _RegistryLock(tracking.mlflow_client(uri), name, lease_s, timeout_s)
    lock.acquire()
    try:
        yield
    finally:
        lock.release()
