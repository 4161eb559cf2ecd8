"""A run's progress lines: what the ServerApp publishes per round, and how followers join them into rows.

The ServerApp (coordinator.federation) appends one JSON object per event to ``logs/rounds.jsonl`` in the
run folder and prints it after :data:`PROGRESS_PREFIX` (``flwr run --stream`` carries it to whoever
submitted the plan): ``round`` at the end of each round's training (its row: replies, per-site training
figures, seconds), ``evaluated`` when that round's evaluation is in (the complete row, evaluation metrics
merged), ``finished`` or ``failed``. A plain round's evaluation travels with the next round's training, so its ``evaluated`` line
comes one round later; a SecAgg+ round's row carries its evaluation already. Light on purpose: the
researcher's side (coordinator.submit) reads these without importing the round driver.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

ROUNDS_FILE = "rounds.jsonl"
#: Prefix of the progress lines the ServerApp prints; ``flwr run --stream`` carries them to whoever submitted the plan.
PROGRESS_PREFIX = "fedsilo-progress "
#: A round row's ``evaluation``: asked in the next round's train messages (plain rounds) or right after training (SecAgg+).
EVALUATED_WITH_NEXT_ROUND = "with the next round's training"
EVALUATED_IN_ROUND = "in round"


class CompletedRounds:
    """Joins a run's progress lines into complete round rows, each round once, for tables that print each round once.

    A plain round's ``round`` line comes at the end of its training and its ``evaluated`` line (the complete row)
    in the next round, since the evaluation travels with the next round's training; a SecAgg+ round's ``round``
    line is complete at once. An ``evaluated`` line whose ``round`` line came before the follower started (a
    resumed run) completes its round alone; a round already returned is not returned again.
    """

    def __init__(self) -> None:
        self.waiting: dict[int, dict[str, Any]] = {}
        self.returned: set[int] = set()

    def add(self, event: dict[str, Any]) -> list[dict[str, Any]]:
        """The rows ``event`` completes (none, or one). A waiting ``round`` row is completed in place."""
        number = event.get("round")
        if not isinstance(number, int) or number in self.returned:
            return []
        if event.get("event") == "round":
            if event.get("evaluation") == EVALUATED_WITH_NEXT_ROUND:
                self.waiting[number] = event
                return []
            row = event
        elif event.get("event") == "evaluated":
            row = self.waiting.pop(number, None)
            if row is None:
                row = {k: v for k, v in event.items() if k != "event"}
            else:
                for site, figures in (event.get("sites") or {}).items():
                    row.setdefault("sites", {}).setdefault(site, {}).update(figures)
                row.update({k: v for k, v in event.items() if k not in ("event", "sites")})
        else:
            return []
        self.returned.add(number)
        return [row]


def read_rows(path: Path) -> list[dict[str, Any]]:
    """The progress rows a run wrote (rounds.jsonl), up to a line still being written (or torn by a crash)."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return []
    rows = []
    for line in lines:
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return rows


class RoundTable:
    """One row per round: silos replied, mean train loss, the plan's metric and epsilon per site, seconds; for
    whoever follows a run (``fedsilo plan submit``, the demo).

    ``sites``: the columns, with the header printed at once; by default the first row's sites, a site that joins
    later showing in the replied count only. Rows come whole (:meth:`row`) or as progress events joined into rows
    (:meth:`add`): a round is printed once its evaluation is in (in the next round for plain rounds).
    """

    def __init__(self, metric: str, stream: TextIO, sites: Sequence[str] | None = None) -> None:
        self.completed = CompletedRounds()
        self.metric = metric
        self.stream = stream
        self.sites: list[str] | None = None
        self.widths: list[int] = []
        if sites is not None:
            self._header(list(sites))

    def _header(self, sites: list[str]) -> None:
        self.sites = sites
        short = [s.replace("hospital", "h") for s in sites]
        cols = ["round", "silos", "train loss"] + [f"{self.metric} {s}" for s in short] + [f"eps {s}" for s in short] + ["seconds"]
        self.widths = [max(7, len(c)) for c in cols]
        self._print(cols)

    def _print(self, cells: list[str]) -> None:
        print("  ".join(c.rjust(w) for c, w in zip(cells, self.widths)), file=self.stream, flush=True)

    def add(self, event: dict[str, Any]) -> None:
        """A ``round`` or ``evaluated`` progress event; prints the rows it completes."""
        for row in self.completed.add(event):
            self.row(row)

    def row(self, row: dict[str, Any]) -> None:
        sites = row.get("sites") or {}
        if self.sites is None:
            self._header(sorted(sites))
        losses = [(m.get("train_loss"), m.get("num_examples") or 0) for m in sites.values() if m.get("train_loss") is not None]
        total = sum(n for _, n in losses)
        loss = sum(v * n for v, n in losses) / total if total else float("nan")

        def fmt(value: Any, spec: str) -> str:
            return "-" if value is None else format(value, spec)

        cells = [str(row.get("round")), f"{row.get('replied')}/{row.get('silos')}", f"{loss:.3f}"]
        cells += [fmt(sites.get(s, {}).get(self.metric), ".3f") for s in self.sites or []]
        cells += [fmt(sites.get(s, {}).get("epsilon"), ".2f") for s in self.sites or []]
        cells.append(fmt(row.get("seconds"), ".1f"))
        self._print(cells)
