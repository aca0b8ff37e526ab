"""infra/k8s/ and the work pool's job template, checked statically (no cluster here or in CI): every object
validates against the Kubernetes API's JSON schemas (kubernetes-validate ships them; strict: an unknown
field is an error, as it would be silently dropped by the API server), and the names that tie the pieces
together agree, since a typo there fails only at run time on a cluster: Service selectors, the shared
volume, the Dask scheduler's address, the training job's rendezvous, the checkout path.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from prefect.utilities.templating import apply_values

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "infra" / "k8s"
TEMPLATE = json.loads((ROOT / "infra" / "k8s-base-job-template.json").read_text())
VERSIONS = ["1.29", kubernetes_validate.latest_version()]  # the oldest cluster supported, and the newest
SECRETISH = re.compile(r"PASSWORD|SECRET|TOKEN|ACCESS_KEY|CREDENTIAL", re.IGNORECASE)
WORK_MOUNT = "/work"  # every pod mounts the shared volume here: the paths a task carries mean the same everywhere


def manifests() -> dict[str, list[dict[str, Any]]]:
    """Each YAML file of infra/k8s/ (but the kustomization) -> its objects."""
    return {p.name: [d for d in yaml.safe_load_all(p.read_text()) if d]
            for p in sorted(K8S.glob("*.yaml")) if p.name != "kustomization.yaml"}


def rendered_job(values: dict[str, Any]) -> dict[str, Any]:
    """The flow-run Job as the Prefect Kubernetes worker submits it: the template's placeholders filled
    from the variables' defaults and `values` (a placeholder left unset drops its key), then the
    worker's own steps: env as a list (its variables first, then the template's list), args split
    (prefect-kubernetes' KubernetesWorkerJobConfiguration.prepare_for_flow_run)."""
    props = TEMPLATE["variables"]["properties"]
    defaults = {k: v["default"] for k, v in props.items() if "default" in v}
    config = apply_values(TEMPLATE["job_configuration"], defaults | values)
    job = config["job_manifest"]
    container = job["spec"]["template"]["spec"]["containers"][0]
    own = container.get("env")  # a list of the template's own, or the `{{ env }}` dict the worker replaces
    own = own if isinstance(own, list) else []
    container["env"] = [{"name": k, "value": v} for k, v in config["env"].items()] + own
    container["args"] = shlex.split(container["args"])
    return job


FLOW_RUN_VALUES = {  # what a worker passes for a flow run: the pool's and deployment's job variables
    "defaults": {"name": "kd-distill-run", "command": "prefect flow-run execute"},
    "every variable": {"name": "kd-distill-run", "command": "prefect flow-run execute",
                       "labels": {"prefect.io/flow-run-id": "0d1e"}, "env": {"PREFECT_API_URL": "http://prefect:4200/api"},
                       "image": "registry.example/kd:abc123", "service_account_name": "kd", "cpu_limit": "8",
                       "memory_limit": "32Gi", "gpu_limit": 1, "job_watch_timeout_seconds": 60},
}


def objects() -> list[tuple[str, dict[str, Any]]]:
    """(where, object) for every manifest and for the rendered flow-run Job."""
    found = [(f"{name}: {o['kind']}/{o['metadata']['name']}", o) for name, objs in manifests().items() for o in objs]
    return found + [(f"k8s-base-job-template.json ({case})", rendered_job(v)) for case, v in FLOW_RUN_VALUES.items()]


def pod_spec(obj: dict[str, Any]) -> dict[str, Any] | None:
    return obj["spec"]["template"]["spec"] if obj["kind"] in ("Deployment", "Job") else None


def pod_labels(obj: dict[str, Any]) -> dict[str, str]:
    return obj["spec"]["template"].get("metadata", {}).get("labels", {})


def by_kind(kind: str) -> dict[str, dict[str, Any]]:
    return {o["metadata"]["name"]: o for objs in manifests().values() for o in objs if o["kind"] == kind}


def env_of(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container.get("env", [])}


@pytest.mark.parametrize(("where", "obj"), objects(), ids=[where for where, _ in objects()])
def test_validates_against_the_kubernetes_schemas(where: str, obj: dict[str, Any]) -> None:
    for version in VERSIONS:
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{where} (Kubernetes {version}): {'.'.join(map(str, exc.path))}: {exc.message}")


def test_kustomization_lists_the_standing_manifests() -> None:
    """`kubectl apply -k infra/k8s` applies everything but the per-run training job, in the pool's namespace."""
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert sorted(kustomization["resources"]) == sorted(set(manifests()) - {"train-multinode.yaml"})
    assert kustomization["namespace"] == TEMPLATE["variables"]["properties"]["namespace"]["default"]


def test_every_service_selects_pods_on_its_ports() -> None:
    workloads = [o for objs in manifests().values() for o in objs if pod_spec(o) is not None]
    for name, svc in by_kind("Service").items():
        selector = svc["spec"]["selector"]
        selected = [w for w in workloads if selector.items() <= pod_labels(w).items()]
        assert len(selected) == 1, f"Service {name} selects {len(selected)} workloads"
        ports = {p.get("name") for c in pod_spec(selected[0])["containers"] for p in c.get("ports", [])}
        assert {p["targetPort"] for p in svc["spec"]["ports"]} <= ports, name
    for name, deploy in by_kind("Deployment").items():
        assert deploy["spec"]["selector"]["matchLabels"].items() <= pod_labels(deploy).items(), name


def test_every_pod_mounts_the_one_shared_volume_at_the_same_path() -> None:
    claims = by_kind("PersistentVolumeClaim")
    assert [c["spec"]["accessModes"] for c in claims.values()] == [["ReadWriteMany"]], "one RWX claim"
    for where, obj in objects():
        if (spec := pod_spec(obj)) is None:
            continue
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        for container in spec["containers"]:
            for mount in container.get("volumeMounts", []):
                if "persistentVolumeClaim" in volumes[mount["name"]]:
                    assert volumes[mount["name"]]["persistentVolumeClaim"]["claimName"] in claims, where
                    assert mount["mountPath"] == WORK_MOUNT, where
    assert TEMPLATE["variables"]["properties"]["work_claim"]["default"] in claims


def test_the_flow_run_reaches_the_dask_scheduler_service() -> None:
    """The template's default KD_DASK_ADDRESS and every worker's scheduler are the Service's name and port."""
    service = by_kind("Service")["kd-dask-scheduler"]
    (port,) = service["spec"]["ports"]
    address = f"tcp://{service['metadata']['name']}:{port['port']}"
    job = rendered_job(FLOW_RUN_VALUES["defaults"])
    assert env_of(job["spec"]["template"]["spec"]["containers"][0])["KD_DASK_ADDRESS"]["value"] == address
    workers = [d for d in by_kind("Deployment").values() if d["metadata"]["name"].startswith("kd-dask-worker")]
    assert len(workers) == 2  # CPU and GPU
    for worker in workers:
        (container,) = pod_spec(worker)["containers"]
        assert container["args"][:3] == ["dask", "worker", address]
        assert env_of(container)["PYTHONPATH"]["value"] == checkout()
    gpu = pod_spec(by_kind("Deployment")["kd-dask-worker-gpu"])["containers"][0]
    assert gpu["resources"]["limits"]["nvidia.com/gpu"] == 1


def test_the_cache_stage_takes_the_address_the_template_passes(monkeypatch: pytest.MonkeyPatch) -> None:
    """KD_DASK_ADDRESS overrides cache.dask_address (and selects the Dask runner) without being a param."""
    from kd_core.config import Params
    from kd_core.stages import cache_logits

    params = Params(cache={"dask_address": "tcp://elsewhere:8786"})
    monkeypatch.delenv("KD_DASK_ADDRESS", raising=False)
    assert cache_logits.dask_address(params) == "tcp://elsewhere:8786"
    monkeypatch.setenv("KD_DASK_ADDRESS", "tcp://kd-dask-scheduler:8786")
    assert cache_logits.dask_address(params) == "tcp://kd-dask-scheduler:8786"
    assert cache_logits._runner(Params()) == "dask"
    monkeypatch.setenv("KD_DASK_ADDRESS", "")
    assert cache_logits._runner(Params()) == "serial"


def checkout() -> str:
    """Where the kubernetes deployment's flow run clones the project: the template's workingDir plus the
    clone's directory name (prefect.yaml); the Dask workers and training pods run from there."""
    (deployment,) = [d for d in yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"]
                     if d["work_pool"]["name"] == "kd-kubernetes"]
    clone = deployment["pull"][0]["prefect.deployments.steps.git_clone"]["clone_directory_name"]
    workdir = TEMPLATE["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]["containers"][0]["workingDir"]
    return f"{workdir}/{clone}"


def documented_train_params() -> dict[str, dict[str, Any]]:
    """The `train:` params of the multi-node Job, as its header comment and the docs page give them."""
    header = re.search(r"^#\s+(train: \{.*\})$", (K8S / "train-multinode.yaml").read_text(), re.MULTILINE)
    page = (ROOT / "docs" / "kubernetes.md").read_text()
    blocks = [yaml.safe_load(b) for b in re.findall(r"```yaml\n(.*?)```", page, re.DOTALL) if "train:" in b]
    assert header and len(blocks) == 1
    return {"train-multinode.yaml": yaml.safe_load(header.group(1))["train"], "docs/kubernetes.md": blocks[0]["train"]}


def test_training_is_an_indexed_job_with_a_headless_rendezvous() -> None:
    job = by_kind("Job")["kd-train"]
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed" and spec["completions"] == spec["parallelism"] >= 2
    pod = pod_spec(job)
    service = by_kind("Service")[pod["subdomain"]]
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["selector"].items() <= pod_labels(job).items()
    (container,) = pod["containers"]
    env = env_of(container)
    # node rank = completion index (KD_NODE_RANK overrides train.node_rank); the rendezvous
    # (train.rdzv_endpoint) is node 0's stable name under the headless Service
    assert env["KD_NODE_RANK"]["valueFrom"]["fieldRef"]["fieldPath"] == \
        "metadata.annotations['batch.kubernetes.io/job-completion-index']"
    (port,) = service["spec"]["ports"]
    node0 = f"{job['metadata']['name']}-0.{service['metadata']['name']}"
    assert {p["containerPort"] for p in container["ports"]} == {port["port"]}
    assert container["workingDir"] == env["PYTHONPATH"]["value"] == checkout()
    # the params.yaml the Job needs, as the manifest's header and docs/kubernetes.md tell it
    for where, train in documented_train_params().items():
        assert train["rdzv_endpoint"] == f"{node0}:{port['port']}", where
        assert train["nnodes"] == spec["completions"], where
        assert train["nproc"] == container["resources"]["limits"]["nvidia.com/gpu"], where
    assert "dvc repro --force --single-item train_student" in container["args"][0]
    assert "kd stage train_student" in container["args"][0]


def test_nothing_is_exposed_privileged_or_secret() -> None:
    """ClusterIP only, no host networking or ports, non-root with no capabilities, credentials from a
    Secret by reference: the same rules as the flow-run job's."""
    for where, obj in objects():
        assert obj["kind"] != "Secret", where
        if obj["kind"] == "Service":
            assert obj["spec"].get("type", "ClusterIP") == "ClusterIP", where
        spec = pod_spec(obj)
        if spec is None:
            continue
        assert not any(spec.get(k) for k in ("hostNetwork", "hostPID", "hostIPC")), where
        assert spec["securityContext"]["runAsNonRoot"] is True and spec["securityContext"]["runAsUser"] != 0, where
        for container in spec["containers"]:
            ctx = container["securityContext"]
            assert ctx["allowPrivilegeEscalation"] is False and ctx["capabilities"]["drop"] == ["ALL"], where
            assert not ctx.get("privileged") and ctx.get("runAsUser") != 0, where
            assert not any(p.get("hostPort") for p in container.get("ports", [])), where
            for name, entry in env_of(container).items():
                assert not SECRETISH.search(name) or "valueFrom" in entry, f"{where}: {name} written down"


def test_every_kd_pod_is_inside_the_network_policy_and_runs_one_image() -> None:
    """The policy admits only kd's pods; every pod of kd carries its label, so none is shut out, and all
    run the flow run's image: a Dask client, scheduler and workers must run the same dask."""
    (policy,) = by_kind("NetworkPolicy").values()
    label = policy["spec"]["podSelector"]["matchLabels"]
    assert policy["spec"]["ingress"] == [{"from": [{"podSelector": {"matchLabels": label}}]}]
    image = TEMPLATE["variables"]["properties"]["image"]["default"]
    for where, obj in objects():
        if pod_spec(obj) is not None:
            assert label.items() <= pod_labels(obj).items(), where
            if "template" not in where:
                assert {c["image"] for c in pod_spec(obj)["containers"]} == {image}, where
