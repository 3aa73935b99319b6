"""Keep Redis as small as the work in flight: after each checkpoint, trim the entries of the run's three
streams that every stage has acknowledged (the trainer's acknowledgements wait for the checkpoint, so a
restart never needs a trimmed entry).

What an audit reads of them stays on disk: `<run_dir>/streams/<kind>.jsonl`, one line per entry with its
Redis id and prompt id (an entry archived twice, by a trim cut short, has the same id both times).
"""

from __future__ import annotations

import json
from pathlib import Path

import redis
from google.protobuf.message import DecodeError, Message
from prometheus_client import Gauge

from cadence import streams
from cadence.logging import get_logger
from cadence.v1 import common_pb2

log = get_logger(__name__)

REDIS_MEMORY = Gauge("cadence_redis_memory_bytes", "Redis used_memory (used) and maxmemory (max; 0: none)", ["kind"])
STREAM_LENGTH = Gauge("cadence_stream_length", "Entries in the run's stream (in flight + not yet trimmed)", ["kind"])

MESSAGES: dict[streams.Kind, type[Message]] = {
    "prompts": common_pb2.Prompt,
    "rollouts": common_pb2.Rollout,
    "scored": common_pb2.ScoredRollout,
}


def prompt_id(kind: streams.Kind, message: Message) -> str:
    """The prompt an entry of `kind` is about."""
    if kind == "prompts":
        return message.prompt_id  # type: ignore[attr-defined]
    if kind == "rollouts":
        return message.prompt.prompt_id  # type: ignore[attr-defined]
    return message.rollout.prompt.prompt_id  # type: ignore[attr-defined]


class StreamRetention:
    """Trims the run's finished stream entries into `<run_dir>/streams/`."""

    def __init__(self, client: redis.Redis, run_id: str, run_dir: Path) -> None:
        self.client, self.run_id = client, run_id
        self.folder = Path(run_dir) / "streams"

    def trim(self) -> dict[str, int]:
        """Trim every stream; returns how many entries each lost."""
        self.folder.mkdir(parents=True, exist_ok=True)
        trimmed = {}
        for kind in MESSAGES:
            key = streams.stream_key(self.run_id, kind)
            trimmed[kind] = streams.trim_finished(
                self.client, key, lambda entries, kind=kind: self._archive(kind, entries)
            )
        log.debug("trimmed finished stream entries: %s", trimmed)
        self.observe()
        return trimmed

    def observe(self) -> None:
        """Export Redis's memory and the streams' lengths (the chart's PrometheusRule alerts on them)."""
        used, limit = streams.memory(self.client)
        REDIS_MEMORY.labels("used").set(used)
        REDIS_MEMORY.labels("max").set(limit)
        for kind in MESSAGES:
            STREAM_LENGTH.labels(kind).set(
                streams.StreamProducer(self.client, streams.stream_key(self.run_id, kind)).length()
            )

    def _archive(self, kind: streams.Kind, entries: list[tuple[str, dict]]) -> None:
        lines = []
        for entry_id, fields in entries:
            message = MESSAGES[kind]()
            try:
                message.ParseFromString(fields[streams.FIELD])
                pid = prompt_id(kind, message)
            except (KeyError, DecodeError):
                pid = ""
            lines.append(json.dumps({"id": entry_id, "prompt_id": pid}) + "\n")
        with (self.folder / f"{kind}.jsonl").open("a") as handle:
            handle.write("".join(lines))
            handle.flush()


def archived(run_dir: Path, kind: streams.Kind) -> dict[str, str]:
    """The archived entries of `kind`: Redis id → prompt id."""
    path = Path(run_dir) / "streams" / f"{kind}.jsonl"
    if not path.exists():
        return {}
    text = path.read_text()
    rows = [json.loads(line) for line in text[: text.rfind("\n") + 1].splitlines() if line]
    return {row["id"]: row["prompt_id"] for row in rows}
