"""Operating the chart on a cluster (issue 16): what a preemption, a drain, an upgrade, a model download or a
protected Redis meets in the rendered objects. Real Helm renders them; kubernetes-validate checks each new
object; torch and the pod's own scripts read the rendered values where they can run here."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from cadence.config import load_run_config, parse_run_config

from .rendering import CHART, REPO, container, env, find

GPU_SCENARIOS = ["gpu-multi-node-trainer", "gpu-single-node", "gpu-single-node-8gpu"]
GIB = 1 << 30


def _validate(doc: dict[str, Any]) -> None:
    kubernetes_validate.validate(doc, "1.29", strict=True)


def _run_config(docs: list[dict[str, Any]]) -> Any:
    configmap = find(docs, "ConfigMap", "rel-cadence-run")
    return parse_run_config(yaml.safe_load(configmap["data"]["run.yaml"]))


def _gib(quantity: str) -> int:
    assert quantity.endswith("Gi"), quantity
    return int(quantity.removesuffix("Gi"))


# --- 3: preemption --------------------------------------------------------------------------------------------


def test_torchrun_lets_workers_checkpoint_within_the_pod_grace(rendered: dict[str, list[dict]]) -> None:
    """torchrun's own shutdown timeout (default 30 s) must not cut the SIGTERM checkpoint short."""
    from torch.distributed.launcher.api import LaunchConfig

    trainer = find(rendered["gpu-multi-node-trainer"], "StatefulSet", "rel-cadence-trainer")
    grace = trainer["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    variables = env(container(trainer, "trainer"))
    saved = os.environ.pop("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", None)
    if "TORCH_ELASTIC_SHUTDOWN_TIMEOUT" in variables:  # absent: torchrun's own default
        os.environ["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"] = variables["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"]
    try:
        launch = LaunchConfig(min_nodes=2, max_nodes=2, nproc_per_node=8)  # what torchrun builds from that env
    finally:
        os.environ.pop("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", None)
        if saved is not None:
            os.environ["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"] = saved
    assert grace - 30 <= launch.shutdown_timeout < grace, (launch.shutdown_timeout, grace)


def test_long_runs_checkpoint_often_enough_to_resume_near_a_preemption(rendered: dict[str, list[dict]]) -> None:
    """Every GPU scenario and every paper config checkpoints at least 10 times per run."""
    configs = [(name, _run_config(rendered[name])) for name in GPU_SCENARIOS]
    paper = [path for path in sorted((REPO / "configs").glob("*.yaml")) if not path.name.startswith("toy")]
    configs += [(path.name, load_run_config(path)) for path in paper]
    long_runs = [(name, config) for name, config in configs if config.steps >= 200]
    assert len(long_runs) >= 10
    for name, config in long_runs:
        assert 0 < config.checkpoint_every <= config.steps // 10, (name, config.checkpoint_every, config.steps)


# --- 5: the broker sized from the model -----------------------------------------------------------------------


def _broker(docs: list[dict[str, Any]]) -> tuple[int, dict[str, Any], dict[str, Any] | None]:
    broker = find(docs, "Deployment", "rel-cadence-broker")
    budget = int(env(container(broker, "broker"))["CADENCE_MAX_BYTES"])
    claims = [d for d in docs if d["kind"] == "PersistentVolumeClaim" and d["metadata"]["name"] == "rel-cadence-broker"]
    return budget, container(broker, "broker")["resources"], claims[0] if claims else None


@pytest.mark.parametrize(
    ("name", "params", "in_memory"),
    [("gpu-single-node", 1.5e9, True), ("gpu-multi-node-trainer", 8e9, False), ("gpu-single-node-8gpu", 8e9, False)],
)
def test_broker_holds_retain_plus_one_versions_of_the_model(
    rendered: dict[str, list[dict]], name: str, params: float, in_memory: bool
) -> None:
    """The old fixed 16 GiB budget refused the second 8B version; the 4 GiB memory limit could not hold one 1.5B."""
    budget, resources, claim = _broker(rendered[name])
    version = params * 2  # bf16
    assert budget >= 3 * version  # retain 2 + the publish in flight
    if in_memory:
        assert claim is None
        assert _gib(resources["limits"]["memory"]) * GIB >= budget + GIB
        assert resources["requests"]["memory"] == resources["limits"]["memory"]
    else:
        assert claim is not None and _gib(claim["spec"]["resources"]["requests"]["storage"]) * GIB >= budget
    _validate(find(rendered[name], "Deployment", "rel-cadence-broker"))


def test_broker_sizing_follows_values_and_refuses_an_unsized_gpu_release(render_values) -> None:
    docs = render_values({"models": {"parametersBillions": 70}, "broker": {"retain": 1}})
    budget, resources, _ = _broker(docs)
    assert budget == 2 * 140 * 10**9 and _gib(resources["limits"]["memory"]) == 262  # ceil(280e9 / GiB) + 1
    docs = render_values({"broker": {"maxBytes": 5 * GIB, "resources": {"limits": {"cpu": "1", "memory": "9Gi"}}}})
    budget, resources, _ = _broker(docs)
    assert budget == 5 * GIB and resources["limits"]["memory"] == "9Gi" and resources["requests"]["memory"] == "6Gi"
    import helm_python

    with pytest.raises(helm_python.HelmRenderError, match=r"models.parametersBillions is required with GPUs"):
        render_values({"inference": {"gpus": 1}})


def test_a_spilling_broker_is_sized_by_its_memory_ceiling_and_keeps_the_rest_on_a_volume(
    render_values, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """broker.spill: the pod holds one 70B version in memory (not the whole 3-version budget); the rest goes
    to a volume of the budget + 25%. The broker built from the rendered environment is the spilling store."""
    from cadence.broker.directory_store import SpillingStore
    from cadence.broker.factory import open_store
    from cadence.broker.settings import BrokerSettings

    docs = render_values({"models": {"parametersBillions": 70}, "broker": {"spill": {"enabled": True}}})
    broker = find(docs, "Deployment", "rel-cadence-broker")
    variables = env(container(broker, "broker"))
    budget, resources, claim = _broker(docs)
    assert claim is None and budget == 3 * 140 * 10**9
    assert int(variables["CADENCE_MEMORY_BYTES"]) == 140 * 10**9  # one version
    assert _gib(resources["limits"]["memory"]) == 132  # ceil(140e9 / GiB) + 1, not the budget's 393
    mounts = {m["name"]: m["mountPath"] for m in container(broker, "broker")["volumeMounts"]}
    assert mounts["spill"] == variables["CADENCE_SPILL_DIR"]
    volume = next(v for v in broker["spec"]["template"]["spec"]["volumes"] if v["name"] == "spill")
    assert volume["emptyDir"]["sizeLimit"] == "489Gi"  # ceil(1.25 × 420e9 / GiB)
    _validate(broker)
    for name, value in variables.items():
        if name.startswith("CADENCE_") and isinstance(value, str):
            monkeypatch.setenv(name, value)
    monkeypatch.setenv("CADENCE_SPILL_DIR", str(tmp_path / "spill"))  # the mount, here
    settings = BrokerSettings()
    store = open_store(settings.store, settings.retain, settings.max_bytes, settings.memory_bytes, settings.spill_dir)
    assert isinstance(store, SpillingStore) and (store.memory_bytes, store.max_bytes) == (140 * 10**9, budget)

    values = {"spill": {"enabled": True, "memoryBytes": 8 * GIB, "storageClass": "fast-ssd", "size": "600Gi"}}
    broker = find(
        render_values({"models": {"parametersBillions": 70}, "broker": values}), "Deployment", "rel-cadence-broker"
    )
    assert _gib(container(broker, "broker")["resources"]["limits"]["memory"]) == 9
    volume = next(v for v in broker["spec"]["template"]["spec"]["volumes"] if v["name"] == "spill")
    claim_spec = volume["ephemeral"]["volumeClaimTemplate"]["spec"]
    assert claim_spec["storageClassName"] == "fast-ssd" and claim_spec["resources"]["requests"]["storage"] == "600Gi"
    _validate(broker)
    import helm_python

    with pytest.raises(helm_python.HelmRenderError, match=r"broker.spill is for the in-memory store"):
        render_values({"broker": {"spill": {"enabled": True}, "persistence": {"enabled": True}}})


# --- 7: KEDA --------------------------------------------------------------------------------------------------


def test_keda_reaches_redis_from_its_own_namespace(rendered: dict[str, list[dict]]) -> None:
    for doc in (d for d in rendered["keda"] if d["kind"] == "ScaledObject"):
        address = doc["spec"]["triggers"][0]["metadata"]["address"]
        assert address == "rel-cadence-redis.cadence.svc.cluster.local:6379"


def test_keda_authenticates_to_a_protected_external_redis(render_values) -> None:
    values = {
        "redis": {"enabled": False, "external": {"existingSecret": "redis-url", "secretKey": "url"}},
        "keda": {
            "enabled": True,
            "redisAddress": "redis.example.internal:6380",
            "auth": {"existingSecret": "redis-auth", "passwordKey": "pw", "usernameKey": "user", "enableTLS": True},
        },
    }
    docs = render_values(values)
    (auth,) = [d for d in docs if d["kind"] == "TriggerAuthentication"]
    assert auth["apiVersion"] == "keda.sh/v1alpha1" and auth["metadata"]["namespace"] == "cadence"
    refs = {ref["parameter"]: (ref["name"], ref["key"]) for ref in auth["spec"]["secretTargetRef"]}
    assert refs == {"password": ("redis-auth", "pw"), "username": ("redis-auth", "user")}
    for scaled in (d for d in docs if d["kind"] == "ScaledObject"):
        (trigger,) = scaled["spec"]["triggers"]
        assert trigger["authenticationRef"] == {"name": auth["metadata"]["name"]}
        assert trigger["metadata"]["address"] == "redis.example.internal:6380"
        assert trigger["metadata"]["enableTLS"] == "true" and "password" not in trigger["metadata"]


# --- 8: models on a cluster -----------------------------------------------------------------------------------


def test_a_job_downloads_gated_models_and_model_pods_wait_for_them(rendered: dict[str, list[dict]]) -> None:
    docs = rendered["gpu-single-node-8gpu"]
    (job,) = [d for d in docs if d["kind"] == "Job"]
    _validate(job)
    download = job["spec"]["template"]["spec"]["containers"][0]
    assert download["command"][-1] == "meta-llama/Llama-3.1-8B-Instruct"
    # the token reaches huggingface_hub as a mounted file, never as an environment value
    assert env(download)["HF_TOKEN_PATH"] == "/var/run/secrets/cadence/hf/token"
    assert "HF_TOKEN" not in env(download)
    volumes = {v["name"]: v for v in job["spec"]["template"]["spec"]["volumes"]}
    assert volumes["hf-token"]["secret"]["secretName"] == "hf-token"
    assert volumes["hf-token"]["secret"]["items"] == [{"key": "token", "path": "token"}]
    mounts = {m["name"]: m["mountPath"] for m in download["volumeMounts"]}
    assert mounts["hf-token"] == "/var/run/secrets/cadence/hf"
    assert volumes["models"]["persistentVolumeClaim"] == {"claimName": "cadence-models"}  # read-write for the Job only
    inference = find(docs, "Deployment", "rel-cadence-inference")
    model = env(container(inference, "inference"))["CADENCE_MODEL"]
    assert model == "/models/meta-llama/Llama-3.1-8B-Instruct" == _run_config(docs).model.path
    for workload in (inference, find(docs, "StatefulSet", "rel-cadence-trainer")):
        (wait,) = [c for c in workload["spec"]["template"]["spec"]["initContainers"] if c["name"] == "wait-models"]
        assert wait["command"][-1] == f"{model}/.cadence-complete"
        assert env(wait) == {} or "HF_TOKEN" not in env(wait)
    assert "initContainers" not in find(docs, "Deployment", "rel-cadence-reward")["spec"]["template"]["spec"]


def test_the_wait_init_container_waits_for_the_marker_the_job_writes(rendered: dict[str, list[dict]], tmp_path) -> None:
    """Run the rendered wait command as the pod would: it blocks without the marker and returns once it exists."""
    inference = find(rendered["gpu-single-node-8gpu"], "Deployment", "rel-cadence-inference")
    (wait,) = inference["spec"]["template"]["spec"]["initContainers"]
    marker = tmp_path / "meta-llama" / "Llama-3.1-8B-Instruct" / ".cadence-complete"
    command = [sys.executable, *wait["command"][1:-1], str(marker)]
    waiting = subprocess.Popen(command)
    with pytest.raises(subprocess.TimeoutExpired):
        waiting.wait(timeout=1.5)
    marker.parent.mkdir(parents=True)
    marker.write_text("ok\n")
    assert waiting.wait(timeout=15) == 0


def test_the_download_job_needs_a_claim_and_repos(render_values) -> None:
    import helm_python

    with pytest.raises(helm_python.HelmRenderError, match=r"models.download needs models.existingClaim"):
        render_values({"models": {"download": {"enabled": True, "repos": ["org/model"]}}})
    with pytest.raises(helm_python.HelmRenderError, match=r"models.download.repos is empty"):
        render_values({"models": {"existingClaim": "m", "download": {"enabled": True}}})


# --- 9: operations --------------------------------------------------------------------------------------------


def _disruptions_allowed(pdb: dict[str, Any], healthy: int, expected: int) -> int:
    """The disruption controller's arithmetic for an integer maxUnavailable/minAvailable."""
    spec = pdb["spec"]
    desired = expected - spec["maxUnavailable"] if "maxUnavailable" in spec else spec["minAvailable"]
    return max(0, healthy - desired)


@pytest.mark.parametrize("name", ["default", *GPU_SCENARIOS])
def test_pdbs_let_a_drain_through(rendered: dict[str, list[dict]], name: str) -> None:
    docs = rendered[name]
    for pdb in (d for d in docs if d["kind"] == "PodDisruptionBudget"):
        component = pdb["metadata"]["labels"]["app.kubernetes.io/component"]
        workload = next(
            d
            for d in docs
            if d["kind"] in ("Deployment", "StatefulSet") and d["metadata"]["name"] == f"rel-cadence-{component}"
        )
        replicas = workload["spec"].get("replicas", 1)
        assert _disruptions_allowed(pdb, replicas, replicas) >= (1 if replicas else 0), pdb["metadata"]["name"]
        assert pdb["spec"]["unhealthyPodEvictionPolicy"] == "AlwaysAllow"
        _validate(pdb)


def test_gpu_deployments_roll_without_a_surge_pod(rendered: dict[str, list[dict]]) -> None:
    for name in GPU_SCENARIOS:
        for service in ("inference", "reward"):
            deployment = find(rendered[name], "Deployment", f"rel-cadence-{service}")
            gpus = container(deployment, service)["resources"]["limits"].get("nvidia.com/gpu", 0)
            strategy = deployment["spec"].get("strategy", {})
            if gpus:
                assert strategy["rollingUpdate"] == {"maxSurge": 0, "maxUnavailable": 1}, (name, service)


@pytest.mark.parametrize("name", ["default", *GPU_SCENARIOS])
def test_trainer_pods_are_never_rolled_one_by_one(rendered: dict[str, list[dict]], name: str) -> None:
    trainer = find(rendered[name], "StatefulSet", "rel-cadence-trainer")
    assert trainer["spec"]["podManagementPolicy"] == "Parallel"
    assert trainer["spec"]["updateStrategy"] == {"type": "OnDelete"}


def test_scrapers_reach_reward_metrics_when_the_api_is_restricted(render_values) -> None:
    docs = render_values({"networkPolicy": {"rewardApiFrom": [{"podSelector": {"matchLabels": {"api": "yes"}}}]}})
    metrics = find(docs, "NetworkPolicy", "rel-cadence-metrics")
    (rule,) = metrics["spec"]["ingress"]
    assert 8000 in {port["port"] for port in rule["ports"]}
    assert rule["from"] == [{"namespaceSelector": {}}]


def _ingress_matches(paths: list[dict[str, Any]], request: str) -> bool:
    """Kubernetes path matching: Exact is equality, Prefix matches whole path elements."""
    for path in paths:
        target = path["path"]
        if path["pathType"] == "Exact" and request == target:
            return True
        if path["pathType"] == "Prefix" and (target == "/" or request == target or request.startswith(target + "/")):
            return True
    return False


def test_reward_ingress_serves_the_api_but_not_metrics(rendered: dict[str, list[dict]]) -> None:
    (ingress,) = [d for d in rendered["external-redis"] if d["kind"] == "Ingress"]
    _validate(ingress)
    paths = ingress["spec"]["rules"][0]["http"]["paths"]
    for request in ("/v1/score", "/v1/reward", "/get_reward", "/healthz", "/readyz"):
        assert _ingress_matches(paths, request), request
    for request in ("/metrics", "/metrics/", "/docs"):
        assert not _ingress_matches(paths, request), request


@pytest.mark.parametrize("name", ["default", "keda", "gpu-single-node-8gpu"])
def test_helm_test_hook_checks_every_service(rendered: dict[str, list[dict]], name: str) -> None:
    docs = rendered[name]
    (pod,) = [d for d in docs if d["kind"] == "Pod"]
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    _validate(pod)
    args = pod["spec"]["containers"][0]["command"][3:]
    assert args == [
        "rel-cadence-broker:50053",
        "rel-cadence-inference:50051",
        "rel-cadence-trainer:50054",
        "http://rel-cadence-reward:8000/readyz",
    ]
    allow = find(docs, "NetworkPolicy", "rel-cadence-helm-test")
    (rule,) = allow["spec"]["ingress"]
    assert {p["port"] for p in rule["ports"]} >= {50051, 50053, 50054, 8000}
    selector = rule["from"][0]["podSelector"]["matchLabels"]
    assert all(pod["metadata"]["labels"][key] == value for key, value in selector.items())


def test_the_dashboard_has_the_stream_lag_panel_the_readme_promises() -> None:
    """The lag KEDA's redis-streams scalers read, as KEDA's operator exports it (the ScaledObjects' names)."""
    import json

    dashboard = json.loads((CHART / "dashboards" / "cadence.json").read_text())
    panels = [panel for panel in dashboard["panels"] if "lag" in panel.get("title", "").lower()]
    exprs = [target["expr"] for panel in panels for target in panel.get("targets", [])]
    assert exprs and all("keda_scaler_metrics_value" in expr for expr in exprs)
    assert "stream lag" in (CHART / "README.md").read_text()


@pytest.mark.parametrize("name", [*GPU_SCENARIOS, "cpu-tiny", "default", "keda", "external-redis"])
def test_every_emptydir_has_a_size_limit(rendered: dict[str, list[dict]], name: str) -> None:
    pods = [d["spec"]["template"]["spec"] for d in rendered[name] if d["kind"] in ("Deployment", "StatefulSet", "Job")]
    pods += [d["spec"] for d in rendered[name] if d["kind"] == "Pod"]
    assert len(pods) >= 5
    for spec in pods:
        for volume in spec.get("volumes", []):
            if "emptyDir" in volume:
                assert volume["emptyDir"].get("sizeLimit"), (name, volume["name"])


def test_gpu_scenarios_generate_the_papers_lengths(rendered: dict[str, list[dict]]) -> None:
    paper = {"math": load_run_config(REPO / "configs" / "numina-online-dpo.yaml").sampling.max_tokens}
    paper["chat"] = load_run_config(REPO / "configs" / "wildchat-online-dpo.yaml").sampling.max_tokens
    for name in GPU_SCENARIOS:
        config = _run_config(rendered[name])
        (kind,) = config.task_kinds
        assert config.sampling.max_tokens == paper[kind], name


def test_the_single_node_scenario_fits_eight_gpus(rendered: dict[str, list[dict]]) -> None:
    docs = rendered["gpu-single-node-8gpu"]
    total = 0
    for doc in docs:
        if doc["kind"] not in ("Deployment", "StatefulSet"):
            continue
        replicas = doc["spec"].get("replicas", 1)
        for c in doc["spec"]["template"]["spec"]["containers"]:
            total += replicas * int(c["resources"]["limits"].get("nvidia.com/gpu", 0))
        assert not doc["spec"]["template"]["spec"].get("affinity"), "one node: nothing may spread the pods"
    assert total == 8
    trainer = find(docs, "StatefulSet", "rel-cadence-trainer")
    main = container(trainer, "trainer")
    assert trainer["spec"]["replicas"] == 1 and main["command"] == ["torchrun"]
    assert env(main)["CADENCE_NPROC_PER_NODE"] == "4" and env(main)["CADENCE_NNODES"] == "1"


def test_the_chart_trainer_takes_runs_from_its_configmap_only(rendered: dict[str, list[dict]]) -> None:
    """One submission path on Kubernetes: `cadence k8s submit` (ConfigMap); `cadence run --attach` is compose's."""
    from typer.testing import CliRunner

    from cadence.app.cli import app

    for name, docs in rendered.items():
        trainer = find(docs, "StatefulSet", "rel-cadence-trainer")
        assert env(container(trainer, "trainer"))["CADENCE_CONFIG"] == "/etc/cadence/run/run.yaml", name
    help_text = " ".join(CliRunner().invoke(app, ["run", "--help"], terminal_width=200).output.split())
    attach = help_text.split("--attach", 1)[1]
    assert "docker-compose" in attach and "cadence k8s submit" in attach
    assert "cadence k8s submit" in (CHART / "README.md").read_text().split("## Operating Cadence on a cluster")[1]
