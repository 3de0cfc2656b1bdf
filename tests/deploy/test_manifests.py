"""deploy/ is valid as shipped: the kustomize overlays render (tests/deploy/kustomize.py, the
subset they use) and every object passes kubernetes-validate against a pinned Kubernetes version;
checkov finds nothing it is not told why to skip; yamllint is clean; the ConfigMap's
keybroker.toml loads with the broker's own strict settings loader; the collector config has the
receiver, processors and exporters docs/DEPLOYMENT.md promises; the alert rules use only metrics
the broker exports; the systemd unit carries the hardening."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from keybroker import settings as settings_mod
from keybroker.adapters.alerts import AlertDetector
from keybroker.adapters.gauges import JournalState, StateGauges
from keybroker.adapters.metrics import DecisionMetrics
from keybroker.core.decision import Decision, Outcome
from keybroker.errors import ConfigurationError
from tests.deploy.kustomize import UnsupportedKustomization, build, load_documents

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
KUBERNETES = DEPLOY / "kubernetes"
OVERLAYS = ("dev", "production")
#: The Kubernetes version the manifests are validated against (raise it deliberately).
KUBERNETES_VERSION = "1.32.0"
BIN = Path(sys.executable).parent
#: `make venv` installs checkov apart from the project (it pins packaging<24; see the Makefile).
CHECKOV = BIN.parent / "tools" / "checkov" / "bin" / "checkov"


@pytest.fixture(scope="module", params=OVERLAYS)
def overlay(request: pytest.FixtureRequest) -> tuple[str, list[dict[str, Any]]]:
    name: str = request.param
    return name, build(KUBERNETES / "overlays" / name)


def _one(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} objects"
    return found[0]


def _container(pod: dict[str, Any], name: str = "keybroker") -> dict[str, Any]:
    return next(c for c in pod["containers"] if c["name"] == name)


def _env(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}


def _certificate_problems(cert: dict[str, Any]) -> list[str]:
    """cert-manager is a CRD kubernetes-validate has no schema for: check its required shape."""
    spec = cert.get("spec", {})
    problems = []
    if cert.get("apiVersion") != "cert-manager.io/v1":
        problems.append("apiVersion")
    for key in ("secretName", "issuerRef", "usages"):
        if key not in spec:
            problems.append(f"spec.{key}")
    if not {"name", "kind"} <= set(spec.get("issuerRef", {})):
        problems.append("spec.issuerRef")
    return problems


def test_every_object_passes_kubernetes_validate(
    overlay: tuple[str, list[dict[str, Any]]],
) -> None:
    name, objects = overlay
    kinds = set()
    for o in objects:
        kinds.add(o["kind"])
        if o["kind"] == "Certificate":
            assert _certificate_problems(o) == [], o["metadata"]["name"]
            continue
        kubernetes_validate.validate(o, KUBERNETES_VERSION, strict=True)
    expected = {"StatefulSet", "Service", "PodDisruptionBudget", "NetworkPolicy", "ConfigMap"}
    assert expected | {"ServiceAccount", "Certificate"} <= kinds
    assert all(o["metadata"].get("namespace") == f"keybroker{'-dev' if name == 'dev' else ''}"
               for o in objects)  # fmt: skip


def test_kubernetes_validate_catches_a_bad_manifest(
    overlay: tuple[str, list[dict[str, Any]]],
) -> None:
    """The validation above can fail: a misspelt field is refused (strict schemas)."""
    _, objects = overlay
    broken = json.loads(json.dumps(_one(objects, "StatefulSet", "keybroker")))
    broken["spec"]["template"]["spec"]["containers"][0]["securityContxt"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)


def test_example_client_certificate_is_well_formed() -> None:
    (cert,) = load_documents(KUBERNETES / "cert-manager" / "storage-client-certificate.yaml")
    assert _certificate_problems(cert) == []
    assert "client auth" in cert["spec"]["usages"]


def _config(objects: list[dict[str, Any]], tmp_path: Path) -> settings_mod.Settings:
    """keybroker.toml from the ConfigMap, with the StatefulSet's KEYBROKER_* overrides."""
    toml = _one(objects, "ConfigMap", "keybroker-config")["data"]["keybroker.toml"]
    path = tmp_path / "keybroker.toml"
    path.write_text(toml)
    pod = _one(objects, "StatefulSet", "keybroker")["spec"]["template"]["spec"]
    env = {k: v for k, v in _env(_container(pod)).items() if k.startswith("KEYBROKER_")}
    env.pop("KEYBROKER_CONFIG")
    return settings_mod.load(path, environ=env)


def test_configmap_settings_load_with_the_product_loader(
    overlay: tuple[str, list[dict[str, Any]]], tmp_path: Path
) -> None:
    name, objects = overlay
    loaded = _config(objects, tmp_path)
    assert loaded.server.processes == 0  # "auto": the container's CPU limit
    assert loaded.server.listen == "0.0.0.0:50051"
    assert loaded.audit.dir == Path("/var/lib/keybroker/journal")
    assert loaded.telemetry.log_format == "json"  # one object a line for the log agent
    if name == "production":
        assert loaded.state.url.startswith("postgresql://keybroker_runtime@")
        assert loaded.state.migrate is False
        assert loaded.hsm.module == "/opt/hsm/lib/libpkcs11.so"
    else:
        assert loaded.state.url == "sqlite:/var/lib/keybroker/keybroker.db"
        assert loaded.state.migrate is True
        assert loaded.hsm.module == "/usr/lib/softhsm/libsofthsm2.so"
        assert loaded.telemetry.otlp_endpoint == ""
    # Every path the settings name is mounted in the container.
    pod = _one(objects, "StatefulSet", "keybroker")["spec"]["template"]["spec"]
    mounts = [m["mountPath"] for m in _container(pod)["volumeMounts"]]
    for path in (loaded.tls.cert_file, loaded.tls.key_file, loaded.tls.client_ca_file,
                 loaded.hsm.pin_file, loaded.audit.chain_key_file, loaded.audit.signing_key_file,
                 loaded.audit.pseudonym_key_file, loaded.audit.dir):  # fmt: skip
        assert path is not None
        assert any(str(path).startswith(m + "/") for m in mounts), path
    # The migrate Job's overrides load too.
    for job in (o for o in objects if o["kind"] == "Job"):
        env = _env(_container(job["spec"]["template"]["spec"], "migrate"))
        toml = tmp_path / "keybroker.toml"
        migrator = settings_mod.load(toml, environ=env)
        assert migrator.state.url.startswith("postgresql://keybroker_migrator@")


def test_a_misspelt_setting_in_the_configmap_would_be_refused(tmp_path: Path) -> None:
    """The loader the test above relies on is strict."""
    (configmap,) = load_documents(KUBERNETES / "base" / "configmap.yaml")
    path = tmp_path / "keybroker.toml"
    path.write_text(configmap["data"]["keybroker.toml"].replace("grace_period", "grace_periode"))
    with pytest.raises(ConfigurationError, match="grace_periode"):
        settings_mod.load(path, environ={})


def test_statefulset_shape(overlay: tuple[str, list[dict[str, Any]]], tmp_path: Path) -> None:
    name, objects = overlay
    sts = _one(objects, "StatefulSet", "keybroker")
    pod = sts["spec"]["template"]["spec"]
    container = _container(pod)
    labels = sts["spec"]["selector"]["matchLabels"]
    assert sts["spec"]["replicas"] == (3 if name == "production" else 1)
    assert sts["spec"]["serviceName"] == "keybroker-headless"
    assert sts["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "journal"
    anti = pod["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert anti[0]["topologyKey"] == "kubernetes.io/hostname"
    assert anti[0]["labelSelector"]["matchLabels"] == labels
    assert pod["automountServiceAccountToken"] is False
    assert pod["enableServiceLinks"] is False
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    grace = _config(objects, tmp_path).server.grace_period
    assert pod["terminationGracePeriodSeconds"] > grace + 5
    for c in [*pod["containers"], *pod.get("initContainers", [])]:
        sc = c["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False, c["name"]
        assert sc["readOnlyRootFilesystem"] is True, c["name"]
        assert sc["capabilities"]["drop"] == ["ALL"], c["name"]
        assert sc["seccompProfile"]["type"] == "RuntimeDefault", c["name"]
        assert {"cpu", "memory"} <= set(c["resources"]["limits"]), c["name"]
    # kubelet's gRPC probes on the plaintext health port the settings name
    health_port = int(_config(objects, tmp_path).server.health_listen.rpartition(":")[2])
    assert {"name": "health", "containerPort": health_port, "protocol": "TCP"} in container["ports"]
    for probe, service in (
        ("startupProbe", "liveness"),
        ("readinessProbe", "readiness"),
        ("livenessProbe", "liveness"),
    ):
        assert container[probe]["grpc"] == {"port": health_port, "service": service}, probe
    # liveness gives a stuck broker longer than [server] liveness_timeout to turn again
    liveness = container["livenessProbe"]
    assert liveness["periodSeconds"] * liveness["failureThreshold"] >= 60
    volumes = {v["name"]: v for v in pod["volumes"]}
    claims = {t["metadata"]["name"] for t in sts["spec"]["volumeClaimTemplates"]}
    for c in [*pod["containers"], *pod.get("initContainers", [])]:
        for mount in c["volumeMounts"]:
            assert mount["name"] in volumes or mount["name"] in claims, mount
            source = volumes.get(mount["name"], {})
            if "secret" in source or "configMap" in source:
                assert mount.get("readOnly") is True, mount
    pdb = _one(objects, "PodDisruptionBudget", "keybroker")
    assert pdb["spec"]["selector"]["matchLabels"] == labels
    assert pdb["spec"]["maxUnavailable"] == 1
    headless = _one(objects, "Service", "keybroker-headless")
    assert headless["spec"]["clusterIP"] == "None"
    assert headless["spec"]["selector"] == labels
    assert _one(objects, "Service", "keybroker")["spec"]["selector"] == labels
    account = _one(objects, "ServiceAccount", "keybroker")
    assert account["automountServiceAccountToken"] is False
    # The server certificate Secret is made by the Certificate of that name.
    certificates = {o["spec"]["secretName"] for o in objects if o["kind"] == "Certificate"}
    assert volumes["tls-server"]["secret"]["secretName"] in certificates


def test_network_policy_admits_clients_and_reaches_only_dependencies(
    overlay: tuple[str, list[dict[str, Any]]],
) -> None:
    _, objects = overlay
    policy = _one(objects, "NetworkPolicy", "keybroker")["spec"]
    assert set(policy["policyTypes"]) == {"Ingress", "Egress"}
    ingress, probes = policy["ingress"]
    (source,) = ingress["from"]
    assert set(source) == {"namespaceSelector"}
    assert source["namespaceSelector"]["matchLabels"] == {
        "keybroker.example.internal/client": "true"
    }
    assert [p["port"] for p in ingress["ports"]] == [50051]
    # kubelet reaches the health port (and only that port) from the nodes' network
    assert [set(s) for s in probes["from"]] == [{"ipBlock"}]
    assert [p["port"] for p in probes["ports"]] == [8081]
    ports = {p["port"] for rule in policy["egress"] for p in rule["ports"]}
    assert ports == {53, 5432, 4317, 1792, 443}  # DNS, PostgreSQL, collector, HSM, JWKS
    assert all(rule.get("to") for rule in policy["egress"])  # never "anywhere"


def test_checkov_finds_no_unjustified_failure(tmp_path: Path) -> None:
    """checkov on what is applied (the rendered overlays: the base alone sets no namespace and
    no digest) and on the Dockerfile. Skips are annotations or comments with a reason."""
    if not CHECKOV.exists():
        pytest.fail(f"checkov is missing: `make venv` installs it into {CHECKOV.parents[1]}")
    rendered = tmp_path / "rendered"
    rendered.mkdir()
    for name in OVERLAYS:
        objects = build(KUBERNETES / "overlays" / name)
        (rendered / f"{name}.yaml").write_text(yaml.safe_dump_all(objects, sort_keys=False))
    for directory, framework in ((rendered, "kubernetes"), (DEPLOY / "container", "dockerfile")):
        done = subprocess.run(
            [str(CHECKOV), "-d", str(directory), "--framework", framework,
             "--skip-download", "-o", "json"],
            capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
        report = json.loads(done.stdout)
        summary = report["summary"]
        failed = [f"{c['check_id']} {c['resource']}" for c in report["results"]["failed_checks"]]
        assert summary["failed"] == 0, failed
        assert summary["passed"] > 50
        for skipped in report["results"]["skipped_checks"]:
            assert len(skipped.get("check_result", {}).get("suppress_comment", "")) > 20, skipped


def test_yamllint_is_clean() -> None:
    done = subprocess.run(
        [str(BIN / "yamllint"), "--strict", "-c", str(DEPLOY / ".yamllint"), str(DEPLOY)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr


def test_collector_config_has_what_the_docs_promise() -> None:
    config = yaml.safe_load((DEPLOY / "otel-collector" / "config.yaml").read_text())
    grpc = config["receivers"]["otlp"]["protocols"]["grpc"]
    assert grpc["endpoint"].endswith(":4317")
    assert {"cert_file", "key_file", "client_ca_file"} <= set(grpc["tls"])
    exporters = config["exporters"]
    assert any(name.startswith("otlp/") for name in exporters)  # the trace backend
    assert exporters["file/audit"]["path"].endswith(".jsonl")
    assert "batch" in config["processors"]
    pipelines = config["service"]["pipelines"]
    audit = pipelines["traces/audit"]
    assert audit["exporters"] == ["file/audit"]
    assert any("keybroker.audit.chain" in c for c in config["processors"]["filter/audit-only"]
               ["traces"]["span"])  # fmt: skip
    for pipeline in pipelines.values():  # every component a pipeline names is defined
        assert "batch" in pipeline["processors"]
        for kind in ("receivers", "processors", "exporters"):
            for component in pipeline[kind]:
                assert component in config[kind], component
    for extension in config["service"].get("extensions", []):
        assert extension in config["extensions"]


def _exported_metric_names() -> set[str]:
    """Prometheus series names of every instrument the broker creates, as the collector's
    prometheus exporter names them (dots to underscores, _seconds for s, _total for counters)."""
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    metrics = DecisionMetrics(provider, export_lag=lambda: 0)
    StateGauges(
        provider,
        hsm_healthy=lambda: True,
        staleness={"keys": lambda: 0.0},
        journal=JournalState(lambda: 0, lambda: True),
    )
    detector = AlertDetector(meter_provider=provider)
    decision = Decision(
        service="keybroker.v1.KeyBroker", operation="UnwrapDataKey", outcome=Outcome.DENY,
        reason="bad_signature", subject="storage-eu", started_ns=1, ended_ns=2,
    )  # fmt: skip
    metrics.record(decision)
    metrics.hsm_call(0.001, "decrypt")
    metrics.journal_flush(0.001, 3)
    for _ in range(20):  # repeated denials of one principal: a built-in alert fires
        detector.record(decision)
    data = reader.get_metrics_data()
    assert data is not None
    names: set[str] = set()
    for rm in data.resource_metrics:
        for sm in rm.scope_metrics:
            for metric in sm.metrics:
                base = metric.name.replace(".", "_") + ("_seconds" if metric.unit == "s" else "")
                kind = type(metric.data).__name__
                if kind == "Sum":
                    names.add(base + "_total")
                elif kind == "Histogram":
                    names |= {base + "_bucket", base + "_sum", base + "_count"}
                else:
                    names.add(base)
    provider.shutdown()
    return names


def _alert_rules() -> Iterator[dict[str, Any]]:
    for path in sorted((DEPLOY / "alerts").glob("*.yaml")):
        for group in yaml.safe_load(path.read_text())["groups"]:
            yield from group["rules"]


def test_alert_rules_use_only_metrics_the_broker_exports() -> None:
    exported = _exported_metric_names()
    assert {"keybroker_decisions_total", "keybroker_alerts_total",
            "keybroker_journal_export_lag", "keybroker_hsm_healthy",
            "keybroker_state_staleness_seconds", "keybroker_journal_backlog",
            "keybroker_journal_healthy"} <= exported  # fmt: skip
    rules = list(_alert_rules())
    assert len(rules) >= 8
    used = set()
    for rule in rules:
        assert rule["alert"].startswith("Keybroker") and rule["expr"].strip()
        assert rule["labels"]["severity"] in {"warning", "critical"}
        used |= set(re.findall(r"\b(keybroker_[a-z_]+)", rule["expr"]))
    assert used, "no keybroker metric used"
    assert used <= exported, used - exported
    # The alerts the issue names are there.
    names = {rule["alert"] for rule in rules}
    assert {"KeybrokerDenialSpike", "KeybrokerUnwrapVolumeAnomaly", "KeybrokerJournalUnavailable",
            "KeybrokerHsmUnavailable", "KeybrokerCertificateExpiry", "KeybrokerStateStale"} <= names  # fmt: skip


def test_systemd_unit_is_hardened() -> None:
    lines = (DEPLOY / "systemd" / "keybroker.service").read_text().splitlines()
    values: dict[str, list[str]] = {}
    for line in lines:
        if "=" in line and not line.startswith("#"):
            key, _, value = line.partition("=")
            values.setdefault(key.strip(), []).append(value.strip())
    for key, want in {
        "NoNewPrivileges": "yes", "ProtectSystem": "strict", "PrivateTmp": "yes",
        "ProtectHome": "yes", "PrivateDevices": "yes", "StateDirectory": "keybroker",
        "UMask": "0077", "LimitCORE": "0", "RestartPreventExitStatus": "2", "User": "keybroker",
        "CapabilityBoundingSet": "", "RestrictSUIDSGID": "yes", "LockPersonality": "yes",
    }.items():  # fmt: skip
        assert values.get(key) == [want], key
    assert values["ExecStart"][0].endswith("keybroker serve --config /etc/keybroker/keybroker.toml")
    assert int(values["TimeoutStopSec"][0]) > settings_mod.ServerSettings().grace_period


def test_renderer_refuses_what_it_does_not_implement(tmp_path: Path) -> None:
    """An overlay cannot silently use a kustomize feature the test renderer would ignore."""
    (tmp_path / "kustomization.yaml").write_text("resources: []\ncommonLabels: {a: b}\n")
    with pytest.raises(UnsupportedKustomization, match="commonLabels"):
        build(tmp_path)
