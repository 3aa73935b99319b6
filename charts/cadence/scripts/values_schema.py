"""Generate `values.schema.json` and the README's values table from the `# --` comments in values.yaml.

values.yaml is the one source: every key has a `# --` comment (optionally starting with `(type)`)
and may be followed by `# @schema {json}` merged into its schema. A documented map whose keys are
all documented is a section (strict: unknown keys are rejected); one whose keys are not documented
is a free-form value (`resources`, `affinity`, the run config). `--check` fails when either output
is stale, which is what the chart tests run.

    python charts/cadence/scripts/values_schema.py          # rewrite both files
    python charts/cadence/scripts/values_schema.py --check  # exit 1 when stale
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

CHART = Path(__file__).resolve().parents[1]
KEY_LINE = re.compile(r"^(?P<indent> *)(?P<key>[A-Za-z0-9_.-]+):(?:\s|$)")
TYPE_PREFIX = re.compile(r"^\((?P<type>[a-z|]+)\)\s*")
TYPES = {"string": "string", "int": "integer", "bool": "boolean", "object": "object", "list": "array"}
TYPES |= {"null": "null", "number": "number"}
README_START, README_END = "<!-- values:start -->", "<!-- values:end -->"


@dataclass
class Doc:
    """What the comments above one key say."""

    text: str
    type: list[str] | None = None
    schema: dict[str, Any] = field(default_factory=dict)


def parse_docs(text: str) -> dict[tuple[str, ...], Doc]:
    """Map each documented key path to its doc, following indentation (two spaces a level)."""
    docs: dict[tuple[str, ...], Doc] = {}
    stack: list[tuple[int, str]] = []
    pending: list[str] = []
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("#"):
            pending.append(stripped.lstrip("#").strip() if not stripped.startswith("# -- ") else stripped)
            continue
        match = KEY_LINE.match(line)
        if not match:
            pending = []
            continue
        indent = len(match["indent"])
        while stack and stack[-1][0] >= indent:
            stack.pop()
        stack.append((indent, match["key"]))
        doc = _doc_from_comments(pending)
        if doc is not None:
            docs[tuple(key for _, key in stack)] = doc
        pending = []
    return docs


def _doc_from_comments(lines: list[str]) -> Doc | None:
    start = next((i for i, line in enumerate(lines) if line.startswith("# -- ")), None)
    if start is None:
        return None
    text_parts, schema = [lines[start][5:]], {}
    for line in lines[start + 1 :]:
        if line.startswith("@schema "):
            schema |= json.loads(line[len("@schema ") :])
        else:
            text_parts.append(line)
    text = " ".join(part for part in text_parts if part)
    type_match = TYPE_PREFIX.match(text)
    types = None
    if type_match:
        types = [TYPES[name] for name in type_match["type"].split("|")]
        text = text[type_match.end() :]
    return Doc(text=text, type=types, schema=schema)


def _json_type(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    raise ValueError(f"a null default needs a `(type)` in its `# --` comment: {value!r}")


def build_schema(values: dict[str, Any], docs: dict[tuple[str, ...], Doc]) -> dict[str, Any]:
    """The JSON schema of a section; raises ValueError naming any undocumented key."""
    return {
        "$schema": "http://json-schema.org/draft-07/schema#",
        "title": "Values of the Cadence chart (generated from values.yaml by scripts/values_schema.py)",
        **_section(values, docs, ()),
    }


def _section(values: dict[str, Any], docs: dict[tuple[str, ...], Doc], path: tuple[str, ...]) -> dict:
    properties = {}
    for key, value in values.items():
        key_path = (*path, key)
        doc = docs.get(key_path)
        if doc is None:
            raise ValueError(f"values.yaml: `{'.'.join(key_path)}` has no `# --` comment; document it")
        properties[key] = _property(value, doc, docs, key_path)
    return {"type": "object", "additionalProperties": False, "properties": properties}


def _property(value: Any, doc: Doc, docs: dict[tuple[str, ...], Doc], path: tuple[str, ...]) -> dict:
    if isinstance(value, dict) and value and any((*path, key) in docs for key in value):
        schema = _section(value, docs, path)
    else:
        types = doc.type or [_json_type(value)]
        schema = {"type": types[0] if len(types) == 1 else types}
    return {"description": doc.text, **schema, **doc.schema}


def leaf_rows(values: dict[str, Any], docs: dict[tuple[str, ...], Doc], path=()) -> list[tuple]:
    """(key, type, default, description) for each documented leaf, in file order."""
    rows = []
    for key, value in values.items():
        key_path = (*path, key)
        if isinstance(value, dict) and value and any((*key_path, child) in docs for child in value):
            rows += leaf_rows(value, docs, key_path)
            continue
        doc = docs[key_path]
        kind = "|".join(doc.type) if doc.type else _json_type(value)
        default = json.dumps(value, separators=(",", ":"))
        rows.append((".".join(key_path), kind, default, doc.text))
    return rows


def render_table(rows: list[tuple]) -> str:
    lines = ["| Key | Type | Default | Description |", "|---|---|---|---|"]
    for key, kind, default, text in rows:
        shown = f"`{default.replace('|', '¦')}`" if len(default) <= 60 else "see values.yaml"
        lines.append(f"| `{key}` | {kind} | {shown} | {text.replace('|', '¦')} |")
    return "\n".join(lines)


def outputs(chart: Path = CHART) -> dict[Path, str]:
    """The generated schema and README text for the chart as it is now."""
    text = (chart / "values.yaml").read_text()
    values, docs = yaml.safe_load(text), parse_docs(text)
    schema = json.dumps(build_schema(values, docs), indent=2, ensure_ascii=False) + "\n"
    readme = (chart / "README.md").read_text()
    head, _, rest = readme.partition(README_START)
    _, _, tail = rest.partition(README_END)
    table = render_table(leaf_rows(values, docs))
    return {
        chart / "values.schema.json": schema,
        chart / "README.md": f"{head}{README_START}\n{table}\n{README_END}{tail}",
    }


def main(argv: list[str]) -> int:
    stale = [path for path, text in outputs().items() if not path.exists() or path.read_text() != text]
    if "--check" in argv:
        for path in stale:
            print(f"{path} is stale: run `python charts/cadence/scripts/values_schema.py`", file=sys.stderr)
        return 1 if stale else 0
    for path, text in outputs().items():
        path.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
