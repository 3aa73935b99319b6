"""The live view of a local run: a progress bar over steps and one line of the dynamics that matter."""

from __future__ import annotations

import time
from collections.abc import Iterable

from rich.console import Console, Group
from rich.live import Live
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.text import Text

from cadence.app.supervisor import Child


def _fmt(value: object, spec: str) -> str:
    return format(value, spec) if isinstance(value, int | float) else "–"


class RunView:
    """Step / total, policy version, reward, accuracy, entropy, length, staleness, samples/s, ETA, health."""

    def __init__(self, console: Console, total_steps: int) -> None:
        self.progress = Progress(
            TextColumn("[bold]training"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=console,
        )
        self.task = self.progress.add_task("steps", total=total_steps)
        self.metrics = Text("waiting for the first step…", style="dim")
        self.health = Text("")
        self.live = Live(Group(self.progress, self.metrics, self.health), console=console, refresh_per_second=4)
        self.samples = 0
        self.started = time.monotonic()

    def __enter__(self) -> RunView:
        self.live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.live.__exit__(*exc)

    def update(self, rows: list[dict], children: Iterable[Child]) -> None:
        if rows:
            last = rows[-1]
            self.samples += sum(row.get("samples", 0) for row in rows)
            rate = self.samples / max(1e-6, time.monotonic() - self.started)
            self.progress.update(self.task, completed=last["step"] + 1)
            self.metrics = Text(
                f"v{last.get('version', 0)}  loss {_fmt(last.get('loss'), '.4f')}  "
                f"reward {_fmt(last.get('reward_mean'), '.3f')}  acc {_fmt(last.get('accuracy'), '.1%')}  "
                f"entropy {_fmt(last.get('entropy'), '.3f')}  len {_fmt(last.get('length_mean'), '.1f')}  "
                f"staleness {_fmt(last.get('staleness_mean'), '.1f')}  {rate:.0f} samples/s"
            )
        marks = [f"[{'green' if c.alive else 'red'}]{'●' if c.alive else '✗'} {c.name}[/]" for c in children]
        self.health = Text.from_markup("services: " + "  ".join(marks))
        self.live.update(Group(self.progress, self.metrics, self.health))
