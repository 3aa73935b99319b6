"""What a restarted trainer finds in its run folder: the checkpoints kept and the finished marker."""

from __future__ import annotations

import json
from pathlib import Path

from cadence.trainer.resume import local_view, mark_finished, prune_checkpoints


def test_the_two_newest_checkpoints_are_kept_and_never_the_one_latest_names(tmp_path: Path) -> None:
    for step in (2, 4, 6, 10):
        (tmp_path / f"step-{step}").mkdir()
    (tmp_path / "latest").write_text("step-10")
    assert prune_checkpoints(tmp_path) == ["step-2", "step-4"]  # numeric order: step-10 is the newest
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-10", "step-6"]
    (tmp_path / "latest").write_text("step-6")  # a newer tag cut short: `latest` still names the whole one
    (tmp_path / "step-12").mkdir()
    assert prune_checkpoints(tmp_path) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-10", "step-12", "step-6"]


def test_a_finished_run_is_seen_by_a_restarted_trainer(tmp_path: Path) -> None:
    assert local_view(tmp_path).finished is None and local_view(tmp_path).tag is None
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "latest").write_text("step-3\n")
    mark_finished(tmp_path, "run", 3, 3)
    view = local_view(tmp_path)
    assert view.tag == "step-3" and view.finished is not None and view.finished["step"] == 3
    assert json.loads((tmp_path / "finished.json").read_text())["run_id"] == "run"
    assert view.describe() == "checkpoint step-3, finished at step 3"
