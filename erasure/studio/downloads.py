"""Files a session downloads (edits, exports, run and probe records), written where the web server serves them
from and deleted an hour after they were written."""

from __future__ import annotations

import secrets
import shutil
import tempfile
import time
import weakref
from pathlib import Path

FILE_LIFETIME_S = 3600


class Downloads:
    """A private folder under `parent` (the app passes Gradio's cache folder, which Gradio serves in place: one
    copy per file). The folder goes when this object does, or at interpreter exit."""

    def __init__(self, parent: str | Path | None = None, lifetime_s: float = FILE_LIFETIME_S):
        if parent is not None:
            Path(parent).mkdir(parents=True, exist_ok=True)
        self.folder = Path(tempfile.mkdtemp(prefix="erasure-studio-", dir=parent))
        self.lifetime_s = lifetime_s
        self.remove = weakref.finalize(self, shutil.rmtree, self.folder, ignore_errors=True)

    def new_file(self, stem: str, suffix: str) -> Path:
        """A fresh path for a download; files older than the lifetime are deleted first."""
        now = time.time()
        for old in self.folder.iterdir():
            try:  # another session's save may rename its temporary file away between listing and stat
                expired = now - old.stat().st_mtime > self.lifetime_s
            except FileNotFoundError:
                continue
            if expired:
                old.unlink(missing_ok=True)
        return self.folder / f"{stem}-{secrets.token_hex(4)}{suffix}"
