"""Server-side bookkeeping for app sessions: edits by id, and per-session cancel flags.

Edits hold tensors (tens of MB on SD-1.x), which do not belong in a UI framework's per-session
state (Gradio deep-copies and hashes it). A session keeps only the ids; the tensors live here,
bounded by an LRU cap so abandoned sessions cannot exhaust memory.
"""

from __future__ import annotations

import dataclasses
import secrets
import threading
from typing import Iterable

from .edit import Edit, Patch
from .lru import LRU


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
