"""Kubernetes discovery against a fake API server that speaks the real list/watch protocol."""

from __future__ import annotations

import pytest
from kube_fake import PODS, POOLS

from picker.discovery import kubernetes
from picker.discovery.kubernetes import (
    Backoff,
    PoolSpec,
    join_host_port,
    kubernetes_source,
    ready_ip,
)


async def test_pool_endpoints_follow_pods(kube, source, start, published):
    kube.put_pool(selector={"app": "vllm"}, ports=(8000,))
    kube.put_pod("a", "10.0.0.1")
    kube.put_pod("b", "10.0.0.2", ready=False)
    kube.put_pod("other", "10.0.0.9", labels={"app": "else"})
    kube.put_pod("pending", None)  # scheduled, no IP yet
    start(source(pool_name="pool"))
    await published.until("10.0.0.1:8000")

    kube.put_pod("b", "10.0.0.2")  # becomes ready
    await published.until("10.0.0.1:8000", "10.0.0.2:8000")
    kube.put_pod("a", "10.0.0.1", ready=False)  # fails readiness
    await published.until("10.0.0.2:8000")
    kube.put_pod("c", "10.0.0.3")  # scaled up
    await published.until("10.0.0.2:8000", "10.0.0.3:8000")
    kube.put_pod("other", "10.0.0.9", labels={"app": "else", "x": "y"})  # not selected: no-op
    kube.put_pod("b", "10.0.0.2", terminating=True)  # being deleted, still Ready
    await published.until("10.0.0.3:8000")
    kube.put_pod("c", "10.0.0.3", labels={"app": "retired"})  # relabelled out of the pool
    await published.until()
    kube.put_pod("d", "10.0.0.4")
    await published.until("10.0.0.4:8000")
    kube.delete(PODS, "d")
    await published.until()

    # Every publish is a change: no repeats for events that left the set as it was.
    assert all(a != b for a, b in zip(published.sets, published.sets[1:], strict=False))
    assert len(kube.lists(PODS)) == 1  # all of it through one watch


async def test_pool_edits_take_effect_live(kube, source, start, published):
    kube.put_pool(selector={"app": "vllm"}, ports=(8000,))
    kube.put_pod("a", "10.0.0.1")
    kube.put_pod("z", "10.0.0.26", labels={"app": "vllm-next"})
    start(source(pool_name="pool"))
    await published.until("10.0.0.1:8000")

    kube.put_pool(selector={"app": "vllm"}, ports=(8000, 8001))
    await published.until("10.0.0.1:8000", "10.0.0.1:8001")
    assert len(kube.lists(PODS)) == 1  # a port change needs no new Pod list

    kube.put_pool(selector={"app": "vllm-next"}, ports=(9000,))
    await published.until("10.0.0.26:9000")
    assert kube.lists(PODS)[-1].params["labelSelector"] == "app=vllm-next"
    # The new selector's Pods are listed before anything is published: never a partial set.
    assert published.sets[-2] == {"10.0.0.1:8000", "10.0.0.1:8001"}

    kube.put_pod("a", "10.0.0.1", labels={"app": "vllm-next"})  # watched under the new selector
    await published.until("10.0.0.1:9000", "10.0.0.26:9000")


async def test_pool_absent_means_not_synced_then_deleted_means_empty(kube, source, start, published):
    kube.put_pod("a", "10.0.0.1")
    start(source(pool_name="pool"))
    await kube.wait_for_watches(POOLS, 1)
    assert published.sets == []  # no pool yet: readiness must stay NOT_SERVING
    assert kube.lists(POOLS)[0].params["fieldSelector"] == "metadata.name=pool"

    kube.put_pool(ports=(8000,))
    await published.until("10.0.0.1:8000")
    kube.delete(POOLS, "pool")
    await published.until()
    kube.put_pool(ports=(8002,))
    await published.until("10.0.0.1:8002")


@pytest.mark.parametrize("as_http_status", [False, True], ids=["error-event", "http-410"])
async def test_gone_relists_and_state_stays_correct(kube, source, start, published, as_http_status):
    kube.expire_with_http_status = as_http_status
    kube.put_pool(ports=(8000,))
    kube.put_pod("a", "10.0.0.1")
    kube.put_pod("b", "10.0.0.2")
    start(source(pool_name="pool"))
    await published.until("10.0.0.1:8000", "10.0.0.2:8000")
    await kube.wait_for_watches(PODS, 1)

    # Changes the watch never delivers (history compacted), then the watch breaks.
    kube.delete(PODS, "a", record=False)
    kube.put_pod("b", "10.0.0.2", ready=False, record=False)
    kube.put_pod("c", "10.0.0.3", record=False)
    kube.put_pool(ports=(8000, 8001), record=False)
    kube.expire()

    await published.until("10.0.0.3:8000", "10.0.0.3:8001")
    assert len(kube.lists(POOLS)) == 2 and len(kube.lists(PODS)) >= 2
    resumed = kube.watches(PODS)[1].params["resourceVersion"]
    assert int(resumed) < kube.compacted  # it did try to resume before re-listing
    kube.put_pod("d", "10.0.0.4")  # and watches again after the re-list
    await published.until(*(f"10.0.0.{i}:{p}" for i in (3, 4) for p in (8000, 8001)))


async def test_watch_resumes_from_bookmark_without_relist(kube, source, start, published):
    kube.put_pod("a", "10.0.0.1")
    start(source(selector={"app": "vllm"}, target_ports=[8000]))
    await published.until("10.0.0.1:8000")
    await kube.wait_for_watches(PODS, 1)
    assert kube.watches(PODS)[0].params["allowWatchBookmarks"] in ("true", "True")

    kube.put_pod("unrelated", "10.0.0.9", labels={"app": "else"})
    mark = kube.bookmark()
    kube.drop_watches()  # the server's timeoutSeconds
    await kube.wait_for_watches(PODS, 2)
    assert kube.watches(PODS)[1].params["resourceVersion"] == str(mark)
    assert len(kube.lists(PODS)) == 1

    kube.put_pod("b", "10.0.0.2")
    await published.until("10.0.0.1:8000", "10.0.0.2:8000")


async def test_selector_mode_needs_no_crd(kube, source, start, published):
    kube.put_pod("a", "10.0.0.1", labels={"app": "vllm", "tier": "gpu"})
    kube.put_pod("b", "10.0.0.2", labels={"app": "vllm"})
    kube.put_pod("v6", "fd00::7", labels={"app": "vllm", "tier": "gpu"})
    start(source(selector={"tier": "gpu", "app": "vllm"}, target_ports=[8000, 8001]))
    await published.until("10.0.0.1:8000", "10.0.0.1:8001", "[fd00::7]:8000", "[fd00::7]:8001")
    assert kube.lists(PODS)[0].params["labelSelector"] == "app=vllm,tier=gpu"
    assert kube.lists(POOLS) == [] and kube.watches(POOLS) == []


async def test_errors_back_off_and_recover(kube, source, start, published):
    kube.put_pool(ports=(8000,))
    kube.put_pod("a", "10.0.0.1")
    kube.fail_next(3)
    start(source(pool_name="pool"))
    await published.until("10.0.0.1:8000")
    assert len(kube.lists(POOLS)) == 3 + 1  # retried until the list succeeded

    kube.fail_next(2)
    kube.drop_watches()  # the re-watches fail, are retried, then resume
    kube.put_pod("b", "10.0.0.2")
    await published.until("10.0.0.1:8000", "10.0.0.2:8000")


async def test_backoff_doubles_to_its_cap_and_resets(monkeypatch):
    slept: list[float] = []

    async def sleep(delay: float) -> None:
        slept.append(delay)

    monkeypatch.setattr(kubernetes.asyncio, "sleep", sleep)
    monkeypatch.setattr(kubernetes.random, "uniform", lambda low, high: high)
    backoff = Backoff(initial=0.5, maximum=3.0)
    for _ in range(5):
        await backoff.sleep()
    backoff.reset()
    await backoff.sleep()
    assert slept == [0.5, 1.0, 2.0, 3.0, 3.0, 0.5]


# -- parsing and validation -------------------------------------------------------------------


def test_constructor_rejects_contradictory_flags():
    with pytest.raises(ValueError, match="drop --endpoint-selector"):
        kubernetes_source(pool_name="p", namespace="ns", selector={"a": "b"}, target_ports=None)
    with pytest.raises(ValueError, match="needs --endpoint-target-ports"):
        kubernetes_source(pool_name=None, namespace="ns", selector={"a": "b"}, target_ports=None)
    with pytest.raises(ValueError, match="needs --endpoint-target-ports"):
        kubernetes_source(pool_name=None, namespace="ns", selector=None, target_ports=None)
    with pytest.raises(ValueError, match="1-65535"):
        kubernetes_source(pool_name=None, namespace="ns", selector={"a": "b"}, target_ports=[0])
    made = kubernetes_source(pool_name=None, namespace="ns", selector={"b": "2", "a": "1"}, target_ports=[80])
    assert made.spec == PoolSpec((("a", "1"), ("b", "2")), (80,))


def test_pool_spec_from_inference_pool():
    pool = {"spec": {"selector": {"matchLabels": {"app": "m"}}, "targetPorts": [{"number": 8000}]}}
    assert PoolSpec.from_pool(pool).label_selector == "app=m"
    with pytest.raises(ValueError):
        PoolSpec.from_pool({"spec": {"selector": {"app": "m"}, "targetPortNumber": 8000}})  # v1alpha2


def test_ready_ip_and_addresses():
    ready = {"status": {"podIP": "10.1.2.3", "conditions": [{"type": "Ready", "status": "True"}]}}
    assert ready_ip(ready) == "10.1.2.3"
    assert ready_ip({**ready, "metadata": {"deletionTimestamp": "2025-01-01T00:00:00Z"}}) is None
    unready = {"podIP": "10.1.2.3", "conditions": [{"type": "Ready", "status": "False"}]}
    assert ready_ip({"status": unready}) is None
    assert join_host_port("fd00::1", 8000) == "[fd00::1]:8000"
