"""A fake Kubernetes API server speaking the real list/watch protocol for Pods and InferencePools.

What it reproduces, because the discovery code depends on it:
- list: `{"metadata": {"resourceVersion"}, "items": [...]}` filtered by labelSelector /
  fieldSelector (equality terms);
- watch: JSON lines `{"type", "object"}` from the given resourceVersion on, ADDED / MODIFIED /
  DELETED as seen *through the selector* (an object that stops matching is DELETED), BOOKMARK
  when asked for with allowWatchBookmarks, ERROR 410 (or HTTP 410) for a compacted version,
  stream end at timeoutSeconds or when the test drops watches;
- optional bearer-token auth and TLS (for the in-cluster configuration path).
"""

from __future__ import annotations

import asyncio
import copy
import json
import ssl
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

JSON = dict[str, Any]
PODS = "pods"
POOLS = "inferencepools"


@dataclass
class _Event:
    rv: int
    kind: str  # PODS, POOLS, or "" for a bookmark
    namespace: str
    old: JSON | None  # before the change (None: created)
    new: JSON | None  # after the change (None: deleted)


@dataclass
class Request:
    kind: str
    watch: bool
    params: dict[str, str]


def _matches(obj: JSON | None, label_selector: str, field_selector: str) -> bool:
    if obj is None:
        return False
    labels = obj["metadata"].get("labels") or {}
    fields = {"metadata.name": obj["metadata"]["name"]}
    for selector, values in ((label_selector, labels), (field_selector, fields)):
        for term in filter(None, selector.split(",")):
            key, _, value = term.partition("=")
            if values.get(key) != value:
                return False
    return True


@dataclass
class FakeKube:
    token: str | None = None  # require `Authorization: Bearer <token>` when set
    ssl_context: ssl.SSLContext | None = None
    expire_with_http_status: bool = False  # 410 as an HTTP status instead of an ERROR event
    rv: int = 1
    compacted: int = 0  # watches from a version below this are answered 410 Gone
    objects: dict[tuple[str, str, str], JSON] = field(default_factory=dict)
    history: list[_Event] = field(default_factory=list)
    requests: list[Request] = field(default_factory=list)
    url: str = ""
    _failures: int = 0
    _epoch: int = 0  # bumped to end every open watch
    _wake: asyncio.Event = field(default_factory=asyncio.Event)
    _runner: web.AppRunner | None = None
    _closing: bool = False

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> str:
        app = web.Application()
        app.router.add_get("/api/v1/namespaces/{ns}/pods", self._pods)
        app.router.add_get(
            "/apis/inference.networking.k8s.io/v1/namespaces/{ns}/inferencepools", self._pools
        )
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0, ssl_context=self.ssl_context)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"{'https' if self.ssl_context else 'http'}://127.0.0.1:{port}"
        return self.url

    async def stop(self) -> None:
        self._closing = True
        self._notify()
        if self._runner is not None:
            await self._runner.cleanup()

    # -- mutations (what a test does to the cluster) -----------------------------------------

    def put_pod(
        self,
        name: str,
        ip: str | None = "10.0.0.1",
        *,
        ready: bool = True,
        labels: dict[str, str] | None = None,
        terminating: bool = False,
        namespace: str = "default",
        record: bool = True,
    ) -> None:
        metadata: JSON = {"name": name, "namespace": namespace, "labels": labels or {"app": "vllm"}}
        if terminating:
            metadata["deletionTimestamp"] = "2025-01-01T00:00:00Z"
        status: JSON = {
            "phase": "Running",
            "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
        }
        if ip:
            status["podIP"] = ip
        self._put(PODS, {"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "status": status}, record)

    def put_pool(
        self,
        name: str = "pool",
        selector: dict[str, str] | None = None,
        ports: tuple[int, ...] = (8000,),
        *,
        namespace: str = "default",
        record: bool = True,
    ) -> None:
        pool = {
            "apiVersion": "inference.networking.k8s.io/v1",
            "kind": "InferencePool",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {
                "selector": {"matchLabels": selector or {"app": "vllm"}},
                "targetPorts": [{"number": port} for port in ports],
                "endpointPickerRef": {"name": "picker", "port": {"number": 9002}},
            },
        }
        self._put(POOLS, pool, record)

    def delete(self, kind: str, name: str, namespace: str = "default", record: bool = True) -> None:
        gone = copy.deepcopy(self.objects.pop((kind, namespace, name)))
        self.rv += 1
        gone["metadata"]["resourceVersion"] = str(self.rv)  # reported in its final state
        self._record(_Event(self.rv, kind, namespace, gone, None), record)

    def bookmark(self) -> int:
        self.rv += 1
        self._record(_Event(self.rv, "", "", None, None), True)
        return self.rv

    def expire(self) -> None:
        """Compacts history: every open watch ends and resuming from any earlier version is 410."""
        self.compacted = self.rv
        self.history.clear()
        self.drop_watches()

    def drop_watches(self) -> None:
        """Ends every open watch cleanly, as the server does at timeoutSeconds."""
        self._epoch += 1
        self._notify()

    def fail_next(self, count: int) -> None:
        """The next `count` requests get HTTP 500."""
        self._failures = count

    def watches(self, kind: str) -> list[Request]:
        return [r for r in self.requests if r.kind == kind and r.watch]

    def lists(self, kind: str) -> list[Request]:
        return [r for r in self.requests if r.kind == kind and not r.watch]

    async def wait_for_watches(self, kind: str, count: int) -> None:
        while len(self.watches(kind)) < count:
            await self._changed()

    def _put(self, kind: str, obj: JSON, record: bool) -> None:
        meta = obj["metadata"]
        key = (kind, meta["namespace"], meta["name"])
        self.rv += 1
        meta["resourceVersion"] = str(self.rv)
        old = self.objects.get(key)
        self.objects[key] = obj
        self._record(_Event(self.rv, kind, meta["namespace"], old, obj), record)

    def _record(self, event: _Event, record: bool) -> None:
        if record:
            self.history.append(event)
        self._notify()

    def _notify(self) -> None:
        self._wake.set()
        self._wake = asyncio.Event()

    async def _changed(self) -> None:
        await self._wake.wait()

    # -- HTTP --------------------------------------------------------------------------------

    async def _pods(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(PODS, "PodList", request)

    async def _pools(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(POOLS, "InferencePoolList", request)

    async def _serve(self, kind: str, list_kind: str, request: web.Request) -> web.StreamResponse:
        params = dict(request.query)
        watch = _go_bool(params.get("watch"))
        self.requests.append(Request(kind, watch, params))
        self._notify()
        if self.token and request.headers.get("Authorization") != f"Bearer {self.token}":
            return web.json_response(_status(401, "Unauthorized"), status=401)
        if self._failures:
            self._failures -= 1
            return web.json_response(_status(500, "injected failure"), status=500)
        ns = request.match_info["ns"]
        labels, fields = params.get("labelSelector", ""), params.get("fieldSelector", "")
        if not watch:
            items = [
                obj
                for (k, obj_ns, _), obj in sorted(self.objects.items())
                if k == kind and obj_ns == ns and _matches(obj, labels, fields)
            ]
            body = {"kind": list_kind, "metadata": {"resourceVersion": str(self.rv)}, "items": items}
            return web.json_response(body)
        return await self._watch(kind, ns, labels, fields, params, request)

    async def _watch(
        self,
        kind: str,
        ns: str,
        labels: str,
        fields: str,
        params: dict[str, str],
        request: web.Request,
    ) -> web.StreamResponse:
        since = int(params.get("resourceVersion") or self.rv)
        expired = since < self.compacted
        if expired and self.expire_with_http_status:
            return web.json_response(_status(410, "too old resource version"), status=410)
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        await resp.prepare(request)
        if expired:
            await _send(resp, "ERROR", _status(410, f"too old resource version: {since}"))
            return resp
        bookmarks = _go_bool(params.get("allowWatchBookmarks"))
        epoch = self._epoch
        try:
            async with asyncio.timeout(float(params.get("timeoutSeconds") or 1800)):
                while True:
                    wake = self._wake
                    for event in [e for e in self.history if e.rv > since]:
                        since = event.rv
                        if not event.kind:
                            if bookmarks:
                                meta = {"resourceVersion": str(event.rv)}
                                await _send(resp, "BOOKMARK", {"kind": kind, "metadata": meta})
                        elif event.kind == kind and event.namespace == ns:
                            await self._send_change(resp, event, labels, fields)
                    if self._closing or self._epoch != epoch:
                        break
                    await wake.wait()
        except TimeoutError:
            pass
        return resp

    @staticmethod
    async def _send_change(resp: web.StreamResponse, event: _Event, labels: str, fields: str) -> None:
        before = _matches(event.old, labels, fields)
        after = _matches(event.new, labels, fields)
        if after:
            await _send(resp, "MODIFIED" if before else "ADDED", event.new)
        elif before:  # deleted, or no longer selected
            await _send(resp, "DELETED", event.new or event.old)


def _go_bool(value: str | None) -> bool:
    """Query booleans as the API server parses them (Go's strconv.ParseBool)."""
    return value in ("1", "t", "T", "true", "TRUE", "True")


def _status(code: int, message: str) -> JSON:
    return {"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": code, "message": message}


async def _send(resp: web.StreamResponse, kind: str, obj: JSON | None) -> None:
    await resp.write(json.dumps({"type": kind, "object": obj}).encode() + b"\n")
