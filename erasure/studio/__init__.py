"""The studio: what the app does for its sessions, without Gradio (session edits, downloads, background jobs,
reports and tables, startup). `app.py` lays it out in a page; the CLI prints the same reports."""

from erasure.studio.studio import ComparisonResult, EditAdded, Studio

__all__ = ["ComparisonResult", "EditAdded", "Studio"]
