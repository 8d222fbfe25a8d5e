"""A producer thread for fault tests: keeps a run going for as long as the test needs it.

A queue filled all at once may drain before the fault lands on a fast box, or hold the fault
for minutes on a slow one. The feeder XADDs in chunks and stays at most `ahead` jobs past what
the replicas have answered (read from the reply stream), so the run spans every fault the test
injects, and the backlog a fault catches stays bounded whatever the box's speed. A
`rate_per_s` caps the pace too, for faults that take a fixed time to play out (a redeploy).
"""

from __future__ import annotations

import threading
import time

import orjson
import redis

from sluice.protocol import jobs_key


class Feeder:
    """XADDs `total` jobs named `<prefix>-<n>`, each with `reply_to`, from a thread."""

    def __init__(
        self,
        r: redis.Redis,
        model: str,
        total: int,
        *,
        reply_to: str,
        ahead: int = 400,
        chunk: int = 50,
        prefix: str = "job",
        rate_per_s: float | None = None,
    ) -> None:
        self.r, self.model, self.reply_to = r, model, reply_to
        self.ids = [f"{prefix}-{n}" for n in range(total)]
        self.ahead, self.chunk, self.rate_per_s = ahead, chunk, rate_per_s
        self.sent = 0
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="feeder", daemon=True)

    def answered(self) -> int:
        """Jobs answered so far: pushes ever added to the reply stream. Not XLEN, which stops
        growing once the stream reaches its MAXLEN trim (10,000 by default) and would stall
        the feeder and every wait on progress."""
        try:
            return int(self.r.xinfo_stream(self.reply_to)["entries-added"])
        except redis.ResponseError:  # no reply stream yet: nothing answered
            return 0

    def start(self) -> Feeder:
        self._thread.start()
        return self

    def join(self, timeout_s: float) -> None:
        """Waits for every job to be sent; re-raises what stopped the thread."""
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            self._stop.set()
            raise AssertionError(f"the feeder sent {self.sent} of {len(self.ids)} in time")
        if self._error is not None:
            raise AssertionError("the feeder failed") from self._error

    def stop(self, timeout_s: float = 30.0) -> None:
        """Stops sending: the jobs sent so far are the whole run (`ids` shrinks to them)."""
        self._stop.set()
        self.join(timeout_s)
        del self.ids[self.sent :]

    def _run(self) -> None:
        started = time.monotonic()
        try:
            while self.sent < len(self.ids) and not self._stop.is_set():
                early_s = 0.0 if not self.rate_per_s else self.sent / self.rate_per_s
                if self.sent - self.answered() >= self.ahead or (
                    time.monotonic() - started < early_s
                ):
                    self._stop.wait(0.02)
                    continue
                self._send(self.ids[self.sent : self.sent + self.chunk])
        except BaseException as exc:
            self._error = exc

    def _send(self, ids: list[str]) -> None:
        with self.r.pipeline(transaction=False) as pipe:
            for job_id in ids:
                n = int(job_id.rsplit("-", 1)[1])
                text = f"job text {n} " + "pad " * (n % 40)
                fields = {
                    "id": job_id,
                    "input": orjson.dumps({"text": text}),
                    "reply_to": self.reply_to,
                }
                pipe.xadd(jobs_key(self.model), fields)  # type: ignore[arg-type]
            pipe.execute()
        self.sent += len(ids)
