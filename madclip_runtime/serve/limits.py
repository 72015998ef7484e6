"""Request-body limits of a serving replica, so slow or stalled clients cannot starve the others.

Ray Serve hands a request to a replica before its body has arrived; the replica reads the body from the
proxy chunk by chunk. Without limits, a client that sends one byte every few seconds holds one of the
replica's request slots for as long as it likes, and a few dozen such clients hold them all. `UploadGate`
bounds that, per replica:

* a body that is complete within half a second (every normal client) needs no upload slot;
* at most `max_uploads` slower bodies are being received at once. A slow body without a slot waits for one,
  unread, up to WAIT_S (then 503 with Retry-After); it takes the slot of the slowest upload that has held its
  slot for GRACE_S (that one gets 408: under a flood the slowest sender is the cheapest to lose). Waiting unread
  keeps a flood of slow senders cheap: no reads, no reconnection churn in the proxy;
* a body whose next chunk does not arrive within `body_timeout_s` gets 408;
* after GRACE_S in its slot, a body arriving slower than `min_rate` bytes/s on average gets 408;
* more than `limit` bytes get 413 (before reading them when Content-Length says so).

The serving deployment (`app.py`) gives each replica request slots for uploads on top of --max-ongoing
(`upload_slots`), so uploads in progress never take the slots of requests being scored.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import AsyncIterator

DEFAULT_MAX_UPLOADS = 16  # bodies received at once per replica
DEFAULT_BODY_TIMEOUT_S = 10.0  # longest wait for the next body chunk
DEFAULT_MIN_UPLOAD_RATE = 4096.0  # bytes/s, averaged from the start of the body, after GRACE_S
FAST_S = 0.5  # a body complete within this never takes an upload slot
GRACE_S = 3.0  # an upload holds its slot at least this long before its rate is judged or it can be evicted
WAIT_S = 5.0  # longest wait, unread, for an upload slot before 503
TICK_S = 0.1  # how often a waiting upload re-checks its rate and whether it was evicted


def upload_slots(max_uploads: int) -> int:
    """Serve request slots reserved per replica for bodies still arriving: the upload slots, plus room for the
    bodies inside their first FAST_S or waiting for a slot (a waiting coroutine costs next to nothing)."""
    return int(max_uploads) + 256


class RequestError(Exception):
    """A per-request failure with its HTTP status (and headers, e.g. Retry-After)."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.headers = headers or {}


@dataclass(eq=False)
class _Upload:
    started: float
    received: int = 0
    evicted: bool = False
    done: asyncio.Event = field(default_factory=asyncio.Event)

    def rate(self, now: float) -> float:
        return self.received / max(now - self.started, 1e-9)


class UploadGate:
    """Bounded, rate-checked body reads for one replica (see the module docstring). Single event loop."""

    def __init__(
        self,
        max_uploads: int = DEFAULT_MAX_UPLOADS,
        body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S,
        min_rate: float = DEFAULT_MIN_UPLOAD_RATE,
    ):
        self.max_uploads = int(max_uploads)
        self.body_timeout_s = float(body_timeout_s)
        self.min_rate = float(min_rate)
        self.active: list[_Upload] = []
        self.stats = {
            "uploads": 0,
            "waited": 0,
            "evicted": 0,
            "refused_busy": 0,
            "timed_out": 0,
            "too_slow": 0,
        }

    def _try_admit(self, upload: _Upload) -> bool:
        """Give `upload` a slot: a free one, else the slowest past its grace (evicted, 408). False: none now."""
        now = time.monotonic()
        if len(self.active) >= self.max_uploads:
            slow = [u for u in self.active if not u.evicted and now - u.started >= GRACE_S]
            if not slow:
                return False
            victim = min(slow, key=lambda u: u.rate(now))
            victim.evicted = True
            self.active.remove(victim)
            self.stats["evicted"] += 1
        upload.started, upload.received = now, 0  # rate and grace count from here
        self.active.append(upload)
        self.stats["uploads"] += 1
        return True

    async def read(self, chunks: AsyncIterator[bytes], limit: int, declared: str | None = None) -> bytes:
        """The whole body from `chunks` (e.g. starlette's `request.stream()`), within the limits; RequestError.

        A body that arrives within FAST_S (any normal client on a working network) never needs an upload slot.
        A body still arriving after FAST_S needs one: a free slot, or the slowest upload's past its grace; while
        none is to be had it waits, unread (so a flood of slow senders costs neither reads nor reconnections),
        for at most WAIT_S, then gets 503 with Retry-After.
        """
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise RequestError(413, f"request body of {declared} bytes is over the limit of {limit} bytes")
        upload = _Upload(started=time.monotonic())
        parts: list[bytes] = []
        total = 0
        iterator = chunks.__aiter__()
        pending: asyncio.Future | None = None
        slotted = False
        waiting_since: float | None = None
        try:
            last = upload.started
            while True:
                if pending is None and waiting_since is None:
                    pending = asyncio.ensure_future(iterator.__anext__())
                if pending is not None:
                    done, _ = await asyncio.wait({pending}, timeout=TICK_S)
                else:
                    done = set()
                    await asyncio.sleep(TICK_S)
                now = time.monotonic()
                if upload.evicted:
                    raise RequestError(
                        408,
                        f"request body too slow ({upload.rate(now):.0f} bytes/s) while all "
                        f"upload slots were needed: dropped",
                    )
                if done:
                    try:
                        chunk = pending.result()
                    except StopAsyncIteration:
                        pending = None
                        break
                    pending = None
                    last = now
                    upload.received += len(chunk)
                    total += len(chunk)
                    if total > limit:
                        raise RequestError(413, f"request body is over the limit of {limit} bytes")
                    parts.append(chunk)
                elif waiting_since is None and now - last > self.body_timeout_s:
                    self.stats["timed_out"] += 1
                    raise RequestError(408, f"no request body data for {self.body_timeout_s:g} s")
                if not slotted and now - upload.started >= FAST_S:
                    if self._try_admit(upload):  # from now on it holds an upload slot
                        slotted, waiting_since, last = True, None, now
                    elif waiting_since is None:
                        waiting_since = now
                        self.stats["waited"] += 1
                    elif now - waiting_since >= WAIT_S:
                        self.stats["refused_busy"] += 1
                        raise RequestError(
                            503,
                            f"{len(self.active)} slow uploads in progress (the limit of this "
                            "replica): retry shortly",
                            {"Retry-After": "1"},
                        )
                if slotted and now - upload.started >= GRACE_S and upload.rate(now) < self.min_rate:
                    self.stats["too_slow"] += 1
                    raise RequestError(
                        408,
                        f"request body arriving at {upload.rate(now):.0f} bytes/s, under "
                        f"the minimum of {self.min_rate:g} bytes/s",
                    )
            return b"".join(parts)
        finally:
            if pending is not None and not pending.done():
                pending.cancel()
            if upload in self.active:
                self.active.remove(upload)
