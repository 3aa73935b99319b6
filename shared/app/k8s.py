"""`cadence k8s submit`: point a release of the Helm chart at a new run (status, logs, stop: `cadence.app.k8s_status`).

How a submit works (charts/cadence/README.md, "Submitting runs"): the config is validated locally,
stored in a ConfigMap `<fullname>-run-<run>` (labelled `cadence.dev/run-config`, annotated with the
run id), and the release is pointed at it with strategic-merge patches: the trainer StatefulSet mounts
that ConfigMap and gets `CADENCE_RUN_ID`; the inference and reward Deployments get `CADENCE_RUN_ID`
(inference also `CADENCE_MODEL`), so their pods roll onto the new run's streams; KEDA ScaledObjects
are re-pointed at the new streams. The release's objects are found by their `app.kubernetes.io/*`
labels, never by guessed names.

`kubernetes` is imported only inside the functions that talk to a cluster, so `cadence --help` stays fast.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cadence.config import RunConfig, dump_run_config
from cadence.errors import ConfigError, Conflict, InvalidRequest, NotFound, NotReady, PermissionDenied
from cadence.streams import stream_key

RUN_ID = "cadence.dev/run-id"
RUN_STATE = "cadence.dev/run-state"
SUBMITTED_AT = "cadence.dev/submitted-at"
REPLICAS = "cadence.dev/replicas"
RUN_CONFIG = "cadence.dev/run-config"
STREAM_KIND = "cadence.dev/stream-kind"
SMP = "application/strategic-merge-patch+json"
MERGE_PATCH = "application/merge-patch+json"
KEDA = {"group": "keda.sh", "version": "v1alpha1", "plural": "scaledobjects"}


@dataclass
class Clients:
    """The three API groups `cadence k8s` uses, sharing one `kubernetes.client.ApiClient`."""

    core: Any
    apps: Any
    custom: Any
    namespace: str = "default"
    """The kubeconfig context's namespace (or the pod's, in-cluster): the default for --namespace."""

    @classmethod
    def from_api_client(cls, api_client: Any, namespace: str = "default") -> Clients:
        from kubernetes import client

        return cls(
            client.CoreV1Api(api_client), client.AppsV1Api(api_client), client.CustomObjectsApi(api_client), namespace
        )


def connect(context: str | None = None) -> Clients:
    """Clients from the kubeconfig (optionally one context), else from the in-cluster service account."""
    from kubernetes import client, config

    try:
        config.load_kube_config(context=context)
        _, active = config.list_kube_config_contexts()
        namespace = (active or {}).get("context", {}).get("namespace", "default")
    except (config.ConfigException, FileNotFoundError, TypeError) as error:
        if context:
            raise ConfigError(
                f"kubeconfig context {context!r} is unusable ({error}); see `kubectl config get-contexts`"
            ) from None
        try:
            config.load_incluster_config()
        except config.ConfigException:
            raise ConfigError(
                "no Kubernetes credentials: set KUBECONFIG or write ~/.kube/config (kind: `kind export kubeconfig`), "
                "or run inside a pod with a service account"
            ) from None
        namespace = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace").read_text().strip()
    return Clients.from_api_client(client.ApiClient(), namespace)


@contextlib.contextmanager
def api_errors(what: str) -> Iterator[None]:
    """Turn Kubernetes API failures into typed errors whose message says what to do."""
    import urllib3
    from kubernetes.client.exceptions import ApiException

    try:
        yield
    except ApiException as error:
        try:
            reason = json.loads(error.body or "{}").get("message") or error.reason
        except ValueError:
            reason = error.reason
        if error.status in (401, 403):
            raise PermissionDenied(
                f"{what}: {reason}; your kubeconfig user needs the RBAC listed in charts/cadence/README.md"
            ) from None
        if error.status == 404:
            raise NotFound(f"{what}: {reason}") from None
        if error.status == 409:
            raise Conflict(f"{what}: {reason}") from None
        if 400 <= error.status < 500:
            raise InvalidRequest(f"{what}: the API server refused it ({error.status}: {reason})") from None
        raise NotReady(f"{what}: the API server failed ({error.status}: {reason}); retry") from None
    except urllib3.exceptions.HTTPError as error:
        raise NotReady(f"{what}: cannot reach the Kubernetes API ({error}); check the cluster and --context") from None


@dataclass(frozen=True)
class Release:
    """One installed chart: its namespace, Helm release name and trainer StatefulSet (as read)."""

    namespace: str
    name: str
    trainer: Any

    @property
    def fullname(self) -> str:
        return self.trainer.metadata.name.removesuffix("-trainer")

    def selector(self, component: str | None = None, *extra: str) -> str:
        parts = ["app.kubernetes.io/name=cadence", f"app.kubernetes.io/instance={self.name}"]
        parts += [f"app.kubernetes.io/component={component}"] if component else []
        return ",".join([*parts, *extra])

    @property
    def current_run(self) -> str:
        return (self.trainer.metadata.annotations or {}).get(RUN_ID, "")


def find_release(clients: Clients, namespace: str, release: str | None = None) -> Release:
    """The release in `namespace` (the only one, or the one named); a precise error otherwise."""
    selector = "app.kubernetes.io/name=cadence,app.kubernetes.io/component=trainer"
    selector += f",app.kubernetes.io/instance={release}" if release else ""
    with api_errors(f"list Cadence trainers in namespace {namespace}"):
        items = clients.apps.list_namespaced_stateful_set(namespace, label_selector=selector).items
    named = f" {release!r}" if release else ""
    if not items:
        raise NotFound(
            f"no Cadence release{named} in namespace {namespace!r}: install the chart "
            f"(`helm install cadence charts/cadence -n {namespace}`) or pass --namespace/--release"
        )
    if len(items) > 1:
        names = sorted(item.metadata.labels["app.kubernetes.io/instance"] for item in items)
        raise InvalidRequest(
            f"namespace {namespace!r} holds several Cadence releases ({', '.join(names)}); pass --release"
        )
    trainer = items[0]
    return Release(namespace, trainer.metadata.labels["app.kubernetes.io/instance"], trainer)


def find_run_configmap(clients: Clients, rel: Release, run_id: str) -> Any:
    """The ConfigMap of a run submitted to (or installed with) this release."""
    with api_errors("list run ConfigMaps"):
        items = clients.core.list_namespaced_config_map(
            rel.namespace, label_selector=rel.selector(None, f"{RUN_CONFIG}=true")
        ).items
    for item in items:
        if (item.metadata.annotations or {}).get(RUN_ID) == run_id:
            return item
    known = sorted((item.metadata.annotations or {}).get(RUN_ID, "?") for item in items)
    raise NotFound(
        f"run {run_id!r} was never submitted to release {rel.name!r} in namespace {rel.namespace!r} "
        f"(known runs: {', '.join(known) or 'none'}); submit it with `cadence k8s submit CONFIG.yaml`"
    )


def run_slug(run_id: str) -> str:
    """A DNS-safe form of a run id; a short hash keeps ids that differ only in case or `_` apart."""
    slug = re.sub(r"[^a-z0-9.-]", "-", run_id.lower()).strip("-.")
    return slug if slug == run_id else f"{slug}-{hashlib.sha256(run_id.encode()).hexdigest()[:6]}"


def run_configmap(release: Release, config: RunConfig, now: datetime | None = None) -> Any:
    """The ConfigMap holding one run's full config (defaults filled in), as a client model."""
    from kubernetes import client

    labels = {
        "app.kubernetes.io/name": "cadence",
        "app.kubernetes.io/instance": release.name,
        "app.kubernetes.io/component": "run",
        "app.kubernetes.io/part-of": "cadence",
        "app.kubernetes.io/managed-by": "cadence-k8s",
        RUN_CONFIG: "true",
    }
    annotations = {RUN_ID: config.run_id, SUBMITTED_AT: _timestamp(now)}
    meta = client.V1ObjectMeta(
        name=f"{release.fullname}-run-{run_slug(config.run_id)}",
        namespace=release.namespace,
        labels=labels,
        annotations=annotations,
    )
    return client.V1ConfigMap(
        api_version="v1", kind="ConfigMap", metadata=meta, data={"run.yaml": dump_run_config(config)}
    )


def _timestamp(now: datetime | None) -> str:
    return (now or datetime.now(UTC)).strftime("%Y-%m-%dT%H:%M:%SZ")


def _env(*pairs: tuple[str, str]) -> list[dict[str, str]]:
    return [{"name": name, "value": value} for name, value in pairs]


def trainer_patch(config: RunConfig, configmap: str, replicas: int, now: datetime | None = None) -> dict:
    """Point the trainer at a run: its config volume, CADENCE_RUN_ID, replicas; the template change rolls it."""
    stamp = {RUN_ID: config.run_id, SUBMITTED_AT: _timestamp(now)}
    container = {"name": "trainer", "env": _env(("CADENCE_RUN_ID", config.run_id))}
    return {
        "metadata": {"annotations": {RUN_ID: config.run_id, RUN_STATE: "running"}},
        "spec": {
            "replicas": replicas,
            "template": {
                "metadata": {"annotations": stamp},
                "spec": {
                    "containers": [container],
                    "volumes": [{"name": "run-config", "configMap": {"name": configmap}}],
                },
            },
        },
    }


def worker_patch(service: str, config: RunConfig, now: datetime | None = None) -> dict:
    """Move inference or reward pods onto the run's streams and models (policy; reward model when set)."""
    env = [("CADENCE_RUN_ID", config.run_id)]
    if service == "inference":
        env.append(("CADENCE_MODEL", config.model.path))
    if service == "reward" and config.reward_model:
        env.append(("CADENCE_REWARD_MODEL", config.reward_model))
    if service == "reward":
        env.append(("CADENCE_STRICT_FORMAT", str(config.strict_format).lower()))
    stamp = {RUN_ID: config.run_id, SUBMITTED_AT: _timestamp(now)}
    return {
        "spec": {
            "template": {
                "metadata": {"annotations": stamp},
                "spec": {"containers": [{"name": service, "env": _env(*env)}]},
            }
        }
    }


def scaledobject_patch(scaled_object: dict, run_id: str) -> dict | None:
    """Re-point a ScaledObject's redis-streams triggers at the run's stream (a merge patch replaces lists)."""
    kind = scaled_object["metadata"].get("annotations", {}).get(STREAM_KIND)
    if not kind:
        return None
    triggers = [dict(trigger) for trigger in scaled_object["spec"]["triggers"]]
    for trigger in triggers:
        if trigger.get("type") == "redis-streams":
            trigger["metadata"] = {**trigger["metadata"], "stream": stream_key(run_id, kind)}
    return {"spec": {"triggers": triggers}}


@dataclass
class SubmitResult:
    """What a submit created and changed."""

    run_id: str
    release: str
    namespace: str
    configmap: str
    patched: list[str] = field(default_factory=list)


def submit(
    clients: Clients, config: RunConfig, namespace: str, release: str | None = None, replace: bool = False
) -> SubmitResult:
    """Store a validated run config and point the release at the run (see the module docstring)."""
    rel = find_release(clients, namespace, release)
    stopped = (rel.trainer.metadata.annotations or {}).get(RUN_STATE) == "stopped"
    if rel.trainer.spec.replicas and not stopped and rel.current_run != config.run_id and not replace:
        raise Conflict(
            f"release {rel.name!r} is running run {rel.current_run!r}; stop it first "
            f"(`cadence k8s stop {rel.current_run}`) or pass --replace"
        )
    configmap = _store_configmap(clients, rel, run_configmap(rel, config), replace)
    result = SubmitResult(config.run_id, rel.name, namespace, configmap)
    replicas = max(int((rel.trainer.metadata.annotations or {}).get(REPLICAS) or rel.trainer.spec.replicas or 1), 1)
    name = rel.trainer.metadata.name
    with api_errors(f"patch StatefulSet {name}"):
        clients.apps.patch_namespaced_stateful_set(
            name, namespace, trainer_patch(config, configmap, replicas), _content_type=SMP
        )
    result.patched.append(f"statefulset/{name}")
    if rel.trainer.spec.replicas:
        result.patched.append(_restart_trainer_pods(clients, rel))
    for service in ("inference", "reward"):
        with api_errors(f"list the {service} Deployment"):
            deployments = clients.apps.list_namespaced_deployment(namespace, label_selector=rel.selector(service)).items
        for deployment in deployments:
            with api_errors(f"patch Deployment {deployment.metadata.name}"):
                clients.apps.patch_namespaced_deployment(
                    deployment.metadata.name, namespace, worker_patch(service, config), _content_type=SMP
                )
            result.patched.append(f"deployment/{deployment.metadata.name}")
    result.patched += _repoint_scaledobjects(clients, rel, config.run_id)
    return result


def _restart_trainer_pods(clients: Clients, rel: Release) -> str:
    """Delete every trainer pod at once: the chart's StatefulSet (updateStrategy OnDelete, Parallel) then
    recreates them together from the patched template. A rolling update would replace one rank at a time,
    and each replacement would break the torchrun group of the others."""
    with api_errors(f"delete the trainer pods of release {rel.name}"):
        clients.core.delete_collection_namespaced_pod(rel.namespace, label_selector=rel.selector("trainer"))
    return f"pods/{rel.fullname}-trainer-*"


def _store_configmap(clients: Clients, rel: Release, body: Any, replace: bool) -> str:
    """Create the run's ConfigMap; a run id the release already knows needs `replace` (returns the name)."""
    run_id = body.metadata.annotations[RUN_ID]
    try:
        existing = find_run_configmap(clients, rel, run_id)
    except NotFound:
        existing = None
    if existing is not None and not replace:
        raise Conflict(
            f"run {run_id!r} was already submitted to release {rel.name!r} (configmap/{existing.metadata.name}; "
            "its streams hold that run's data); pick a new run_id or pass --replace"
        )
    if existing is None:
        with api_errors(f"create ConfigMap {body.metadata.name}"):
            clients.core.create_namespaced_config_map(rel.namespace, body)
        return body.metadata.name
    # Keep what others own on the object (Helm's ownership labels and annotations) and its resourceVersion,
    # so `helm upgrade` still adopts it and a concurrent change makes this replace fail instead of vanish.
    keep = existing.metadata
    managed_by = (keep.labels or {}).get("app.kubernetes.io/managed-by")
    body.metadata.labels = {**(keep.labels or {}), **body.metadata.labels}
    if managed_by:
        body.metadata.labels["app.kubernetes.io/managed-by"] = managed_by
    body.metadata.annotations = {**(keep.annotations or {}), **body.metadata.annotations}
    body.metadata.name, body.metadata.resource_version = keep.name, keep.resource_version
    with api_errors(f"replace ConfigMap {body.metadata.name}"):
        clients.core.replace_namespaced_config_map(body.metadata.name, rel.namespace, body)
    return body.metadata.name


def _repoint_scaledobjects(clients: Clients, rel: Release, run_id: str) -> list[str]:
    try:
        with api_errors("list KEDA ScaledObjects"):
            listed = clients.custom.list_namespaced_custom_object(
                KEDA["group"], KEDA["version"], rel.namespace, KEDA["plural"], label_selector=rel.selector()
            )
    except NotFound:  # KEDA's CRDs are not installed: nothing scales on lag.
        return []
    patched = []
    for item in listed.get("items", []):
        patch = scaledobject_patch(item, run_id)
        if patch is None:
            continue
        name = item["metadata"]["name"]
        with api_errors(f"patch ScaledObject {name}"):
            clients.custom.patch_namespaced_custom_object(
                KEDA["group"], KEDA["version"], rel.namespace, KEDA["plural"], name, patch, _content_type=MERGE_PATCH
            )
        patched.append(f"scaledobject/{name}")
    return patched
