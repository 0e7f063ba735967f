"""Kubernetes discovery: the ready Pods of an `InferencePool` (or of a label selector) x its ports.

Two modes, as in the reference EPP:
- `--pool-name`: watch the `InferencePool` for its selector and `targetPorts`, and the Pods it
  selects; pool edits take effect live.
- `--endpoint-selector` + `--endpoint-target-ports`: the same from Pods alone, no CRD needed.

The list/watch protocol is spoken directly on raw JSON (list; watch from the list's
resourceVersion with bookmarks; re-list on 410 Gone; back off on errors) instead of through
kubernetes_asyncio's `Watch`, which retries a 410 with the same expired version and turns every
Pod into a model object we would only read three fields of. kubernetes_asyncio still provides
the configuration (in-cluster service account with token refresh, or kubeconfig), TLS and auth.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson
from kubernetes_asyncio import config as kube_config
from kubernetes_asyncio.client import ApiClient, Configuration, CoreV1Api, CustomObjectsApi

from picker.discovery.source import Publish

log = logging.getLogger(__name__)

POOL_GROUP = "inference.networking.k8s.io"
POOL_VERSION = "v1"
POOL_PLURAL = "inferencepools"

# Like client-go: the server ends each watch after a random 5-10 minutes (spreading re-watches
# of many pickers), and a connection silent for longer than that plus a margin is dead.
_WATCH_SECONDS = (300, 600)
_READ_MARGIN_SECONDS = 30
_LIST_TIMEOUT = aiohttp.ClientTimeout(total=60, sock_connect=10)

JSON = dict[str, Any]
Request = Callable[..., Awaitable[aiohttp.ClientResponse]]


@dataclass(frozen=True, slots=True)
class PoolSpec:
    """What decides membership: Pods matching `selector`, each serving on every target port."""

    selector: tuple[tuple[str, str], ...]  # sorted (key, value) pairs: specs compare by value
    target_ports: tuple[int, ...]

    @classmethod
    def of(cls, selector: Mapping[str, str], target_ports: Iterable[int]) -> PoolSpec:
        if not selector:
            raise ValueError("a selector needs at least one label")
        pairs = tuple(sorted((str(key), str(value)) for key, value in selector.items()))
        ports = tuple(dict.fromkeys(int(port) for port in target_ports))
        if not ports or not all(0 < port < 65536 for port in ports):
            raise ValueError(f"target ports {list(ports)} must be 1-65535, at least one")
        return cls(pairs, ports)

    @classmethod
    def from_pool(cls, pool: JSON) -> PoolSpec:
        """`spec.selector.matchLabels` and `spec.targetPorts[].number` of a v1 InferencePool."""
        spec = pool.get("spec") or {}
        labels = (spec.get("selector") or {}).get("matchLabels")
        ports = spec.get("targetPorts")
        if not isinstance(labels, dict) or not isinstance(ports, list):
            raise ValueError("spec.selector.matchLabels and spec.targetPorts are required")
        return cls.of(labels, (port["number"] for port in ports))

    @property
    def label_selector(self) -> str:
        return ",".join(f"{key}={value}" for key, value in self.selector)


def ready_ip(pod: JSON) -> str | None:
    """The Pod's IP if it should receive requests: Ready, has an IP, not being deleted."""
    if (pod.get("metadata") or {}).get("deletionTimestamp"):
        return None
    status = pod.get("status") or {}
    ip = status.get("podIP")
    ready = any(
        cond.get("type") == "Ready" and cond.get("status") == "True"
        for cond in status.get("conditions") or ()
    )
    return ip if ip and ready else None


def join_host_port(ip: str, port: int) -> str:
    """`ip:port`, with IPv6 bracketed as Envoy's ORIGINAL_DST header expects."""
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def endpoints(pods: Iterable[JSON], target_ports: Iterable[int]) -> frozenset[str]:
    ips = {ip for pod in pods if (ip := ready_ip(pod))}
    return frozenset(join_host_port(ip, port) for ip in ips for port in target_ports)


async def load_configuration() -> Configuration:
    """In-cluster service account first (the Deployment), then kubeconfig (a developer's laptop).

    Raises `kubernetes_asyncio.config.ConfigException` when neither is available.
    """
    configuration = Configuration()
    try:
        kube_config.load_incluster_config(client_configuration=configuration)
    except kube_config.ConfigException:
        await kube_config.load_kube_config(
            config_file=os.environ.get("KUBECONFIG"),
            client_configuration=configuration,
            persist_config=False,
        )
    return configuration


class ApiError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{status}: {message}")
        self.status = status


@dataclass(slots=True)
class Backoff:
    """Exponential back-off with jitter, so a fleet of pickers does not retry in lockstep."""

    initial: float = 0.5
    maximum: float = 30.0
    _delay: float = field(init=False, default=0.0)

    def reset(self) -> None:
        self._delay = 0.0

    async def sleep(self) -> None:
        self._delay = min(self.maximum, self._delay * 2 or self.initial)
        await asyncio.sleep(self._delay * random.uniform(0.5, 1.0))


class _Expired(Exception):
    """410 Gone on a watch: its resourceVersion was compacted away; only a fresh list helps."""


async def _checked(response: Awaitable[aiohttp.ClientResponse]) -> aiohttp.ClientResponse:
    resp = await response
    if resp.status != 200:
        raise ApiError(resp.status, (await resp.text())[:500])
    return resp


@dataclass(slots=True)
class Reflector:
    """Keeps `objects` (name -> object) equal to one collection on the API server.

    `request` is a generated list call (e.g. `CoreV1Api.list_namespaced_pod` with its namespace
    and selectors bound); `changed` runs after the initial list and after every event that
    changed an object, always with the complete collection.
    """

    what: str  # for logs
    request: Request
    changed: Callable[[Mapping[str, JSON]], None]
    backoff: Backoff
    objects: dict[str, JSON] = field(default_factory=dict)

    async def run(self) -> None:
        while True:
            try:
                version = await self._list()
                while True:
                    version = await self._watch(version)
            except _Expired:
                log.info("%s: watch expired (410 Gone), re-listing", self.what)
            except Exception as exc:  # nothing a server or proxy sends may end discovery
                log.warning("%s: %s: %s; retrying", self.what, type(exc).__name__, exc)
                await self.backoff.sleep()

    async def _list(self) -> str:
        resp = await _checked(self.request(_preload_content=False, _request_timeout=_LIST_TIMEOUT))
        async with resp:
            body = orjson.loads(await resp.read())
        self.objects = {item["metadata"]["name"]: item for item in body.get("items") or ()}
        self.changed(self.objects)
        return str(body["metadata"]["resourceVersion"])

    async def _watch(self, version: str) -> str:
        """Follows one watch stream; returns the version to resume from when the server ends it."""
        seconds = random.randint(*_WATCH_SECONDS)
        request = self.request(
            watch=True,
            allow_watch_bookmarks=True,
            resource_version=version,
            timeout_seconds=seconds,
            _preload_content=False,
            _request_timeout=aiohttp.ClientTimeout(
                sock_connect=10, sock_read=seconds + _READ_MARGIN_SECONDS
            ),
        )
        try:
            resp = await _checked(request)
        except ApiError as exc:
            if exc.status == 410:  # some servers refuse the watch itself rather than send ERROR
                raise _Expired(str(exc)) from None
            raise
        heard = False
        async with resp:
            async for line in resp.content:
                if not line.strip():
                    continue
                event = orjson.loads(line)
                kind, obj = event["type"], event["object"]
                if kind == "ERROR":
                    if obj.get("code") == 410:
                        raise _Expired(obj.get("message", ""))
                    raise ApiError(int(obj.get("code") or 0), str(obj.get("message")))
                heard = True
                self.backoff.reset()
                version = str(obj["metadata"]["resourceVersion"])
                if kind == "BOOKMARK":
                    continue
                name = obj["metadata"]["name"]
                if kind == "DELETED":
                    self.objects.pop(name, None)
                else:  # ADDED, MODIFIED
                    self.objects[name] = obj
                self.changed(self.objects)
        if not heard:  # a stream that ends at once, again and again, must not spin
            await self.backoff.sleep()
        return version


class _Membership:
    """Turns the current PoolSpec and Pods into published endpoint sets.

    Publishes only complete sets (after the Pods of the current selector have been listed) and
    only when the set differs from the last one published.
    """

    def __init__(
        self,
        publish: Publish,
        watch_pods: Callable[[PoolSpec, Callable[[Mapping[str, JSON]], None]], Reflector],
    ) -> None:
        self._publish = publish
        self._watch_pods = watch_pods
        self._spec: PoolSpec | None = None
        self._pods: Mapping[str, JSON] | None = None  # None until listed for the current spec
        self._published: frozenset[str] | None = None
        self.pods_task: asyncio.Task[None] | None = None

    def use(self, spec: PoolSpec | None) -> None:
        """Adopts a new pool spec: new ports apply at once, a new selector re-lists Pods."""
        if spec == self._spec:
            return
        old, self._spec = self._spec, spec
        if spec is not None and old is not None and spec.selector == old.selector:
            log.info("pool target ports now %s", list(spec.target_ports))
            self._update()
            return
        self._stop_pods()
        self._pods = None
        if spec is None:
            if self._published is not None:  # the pool went away: nothing to route to
                self._emit(frozenset())
            return
        log.info("watching pods %s, ports %s", spec.label_selector, list(spec.target_ports))
        reflector = self._watch_pods(spec, self._pods_changed)
        self.pods_task = asyncio.create_task(reflector.run(), name="pod-watch")

    def _pods_changed(self, pods: Mapping[str, JSON]) -> None:
        self._pods = pods
        self._update()

    def _update(self) -> None:
        if self._spec is not None and self._pods is not None:
            self._emit(endpoints(self._pods.values(), self._spec.target_ports))

    def _emit(self, addresses: frozenset[str]) -> None:
        if addresses != self._published:
            self._published = addresses
            log.info("endpoints (%d): %s", len(addresses), ", ".join(sorted(addresses)))
            self._publish(tuple(sorted(addresses)))

    def _stop_pods(self) -> None:
        if self.pods_task is not None:
            self.pods_task.cancel()
            self.pods_task = None

    async def close(self) -> None:
        task = self.pods_task
        self._stop_pods()
        if task is not None:
            await asyncio.gather(task, return_exceptions=True)


@dataclass(slots=True)
class KubernetesSource:
    """An EndpointSource fed by the Kubernetes API (see the module docstring for the modes).

    `configuration=None` loads in-cluster config, else kubeconfig, when `run` starts; a missing
    configuration raises from `run` (a deployment error, not something to retry).
    """

    namespace: str
    pool_name: str | None = None
    spec: PoolSpec | None = None  # the fixed selector mode
    configuration: Configuration | None = None
    backoff_initial: float = 0.5
    backoff_max: float = 30.0

    async def run(self, publish: Publish) -> None:
        configuration = self.configuration or await load_configuration()
        async with ApiClient(configuration) as api:
            membership = _Membership(publish, lambda spec, changed: self._pods(api, spec, changed))
            try:
                if self.pool_name is None:
                    membership.use(self.spec)
                    assert membership.pods_task is not None
                    await membership.pods_task
                else:
                    await self._pool(api, self.pool_name, membership).run()
            finally:
                await membership.close()

    def _backoff(self) -> Backoff:
        return Backoff(self.backoff_initial, self.backoff_max)

    def _pods(
        self, api: ApiClient, spec: PoolSpec, changed: Callable[[Mapping[str, JSON]], None]
    ) -> Reflector:
        def request(**kwargs: Any) -> Awaitable[aiohttp.ClientResponse]:
            return CoreV1Api(api).list_namespaced_pod(
                self.namespace, label_selector=spec.label_selector, **kwargs
            )

        what = f"pods {self.namespace}/{spec.label_selector}"
        return Reflector(what, request, changed, self._backoff())

    def _pool(self, api: ApiClient, name: str, membership: _Membership) -> Reflector:
        def request(**kwargs: Any) -> Awaitable[aiohttp.ClientResponse]:
            return CustomObjectsApi(api).list_namespaced_custom_object(
                POOL_GROUP,
                POOL_VERSION,
                self.namespace,
                POOL_PLURAL,
                field_selector=f"metadata.name={name}",
                **kwargs,
            )

        def changed(pools: Mapping[str, JSON]) -> None:
            pool = pools.get(name)
            spec = None
            if pool is None:
                log.warning("InferencePool %s/%s not found; waiting for it", self.namespace, name)
            else:
                try:
                    spec = PoolSpec.from_pool(pool)
                except (ValueError, KeyError, TypeError) as exc:
                    log.error("InferencePool %s/%s is invalid: %s", self.namespace, name, exc)
            membership.use(spec)

        return Reflector(f"InferencePool {self.namespace}/{name}", request, changed, self._backoff())


def kubernetes_source(
    *,
    pool_name: str | None,
    namespace: str,
    selector: Mapping[str, str] | None,
    target_ports: Iterable[int] | None,
    configuration: Configuration | None = None,
) -> KubernetesSource:
    """The CLI's entry point: `--pool-name` xor `--endpoint-selector` + `--endpoint-target-ports`.

    Raises ValueError for a contradictory or incomplete combination.
    """
    if pool_name:
        if selector or target_ports:
            raise ValueError(
                "--pool-name takes the selector and ports from the InferencePool; "
                "drop --endpoint-selector/--endpoint-target-ports"
            )
        return KubernetesSource(namespace, pool_name=pool_name, configuration=configuration)
    if not selector or not target_ports:
        raise ValueError("--endpoint-selector needs --endpoint-target-ports (and vice versa)")
    return KubernetesSource(
        namespace, spec=PoolSpec.of(selector, target_ports), configuration=configuration
    )
