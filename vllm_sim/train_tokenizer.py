"""Train the project's small byte-level BPE tokenizer (`vllm_sim/data/tokenizer.json`).

    python -m vllm_sim.train_tokenizer [--out vllm_sim/data/tokenizer.json]

No model hub is reachable here, so the simulator ships a tokenizer the project made itself: the
same kind as Llama 3's (byte-level BPE, GPT-2 style pre-tokenization, Llama 3's special tokens,
BOS added to plain prompts) trained on prose in `vllm_sim.text`'s made-up language. Corpus and
training are deterministic, so running this again reproduces the committed file.
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from vllm_sim.text import prose

DEFAULT_OUT = Path(__file__).parent / "data" / "tokenizer.json"
BOS, EOS = "<|begin_of_text|>", "<|end_of_text|>"
SPECIAL_TOKENS = (BOS, EOS, "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
VOCAB_SIZE = 8192
CORPUS_SEED = 7
CORPUS_LINES = 20_000  # ~2 MB of prose, 40 words a line
NUMBERS = 2_000  # lines of digits, so numbers get their own merges


def corpus() -> list[str]:
    rng = random.Random(CORPUS_SEED)
    lines = [prose(rng, 40) for _ in range(CORPUS_LINES)]
    lines += [
        " ".join(str(rng.randrange(10 ** rng.randint(1, 6))) for _ in range(12)) for _ in range(NUMBERS)
    ]
    return lines


def train() -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus(), trainer=trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, tokenizer.token_to_id(BOS))]
    )
    return tokenizer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vllm_sim.train_tokenizer", description=__doc__)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    train().save(str(args.out), pretty=False)
    print(f"wrote {args.out} ({args.out.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
