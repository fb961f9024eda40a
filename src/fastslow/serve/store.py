"""Durable serving records: the answers served with --learn and the feedback on them (SQLite, WAL, fsynced).

``journal_mode=WAL`` with ``synchronous=FULL`` makes every committed transaction durable (the WAL is fsynced at
each commit), so a feedback the server acknowledged with a 200 survives a kill -9 or a power cut: the route
returns only after :meth:`FeedbackStore.add_feedback` committed. One connection, shared by the HTTP threads, the
generation thread and the learner under a lock (SQLite serialises writers anyway).
"""

from __future__ import annotations

import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS answers (
    id TEXT PRIMARY KEY, created REAL NOT NULL, task TEXT NOT NULL, problem_id TEXT,
    prompt TEXT NOT NULL, completion TEXT NOT NULL, stopped INTEGER NOT NULL, fingerprint TEXT NOT NULL,
    user TEXT
);
CREATE TABLE IF NOT EXISTS feedback (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL UNIQUE REFERENCES answers(id),
    reward REAL NOT NULL, text TEXT, source TEXT NOT NULL, created REAL NOT NULL
);
"""


@dataclass(frozen=True)
class Feedback:
    """One scored answer: the formatted prompt it answered (fast context included), the completion, its reward."""

    seq: int
    id: str
    reward: float
    text: str | None
    source: str
    task: str
    problem_id: str | None
    prompt: str
    completion: str
    stopped: bool  # the completion ended with the eos token (not cut at max_tokens)
    fingerprint: str
    created: float
    user: str | None  # the request's last user turn (None: stored before user turns were)


class FeedbackStore:
    """The run dir's ``serve.sqlite``: answers (with --learn) and feedback, durable once a call returns."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None, timeout=30)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(SCHEMA)
        if "user" not in {row[1] for row in self._db.execute("PRAGMA table_info(answers)")}:  # an older run dir
            self._db.execute("ALTER TABLE answers ADD COLUMN user TEXT")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def add_answers(self, rows: list[tuple[str, str, str | None, str, str, bool, str, str]]) -> None:
        """Store served answers ``(id, task, problem_id, prompt, completion, stopped, fingerprint, user)``, one
        commit."""
        now = time.time()
        with self._lock:
            self._db.execute("BEGIN")
            self._db.executemany("INSERT INTO answers (id, created, task, problem_id, prompt, completion, stopped, "
                                 "fingerprint, user) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                                 [(r[0], now, *r[1:]) for r in rows])
            self._db.execute("COMMIT")

    def add_feedback(self, answer_id: str, reward: float, text: str | None, source: str) -> str:
        """Record feedback on an answer; durable when this returns. Returns 'ok', 'unknown' or 'duplicate'."""
        with self._lock:
            if self._db.execute("SELECT 1 FROM answers WHERE id = ?", (answer_id,)).fetchone() is None:
                return "unknown"
            try:
                self._db.execute("INSERT INTO feedback (id, reward, text, source, created) VALUES (?, ?, ?, ?, ?)",
                                 (answer_id, reward, text, source, time.time()))
            except sqlite3.IntegrityError:
                return "duplicate"
        return "ok"

    def feedback_after(self, seq: int, limit: int) -> list[Feedback]:
        """Up to ``limit`` feedback rows with ``seq`` above the given one, oldest first."""
        query = ("SELECT f.seq, f.id, f.reward, f.text, f.source, a.task, a.problem_id, a.prompt, a.completion, "
                 "a.stopped, a.fingerprint, f.created, a.user FROM feedback f JOIN answers a ON a.id = f.id "
                 "WHERE f.seq > ? ORDER BY f.seq LIMIT ?")
        with self._lock:
            rows = self._db.execute(query, (seq, limit)).fetchall()
        return [Feedback(*row[:9], bool(row[9]), *row[10:]) for row in rows]

    def count_after(self, seq: int) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM feedback WHERE seq > ?", (seq,)).fetchone()[0]

    def feedback_ids(self) -> set[str]:
        with self._lock:
            return {row[0] for row in self._db.execute("SELECT id FROM feedback")}

    def counts(self) -> dict[str, int]:
        """Feedback rows by source."""
        with self._lock:
            return dict(self._db.execute("SELECT source, COUNT(*) FROM feedback GROUP BY source").fetchall())
