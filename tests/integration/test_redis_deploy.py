"""deploy/k8s (N replicas, one Redis) is consistent with itself and with the proxy: its config
parses with the proxy's own parser, names and labels line up, probes hit real endpoints."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from proxy.config import parse_config

K8S = Path(__file__).resolve().parents[2] / "deploy" / "k8s"


def documents() -> dict[tuple[str, str], dict[str, Any]]:
    found: dict[tuple[str, str], dict[str, Any]] = {}
    listed = yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"]
    for name in listed:
        for doc in yaml.safe_load_all((K8S / name).read_text()):
            found[(doc["kind"], doc["metadata"]["name"])] = doc
    return found


def test_every_piece_is_there() -> None:
    kinds = set(documents())
    assert {("Deployment", "semcache-proxy"), ("Service", "semcache-proxy"),
            ("HorizontalPodAutoscaler", "semcache-proxy"), ("ConfigMap", "semcache-proxy-config"),
            ("PodDisruptionBudget", "semcache-proxy"), ("StatefulSet", "semcache-redis"),
            ("Service", "semcache-redis")} <= kinds


def test_the_config_is_a_valid_shared_redis_config() -> None:
    docs = documents()
    config = parse_config(docs[("ConfigMap", "semcache-proxy-config")]["data"]["proxy.yaml"])
    assert config.store.type == "redis"
    assert config.store.redis_url.startswith("redis://semcache-redis:6379")
    assert config.tenancy.secret_env == "SEMCACHE_TENANT_SECRET"
    assert config.server.port == 8080 and config.server.host == "0.0.0.0"
    deployment = docs[("Deployment", "semcache-proxy")]
    grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace > config.server.drain_timeout_s + 5
    secret = yaml.safe_load((K8S / "secret.example.yaml").read_text())
    assert "SEMCACHE_TENANT_SECRET" in secret["stringData"]
    for backend in config.backends:
        assert backend.api_key_env is None or backend.api_key_env in secret["stringData"]
    redis_conf = docs[("ConfigMap", "semcache-redis-config")]["data"]["redis.conf"]
    assert "appendonly yes" in redis_conf and "maxmemory-policy noeviction" in redis_conf


def test_names_labels_ports_and_probes_line_up() -> None:
    docs = documents()
    deployment = docs[("Deployment", "semcache-proxy")]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    service = docs[("Service", "semcache-proxy")]
    assert service["spec"]["selector"].items() <= labels.items()
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert [p["name"] for p in container["ports"]] == ["http"]
    assert service["spec"]["ports"][0]["targetPort"] == "http"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    hpa = docs[("HorizontalPodAutoscaler", "semcache-proxy")]
    assert hpa["spec"]["scaleTargetRef"]["name"] == "semcache-proxy"
    assert 2 <= hpa["spec"]["minReplicas"] < hpa["spec"]["maxReplicas"]
    redis = docs[("StatefulSet", "semcache-redis")]
    assert redis["spec"]["replicas"] == 1
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert "/app/config/proxy.yaml" in mounts


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
def test_kustomize_renders() -> None:
    done = subprocess.run(["kubectl", "kustomize", str(K8S)], capture_output=True, text=True, timeout=60,
                          check=False)
    assert done.returncode == 0, done.stderr
    kinds = [doc["kind"] for doc in yaml.safe_load_all(done.stdout)]
    assert kinds.count("Deployment") == 1 and "HorizontalPodAutoscaler" in kinds
