"""The simulator's tokenizer file read with the `tokenizers` library directly: the tests' own ruler
for token counts, independent of the simulator's code."""

from __future__ import annotations

from tokenizers import Tokenizer

from vllm_sim.tokenizer import DEFAULT_TOKENIZER

TOKENIZER = Tokenizer.from_file(str(DEFAULT_TOKENIZER))


def count_tokens(text: str, special: bool = True) -> int:
    """Tokens in `text` (with BOS when `special`, as a /v1/completions prompt gets)."""
    return len(TOKENIZER.encode(text, add_special_tokens=special).ids)


def llama3_chat(*messages: tuple[str, str]) -> str:
    """The prompt a Llama-3-style chat template renders for (role, content) messages."""
    turns = "".join(
        f"<|start_header_id|>{role}<|end_header_id|>\n\n{content.strip()}<|eot_id|>"
        for role, content in messages
    )
    return f"<|begin_of_text|>{turns}<|start_header_id|>assistant<|end_header_id|>\n\n"
