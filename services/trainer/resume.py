"""What a (re)started trainer resumes from, agreed by every rank before anything is loaded.

A run's folder holds its checkpoints (`checkpoints/latest` names the newest tag) and, once the run is
done, `finished.json`. Rank 0 alone writes `latest`, `frozen.pt` and DeepSpeed's model states, so a rank
whose node does not see rank 0's files (a ReadWriteOnce volume per trainer pod) would start fresh while
rank 0 enters the collective load — a hang until the collective timeout. So every rank reads what it
sees, all ranks compare, and on any difference every rank stops at once with the same message.

A finished run stays finished: a trainer restarted in a finished run's folder (the StatefulSet restarts
a container that exited 0) reports the run done and idles instead of reloading and rewriting `final/`.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cadence.errors import IntegrityError
from cadence.logging import get_logger

log = get_logger(__name__)

FINISHED_FILE = "finished.json"
KEEP_CHECKPOINTS = 2
"""Checkpoint tags kept: the newest and the one before (still whole if the newest was cut short)."""
TERMINATION_LOG = Path("/dev/termination-log")
"""Kubernetes shows this file's text as the container's termination message (`cadence k8s status`)."""


@dataclass(frozen=True)
class ResumePoint:
    """What one rank sees in the run folder."""

    tag: str | None
    """The checkpoint `checkpoints/latest` names (None: none, start at step 0)."""
    finished: dict[str, Any] | None
    """`finished.json` of a run that is done (None: not done)."""

    def describe(self) -> str:
        done = f", finished at step {self.finished['step']}" if self.finished else ""
        return f"checkpoint {self.tag or 'none'}{done}"


def local_view(run_dir: Path) -> ResumePoint:
    """The checkpoint tag and finished marker this process sees under `run_dir`."""
    latest = run_dir / "checkpoints" / "latest"
    tag = latest.read_text().strip() if latest.exists() else None
    marker = run_dir / FINISHED_FILE
    finished = json.loads(marker.read_text()) if marker.exists() else None
    return ResumePoint(tag, finished)


def agreed_view(run_dir: Path) -> ResumePoint:
    """What this run resumes from, agreed by every rank before anything is loaded (*collective* under a
    launcher: it joins the process group DeepSpeed then uses). A finished run's ranks then idle without
    loading the model."""
    world_size, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    if world_size > 1:
        _join_process_group()
    return agree(local_view(run_dir), world_size, rank)


def _join_process_group() -> None:
    """The default process group as DeepSpeed would create it (NCCL on GPUs, gloo on CPU); DeepSpeed's
    `initialize` uses a group that exists."""
    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl")
    else:
        dist.init_process_group("gloo")


def agree(view: ResumePoint, world_size: int, rank: int) -> ResumePoint:
    """Every rank's view (*collective*); raises `IntegrityError` on every rank when any two differ."""
    if world_size == 1:
        return view
    import torch.distributed as dist

    views: list[ResumePoint | None] = [None] * world_size
    dist.all_gather_object(views, view)
    if any(other != view for other in views):
        seen = "; ".join(f"rank {r}: {v.describe() if v else '?'}" for r, v in enumerate(views))
        raise IntegrityError(
            f"the trainer ranks see different run folders ({seen}), so they cannot resume together: rank 0 "
            "alone writes `latest`, the frozen models and the model states. Give every trainer pod the same "
            "run folder (a ReadWriteMany volume for trainer.persistence, or one node), or copy rank 0's "
            "<run_dir>/<run_id> to every node before restarting"
        )
    if rank == 0 and view.tag:
        log.info("all %d ranks resume from %s", world_size, view.describe())
    return view


def mark_finished(run_dir: Path, run_id: str, step: int, version: int) -> None:
    """Record that the run is done (atomically), and say so as the pod's termination message."""
    record = {"run_id": run_id, "step": step, "version": version, "finished_unix": time.time()}
    tmp = run_dir / f".{FINISHED_FILE}.tmp"
    tmp.write_text(json.dumps(record))
    tmp.replace(run_dir / FINISHED_FILE)
    message = f"cadence: run {run_id} finished at step {step} (version {version})"
    with contextlib.suppress(OSError):  # not in a Kubernetes container
        TERMINATION_LOG.write_text(message)


def prune_checkpoints(directory: Path, keep: int = KEEP_CHECKPOINTS) -> list[str]:
    """Delete all but the newest `keep` `step-N` tags under `directory` (never the one `latest` names);
    returns the deleted tags. Without this every checkpoint of a long run stays on the volume."""
    latest = directory / "latest"
    current = latest.read_text().strip() if latest.exists() else None
    tags = sorted(
        (p.name for p in directory.glob("step-*") if p.is_dir() and re.fullmatch(r"step-\d+", p.name)),
        key=lambda tag: int(tag.removeprefix("step-")),
    )
    doomed = [tag for tag in tags[: max(0, len(tags) - keep)] if tag != current]
    for tag in doomed:
        shutil.rmtree(directory / tag, ignore_errors=True)
    return doomed
