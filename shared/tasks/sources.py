"""Reading prompt sources: JSONL / JSON / Parquet files or `datasets` names, and the record formats.

- NuminaMath (AI-MO/NuminaMath-CoT or -1.5): the paper's filter drops proofs, multiple-choice and
  synthetic sources; the gold answer is the `answer` field or the last `\\boxed{}` of the solution.
- WildChat (allenai/WildChat-1M): the first user turn of each conversation, optionally English only.
- Anything else is sniffed per record: `problem` + `answer`/`solution` → math, `prompt`,
  `instruction`, `question` or a conversation → chat.

A `datasets` name needs the network (or a populated HF cache); with `HF_HUB_OFFLINE=1` and no cache,
loading fails and the error says to pass a local file instead.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from cadence.errors import ConfigError
from cadence.tasks.problem import Kind, Problem, math_prompt

FILE_SUFFIXES = (".jsonl", ".json", ".parquet")
NUMINA_HUB_NAME = "AI-MO/NuminaMath-CoT"
WILDCHAT_HUB_NAME = "allenai/WildChat-1M"
_PROOF = re.compile(r"\b(prove|proof|show that|demonstrate that)\b", re.IGNORECASE)
_CHOICE_A = re.compile(r"\(\s*A\s*\)|(^|\n)\s*A\s*[.:)]")
_CHOICE_B = re.compile(r"\(\s*B\s*\)|(^|\n)\s*B\s*[.:)]")
_LETTER_ANSWER = re.compile(r"^\s*(\\text\{)?\(?\s*[A-E]\s*\)?\}?\s*$")
_ID_FIELDS = ("unique_id", "id", "uid", "idx", "conversation_hash")


def read_records(source: str | Path, split: str = "train") -> list[dict[str, Any]]:
    """All records of a local file (by suffix) or of a `datasets` name's `split`."""
    path = Path(source)
    if path.suffix in FILE_SUFFIXES:
        if not path.is_file():
            raise ConfigError(f"dataset file {path} does not exist; check the path (or CADENCE_DATA_DIR)")
        if path.suffix == ".parquet":
            import pyarrow.parquet as pq

            return pq.read_table(path).to_pylist()
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".json":
            data = json.loads(text)
            return data if isinstance(data, list) else [data]
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    return _hub_records(str(source), split)


def _hub_records(name: str, split: str) -> list[dict[str, Any]]:
    try:
        import datasets
    except ImportError:
        raise ConfigError(f"loading {name!r} needs the `datasets` package: pip install 'cadence[data]'") from None
    try:
        return list(datasets.load_dataset(name, split=split))
    except Exception as error:  # datasets raises many unrelated types for "not reachable / not found"
        raise ConfigError(
            f"could not load the `datasets` dataset {name!r} (split {split!r}): {error}. Offline, pass a "
            f"local JSONL/Parquet file instead (e.g. dataset: /data/{name.split('/')[-1]}.jsonl)"
        ) from None


def last_boxed(text: str) -> str | None:
    """The content of the last `\\boxed{...}` (braces balanced), or None."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, begin = 0, start + len("\\boxed{")
    for index in range(begin, len(text)):
        if text[index] == "{":
            depth += 1
        elif text[index] == "}":
            if depth == 0:
                return text[begin:index].strip() or None
            depth -= 1
    return None


def _record_id(record: dict[str, Any], index: int) -> str:
    for field in _ID_FIELDS:
        if record.get(field) not in (None, ""):
            return str(record[field])
    return str(index)


def numina_keep(record: dict[str, Any]) -> bool:
    """The paper's NuminaMath filter: no proofs, no multiple-choice, no synthetic sources, an answer."""
    source = str(record.get("source", "")).lower()
    if source.startswith("synthetic") or record.get("synthetic") is True:
        return False
    question_type = str(record.get("question_type", "")).lower()
    if question_type in ("proof", "mcq", "multiple-choice", "multiple_choice"):
        return False
    problem = str(record.get("problem", ""))
    answer = numina_answer(record)
    if answer is None or answer.lower() in ("proof", "notfound"):
        return False
    if _PROOF.search(problem):
        return False
    has_choices = bool(_CHOICE_A.search(problem) and _CHOICE_B.search(problem))
    return not (has_choices or _LETTER_ANSWER.match(answer))


def numina_answer(record: dict[str, Any]) -> str | None:
    """The `answer` field when present, else the last `\\boxed{}` of the solution."""
    answer = record.get("answer")
    if isinstance(answer, str) and answer.strip():
        return answer.strip()
    return last_boxed(str(record.get("solution", "")))


def numina_problems(records: Iterable[dict[str, Any]], prefix: str = "numina") -> list[Problem]:
    """Filtered NuminaMath records as math problems."""
    return [
        Problem(
            prompt_id=f"{prefix}-{_record_id(record, index)}",
            kind="math",
            text=math_prompt(str(record["problem"])),
            reference=numina_answer(record),
        )
        for index, record in enumerate(records)
        if numina_keep(record)
    ]


def _turns(record: dict[str, Any]) -> list[dict[str, Any]]:
    turns = record.get("conversation") or record.get("conversations") or record.get("messages") or []
    return turns if isinstance(turns, list) else []


def first_user_turn(record: dict[str, Any]) -> str | None:
    """The text of the first user message of a WildChat (or ShareGPT-style) conversation."""
    for turn in _turns(record):
        if isinstance(turn, dict) and turn.get("role", turn.get("from")) in ("user", "human"):
            text = str(turn.get("content", turn.get("value", ""))).strip()
            return text or None
    return None


def _is_english(record: dict[str, Any]) -> bool:
    language = record.get("language")
    if language is None and _turns(record):
        language = _turns(record)[0].get("language")
    return str(language).lower() in ("english", "en")


def wildchat_problems(
    records: Iterable[dict[str, Any]], english_only: bool = True, prefix: str = "wildchat"
) -> list[Problem]:
    """First user turns of WildChat conversations as chat prompts (no reference)."""
    problems = []
    for index, record in enumerate(records):
        text = first_user_turn(record)
        if text is None or (english_only and not _is_english(record)):
            continue
        problems.append(Problem(prompt_id=f"{prefix}-{_record_id(record, index)}", kind="chat", text=text))
    return problems


def generic_problem(record: dict[str, Any], index: int, kind: Kind, prefix: str) -> Problem | None:
    """One record of an unknown source, sniffed by its fields; None when it holds no prompt."""
    prompt_id = f"{prefix}-{_record_id(record, index)}"
    if "problem" in record:
        reference = record.get("answer_str") or record.get("answer")
        if reference is None:
            reference = last_boxed(str(record.get("solution", "")))
        text = math_prompt(str(record["problem"])) if kind == "math" else str(record["problem"])
        return Problem(prompt_id, kind, text, None if reference is None else str(reference))
    for field in ("prompt", "instruction", "question"):
        if isinstance(record.get(field), str) and record[field].strip():
            reference = record.get("answer", record.get("reference", record.get("reference_output")))
            text = math_prompt(record[field]) if kind == "math" else record[field]
            return Problem(prompt_id, kind, text, None if reference is None else str(reference))
    text = first_user_turn(record)
    return Problem(prompt_id, kind, text) if text else None


def generic_problems(records: Iterable[dict[str, Any]], kind: Kind, prefix: str) -> list[Problem]:
    """Every record that holds a prompt; math records without a reference are dropped."""
    problems = (generic_problem(record, index, kind, prefix) for index, record in enumerate(records))
    return [p for p in problems if p is not None and (kind == "chat" or p.reference is not None)]
