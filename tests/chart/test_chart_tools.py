"""The chart checked by its tools: the generated values schema and README table, strict Helm lint, the
Kubernetes schemas 1.29–1.32, checkov, and the messages the values schema and `required` give."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import helm_python
import kubernetes_validate
import pytest
import yaml

from .rendering import CHART, CHECKOV, SCENARIOS

KUBE_VERSIONS = ["1.29", "1.30", "1.31", "1.32"]
CRD_KINDS = {"ScaledObject", "ServiceMonitor"}  # not in kubernetes-validate's schemas: checked below


def test_every_scenario_is_covered() -> None:
    assert SCENARIOS == [
        "cpu-tiny",
        "external-redis",
        "gpu-multi-node-trainer",
        "gpu-single-node",
        "gpu-single-node-8gpu",
        "keda",
    ]


def test_values_schema_and_readme_table_are_in_sync() -> None:
    """values.schema.json and the README's values table are generated from values.yaml's `# --` comments."""
    spec = importlib.util.spec_from_file_location("values_schema", CHART / "scripts" / "values_schema.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their module while the class is built
    spec.loader.exec_module(module)
    for path, text in module.outputs(CHART).items():
        assert path.read_text() == text, f"{path.name} is stale: run `make chart-docs`"
    # The generator refuses an undocumented key, so a stale or partial schema cannot slip through.
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    docs = module.parse_docs((CHART / "values.yaml").read_text())
    docs.pop(("inference", "gpus"))
    with pytest.raises(ValueError, match=r"`inference.gpus` has no `# --` comment"):
        module.build_schema(values, docs)


@pytest.mark.parametrize("kube", KUBE_VERSIONS)
def test_helm_lint_strict(kube: str) -> None:
    for name in [None, *SCENARIOS]:
        values = yaml.safe_load((CHART / "ci" / f"{name}-values.yaml").read_text()) if name else None
        report = helm_python.lint(str(CHART), values, strict=True, namespace="cadence", kube_version=f"v{kube}.0")
        problems = [m for m in report["messages"] if m["severity"] >= 2]
        assert report["errors"] == [] and problems == [], (name, report)


@pytest.mark.parametrize("kube", KUBE_VERSIONS)
def test_manifests_validate_strictly(rendered: dict[str, list[dict]], kube: str) -> None:
    for name, docs in rendered.items():
        for doc in docs:
            if doc["kind"] in CRD_KINDS:
                continue
            try:
                kubernetes_validate.validate(doc, kube, strict=True)
            except kubernetes_validate.ValidationError as error:
                pytest.fail(f"{name}: {doc['kind']} {doc['metadata']['name']} invalid for {kube}: {error}")


def _readme_skips() -> dict[str, str]:
    text = (CHART / "README.md").read_text()
    return dict(re.findall(r"^\| `(CKV\w+)` \| (.+?) \|$", text, flags=re.M))


def test_checkov_finds_nothing_but_documented_skips(rendered_dir: Path) -> None:
    assert CHECKOV.exists(), "checkov lives in .venv-tools: run `make chart-tools` (make test does it first)"
    done = subprocess.run(
        [str(CHECKOV), "-d", str(rendered_dir), "--framework", "kubernetes", "-o", "json", "--skip-download"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    report = json.loads(done.stdout)
    results = report["results"]
    failed = [(f["check_id"], f["resource"], f["file_path"]) for f in results["failed_checks"]]
    assert failed == [], failed
    assert report["summary"]["passed"] > 1000 and report["summary"]["parsing_errors"] == 0
    skipped = {s["check_id"]: s["check_result"].get("suppress_comment", "") for s in results["skipped_checks"]}
    documented = _readme_skips()
    for check, why in skipped.items():
        assert len(why) > 20, f"{check} is skipped without a justification"
        assert check in documented, f"{check} is skipped in the chart but not listed in README.md"


def test_schema_rejects_bad_values_with_a_clear_message(render_values) -> None:
    with pytest.raises(helm_python.HelmValuesError, match=r"at '/inference/replicas': got string, want integer"):
        render_values({"inference": {"replicas": "two"}})
    with pytest.raises(helm_python.HelmValuesError, match=r"additional properties 'replica' not allowed"):
        render_values({"reward": {"replica": 3}})
    with pytest.raises(helm_python.HelmValuesError, match=r"at '/inference/engine'"):
        render_values({"inference": {"engine": "tgi"}})
    with pytest.raises(helm_python.HelmValuesError, match=r"at '/run/id'"):
        render_values({"run": {"id": "bad id!"}})


def test_required_settings_fail_with_the_fix(render_values) -> None:
    with pytest.raises(helm_python.HelmRenderError, match=r"redis.external.url \(or redis.external.existingSecret\)"):
        render_values({"redis": {"enabled": False}})
    with pytest.raises(
        helm_python.HelmRenderError, match=r"gpu.resourceName must name the GPU resource .* trainer.gpus is 2"
    ):
        render_values({"gpu": {"resourceName": ""}, "trainer": {"gpus": 2}})
    with pytest.raises(
        helm_python.HelmRenderError, match=r"inference.tensorParallelSize \(3\) must divide inference.gpus \(4\)"
    ):
        render_values({"inference": {"gpus": 4, "tensorParallelSize": 3}, "models": {"parametersBillions": 1}})
    with pytest.raises(helm_python.HelmRenderError, match=r"needs both requests and limits"):
        render_values({"broker": {"resources": {"limits": None}}})  # null deletes the default
