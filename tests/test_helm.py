"""The Helm chart in helm/mcp-gateway, linted and rendered by the real Helm v4 library.

helm-python-sdk binds Helm's Go SDK (libhelm_c), so `lint` and `render` here are Helm's own, offline:
no cluster and no helm binary. Every ci/*-values.yaml scenario is linted strictly and rendered, and
the rendered objects are checked for what the chart promises: hardening, probes, named ports that the
monitors and policies refer to, the config the gateway will actually read, and no inline secrets.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import subprocess
import sys
from functools import cache
from pathlib import Path
from typing import Any

import helm_python as helm
import kubernetes_validate
import pytest
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from gateway import cli
from gateway.config import load_config
from gateway.workers import check_workers
from tests.support.harness import running_gateway

REPO = Path(__file__).resolve().parent.parent
CHART = REPO / "helm" / "mcp-gateway"
SCENARIOS = sorted(p.name.removesuffix("-values.yaml") for p in (CHART / "ci").glob("*-values.yaml"))
RELEASE = "gw"
NAMESPACE = "mcp"
CONFIG_PATH = "/etc/mcp-gateway/config.yaml"
SIGNING_KEY_PATH = "/etc/mcp-gateway/signing-key/signing-key.pem"
ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")

# The Pod is the `helm test` hook (templates/tests/).
BASE_KINDS = {"ConfigMap", "Deployment", "Service", "ServiceAccount", "PodDisruptionBudget", "Pod"}
EXPECTED_KINDS = {
    "default": BASE_KINDS,
    "minimal": BASE_KINDS,
    "existing-secret": BASE_KINDS,
    "full": BASE_KINDS | {"HorizontalPodAutoscaler", "ServiceMonitor", "PrometheusRule", "Ingress", "NetworkPolicy"},
    "gateway-api": BASE_KINDS | {"HTTPRoute", "PodMonitor", "NetworkPolicy"},
}
# Custom resources: kubernetes-validate has no schema for them; their fields are checked below.
CRD_KINDS = {"ServiceMonitor", "PodMonitor", "PrometheusRule", "HTTPRoute"}
# The oldest Kubernetes the chart supports (Chart.yaml kubeVersion) and the newest kubernetes-validate knows.
K8S_VERSIONS = ("1.25.0", kubernetes_validate.latest_version())
DOCS = REPO / "docs" / "metrics.md"


def scenario_values(scenario: str) -> dict[str, Any]:
    return yaml.safe_load((CHART / "ci" / f"{scenario}-values.yaml").read_text()) or {}


@pytest.fixture(scope="module")
def chart():
    with helm.Chart.load(CHART) as loaded:
        yield loaded


@cache
def _render_text(values_yaml: str) -> dict[str, str]:
    with helm.Chart.load(CHART) as loaded:
        return loaded.render(yaml.safe_load(values_yaml), name=RELEASE, namespace=NAMESPACE)


def render(values: dict[str, Any] | None = None) -> dict[str, str]:
    """Template path -> rendered text (cached: Helm is deterministic)."""
    return _render_text(yaml.safe_dump(values or {}, sort_keys=True))


def objects(values: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    docs = []
    for path, text in render(values).items():
        if path.endswith(".txt"):
            continue
        docs.extend(doc for doc in yaml.safe_load_all(text) if doc)
    return docs


def notes(values: dict[str, Any] | None = None) -> str:
    return next(text for path, text in render(values).items() if path.endswith("NOTES.txt"))


def one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]


def pod_spec(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return one(docs, "Deployment")["spec"]["template"]["spec"]


def gateway_container(docs: list[dict[str, Any]]) -> dict[str, Any]:
    (container,) = pod_spec(docs)["containers"]
    return container


def rendered_config(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return yaml.safe_load(one(docs, "ConfigMap")["data"]["config.yaml"])


def container_ports(docs: list[dict[str, Any]]) -> dict[str, int]:
    return {p["name"]: p["containerPort"] for p in gateway_container(docs)["ports"]}


def checksum(values: dict[str, Any] | None = None) -> str:
    return one(objects(values), "Deployment")["spec"]["template"]["metadata"]["annotations"]["checksum/config"]


# --- lint -----------------------------------------------------------------------------------------


def _problems(report: dict[str, Any]) -> list[str]:
    """Warnings and errors (severity >= 2); infos such as "icon is recommended" are not problems."""
    return [f"{m['path']}: {m['error']}" for m in report["messages"] if m["severity"] >= 2] + report["errors"]


def test_lint_strict_with_chart_defaults():
    assert _problems(helm.lint(CHART, None, strict=True)) == []


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_lint_strict(scenario):
    assert _problems(helm.lint(CHART, scenario_values(scenario), strict=True)) == []


def test_every_scenario_has_expectations():
    assert set(SCENARIOS) == set(EXPECTED_KINDS)


@pytest.mark.parametrize(
    ("values", "bad_key"),
    [
        ({"replicaCont": 2}, "replicaCont"),
        ({"service": {"prot": 8080}}, "prot"),
        ({"metrics": {"serviceMonitor": {"enabeld": True}}}, "enabeld"),
    ],
)
def test_schema_rejects_misspelled_keys(chart, values, bad_key):
    report = helm.lint(CHART, values, strict=True)
    assert any(bad_key in p for p in _problems(report)), report
    with pytest.raises(helm.HelmValuesError, match=bad_key):
        chart.render(values, name=RELEASE, namespace=NAMESPACE)


SHARED_KEY = {"signingKey": {"existingSecret": "signing-key"}}
SHARED_STORE = {"config": {"replay_store": "redis://redis:6379/0"}}
IN_MEMORY_REPLAY = "config.replay_store must be a Redis URL shared by every pod"


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"replicaCount": 2}, "signingKey.existingSecret is required"),
        ({"autoscaling": {"enabled": True}}, "signingKey.existingSecret is required"),
        ({"clientSecrets": {"env": {"A_SECRET": "a"}}}, "clientSecrets.existingSecret is required"),
        ({"replicaCount": 2, **SHARED_KEY}, IN_MEMORY_REPLAY),
        ({"autoscaling": {"enabled": True}, **SHARED_KEY}, IN_MEMORY_REPLAY),
        ({"replicaCount": 3, **SHARED_KEY, "config": {"replay_store": "memory"}}, IN_MEMORY_REPLAY),
        ({"config": {"audit": {"sink": "/tmp/audit.jsonl"}}}, "config.audit.sink must be stdout or otlp in Kubernetes"),
        ({"config": {"audit": {"sink": "otlp"}}}, "config.audit.sink: otlp needs config.telemetry.otlp_endpoint"),
    ],
)
def test_render_refuses_unworkable_values(chart, values, message):
    with pytest.raises(helm.HelmRenderError, match=re.escape(message)):
        chart.render(values, name=RELEASE, namespace=NAMESPACE)


LEGACY_ROUTE = {"name": "legacy", "path": "/legacy", "upstream": "http://legacy:8000", "transport": "sse"}
LEGACY_AFFINITY = "routes with transport: sse need session affinity with more than one replica"


def several_pods_with_legacy_route(**values: Any) -> dict[str, Any]:
    config = {**SHARED_STORE["config"], "routes": [LEGACY_ROUTE]}  # merged over the chart's example config
    return {"replicaCount": 3, **SHARED_KEY, "config": config, **values}


@pytest.mark.parametrize("scaling", [{"replicaCount": 3}, {"autoscaling": {"enabled": True}}], ids=["replicas", "hpa"])
def test_legacy_sse_routes_with_several_pods_need_affinity(chart, scaling):
    """HTTP+SSE answers each POST on the client's GET stream, held by one pod: a POST landing on another
    pod would get unfiltered lists or no answer, so the chart refuses that setup."""
    with pytest.raises(helm.HelmRenderError, match=re.escape(LEGACY_AFFINITY)):
        chart.render(several_pods_with_legacy_route(**scaling), name=RELEASE, namespace=NAMESPACE)
    one_pod = {**several_pods_with_legacy_route(), "replicaCount": 1}
    assert "sessionAffinity" not in one(objects(one_pod), "Service")["spec"]
    streamable_only = {**several_pods_with_legacy_route(), "config": {**SHARED_STORE["config"]}}
    assert "sessionAffinity" not in one(objects(streamable_only), "Service")["spec"]


def test_legacy_sse_affinity_by_client_ip_or_at_the_ingress():
    service = one(objects(several_pods_with_legacy_route(legacySseAffinity="ClientIP")), "Service")
    assert service["spec"]["sessionAffinity"] == "ClientIP"
    assert service["spec"]["sessionAffinityConfig"] == {"clientIP": {"timeoutSeconds": 10800}}
    service = one(objects(several_pods_with_legacy_route(legacySseAffinity="ingress")), "Service")
    assert "sessionAffinity" not in service["spec"]


def test_audit_to_stdout_renders():
    values = {"config": {"audit": {"sink": "stdout", "argument_hashes": True}}}
    assert rendered_config(objects(values))["audit"] == {"sink": "stdout", "argument_hashes": True}


def test_audit_to_otlp_renders_with_a_telemetry_endpoint():
    telemetry = {"otlp_endpoint": "http://otel-collector.observability:4318"}
    config = rendered_config(objects({"config": {"audit": {"sink": "otlp"}, "telemetry": telemetry}}))
    assert (config["audit"], config["telemetry"]) == ({"sink": "otlp"}, telemetry)


def test_user_mounted_signing_key_allows_replicas():
    values = {
        "replicaCount": 2,
        "config": {"authorization": {"signing_key_file": "/keys/k.pem"}, **SHARED_STORE["config"]},
    }
    assert one(objects(values), "Deployment")["spec"]["replicas"] == 2


def test_in_memory_replay_store_with_replicas_renders_only_when_acknowledged():
    values = {"replicaCount": 2, **SHARED_KEY, "acknowledgeInMemoryReplayStore": True}
    assert one(objects(values), "Deployment")["spec"]["replicas"] == 2
    assert "replay_store" not in rendered_config(objects(values))
    assert "WARNING: several replicas with the in-memory replay store" in notes(values)
    assert "in-memory replay store" not in notes({"replicaCount": 2, **SHARED_KEY, **SHARED_STORE})


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_scenarios_with_several_pods_share_a_replay_store(scenario):
    """The examples the README points at must not teach a setup where an ID-JAG is redeemable per pod."""
    values = scenario_values(scenario)
    if values.get("replicaCount", 1) > 1 or values.get("autoscaling", {}).get("enabled"):
        store = rendered_config(objects(values))["replay_store"]
        assert store.startswith(("redis://", "rediss://", "unix://")), store
        assert not values.get("acknowledgeInMemoryReplayStore")


# --- what each scenario renders -------------------------------------------------------------------


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_scenario_kinds(scenario):
    assert {d["kind"] for d in objects(scenario_values(scenario))} == EXPECTED_KINDS[scenario]


@pytest.mark.parametrize("scenario", SCENARIOS)
@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_objects_validate_strictly_against_kubernetes_schemas(scenario, version):
    """Every built-in object against the official OpenAPI schemas, strict: an unknown or misplaced
    field (which the API server would drop or reject) fails here."""
    for doc in objects(scenario_values(scenario)):
        if doc["kind"] not in CRD_KINDS:
            kubernetes_validate.validate(doc, version, strict=True)


def test_strict_validation_catches_a_misplaced_field():
    deployment = one(objects(), "Deployment")
    deployment["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {"httpGet": {"port": 80}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSIONS[0], strict=True)


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_objects_are_named_and_namespaced(scenario):
    for doc in objects(scenario_values(scenario)):
        hook = doc["metadata"].get("annotations", {}).get("helm.sh/hook")
        assert doc["metadata"]["name"] == f"{RELEASE}-mcp-gateway" + ("-test" if hook == "test" else "")
        assert doc["metadata"]["namespace"] == NAMESPACE
        assert doc["metadata"]["labels"]["app.kubernetes.io/instance"] == RELEASE


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_no_secret_is_rendered(scenario):
    """Secrets are referenced (existingSecret), never created: no Secret, no inline secret data."""
    docs = objects(scenario_values(scenario))
    assert not [d for d in docs if d["kind"] == "Secret"]
    for doc in docs:
        assert "stringData" not in doc
        assert doc["kind"] == "ConfigMap" or "data" not in doc
    values = scenario_values(scenario)
    for env in gateway_container(docs).get("env", []):
        assert "value" not in env, f"{env['name']} is inline; it must come from a secretKeyRef"
        if env["name"] in values.get("clientSecrets", {}).get("env", {}):
            assert env["valueFrom"]["secretKeyRef"]["name"] == values["clientSecrets"]["existingSecret"]


def test_default_values_hold_no_secret():
    defaults = yaml.safe_load((CHART / "values.yaml").read_text())
    for client in defaults["config"]["authorization"]["clients"]:
        assert ENV_REF.fullmatch(client["client_secret"]), "client secrets in values.yaml must be ${VAR}"
    assert defaults["signingKey"]["existingSecret"] == ""
    assert defaults["clientSecrets"] == {"existingSecret": "", "env": {}}


# --- pod hardening, probes, ports -----------------------------------------------------------------


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_pod_runs_non_root_and_locked_down(scenario):
    docs = objects(scenario_values(scenario))
    pod = pod_spec(docs)
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 10001
    assert pod["securityContext"]["runAsGroup"] == 10001
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["automountServiceAccountToken"] is False
    assert pod["serviceAccountName"] == one(docs, "ServiceAccount")["metadata"]["name"]
    security = gateway_container(docs)["securityContext"]
    assert security["runAsNonRoot"] is True
    assert security["runAsUser"] != 0
    assert security["allowPrivilegeEscalation"] is False
    assert security["readOnlyRootFilesystem"] is True
    assert security["privileged"] is False
    assert security["capabilities"] == {"drop": ["ALL"]}
    assert security["seccompProfile"] == {"type": "RuntimeDefault"}


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_only_tmp_is_writable_and_resources_are_bounded(scenario):
    docs = objects(scenario_values(scenario))
    volumes = {v["name"]: v for v in pod_spec(docs)["volumes"]}
    mounts = {m["mountPath"]: m for m in gateway_container(docs)["volumeMounts"]}
    assert "emptyDir" in volumes[mounts["/tmp"]["name"]]
    for path, mount in mounts.items():
        if path != "/tmp":
            assert mount.get("readOnly") is True, f"{path} must be mounted read-only"
    resources = gateway_container(docs)["resources"]
    assert {"cpu", "memory"} <= resources["requests"].keys()
    assert {"cpu", "memory"} <= resources["limits"].keys()


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_probes_hit_health_endpoints_on_the_http_port(scenario):
    docs = objects(scenario_values(scenario))
    container = gateway_container(docs)
    ports = container_ports(docs)
    expected = {"startupProbe": "/healthz", "livenessProbe": "/healthz", "readinessProbe": "/readyz"}
    for probe, path in expected.items():
        assert container[probe]["httpGet"] == {"path": path, "port": "http"}
    listen_port = int(rendered_config(docs)["listen"].rpartition(":")[2])
    assert ports["http"] == listen_port


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_config_is_mounted_where_the_container_reads_it(scenario):
    docs = objects(scenario_values(scenario))
    container = gateway_container(docs)
    assert container["args"][:3] == ["serve", "--config", CONFIG_PATH]
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == CONFIG_PATH)
    volume = next(v for v in pod_spec(docs)["volumes"] if v["name"] == mount["name"])
    assert volume["configMap"]["name"] == one(docs, "ConfigMap")["metadata"]["name"]
    assert mount["subPath"] == "config.yaml"


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_container_args_are_accepted_by_the_gateway_cli(scenario):
    """The rendered args, with extra arguments after them, parse with the gateway's own CLI parser:
    an argument it does not know would crash-loop the pod."""
    values = {**scenario_values(scenario), "extraArgs": ["--log-level", "debug"]}
    args = cli._parser().parse_args(gateway_container(objects(values))["args"])
    assert (args.command, args.config, args.log_level) == ("serve", CONFIG_PATH, "debug")
    args = cli._parser().parse_args(gateway_container(objects(scenario_values(scenario)))["args"])
    assert args.log_level == scenario_values(scenario).get("logLevel", "info")


def test_log_level_and_format_values():
    docs = objects({"logLevel": "warning", "logFormat": "text"})
    assert gateway_container(docs)["args"][3:5] == ["--log-level", "warning"]
    assert rendered_config(docs)["logging"] == {"format": "text"}
    assert rendered_config(objects())["logging"] == {"format": "json"}
    assert rendered_config(objects({"config": {"logging": {"format": "text"}}}))["logging"] == {"format": "json"}


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_listen_is_forced_to_the_container_port(scenario):
    values = scenario_values(scenario)
    docs = objects(values)
    assert rendered_config(docs)["listen"] == f"0.0.0.0:{values.get('containerPort', 8080)}"


def test_listen_in_values_is_overridden():
    values = {"containerPort": 9000, "config": {"listen": "127.0.0.1:1"}}
    assert rendered_config(objects(values))["listen"] == "0.0.0.0:9000"


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_service_ports_match_named_container_ports(scenario):
    values = scenario_values(scenario)
    docs = objects(values)
    service = one(docs, "Service")
    ports = container_ports(docs)
    config = rendered_config(docs)
    service_ports = {p["name"]: p for p in service["spec"]["ports"]}
    assert service_ports["http"]["targetPort"] == "http"
    assert (
        service["spec"]["selector"].items() <= one(docs, "Deployment")["spec"]["template"]["metadata"]["labels"].items()
    )
    metrics_port = values.get("metrics", {}).get("port")
    if metrics_port and metrics_port != ports["http"]:
        assert service_ports["metrics"]["targetPort"] == "metrics"
        assert service_ports["metrics"]["port"] == metrics_port
        assert ports["metrics"] == metrics_port
        assert config["metrics_listen"] == f"0.0.0.0:{metrics_port}"
    else:
        assert set(service_ports) == {"http"}
        assert set(ports) == {"http"}
        assert "metrics_listen" not in config


def test_metrics_port_equal_to_container_port_is_not_separate():
    docs = objects({"metrics": {"port": 8080}})
    assert set(container_ports(docs)) == {"http"}
    assert "metrics_listen" not in rendered_config(docs)


# --- monitoring -----------------------------------------------------------------------------------

SEPARATE_PORT = {"metrics": {"port": 9090}}


@pytest.mark.parametrize("values", [{}, SEPARATE_PORT], ids=["metrics-on-http-port", "separate-metrics-port"])
def test_service_monitor_scrapes_a_service_port_that_exists(values):
    docs = objects({"metrics": {**values.get("metrics", {}), "serviceMonitor": {"enabled": True}}})
    service = one(docs, "Service")
    service_monitor = one(docs, "ServiceMonitor")
    assert service_monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert service_monitor["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    (endpoint,) = service_monitor["spec"]["endpoints"]
    assert endpoint["port"] == ("metrics" if values else "http")
    assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
    assert endpoint["path"] == "/metrics"


@pytest.mark.parametrize("values", [{}, SEPARATE_PORT], ids=["metrics-on-http-port", "separate-metrics-port"])
def test_pod_monitor_scrapes_a_container_port_that_exists(values):
    docs = objects({"metrics": {**values.get("metrics", {}), "podMonitor": {"enabled": True}}})
    pod_labels = one(docs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    pod_monitor = one(docs, "PodMonitor")
    assert pod_monitor["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    (pod_endpoint,) = pod_monitor["spec"]["podMetricsEndpoints"]
    assert pod_endpoint["port"] == ("metrics" if values else "http")
    assert pod_endpoint["port"] in container_ports(docs)
    assert pod_endpoint["path"] == "/metrics"


def test_schema_refuses_both_monitors(chart):
    """Both would scrape every pod twice (doubling every rate); the examples enable one each."""
    both = {"metrics": {"serviceMonitor": {"enabled": True}, "podMonitor": {"enabled": True}}}
    with pytest.raises(helm.HelmValuesError, match="/metrics"):
        chart.render(both, name=RELEASE, namespace=NAMESPACE)
    assert _problems(helm.lint(CHART, both, strict=True))
    for scenario in SCENARIOS:
        monitors = scenario_values(scenario).get("metrics", {})
        assert sum(monitors.get(kind, {}).get("enabled", False) for kind in ("serviceMonitor", "podMonitor")) <= 1


@pytest.mark.parametrize(("scenario", "kind"), [("full", "ServiceMonitor"), ("gateway-api", "PodMonitor")])
def test_monitor_labels_let_prometheus_select_them(scenario, kind):
    assert one(objects(scenario_values(scenario)), kind)["metadata"]["labels"]["release"] == "kube-prometheus-stack"


def _normalized(text: str) -> str:
    return " ".join(text.split())


def test_prometheus_rule_carries_the_documented_alerts():
    """The rule's expressions are the ones docs/metrics.md documents, word for word, and name only
    metrics the docs describe (tests/test_metrics.py checks the docs against a live scrape)."""
    values = {
        "metrics": {"prometheusRule": {"enabled": True, "labels": {"release": "kps"}, "alertLabels": {"team": "x"}}}
    }
    rule = one(objects(values), "PrometheusRule")
    assert rule["metadata"]["labels"]["release"] == "kps"
    docs = DOCS.read_text()
    alerts_section = _normalized(docs[docs.index("## Alerts") :])
    (group,) = rule["spec"]["groups"]
    names = [r["alert"] for r in group["rules"]]
    assert len(names) == len(set(names)) >= 8
    for alert in group["rules"]:
        assert f"`{alert['alert']}`" in docs
        assert _normalized(alert["expr"]) in alerts_section, alert["alert"]
        assert alert["labels"]["severity"] in {"warning", "critical"}
        assert alert["labels"]["team"] == "x"
        assert "{{ $labels." in alert["annotations"]["summary"]  # left for Prometheus, not expanded by Helm
        for metric in re.findall(r"\b(?:mcp_gateway|process)_[a-z_]+", alert["expr"]):
            assert f"`{metric}`" in docs, metric
    assert "PrometheusRule" not in {d["kind"] for d in objects()}


# --- availability, scaling, shutdown --------------------------------------------------------------


def test_pod_disruption_budget_is_on_by_default():
    docs = objects()
    pdb = one(docs, "PodDisruptionBudget")
    assert pdb["spec"] == {
        "maxUnavailable": 1,
        "selector": {"matchLabels": one(docs, "Deployment")["spec"]["selector"]["matchLabels"]},
    }


def test_pod_disruption_budget_min_available_wins():
    pdb = one(objects(scenario_values("full")), "PodDisruptionBudget")
    assert pdb["spec"]["minAvailable"] == 2
    assert "maxUnavailable" not in pdb["spec"]


def test_autoscaling_owns_the_replica_count():
    docs = objects(scenario_values("full"))
    deployment = one(docs, "Deployment")
    hpa = one(docs, "HorizontalPodAutoscaler")
    assert "replicas" not in deployment["spec"]
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": deployment["metadata"]["name"],
    }
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (3, 12)
    assert {m["resource"]["name"] for m in hpa["spec"]["metrics"]} == {"cpu", "memory"}


def test_rollout_never_drops_below_desired_capacity():
    strategy = one(objects(), "Deployment")["spec"]["strategy"]
    assert strategy == {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}}


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_shutdown_timing_is_consistent(scenario):
    """Kubernetes waits for the preStop sleep plus the gateway's own drain (the same number the gateway
    reads from its config) plus a margin before SIGKILL."""
    values = scenario_values(scenario)
    pre_stop = values.get("preStopSleepSeconds", 5)
    grace = values.get("shutdownGracePeriodSeconds", 30)
    docs = objects(values)
    assert rendered_config(docs)["shutdown_grace_seconds"] == grace
    assert pod_spec(docs)["terminationGracePeriodSeconds"] == pre_stop + grace + 5
    assert gateway_container(docs)["lifecycle"]["preStop"] == {"exec": {"command": ["sleep", str(pre_stop)]}}


def test_shutdown_grace_in_config_is_overridden():
    """A grace period in config that differs from the pod's would be cut short by SIGKILL."""
    values = {"shutdownGracePeriodSeconds": 12, "config": {"shutdown_grace_seconds": 600}}
    docs = objects(values)
    assert rendered_config(docs)["shutdown_grace_seconds"] == 12
    assert pod_spec(docs)["terminationGracePeriodSeconds"] == 5 + 12 + 5


# --- configuration rollout and secrets wiring -----------------------------------------------------


def test_checksum_changes_when_config_changes():
    base = checksum()
    changed = checksum({"config": {"routes": [{"name": "other", "path": "/x", "upstream": "http://x:1/mcp"}]}})
    port_changed = checksum({"containerPort": 9000})
    assert len({base, changed, port_changed}) == 3


def test_checksum_ignores_everything_but_config():
    assert checksum({"resources": {"limits": {"memory": "1Gi"}}, "podAnnotations": {"a": "b"}}) == checksum()


def test_checksum_is_the_digest_of_the_mounted_config():
    docs = objects()
    config_text = one(docs, "ConfigMap")["data"]["config.yaml"]
    assert checksum() == hashlib.sha256(config_text.rstrip("\n").encode()).hexdigest()


@pytest.mark.parametrize("scenario", ["existing-secret", "full"])
def test_signing_key_is_mounted_and_wired_to_the_config(scenario):
    values = scenario_values(scenario)
    docs = objects(values)
    assert rendered_config(docs)["authorization"]["signing_key_file"] == SIGNING_KEY_PATH
    mount = next(m for m in gateway_container(docs)["volumeMounts"] if m["name"] == "signing-key")
    assert mount["mountPath"] == str(Path(SIGNING_KEY_PATH).parent)
    assert mount["readOnly"] is True
    volume = next(v for v in pod_spec(docs)["volumes"] if v["name"] == "signing-key")
    assert volume["secret"]["secretName"] == values["signingKey"]["existingSecret"]
    assert volume["secret"]["items"] == [{"key": values["signingKey"]["key"], "path": Path(SIGNING_KEY_PATH).name}]
    assert volume["secret"]["defaultMode"] == 0o440


def test_previous_signing_key_is_mounted_for_a_rotation():
    values = scenario_values("existing-secret")
    values["signingKey"]["previousKey"] = "old.pem"
    docs = objects(values)
    previous = str(Path(SIGNING_KEY_PATH).parent / "previous-signing-key.pem")
    assert rendered_config(docs)["authorization"]["previous_signing_key_files"] == [previous]
    volume = next(v for v in pod_spec(docs)["volumes"] if v["name"] == "signing-key")
    assert {"key": "old.pem", "path": "previous-signing-key.pem"} in volume["secret"]["items"]
    assert (
        "previous_signing_key_files"
        not in rendered_config(objects(scenario_values("existing-secret")))["authorization"]
    )


@pytest.mark.parametrize("scenario", ["default", "minimal"])
def test_no_signing_key_without_existing_secret(scenario):
    docs = objects(scenario_values(scenario))
    assert "signing_key_file" not in rendered_config(docs)["authorization"]
    assert "signing-key" not in {v["name"] for v in pod_spec(docs)["volumes"]}
    assert "WARNING: no signing key" in notes(scenario_values(scenario))


@pytest.mark.parametrize("scenario", [s for s in SCENARIOS if s != "default"])
def test_every_config_variable_comes_from_the_pod_env(scenario):
    docs = objects(scenario_values(scenario))
    referenced = set(ENV_REF.findall(one(docs, "ConfigMap")["data"]["config.yaml"]))
    defined = {e["name"] for e in gateway_container(docs).get("env", [])}
    assert referenced, "scenarios should exercise ${VAR} expansion"
    assert referenced <= defined
    assert "WARNING: the config refers to" not in notes(scenario_values(scenario))


def test_notes_warn_about_the_unprovided_example_secret():
    text = notes()
    assert "WARNING: the config refers to ${MCP_CLIENT_SECRET}" in text
    assert "example route" in text


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_network_policy_refers_to_existing_ports(scenario):
    docs = objects(scenario_values(scenario))
    policies = [d for d in docs if d["kind"] == "NetworkPolicy"]
    for policy in policies:
        assert (
            policy["spec"]["podSelector"]["matchLabels"] == one(docs, "Deployment")["spec"]["selector"]["matchLabels"]
        )
        for rule in policy["spec"]["ingress"]:
            for port in rule["ports"]:
                assert port["port"] in container_ports(docs)
        if "Egress" in policy["spec"]["policyTypes"]:
            dns = policy["spec"]["egress"][0]["ports"]
            assert {(p["port"], p["protocol"]) for p in dns} == {(53, "UDP"), (53, "TCP")}


def test_image_and_pod_agree_with_the_dockerfile():
    """The chart's uid and config path are the ones the image is built with."""
    dockerfile = (REPO / "Dockerfile").read_text()
    docs = objects()
    assert f"USER {pod_spec(docs)['securityContext']['runAsUser']}:" in dockerfile
    assert f'"--config", "{CONFIG_PATH}"' in dockerfile
    assert gateway_container(docs)["image"] == "mcp-gateway:0.1.0"


# --- the gateway accepts the config the chart renders (needs `python -m gateway check`) ---------


def _pem_key(path: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_rendered_config_passes_gateway_check(scenario, tmp_path):
    """The ConfigMap's file, with the pod's env vars and mounted key file, is valid for the gateway.

    Depends on the gateway CLI (`python -m gateway check`).
    """
    docs = objects(scenario_values(scenario))
    config_text = one(docs, "ConfigMap")["data"]["config.yaml"]
    config = yaml.safe_load(config_text)
    signing_key_file = config["authorization"].get("signing_key_file")
    if signing_key_file is not None:
        # The Secret is mounted at this fixed path in the pod; here a real key stands in for it.
        assert signing_key_file == SIGNING_KEY_PATH
        _pem_key(tmp_path / "signing-key.pem")
        config_text = config_text.replace(SIGNING_KEY_PATH, str(tmp_path / "signing-key.pem"))
    config_file = tmp_path / "config.yaml"
    config_file.write_text(config_text)
    env = dict(os.environ)
    for name in sorted(set(ENV_REF.findall(config_text))):
        env[name] = f"test-value-of-{name.lower()}-0123456789"
    result = subprocess.run(
        [sys.executable, "-m", "gateway", "check", "--config", str(config_file)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, f"check rejected the {scenario} config:\n{result.stdout}{result.stderr}"


# --- network policy, placement, resources ---------------------------------------------------------


def _http_port_sources(docs: list[dict[str, Any]]) -> list[Any]:
    policy = one(docs, "NetworkPolicy")
    return [
        rule.get("from") for rule in policy["spec"]["ingress"] if {"port": "http", "protocol": "TCP"} in rule["ports"]
    ]


def test_metrics_from_is_honoured_when_metrics_share_the_http_port():
    scrapers = [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]
    clients = [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ingress-nginx"}}}]
    policy = {"enabled": True, "ingressFrom": clients, "metricsFrom": scrapers}
    assert _http_port_sources(objects({"networkPolicy": policy})) == [clients, scrapers]
    # Metrics on their own port: the scrapers get that port only.
    docs = objects({"networkPolicy": policy, **SEPARATE_PORT})
    assert _http_port_sources(docs) == [clients]
    rules = one(docs, "NetworkPolicy")["spec"]["ingress"]
    assert {"ports": [{"port": "metrics", "protocol": "TCP"}], "from": scrapers} in rules
    # No ingressFrom: the http port admits any source already, scrapers included.
    assert _http_port_sources(objects({"networkPolicy": {"enabled": True, "metricsFrom": scrapers}})) == [None]


def test_pods_spread_softly_over_zones_and_nodes_by_default():
    docs = objects()
    constraints = pod_spec(docs)["topologySpreadConstraints"]
    selector = one(docs, "Deployment")["spec"]["selector"]
    assert [c["topologyKey"] for c in constraints] == ["topology.kubernetes.io/zone", "kubernetes.io/hostname"]
    for constraint in constraints:
        assert (constraint["maxSkew"], constraint["whenUnsatisfiable"]) == (1, "ScheduleAnyway")
        assert constraint["labelSelector"] == selector
    custom = scenario_values("full")["topologySpreadConstraints"]
    assert pod_spec(objects(scenario_values("full")))["topologySpreadConstraints"] == custom
    assert "topologySpreadConstraints" not in pod_spec(objects({"defaultTopologySpread": False}))


def _cores(quantity: str | int) -> float:
    text = str(quantity)
    return int(text[:-1]) / 1000 if text.endswith("m") else float(text)


def test_cpu_request_makes_the_hpa_target_meaningful():
    """The HPA's utilization is a share of the request: a tiny request next to a one-core limit would
    scale out at a trickle of traffic."""
    resources = gateway_container(objects())["resources"]
    assert _cores(resources["requests"]["cpu"]) >= _cores(resources["limits"]["cpu"]) / 2


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (
            {"autoscaling": {"enabled": True, "minReplicas": 5, "maxReplicas": 3}},
            "autoscaling.minReplicas (5) must not exceed autoscaling.maxReplicas (3)",
        ),
        (
            {"autoscaling": {"enabled": True}, "resources": {"requests": {"cpu": None}}},
            "resources.requests.cpu is required with autoscaling.targetCPUUtilizationPercentage",
        ),
        (
            {
                "autoscaling": {"enabled": True, "targetMemoryUtilizationPercentage": 80},
                "resources": {"requests": {"memory": None}},
            },
            "resources.requests.memory is required with autoscaling.targetMemoryUtilizationPercentage",
        ),
        ({"httpRoute": {"enabled": True}}, "httpRoute.parentRefs is required"),
    ],
)
def test_render_refuses_unworkable_autoscaling_and_routing(chart, values, message):
    values = {**SHARED_KEY, **SHARED_STORE, **values}
    with pytest.raises(helm.HelmRenderError, match=re.escape(message)):
        chart.render(values, name=RELEASE, namespace=NAMESPACE)


@pytest.mark.parametrize(
    "resources",
    [
        {"requests": {"cpu": "half"}},
        {"limits": {"memory": "512 MB"}},
        {"requests": {"cpu": -1}},
        {"request": {"cpu": "1"}},
        {"autoscaling": {"targetCPUUtilizationPercentage": 150}},
    ],
)
def test_schema_rejects_bad_resources(chart, resources):
    values = resources if "autoscaling" in resources else {"resources": resources}
    with pytest.raises(helm.HelmValuesError):
        chart.render(values, name=RELEASE, namespace=NAMESPACE)


# --- ingress and Gateway API ----------------------------------------------------------------------


def test_ingress_serves_the_public_url_host_on_the_http_port():
    docs = objects(scenario_values("full"))
    ingress = one(docs, "Ingress")
    (rule,) = ingress["spec"]["rules"]
    assert rule["host"] == "mcp.example.com"  # from config.public_url
    (path,) = rule["http"]["paths"]
    assert (path["path"], path["pathType"]) == ("/", "Prefix")
    assert path["backend"]["service"] == {"name": one(docs, "Service")["metadata"]["name"], "port": {"name": "http"}}
    assert ingress["spec"]["tls"] == [{"hosts": ["mcp.example.com"], "secretName": "mcp-example-com-tls"}]
    assert ingress["metadata"]["annotations"]["nginx.ingress.kubernetes.io/affinity"] == "cookie"
    assert (
        one(objects({"ingress": {"enabled": True, "host": "other.example.com"}}), "Ingress")["spec"]["rules"][0]["host"]
        == "other.example.com"
    )


def test_http_route_attaches_to_the_gateway_and_serves_the_public_url_host():
    values = scenario_values("gateway-api")
    docs = objects(values)
    route = one(docs, "HTTPRoute")
    assert route["apiVersion"] == "gateway.networking.k8s.io/v1"
    assert route["spec"]["parentRefs"] == values["httpRoute"]["parentRefs"]
    assert route["spec"]["hostnames"] == ["tools.example.org"]
    (rule,) = route["spec"]["rules"]
    assert rule["matches"] == [{"path": {"type": "PathPrefix", "value": "/"}}]
    service = one(docs, "Service")
    assert rule["backendRefs"] == [{"name": service["metadata"]["name"], "port": service["spec"]["ports"][0]["port"]}]


def test_notes_warn_when_the_ingress_exposes_metrics():
    assert "WARNING: /metrics is reachable through the Ingress" in notes({"ingress": {"enabled": True}})
    assert "WARNING: /metrics" not in notes({"ingress": {"enabled": True}, **SEPARATE_PORT})
    assert "WARNING: /metrics is reachable through the HTTPRoute" in notes(scenario_values("gateway-api"))


# --- the `helm test` hook -------------------------------------------------------------------------


def _hook(values: dict[str, Any] | None = None) -> dict[str, Any]:
    return next(d for d in objects(values) if d["kind"] == "Pod")


def test_helm_test_hook_runs_the_gateway_image_locked_down():
    docs = objects()
    hook = _hook()
    assert hook["metadata"]["annotations"]["helm.sh/hook"] == "test"
    (container,) = hook["spec"]["containers"]
    assert container["image"] == gateway_container(docs)["image"]
    assert container["command"][:2] == ["python", "-c"]
    security = container["securityContext"]
    assert (security["runAsNonRoot"], security["readOnlyRootFilesystem"], security["allowPrivilegeEscalation"]) == (
        True,
        True,
        False,
    )
    assert security["capabilities"] == {"drop": ["ALL"]}
    env = {e["name"]: e["value"] for e in container["env"]}
    service = one(docs, "Service")
    assert (
        env["GATEWAY_URL"]
        == f"http://{service['metadata']['name']}.{NAMESPACE}.svc:{service['spec']['ports'][0]['port']}"
    )
    assert env["EXPECTED_ISSUER"] == "https://mcp.example.com"
    assert "Pod" not in {d["kind"] for d in objects({"tests": {"enabled": False}})}


def _run_hook(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    (container,) = _hook()["spec"]["containers"]
    return subprocess.run(
        [sys.executable, *container["command"][1:]],
        env={"PATH": os.environ["PATH"], **env},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


async def test_helm_test_hook_script_passes_against_a_ready_gateway_and_fails_otherwise(idp, upstream_json):
    """The hook's own script, run against a real gateway: what `helm test` does in the cluster."""
    routes = [{"name": "json", "path": "/json/mcp", "upstream": upstream_json.mcp_url}]
    async with running_gateway(idp, routes) as harness:
        env = {"GATEWAY_URL": harness.url, "EXPECTED_ISSUER": harness.issuer}
        passed = await asyncio.to_thread(_run_hook, env)
        assert passed.returncode == 0, passed.stdout + passed.stderr
        assert "readyz: 200" in passed.stdout
        wrong_issuer = await asyncio.to_thread(_run_hook, {**env, "EXPECTED_ISSUER": "https://elsewhere.example"})
        assert wrong_issuer.returncode == 1
        harness.gateway.drain()
        draining = await asyncio.to_thread(_run_hook, env)
        assert draining.returncode != 0


# --- workers (serve --workers) --------------------------------------------------------------------

WORKERS_READY = {"metrics": {"port": 9090}, **SHARED_STORE}


def workers_values(cpu: str | int | None, **values: Any) -> dict[str, Any]:
    limits = {"memory": "512Mi"} if cpu is None else {"cpu": cpu, "memory": "512Mi"}
    return {**WORKERS_READY, "resources": {"requests": {"cpu": "500m", "memory": "256Mi"}, "limits": limits}, **values}


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ({}, 1),  # the chart's default limit of 1 CPU: one process, no --workers argument
        (workers_values("1"), 1),
        (workers_values("500m"), 1),
        (workers_values(None), 1),
        (workers_values("1500m"), 2),
        (workers_values(2), 2),
        (workers_values("4"), 4),
        (workers_values("1", workers=3), 3),
    ],
)
def test_workers_follow_the_cpu_limit(values, expected):
    docs = objects(values)
    args = gateway_container(docs)["args"]
    parsed = cli._parser().parse_args(args)
    assert parsed.workers == expected
    assert ("--workers" in args) == (expected > 1)  # one worker renders the pod exactly as before


def test_every_worker_has_a_metrics_port_scraped_by_the_monitor():
    monitors = {"serviceMonitor": {"enabled": True}}
    values = workers_values("3", networkPolicy={"enabled": True, "metricsFrom": [{"podSelector": {}}]})
    values["metrics"] = {**values["metrics"], **monitors}
    docs = objects(values)
    expected = {"metrics": 9090, "metrics-1": 9091, "metrics-2": 9092}
    assert {name: port for name, port in container_ports(docs).items() if name != "http"} == expected
    service_ports = {p["name"]: (p["port"], p["targetPort"]) for p in one(docs, "Service")["spec"]["ports"]}
    assert {name: service_ports[name] for name in expected} == {name: (port, name) for name, port in expected.items()}
    assert [e["port"] for e in one(docs, "ServiceMonitor")["spec"]["endpoints"]] == list(expected)
    policy_ports = [p["port"] for rule in one(docs, "NetworkPolicy")["spec"]["ingress"] for p in rule["ports"]]
    assert set(expected) <= set(policy_ports)
    pod_values = workers_values("3")
    pod_values["metrics"] = {**pod_values["metrics"], "podMonitor": {"enabled": True}}
    endpoints = one(objects(pod_values), "PodMonitor")["spec"]["podMetricsEndpoints"]
    assert [e["port"] for e in endpoints] == list(expected)


def test_the_rendered_workers_config_passes_the_gateways_own_check(tmp_path, monkeypatch):
    """What the supervisor checks before forking (gateway/workers.py check_workers) accepts the chart's
    config for the worker count the chart passes."""
    docs = objects(workers_values("2"))
    (tmp_path / "config.yaml").write_text(one(docs, "ConfigMap")["data"]["config.yaml"])
    monkeypatch.setenv("MCP_CLIENT_SECRET", "test-value-of-the-client-secret-0123456789")
    workers = cli._parser().parse_args(gateway_container(docs)["args"]).workers
    check_workers(load_config(tmp_path / "config.yaml"), workers)


SSE_ROUTE_ONLY = {**SHARED_STORE["config"], "routes": [LEGACY_ROUTE]}


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({**workers_values("2"), "metrics": {"port": None}}, "metrics.port is required with 2 workers"),
        (workers_values("2", containerPort=9091), "metrics.port 9090 to 9091 (one per worker) must not include"),
        (
            {**workers_values("2"), "config": {"replay_store": "memory"}},
            "config.replay_store must be a Redis URL with 2",
        ),
        (workers_values("2", config=SSE_ROUTE_ONLY), "routes with transport: sse cannot be served by 2 workers"),
    ],
)
def test_render_refuses_workers_whose_state_would_diverge(chart, values, message):
    with pytest.raises(helm.HelmRenderError, match=re.escape(message)):
        chart.render(values, name=RELEASE, namespace=NAMESPACE)


@pytest.mark.parametrize("workers", [0, "many", "2"])
def test_schema_rejects_bad_workers(chart, workers):
    with pytest.raises(helm.HelmValuesError):
        chart.render({"workers": workers}, name=RELEASE, namespace=NAMESPACE)
