"""`python -m vllm_sim`: N simulated vLLM replicas on ports P..P+N-1 in one asyncio process.

Prints `replica I ready on HOST:PORT profile=NAME` per replica once it listens (the launcher and
scripts wait for these lines) and stops cleanly on SIGINT or SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import signal
from pathlib import Path

from vllm_sim.kv_events import ENCODINGS
from vllm_sim.profiles import ALIASES, PROFILES, Profile, get_profile
from vllm_sim.server import KVEventsConfig, SimConfig, run_replicas
from vllm_sim.tokenizer import DEFAULT_CHAT_TEMPLATE, DEFAULT_TOKENIZER

READY_FORMAT = "replica {index} ready on {address} profile={profile}"


def parse_args(argv: list[str] | tuple[str, ...] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m vllm_sim", description=__doc__)
    parser.add_argument("--replicas", type=int, help="default: 1, or one per --profiles entry")
    parser.add_argument("--port", type=int, default=8000, help="first port (0: a free port each)")
    parser.add_argument("--host", default="127.0.0.1")
    names = [*PROFILES, *ALIASES]
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--profile", choices=names, default="h100-8b")
    which.add_argument("--profiles", help="comma-separated, one per replica (e.g. fast,fast,slow)")
    parser.add_argument("--speed", type=float, default=1.0, help="simulated seconds per second")
    parser.add_argument(
        "--model", "--served-model-name", dest="model", help="served model name (default: the profile's)"
    )
    parser.add_argument("--lora", default="", help="comma-separated LoRA adapter names")
    parser.add_argument(
        "--lora-modules", nargs="+", default=[], type=_lora_module, metavar="NAME=PATH",
        help="vLLM's spelling: adapters as name=path or JSON {\"name\": ..., \"path\": ...}",
    )  # fmt: skip
    parser.add_argument("--max-loras", type=int, default=1, help="adapters that may share one batch")
    parser.add_argument("--max-lora-rank", type=int, help="accepted for vLLM compatibility; ignored")
    parser.add_argument("--num-gpu-blocks", type=int, help="shrink or grow the KV cache")
    parser.add_argument("--max-num-seqs", type=int, help="override the batch size limit")
    parser.add_argument("--default-max-tokens", type=int, default=256)
    parser.add_argument(
        "--tokenizer", type=Path, default=DEFAULT_TOKENIZER,
        help="a Hugging Face tokenizer.json (default: the small BPE tokenizer the project ships)",
    )  # fmt: skip
    parser.add_argument(
        "--chat-template", type=Path, default=DEFAULT_CHAT_TEMPLATE, help="a jinja2 chat template file"
    )
    parser.add_argument("--no-prefix-caching", action="store_true")
    parser.add_argument(
        "--kv-events-port", type=int, default=0,
        help="publish KV-cache events (ZMQ PUB, vLLM's format) on this port, replica i on port+i; 0: off",
    )  # fmt: skip
    parser.add_argument(
        "--kv-events-replay-port", type=int, default=0,
        help="ZMQ ROUTER replay socket for missed event batches, replica i on port+i; 0: none",
    )  # fmt: skip
    parser.add_argument(
        "--kv-events-encoding", choices=ENCODINGS, default="array",
        help="array: positional arrays (vLLM before its msgpack maps); map: maps tagged by type",
    )  # fmt: skip
    parser.add_argument("--kv-events-topic", default="", help="the topic frame of every message")
    args = parser.parse_args(argv)
    if args.profiles:
        args.profiles = args.profiles.split(",")
        unknown = [name for name in args.profiles if name not in names]
        if unknown:
            parser.error(f"unknown profiles {unknown} (choose from {', '.join(names)})")
    else:
        args.profiles = [args.profile] * (args.replicas or 1)
    args.replicas = args.replicas or len(args.profiles)
    args.lora_adapters = tuple(dict.fromkeys([*filter(None, args.lora.split(",")), *args.lora_modules]))
    for path in (args.tokenizer, args.chat_template):
        if not path.is_file():
            parser.error(f"no such file: {path}")
    if len(args.profiles) != args.replicas:
        parser.error(f"--profiles names {len(args.profiles)} profiles for {args.replicas} replicas")
    return args


def _lora_module(text: str) -> str:
    """The adapter name of one `--lora-modules` item (the simulator loads no weights)."""
    if text.startswith("{"):
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as exc:
            raise argparse.ArgumentTypeError(f"invalid LoRA module JSON {text!r}: {exc}") from None
        name = doc.get("name") if isinstance(doc, dict) else None
    else:
        name, sep, path = text.partition("=")
        if not sep or not path:
            raise argparse.ArgumentTypeError(f"expected name=path, got {text!r}")
    if not isinstance(name, str) or not name:
        raise argparse.ArgumentTypeError(f"LoRA module {text!r} has no name")
    return name


def profiles_from_args(args: argparse.Namespace) -> list[Profile]:
    """The replicas' profiles with the capacity overrides applied."""
    chosen = []
    for name in args.profiles:
        profile = get_profile(name)
        if args.num_gpu_blocks is not None:
            tokens = args.num_gpu_blocks * profile.block_size
            profile = dataclasses.replace(
                profile, num_gpu_blocks=args.num_gpu_blocks, max_model_len=min(profile.max_model_len, tokens)
            )
        if args.max_num_seqs is not None:
            profile = dataclasses.replace(profile, max_num_seqs=args.max_num_seqs)
        chosen.append(profile)
    return chosen


def kv_events_from_args(args: argparse.Namespace) -> KVEventsConfig | None:
    if not args.kv_events_port:
        return None
    replay = args.kv_events_replay_port or None
    return KVEventsConfig(args.kv_events_port, replay, args.kv_events_encoding, args.kv_events_topic)


async def serve(args: argparse.Namespace) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    config = SimConfig(
        lora_adapters=args.lora_adapters,
        max_loras=args.max_loras,
        prefix_caching=not args.no_prefix_caching,
        default_max_tokens=args.default_max_tokens,
        tokenizer=args.tokenizer,
        chat_template=args.chat_template,
        kv_events=kv_events_from_args(args),
    )
    async with run_replicas(
        args.replicas,
        port=args.port,
        host=args.host,
        profiles=profiles_from_args(args),
        speed=args.speed,
        model=args.model,
        config=config,
    ) as replicas:
        for replica in replicas:
            line = READY_FORMAT.format(
                index=replica.name, address=replica.address, profile=replica.config.profile.name
            )
            print(line, flush=True)
        await stop.wait()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        import uvloop
    except ImportError:  # uvloop is not built for every platform
        loop_factory = None
    else:
        loop_factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(serve(args))
    return 0
