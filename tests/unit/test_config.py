"""The config file: reference EPP documents (GIE and llm-d shapes), picker's sections, defaults."""

from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from picker.config import Config, LimitsConfig, MetricsConfig, SaturationConfig, duration_seconds
from picker.datalayer.pool import EndpointPool
from picker.request import InferenceRequest
from picker.scheduling.pickers import MaxScorePicker
from picker.scheduling.registry import effective_document
from picker.scheduling.scheduler import Scheduler
from picker.scheduling.scorers import PrefixCacheScorer
from tests.unit.conftest import NOW, epp, pool_of

ROOT = Path(__file__).parents[2]
SHIPPED = ROOT / "gateway" / "base" / "config.yaml"


def build(text: str, pool: EndpointPool | None = None, **options: Any) -> Scheduler:
    config = Config.load(text=text)
    return Scheduler.from_config(
        config, pool or EndpointPool(), clock=lambda: NOW, rng=random.Random(0), **options
    )


# --- one source of defaults --------------------------------------------------------------------


def test_the_shipped_file_is_exactly_the_defaults_written_out() -> None:
    """gateway/base/config.yaml names every setting, each at the value `Config()` has."""
    assert yaml.safe_load(SHIPPED.read_text()) == effective_document(Config())
    assert effective_document(Config.load(SHIPPED)) == effective_document(Config())
    loaded = Config.load(SHIPPED)
    assert (loaded.saturation, loaded.metrics, loaded.limits) == (
        Config().saturation,
        Config().metrics,
        Config().limits,
    )
    assert (loaded.objectives, loaded.session_header) == (Config().objectives, Config().session_header)


def test_picker_config_prints_the_effective_configuration() -> None:
    text = "apiVersion: llm-d.ai/v1alpha1\nkind: EndpointPickerConfig\nplugins: [{type: queue-scorer}]\n"
    run = subprocess.run(
        [sys.executable, "-m", "picker", "config", "--config-text", text],
        capture_output=True,
        text=True,
        check=True,
    )
    doc = yaml.safe_load(run.stdout)
    assert doc["plugins"] == [{"type": "queue-scorer", "parameters": {"minSpan": 4.0}}]
    assert doc["schedulingProfiles"] == [{"name": "default", "plugins": [{"pluginRef": "queue-scorer"}]}]
    assert doc["metrics"]["scrapeInterval"] == Config().metrics.scrape_interval


def test_the_readmes_example_runs_as_it_reads() -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Configuration") :]
    example = section[section.index("```yaml\n") + 8 : section.index("```\n", section.index("```yaml"))]
    sched = build(example)
    assert sched.names == ["queue-scorer", "lora-affinity-scorer", "prefix-cache-scorer", "tokens-in-flight"]
    assert sched.weights == [1.0, 3.0, 2.0, 1.0]


# --- reference documents ------------------------------------------------------------------------

GIE_DOCS_EXAMPLE = """
apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: prefix-cache-scorer
  parameters:
    hashBlockSize: 64
    maxPrefixBlocksToMatch: 128
    lruCapacityPerServer: 1000
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: prefix-cache-scorer
    weight: 50
"""

LLM_D_DEFAULT = """
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: queue-scorer
- type: kv-cache-utilization-scorer
- type: prefix-cache-scorer
- type: metrics-data-source
  parameters:
    scheme: "http"
    path: "/custom/metrics"
    insecureSkipVerify: true
- type: core-metrics-extractor
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: queue-scorer
    weight: 2
  - pluginRef: kv-cache-utilization-scorer
    weight: 2
  - pluginRef: prefix-cache-scorer
    weight: 3
"""

LORA_SERVING = """
apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
plugins:
  - type: single-profile-handler
  - type: queue-scorer
  - type: lora-affinity-scorer
  - type: max-score-picker
    parameters: {maxNumOfEndpoints: 1}
schedulingProfiles:
  - name: default
    plugins:
      - pluginRef: queue-scorer
        weight: 1
      - pluginRef: lora-affinity-scorer
        weight: 3
      - pluginRef: max-score-picker
saturationDetector:
  queueDepthThreshold: 8
  kvCacheUtilThreshold: 0.9
  metricsStalenessThreshold: 500ms
"""

NO_PROFILE = """
apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: kv-cache-utilization-scorer
- name: short-queue
  type: queue-scorer
  parameters: {minSpan: 0}
"""


def test_gie_documentation_example_loads_with_its_legacy_block_size() -> None:
    sched = build(GIE_DOCS_EXAMPLE)
    assert sched.names == ["prefix-cache-scorer"] and sched.weights == [50.0]
    (prefix,) = sched.scorers
    assert isinstance(prefix, PrefixCacheScorer)
    # hashBlockSize is in characters: 64 characters = 16 tokens of 4 characters
    assert (prefix.block_size_tokens, prefix.max_prefix_blocks_to_match) == (16, 128)
    assert prefix.lru_capacity_per_server == 1000
    assert isinstance(sched.picker, MaxScorePicker)  # added when a profile names none


def test_llm_d_default_config_loads_its_data_layer_plugins() -> None:
    config = Config.load(text=LLM_D_DEFAULT)
    assert config.metrics.path == "/custom/metrics"
    sched = build(LLM_D_DEFAULT)
    assert sched.names == ["queue-scorer", "kv-cache-utilization-scorer", "prefix-cache-scorer"]
    assert sched.weights == [2.0, 2.0, 3.0]


def test_lora_serving_config_routes_adapters_by_affinity_over_queue() -> None:
    pool = pool_of(
        {"waiting": 0, "max_lora": 1, "running_loras": frozenset({"other"}), "loaded_loras": 1},
        {"waiting": 3, "max_lora": 1, "running_loras": frozenset({"tuned"}), "loaded_loras": 1},
    )
    sched = build(LORA_SERVING, pool)
    assert sched.weights == [1.0, 3.0] and sched.picker.max_num_of_endpoints == 1
    result = sched.schedule(InferenceRequest(model="tuned"), pool.endpoints)
    assert result is not None and result.endpoints == [pool.endpoints[1]]
    assert result.reason == "lora-affinity-scorer"
    config = Config.load(text=LORA_SERVING)
    assert config.saturation == SaturationConfig(queue_threshold=8, kv_threshold=0.9)
    assert config.metrics.stale_after == 0.5


def test_without_profiles_one_default_profile_runs_every_plugin() -> None:
    pool = pool_of({"waiting": 1, "kv_usage": 0.9}, {"waiting": 2, "kv_usage": 0.1})
    sched = build(NO_PROFILE, pool)
    assert sched.names == ["kv-cache-utilization-scorer", "short-queue"] and sched.weights == [1.0, 1.0]
    result = sched.schedule(InferenceRequest(), pool.endpoints)
    # kv: 0.1 vs 0.9; queue (reference min-max, minSpan 0): 1.0 vs 0.0 -> 1.1 vs 0.9
    assert result is not None and result.endpoints[0] is pool.endpoints[0]
    assert result.reason == "short-queue"


def test_picker_sections_sit_beside_the_reference_ones() -> None:
    doc = epp(
        "queue-scorer",
        objectives={"gold": 7},
        metrics={"scrapeInterval": 0.5, "modelsInterval": 30},
        limits={"maxBodyBytes": 1024},
        sessionHeader="X-User",
    )
    config = Config.from_document(doc)
    assert config.objectives == {"gold": 7}
    assert config.metrics == MetricsConfig(scrape_interval=0.5, models_interval=30.0)
    assert config.limits == LimitsConfig(max_body_bytes=1024)
    assert config.session_header == "x-user"


def test_durations_in_go_syntax_or_seconds() -> None:
    assert duration_seconds("2s", "x") == 2.0
    assert duration_seconds("1m30s", "x") == 90.0
    assert duration_seconds("250ms", "x") == 0.25
    assert duration_seconds(3, "x") == 3.0
    for bad in ("2 s", "soon", "", "-1s", 0, True):
        with pytest.raises(ValueError, match="x"):
            duration_seconds(bad, "x")


# --- clear errors -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        (
            {"scheduling": {}},
            r"expected apiVersion inference.networking.x-k8s.io/v1alpha1 or llm-d.ai/v1alpha1",
        ),
        (
            epp("queue-scorer", flowControl={"maxBytes": "1Gi"}),
            r"unsupported top-level keys \['flowControl'\]",
        ),
        (epp("queue-scorer", featureGates=["flowControl"]), r"featureGates: picker has no feature gates"),
        (
            epp("random-scorer"),
            r"plugin 'random-scorer' \(random-scorer\): unknown type; picker supports scorer: queue-scorer, "
            r"kv-cache-utilization-scorer, prefix-cache-scorer, lora-affinity-scorer",
        ),
        (
            epp({"type": "queue-scorer", "parameters": {"span": 1}}),
            r"unknown parameters \['span'\]; accepted: \['minSpan'\]",
        ),
        (epp({"type": "prefix-cache-scorer", "parameters": {"autoTune": "yes"}}), r"'autoTune' must be bool"),
        (
            epp({"type": "prefix-cache-scorer", "parameters": {"maxPrefixBlocksToMatch": 0}}),
            r"'prefix-cache-scorer' \(prefix-cache-scorer\): maxPrefixBlocksToMatch must be at least 1",
        ),
        (epp("queue-scorer", picker={"maxNumOfEndpoints": 0}), r"maxNumOfEndpoints must be at least 1"),
        (epp({"type": "queue-scorer", "weight": -1}), r"weight must not be negative"),
        (
            epp("queue-scorer", "queue-scorer"),
            r"two plugins are named 'queue-scorer'; give each instance a name",
        ),
        (
            epp("queue-scorer")
            | {"schedulingProfiles": [{"name": "a", "plugins": []}, {"name": "b", "plugins": []}]},
            r"picker runs one scheduling profile; got \['a', 'b'\]",
        ),
        (
            epp("queue-scorer") | {"schedulingProfiles": [{"name": "p", "plugins": [{"pluginRef": "nope"}]}]},
            r"pluginRef 'nope' names no plugin",
        ),
        (
            epp("queue-scorer")
            | {
                "plugins": [{"type": "queue-scorer"}, {"type": "single-profile-handler"}],
                "schedulingProfiles": [{"name": "p", "plugins": [{"pluginRef": "single-profile-handler"}]}],
            },
            r"'single-profile-handler' is a profile-handler plugin, not a scheduling step",
        ),
        (
            epp("queue-scorer")
            | {"plugins": [{"type": "metrics-data-source", "parameters": {"scheme": "https"}}]},
            r"plain http only",
        ),
        (
            epp("header-based-testing-filter"),
            r"conformance-test hooks: start picker with --conformance-hooks",
        ),
        (
            epp("queue-scorer", saturationDetector={"metricsStalenessThreshold": "soon"}),
            r"metricsStalenessThreshold",
        ),
        (epp("queue-scorer", saturationDetector={"queueThreshold": 3}), r"saturationDetector: unknown keys"),
        (epp("queue-scorer", metrics={"timeout": "1s"}), r"metrics.timeout: expected a finite number"),
        (
            epp("queue-scorer", data={"sources": [{"pluginRef": "absent"}]}),
            r"data: pluginRef 'absent' names no plugin",
        ),
    ],
)
def test_bad_config_is_a_clear_error_at_start_up(doc: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Scheduler.from_config(Config.from_document(doc), EndpointPool())


def test_the_conformance_suites_own_config_loads_with_the_hooks_on() -> None:
    suite = """
    apiVersion: inference.networking.x-k8s.io/v1alpha1
    kind: EndpointPickerConfig
    plugins:
    - type: header-based-testing-filter
    - type: destination-endpoint-served-verifier
    schedulingProfiles:
    - name: conformance-profile
      plugins:
      - pluginRef: header-based-testing-filter
    """
    sched = build(suite, conformance_hooks=True)
    assert sched.names == [] and isinstance(sched.picker, MaxScorePicker)


def test_serve_rejects_a_bad_config_before_starting(tmp_path: Path) -> None:
    text = (
        "apiVersion: llm-d.ai/v1alpha1\nkind: EndpointPickerConfig\nplugins: [{type: pd-profile-handler}]\n"
    )
    run = subprocess.run(
        [sys.executable, "-m", "picker", "serve", "--endpoints", "127.0.0.1:1", "--config-text", text],
        capture_output=True,
        text=True,
        timeout=60,
    )  # fmt: skip
    assert run.returncode == 2
    assert "unknown type; picker supports" in run.stderr and "pd-profile-handler" in run.stderr
