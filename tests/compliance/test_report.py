"""``fedsilo audit report``: the HTML review report (checked as headless Chromium renders it) and the CSV export."""

from __future__ import annotations

import csv
import re
import sqlite3
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest

from audit_helpers import COORDINATOR
from compliance import AuditLog, EventType, Signer
from compliance.audit_log import DB_NAME
from compliance.report import CSV_COLUMNS, build_report, write_csv
from fedsilo.cli import main

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync")
needs_chromium = pytest.mark.skipif(not CHROMIUM.is_file(), reason="/usr/bin/chromium is not installed: the rendered "
                                                                   "report cannot be checked")
EVIL = "<script>alert(1)</script>"
TODAY = __import__("datetime").datetime.now(__import__("datetime").timezone.utc).strftime("%Y-%m-%d")
PLAN_SHA = "cd" * 32


def _append_update(log: AuditLog, round_: int, site: str, node: str, epsilon: float) -> None:
    log.append(EventType.UPDATE_RECEIVED, actor=COORDINATOR, run_id="run-1", round=round_,
               object={"type": "update", "id": f"{site}/{round_}", "sha256": "ef" * 32},
               details={"site": site, "node": node, "bytes": 1000, "num_examples": 8, "epsilon": epsilon})


def _write_run(folder: Path, signer: Signer) -> int:
    """A two-round run of two sites (hospital1 rejected in round 2), checkpoints after each round; the record count."""
    with AuditLog.open(folder, signer=signer) as log:
        log.append(EventType.RUN_STARTED, actor=COORDINATOR, run_id="run-1",
                   object={"type": "plan", "id": "liver-seg", "sha256": PLAN_SHA},
                   details={"rounds": 2, "rule": "fedavg", "min_silos": 1})
        for round_ in (1, 2):
            log.append(EventType.ROUND_STARTED, actor=COORDINATOR, run_id="run-1", round=round_, details={"nodes": 2})
            _append_update(log, round_, "hospital0", "11", 0.5 * round_)
            if round_ == 1:
                _append_update(log, round_, "hospital1", "22", 0.75)
            else:
                log.append(EventType.UPDATE_REJECTED, actor=COORDINATOR, run_id="run-1", round=round_,
                           object={"type": "node", "id": "22", "sha256": None}, outcome="denied",
                           reason=f"update-norm-too-large {EVIL}", details={"message": "l2 norm 1e9"})
            log.append(EventType.AGGREGATE_COMPUTED, actor=COORDINATOR, run_id="run-1", round=round_,
                       object={"type": "model", "id": f"round-{round_}", "sha256": "aa" * 32}, details={"rule": "fedavg"})
            log.append(EventType.CHECKPOINT_SIGNED, actor=COORDINATOR, run_id="run-1", round=round_,
                       object={"type": "checkpoint", "id": f"{log.origin}/{len(log) + 1}", "sha256": None},
                       details={"size": len(log) + 1, "key": signer.name})
            log.sign_checkpoint()
            log.append(EventType.ROUND_FINISHED, actor=COORDINATOR, run_id="run-1", round=round_,
                       details={"valid_updates": 2 if round_ == 1 else 1})
        log.append(EventType.RUN_FINISHED, actor=COORDINATOR, run_id="run-1", details={"rounds": 2})
        return len(log)


def _write_site(folder: Path, site: str, epsilons: list[float]) -> None:
    actor = {"kind": "silo", "id": site, "site": site, "role": "silo-agent", "key": "ed25519:" + "0a" * 32}
    with AuditLog.open(folder / site / "audit", source="silo-agent") as log:
        log.append(EventType.DATASET_REGISTERED, actor={"kind": "person", "id": "it-admin", "site": site, "role": "hospital-it"},
                   object={"type": "dataset", "id": "ct-2024", "sha256": "0b" * 32}, details={"task": "seg3d"})
        log.append(EventType.PLAN_APPROVED, actor={"kind": "person", "id": "j.smith", "site": site, "role": "site-officer"},
                   object={"type": "plan", "id": "liver-seg", "sha256": PLAN_SHA}, details={"toolkit": "fedsilo/0.1.0"})
        for round_, eps in enumerate(epsilons, start=1):
            log.append(EventType.DP_SPENT, actor=actor, object={"type": "dataset", "id": "ct-2024", "sha256": None},
                       run_id="run-1", round=round_,
                       details={"accountant": "rdp", "noise_multiplier": 1.1, "max_grad_norm": 1.0, "sample_rate": 0.05,
                                "steps": 20 * round_, "delta": 1e-5, "epsilon_cumulative": eps})


@pytest.fixture
def run(tmp_path: Path, log_signer: Signer) -> tuple[Path, Path, int]:
    """(coordinator audit folder, sites root, number of records)."""
    count = _write_run(tmp_path / "run" / "audit", log_signer)
    _write_site(tmp_path / "run" / "sites", "hospital0", [0.5, 1.0])
    _write_site(tmp_path / "run" / "sites", "hospital1", [0.75])
    return tmp_path / "run" / "audit", tmp_path / "run" / "sites", count


def _tamper(path: Path) -> None:
    """Flip one byte of record 3's leaf (hospital1's update: '1' -> '0' in its site name)."""
    with sqlite3.connect(path / DB_NAME) as conn:
        leaf = bytearray(conn.execute("SELECT leaf FROM records WHERE seq = 3").fetchone()[0])
        i = leaf.index(b'"site":"hospital1"') + len(b'"site":"hospital')
        leaf[i] ^= 0x01
        conn.execute("UPDATE records SET leaf = ? WHERE seq = 3", (bytes(leaf),))


# --- the HTML as written ------------------------------------------------------------------------------------


def test_report_of_an_intact_log(run: tuple[Path, Path, int], trusted_dir: Path) -> None:
    path, sites, count = run
    report = build_report(path, keys=trusted_dir, sites_root=sites)
    assert report.verified and report.verdict == "INTACT" and report.message == ""
    assert report.records == count
    assert report.warnings == (f"2 of {count} records (seq {count - 2}..{count - 1}) come after the last checkpoint: "
                               "no signature covers them yet",)
    page = report.html
    assert 'data-verdict="INTACT"' in page and "NOT VERIFIED" not in page
    assert "hospital0: approved by j.smith on " in page and "hospital1: approved by j.smith on " in page
    assert "budget: not recorded" in page
    assert EVIL not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page  # every value escaped
    assert [s.site for s in report.sites] == ["hospital0", "hospital1"] and all(s.verified for s in report.sites)


def test_report_fetches_nothing_from_the_network(run: tuple[Path, Path, int], trusted_dir: Path) -> None:
    page = build_report(run[0], keys=trusted_dir, sites_root=run[1]).html
    assert "http://" not in page and "https://" not in page and "//" not in re.sub(r"<style>.*?</style>", "", page,
                                                                                    flags=re.S).replace("<!DOCTYPE", "")
    assert not re.search(r"\b(src|href|xlink:href|action)\s*=", page, re.I)
    assert not re.search(r"<(script|link|img|iframe|object|embed)\b", page, re.I)
    assert "@import" not in page and "url(" not in page


def test_a_missing_log_is_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["audit", "report", str(tmp_path / "nope"), "--out", str(tmp_path / "r.html")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fedsilo: error: no audit log at ") and err.count("\n") == 1
    assert not (tmp_path / "r.html").exists()


def test_cli_writes_the_report_and_the_csv(run: tuple[Path, Path, int], trusted_dir: Path, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    path, sites, count = run
    out, table = tmp_path / "report.html", tmp_path / "audit.csv"
    assert main(["audit", "report", str(path), "--out", str(out), "--keys", str(trusted_dir), "--sites-root", str(sites),
                 "--csv", str(table)]) == 0
    assert capsys.readouterr().out == (f"INTACT: report of {count} records written to {out}\n"
                                       f"exported {count} records to {table}\n")
    assert 'data-verdict="INTACT"' in out.read_text(encoding="utf-8")
    with table.open(newline="", encoding="utf-8") as fh:
        rows = list(csv.reader(fh))
    assert tuple(rows[0]) == CSV_COLUMNS and len(rows) == count + 1
    assert [int(r[0]) for r in rows[1:]] == list(range(count))
    rejected = next(dict(zip(CSV_COLUMNS, r)) for r in rows[1:] if r[2] == "update.rejected")
    assert rejected["outcome"] == "denied" and rejected["reason"] == f"update-norm-too-large {EVIL}"
    assert rejected["object_type"] == "node" and rejected["object_id"] == "22" and rejected["round"] == "2"
    assert rows[1][3:6] == ["coordinator", "coordinator", ""] and rows[1][12] == PLAN_SHA


def test_write_csv_counts_one_row_per_record(run: tuple[Path, Path, int], tmp_path: Path) -> None:
    assert write_csv(run[0], tmp_path / "a.csv") == run[2]


def test_a_tampered_log_is_reported_untrusted_and_exits_1(run: tuple[Path, Path, int], trusted_dir: Path,
                                                          tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = run[0]
    _tamper(path)
    report = build_report(path, keys=trusted_dir)
    assert not report.verified and report.verdict == "TAMPERED / NOT VERIFIED"
    assert report.message.startswith("audit log broken at seq 3:")
    assert 'data-verdict="TAMPERED"' in report.html and "UNTRUSTED" in report.html and "INTACT" not in report.html
    assert report.records == run[2]  # still read, marked untrusted
    out = tmp_path / "tampered.html"
    assert main(["audit", "report", str(path), "--out", str(out)]) == 1
    assert "TAMPERED / NOT VERIFIED" in out.read_text(encoding="utf-8")
    err = capsys.readouterr().err
    assert "fedsilo: error: audit log broken at seq 3:" in err


# --- the HTML as Chromium renders it ------------------------------------------------------------------------


class _Dom(HTMLParser):
    """The rendered DOM's tables by id (rows of cell texts), the verdict's text and the SVG plots' ids."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: dict[str, list[list[str]]] = {}
        self.ids: set[str] = set()
        self.verdict = ""
        self._table: str | None = None
        self._cell: list[str] | None = None
        self._verdict_depth = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if a.get("id"):
            self.ids.add(str(a["id"]))
        if tag == "table" and a.get("id"):
            self._table = str(a["id"])
            self.tables[self._table] = []
        elif tag == "tr" and self._table:
            self.tables[self._table].append([])
        elif tag in ("td", "th") and self._table:
            self._cell = []
        if tag == "section" and a.get("id") == "verdict" or self._verdict_depth and tag == "section":
            self._verdict_depth += 1

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._table and self._cell is not None:
            self.tables[self._table][-1].append(" ".join("".join(self._cell).split()))
            self._cell = None
        elif tag == "table":
            self._table = None
        elif tag == "section" and self._verdict_depth:
            self._verdict_depth -= 1

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)
        if self._verdict_depth:
            self.verdict += " " + data


def _chromium(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(CHROMIUM), *CHROMIUM_ARGS, f"--user-data-dir={tmp_path / 'chromium-profile'}", *args],
                          capture_output=True, text=True, timeout=60, check=True)


@needs_chromium
def test_rendered_report_shows_the_verdict_and_the_tables(run: tuple[Path, Path, int], trusted_dir: Path,
                                                          tmp_path: Path) -> None:
    path, sites, _ = run
    out = tmp_path / "report.html"
    assert main(["audit", "report", str(path), "--out", str(out), "--keys", str(trusted_dir),
                 "--sites-root", str(sites)]) == 0
    dom = _Dom()
    dom.feed(_chromium(tmp_path, "--dump-dom", out.as_uri()).stdout)
    assert dom.verdict.split()[0] == "INTACT" and "come after the last checkpoint" in dom.verdict
    assert {"epsilon-plot", "participation-plot"} <= dom.ids
    assert dom.tables["sites-per-round"] == [["Round", "hospital0", "hospital1", "Accepted updates"],
                                             ["1", "accepted", "accepted", "2"],
                                             ["2", "accepted", "rejected", "1"]]
    assert dom.tables["rejected-updates"] == [["Round", "Node", "Site", "Outcome", "Reason"],
                                              ["2", "22", "hospital1", "denied", f"update-norm-too-large {EVIL}"]]
    assert dom.tables["epsilon"] == [["Round", "hospital0", "hospital1"], ["1", "0.5", "0.75"], ["2", "1", "-"]]
    assert dom.tables["site-epsilon"][1:] == [["hospital0", "ct-2024", "1", "1e-05", "2", "budget: not recorded"],
                                              ["hospital1", "ct-2024", "0.75", "1e-05", "1", "budget: not recorded"]]
    assert dom.tables["runs"][1][:6] == ["run-1", "liver-seg", PLAN_SHA, "2", "fedavg", "1"]
    assert dom.tables["runs"][1][8] == "hospital0: approved by j.smith on " + TODAY + "; hospital1: approved by j.smith on " + TODAY
    assert dom.tables["checkpoint-counts"][1:] == [["checkpoint.signed", "2", "0"], ["checkpoint.cosigned", "0", "0"]]
    assert [row[:2] + row[3:] for row in dom.tables["governance-events"][1:]] == [
        row for site in ("hospital0", "hospital1") for row in (
            [site, "0", "dataset.registered", "it-admin (hospital-it)", "dataset ct-2024", "success"],
            [site, "1", "plan.approved", "j.smith (site-officer)", "plan liver-seg", "success"])]
    actors = {(row[0], row[2], row[4], row[5]) for row in dom.tables["actors"][1:]}
    assert actors == {("coordinator", "coordinator", "coordinator", "-"), ("hospital0", "it-admin", "hospital-it", "-"),
                      ("hospital1", "it-admin", "hospital-it", "-"), ("hospital0", "hospital0", "silo-agent", "ed25519:" + "0a" * 32),
                      ("hospital0", "j.smith", "site-officer", "-"), ("hospital1", "j.smith", "site-officer", "-"),
                      ("hospital1", "hospital1", "silo-agent", "ed25519:" + "0a" * 32)}


@needs_chromium
def test_rendered_report_screenshot(run: tuple[Path, Path, int], trusted_dir: Path, tmp_path: Path) -> None:
    out, shot = tmp_path / "report.html", tmp_path / "shot.png"
    out.write_text(build_report(run[0], keys=trusted_dir, sites_root=run[1]).html, encoding="utf-8")
    _chromium(tmp_path, f"--screenshot={shot}", "--window-size=1200,2000", "--hide-scrollbars", out.as_uri())
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_the_budget_column_uses_each_sites_recorded_lifetime_budget(run: tuple[Path, Path, int], trusted_dir: Path) -> None:
    path, sites, _ = run
    with AuditLog.open(sites / "hospital0" / "audit") as log:
        log.append(EventType.POLICY_CHANGED, actor={"kind": "person", "id": "it-admin", "site": "hospital0", "role": "hospital-it"},
                   object={"type": "policy", "id": "policy.yaml", "sha256": "0c" * 32}, details={"lifetime_epsilon_per_dataset": 4.0})
    page = build_report(path, keys=trusted_dir, sites_root=sites).html
    assert "1 of the site&#x27;s lifetime 4 (25%)" in page  # hospital0 spent 1.0 of 4
    assert "budget: not recorded" in page  # hospital1 recorded no policy
