"""Server-side bookkeeping for app sessions: edits by id, per-session cancel flags, background jobs (training,
probes).

Edits hold tensors (tens of MB on SD-1.x), which do not belong in a UI framework's per-session
state (Gradio deep-copies and hashes it). A session keeps only the ids; the tensors live here,
bounded by an LRU cap so abandoned sessions cannot exhaust memory.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

from erasure.engine.edit import Edit, Patch
from erasure.engine.lru import LRU
from erasure.engine.progress import Cancelled, Progress


class EditStore:
    def __init__(self, max_edits: int = 64):
        self.max_edits = max_edits
        self._edits: LRU[tuple[str, Edit]] = LRU(max_items=max_edits)  # id -> (owning session, edit)

    def add(self, edit: Edit, owner: str = "") -> str:
        """Keep `edit` for session `owner` (its tensors moved to host memory: tens of edits must not hold GPU
        memory; applying copies them to the device) and return its id."""
        edit = dataclasses.replace(edit, patches={key: Patch(p.kind, p.value.detach().to("cpu"))
                                                  for key, p in edit.patches.items()})
        edit_id = secrets.token_hex(8)
        self._edits[edit_id] = (owner, edit)
        return edit_id

    def get(self, edit_id: str) -> Edit:
        entry = self._edits.get(edit_id)
        if entry is None:
            raise ValueError("this edit is no longer held by the server (the app keeps the most recent "
                             f"{self.max_edits}); erase again or upload its .safetensors file")
        return entry[1]

    def discard(self, edit_ids: Iterable[str]) -> None:
        for edit_id in edit_ids:
            self._edits.pop(edit_id)

    def discard_session(self, owner: str) -> None:
        """Free every edit a closed session held."""
        self.discard([edit_id for edit_id, (holder, _) in self._edits.items() if holder == owner])

    def owners(self) -> list[str]:
        return [holder for _, (holder, _) in self._edits.items()]

    def __len__(self) -> int:
        return len(self._edits)


class CancelFlags:
    """One flag per running request, keyed by session: Cancel sets it, the denoising loop polls it."""

    def __init__(self):
        self._flags: dict[str, threading.Event] = {}
        self._lock = threading.Lock()

    def start(self, session: str) -> threading.Event:
        with self._lock:
            flag = self._flags[session] = threading.Event()
        return flag

    def cancel(self, session: str) -> bool:
        """Set the session's flag; False when nothing is running for it."""
        with self._lock:
            flag = self._flags.get(session)
        if flag is None:
            return False
        flag.set()
        return True

    def finish(self, session: str, flag: threading.Event) -> None:
        with self._lock:
            if self._flags.get(session) is flag:
                del self._flags[session]


@dataclass
class Job:
    """Work running in the background for one session (a trained method, a probe run); the app polls it."""
    label: str
    kind: str = "training"  # training | probes: which poll takes its result
    cancel: threading.Event = field(default_factory=threading.Event)
    state: str = "waiting"  # waiting (for a free slot) | running | done | cancelled | failed
    done: int = 0
    total: int = 0
    loss: float = math.nan
    message: str = ""  # the latest step's words, for work that reports no loss
    started: float = field(default_factory=time.monotonic)
    ended: float | None = None
    result: Any = None  # the edit, when done
    error: str = ""

    @property
    def finished(self) -> bool:
        return self.state in ("done", "cancelled", "failed")


class Jobs:
    """Background jobs: one per session, of any kind, at most `slots` running at once (training, and probes that
    search or invert, hold a private copy of the denoiser, so the slots bound memory); the others wait their
    turn. Jobs run in their own threads, not in a request: the page polls, other requests and sessions go on."""

    def __init__(self, slots: int = 1):
        self._slots = threading.Semaphore(slots)
        self._jobs: dict[str, Job] = {}
        self._lock = threading.Lock()

    def start(self, session: str, label: str, work: Callable[[Callable, Callable], Any],
              kind: str = "training") -> Job:
        """Run `work(on_step, should_stop)` in a thread for `session`; a ValueError if one is still running.
        `on_step(Progress)` records progress."""
        with self._lock:
            current = self._jobs.get(session)
            if current is not None and not current.finished:
                doing = "training" if current.kind == "training" else "running"
                raise ValueError(f"this session is still {doing} {current.label}; cancel it or wait for it "
                                 f"to finish before starting another")
            if current is not None and current.state == "done":  # its result has not reached the session yet
                raise ValueError(f"{current.label} has just finished and its result is being shown; try again in a "
                                 f"second")
            job = self._jobs[session] = Job(label, kind)
        threading.Thread(target=self._run, args=(job, work), name=f"{kind} {label}", daemon=True).start()
        return job

    def _run(self, job: Job, work) -> None:
        def on_step(step: Progress):
            job.done, job.total, job.loss, job.message = step.done, step.total, step.loss, step.message

        while not self._slots.acquire(timeout=0.2):  # a job cancelled while it waits ends at once
            if job.cancel.is_set():
                job.ended, job.state = time.monotonic(), "cancelled"
                return
        try:
            if job.cancel.is_set():
                job.state = "cancelled"
                return
            job.state, job.started = "running", time.monotonic()
            try:
                job.result = work(on_step, job.cancel.is_set)
                job.state = "done"
            except Cancelled:
                job.state = "cancelled"
            except ValueError as error:  # the user's input (concepts, parameters): their own sentence
                job.error, job.state = str(error), "failed"
            except Exception as error:  # a bug: the log gets the traceback, the user a short line
                logging.getLogger(__name__).exception("%s job %s failed", job.kind, job.label)
                job.error, job.state = f"{type(error).__name__}: {error}", "failed"
        finally:
            job.ended = job.ended or time.monotonic()
            self._slots.release()

    def get(self, session: str) -> Job | None:
        with self._lock:
            return self._jobs.get(session)

    def take(self, session: str, kind: str | None = None) -> Job | None:
        """The session's job (of `kind`, when given) if it has finished, removed from the store (its result is now
        the caller's)."""
        with self._lock:
            job = self._jobs.get(session)
            if job is None or not job.finished or kind not in (None, job.kind):
                return None
            return self._jobs.pop(session)

    def cancel(self, session: str, kind: str | None = None) -> bool:
        """Ask the session's job (of `kind`, when given) to stop after its current step; False when it has none
        running."""
        job = self.get(session)
        if job is None or job.finished or kind not in (None, job.kind):
            return False
        job.cancel.set()
        return True

    def discard_session(self, session: str) -> None:
        self.cancel(session)
        with self._lock:
            self._jobs.pop(session, None)
