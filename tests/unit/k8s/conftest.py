"""A loopback HTTP server that answers like the Kubernetes API and records every request.

`cadence.app.k8s` talks to it through a real `kubernetes.client.ApiClient`, so these tests check the exact
calls (method, path, query, content type, body) and the client's (de)serialisation of real objects.
The objects it serves are the ones the Helm chart renders, so the code and the chart cannot drift.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import yaml

REPO = Path(__file__).resolve().parents[3]
CHART = REPO / "charts" / "cadence"
NAMESPACE = "cadence"
RELEASE = "rel"


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, list[str]]
    content_type: str
    body: Any


class FakeApiServer(ThreadingHTTPServer):
    """Routes are (METHOD, path regex) → (status, JSON body or str); unknown routes answer 404."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.routes: list[tuple[str, re.Pattern[str], int, Any]] = []
        self.requests: list[Request] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def route(self, method: str, path: str, body: Any, status: int = 200) -> None:
        self.routes.insert(0, (method, re.compile(path + "$"), status, body))

    def writes(self) -> list[Request]:
        return [r for r in self.requests if r.method in ("POST", "PUT", "PATCH", "DELETE")]


class _Handler(BaseHTTPRequestHandler):
    server: FakeApiServer

    def log_message(self, *args: Any) -> None:
        pass

    def _serve(self) -> None:
        parts = urlsplit(self.path)
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        body = json.loads(raw) if raw else None
        self.server.requests.append(
            Request(self.command, parts.path, parse_qs(parts.query), self.headers.get("Content-Type", ""), body)
        )
        for method, pattern, route_status, route_answer in self.server.routes:
            if method == self.command and pattern.match(parts.path):
                status, answer = route_status, route_answer
                break
        else:
            status, answer = 404, {"kind": "Status", "apiVersion": "v1", "status": "Failure", "message": "not found"}
        selector = parse_qs(parts.query).get("labelSelector")
        if selector and isinstance(answer, dict) and "items" in answer:
            answer = {**answer, "items": [item for item in answer["items"] if _matches(item, selector[0])]}
        payload = answer if isinstance(answer, str) else json.dumps(answer)
        data = payload.encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/plain" if isinstance(answer, str) else "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _serve


def _matches(item: dict[str, Any], selector: str) -> bool:
    """Equality-based label selectors (`a=b,c=d`), as the API server applies them."""
    labels = item["metadata"].get("labels") or {}
    return all(labels.get(key) == value for key, _, value in (term.partition("=") for term in selector.split(",")))


def render_chart(values: dict[str, Any] | None = None) -> dict[tuple[str, str], dict[str, Any]]:
    """The chart's objects for `values`, keyed by (kind, name)."""
    import helm_python

    with helm_python.Chart.load(str(CHART)) as chart:
        out = chart.render(values or {}, name=RELEASE, namespace=NAMESPACE, is_install=True)
    docs = [doc for path, text in out.items() if path.endswith(".yaml") for doc in yaml.safe_load_all(text) if doc]
    return {(doc["kind"], doc["metadata"]["name"]): doc for doc in docs}


def as_list(kind: str, items: list[dict[str, Any]]) -> dict[str, Any]:
    return {"kind": f"{kind}List", "apiVersion": "v1", "metadata": {}, "items": items}


def install(api: FakeApiServer, objects: dict[tuple[str, str], dict[str, Any]], ready: bool = True) -> None:
    """Serve a rendered release: its trainer, Deployments, run ConfigMaps; KEDA objects when rendered."""
    trainer = dict(objects[("StatefulSet", "rel-cadence-trainer")])
    replicas = trainer["spec"]["replicas"]
    trainer["status"] = {"replicas": replicas, "readyReplicas": replicas if ready else 0}
    api.route("GET", f"/apis/apps/v1/namespaces/{NAMESPACE}/statefulsets", as_list("StatefulSet", [trainer]))
    for service in ("inference", "reward"):
        deployment = objects[("Deployment", f"rel-cadence-{service}")]
        api.route("PATCH", f"/apis/apps/v1/namespaces/{NAMESPACE}/deployments/rel-cadence-{service}", deployment)
    deployments = [objects[("Deployment", f"rel-cadence-{s}")] for s in ("inference", "reward")]
    api.route("GET", f"/apis/apps/v1/namespaces/{NAMESPACE}/deployments", as_list("Deployment", deployments))
    api.route("PATCH", f"/apis/apps/v1/namespaces/{NAMESPACE}/statefulsets/rel-cadence-trainer", trainer)
    configmaps = [doc for (kind, _), doc in objects.items() if kind == "ConfigMap"]
    api.route("GET", f"/api/v1/namespaces/{NAMESPACE}/configmaps", as_list("ConfigMap", configmaps))
    scaled = [doc for (kind, _), doc in objects.items() if kind == "ScaledObject"]
    if scaled:
        api.route(
            "GET", f"/apis/keda.sh/v1alpha1/namespaces/{NAMESPACE}/scaledobjects", as_list("ScaledObject", scaled)
        )
        for doc in scaled:
            path = f"/apis/keda.sh/v1alpha1/namespaces/{NAMESPACE}/scaledobjects/{doc['metadata']['name']}"
            api.route("PATCH", path, doc)


@pytest.fixture
def api() -> Iterator[FakeApiServer]:
    server = FakeApiServer()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture
def clients(api: FakeApiServer) -> Any:
    from kubernetes import client

    from cadence.app.k8s import Clients

    configuration = client.Configuration(host=api.url)
    configuration.retries = 0
    return Clients.from_api_client(client.ApiClient(configuration), NAMESPACE)


@pytest.fixture
def render() -> Callable[..., dict[tuple[str, str], dict[str, Any]]]:
    """`render(values)`: the chart's objects keyed by (kind, name)."""
    return render_chart


@pytest.fixture
def serve_release(api: FakeApiServer) -> Callable[..., None]:
    """`serve_release(objects, ready=True)`: the API server serves that rendered release."""
    return lambda objects, ready=True: install(api, objects, ready)
