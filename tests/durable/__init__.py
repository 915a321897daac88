"""Durable fan-out against real checkpointers (SQLite on disk, PostgreSQL): crash a run in a
child process, resume it in another; marked `server` (they start a real database)."""
