"""One endpoint's prefill queue: the prompt tokens a new request's first token waits behind.

A request's time to first token is the prefill queued ahead of it on its replica plus its own,
and request counts weigh a 100k-token prompt like a 1k-token one. So each endpoint keeps the
requests the picker routed to it with their uncached prompt tokens until the engine is past
their prefill. vLLM prefills in arrival order (FCFS) and counts every first token
(`vllm:time_to_first_token_seconds_count`), so a request routed now gets its first token with
the count's "ticket": the count at the last scrape, plus the requests waiting then, plus those
this picker routed there since, plus one. It leaves the queue once a scrape shows the count
there. Tickets come from the engine's own totals, so other pickers' and clients' requests move
the count without draining this picker's queue early, and a missed scrape costs nothing. An
exchange known to be over leaves at once; anything older than `MAX_AGE` too (an engine that does
not count first tokens, a request the engine dropped).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Protocol

# A request still awaiting its first token after this long is assumed past its prefill.
MAX_AGE = 30.0


class Queued(Protocol):
    routed_at: float
    prefill: int  # uncached prompt tokens; 0 once past its prefill
    ticket: float  # the engine's first-token count at which it is past its prefill


@dataclass(slots=True)
class PrefillQueue:
    entries: deque[Queued] = field(default_factory=deque)  # routing order
    tokens: int = 0  # the sum of their `prefill`
    counted: float = -math.inf  # the engine's first-token count at the last scrape

    def ticket(self, waiting: float, routed_since: int) -> float:
        """The count at which a request routed now is past its prefill, with `waiting` requests
        queued at the last scrape and `routed_since` sent there since (inf: nothing counted)."""
        return self.counted + waiting + routed_since + 1 if self.counted >= 0 else math.inf

    def add(self, entry: Queued) -> None:
        self.forget(entry.routed_at - MAX_AGE)
        if entry.prefill:  # a request the endpoint holds whole adds no wait
            self.entries.append(entry)
            self.tokens += entry.prefill

    def done(self, entry: Queued) -> None:
        """`entry` is past its prefill, or will never have one here (its exchange ended, it was
        served elsewhere): it no longer counts, and leaves once no live entry is ahead of it."""
        self.tokens -= entry.prefill
        entry.prefill = 0
        entries = self.entries
        while entries and not entries[0].prefill:
            entries.popleft()

    def first_tokens(self, count: float | None) -> None:
        """A scrape: the engine has counted `count` first tokens (None: it does not count them).
        Entries whose ticket it reached leave; a count that went back (a restarted engine)
        empties the queue."""
        if count is None:
            self.counted = -math.inf
            return
        entries = self.entries
        if count < self.counted:
            self.forget(math.inf)
        elif self.counted < 0:  # the first count seen: those routed before it queue from here
            for position, entry in enumerate(entries, start=1):
                entry.ticket = count + position
        self.counted = count
        while entries and entries[0].ticket <= count:
            self.done(entries[0])

    def forget(self, before: float) -> None:
        """Entries routed before `before` leave."""
        entries = self.entries
        while entries and entries[0].routed_at < before:
            self.done(entries[0])
