"""`python -m loadtest COMMAND [options]`: every harness tool is one subcommand.

Only the chosen command's module is imported, so short-lived children (the load clients) start
without paying for the report's plotting or the benchmarks' protobufs. A command's module
provides `add_arguments(parser, command)` and `main(args)` (an int exit status, or None for 0).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

COMMANDS: dict[str, tuple[str, str]] = {  # command -> (module, one-line help)
    "run": ("loadtest.cli", "run a workload against several routing modes, with a report"),
    "demo": ("loadtest.cli", "direct vs envoy-rr vs picker on a shared-prefix workload"),
    "capacity": ("loadtest.capacity", "capacity at an SLO on a preset workload (rate ladder per mode)"),
    "chaos": ("loadtest.chaos", "fault scenarios under load (kills, freezes, restarts), with a report"),
    "soak": ("loadtest.soak", "steady load for minutes: the picker's memory and descriptors over time"),
    "bench-decision": ("loadtest.bench_decision", "in-process decision latency of the scheduler"),
    "bench-proxy": ("loadtest.bench_proxy", "requests/s through Envoy + picker vs Envoy round-robin"),
    "bench-lean": ("loadtest.bench_lean", "every byte of many streams through a lean-closing picker"),
    "bench-scrape": ("loadtest.bench_scrape", "picker CPU per scrape of a real-size vLLM metrics page"),
    "bench-streams": ("loadtest.bench_streams", "pick latency and picker memory with open streams"),
    "sim-bench": ("loadtest.bench_sim", "streamed tokens per second and CPU cost of the simulator"),
    "envoy": ("loadtest.envoy", "run the real Envoy with a shipped config, in the foreground"),
    "client": ("loadtest.client", "one load-client process (started by `run`; job on stdin)"),
    "proxy-client": ("loadtest.bench_proxy", "one bench-proxy client process (started by bench-proxy)"),
}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m loadtest", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, text) in COMMANDS.items():
        sub = commands.add_parser(name, help=text, description=text)
        if argv[:1] == [name]:
            importlib.import_module(module).add_arguments(sub, name)
    args = parser.parse_args(argv)
    status: int | None = importlib.import_module(COMMANDS[args.command][0]).main(args)
    return status or 0


if __name__ == "__main__":
    sys.exit(main())
