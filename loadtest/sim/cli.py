"""`python -m loadtest.sim`: run N simulated vLLM replicas in one process until SIGTERM/SIGINT.

Prints one JSON line, `{"addresses": ["127.0.0.1:PORT", ...]}`, once every replica listens.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import signal
import sys

import orjson

from loadtest.sim.profiles import PROFILES
from loadtest.sim.server import Replica, SimConfig


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m loadtest.sim", description=__doc__)
    parser.add_argument("--replicas", type=int, default=1)
    parser.add_argument("--profile", choices=sorted(PROFILES), default="h100-8b")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="first port, the others follow (0: free ports)")
    parser.add_argument("--model", help="served model name (default: the profile's)")
    parser.add_argument("--lora", default="", help="comma-separated LoRA adapter names")
    parser.add_argument("--max-loras", type=int, default=1)
    parser.add_argument("--time-scale", type=float, default=1.0, help="step-time multiplier")
    parser.add_argument("--num-gpu-blocks", type=int, help="override the profile's KV blocks")
    parser.add_argument("--default-max-tokens", type=int, default=256)
    parser.add_argument("--no-prefix-caching", action="store_true")
    return parser.parse_args(argv)


def config_from_args(args: argparse.Namespace) -> SimConfig:
    profile = PROFILES[args.profile]
    if args.num_gpu_blocks is not None:
        max_model_len = min(profile.max_model_len, args.num_gpu_blocks * profile.block_size)
        profile = dataclasses.replace(
            profile, num_gpu_blocks=args.num_gpu_blocks, max_model_len=max_model_len
        )
    return SimConfig(
        profile=profile,
        served_model_name=args.model,
        lora_adapters=tuple(name for name in args.lora.split(",") if name),
        max_loras=args.max_loras,
        time_scale=args.time_scale,
        prefix_caching=not args.no_prefix_caching,
        default_max_tokens=args.default_max_tokens,
    )


async def serve(args: argparse.Namespace) -> None:
    config = config_from_args(args)
    replicas = [Replica(config) for _ in range(args.replicas)]
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        for i, replica in enumerate(replicas):
            await replica.start(args.host, args.port + i if args.port else 0)
        print(orjson.dumps({"addresses": [r.address for r in replicas]}).decode(), flush=True)
        await stop.wait()
    finally:
        await asyncio.gather(*(replica.stop() for replica in replicas))


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


if __name__ == "__main__":
    sys.exit(main())
