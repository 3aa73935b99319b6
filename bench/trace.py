"""Where an online step's time goes: one finished `cadence run` traced hop by hop.

Stamps come from what the run already keeps: the Redis ids of its stream entries (millisecond timestamps,
archived in `<run>/streams/`), the JSON log lines of the inference worker ("loaded policy version", with
its fetch and load seconds) and the trainer's `metrics.jsonl` phases. Per step t of an online run:

  release     step t's prompts enter the stream (right after version t is published)
  → loaded    the worker has fetched and loaded version t
  → generated its rollouts are written (the engine's own seconds are `time_generation`)
  → scored    the last of its rollouts is scored
  → complete  the trainer holds the whole batch (`time_wait` after the release)
  → released  training (`time_compute`), publishing version t + 1 and releasing step t + 1 (`time_publish`),
              and whatever the trainer does before that release beyond its `step_time` (records, checkpoint)

Run a trace: `CADENCE_LOG_FORMAT=json cadence run configs/toy-online-dpo.yaml --set steps=30 --engine hf`,
then `.venv/bin/python -m bench.trace runs/<run folder>` (medians over the steps after `--skip`).
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
from pathlib import Path

from cadence.streams import Kind
from cadence.trainer.retention import archived

LOADED = re.compile(r"loaded policy version (\d+)")


def stamps(folder: Path, kind: Kind) -> dict[int, list[float]]:
    """Per step, the Redis times (s) of its entries in the archived `kind` stream."""
    ledger = [json.loads(line) for line in (folder / "ledger.jsonl").read_text().splitlines() if line]
    step_of = {prompt_id: row["step"] for row in ledger for prompt_id in row["prompt_ids"]}
    out: dict[int, list[float]] = {}
    for entry_id, prompt_id in archived(folder, kind).items():
        if prompt_id in step_of:
            out.setdefault(step_of[prompt_id], []).append(int(entry_id.split("-")[0]) / 1000)
    return out


def loads(folder: Path) -> dict[int, dict]:
    """The inference workers' "loaded policy version v" log records, by version (JSON logs only)."""
    out = {}
    for log in sorted((folder / "logs").glob("inference*.log")):
        for line in log.read_text().splitlines():
            if line.startswith("{") and (match := LOADED.match(json.loads(line).get("msg", ""))):
                out.setdefault(int(match.group(1)), json.loads(line))
    return out


def hops(folder: Path, skip: int) -> dict[str, list[float]]:
    """Seconds of each hop, per online step after the first `skip`."""
    released, generated, scored = stamps(folder, "prompts"), stamps(folder, "rollouts"), stamps(folder, "scored")
    loaded = loads(folder)
    metrics = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines() if line]
    out: dict[str, list[float]] = {}
    for m in metrics:
        step = m["step"]
        if step < skip or step not in loaded or not {step, step + 1} <= released.keys() & scored.keys():
            continue
        start, load = min(released[step]), loaded[step]
        rows = {
            "release -> loaded (fetch + load)": load["ts"] - start,
            "  of which fetch": load.get("fetch_s", 0.0),
            "loaded -> generated, less the engine": max(generated[step]) - load["ts"] - m["time_generation"],
            "generation (engine)": m["time_generation"],
            "generated -> scored (reward)": max(scored[step]) - max(generated[step]),
            "scored -> batch complete (intake)": start + m["time_wait"] - max(scored[step]),
            "training": m["time_compute"],
            "publish + release": m["time_publish"],
            "step (release to release)": min(released[step + 1]) - start,
        }
        rows["between steps (records, checkpoint)"] = min(released[step + 1]) - start - m["step_time"]
        # What the services cost over the work itself: the step less generation, scoring and training.
        stages = m["time_generation"] + m.get("time_scoring", 0.0) + m["time_compute"]
        rows["beyond generation + scoring + training"] = rows["step (release to release)"] - stages
        for key, value in rows.items():
            out.setdefault(key, []).append(value)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="a finished run's folder, run with CADENCE_LOG_FORMAT=json")
    parser.add_argument("--skip", type=int, default=3, help="start-up steps left out")
    args = parser.parse_args()
    traced = hops(args.folder, args.skip)
    if not traced:
        raise SystemExit(f"nothing to trace in {args.folder}: an online run with JSON logs is needed")
    print(f"{len(next(iter(traced.values())))} steps (median ms)")
    for key, values in traced.items():
        print(f"{key:>38}  {statistics.median(values) * 1000:8.1f}")


if __name__ == "__main__":
    main()
