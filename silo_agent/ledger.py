"""The silo's privacy ledger: every DP spend per dataset, written durably before an update leaves.

One SQLite database per site (``privacy/ledger.sqlite``, WAL, synchronous=FULL). Each row is
one round's spend on one dataset: the accountant's step records for that round, the noise
multiplier, sample rate, steps, delta and the composed epsilon after it. The accountant
history of a dataset is the concatenation of its rows, so epsilon composes across rounds and
plans through the accountant, not by adding epsilons.
"""

from __future__ import annotations

import json
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS spends (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    dataset TEXT NOT NULL,
    run_id TEXT NOT NULL,
    round INTEGER NOT NULL,
    plan_hash TEXT NOT NULL,
    accountant TEXT NOT NULL,
    noise_multiplier REAL NOT NULL,
    sample_rate REAL NOT NULL,
    steps INTEGER NOT NULL,
    delta REAL NOT NULL,
    epsilon_after REAL NOT NULL,
    history_json TEXT NOT NULL,
    time REAL NOT NULL,
    UNIQUE (dataset, run_id, round)
)
"""


@dataclass(frozen=True)
class Spend:
    dataset: str
    run_id: str
    round: int
    plan_hash: str
    accountant: str
    noise_multiplier: float
    sample_rate: float
    steps: int
    delta: float
    epsilon_after: float
    history: tuple[tuple[float, float, int], ...]  # this round's accountant step records


class PrivacyLedger:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._db = sqlite3.connect(path, isolation_level=None, timeout=30)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute(SCHEMA)

    @classmethod
    def for_site(cls, privacy_dir: Path) -> "PrivacyLedger":
        return cls(privacy_dir / "ledger.sqlite")

    def history(self, dataset: str) -> list[tuple[float, float, int]]:
        """The dataset's whole accountant history, oldest first."""
        rows = self._db.execute("SELECT history_json FROM spends WHERE dataset = ? ORDER BY id", (dataset,)).fetchall()
        return [tuple(h) for (text,) in rows for h in json.loads(text)]

    def spends(self, dataset: str | None = None) -> list[Spend]:
        query = "SELECT dataset, run_id, round, plan_hash, accountant, noise_multiplier, sample_rate, steps, delta, epsilon_after, history_json FROM spends"
        args: tuple = ()
        if dataset is not None:
            query += " WHERE dataset = ?"
            args = (dataset,)
        rows = self._db.execute(query + " ORDER BY id", args).fetchall()
        return [Spend(*row[:10], history=tuple(tuple(h) for h in json.loads(row[10]))) for row in rows]

    def has_spent(self, dataset: str, run_id: str, round_: int) -> bool:
        row = self._db.execute("SELECT 1 FROM spends WHERE dataset = ? AND run_id = ? AND round = ?", (dataset, run_id, round_)).fetchone()
        return row is not None

    def record(self, spend: Spend) -> None:
        """Append one spend durably (committed with synchronous=FULL before returning)."""
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.execute(
                "INSERT INTO spends (dataset, run_id, round, plan_hash, accountant, noise_multiplier, sample_rate, steps, delta, epsilon_after, history_json, time)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (spend.dataset, spend.run_id, spend.round, spend.plan_hash, spend.accountant, spend.noise_multiplier,
                 spend.sample_rate, spend.steps, spend.delta, spend.epsilon_after, json.dumps([list(h) for h in spend.history]), time.time()),
            )

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> "PrivacyLedger":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
