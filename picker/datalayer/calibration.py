"""How many prompt characters make one token on an endpoint, learned rather than assumed.

The picker sees characters; the engine's KV cache holds tokens. How many characters a token
covers depends on the tokenizer, the language and the chat template (prose ~4.4, rare words ~3.4,
code or JSON up to ~12 bytes a token), and sizing the prefix index from a fixed 4 halved one
published picker's hit rate when prompts ran ~12 bytes a token. So each endpoint compares what the
picker sent it with what its engine says it prefilled:

    chars per token = (chars routed / requests routed) / (prompt tokens / requests finished)

from the changes between scrapes of `vllm:prompt_tokens_total` and `vllm:request_success_total`.
Comparing per-request means, rather than the picker's characters with the engine's tokens, keeps
the estimate right when several pickers (or other clients) share the engine: each picker's
requests are a sample of the engine's. Changes are summed with exponential decay, so the estimate
follows a shift in the workload within a few hundred scrapes of traffic. Until enough has been seen, the
prior (`PRIOR_CHARS_PER_TOKEN`) stands in.
"""

from __future__ import annotations

from dataclasses import dataclass

PRIOR_CHARS_PER_TOKEN = 4.0  # until calibrated: the reference EPP's assumption
MIN_TOKENS = 4096.0  # engine prompt tokens (decayed sum) before the estimate is trusted
MIN_REQUESTS = 8.0  # requests on both sides (decayed sums) before the estimate is trusted
DECAY = 0.995  # per scrape with new traffic: the window is a few hundred scrapes
LOWEST, HIGHEST = 1.0, 32.0  # a byte-level BPE token spans at least 1 and rarely > 32 characters


@dataclass(slots=True)
class CharsPerToken:
    """Decayed sums of what was routed (picker side) and what was prefilled (engine side)."""

    chars: float = 0.0  # prompt characters the picker routed here (decayed)
    routed: float = 0.0  # requests the picker routed here (decayed)
    tokens: float = 0.0  # engine prompt-token counter increase (decayed)
    finished: float = 0.0  # engine finished-request counter increase (decayed)
    _pending_chars: int = 0  # routed since the last engine sample
    _pending_routed: int = 0
    _last_tokens: float | None = None  # the engine's counters at the last sample
    _last_finished: float | None = None

    def routed_request(self, chars: int) -> None:
        self._pending_chars += chars
        self._pending_routed += 1

    def unrouted_request(self, chars: int) -> None:
        """A request counted by `routed_request` went to another endpoint after all."""
        self._pending_chars -= chars
        self._pending_routed -= 1

    def engine_counters(self, prompt_tokens: float | None, finished: float | None) -> None:
        """Fold in a scrape's counters (None: the engine does not export them)."""
        if prompt_tokens is None:
            return
        last_tokens, last_finished = self._last_tokens, self._last_finished
        self._last_tokens, self._last_finished = prompt_tokens, finished
        if last_tokens is None or prompt_tokens < last_tokens:
            self._take_pending()  # first sample, or the engine restarted: no increase to compare
            return
        d_tokens = prompt_tokens - last_tokens
        d_finished = None
        if finished is not None and last_finished is not None and finished >= last_finished:
            d_finished = finished - last_finished
        chars, routed = self._take_pending()
        if d_tokens == 0 and routed == 0 and not d_finished:
            return  # idle: keep the window from decaying away (a scrape that saw only requests
            # finish is not idle: dropping those undercounted finishes 2-4x whenever a decode
            # outlasts a scrape interval)
        self.chars = self.chars * DECAY + chars
        self.routed = self.routed * DECAY + routed
        self.tokens = self.tokens * DECAY + d_tokens
        # Without a request counter the picker is taken to be the engine's only client.
        self.finished = self.finished * DECAY + (routed if d_finished is None else d_finished)

    @property
    def calibrated(self) -> bool:
        return (
            self.tokens >= MIN_TOKENS
            and self.routed >= MIN_REQUESTS
            and self.finished >= MIN_REQUESTS
            and self.chars > 0
        )

    @property
    def value(self) -> float:
        """Characters per token: measured once calibrated, the prior before."""
        if not self.calibrated:
            return PRIOR_CHARS_PER_TOKEN
        measured = (self.chars / self.routed) / (self.tokens / self.finished)
        return min(HIGHEST, max(LOWEST, measured))

    def _take_pending(self) -> tuple[int, int]:
        taken = self._pending_chars, self._pending_routed
        self._pending_chars = self._pending_routed = 0
        return taken
