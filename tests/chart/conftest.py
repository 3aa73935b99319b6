"""The chart rendered once per session with real Helm (helm-python-sdk bundles Helm's Go code)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "cadence"
SCENARIOS = sorted(path.name.removesuffix("-values.yaml") for path in (CHART / "ci").glob("*-values.yaml"))
NAMESPACE = "cadence"
RELEASE = "rel"


def render(values: dict[str, Any] | None = None, release: str = RELEASE) -> list[dict[str, Any]]:
    """Every object the chart renders for `values` (NOTES.txt left out)."""
    import helm_python

    with helm_python.Chart.load(str(CHART)) as chart:
        out = chart.render(values or {}, name=release, namespace=NAMESPACE, is_install=True)
    return [
        doc for path, text in sorted(out.items()) if path.endswith(".yaml") for doc in yaml.safe_load_all(text) if doc
    ]


def scenario_values(name: str) -> dict[str, Any]:
    return yaml.safe_load((CHART / "ci" / f"{name}-values.yaml").read_text()) or {}


@pytest.fixture(scope="session")
def rendered() -> dict[str, list[dict[str, Any]]]:
    """scenario name → its objects; `default` is the chart with no values file."""
    out = {name: render(scenario_values(name)) for name in SCENARIOS}
    out["default"] = render()
    return out


@pytest.fixture(scope="session")
def rendered_dir(rendered: dict[str, list[dict[str, Any]]], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The rendered scenarios as one YAML file each, for tools that read files (checkov)."""
    root = tmp_path_factory.mktemp("rendered")
    for name, docs in rendered.items():
        (root / f"{name}.yaml").write_text(yaml.safe_dump_all(docs, sort_keys=False))
    return root


@pytest.fixture(scope="session")
def render_values() -> Any:
    """`render_values(values)`: render the chart with other values (schema and `required` errors raise)."""
    return render
