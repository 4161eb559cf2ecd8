"""``fedsilo audit``: exit codes 0 / 1 / 2 and one-line messages, through the real top-level CLI."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path

import pytest

from compliance.audit_log import DB_NAME
from fedsilo.cli import main


def _rows(path: Path) -> list[tuple[int, bytes, str]]:
    with sqlite3.connect(path / DB_NAME) as conn:
        return [(s, bytes(leaf), h) for s, leaf, h in conn.execute("SELECT seq, leaf, hash FROM records ORDER BY seq")]


def test_verify_ok(make_log: Callable[..., Path], capsys: pytest.CaptureFixture[str]) -> None:
    path = make_log(3)
    assert main(["audit", "verify", str(path)]) == 0
    assert capsys.readouterr().out == f"OK: 3 records intact, head {_rows(path)[-1][2][:12]}\n"


def test_verify_tampered_exits_1_with_one_line(make_log: Callable[..., Path], capsys: pytest.CaptureFixture[str]) -> None:
    path = make_log(3)
    with sqlite3.connect(path / DB_NAME) as conn:
        conn.execute("DELETE FROM records WHERE seq = 1")
    assert main(["audit", "verify", str(path)]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("fedsilo: error: audit log broken at seq 1: seq gap, a record was removed "
                                   "(expected 1, found 2)")
    assert captured.err.count("\n") == 1


def test_verify_missing_log_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["audit", "verify", str(tmp_path / "nope")]) == 2
    assert capsys.readouterr().err == (f"fedsilo: error: no audit log at {tmp_path / 'nope'} "
                                       "(fix: pass the run's audit/ folder, e.g. runs/demo/audit)\n")


def test_show_table(make_log: Callable[..., Path], capsys: pytest.CaptureFixture[str]) -> None:
    path = make_log(3)
    assert main(["audit", "show", str(path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["seq", "time", "event", "actor", "round", "outcome"]
    assert [line.split()[0::2] for line in lines[1:]] == [
        ["0", "run.started", "-"], ["1", "round.started", "1"], ["2", "round.started", "2"]]
    assert all(line.split()[3] == "coordinator:coordinator" and line.split()[5] == "success" for line in lines[1:])


def test_show_tail_json_prints_the_leaves(make_log: Callable[..., Path], capsys: pytest.CaptureFixture[str]) -> None:
    path = make_log(4)
    assert main(["audit", "show", str(path), "--tail", "2", "--json"]) == 0
    assert capsys.readouterr().out.encode() == b"".join(leaf + b"\n" for _, leaf, _ in _rows(path)[2:])


def test_show_bad_tail_is_a_usage_error(make_log: Callable[..., Path], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["audit", "show", str(make_log(1)), "--tail", "0"])
    assert info.value.code == 2
    assert "argument --tail: expected a whole number >= 1, not '0'" in capsys.readouterr().err


def test_export(make_log: Callable[..., Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path, out = make_log(3), tmp_path / "audit.jsonl"
    assert main(["audit", "export", str(path), "--out", str(out)]) == 0
    assert capsys.readouterr().out == f"exported 3 records to {out}\n"
    assert out.read_bytes() == b"".join(leaf + b"\n" for _, leaf, _ in _rows(path))
