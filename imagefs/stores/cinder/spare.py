"""The next upload's volume, made and attached ahead (``prepare_volumes``).

Creating and attaching a volume costs Cinder one to two seconds (scheduler, RBD, connection),
so after an upload the next upload's volume is made and attached in the background: paid while
this upload is written instead of when the next one starts. At most one spare exists; it is
hidden like any upload (a crash leaves it to ``cleanup_leftovers``) and removed after
``SPARE_IDLE`` seconds without uploads, and at unmount.
"""

from __future__ import annotations

import logging
import threading
import time

from imagefs.stores.cinder.volumes import Volumes, hidden_name

log = logging.getLogger(__name__)

#: A spare upload volume unused this long is removed (it holds quota and an attachment).
SPARE_IDLE = 60.0

#: (name, volume id, created, attachment id, RBD spec)
SpareVolume = tuple[str, str, float, str, tuple[str, str, str]]


class Spare:
    """The spare of one store; ``lock`` is the store's lock, ``stop`` its closing event."""

    def __init__(self, store_id: str, volumes: Volumes, enabled: bool, lock: threading.Lock,
                 stop: threading.Event) -> None:
        self.store_id = store_id
        self.volumes = volumes
        self.enabled = enabled
        self._lock = lock
        self._stop = stop
        self._spare: SpareVolume | None = None
        self._used = 0.0
        self._preparing = False
        self._ready = threading.Condition(lock)

    def take(self) -> SpareVolume | None:
        """The upload volume made ahead, or None.

        One still being made is waited for: it is further along than a new one would be."""
        deadline = time.monotonic() + self.volumes.wait_budget() / 2
        with self._ready:
            while self._spare is None and self._preparing and time.monotonic() < deadline:
                self._ready.wait(0.1)
            spare, self._spare = self._spare, None
            self._used = time.monotonic()
        return spare

    def prepare(self) -> None:
        """Start making the next upload's volume (created, attached rw) in the background."""
        if not self.enabled:
            return
        with self._lock:
            if self._spare is not None or self._preparing or self._stop.is_set():
                return
            self._preparing = True
        threading.Thread(target=self._make, daemon=True,
                         name=f"cinder-{self.store_id}-spare").start()

    def _make(self) -> None:
        name, vid, aid = hidden_name(), None, None
        try:
            deadline = time.monotonic() + self.volumes.wait_budget()
            vid, created = self.volumes.create(name, 1, deadline)
            aid, spec = self.volumes.attach(vid, "rw", deadline)
            with self._lock:
                if not self._stop.is_set() and self._spare is None:
                    self._spare = (name, vid, created, aid, spec)
                    self._used = time.monotonic()
                    vid = aid = None
        except Exception as e:
            log.info("store %s: could not prepare the next upload volume: %s", self.store_id, e)
        finally:
            try:
                self.volumes.discard(vid, aid)  # not kept (failed, or the store is closing)
            finally:
                with self._ready:
                    self._preparing = False
                    self._ready.notify_all()

    def wait_made(self, timeout: float) -> None:
        """At close: let a spare being made finish (then ``drop`` removes it)."""
        with self._ready:
            deadline = time.monotonic() + timeout
            while self._preparing and time.monotonic() < deadline:
                self._ready.wait(0.1)

    def drop(self, idle: float = 0.0) -> None:
        """Remove the spare volume (only if unused for ``idle`` seconds)."""
        with self._lock:
            spare = self._spare
            if spare is None or time.monotonic() - self._used < idle:
                return
            self._spare = None
        self.volumes.discard(spare[1], spare[3])
