"""`cadence k8s status|logs|stop`: inspect and stop a run submitted to a release (`cadence.app.k8s`).

`stop` scales the trainer to zero (it checkpoints on SIGTERM); inference and reward stay up.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from cadence.app.k8s import (
    MERGE_PATCH,
    RUN_ID,
    RUN_STATE,
    SMP,
    SUBMITTED_AT,
    Clients,
    api_errors,
    find_release,
    find_run_configmap,
)
from cadence.errors import Conflict, InvalidRequest

SERVICES = ("trainer", "inference", "reward", "broker", "redis")


@dataclass
class PodRow:
    """One pod of the release as `status` shows it."""

    service: str
    name: str
    phase: str
    ready: bool
    restarts: int
    run_id: str


@dataclass
class RunStatus:
    """A run as the cluster sees it."""

    run_id: str
    release: str
    namespace: str
    configmap: str
    submitted_at: str
    state: str
    """`running`, `starting`, `finished`, `stopped`, or `superseded` (another run is current)."""
    current_run: str
    pods: list[PodRow]
    finished: str = ""
    """The trainer's termination message when it finished the run (its restarted container idles)."""

    def render(self) -> str:
        lines = [
            f"run {self.run_id} on release {self.release} (namespace {self.namespace}): {self.state}",
            f"  config: configmap/{self.configmap}, submitted {self.submitted_at or 'with the chart'}",
        ]
        if self.state == "superseded":
            lines.append(f"  the release now runs {self.current_run!r}")
        if self.finished:
            lines.append(f"  {self.finished}; the trainer idles (`cadence k8s stop` frees its GPUs)")
        for pod in self.pods:
            mark = "ready" if pod.ready else "not ready"
            lines.append(
                f"  {pod.service:<9} {pod.name:<48} {pod.phase:<9} {mark:<9} restarts={pod.restarts} run={pod.run_id}"
            )
        return "\n".join(lines)


def status(clients: Clients, run_id: str, namespace: str, release: str | None = None) -> RunStatus:
    """The run's state, its config, and the release's pods."""
    rel = find_release(clients, namespace, release)
    configmap = find_run_configmap(clients, rel, run_id)
    spec, st = rel.trainer.spec, rel.trainer.status
    if rel.current_run != run_id:
        state = "superseded"
    elif not spec.replicas or (rel.trainer.metadata.annotations or {}).get(RUN_STATE) == "stopped":
        state = "stopped"
    else:
        state = "running" if (st and (st.ready_replicas or 0) >= spec.replicas) else "starting"
    with api_errors("list the release's pods"):
        pods = clients.core.list_namespaced_pod(namespace, label_selector=rel.selector()).items
    rows = [_pod_row(pod) for pod in pods]
    rows.sort(key=lambda row: (SERVICES.index(row.service) if row.service in SERVICES else 99, row.name))
    submitted = (configmap.metadata.annotations or {}).get(SUBMITTED_AT, "")
    finished = next(filter(None, (_finished_message(pod, run_id) for pod in pods)), "")
    if finished and state in ("running", "starting"):
        state = "finished"
    return RunStatus(
        run_id, rel.name, namespace, configmap.metadata.name, submitted, state, rel.current_run, rows, finished
    )


def _finished_message(pod: Any, run_id: str) -> str:
    """The trainer's "run … finished" termination message (exit 0) on this pod, current or last, else ""."""
    if (pod.metadata.labels or {}).get("app.kubernetes.io/component") != "trainer":
        return ""
    for container in (pod.status.container_statuses if pod.status else None) or []:
        for state in (container.state, container.last_state):
            ended = state.terminated if state else None
            if ended and ended.exit_code == 0 and f"run {run_id} finished" in (ended.message or ""):
                return ended.message.strip()
    return ""


def _pod_row(pod: Any) -> PodRow:
    statuses = (pod.status.container_statuses if pod.status else None) or []
    return PodRow(
        service=(pod.metadata.labels or {}).get("app.kubernetes.io/component", "?"),
        name=pod.metadata.name,
        phase=(pod.status.phase if pod.status else None) or "Unknown",
        ready=bool(statuses) and all(s.ready for s in statuses),
        restarts=sum(s.restart_count or 0 for s in statuses),
        run_id=(pod.metadata.annotations or {}).get(RUN_ID, ""),
    )


def logs(
    clients: Clients,
    run_id: str,
    namespace: str,
    release: str | None = None,
    service: str = "trainer",
    tail: int = 200,
    follow: bool = False,
) -> Iterator[str]:
    """Log lines of the service's pods that work on the run, each prefixed with its pod's name."""
    if service not in SERVICES[:3]:
        raise InvalidRequest(f"--service must be one of trainer, inference, reward (got {service!r})")
    rel = find_release(clients, namespace, release)
    find_run_configmap(clients, rel, run_id)
    with api_errors(f"list {service} pods"):
        pods = clients.core.list_namespaced_pod(namespace, label_selector=rel.selector(service)).items
    pods = sorted(
        (p for p in pods if (p.metadata.annotations or {}).get(RUN_ID) == run_id), key=lambda p: p.metadata.name
    )
    if not pods:
        raise Conflict(
            f"no {service} pod works on run {run_id!r} now (release {rel.name!r} runs {rel.current_run!r}); "
            "a finished run's metrics stay in the trainer's run folder"
        )
    if follow and len(pods) > 1:
        raise InvalidRequest(
            f"--follow reads one pod but {len(pods)} {service} pods work on {run_id!r}; use kubectl logs -f"
        )
    for pod in pods:
        name = pod.metadata.name
        with api_errors(f"read the log of pod {name}"):
            if follow:
                stream = clients.core.read_namespaced_pod_log(
                    name, namespace, container=service, tail_lines=tail, follow=True, _preload_content=False
                )
                for line in stream:
                    yield f"[{name}] {line.decode(errors='replace').rstrip()}"
                continue
            text = clients.core.read_namespaced_pod_log(name, namespace, container=service, tail_lines=tail)
        yield from (f"[{name}] {line}" for line in text.splitlines())


def stop(clients: Clients, run_id: str, namespace: str, release: str | None = None) -> str:
    """Scale the trainer of the run to zero (SIGTERM: it checkpoints and exits); returns the StatefulSet."""
    rel = find_release(clients, namespace, release)
    configmap = find_run_configmap(clients, rel, run_id)
    if rel.current_run != run_id:
        raise Conflict(f"run {run_id!r} is not running: release {rel.name!r} runs {rel.current_run!r}")
    name = rel.trainer.metadata.name
    patch = {"metadata": {"annotations": {RUN_STATE: "stopped"}}, "spec": {"replicas": 0}}
    with api_errors(f"scale StatefulSet {name} to zero"):
        clients.apps.patch_namespaced_stateful_set(name, namespace, patch, _content_type=SMP)
    with api_errors(f"mark ConfigMap {configmap.metadata.name} stopped"):
        clients.core.patch_namespaced_config_map(
            configmap.metadata.name,
            namespace,
            {"metadata": {"annotations": {RUN_STATE: "stopped"}}},
            _content_type=MERGE_PATCH,
        )
    return name
