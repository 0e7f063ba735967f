"""Precise prefix-cache scoring: what the engines report holding, matched on the engine's tokens.

The approximate `prefix-cache-scorer` guesses each replica's cache from the picker's own decisions
on characters; this one (llm-d's `precise-prefix-cache-scorer`) follows every engine's KV events
(`picker.datalayer.kv_events`) and tokenizes each prompt as the engine will, so a match is a block
the engine says it holds. What it costs: the model's tokenizer and chat template run in the
picker for every request (the text between special tokens, such as a shared system prompt, is
remembered), and each engine must publish KV events that every picker can subscribe to. What it
buys: evictions are seen, not modelled; traffic that did not pass this picker (another picker,
another gateway, a restart) is seen; so any number of pickers agree without exchanging anything.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from picker.config import camel
from picker.datalayer.endpoint import Endpoint
from picker.datalayer.kv_events import KVEventSubscriber
from picker.datalayer.pool import EndpointPool
from picker.request import InferenceRequest
from picker.scheduling.interface import ScorerCategory
from picker.scheduling.prefix import KVBlockIndex
from picker.scheduling.scorers import LoadGuard, record_held
from picker.tokenization import BlockHasher, PromptTokenizer

log = logging.getLogger(__name__)


@dataclass(slots=True)
class PrecisePrefixCacheScorer:
    """Share of the prompt's leading blocks each engine reported holding (or was just sent).

    `tokenizer` (a tokenizer.json) and `chat_template` (a jinja file; chat requests need it) are the
    served model's; `hash_algorithm` and `hash_seed` say how the engines name blocks. Each endpoint
    publishes on `tcp://<its host>:<kvEventsPort>` unless `kvEventsEndpoints` maps its address to
    another publisher; its replay socket, if any, is found alike (`kvEventsReplayPort`,
    `kvEventsReplayEndpoints`). A routed request's blocks count as the chosen endpoint's for
    `expectSeconds` (0: off) or until the engine reports them.
    """

    name: ClassVar[str] = "precise-prefix-cache-scorer"
    category: ClassVar[ScorerCategory] = ScorerCategory.AFFINITY
    pool: EndpointPool
    clock: Callable[[], float] = time.monotonic
    tokenizer: str = ""
    chat_template: str = ""
    block_size_tokens: int = 16  # the engines' KV block size
    hash_algorithm: str = "sha256_cbor"  # the engines' --prefix-caching-hash-algo, or xxh3_64 (simulator)
    hash_seed: str = ""  # the engines' PYTHONHASHSEED (required by vLLM's algorithms)
    max_prefix_blocks_to_match: int = 256
    kv_events_port: int = 5557
    kv_events_endpoints: dict[str, str] = field(default_factory=dict)  # endpoint address -> publisher
    kv_events_topic: str = ""  # a topic prefix to subscribe to ("" = all)
    kv_events_replay_port: int = 0  # the engines' replay sockets (vLLM's replay_endpoint); 0: none
    kv_events_replay_endpoints: dict[str, str] = field(default_factory=dict)  # address -> replay socket
    expect_seconds: float = 2.0
    max_load_gap: float = 8.0
    relative_load_gap: float = 0.25
    index: KVBlockIndex = field(init=False, default_factory=KVBlockIndex)
    subscriber: KVEventSubscriber = field(init=False)
    guard: LoadGuard = field(init=False)
    _prompts: PromptTokenizer = field(init=False)
    _hasher: BlockHasher = field(init=False)
    _key: str = field(init=False, default="")  # request.cycle keys: the hashes, and their matches
    _matched_key: str = field(init=False, default="")

    def __post_init__(self) -> None:
        if not self.tokenizer:
            raise ValueError("tokenizer (the served model's tokenizer.json) is required")
        for param in ("block_size_tokens", "max_prefix_blocks_to_match", "kv_events_port"):
            if getattr(self, param) < 1:
                raise ValueError(f"{camel(param)} must be at least 1")
        if self.kv_events_replay_port < 0:
            raise ValueError("kvEventsReplayPort must not be negative")
        for param in ("kv_events_endpoints", "kv_events_replay_endpoints"):
            mapping = getattr(self, param)
            if not isinstance(mapping, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in mapping.items()
            ):
                raise ValueError(f"{camel(param)} must map endpoint addresses to ZMQ addresses")
        if self.expect_seconds < 0:
            raise ValueError("expectSeconds must not be negative")
        paths = [Path(self.tokenizer), *([Path(self.chat_template)] if self.chat_template else [])]
        for path in paths:
            if not path.is_file():
                raise ValueError(f"{path}: no such file")
        try:
            self._prompts = PromptTokenizer(paths[0], paths[1] if len(paths) > 1 else None)
        except Exception as exc:  # the tokenizers library or jinja2 rejecting the file
            raise ValueError(f"cannot load the tokenizer or chat template: {exc}") from None
        self._hasher = BlockHasher(self.hash_algorithm, self.hash_seed)
        self.guard = LoadGuard(self.max_load_gap, self.relative_load_gap)
        self.subscriber = KVEventSubscriber(
            self.pool, self.index, self._publisher, self.kv_events_topic, self._replay_socket
        )
        self.pool.on_removed(self.index.drop_endpoint)
        self._key = f"{self.name}@{id(self)}"
        self._matched_key = self._key + "/matched"

    async def run(self) -> None:
        """Follow the engines' KV events for the picker's lifetime."""
        await self.subscriber.run()

    def score(self, request: InferenceRequest, candidates: Sequence[Endpoint]) -> list[float] | None:
        hashes = self._hashes(request)
        if not hashes:
            return None
        if self.expect_seconds:
            self.index.expire(self.clock())
        matched = request.cycle[self._matched_key] = self.index.match(hashes)
        return self.guard.scores(matched, len(hashes), candidates)

    def on_pick(self, request: InferenceRequest, endpoint: Endpoint) -> None:
        hashes = self._hashes(request)
        if not hashes:
            return
        held = request.cycle.get(self._matched_key, {}).get(endpoint, 0)
        record_held(request, held, len(hashes), self.block_size_tokens)
        if self.expect_seconds:
            self.index.expect(endpoint, hashes, self.clock() + self.expect_seconds)

    def _hashes(self, request: InferenceRequest) -> list[int]:
        """The engine's hashes of the request's leading blocks, computed once per request."""
        hashes: list[int] | None = request.cycle.get(self._key)
        if hashes is None:
            hashes = []
            if request.document is not None:
                block = self.block_size_tokens
                try:
                    ids = self._prompts.prompt_ids(request.document, block * self.max_prefix_blocks_to_match)
                except Exception:  # what the template or tokenizer cannot take: no preference, no failure
                    log.debug("precise prefix: prompt not tokenized", exc_info=True)
                    ids = None
                if ids:
                    lora = request.model if self._adapter(request.model) else ""
                    hashes = self._hasher.hashes(ids, block, lora)
            request.cycle[self._key] = hashes
        return hashes

    def _adapter(self, model: str) -> bool:
        """Whether `model` is a LoRA adapter (its blocks are keyed by its name) on the endpoints
        that list it (`/v1/models`: an adapter names its base model as `parent`)."""
        for endpoint in self.pool.endpoints:
            models = endpoint.models
            if models is not None and model in models:
                return models[model] is not None
        return False

    def _publisher(self, endpoint: Endpoint) -> str:
        return self._socket(endpoint, self.kv_events_endpoints, self.kv_events_port) or ""

    def _replay_socket(self, endpoint: Endpoint) -> str | None:
        return self._socket(endpoint, self.kv_events_replay_endpoints, self.kv_events_replay_port)

    @staticmethod
    def _socket(endpoint: Endpoint, mapping: dict[str, str], port: int) -> str | None:
        """The endpoint's own entry in `mapping`, else its host on `port` (0: none)."""
        mapped = mapping.get(endpoint.address)
        if mapped:
            return mapped
        host = endpoint.address.rsplit(":", 1)[0]
        return f"tcp://{host}:{port}" if port else None
