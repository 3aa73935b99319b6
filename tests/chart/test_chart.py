"""The Helm chart as real Helm renders it: what must hold in every rendered object (hardening, probes,
resources, GPUs, labels, network paths). Its lint, schema and checkov checks: test_chart_tools.py."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from cadence.config import parse_run_config

from .rendering import CHART, SCENARIOS, container, env, find, workloads

GRPC_PORTS = {"inference": 50051, "broker": 50053, "trainer": 50054}
LABELS = (
    "app.kubernetes.io/name",
    "app.kubernetes.io/instance",
    "app.kubernetes.io/component",
    "app.kubernetes.io/version",
    "app.kubernetes.io/managed-by",
    "app.kubernetes.io/part-of",
    "helm.sh/chart",
)


def _pod_specs(docs: list[dict]) -> Iterator[tuple[str, dict]]:
    for doc in workloads(docs):
        yield doc["metadata"]["name"], doc["spec"]["template"]["spec"]


@pytest.mark.parametrize("name", [*SCENARIOS, "default"])
def test_every_container_is_hardened_sized_and_probed(rendered: dict[str, list[dict]], name: str) -> None:
    for workload, spec in _pod_specs(rendered[name]):
        assert spec["automountServiceAccountToken"] is False, workload
        pod_sc = spec["securityContext"]
        assert pod_sc["runAsNonRoot"] is True and pod_sc["seccompProfile"] == {"type": "RuntimeDefault"}, workload
        for c in [*spec.get("initContainers", []), *spec["containers"]]:
            sc = c["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False, (workload, c)
            assert sc["capabilities"] == {"drop": ["ALL"]} and sc["runAsNonRoot"] is True, (workload, c)
            assert sc["runAsUser"] >= 10000 and sc["seccompProfile"] == {"type": "RuntimeDefault"}
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(c["resources"][kind]), (workload, c["name"], kind)
        for c in spec["containers"]:
            assert {"startupProbe", "livenessProbe", "readinessProbe"} <= set(c), (workload, c["name"])
            mounts = {m["mountPath"] for m in c["volumeMounts"]}
            assert "/tmp" in mounts, f"{workload}: read-only root needs a writable /tmp"
            multi_node = c["name"] == "trainer" and name == "gpu-multi-node-trainer"
            if c["name"] in GRPC_PORTS and not multi_node:  # native gRPC probes on the grpc.health.v1 service
                for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
                    assert c[probe]["grpc"] == {"port": GRPC_PORTS[c["name"]]}, (workload, probe)
            if multi_node:  # only global rank 0 serves gRPC: pod 0 checks it, the others pass while alive
                command = c["livenessProbe"]["exec"]["command"]
                assert command[:2] == ["python", "-c"] and "CADENCE_NODE_RANK'] != '0' or wait_healthy(" in command[2]
                assert "127.0.0.1:50054" in command[2]
            if c["name"] == "reward":
                assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"


def _gpus(workload: dict, name: str, resource: str = "nvidia.com/gpu") -> tuple[Any, Any]:
    resources = container(workload, name)["resources"]
    return resources["requests"].get(resource), resources["limits"].get(resource)


def test_gpu_scenarios_request_gpus(rendered: dict[str, list[dict]]) -> None:
    single = rendered["gpu-single-node"]
    assert _gpus(find(single, "Deployment", "rel-cadence-inference"), "inference") == (1, 1)
    assert _gpus(find(single, "StatefulSet", "rel-cadence-trainer"), "trainer") == (1, 1)
    assert (
        find(single, "Deployment", "rel-cadence-inference")["spec"]["template"]["spec"]["runtimeClassName"] == "nvidia"
    )

    multi = rendered["gpu-multi-node-trainer"]
    inference = find(multi, "Deployment", "rel-cadence-inference")
    assert _gpus(inference, "inference") == (2, 2)
    assert env(container(inference, "inference"))["CADENCE_TENSOR_PARALLEL_SIZE"] == "2"
    assert _gpus(find(multi, "Deployment", "rel-cadence-reward"), "reward") == (1, 1)
    trainer = find(multi, "StatefulSet", "rel-cadence-trainer")
    assert _gpus(trainer, "trainer") == (8, 8) and trainer["spec"]["replicas"] == 2
    assert trainer["spec"]["podManagementPolicy"] == "Parallel"
    main = container(trainer, "trainer")
    assert main["command"] == ["torchrun"] and "--nnodes=$(CADENCE_NNODES)" in main["args"]
    assert main["args"][-2:] == ["-m", "cadence.trainer.main"]
    trainer_env = env(main)
    assert trainer_env["CADENCE_NNODES"] == "2" and trainer_env["CADENCE_NPROC_PER_NODE"] == "8"
    assert trainer_env["MASTER_ADDR"] == "rel-cadence-trainer-0.rel-cadence-trainer-headless.cadence.svc"
    assert trainer_env["CADENCE_NODE_RANK"] == {
        "fieldRef": {"fieldPath": "metadata.labels['apps.kubernetes.io/pod-index']"}
    }
    headless = find(multi, "Service", "rel-cadence-trainer-headless")
    assert headless["spec"]["clusterIP"] == "None" and headless["spec"]["publishNotReadyAddresses"] is True
    assert trainer["spec"]["serviceName"] == "rel-cadence-trainer-headless"
    assert trainer["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"] == "500Gi"

    for name in ("cpu-tiny", "default", "keda", "external-redis"):
        for workload in workloads(rendered[name]):
            for c in workload["spec"]["template"]["spec"]["containers"]:
                assert not any("gpu" in key for key in c["resources"]["limits"]), (name, workload["metadata"]["name"])


def test_gpu_resource_name_is_configurable(render_values) -> None:
    values = {"gpu": {"resourceName": "amd.com/gpu"}, "trainer": {"gpus": 4}, "models": {"parametersBillions": 1}}
    docs = render_values(values)
    assert _gpus(find(docs, "StatefulSet", "rel-cadence-trainer"), "trainer", "amd.com/gpu") == (4, 4)


@pytest.mark.parametrize("name", [*SCENARIOS, "default"])
def test_labels_are_consistent(rendered: dict[str, list[dict]], name: str) -> None:
    docs = rendered[name]
    for doc in docs:
        labels = doc["metadata"]["labels"]
        assert set(LABELS) <= set(labels), (doc["kind"], doc["metadata"]["name"])
        assert labels["app.kubernetes.io/name"] == "cadence" and labels["app.kubernetes.io/instance"] == "rel"
        assert labels["app.kubernetes.io/part-of"] == "cadence" and labels["app.kubernetes.io/managed-by"] == "Helm"
        assert doc["metadata"]["namespace"] == "cadence", "every object names its namespace"
    pod_labels = [w["spec"]["template"]["metadata"]["labels"] for w in workloads(docs)]
    for workload in workloads(docs):
        selector = workload["spec"]["selector"]["matchLabels"]
        assert selector.items() <= workload["spec"]["template"]["metadata"]["labels"].items()
        assert selector["app.kubernetes.io/component"] == workload["metadata"]["labels"]["app.kubernetes.io/component"]
    for doc in docs:
        if doc["kind"] == "Service":
            wanted = {k: v for k, v in doc["spec"]["selector"].items() if k != "apps.kubernetes.io/pod-index"}
        elif doc["kind"] in ("PodDisruptionBudget", "NetworkPolicy"):
            wanted = (doc["spec"].get("selector") or doc["spec"]["podSelector"])["matchLabels"]
        else:
            continue
        assert any(wanted.items() <= labels.items() for labels in pod_labels), (doc["kind"], doc["metadata"]["name"])


@pytest.mark.parametrize("name", [*SCENARIOS, "default"])
def test_run_configmap_holds_a_valid_run_config(rendered: dict[str, list[dict]], name: str) -> None:
    configmap = find(rendered[name], "ConfigMap", "rel-cadence-run")
    config = parse_run_config(yaml.safe_load(configmap["data"]["run.yaml"]), f"{name} run.yaml")
    assert config.run_id == configmap["metadata"]["annotations"]["cadence.dev/run-id"]
    trainer = find(rendered[name], "StatefulSet", "rel-cadence-trainer")
    volumes = {v["name"]: v for v in trainer["spec"]["template"]["spec"]["volumes"]}
    assert volumes["run-config"]["configMap"]["name"] == "rel-cadence-run"
    assert env(container(trainer, "trainer"))["CADENCE_CONFIG"] == "/etc/cadence/run/run.yaml"


def test_redis_bundled_with_aof_or_external(rendered: dict[str, list[dict]]) -> None:
    redis = find(rendered["default"], "StatefulSet", "rel-cadence-redis")
    args = container(redis, "redis")["args"]
    assert args[args.index("--appendonly") + 1] == "yes"
    assert redis["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "data"
    external = rendered["external-redis"]
    assert not [d for d in external if d["metadata"]["name"].endswith("-redis") and d["kind"] != "NetworkPolicy"]
    for service in ("inference", "reward"):
        url = env(container(find(external, "Deployment", f"rel-cadence-{service}"), service))["CADENCE_REDIS_URL"]
        assert url == {"secretKeyRef": {"name": "cadence-redis", "key": "url"}}
    default_url = env(container(find(rendered["default"], "Deployment", "rel-cadence-inference"), "inference"))
    assert default_url["CADENCE_REDIS_URL"] == "redis://rel-cadence-redis:6379/0"


def test_reward_api_keys_service_ingress_hpa(rendered: dict[str, list[dict]]) -> None:
    external = rendered["external-redis"]
    reward = find(external, "Deployment", "rel-cadence-reward")
    assert env(container(reward, "reward"))["CADENCE_API_KEYS_FILE"] == "/etc/cadence/api-keys/keys"
    keys = {v["name"]: v for v in reward["spec"]["template"]["spec"]["volumes"]}["api-keys"]["secret"]
    assert keys["secretName"] == "cadence-reward-keys" and keys["items"] == [{"key": "api-keys", "path": "keys"}]
    ingress = find(external, "Ingress", "rel-cadence-reward")
    assert ingress["spec"]["tls"][0]["secretName"] == "reward-tls"
    ports = {p["name"]: p["port"] for p in find(external, "Service", "rel-cadence-reward")["spec"]["ports"]}
    assert ports == {"http": 8000, "grpc": 50052}
    keda = rendered["keda"]
    secret = find(keda, "Secret", "rel-cadence-reward-api-keys")
    assert secret["stringData"]["api-keys"].split() == ["ci-example-key-not-secret"]
    assert not [d for d in keda if d["kind"] == "HorizontalPodAutoscaler"], "KEDA owns the reward HPA"
    assert "replicas" not in find(keda, "Deployment", "rel-cadence-reward")["spec"]
    assert "CADENCE_API_KEYS_FILE" not in env(
        container(find(rendered["default"], "Deployment", "rel-cadence-reward"), "reward")
    )


def test_keda_scales_on_the_run_streams(rendered: dict[str, list[dict]]) -> None:
    """The triggers watch the streams the workers read: the key and the group from `cadence.streams`."""
    from cadence.streams import GROUPS, stream_key

    scaled = {d["metadata"]["name"]: d for d in rendered["keda"] if d["kind"] == "ScaledObject"}
    assert set(scaled) == {"rel-cadence-inference", "rel-cadence-reward"}
    for service, stream, lag in (("inference", "prompts", "32"), ("reward", "rollouts", "256")):
        obj = scaled[f"rel-cadence-{service}"]
        assert obj["apiVersion"] == "keda.sh/v1alpha1"
        assert obj["spec"]["scaleTargetRef"] == {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "name": f"rel-cadence-{service}",
        }
        (trigger,) = obj["spec"]["triggers"]
        assert trigger["type"] == "redis-streams"
        assert trigger["metadata"] == {
            "address": "rel-cadence-redis.cadence.svc.cluster.local:6379",
            "stream": stream_key("toy-dpo", stream),
            "consumerGroup": GROUPS[stream],
            "lagCount": lag,
        }
    redis_policy = find(rendered["keda"], "NetworkPolicy", "rel-cadence-redis")
    assert {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "keda"}}} in redis_policy["spec"][
        "ingress"
    ][0]["from"]
    monitors = [d for d in rendered["keda"] if d["kind"] == "ServiceMonitor"]
    assert {m["spec"]["endpoints"][0]["port"] for m in monitors} == {"metrics", "http"}


def test_network_policies_allow_only_the_paths_cadence_uses(rendered: dict[str, list[dict]]) -> None:
    docs = rendered["default"]
    deny = find(docs, "NetworkPolicy", "rel-cadence-default-deny")
    assert deny["spec"]["policyTypes"] == ["Ingress"] and "ingress" not in deny["spec"]

    def sources(name: str) -> set[str]:
        rule = find(docs, "NetworkPolicy", name)["spec"]["ingress"][0]
        return {peer["podSelector"]["matchLabels"]["app.kubernetes.io/component"] for peer in rule["from"]}

    assert sources("rel-cadence-redis") == {"inference", "reward", "trainer"}
    assert sources("rel-cadence-broker") == {"inference", "trainer"}
    assert sources("rel-cadence-trainer") == {"trainer"}
    assert not [d for d in docs if d["metadata"]["name"] == "rel-cadence-inference" and d["kind"] == "NetworkPolicy"]
    pdbs = {d["metadata"]["name"]: d["spec"] for d in docs if d["kind"] == "PodDisruptionBudget"}
    assert pdbs["rel-cadence-trainer"]["maxUnavailable"] == 1 and len(pdbs) == 4


def test_inference_loads_models_from_a_pvc_or_a_seed_init_container(rendered: dict[str, list[dict]]) -> None:
    tiny = find(rendered["cpu-tiny"], "Deployment", "rel-cadence-inference")["spec"]["template"]["spec"]
    (init,) = tiny["initContainers"]
    assert init["command"] == ["cadence", "seed-model", "tiny"]
    assert {m["mountPath"] for m in init["volumeMounts"]} >= {"/var/cache/cadence"}
    gpu = find(rendered["gpu-single-node"], "Deployment", "rel-cadence-inference")["spec"]["template"]["spec"]
    models = {v["name"]: v for v in gpu["volumes"]}["models"]
    assert models["persistentVolumeClaim"] == {"claimName": "cadence-models", "readOnly": True}
    main = next(c for c in gpu["containers"] if c["name"] == "inference")
    assert main["startupProbe"]["periodSeconds"] * main["startupProbe"]["failureThreshold"] >= 1800
    assert env(main)["CADENCE_MODEL"] == "/models/Qwen2.5-Math-1.5B" and env(main)["CADENCE_ENGINE"] == "vllm"


def test_dashboard_ships_as_a_configmap(rendered: dict[str, list[dict]]) -> None:
    configmap = find(rendered["gpu-multi-node-trainer"], "ConfigMap", "rel-cadence-dashboards")
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    shipped = json.loads(configmap["data"]["cadence.json"])
    assert shipped == json.loads((CHART / "dashboards" / "cadence.json").read_text())


def test_autostart_off_installs_an_idle_trainer(render_values) -> None:
    trainer = find(render_values({"run": {"autostart": False}}), "StatefulSet", "rel-cadence-trainer")
    annotations = trainer["metadata"]["annotations"]
    assert trainer["spec"]["replicas"] == 0 and annotations["cadence.dev/run-state"] == "stopped"
    assert annotations["cadence.dev/replicas"] == "1", "what `cadence k8s submit` scales back to"


# Variables the chart may pass before a service reads them (none now); the test below fails as soon as the
# service grows the setting, so an entry here cannot go stale.
NOT_YET_READ: dict[str, set[str]] = {}
TORCHRUN_ENV = {"CADENCE_NNODES", "CADENCE_NODE_RANK", "CADENCE_NPROC_PER_NODE"}


@pytest.mark.parametrize("name", [*SCENARIOS, "default"])
def test_every_cadence_env_var_is_a_service_setting(rendered: dict[str, list[dict]], name: str) -> None:
    """A CADENCE_* variable the service does not read is a silent misconfiguration (pydantic ignores extras)."""
    from cadence.broker.settings import BrokerSettings
    from cadence.inference.settings import InferenceSettings
    from cadence.reward.settings import RewardSettings
    from cadence.settings import CommonSettings
    from cadence.trainer.settings import TrainerSettings

    classes = {
        "inference": InferenceSettings,
        "reward": RewardSettings,
        "trainer": TrainerSettings,
        "broker": BrokerSettings,
    }
    for workload in workloads(rendered[name]):
        spec = workload["spec"]["template"]["spec"]
        for c in [*spec.get("initContainers", []), *spec["containers"]]:
            cls = classes.get(c["name"], CommonSettings)
            known = {f"CADENCE_{field.upper()}" for field in cls.model_fields}
            names = {e["name"] for e in c.get("env", []) if e["name"].startswith("CADENCE_")}
            unread = names - known - NOT_YET_READ.get(c["name"], set())
            if TORCHRUN_ENV & names:
                assert all(f"$({var})" in " ".join(c["args"]) for var in TORCHRUN_ENV), "read by torchrun's args"
                unread -= TORCHRUN_ENV
            assert unread == set(), (name, workload["metadata"]["name"], c["name"])
    for service, pending in NOT_YET_READ.items():
        now_read = pending & {f"CADENCE_{field.upper()}" for field in classes[service].model_fields}
        assert not now_read, f"{sorted(now_read)} is a setting now: drop it from NOT_YET_READ"


def test_inference_pods_relay_weights_to_one_another_when_there_are_several(render_values) -> None:
    """Relay fan-out: off for one pod (nothing to relay to), on for several, announced as the pod's IP and
    admitted by a NetworkPolicy from inference pods only."""
    one = render_values({})
    assert "CADENCE_RELAY_PORT" not in env(container(find(one, "Deployment", "rel-cadence-inference"), "inference"))
    assert not [d for d in one if d["metadata"]["name"] == "rel-cadence-inference-relay"]
    for values in ({"inference": {"replicas": 3}}, {"inference": {"relay": "on"}}):
        docs = render_values(values)
        pod = container(find(docs, "Deployment", "rel-cadence-inference"), "inference")
        variables = env(pod)
        assert variables["CADENCE_RELAY_PORT"] == "50055" and variables["CADENCE_RELAY_ADDR"] == "$(POD_IP):50055"
        assert {"name": "relay", "containerPort": 50055} in pod["ports"]
        (rule,) = find(docs, "NetworkPolicy", "rel-cadence-inference-relay")["spec"]["ingress"]
        assert rule["ports"] == [{"port": 50055, "protocol": "TCP"}]
        assert rule["from"][0]["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "inference"
    assert "CADENCE_RELAY_PORT" not in env(
        container(
            find(render_values({"inference": {"replicas": 3, "relay": "off"}}), "Deployment", "rel-cadence-inference"),
            "inference",
        )
    )
