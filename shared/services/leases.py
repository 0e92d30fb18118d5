"""Leases on running turns: a dead worker strands nothing for long.

A worker that claims a turn takes a lease on it (``turns.lease_owner`` = the attempt's
task id, ``turns.lease_expires_at`` = now + ``TURN_LEASE_SECONDS``). While the turn runs,
one heartbeat per worker process (a daemon thread; a greenlet under the gevent pool)
renews the leases of every turn that process is running, in one UPDATE every
``TURN_LEASE_SECONDS / 4``. A process that dies stops renewing: within the lease its
turns' leases lapse, ``recover_stuck_turns`` (beat, every 10 s) re-sends them, and the
next claim takes them over. A hold is never expired under a live lease.

Renewals check the owner, so a process that lost its turn to a takeover (it stalled past
its lease) cannot extend the new owner's lease; it may still finish the turn first, and
the turn's row lock and status checks keep it ending — and billed — once.
"""

from __future__ import annotations

import logging
import threading
from contextlib import contextmanager
from datetime import timedelta

from sqlalchemy import and_, or_, update

from shared.db import utcnow
from shared.models import Turn, TurnStatus

log = logging.getLogger(__name__)


class LeaseKeeper:
    """The heartbeat of one worker process."""

    def __init__(self, runtime) -> None:
        self._runtime = runtime
        self._lock = threading.Lock()
        self._held: dict[str, str] = {}  # turn id -> owner
        self._thread: threading.Thread | None = None
        self._closed = threading.Event()

    @property
    def seconds(self) -> float:
        return float(self._runtime.settings.turn_lease_seconds)

    @contextmanager
    def holding(self, turn_id: str, owner: str):
        """Renew ``turn_id``'s lease for as long as the block runs."""
        with self._lock:
            self._held[turn_id] = owner
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._beat, name="turn-lease-heartbeat", daemon=True)
                self._thread.start()
        try:
            yield
        finally:
            with self._lock:
                if self._held.get(turn_id) == owner:
                    del self._held[turn_id]

    def renew_now(self) -> int:
        """One heartbeat: extend every held lease. Returns how many rows it renewed."""
        with self._lock:
            held = dict(self._held)
        if not held:
            return 0
        until = utcnow() + timedelta(seconds=self.seconds)
        with self._runtime.db.session() as session:
            renewed = session.execute(
                update(Turn)
                .where(
                    Turn.status == TurnStatus.RUNNING,
                    or_(
                        *(
                            and_(Turn.id == turn_id, Turn.lease_owner == owner)
                            for turn_id, owner in held.items()
                        )
                    ),
                )
                .values(lease_expires_at=until)
                .execution_options(synchronize_session=False)
            ).rowcount
            session.commit()
        return renewed

    def close(self) -> None:
        self._closed.set()

    def _beat(self) -> None:
        while not self._closed.wait(self.seconds / 4):
            try:
                self.renew_now()
            except Exception:
                # A missed beat is not fatal: the lease has three more before it lapses.
                log.warning("lease heartbeat failed", exc_info=True)
