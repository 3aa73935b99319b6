"""The chart rendered once per session with real Helm (helm-python-sdk bundles Helm's Go code)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from .rendering import SCENARIOS, render, scenario_values


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
