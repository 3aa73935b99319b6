"""Images, docker-compose and the Grafana dashboard, checked without a Docker engine: Debian's
`docker-compose config`, checkov's Dockerfile checks, and the metrics the services really define."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib

import pytest
import yaml

from .rendering import CHART, CHECKOV, REPO, SCENARIOS

SERVICES = ("inference", "reward", "trainer", "broker")
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


def _torch_pin() -> str:
    models = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]["models"]
    return next(r for r in models if r.startswith("torch==")).removeprefix("torch==")


@pytest.mark.parametrize("service", SERVICES)
def test_dockerfile_shape(service: str) -> None:
    text = (REPO / "services" / service / "Dockerfile").read_text()
    assert re.search(r"^ARG BASE_IMAGE=python:3\.11-slim-bookworm$", text, flags=re.M), "slim default base"
    assert re.search(r"^FROM \$\{BASE_IMAGE\} AS wheel$", text, flags=re.M), "the wheel is built in its own stage"
    assert re.search(r"^USER 10001:10001$", text, flags=re.M)
    assert "PYTHONUNBUFFERED=1" in text and "HEALTHCHECK" in text and "HOME=/tmp" in text
    assert f'ENTRYPOINT ["cadence", "serve", "{service}"]' in text
    extras = set(re.findall(r"requirements\.py /build/pyproject\.toml ([\w -]+?)(?: \$|\s*>)", text))
    assert extras and all(service in e.split() for e in extras), "installs its own extra"
    assert not any(set(e.split()) & (set(SERVICES) - {service}) for e in extras), "and no other service's"
    # Cache-friendly: dependencies are installed before the source arrives, the wheel last.
    steps = [text.index(s) for s in ("install.sh deps", "COPY --from=wheel /wheels", "install.sh cadence")]
    assert steps == sorted(steps)
    if service != "broker":
        assert f"TORCH_VERSION={_torch_pin()}" in text, "the Dockerfile's torch is pyproject's pin"
        assert text.index("install.sh torch") < text.index("install.sh deps")
    gpu_base = {"inference": "ARG VLLM_IMAGE=vllm/vllm-openai:v", "trainer": "ARG CUDA_IMAGE=nvidia/cuda:"}
    if service in gpu_base:
        assert gpu_base[service] in text and re.search(r"^FROM base-\$\{VARIANT\}$", text, flags=re.M)
    if service == "trainer":
        assert re.search(r"ARG CUDA_IMAGE=nvidia/cuda:[\d.]+-devel-", text), "nvcc for DeepSpeed's JIT ops"


def test_build_recipe_installs_what_pyproject_declares() -> None:
    sys.path.insert(0, str(REPO / "docker"))
    try:
        from requirements import requirements  # type: ignore[import-not-found]
    finally:
        sys.path.pop(0)
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    trainer = requirements(project, ["trainer", "data", "verify"])
    assert not any(r.startswith("torch") for r in trainer), "torch is installed first, from its own index"
    assert any(r.startswith("deepspeed") for r in trainer) and any(r.startswith("datasets") for r in trainer)
    assert any(r.startswith("math-verify") for r in trainer), "`cadence eval` runs in the trainer image"
    assert "pyproject.toml trainer data verify >" in (REPO / "services" / "trainer" / "Dockerfile").read_text()
    assert set(project["dependencies"]) <= set(requirements(project, ["broker"]))
    assert not any(r.startswith(("transformers", "deepspeed")) for r in requirements(project, ["broker"]))


def test_dockerignore_keeps_the_context_small() -> None:
    lines = (REPO / ".dockerignore").read_text().splitlines()
    kept = ["!pyproject.toml", "!README.md", "!shared/", "!services/", "!docker/"]
    assert lines[lines.index("**") + 1 :][:5] == kept


def _made_images(tag: str, variant: str) -> set[str]:
    """The tags `make images` gives, read from its own recipe (ENGINE=echo prints each build command)."""
    done = subprocess.run(
        ["make", "-s", "images", "ENGINE=echo", f"IMAGE_TAG={tag}", f"VARIANT={variant}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return set(re.findall(r" -t (\S+) ", done.stdout))


def test_make_images_tags_all_four_services_alike() -> None:
    assert _made_images("1.2.3", "cpu") == {f"cadence-{s}:1.2.3" for s in SERVICES}
    assert _made_images("1.2.3", "cuda") == {f"cadence-{s}:1.2.3-cuda" for s in SERVICES}


def _rendered_images(docs: list[dict]) -> set[str]:
    images = set()
    for doc in docs:
        spec = doc.get("spec", {})
        pod = spec.get("jobTemplate", {}).get("spec", spec).get("template", {}).get("spec", spec)
        for c in [*pod.get("initContainers", []), *pod.get("containers", [])]:
            images.add(c["image"])
    return images


@pytest.mark.parametrize("name", [*SCENARIOS, "default"])
def test_chart_references_only_images_make_images_produces(rendered: dict[str, list[dict]], name: str) -> None:
    values = yaml.safe_load((CHART / "ci" / f"{name}-values.yaml").read_text()) if name != "default" else {}
    redis = yaml.safe_load((CHART / "values.yaml").read_text())["redis"]["image"]["repository"]
    ours = {i for i in _rendered_images(rendered[name]) if not i.startswith(redis + ":")}
    assert ours, name
    tag = (values.get("image") or {}).get("tag") or yaml.safe_load((CHART / "Chart.yaml").read_text())["appVersion"]
    variant = "cuda" if tag.endswith("-cuda") else "cpu"
    made = _made_images(tag.removesuffix("-cuda"), variant)
    assert ours <= made, f"{name}: the chart pulls images `make images` never tags: {sorted(ours - made)}"


def test_a_digest_pins_one_service_image(render_values) -> None:
    digest = "sha256:" + "a" * 64
    images = _rendered_images(render_values({"inference": {"image": {"digest": digest}}}))
    pinned = {i for i in images if i.endswith("@" + digest)}
    assert pinned == {"cadence-inference:0.1.0@" + digest}, images


@pytest.mark.parametrize("profile", ["cpu", "gpu"], ids=["cpu-profile", "gpu-profile"])
def test_compose_references_only_images_make_images_produces(profile: str) -> None:
    config = yaml.safe_load(_compose("--profile", profile, "config", env=REQUIRED).stdout)
    built = {s["image"] for s in config["services"].values() if "build" in s}
    made = _made_images("dev", "cpu") | _made_images("dev", "cuda")
    assert built and built <= made, sorted(built - made)


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
