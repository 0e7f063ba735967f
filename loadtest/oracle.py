"""The oracle router: the load client routes each request itself, knowing every replica's prefix
cache and queue exactly (the simulator's `POST /sim/cache_probe`), as no real router can.

It is the bound a report compares picker against (hit rate as a share of the oracle's, capacity
beside it): the best a router deciding one request at a time can know, not an offline optimum
(a router that plans where groups live before they arrive could keep more of them cached).

Rule: among the replicas whose estimated time to first token still meets the SLO, the one with
the longest cache hit (ties: the prompt's home, then the lower estimate); when none meets it, the
lowest estimate; without an SLO, the lowest estimate. The home is a hash of the prompt's leading
tokens: a prefix cached nowhere (new, or evicted everywhere) goes back to the same replica instead
of wherever the queue is shortest, so a group is not copied over the pool, evicting the others.

Per request it costs one `/tokenize` and one probe per replica, the tokens sent as ids so the
simulator tokenizes the prompt once more, not once per replica. Two requests probed at the same
instant see the same state (what was routed but has not arrived yet is not counted): at the
rates a 2-core machine drives that is rarely the case.
"""

from __future__ import annotations

import asyncio
from array import array
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson
import xxhash

PROBE_PATH = "/sim/cache_probe"
# Leading prompt tokens that name a prompt's home replica: past any chat template, and past the
# Mooncake trace's first 512-token block, which every record shares (with 256, every trace prompt
# had the same home and a tie on that block sent 1,448 of 2,000 requests to one replica).
HOME_TOKENS = 1024


@dataclass(frozen=True, slots=True)
class Probe:
    """One replica's answer for one prompt."""

    cached_tokens: int
    estimated_ttft_ms: float


def choose(probes: Sequence[Probe], slo_ttft_ms: float | None, home: int | None = None) -> int:
    """The index of the replica the oracle sends the request to (see the module's docstring)."""
    indexes = range(len(probes))
    within = [] if slo_ttft_ms is None else [i for i in indexes if probes[i].estimated_ttft_ms <= slo_ttft_ms]
    if within:
        return max(within, key=lambda i: (probes[i].cached_tokens, i == home, -probes[i].estimated_ttft_ms))
    return min(indexes, key=lambda i: (probes[i].estimated_ttft_ms, -probes[i].cached_tokens))


class OracleRouter:
    """Picks a base URL among `replicas` for each request body (chat or completion)."""

    def __init__(
        self, http: aiohttp.ClientSession, replicas: Sequence[str], slo_ttft_ms: float | None
    ) -> None:
        self.http = http
        self.replicas = list(replicas)
        self.slo_ttft_ms = slo_ttft_ms

    async def pick(self, body: dict[str, Any]) -> str:
        prompt = {"model": body["model"]} | {k: body[k] for k in ("messages", "prompt") if k in body}
        tokens = await self._post(self.replicas[0] + "/tokenize", prompt)
        ids = {"model": body["model"], "prompt": tokens["tokens"]}
        answers = await asyncio.gather(*(self._post(url + PROBE_PATH, ids) for url in self.replicas))
        probes = [Probe(a["cached_tokens"], a["estimated_ttft_ms"]) for a in answers]
        lead = array("I", tokens["tokens"][:HOME_TOKENS]).tobytes()
        home = xxhash.xxh3_64_intdigest(lead) % len(self.replicas)
        return self.replicas[choose(probes, self.slo_ttft_ms, home)]

    async def _post(self, url: str, doc: dict[str, Any]) -> dict[str, Any]:
        async with self.http.post(
            url, data=orjson.dumps(doc), headers={"content-type": "application/json"}
        ) as r:
            r.raise_for_status()
            answer: dict[str, Any] = orjson.loads(await r.read())
            return answer
