"""Images, docker-compose and the Grafana dashboard, checked without a Docker engine: Debian's
`docker-compose config`, checkov's Dockerfile checks, and the metrics the services really define."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
SERVICES = ("inference", "reward", "trainer", "broker")
CHECKOV = REPO / ".venv-tools" / "bin" / "checkov"
REQUIRED = {"CADENCE_RUN_ID": "run-1", "CADENCE_RUN_CONFIG": "toy-semi-online-dpo.yaml"}


def _compose(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("docker-compose")
    assert binary, "docker-compose is missing: `make setup` installs Debian's docker-compose package"
    clean = {k: v for k, v in os.environ.items() if not k.startswith("CADENCE_")}
    return subprocess.run(
        [binary, "-f", str(REPO / "docker-compose.yml"), *args],
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )


# ids avoid the bare word `gpu`, which tests/conftest.py reads as the `gpu` marker.
@pytest.mark.parametrize("profile", ["cpu", "gpu"], ids=["cpu-profile", "gpu-profile"])
def test_compose_profiles_are_valid(profile: str) -> None:
    done = _compose("--profile", profile, "config", "-q", env=REQUIRED)
    assert done.returncode == 0, done.stderr
    config = yaml.safe_load(_compose("--profile", profile, "config", env=REQUIRED).stdout)
    services = config["services"]
    assert {"redis", "broker", "reward", f"inference-{profile}", f"trainer-{profile}"} <= set(services)
    for name, service in services.items():
        if name != "seed-model":
            assert "healthcheck" in service, name
        for dependency, condition in (service.get("depends_on") or {}).items():
            wanted = "service_completed_successfully" if dependency == "seed-model" else "service_healthy"
            assert condition == {"condition": wanted}, (name, dependency)
        if "build" in service:
            assert service["read_only"] is True and service["cap_drop"] == ["ALL"], name
    trainer = services[f"trainer-{profile}"]
    assert trainer["environment"]["CADENCE_CONFIG"] == "/etc/cadence/configs/toy-semi-online-dpo.yaml"
    assert {"redis", "broker", "reward", f"inference-{profile}"} <= set(trainer["depends_on"])
    if profile == "gpu":
        devices = services["inference-gpu"]["deploy"]["resources"]["reservations"]["devices"]
        assert devices[0]["driver"] == "nvidia" and devices[0]["capabilities"] == ["gpu"]
        assert services["inference-gpu"]["environment"]["CADENCE_ENGINE"] == "vllm"
        assert services["inference-gpu"]["build"]["args"] == {"VARIANT": "cuda"}
    else:
        assert services["inference-cpu"]["environment"]["CADENCE_ENGINE"] == "hf"


def test_compose_names_missing_required_settings() -> None:
    done = _compose("--profile", "cpu", "config", "-q", env={"CADENCE_RUN_CONFIG": "x.yaml"})
    assert done.returncode != 0 and "set CADENCE_RUN_ID to the run id" in done.stderr
    done = _compose("--profile", "gpu", "config", "-q", env={"CADENCE_RUN_ID": "x"})
    assert done.returncode != 0 and "set CADENCE_RUN_CONFIG to a file name under configs/" in done.stderr


@pytest.mark.parametrize("service", SERVICES)
def test_dockerfile_shape(service: str) -> None:
    text = (REPO / "services" / service / "Dockerfile").read_text()
    assert len(re.findall(r"^FROM python:3\.11-slim-bookworm", text, flags=re.M)) == 3, "multi-stage, slim base"
    assert re.search(r"^USER 10001:10001$", text, flags=re.M)
    assert "PYTHONUNBUFFERED=1" in text and "HEALTHCHECK" in text
    assert f'ENTRYPOINT ["cadence", "serve", "{service}"]' in text
    extras = set(re.findall(r'^\s+[\w-]+\) extras="([\w,-]+)"', text, flags=re.M))
    extras |= set(re.findall(r"cadence-\*\.whl\)\[([\w,-]+)\]", text))
    assert extras and all(service in e.split(",") for e in extras), "installs its own extra"
    others = set(SERVICES) - {service}
    assert not any(set(e.split(",")) & others for e in extras), "and no other service's"
    if service != "broker":
        assert "torch==${TORCH_VERSION}" in text and "ARG TORCH_VERSION=2.13.0" in text
        assert "https://download.pytorch.org/whl/cpu" in text


def test_dockerignore_keeps_the_context_small() -> None:
    lines = (REPO / ".dockerignore").read_text().splitlines()
    assert lines[lines.index("**") + 1 :][:4] == ["!pyproject.toml", "!README.md", "!shared/", "!services/"]


def test_dockerfiles_pass_checkov() -> None:
    assert CHECKOV.exists(), "checkov lives in .venv-tools: run `make chart-tools` (make test does it first)"
    done = subprocess.run(
        [str(CHECKOV), "-d", str(REPO / "services"), "--framework", "dockerfile", "-o", "json", "--skip-download"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    report = json.loads(done.stdout)
    assert report["summary"]["failed"] == 0, report["results"]["failed_checks"]
    assert report["summary"]["passed"] > 50


def _defined_metrics() -> set[str]:
    """Names the services expose, following prometheus_client's naming (counters end in `_total`)."""
    names = set()
    for path in [*REPO.joinpath("services").rglob("*.py"), *REPO.joinpath("shared").rglob("*.py")]:
        for kind, name in re.findall(r'\b(Counter|Gauge|Histogram|Summary)\(\s*"(cadence_\w+)"', path.read_text()):
            if kind == "Counter":
                names.add(name.removesuffix("_total") + "_total")
            elif kind in ("Histogram", "Summary"):
                names |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
            else:
                names.add(name)
    return names


def test_dashboard_queries_metrics_the_services_define() -> None:
    dashboard = json.loads((REPO / "charts" / "cadence" / "dashboards" / "cadence.json").read_text())
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    assert len(panels) >= 12 and all(p["targets"] for p in panels)
    queried = {m for p in panels for t in p["targets"] for m in re.findall(r"\bcadence_\w+", t["expr"])}
    missing = queried - _defined_metrics()
    assert not missing, f"the dashboard queries metrics no service defines: {sorted(missing)}"
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
