"""Math verifier: math-verify (`parse` + `verify`) in a pool of worker processes with a hard per-item deadline.

Why a process pool: math-verify bounds its own time with `signal.alarm`, which only works in a main thread,
and some inputs make sympy run for minutes. Each worker process runs math-verify with its own timeouts off;
the parent gives every item a hard deadline and kills and replaces a worker that overruns it, so a
pathological answer costs at most the deadline and never blocks other requests.

Why the response is cut here first: math-verify's cost grows with the text it scans (a 100 KB `\\boxed{...}`
takes seconds), so it sees the response's last `TAIL_CHARS` (from a line start), or, when the last complete
`\\boxed{}` (at most `MAX_ANSWER_CHARS`) lies before that tail, that box alone. Within the tail math-verify
applies its own rules, so "final answer is $x$. I hope" and groups of boxes (`\\boxed{(1, 2)}, \\boxed{(2, 1)}`)
are read as math-verify reads them; keeping only the last box disagreed with it on both. References are
wrapped in `\\boxed{}` before parsing: a bare LaTeX reference such as `\\dfrac{1}{9}` otherwise parses to nothing.
"""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.connection
import queue
import re
import signal
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from importlib.metadata import version
from typing import Literal

Reason = Literal["correct", "incorrect", "no_answer", "timeout", "error", "trailing_text"]
REASONS: tuple[Reason, ...] = ("correct", "incorrect", "no_answer", "timeout", "error", "trailing_text")
SCORER_VERSION = f"math-verify-{version('math-verify')}"
MAX_ANSWER_CHARS = 1024
TAIL_CHARS = 4096
MAX_BOXED_CANDIDATES = 8
START_TIMEOUT_SECONDS = 60.0
_BOXED = "\\boxed"

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Verdict:
    """The outcome of checking one answer."""

    reward: float
    reason: Reason


NO_ANSWER = Verdict(0.0, "no_answer")
TIMEOUT = Verdict(0.0, "timeout")
ERROR = Verdict(0.0, "error")
TRAILING_TEXT = Verdict(0.0, "trailing_text")


def _balanced_end(text: str, open_at: int, limit: int) -> int:
    """Index of the `}` closing the `{` at `open_at`, or -1 if it does not close within `limit` chars."""
    depth = 0
    stop = min(len(text), open_at + limit + 2)
    for index in range(open_at, stop):
        char = text[index]
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return index
    return -1


def _last_box_span(text: str) -> tuple[int, int, int] | None:
    """(start of `\\boxed`, its `{`, its closing `}`) of the last complete box of at most `MAX_ANSWER_CHARS`.

    Looks at no more than `MAX_BOXED_CANDIDATES` occurrences, so the cost stays bounded on any input.
    """
    end = len(text)
    for _ in range(MAX_BOXED_CANDIDATES):
        start = text.rfind(_BOXED, 0, end)
        if start < 0:
            return None
        brace = start + len(_BOXED)
        while brace < len(text) and text[brace] == " ":
            brace += 1
        if brace < len(text) and text[brace] == "{":
            close = _balanced_end(text, brace, MAX_ANSWER_CHARS)
            if close > 0:
                return start, brace, close
        end = start
    return None


def last_boxed(text: str) -> str | None:
    """Content of the last complete `\\boxed{...}` of at most `MAX_ANSWER_CHARS`, or None."""
    span = _last_box_span(text)
    return None if span is None else text[span[1] + 1 : span[2]]


def _tail_start(response: str) -> int:
    """Where the last `TAIL_CHARS` begin, moved to the next line start so no formula is cut in two."""
    start = len(response) - TAIL_CHARS
    if start <= 0:
        return 0
    newline = response.find("\n", start)
    return newline + 1 if 0 <= newline < len(response) - 1 else start


def extract_answer(response: str) -> str | None:
    """The text handed to math-verify: the response's tail, or the last box when it lies before the tail."""
    start = _tail_start(response)
    span = _last_box_span(response)
    if span is not None and span[0] < start:
        boxed = response[span[1] + 1 : span[2]]
        return f"\\boxed{{{boxed}}}" if boxed.strip() else None
    tail = response[start:]
    return tail if tail.strip() else None


_DECIMAL_COMMA = re.compile(r"[+-]?\d+,(?:\d{1,2}|\d{4,})")


def wrap_reference(reference: str) -> str:
    """Gold answers are often bare LaTeX (`\\dfrac{1}{9}`); wrap them so math-verify's extraction finds them.

    Except a decimal comma (`1,22`): math-verify reads it bare as 1.22 but boxed as the set {1, 22}. (With three
    digits after the comma, `58,500`, both readings are the thousands separator.)"""
    stripped = reference.strip()
    if _BOXED in stripped or stripped.startswith(("$", "\\(", "\\[")) or _DECIMAL_COMMA.fullmatch(stripped):
        return stripped
    return f"\\boxed{{{stripped}}}"


_INTEGER = re.compile(r"[+-]?\d{1,64}")
_AFTER_LAST_BOX = re.compile(r"[\s$.\\\])]*")


def runs_past_last_box(response: str) -> bool:
    """Whether text other than closing `$`, `\\]`, `\\)`, `.` or space follows the last complete box
    (`\\boxed{167}6}`); False when there is no box."""
    span = _last_box_span(response)
    return span is not None and not _AFTER_LAST_BOX.fullmatch(response, span[2] + 1)


def integer_verdict(answer: str, reference: str) -> Verdict | None:
    """The verdict for a lone boxed integer against an integer reference, without math-verify; else None.

    Only where math-verify would read that box and nothing else: the text has exactly one `\\boxed`, it is
    complete and last (only closing `$`, `\\]`, `\\)`, `.` after it), and no "final answer" phrase (which
    math-verify ranks with boxes). Integers compare exactly, so this agrees with math-verify by construction
    and skips the ~1.4 ms parse + verify (plus a pool round trip) that most toy answers would otherwise cost.
    """
    span = _last_box_span(answer)
    if span is None or answer.count(_BOXED) != 1 or not _AFTER_LAST_BOX.fullmatch(answer, span[2] + 1):
        return None
    if "final answer" in answer.lower():
        return None
    predicted = answer[span[1] + 1 : span[2]].strip()
    gold = reference.strip().removeprefix(_BOXED + "{").removesuffix("}").strip() if reference else ""
    if not _INTEGER.fullmatch(predicted) or not _INTEGER.fullmatch(gold):
        return None
    return Verdict(1.0, "correct") if int(predicted) == int(gold) else Verdict(0.0, "incorrect")


def check(answer: str, reference: str) -> Verdict:
    """parse + verify with math-verify's own timeouts off: call it only where a deadline is enforced."""
    from math_verify import parse, verify

    gold = parse(reference, parsing_timeout=None)
    if not gold:
        return ERROR
    predicted = parse(answer, parsing_timeout=None)
    if not predicted:
        return NO_ANSWER
    if verify(gold, predicted, timeout_seconds=None):
        return Verdict(1.0, "correct")
    return Verdict(0.0, "incorrect")


def _die_with_parent() -> None:
    """Linux: have the kernel kill this worker when its parent dies, even mid-computation in C code."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _worker_main(conn: multiprocessing.connection.Connection) -> None:
    """Worker process: warm up, say ready, then answer (answer, reference) pairs until the pipe closes."""
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    check("\\boxed{1}", "\\boxed{1}")
    conn.send("ready")
    while True:
        try:
            answer, reference = conn.recv()
        except (EOFError, OSError):
            return
        try:
            verdict = check(answer, reference)
        except Exception:  # math-verify or sympy failing on one input must not end the worker
            verdict = ERROR
        conn.send((verdict.reward, verdict.reason))


class _Worker:
    """One worker process and the parent's end of its pipe."""

    def __init__(self, context: multiprocessing.context.BaseContext) -> None:
        self.conn, child = context.Pipe()
        self.process = context.Process(target=_worker_main, args=(child,), daemon=True, name="math-verify")
        self.process.start()
        child.close()
        if not self.conn.poll(START_TIMEOUT_SECONDS) or self.conn.recv() != "ready":
            self.kill()
            raise RuntimeError(f"math-verify worker did not start within {START_TIMEOUT_SECONDS:.0f}s")

    def run(self, answer: str, reference: str, deadline: float) -> Verdict | None:
        """The verdict, or None when the deadline passed (the worker is then stuck and must be replaced)."""
        self.conn.send((answer, reference))
        if not self.conn.poll(deadline):
            return None
        reward, reason = self.conn.recv()
        return Verdict(reward, reason)

    def kill(self) -> None:
        if self.process.is_alive():
            self.process.kill()
        self.process.join(5.0)
        self.conn.close()


@dataclass
class _Task:
    answer: str
    reference: str
    future: Future[Verdict]


class MathVerifier:
    """A pool of math-verify processes; thread-safe; each item gets at most `item_timeout` seconds of work.

    Items queue in arrival order and are served by `processes` driver threads, each owning one worker
    process. A worker that overruns the deadline is killed and replaced (`restarts` counts them) and the
    item's reason is `timeout`. An item whose worker dies is retried once on a fresh worker (the worker may
    have been killed from outside), then its reason is `error`.

    `strict_format`: a response that runs on past its last box scores 0 (`trailing_text`) even when the box is
    right. Lenient, `\\boxed{167}6}` counts as 167; trained on with DPO, such answers are chosen over ones that
    stop, and the policy learns to stop emitting EOS (the toy's length collapse, bench/paper.py).
    """

    def __init__(self, processes: int = 2, item_timeout: float = 5.0, strict_format: bool = False) -> None:
        if processes < 1:
            raise ValueError("processes must be at least 1")
        if item_timeout <= 0:
            raise ValueError("item_timeout must be positive")
        self.processes = processes
        self.item_timeout = item_timeout
        self.strict_format = strict_format
        self.restarts = 0
        self._context = multiprocessing.get_context("forkserver")
        self._context.set_forkserver_preload(["math_verify", __name__])
        self._tasks: queue.SimpleQueue[_Task | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._closed = False
        self._workers: list[_Worker | None] = [None] * processes
        self._start_failed = [False] * processes
        self._threads = [
            threading.Thread(target=self._drive, args=(slot,), daemon=True, name=f"math-verify-{slot}")
            for slot in range(processes)
        ]
        for thread in self._threads:
            thread.start()

    def wait_ready(self, timeout: float = START_TIMEOUT_SECONDS) -> bool:
        """Block until every worker process runs (True) or `timeout` passes (False)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not self._all_alive():
            time.sleep(0.05)
        return self._all_alive()

    def _all_alive(self) -> bool:
        return not self._closed and all(w is not None and w.process.is_alive() for w in self._workers)

    @property
    def ready(self) -> bool:
        """Every driver thread runs and some slot has a worker or is starting one (a stuck worker being
        replaced is a moment's wait, not unreadiness); unready only when no slot can start a worker."""
        if self._closed or not all(thread.is_alive() for thread in self._threads):
            return False
        return not all(self._start_failed)

    def submit(self, response: str, reference: str) -> Future[Verdict]:
        """Queue one item; the future resolves to its verdict (never raises for bad input)."""
        if self._closed:
            raise RuntimeError("MathVerifier is closed")
        future: Future[Verdict] = Future()
        if self.strict_format and runs_past_last_box(response):
            future.set_result(TRAILING_TEXT)
            return future
        answer = extract_answer(response)
        if answer is None:
            future.set_result(NO_ANSWER)
            return future
        fast = integer_verdict(answer, reference)
        if fast is not None:
            future.set_result(fast)
            return future
        self._tasks.put(_Task(answer, wrap_reference(reference), future))
        return future

    def verify_many(self, pairs: list[tuple[str, str]]) -> list[Verdict]:
        """Verdicts for (response, reference) pairs, in order; items run in parallel across the pool."""
        futures = [self.submit(response, reference) for response, reference in pairs]
        return [future.result() for future in futures]

    def verify(self, response: str, reference: str) -> Verdict:
        return self.submit(response, reference).result()

    def _drive(self, slot: int) -> None:
        """Driver thread: feed queued items to this slot's worker, replacing it when it hangs or dies."""
        worker: _Worker | None = None
        while True:
            while worker is None:
                worker = self._start_worker(slot)
            task = self._tasks.get()
            if task is None:
                break
            if not task.future.set_running_or_notify_cancel():
                continue
            verdict, worker = self._check_on(worker, slot, task)
            task.future.set_result(verdict)
        if worker is not None:
            worker.kill()

    def _check_on(self, worker: _Worker, slot: int, task: _Task) -> tuple[Verdict, _Worker | None]:
        """Run one item; an item that meets a dead worker gets one more try on a fresh one (the worker may
        have been killed from outside); one that kills a fresh worker too is an `error`."""
        for attempt in range(2):
            try:
                verdict = worker.run(task.answer, task.reference, self.item_timeout)
            except (EOFError, OSError):
                log.error("math-verify worker %d died (attempt %d); replacing it", slot, attempt + 1)
                worker = self._replace(worker, slot)
                continue
            if verdict is None:
                log.warning("math-verify item exceeded %.1fs; replacing worker %d", self.item_timeout, slot)
                worker.kill()
                with self._lock:
                    self.restarts += 1
                return TIMEOUT, None
            return verdict, worker
        return ERROR, worker

    def _replace(self, worker: _Worker, slot: int) -> _Worker:
        """Kill `worker` and start a fresh one for `slot`, retrying until one starts."""
        worker.kill()
        with self._lock:
            self.restarts += 1
        fresh = None
        while fresh is None:
            fresh = self._start_worker(slot)
        return fresh

    def _start_worker(self, slot: int) -> _Worker | None:
        try:
            worker = _Worker(self._context)
        except (RuntimeError, OSError, EOFError) as error:
            log.error("cannot start math-verify worker %d (%s); retrying in 1s", slot, error)
            self._start_failed[slot] = True
            time.sleep(1.0)
            return None
        self._start_failed[slot] = False
        self._workers[slot] = worker
        return worker

    def close(self) -> None:
        """Stop the drivers after the items already queued, and end the worker processes."""
        if self._closed:
            return
        self._closed = True
        for _ in self._threads:
            self._tasks.put(None)
        for thread in self._threads:
            thread.join(self.item_timeout + 10.0)
