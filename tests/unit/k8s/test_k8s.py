"""`cadence k8s` against a loopback server speaking the Kubernetes API, serving the chart's rendered objects."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from cadence.app import k8s, k8s_status
from cadence.config import parse_run_config
from cadence.errors import Conflict, InvalidRequest, NotFound, NotReady, PermissionDenied
from cadence.streams import stream_key

NAMESPACE = "cadence"
REPO = Path(__file__).resolve().parents[3]
STS = f"/apis/apps/v1/namespaces/{NAMESPACE}/statefulsets"
DEPLOYMENTS = f"/apis/apps/v1/namespaces/{NAMESPACE}/deployments"
CONFIGMAPS = f"/api/v1/namespaces/{NAMESPACE}/configmaps"
PODS = f"/api/v1/namespaces/{NAMESPACE}/pods"
SCALED = f"/apis/keda.sh/v1alpha1/namespaces/{NAMESPACE}/scaledobjects"


def _config(run_id: str = "math-s4", model: str = "/models/qwen"):
    return parse_run_config({"run_id": run_id, "sync_every": 4, "model": {"path": model}, "reward_model": "tiny-rm"})


def as_list(kind: str, items: list[dict]) -> dict:
    return {"kind": f"{kind}List", "apiVersion": "v1", "metadata": {}, "items": items}


def _pod(name: str, component: str, run_id: str, ready: bool = True) -> dict:
    labels = {"app.kubernetes.io/name": "cadence", "app.kubernetes.io/instance": "rel"}
    labels["app.kubernetes.io/component"] = component
    return {
        "metadata": {"name": name, "namespace": NAMESPACE, "labels": labels, "annotations": {k8s.RUN_ID: run_id}},
        "status": {
            "phase": "Running",
            "containerStatuses": [
                {"name": component, "ready": ready, "restartCount": 1, "image": "x", "imageID": "", "containerID": ""}
            ],
        },
    }


def test_run_configmap_is_valid_and_round_trips(render) -> None:
    from kubernetes import client

    trainer = client.V1StatefulSet.from_dict(render()[("StatefulSet", "rel-cadence-trainer")])
    release = k8s.Release(NAMESPACE, "rel", trainer)
    body = k8s.run_configmap(release, _config("Math_S4"), now=datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC))
    manifest = client.ApiClient().sanitize_for_serialization(body)
    for version in ("1.29", "1.30", "1.31", "1.32"):
        kubernetes_validate.validate(manifest, version, strict=True)
    assert manifest["metadata"]["name"] == f"rel-cadence-run-math-s4-{k8s.run_slug('Math_S4')[-6:]}"
    assert manifest["metadata"]["annotations"] == {k8s.RUN_ID: "Math_S4", k8s.SUBMITTED_AT: "2026-01-02T03:04:05Z"}
    assert manifest["metadata"]["labels"]["app.kubernetes.io/instance"] == "rel"
    assert manifest["metadata"]["labels"][k8s.RUN_CONFIG] == "true"
    assert parse_run_config(yaml.safe_load(manifest["data"]["run.yaml"])) == _config("Math_S4")


def test_run_slug_is_dns_safe_and_keeps_distinct_ids_apart() -> None:
    assert k8s.run_slug("toy-dpo") == "toy-dpo"
    assert k8s.run_slug("Toy_DPO") != k8s.run_slug("toy-dpo")
    assert k8s.run_slug("Toy_DPO").startswith("toy-dpo-")
    assert k8s.run_slug("a_b") != k8s.run_slug("a-b") and k8s.run_slug("A") != k8s.run_slug("a")


def test_submit_points_the_rendered_release_at_the_run(api, clients, render, serve_release) -> None:
    objects = render({"run": {"autostart": False}})
    serve_release(objects)
    api.route("POST", CONFIGMAPS, {"kind": "ConfigMap", "apiVersion": "v1", "metadata": {"name": "x"}}, 201)

    result = k8s.submit(clients, _config(), NAMESPACE)

    assert result.configmap == "rel-cadence-run-math-s4"
    assert result.patched == [
        "statefulset/rel-cadence-trainer",
        "deployment/rel-cadence-inference",
        "deployment/rel-cadence-reward",
    ]
    first = api.requests[0]
    assert (first.method, first.path) == ("GET", STS)
    assert first.query["labelSelector"] == ["app.kubernetes.io/name=cadence,app.kubernetes.io/component=trainer"]
    create, trainer, inference, reward = api.writes()
    assert (create.method, create.path, create.body["metadata"]["name"]) == ("POST", CONFIGMAPS, result.configmap)
    assert parse_run_config(yaml.safe_load(create.body["data"]["run.yaml"])).run_id == "math-s4"
    for patch in (trainer, inference, reward):
        assert patch.method == "PATCH" and patch.content_type == k8s.SMP  # a dict body is not a JSON patch
    assert trainer.path == f"{STS}/rel-cadence-trainer"
    assert trainer.body["spec"]["replicas"] == 1  # the chart's trainer.replicas, although autostart left it at 0
    assert trainer.body["metadata"]["annotations"] == {k8s.RUN_ID: "math-s4", k8s.RUN_STATE: "running"}
    _assert_patch_matches_chart(trainer.body, objects[("StatefulSet", "rel-cadence-trainer")], "trainer")
    assert {"name": "run-config", "configMap": {"name": result.configmap}} in trainer.body["spec"]["template"]["spec"][
        "volumes"
    ]
    env = {e["name"]: e["value"] for e in inference.body["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env == {"CADENCE_RUN_ID": "math-s4", "CADENCE_MODEL": "/models/qwen"}
    reward_env = {e["name"]: e["value"] for e in reward.body["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert reward_env == {
        "CADENCE_RUN_ID": "math-s4",
        "CADENCE_REWARD_MODEL": "tiny-rm",
        "CADENCE_STRICT_FORMAT": "false",
    }
    _assert_patch_matches_chart(inference.body, objects[("Deployment", "rel-cadence-inference")], "inference")
    _assert_patch_matches_chart(reward.body, objects[("Deployment", "rel-cadence-reward")], "reward")
    lists = [r for r in api.requests if r.method == "GET" and r.path == DEPLOYMENTS]
    assert [r.query["labelSelector"][0].rsplit("=", 1)[1] for r in lists] == ["inference", "reward"]


def _assert_patch_matches_chart(patch: dict, rendered: dict, container: str) -> None:
    """Strategic merge keys (container and volume names) and env names must exist in the chart's object."""
    spec = rendered["spec"]["template"]["spec"]
    containers = {c["name"]: c for c in spec["containers"]}
    assert container in containers
    patched_env = {e["name"] for c in patch["spec"]["template"]["spec"]["containers"] for e in c["env"]}
    assert patched_env <= {e["name"] for e in containers[container]["env"]}
    volumes = {v["name"] for v in spec.get("volumes", [])}
    assert {v["name"] for v in patch["spec"]["template"]["spec"].get("volumes", [])} <= volumes


def test_submit_refuses_while_another_run_trains(api, clients, render, serve_release) -> None:
    serve_release(render())  # autostart: the chart's run `toy-dpo` is training
    with pytest.raises(Conflict, match=r"running run 'toy-dpo'; stop it first \(`cadence k8s stop toy-dpo`\)"):
        k8s.submit(clients, _config(), NAMESPACE)
    assert api.writes() == []


def test_replace_restarts_every_trainer_pod_at_once(api, clients, render, serve_release) -> None:
    """The chart's trainer never rolls (OnDelete): --replace deletes all its pods, which come back together."""
    objects = render({"trainer": {"replicas": 2}, "submitterRole": {"create": True}})
    assert objects[("StatefulSet", "rel-cadence-trainer")]["spec"]["updateStrategy"] == {"type": "OnDelete"}
    serve_release(objects)
    api.route("POST", CONFIGMAPS, {"kind": "ConfigMap", "apiVersion": "v1", "metadata": {}}, 201)
    api.route("DELETE", PODS, {"kind": "PodList", "apiVersion": "v1", "metadata": {}, "items": []})
    result = k8s.submit(clients, _config(), NAMESPACE, replace=True)
    deletes = [r for r in api.writes() if r.method == "DELETE"]
    assert [(r.path, r.query["labelSelector"]) for r in deletes] == [
        (PODS, ["app.kubernetes.io/name=cadence,app.kubernetes.io/instance=rel,app.kubernetes.io/component=trainer"])
    ]
    patches = [i for i, r in enumerate(api.writes()) if r.method == "PATCH" and "statefulsets" in r.path]
    assert patches and patches[0] < api.writes().index(deletes[0]), "the template changes before the pods go"
    assert "pods/rel-cadence-trainer-*" in result.patched
    role = objects[("Role", "rel-cadence-submitter")]
    assert any("deletecollection" in rule["verbs"] and "pods" in rule["resources"] for rule in role["rules"])


def test_submit_of_a_known_run_id_needs_replace(api, clients, render, serve_release) -> None:
    """The chart's own run counts: resubmitting `toy-dpo` would reuse that run's streams."""
    objects = render({"run": {"autostart": False}})
    serve_release(objects)
    with pytest.raises(Conflict, match=r"'toy-dpo' was already submitted .*configmap/rel-cadence-run;"):
        k8s.submit(clients, _config("toy-dpo"), NAMESPACE)
    assert api.writes() == []

    chart_configmap = objects[("ConfigMap", "rel-cadence-run")]
    chart_configmap["metadata"]["annotations"]["meta.helm.sh/release-name"] = "rel"  # what Helm adds at install
    chart_configmap["metadata"]["resourceVersion"] = "42"
    serve_release(objects)
    api.route("PUT", f"{CONFIGMAPS}/rel-cadence-run", chart_configmap)
    result = k8s.submit(clients, _config("toy-dpo"), NAMESPACE, replace=True)
    put, trainer = api.writes()[:2]
    assert (put.method, put.path) == ("PUT", f"{CONFIGMAPS}/rel-cadence-run")
    meta = put.body["metadata"]
    assert meta["name"] == "rel-cadence-run" and meta["resourceVersion"] == "42"
    assert meta["annotations"]["meta.helm.sh/release-name"] == "rel"
    assert meta["labels"]["app.kubernetes.io/managed-by"] == "Helm", "Helm keeps owning its ConfigMap"
    assert meta["annotations"][k8s.RUN_ID] == "toy-dpo" and k8s.SUBMITTED_AT in meta["annotations"]
    assert result.configmap == "rel-cadence-run"
    assert {"name": "run-config", "configMap": {"name": "rel-cadence-run"}} in trainer.body["spec"]["template"]["spec"][
        "volumes"
    ]

    exists = {
        "kind": "Status",
        "apiVersion": "v1",
        "status": "Failure",
        "reason": "AlreadyExists",
        "code": 409,
        "message": 'configmaps "rel-cadence-run-math-s4" already exists',
    }
    api.route("POST", CONFIGMAPS, exists, 409)  # a submit racing ours
    with pytest.raises(Conflict, match=r"create ConfigMap rel-cadence-run-math-s4: .* already exists"):
        k8s.submit(clients, _config(), NAMESPACE)


def test_submit_repoints_keda_at_the_new_streams(api, clients, render, serve_release) -> None:
    objects = render({"run": {"autostart": False}, "keda": {"enabled": True}})
    serve_release(objects)
    api.route("POST", CONFIGMAPS, {"kind": "ConfigMap", "apiVersion": "v1", "metadata": {}}, 201)
    result = k8s.submit(clients, _config(), NAMESPACE)
    assert sorted(result.patched[3:]) == ["scaledobject/rel-cadence-inference", "scaledobject/rel-cadence-reward"]
    patches = {r.path.rsplit("/", 1)[1]: r for r in api.writes() if "scaledobjects" in r.path}
    for name, kind, group in (("inference", "prompts", "inference"), ("reward", "rollouts", "reward")):
        patch = patches[f"rel-cadence-{name}"]
        assert patch.content_type == k8s.MERGE_PATCH
        (trigger,) = patch.body["spec"]["triggers"]
        assert trigger["metadata"]["stream"] == stream_key("math-s4", kind) == f"cadence:{{math-s4}}:{kind}"
        assert trigger["metadata"]["consumerGroup"] == group  # the rest of the trigger is kept


def test_status_reports_the_run_and_pods(api, clients, render, serve_release) -> None:
    serve_release(render())
    pods = [
        _pod("rel-cadence-trainer-0", "trainer", "toy-dpo"),
        _pod("rel-cadence-inference-a", "inference", "toy-dpo", ready=False),
    ]
    api.route("GET", PODS, as_list("Pod", pods))
    status = k8s_status.status(clients, "toy-dpo", NAMESPACE)
    assert (status.state, status.configmap, status.current_run) == ("running", "rel-cadence-run", "toy-dpo")
    assert [(p.service, p.ready, p.restarts) for p in status.pods] == [("trainer", True, 1), ("inference", False, 1)]
    assert "run toy-dpo on release rel (namespace cadence): running" in status.render()
    with pytest.raises(NotFound, match=r"run 'other' was never submitted .*known runs: toy-dpo"):
        k8s_status.status(clients, "other", NAMESPACE)


def test_status_shows_a_finished_run(api, clients, render, serve_release) -> None:
    """The trainer that finished exited 0 with its termination message; restarted, it idles (ready)."""
    serve_release(render())
    trainer = _pod("rel-cadence-trainer-0", "trainer", "toy-dpo")
    message = "cadence: run toy-dpo finished at step 800 (version 800)"
    ended = {"terminated": {"exitCode": 0, "reason": "Completed", "message": message}}
    trainer["status"]["containerStatuses"][0]["lastState"] = ended
    api.route("GET", PODS, as_list("Pod", [trainer]))
    status = k8s_status.status(clients, "toy-dpo", NAMESPACE)
    assert status.state == "finished" and status.finished == message
    assert "toy-dpo finished at step 800" in status.render() and "idles" in status.render()
    crashed = {"terminated": {"exitCode": 1, "reason": "Error", "message": "IntegrityError: ..."}}
    trainer["status"]["containerStatuses"][0]["lastState"] = crashed
    api.route("GET", PODS, as_list("Pod", [trainer]))
    assert k8s_status.status(clients, "toy-dpo", NAMESPACE).state == "running"


def test_logs_read_the_pods_of_the_run(api, clients, render, serve_release) -> None:
    serve_release(render())
    api.route("GET", PODS, as_list("Pod", [_pod("rel-cadence-trainer-0", "trainer", "toy-dpo")]))
    api.route("GET", f"{PODS}/rel-cadence-trainer-0/log", "step 1 loss 0.69\nstep 2 loss 0.61\n")
    lines = list(k8s_status.logs(clients, "toy-dpo", NAMESPACE, tail=50))
    assert lines == ["[rel-cadence-trainer-0] step 1 loss 0.69", "[rel-cadence-trainer-0] step 2 loss 0.61"]
    log_request = api.requests[-1]
    assert log_request.query == {"container": ["trainer"], "tailLines": ["50"]}
    followed = list(k8s_status.logs(clients, "toy-dpo", NAMESPACE, tail=5, follow=True))
    assert followed == lines and api.requests[-1].query == {
        "container": ["trainer"],
        "follow": ["true"],
        "tailLines": ["5"],
    }
    with pytest.raises(InvalidRequest, match="--service must be one of"):
        list(k8s_status.logs(clients, "toy-dpo", NAMESPACE, service="redis"))


def test_stop_scales_the_trainer_to_zero(api, clients, render, serve_release) -> None:
    objects = render()
    serve_release(objects)
    api.route("PATCH", f"{CONFIGMAPS}/rel-cadence-run", objects[("ConfigMap", "rel-cadence-run")])
    assert k8s_status.stop(clients, "toy-dpo", NAMESPACE) == "rel-cadence-trainer"
    scale, mark = api.writes()
    assert scale.body == {"metadata": {"annotations": {k8s.RUN_STATE: "stopped"}}, "spec": {"replicas": 0}}
    assert (scale.content_type, mark.content_type) == (k8s.SMP, k8s.MERGE_PATCH)
    with pytest.raises(NotFound):
        k8s_status.stop(clients, "not-a-run", NAMESPACE)


def test_release_lookup_errors(api, clients, render) -> None:
    api.route("GET", STS, as_list("StatefulSet", []))
    with pytest.raises(NotFound, match="no Cadence release in namespace 'cadence': install the chart"):
        k8s_status.status(clients, "x", NAMESPACE)
    one = render()[("StatefulSet", "rel-cadence-trainer")]
    two = yaml.safe_load(yaml.safe_dump(one))
    two["metadata"]["name"], two["metadata"]["labels"]["app.kubernetes.io/instance"] = "b-cadence-trainer", "b"
    api.route("GET", STS, as_list("StatefulSet", [one, two]))
    with pytest.raises(InvalidRequest, match=r"several Cadence releases \(b, rel\); pass --release"):
        k8s.find_release(clients, NAMESPACE)
    assert k8s.find_release(clients, NAMESPACE, "rel").fullname == "rel-cadence"
    assert api.requests[-1].query["labelSelector"][0].endswith(",app.kubernetes.io/instance=rel")


def test_api_failures_become_typed_errors(api, clients) -> None:
    forbidden = {
        "kind": "Status",
        "apiVersion": "v1",
        "status": "Failure",
        "code": 403,
        "message": 'statefulsets.apps is forbidden: User "dev" cannot list resource',
    }
    api.route("GET", STS, forbidden, 403)
    with pytest.raises(PermissionDenied, match="cannot list resource; your kubeconfig user needs the RBAC"):
        k8s.find_release(clients, NAMESPACE)
    api.shutdown()
    api.server_close()
    with pytest.raises(NotReady, match="cannot reach the Kubernetes API"):
        k8s.find_release(clients, NAMESPACE)


def test_cli_uses_the_kubeconfig(api, tmp_path: Path, render, serve_release) -> None:
    """The real `cadence k8s status` through a kubeconfig naming the loopback server and a namespace."""
    serve_release(render())
    api.route("GET", PODS, as_list("Pod", [_pod("rel-cadence-trainer-0", "trainer", "toy-dpo")]))
    kubeconfig = tmp_path / "config"
    kubeconfig.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "current-context": "loop",
                "clusters": [{"name": "loop", "cluster": {"server": api.url}}],
                "users": [{"name": "dev", "user": {"token": "t0k3n"}}],
                "contexts": [{"name": "loop", "context": {"cluster": "loop", "user": "dev", "namespace": NAMESPACE}}],
            }
        )
    )
    env = {**os.environ, "KUBECONFIG": str(kubeconfig)}
    cli = [sys.executable, "-m", "cadence.app.cli", "k8s"]
    done = subprocess.run([*cli, "status", "toy-dpo"], env=env, capture_output=True, text=True, timeout=60, cwd=REPO)
    assert done.returncode == 0, done.stderr
    assert "run toy-dpo on release rel (namespace cadence): running" in done.stdout
    assert all(
        r.path.startswith(("/api/v1/namespaces/cadence/", "/apis/apps/v1/namespaces/cadence/")) for r in api.requests
    )
    bad = tmp_path / "bad.yaml"
    bad.write_text("sync_every: 0\n")
    done = subprocess.run([*cli, "submit", str(bad)], env=env, capture_output=True, text=True, timeout=60, cwd=REPO)
    assert done.returncode == 2 and "sync_every" in done.stderr
    assert not any(r.method == "POST" for r in api.requests)  # refused before any cluster call


def _rbac_need(method: str, path: str) -> tuple[str, str, str]:
    """(apiGroup, resource, verb) that the API server authorizes for one request."""
    parts = path.strip("/").split("/")
    group, rest = ("", parts[2:]) if parts[0] == "api" else (parts[1], parts[3:])
    resource, named = rest[2], len(rest) > 3
    if len(rest) > 4:
        resource = f"{resource}/{rest[4]}"
    verbs = {"POST": "create", "PUT": "update", "PATCH": "patch", "DELETE": "delete" if named else "deletecollection"}
    verb = verbs.get(method, "get" if named else "list")
    return group, resource, verb


def test_the_submitter_role_covers_every_call(api, clients, render, serve_release) -> None:
    """Run every command against the rendered release; the chart's submitter Role must allow each request."""
    objects = render({"run": {"autostart": False}, "keda": {"enabled": True}, "submitterRole": {"create": True}})
    serve_release(objects)
    api.route("POST", CONFIGMAPS, {"kind": "ConfigMap", "apiVersion": "v1", "metadata": {}}, 201)
    k8s.submit(clients, _config(), NAMESPACE)
    trainer = objects[("StatefulSet", "rel-cadence-trainer")]
    trainer["metadata"]["annotations"][k8s.RUN_ID] = "math-s4"
    configmap = {
        "kind": "ConfigMap",
        "apiVersion": "v1",
        "data": {},
        "metadata": {
            "name": "rel-cadence-run-math-s4",
            "labels": {**trainer["metadata"]["labels"], "app.kubernetes.io/component": "run", k8s.RUN_CONFIG: "true"},
            "annotations": {k8s.RUN_ID: "math-s4"},
        },
    }
    serve_release({**objects, ("ConfigMap", "rel-cadence-run-math-s4"): configmap})
    api.route("GET", PODS, as_list("Pod", [_pod("rel-cadence-trainer-0", "trainer", "math-s4")]))
    api.route("GET", f"{PODS}/rel-cadence-trainer-0/log", "ok\n")
    api.route("PATCH", f"{CONFIGMAPS}/rel-cadence-run-math-s4", configmap)
    k8s_status.status(clients, "math-s4", NAMESPACE)
    assert list(k8s_status.logs(clients, "math-s4", NAMESPACE)) == ["[rel-cadence-trainer-0] ok"]
    k8s_status.stop(clients, "math-s4", NAMESPACE)

    role = objects[("Role", "rel-cadence-submitter")]
    allowed = {
        (g, r, v) for rule in role["rules"] for g in rule["apiGroups"] for r in rule["resources"] for v in rule["verbs"]
    }
    needed = {_rbac_need(r.method, r.path) for r in api.requests}
    assert needed - allowed == set()
    assert {("apps", "statefulsets", "patch"), ("keda.sh", "scaledobjects", "patch"), ("", "pods/log", "get")} <= needed
