"""deploy/ and dashboards/ are valid, and every path and port they name exists in the project.

No Docker engine runs here, so the image and the compose stack are checked statically: YAML and
JSON parse, COPY sources and bind-mounted files exist (and survive the .dockerignore), ports agree
with the proxy's configuration, and the model-baking step of the Dockerfile really runs.
"""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
import yaml

from proxy.accounting import parse_prices
from proxy.config import parse_config

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    lines, current = [], ""
    for raw in (DEPLOY / "Dockerfile").read_text().splitlines():
        if raw.lstrip().startswith("#") and not current:
            continue
        current += raw.rstrip().removesuffix("\\") + " " if raw.rstrip().endswith("\\") else raw
        if not raw.rstrip().endswith("\\"):
            if current.strip():
                word, _, rest = current.strip().partition(" ")
                lines.append((word.upper(), rest.strip()))
            current = ""
    return lines


def stages() -> dict[str, list[tuple[str, str]]]:
    out: dict[str, list[tuple[str, str]]] = {}
    name = ""
    for word, rest in dockerfile():
        if word == "FROM":
            name = rest.split(" AS ")[-1].strip() if " AS " in rest else rest
            out[name] = []
        elif name:
            out[name].append((word, rest))
    return out


def deploy_config() -> Any:
    return parse_config((DEPLOY / "proxy.yaml").read_text())


def default_config() -> Any:
    return parse_config((ROOT / "config" / "proxy.yaml").read_text())


def compose() -> dict[str, Any]:
    data: dict[str, Any] = load_yaml(DEPLOY / "docker-compose.yml")
    return data


# ------------------------------------------------------------------ Dockerfile


def test_dockerfile_is_multi_stage_non_root_with_a_healthcheck() -> None:
    all_stages = stages()
    assert list(all_stages) == ["build", "runtime"]
    runtime = all_stages["runtime"]
    words = [w for w, _ in runtime]
    users = [rest for w, rest in runtime if w == "USER"]
    assert users and users[-1].split(":")[0] not in ("0", "root")
    assert "HEALTHCHECK" in words and "CMD" in words
    port = deploy_config().server.port
    assert port == default_config().server.port
    assert [rest for w, rest in runtime if w == "EXPOSE"] == [str(port)]
    health = next(rest for w, rest in runtime if w == "HEALTHCHECK")
    assert f"127.0.0.1:{port}/readyz" in health


def test_dockerfile_installs_cpu_torch_before_the_project() -> None:
    runs = [rest for w, rest in stages()["build"] if w == "RUN"]
    torch = next(i for i, r in enumerate(runs) if "TORCH_SPEC" in r)
    project = next(i for i, r in enumerate(runs) if "-c constraints.txt" in r)
    assert torch < project
    args = dict(rest.split("=", 1) for w, rest in dockerfile() if w == "ARG" and "=" in rest)
    makefile = (ROOT / "Makefile").read_text()
    assert f"TORCH_SPEC ?= {args['TORCH_SPEC']}" in makefile
    assert args["TORCH_INDEX_URL"].endswith("/cpu")


def _ignored(path: str) -> bool:
    """Whether the Dockerfile's .dockerignore keeps ``path`` out of the build context."""
    ignored = False
    for line in (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = line.lstrip("!")
        if fnmatch.fnmatch(path, pattern) or pattern == "**":
            ignored = not negate
    return ignored


def test_copy_sources_exist_and_reach_the_build_context() -> None:
    destinations = {}
    for stage, lines in stages().items():
        for word, rest in lines:
            if word != "COPY":
                continue
            parts = [p for p in shlex.split(rest) if not p.startswith("--chown")]
            if parts[0].startswith("--from="):
                assert parts[0].removeprefix("--from=") in stages()
                continue
            *sources, dest = parts
            for source in sources:
                path = ROOT / source
                assert path.exists(), f"COPY {source} ({stage}): no such file in the project"
                files = [path] if path.is_file() else list(path.rglob("*.py"))
                for file in files:
                    rel = file.relative_to(ROOT).as_posix()
                    assert not _ignored(rel), f"{rel} is excluded by deploy/Dockerfile.dockerignore"
                destinations[dest] = source
    cmd = next(rest for w, rest in stages()["runtime"] if w == "CMD")
    config_path = json.loads(cmd)[-1]
    assert destinations[config_path] == "deploy/proxy.yaml"
    assert destinations[deploy_config().accounting.prices_file] == "config/prices.yaml"


def test_the_model_baking_step_runs(embedder: Any) -> None:
    """The Dockerfile's export command, run here against the session's model cache (already
    exported, so it only loads), leaves the file the next line of the Dockerfile tests for."""
    runs = [rest for w, rest in stages()["build"] if w == "RUN" and "_load_model" in rest]
    assert len(runs) == 1
    command, _, check = runs[0].partition("&&")
    code = shlex.split(command)[2]
    cache_dir = str(embedder._config.cache_dir)
    bake_dir = deploy_config().embedding.cache_dir
    assert f"cache_dir='{bake_dir}'" in code
    # the image bakes the variant the deploy config runs (a read-only image cannot make it later)
    assert f"quantize='{deploy_config().embedding.quantize}'" in code
    result = subprocess.run([sys.executable, "-c", code.replace(bake_dir, cache_dir)], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    expected = shlex.split(check)[-1].replace(bake_dir, cache_dir)
    assert Path(expected).is_file()
    assert "COPY --from=build /opt/venv /opt/venv" in (DEPLOY / "Dockerfile").read_text()
    assert f"COPY --from=build {bake_dir} {bake_dir}" in (DEPLOY / "Dockerfile").read_text()


# ------------------------------------------------------------------ configuration


def test_container_config_is_valid_and_names_real_backends() -> None:
    config = deploy_config()
    assert config.server.host == "0.0.0.0"
    names = [b.name for b in config.backends]
    table = parse_prices((ROOT / "config" / "prices.yaml").read_text())
    for name in names:
        assert table.profile(name) is not None, f"backend {name} has no energy profile"
    local = next(b for b in config.backends if b.type == "vllm")
    vllm = compose()["services"]["vllm"]
    url = urlparse(local.base_url)
    assert url.hostname == "vllm"
    assert str(url.port) == vllm["command"][vllm["command"].index("--port") + 1]
    redis = urlparse(config.store.redis_url)
    assert redis.hostname == "redis" and redis.port == 6379 and "redis" in compose()["services"]


# ------------------------------------------------------------------ docker-compose


def _mounts(service: dict[str, Any]) -> dict[str, str]:
    """container path -> host path, for bind mounts of files and folders in the project."""
    out = {}
    for volume in service.get("volumes", []):
        host, container, *_ = volume.split(":")
        if host.startswith("."):
            out[container] = host
    return out


def test_compose_services_profiles_and_paths() -> None:
    data = compose()
    services = data["services"]
    assert {"proxy", "redis", "prometheus", "grafana", "vllm"} <= services.keys()
    assert services["vllm"]["profiles"] == ["gpu"]
    assert all("profiles" not in s for n, s in services.items() if n != "vllm")
    build = services["proxy"]["build"]
    context = (DEPLOY / build["context"]).resolve()
    assert context == ROOT and (context / build["dockerfile"]).is_file()
    for name, service in services.items():
        for container, host in _mounts(service).items():
            assert (DEPLOY / host).exists(), f"{name}: {host} (for {container}) does not exist"
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if not source.startswith((".", "/")):
                assert source in data["volumes"], f"{name}: named volume {source} is not declared"
    proxy_mounts = _mounts(services["proxy"])
    assert proxy_mounts["/app/config/proxy.yaml"] == "./proxy.yaml"
    assert proxy_mounts[deploy_config().accounting.prices_file] == "../config/prices.yaml"


def test_compose_ports_match_the_configuration() -> None:
    services = compose()["services"]

    def ports(name: str) -> set[tuple[str, str]]:
        return {tuple(p.split(":")[-2:]) for p in services[name].get("ports", [])}  # type: ignore[misc]

    port = str(deploy_config().server.port)
    assert (port, port) in ports("proxy")
    assert ("9090", "9090") in ports("prometheus")        # Prometheus' default listen port
    assert ("3000", "3000") in ports("grafana")           # Grafana's default http_port
    assert ("8000", "8000") in ports("vllm")
    assert services["proxy"]["stop_grace_period"] == "20s"
    assert deploy_config().server.drain_timeout_s < 20


def test_prometheus_scrapes_the_proxy_and_vllm() -> None:
    config = load_yaml(DEPLOY / "prometheus.yml")
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert jobs.keys() == {"semcache", "vllm"}
    services = compose()["services"]
    for job in jobs.values():
        assert job["metrics_path"] == "/metrics"
        for target in job["static_configs"][0]["targets"]:
            host, port = target.split(":")
            assert host in services, f"{target}: no compose service {host}"
            assert (port, port) in {tuple(p.split(":")[-2:]) for p in services[host]["ports"]}
    assert jobs["semcache"]["static_configs"][0]["targets"] == [f"proxy:{deploy_config().server.port}"]
    prom = services["prometheus"]
    config_flag = next(c for c in prom["command"] if c.startswith("--config.file="))
    assert _mounts(prom)[config_flag.split("=", 1)[1]] == "./prometheus.yml"


def test_grafana_provisioning_points_at_the_dashboards() -> None:
    grafana = compose()["services"]["grafana"]
    mounts = _mounts(grafana)
    provisioning = DEPLOY / mounts["/etc/grafana/provisioning"]
    datasources = load_yaml(provisioning / "datasources" / "prometheus.yml")["datasources"]
    assert [d["type"] for d in datasources] == ["prometheus"]
    url = urlparse(datasources[0]["url"])
    assert url.hostname == "prometheus" and url.port == 9090
    providers = load_yaml(provisioning / "dashboards" / "semcache.yml")["providers"]
    path = providers[0]["options"]["path"]
    assert mounts[path] == "../dashboards"
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home.startswith(path + "/") and (ROOT / "dashboards" / Path(home).name).is_file()


# ------------------------------------------------------------------ Kubernetes


def test_servicemonitor_selects_the_proxy_service() -> None:
    monitor = load_yaml(DEPLOY / "servicemonitor.yaml")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1" and monitor["kind"] == "ServiceMonitor"
    endpoint = monitor["spec"]["endpoints"][0]
    assert endpoint["path"] == "/metrics" and endpoint["port"] == "http"
    selector = monitor["spec"]["selector"]["matchLabels"]
    services = []
    for path in sorted((DEPLOY / "k8s").rglob("*.y*ml")) if (DEPLOY / "k8s").is_dir() else []:
        for doc in yaml.safe_load_all(path.read_text()):
            if isinstance(doc, dict) and doc.get("kind") == "Service":
                labels = (doc.get("metadata") or {}).get("labels") or {}
                if all(labels.get(k) == v for k, v in selector.items()):
                    services.append((path, doc))
    if not services:
        pytest.skip("no Service manifest labelled for the ServiceMonitor in deploy/k8s/ yet")
    for path, service in services:
        names = {p.get("name"): p for p in service["spec"]["ports"]}
        assert "http" in names, f"{path}: the Service has no port named http"
        target = names["http"].get("targetPort", names["http"]["port"])
        assert target in ("http", deploy_config().server.port), f"{path}: http -> {target}"


# ------------------------------------------------------------------ dashboards


DASHBOARDS = sorted((ROOT / "dashboards").glob("*.json"))


def _panels(panels: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for panel in panels:
        out.append(panel)
        out += _panels(panel.get("panels", []))
    return out


@pytest.mark.parametrize("path", DASHBOARDS, ids=[p.stem for p in DASHBOARDS])
def test_dashboard_is_grafana_json_with_a_datasource_variable(path: Path) -> None:
    board = json.loads(path.read_text())
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource"
    assert variables["DS_PROMETHEUS"]["query"] == "prometheus"
    assert variables["job"]["datasource"]["uid"] == "${DS_PROMETHEUS}"
    assert "semcache" in board["tags"] and board["uid"].startswith("semcache-")
    panels = _panels(board["panels"])
    assert len({p["id"] for p in panels}) == len(panels)
    for panel in panels:
        pos = panel["gridPos"]
        assert pos["x"] + pos["w"] <= 24
        if panel["type"] == "row":
            continue
        where = f"{path.name}: {panel['title']}"
        assert panel["datasource"] == {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}, where
        assert panel["targets"], where
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${DS_PROMETHEUS}", where
            assert target["expr"].strip(), where
        defaults = panel["fieldConfig"]["defaults"]
        assert defaults.get("unit"), f"{where}: no unit"
        steps = defaults["thresholds"]["steps"]
        assert steps and steps[0]["value"] is None, f"{where}: thresholds need a base step"
        assert panel.get("description"), f"{where}: no description"
    no_hardcoded_uid = re.findall(r'"uid":\s*"(?!\$\{DS_PROMETHEUS\}|semcache-)[^"]*"', path.read_text())
    assert not no_hardcoded_uid, f"{path.name}: hard-coded datasource uids {no_hardcoded_uid}"


def test_the_four_dashboards_exist_with_unique_uids() -> None:
    uids = [json.loads(p.read_text())["uid"] for p in DASHBOARDS]
    assert len(set(uids)) == len(uids)
    assert {p.stem for p in DASHBOARDS} >= {"overview", "savings", "cache-quality", "batching"}
