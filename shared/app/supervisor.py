"""Child processes of a local run: start with logs to files, watch, stop cleanly, leave no orphans.

Each child runs in its own session (so a terminal's Ctrl-C reaches only the launcher, which then stops the
children in order) and asks the kernel to SIGTERM it if the launcher dies (PR_SET_PDEATHSIG), so even a
SIGKILLed launcher leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

_PR_SET_PDEATHSIG = 1
# torch.distributed rendezvous variables: an in-process trainer (tests, benchmarks) sets them, and a child
# trainer that inherited them would try to bind the parent's MASTER_PORT. Each child picks its own.
DIST_ENV = ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE")


def _die_with_parent() -> None:
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


@dataclass
class Child:
    """A named child process and the file its output goes to."""

    name: str
    args: list[str]
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None
    started: float = field(default=0.0)

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def tail(self, lines: int = 20) -> str:
        """The last lines of the child's log (what a person needs to see when it failed)."""
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return "(no log written)"
        return "\n".join(text.splitlines()[-lines:])


class Supervisor:
    """Starts children, reports the first one that died, and stops them all in reverse order."""

    def __init__(self, log_dir: Path, env: dict[str, str] | None = None) -> None:
        self.log_dir = log_dir
        inherited = {k: v for k, v in os.environ.items() if k not in DIST_ENV}
        self.env = {**inherited, **(env or {})}
        self.children: list[Child] = []
        log_dir.mkdir(parents=True, exist_ok=True)

    def start(self, name: str, args: Sequence[str], env: dict[str, str] | None = None) -> Child:
        child = Child(name, list(args), self.log_dir / f"{name}.log", {**self.env, **(env or {})})
        _spawn(child)
        self.children.append(child)
        return child

    def child(self, name: str) -> Child:
        found = [child for child in self.children if child.name == name]
        if not found:
            raise KeyError(f"no child named {name!r}; children: {[c.name for c in self.children]}")
        return found[0]

    def kill(self, name: str, sig: signal.Signals = signal.SIGKILL) -> None:
        """Send `sig` to a child's whole process group (fault injection: SIGKILL is a crash)."""
        child = self.child(name)
        if child.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(child.proc.pid, sig)
            if sig == signal.SIGKILL:
                child.proc.wait()

    def restart(self, name: str) -> Child:
        """Start a child again with the same arguments and environment (after it died or was killed);
        its log continues in the same file."""
        child = self.child(name)
        if child.alive:
            raise RuntimeError(f"{name} is still running (pid {child.proc.pid}); kill or stop it first")
        _spawn(child)
        return child

    def first_failure(self, ignore: Sequence[str] = ()) -> Child | None:
        """A child that exited (any exit is a failure while the run is going), if any."""
        for child in self.children:
            if child.name not in ignore and not child.alive:
                return child
        return None

    def stop(self, name: str, grace: float = 15.0) -> None:
        for child in self.children:
            if child.name == name:
                _terminate(child, grace)

    def stop_all(self, grace: float = 15.0, last: Sequence[str] = ()) -> None:
        """SIGTERM everyone (newest first), then SIGKILL whoever is still there after `grace` seconds.

        Children named in `last` (what the others depend on, e.g. Redis) are stopped only once the rest exited.
        """
        for group in ([c for c in self.children if c.name not in last], [c for c in self.children if c.name in last]):
            for child in reversed(group):
                if child.alive and child.proc is not None:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(child.proc.pid, signal.SIGTERM)
            deadline = time.monotonic() + grace
            for child in reversed(group):
                _wait_or_kill(child, max(0.1, deadline - time.monotonic()))


def _spawn(child: Child) -> None:
    with child.log_path.open("ab") as log:
        child.proc = subprocess.Popen(
            child.args,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=child.env,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
    child.started = time.monotonic()


def _terminate(child: Child, grace: float) -> None:
    if child.alive and child.proc is not None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.proc.pid, signal.SIGTERM)
    _wait_or_kill(child, grace)


def _wait_or_kill(child: Child, timeout: float) -> None:
    if child.proc is None:
        return
    try:
        child.proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.proc.pid, signal.SIGKILL)
        child.proc.wait()
    # the session may hold grandchildren (vLLM's engine process, pool workers): end them too
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(child.proc.pid, signal.SIGKILL)
