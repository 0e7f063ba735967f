"""The conformance suite's hooks through the real Envoy, as a full-duplex gateway drives them."""

from __future__ import annotations

from typing import Any

from picker.conformance import SELECTED_HEADER, SELECTION_HEADER, SERVED_HEADER

CHAT = "/v1/chat/completions"
BODY = {"model": "fake-model", "messages": [{"role": "user", "content": "Write as if you were a critic"}]}

# A gateway reports the endpoint that served the request in `envoy.lb` metadata; Envoy alone does
# not. Here the route names the upstream that answered in a response header, a Lua filter (after
# the picker, so before it on the response path) moves it into that metadata, and the ext_proc
# filter forwards the namespace with the response headers.
SERVED_LUA = """
function envoy_on_response(handle)
  local served = handle:headers():get("x-upstream-served")
  if served then
    handle:streamInfo():dynamicMetadata():set("envoy.lb", "x-gateway-destination-endpoint-served", served)
    handle:headers():remove("x-upstream-served")
  end
end
"""


def report_served(config: dict[str, Any]) -> None:
    manager = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    for host in manager["route_config"]["virtual_hosts"]:
        for route in host["routes"]:
            served = {"header": {"key": "x-upstream-served", "value": "%UPSTREAM_REMOTE_ADDRESS%"}}
            route["response_headers_to_add"] = [served]
    filters = manager["http_filters"]
    extproc = next(f for f in filters if f["name"] == "envoy.filters.http.ext_proc")
    extproc["typed_config"]["metadata_options"]["forwarding_namespaces"]["untyped"].append("envoy.lb")
    lua = {
        "name": "served-endpoint",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.lua.v3.Lua",
            "default_source_code": {"inline_string": SERVED_LUA},
        },
    }
    filters.insert(len(filters) - 1, lua)  # just before the router


async def test_selection_header_steers_and_the_served_endpoint_is_reported(
    fake_vllm, picker_server, envoy, client
) -> None:
    replicas = await fake_vllm(3)
    replicas[2].metrics.waiting = 50  # never the picker's own choice
    addresses = [r.address for r in replicas]
    picker = await picker_server(addresses, "--conformance-hooks")
    proxy = await envoy("gie", endpoints=addresses, picker=[picker.address], customize=report_served)
    for _ in range(4):
        response = await client.post(proxy.url + CHAT, json=BODY, headers={SELECTION_HEADER: addresses[2]})
        assert response.status_code == 200 and response.headers["x-sim-replica"] == "2"
        assert response.headers[SERVED_HEADER] == addresses[2]
        assert response.headers[SELECTED_HEADER] == addresses[2]
    pair = f"{addresses[0]},{addresses[1]}"
    served = set()
    for _ in range(10):
        response = await client.post(proxy.url + CHAT, json=BODY, headers={SELECTION_HEADER: pair})
        assert response.status_code == 200
        served.add(response.headers["x-sim-replica"])
        assert response.headers[SERVED_HEADER] == addresses[int(response.headers["x-sim-replica"])]
    assert served <= {"0", "1"}
    nowhere = await client.post(proxy.url + CHAT, json=BODY, headers={SELECTION_HEADER: "256.256.256.256"})
    assert nowhere.status_code == 503 and nowhere.json()["error"]["message"]


async def test_without_the_flag_the_header_steers_nothing(fake_vllm, picker_server, envoy, client) -> None:
    replicas = await fake_vllm(3)
    replicas[2].metrics.waiting = 50
    addresses = [r.address for r in replicas]
    picker = await picker_server(addresses)
    proxy = await envoy("gie", endpoints=addresses, picker=[picker.address], customize=report_served)
    for _ in range(4):
        response = await client.post(proxy.url + CHAT, json=BODY, headers={SELECTION_HEADER: addresses[2]})
        assert response.status_code == 200 and response.headers["x-sim-replica"] != "2"
        assert SERVED_HEADER not in response.headers
