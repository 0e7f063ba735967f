"""Several active pickers behind one Envoy: all serve, and a prefix goes to one replica whichever
picker Envoy asks."""

from __future__ import annotations

from collections import defaultdict

from loadtest.processes import PickerProcess
from tests.e2e.conftest import metric, picker_metrics
from tests.e2e.test_picker_e2e import chat, served_by

PLACEMENT = """
apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: queue-scorer
- type: inflight-load-scorer
- type: prefix-cache-scorer
- type: prefix-placement-scorer
schedulingProfiles:
- name: default
  plugins:
  - {pluginRef: queue-scorer, weight: 2}
  - {pluginRef: inflight-load-scorer, weight: 1}
  - {pluginRef: prefix-cache-scorer, weight: 3}
  - {pluginRef: prefix-placement-scorer, weight: 2}
"""


async def decisions(picker: PickerProcess) -> float:
    samples = await picker_metrics(picker)
    return sum(s.value for s in samples if s.name == "picker_decisions_total")


async def test_two_active_pickers_both_serve_and_send_a_prefix_to_one_replica(
    fake_vllm, picker_server, envoy, client
) -> None:
    replicas = await fake_vllm(4)
    addresses = [r.address for r in replicas]
    # Both ready (start_picker waits for readiness SERVING): no leader, no follower.
    pickers = [await picker_server(addresses, "--config-text", PLACEMENT) for _ in range(2)]
    proxy = await envoy("picker", endpoints=addresses, picker=[p.address for p in pickers])
    groups = [f"System prompt of team {g}: answer in the house style. " * 30 for g in range(8)]
    served: dict[int, set[str]] = defaultdict(set)
    for turn in range(6):
        for g, system in enumerate(groups):
            served[g].add(await served_by(client, proxy.url, chat(system + f"Question {turn} of {g}?")))
    assert all(len(where) == 1 for where in served.values()), served
    assert len(set().union(*served.values())) > 1  # different prefixes are placed apart
    counts = [await decisions(p) for p in pickers]
    assert sum(counts) == 6 * len(groups) and min(counts) > 0, counts
    for picker in pickers:
        assert metric(await picker_metrics(picker), "picker_endpoint_routable", endpoint=addresses[0]) == 1.0
