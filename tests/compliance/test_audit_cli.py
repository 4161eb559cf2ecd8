"""``fedsilo audit``: exit codes 0 / 1 / 2 and one-line messages, through the real top-level CLI."""

from __future__ import annotations

import hashlib
import json
import sqlite3
from collections.abc import Callable
from pathlib import Path

import pytest

from audit_helpers import append_rounds
from compliance import AuditLog, Signer, Witness, canonical_json
from compliance.audit_log import DB_NAME
from fedsilo.cli import main


def _rows(path: Path) -> list[tuple[int, bytes, str]]:
    with sqlite3.connect(path / DB_NAME) as conn:
        return [(s, bytes(leaf), h) for s, leaf, h in conn.execute("SELECT seq, leaf, hash FROM records ORDER BY seq")]


def test_verify_ok(make_log: Callable[..., Path], capsys: pytest.CaptureFixture[str]) -> None:
    path = make_log(3)
    assert main(["audit", "verify", str(path)]) == 0
    captured = capsys.readouterr()
    with AuditLog.open(path, read_only=True) as log:
        root = log.root().hex()
    assert captured.out == f"OK: 3 records intact, head {_rows(path)[-1][2][:12]}, root {root[:12]}\n"
    assert captured.err == ("fedsilo: warning: 3 of 3 records (seq 0..2) come after the last checkpoint: no "
                            "signature covers them yet\n")


@pytest.fixture
def signed(tmp_path: Path, log_signer: Signer, witness_signers: tuple[Signer, Signer]) -> tuple[Path, Path]:
    """A log of 10 records with a checkpoint at 8 that hospital0 cosigned; returns (log, witness folder)."""
    witness = Witness(tmp_path / "h0" / "audit", witness_signers[0], log_keys=[log_signer.verifier])
    with AuditLog.open(tmp_path / "audit", signer=log_signer) as log:
        append_rounds(log, 0, 8)
        log.store_cosigned(witness.cosign(log.sign_checkpoint(), []))
        append_rounds(log, 8, 2)
    return tmp_path / "audit", witness.folder


def test_verify_with_keys_and_a_witness(signed: tuple[Path, Path], trusted_dir: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    path, witness = signed
    assert main(["audit", "verify", str(path), "--keys", str(trusted_dir), "--witness", str(witness)]) == 0
    out, err = capsys.readouterr()
    assert out.splitlines()[1:] == [
        "checkpoints: 1 match the records (signatures verified); anchored up to size 8",
        f"witness {witness}: 1 checkpoints consistent, latest size 8 (cosignatures verified)"]
    assert err == ("fedsilo: warning: 2 of 10 records (seq 8..9) come after the last checkpoint: no signature "
                   "covers them yet\n")


def test_verify_without_keys_warns_that_signatures_were_not_checked(signed: tuple[Path, Path],
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["audit", "verify", str(signed[0])]) == 0
    out, err = capsys.readouterr()
    assert "checkpoints: 1 match the records (signatures NOT checked); anchored up to size 8" in out
    assert "fedsilo: warning: the signatures of 1 checkpoints were not checked (pass trusted keys: --keys DIR)" in err


def test_verify_a_rewritten_log_exits_1_with_checkpoint_and_roots(signed: tuple[Path, Path], trusted_dir: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    path = signed[0]
    with AuditLog.open(path, read_only=True) as log:
        signed_root = log.root(8).hex()
    with sqlite3.connect(path / DB_NAME) as conn:  # edit record 3 and repair every hash and link after it
        prev = conn.execute("SELECT hash FROM records WHERE seq = 2").fetchone()[0]
        for seq, leaf in conn.execute("SELECT seq, leaf FROM records WHERE seq >= 3 ORDER BY seq").fetchall():
            record = json.loads(bytes(leaf))
            record["prev"] = prev
            if seq == 3:
                record["details"] = {"nodes": 4}
            leaf = canonical_json(record)
            prev = hashlib.sha256(leaf).hexdigest()
            conn.execute("UPDATE records SET leaf = ?, hash = ? WHERE seq = ?", (leaf, prev, seq))
    with AuditLog.open(path, read_only=True) as log:
        computed = log.root(8).hex()
    assert main(["audit", "verify", str(path), "--keys", str(trusted_dir)]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith(f"fedsilo: error: audit log broken at checkpoint of size 8 (records 0..7): root mismatch: "
                          f"the records are not the ones signed (expected {signed_root[:12]}..., computed "
                          f"{computed[:12]}...)")
    assert err.count("\n") == 1


def test_verify_prints_and_checks_proofs(signed: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    path = signed[0]
    assert main(["audit", "verify", str(path), "--inclusion", "5", "--consistency", "8", "10"]) == 0
    out = capsys.readouterr().out
    with AuditLog.open(path, read_only=True) as log:
        hashes, root = log.leaf_hashes(), log.root()
        inclusion, consistency = log.inclusion_proof(5), log.consistency_proof(8)
    assert f"inclusion of seq 5 in tree size 10, root {root.hex()}\nleaf hash {hashes[5].hex()}\n" in out
    assert "".join(f"  {i}: {h.hex()}\n" for i, h in enumerate(inclusion)) in out
    assert f"inclusion proof OK ({len(inclusion)} hashes)" in out
    assert "".join(f"  {i}: {h.hex()}\n" for i, h in enumerate(consistency)) in out
    assert f"consistency proof OK ({len(consistency)} hashes)" in out


@pytest.mark.parametrize(("args", "message"), [
    (["--inclusion", "10"], "--inclusion 10: the log has 10 records (seq 0..9)"),
    (["--consistency", "9", "8"], "--consistency 9 8: need 0 <= OLD <= NEW <= 10"),
])
def test_verify_bad_proof_arguments_exit_2(signed: tuple[Path, Path], capsys: pytest.CaptureFixture[str],
                                           args: list[str], message: str) -> None:
    assert main(["audit", "verify", str(signed[0]), *args]) == 2
    assert message in capsys.readouterr().err


def test_verify_with_an_empty_keys_folder_exits_2(signed: tuple[Path, Path], tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "nokeys").mkdir()
    assert main(["audit", "verify", str(signed[0]), "--keys", str(tmp_path / "nokeys")]) == 2
    assert "no verifier keys in" in capsys.readouterr().err


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


def test_verify_record_as_appends_the_verdict(make_log: Callable[..., Path], capsys: pytest.CaptureFixture[str]) -> None:
    path = make_log(3)
    assert main(["audit", "verify", str(path), "--record-as", "j.smith"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "recorded: verification.run by j.smith (success) at seq 3"
    with AuditLog.open(path, read_only=True) as log:
        record = list(log.records())[-1]
        root = log.root(3).hex()
    assert record["event"] == "verification.run" and record["outcome"] == "success"
    assert record["actor"] == {"kind": "person", "id": "j.smith", "site": None, "role": "compliance-officer", "key": None}
    assert record["details"]["records"] == 3 and record["details"]["root"] == root
    assert main(["audit", "verify", str(path)]) == 0  # the record extends the log like any other


def test_verify_record_as_records_a_failure_and_still_exits_1(make_log: Callable[..., Path],
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    path = make_log(4)
    with sqlite3.connect(path / DB_NAME) as conn:
        leaf = bytes(conn.execute("SELECT leaf FROM records WHERE seq = 1").fetchone()[0])
        conn.execute("UPDATE records SET leaf = ? WHERE seq = 1", (leaf.replace(b'"round":1', b'"round":9'),))
    assert main(["audit", "verify", str(path), "--record-as", "j.smith"]) == 1
    with AuditLog.open(path, read_only=True) as log:
        record = list(log.records())[-1]
    assert record["event"] == "verification.run" and record["outcome"] == "failure"
    assert record["details"]["first_bad_seq"] == 1 and "seq 1" in record["reason"]


def test_verify_record_as_needs_a_name(make_log: Callable[..., Path], capsys: pytest.CaptureFixture[str]) -> None:
    path = make_log(2)
    assert main(["audit", "verify", str(path), "--record-as", " "]) == 2
    assert "--record-as needs a name" in capsys.readouterr().err
    assert len(_rows(path)) == 2


def test_show_lists_a_leaf_stored_as_text(make_log: Callable[..., Path], capsys: pytest.CaptureFixture[str]) -> None:
    path = make_log(2)
    with sqlite3.connect(path / DB_NAME) as conn:
        leaf = bytes(conn.execute("SELECT leaf FROM records WHERE seq = 1").fetchone()[0])
        conn.execute("UPDATE records SET leaf = ? WHERE seq = 1", (leaf.decode(),))
    assert main(["audit", "show", str(path)]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 3
    assert main(["audit", "verify", str(path)]) == 1
