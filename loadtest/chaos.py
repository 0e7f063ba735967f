"""`python -m loadtest chaos`: fault scenarios against Envoy + picker + simulated replicas, under load.

Steady closed-loop chat traffic (shared prompt prefixes) runs through the real Envoy with the
shipped `envoy/envoy.yaml` while faults are injected one phase after another:

    baseline         everything up
    picker-down      picker SIGKILLed: Envoy must fail open to round-robin
    picker-back      picker restarted on its port: routing by the picker (KV-aware) again
    replica-down     one replica SIGKILLed: its in-flight requests fail, new ones must stop going there
    replica-back     that replica restarted on its port: used again
    replica-hung     a replica SIGSTOPped: its metrics stop updating (scrapes time out)
    replica-resumed  SIGCONT
    picker-restart   picker SIGTERMed (graceful) and started again while requests flow

Then the load stops and the picker's in-flight gauges must return to zero. Requests count in the
phase they started in. Each replica is its own simulator process so that one can be killed or
frozen; Envoy names the replica that answered by its address (`x-sim-replica`), since every
one-replica simulator calls its replica "0". Writes `chaos.json` and `chaos.md` to `--out`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

from loadtest.client import Record, SteadyLoad
from loadtest.envoy import Envoy
from loadtest.observe import metric_totals
from loadtest.processes import RestartablePicker, SimProcess, free_port, poll_until
from loadtest.workloads import SharedPrefix
from vllm_sim import REPLICA_HEADER

FAIL_OPEN_STAT = "http.inference.ext_proc.failure_mode_allowed"
RETRY_STAT = "cluster.inference-pool.upstream_rq_retry"
# A dead replica may still get new requests for one scrape interval plus the round trip of the
# first failed request and its probe; this is that round trip's allowance on a busy machine.
DETECTION_SLACK = 0.5
COLLATERAL = "collateral failures (not on a failed replica)"
MAX_LISTED_FAILURES = 100  # in chaos.json, for reading what failed when
PREFIX_TOKENS = 256
QUESTION_TOKENS = 16


@dataclass(frozen=True, slots=True)
class ChaosPlan:
    out: Path
    replicas: int = 3
    phase_seconds: float = 10.0
    concurrency: int = 8
    speed: float = 20.0  # simulated time runs this much faster: short requests, many of them
    max_tokens: int = 16
    groups: int = 6  # distinct shared prompt prefixes
    scrape_interval: float = 0.1  # the picker's metrics.scrape_interval (its default)
    burst: int = 2000  # requests sent at one instant in the last phase
    request_timeout: float = 60.0
    seed: int = 0


@dataclass(slots=True)
class Phase:
    name: str
    start: float
    end: float = 0.0
    fail_open: int = 0  # requests Envoy sent round-robin because the picker did not answer
    retries: int = 0  # attempts Envoy retried, on the picker's next fallback (or round-robin)
    notes: dict[str, float | int | None] = field(default_factory=dict)


def tag_upstream(config: dict[str, Any]) -> None:
    """Envoy sets `x-sim-replica` to the upstream address on every answer, its own 503s too."""
    hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    for host in hcm["route_config"]["virtual_hosts"]:
        host["response_headers_to_add"] = [
            {
                "header": {"key": REPLICA_HEADER, "value": "%UPSTREAM_HOST%"},
                "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
            }
        ]


class Run:
    """The stack, the load and the phase bookkeeping of one chaos run."""

    def __init__(self, plan: ChaosPlan, stack: contextlib.AsyncExitStack, http: httpx.AsyncClient) -> None:
        self.plan, self.stack, self.http = plan, stack, http
        self.t0 = time.monotonic()
        self.phases: list[Phase] = []
        ports = [free_port() for _ in range(plan.replicas)]
        self.replicas = [SimProcess("--port", str(port), "--speed", str(plan.speed)) for port in ports]
        self.addresses = [f"127.0.0.1:{port}" for port in ports]
        self.picker = RestartablePicker(self.addresses, plan.out / "logs", stack)
        self.envoy: Envoy | None = None

    def now(self) -> float:
        return time.monotonic() - self.t0

    async def start(self) -> str:
        await asyncio.to_thread((self.plan.out / "logs").mkdir, parents=True, exist_ok=True)
        for replica in self.replicas:
            self.stack.push_async_callback(replica.stop)
        await asyncio.gather(*(replica.start() for replica in self.replicas))
        await self.picker.start()
        self.envoy = await self.stack.enter_async_context(
            Envoy.start(
                "picker",
                endpoints=self.addresses,
                picker=[self.picker.address],
                workdir=self.plan.out / "logs" / "envoy",
                customize=tag_upstream,
            )
        )
        models = (await self.http.get(f"http://{self.addresses[0]}/v1/models")).json()
        return str(models["data"][0]["id"])

    async def enter(self, name: str) -> Phase:
        now = self.now()
        fail_open, retries = await self._envoy_counters()
        if self.phases:
            last = self.phases[-1]
            last.end, last.fail_open, last.retries = now, fail_open - last.fail_open, retries - last.retries
        phase = Phase(name, now, fail_open=fail_open, retries=retries)  # counters at entry, until closed
        self.phases.append(phase)
        return phase

    async def _envoy_counters(self) -> tuple[int, int]:
        assert self.envoy is not None
        stats = await self.envoy.stats(f"{FAIL_OPEN_STAT}|{RETRY_STAT}")
        return stats.get(FAIL_OPEN_STAT, 0), stats.get(RETRY_STAT, 0)

    async def picker_samples(self) -> dict[str, float]:
        return await metric_totals(self.http, f"http://127.0.0.1:{self.picker.metrics_port}/metrics")

    async def hold(self) -> None:
        await asyncio.sleep(self.plan.phase_seconds)

    async def routing_again(self, within: float) -> bool:
        """Whether the (restarted) picker routes a request within `within` seconds."""

        async def decided() -> bool | None:
            samples = await self.picker_samples()
            return True if samples.get("picker_decisions_total", 0) > 0 else None

        try:
            await poll_until(decided, within=within, what="first picker decision", interval=0.02)
        except TimeoutError:
            return False
        return True

    async def drained(self) -> dict[str, float]:
        """The picker's open streams and in-flight requests once the load has stopped."""

        async def idle() -> dict[str, float] | None:
            samples = await self.picker_samples()
            held = samples.get("picker_inflight_requests", 0) + samples.get("picker_extproc_streams_open", 0)
            return samples if held == 0 else None

        try:
            samples = await poll_until(idle, within=10.0, what="picker drained", interval=0.1)
        except TimeoutError:
            samples = await self.picker_samples()
        keys = ("picker_inflight_requests", "picker_inflight_prompt_tokens", "picker_extproc_streams_open")
        return {key: samples.get(key, 0.0) for key in keys}


def steady_load(plan: ChaosPlan, url: str, model: str, t0: float) -> SteadyLoad:
    """Chat requests over `plan.groups` shared prompt prefixes, at `plan.concurrency`."""
    workload = SharedPrefix(plan.groups, PREFIX_TOKENS, QUESTION_TOKENS, plan.max_tokens)
    return SteadyLoad(
        workload, url, model, concurrency=plan.concurrency, seed=plan.seed, t0=t0,
        request_timeout=plan.request_timeout,
    )  # fmt: skip


async def scenario(run: Run, load: SteadyLoad) -> None:
    """The fault timeline, then the load is told to stop."""
    victim = run.replicas[0]
    await run.enter("baseline")
    await run.hold()

    down = await run.enter("picker-down")
    await run.picker.stop(signal.SIGKILL)
    await run.hold()

    back = await run.enter("picker-back")
    await run.picker.start()
    back.notes["picker ready after (s)"] = run.now() - back.start
    routing = await run.routing_again(within=run.plan.phase_seconds)
    back.notes["routing again after (s)"] = run.now() - back.start if routing else None
    await run.hold()
    down.notes["picker down for (s)"] = back.start - down.start

    killed = await run.enter("replica-down")
    killed.notes["at (s)"] = run.now()  # before the signal: requests from then on may see it dead
    await victim.kill()
    await run.hold()

    revived = await run.enter("replica-back")
    await victim.start()
    revived.notes["at (s)"] = run.now()
    await run.hold()

    hung = await run.enter("replica-hung")
    hung.notes["at (s)"] = run.now()
    victim.signal(signal.SIGSTOP)
    await run.hold()

    resumed = await run.enter("replica-resumed")
    resumed.notes["at (s)"] = run.now()
    victim.signal(signal.SIGCONT)
    await run.hold()

    restart = await run.enter("picker-restart")
    await run.picker.stop(signal.SIGTERM)
    await run.picker.start()
    restart.notes["picker ready after (s)"] = run.now() - restart.start
    await run.hold()

    burst = await run.enter("burst")
    await load.burst(run.plan.burst)
    burst.notes["requests at once"] = run.plan.burst

    await run.enter("drain")
    load.stop.set()


@dataclass(slots=True)
class PhaseReport:
    name: str
    seconds: float
    sent: int
    succeeded: int
    failed: dict[str, int]
    success_rate: float | None
    fail_open: int
    retries: int
    affinity: float | None  # share of requests on their prefix group's usual replica
    served: dict[str, int]
    notes: dict[str, float | int | None]


def affinity(records: Sequence[Record]) -> float | None:
    """Share of successful requests served by the replica that served most of their group."""
    by_group: dict[int, Counter[str]] = {}
    for record in records:
        if record.error is None and record.replica:
            by_group.setdefault(record.group, Counter())[record.replica] += 1
    total = sum(sum(c.values()) for c in by_group.values())
    return sum(c.most_common(1)[0][1] for c in by_group.values()) / total if total else None


def phase_report(phase: Phase, records: Sequence[Record]) -> PhaseReport:
    mine = [r for r in records if phase.start <= r.started < phase.end]
    failed = Counter(r.error for r in mine if r.error)
    ok = len(mine) - sum(failed.values())
    return PhaseReport(
        name=phase.name,
        seconds=round(phase.end - phase.start, 3),
        sent=len(mine),
        succeeded=ok,
        failed=dict(failed),
        success_rate=ok / len(mine) if mine else None,
        fail_open=phase.fail_open,
        retries=phase.retries,
        affinity=affinity(mine),
        served=dict(Counter(r.replica or "-" for r in mine)),
        notes=phase.notes,
    )


def replica_findings(plan: ChaosPlan, run: Run, records: Sequence[Record]) -> dict[str, float | int | None]:
    """How the killed, revived, frozen and resumed replica was treated, and which failures were
    not explained by the faults (collateral)."""
    victim = run.addresses[0]
    at = {p.name: p for p in run.phases}
    killed, back, hung, resumed = (
        at[n] for n in ("replica-down", "replica-back", "replica-hung", "replica-resumed")
    )
    kill_at, hung_at = float(killed.notes["at (s)"] or 0), float(hung.notes["at (s)"] or 0)
    detection = kill_at + plan.scrape_interval + DETECTION_SLACK

    def last_offset(rows: list[Record], since: float) -> float | None:
        return round(max(r.started - since for r in rows), 3) if rows else None

    def first_offset(rows: list[Record], since: float) -> float | None:
        return round(min(r.started - since for r in rows), 3) if rows else None

    in_flight = [r for r in records if r.started < kill_at <= r.ended and r.replica == victim]
    new = [r for r in records if kill_at <= r.started < killed.end]
    to_dead = [r for r in new if r.replica == victim]
    to_hung = [r for r in records if hung_at <= r.started < hung.end and r.replica == victim]
    explained = {id(r) for r in in_flight} | {id(r) for r in to_dead if r.started <= detection}
    outage = at["picker-down"]
    collateral = [
        r
        for r in records
        if r.error and id(r) not in explained and not outage.start <= r.started < outage.end
    ]
    served_again = [r for r in records if r.started >= back.start and r.error is None and r.replica == victim]
    resumed_ok = [
        r for r in records if r.started >= resumed.start and r.error is None and r.replica == victim
    ]
    return {
        "killed: requests in flight on it": len(in_flight),
        "killed: of those in flight, failed": sum(1 for r in in_flight if r.error),
        "killed: requests started after the kill that failed": sum(1 for r in new if r.error),
        "killed: attempts Envoy retried on a fallback meanwhile": killed.retries,
        "killed: new requests routed to it": len(to_dead),
        "killed: of those new, failed": sum(1 for r in to_dead if r.error),
        "killed: last new request routed to it after (s)": last_offset(to_dead, kill_at),
        "revived: first served after (s)": first_offset(served_again, float(back.notes["at (s)"] or 0)),
        "hung: new requests routed to it": len(to_hung),
        "hung: last new request routed to it after (s)": last_offset(to_hung, hung_at),
        "hung: of those failed": sum(1 for r in to_hung if r.error),
        "resumed: first served after (s)": first_offset(resumed_ok, float(resumed.notes["at (s)"] or 0)),
        COLLATERAL: len(collateral),
    }


def checks(
    plan: ChaosPlan, phases: Sequence[PhaseReport], replica: dict[str, Any], drained: dict[str, float]
) -> dict[str, bool]:
    """The issue's promises, as pass/fail."""
    by_name = {p.name: p for p in phases}
    last_new = replica["killed: last new request routed to it after (s)"]
    routing_again = by_name["picker-back"].notes.get("routing again after (s)")
    return {
        "picker down: every request succeeds through fail-open": not by_name["picker-down"].failed,
        "picker back: routing by the picker again within one phase": routing_again is not None,
        "replica killed: no new request to it after one scrape interval + one failure": last_new is None
        or last_new <= plan.scrape_interval + DETECTION_SLACK,
        "replica killed: no request that had not reached it failed (fallback retries)": replica[
            "killed: requests started after the kill that failed"
        ]
        == 0,
        "replica killed: used again after it returns": replica["revived: first served after (s)"] is not None,
        "no failure except on a killed replica": replica[COLLATERAL] == 0,
        "picker restarted: no request fails": not by_name["picker-restart"].failed,
        f"a burst of {plan.burst} simultaneous requests: no request fails": not by_name["burst"].failed,
        "picker in-flight gauges back to zero after the load": all(v == 0 for v in drained.values()),
    }


async def run_chaos(plan: ChaosPlan) -> dict[str, Any]:
    """Start the stack, run the timeline under load, and return the report (also written to disk)."""
    async with contextlib.AsyncExitStack() as stack:
        http = await stack.enter_async_context(httpx.AsyncClient(timeout=10.0))
        run = Run(plan, stack, http)
        model = await run.start()
        assert run.envoy is not None
        load = steady_load(plan, run.envoy.url, model, run.t0)
        traffic = asyncio.create_task(load.run())
        try:
            await scenario(run, load)
            await traffic
        finally:
            load.stop.set()
            await asyncio.gather(traffic, return_exceptions=True)
        await run.enter("end")
        drained = await run.drained()
    phases = [phase_report(p, load.records) for p in run.phases[:-2]]  # not drain / end
    replica = replica_findings(plan, run, load.records)
    report = {
        "plan": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(plan).items()},
        "phases": [asdict(p) for p in phases],
        "replica": replica,
        "picker after the load": drained,
        "failures": [asdict(r) for r in load.records if r.error][:MAX_LISTED_FAILURES],
        "checks": checks(plan, phases, replica, drained),
    }
    await asyncio.to_thread(write_report, report, plan.out)
    return report


def write_report(report: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "chaos.json").write_text(json.dumps(report, indent=2))
    (out / "chaos.md").write_text(markdown(report))


def markdown(report: dict[str, Any]) -> str:
    lines = [
        "# Chaos run",
        "",
        "| phase | s | sent | ok | failed | success | fail-open | retried | affinity | notes |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for p in report["phases"]:
        rate = "-" if p["success_rate"] is None else f"{100 * p['success_rate']:.2f}%"
        aff = "-" if p["affinity"] is None else f"{p['affinity']:.2f}"
        failed = ", ".join(f"{k} {v}" for k, v in sorted(p["failed"].items())) or "0"
        notes = "; ".join(f"{k} {_fmt(v)}" for k, v in p["notes"].items() if k != "at (s)")
        lines.append(
            f"| {p['name']} | {p['seconds']:.1f} | {p['sent']} | {p['succeeded']} | {failed} | {rate} "
            f"| {p['fail_open']} | {p['retries']} | {aff} | {notes} |"
        )
    lines += ["", "## The replica that was killed, revived, frozen and resumed", ""]
    lines += [f"- {key}: {_fmt(value)}" for key, value in report["replica"].items()]
    lines += ["", "## Picker after the load", ""]
    lines += [f"- {key}: {_fmt(value)}" for key, value in report["picker after the load"].items()]
    lines += ["", "## Checks", ""]
    lines += [f"- [{'x' if ok else ' '}] {name}" for name, ok in report["checks"].items()]
    return "\n".join(lines) + "\n"


def _fmt(value: object) -> str:
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    parser.add_argument("--replicas", type=int, default=3)
    parser.add_argument("--phase-seconds", type=float, default=10.0, help="length of each phase (10)")
    parser.add_argument("--concurrency", type=int, default=8, help="closed-loop client streams (8)")
    parser.add_argument("--speed", type=float, default=20.0, help="simulator clock speed (20)")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--burst", type=int, default=2000, help="requests sent at once at the end (2000)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="output directory (default results/chaos-<time>)")


def main(args: argparse.Namespace, echo: Callable[[str], None] = print) -> int:
    """Run, print the markdown report; exit status 1 when a check failed."""
    plan = ChaosPlan(
        out=args.out or Path("results") / f"chaos-{time.strftime('%Y%m%d-%H%M%S')}",
        replicas=args.replicas,
        phase_seconds=args.phase_seconds,
        concurrency=args.concurrency,
        speed=args.speed,
        max_tokens=args.max_tokens,
        burst=args.burst,
        seed=args.seed,
    )
    if plan.replicas < 2:
        raise SystemExit("error: chaos needs at least 2 replicas (one is killed)")
    report = asyncio.run(run_chaos(plan))
    echo(markdown(report))
    echo(f"Report: {plan.out / 'chaos.md'} (data: {plan.out / 'chaos.json'})")
    return 0 if all(report["checks"].values()) else 1
