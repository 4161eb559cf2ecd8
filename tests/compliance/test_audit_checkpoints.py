"""AuditLog and the Merkle tree: signed checkpoints, checkpoint_every, proofs, cosignatures, the layout upgrade."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from compliance import AuditLog, EventType, Signer, merkle, verify_log
from compliance.audit_log import DB_NAME
from compliance.checkpoint import cosign_checkpoint, parse_checkpoint, parse_note, verify_checkpoint
from fedsilo.errors import ConfigError, VerificationError

from audit_helpers import COORDINATOR, append_rounds


def _leaf_hashes(path: Path) -> list[bytes]:
    with sqlite3.connect(path / DB_NAME) as conn:
        return [merkle.leaf_hash(bytes(leaf)) for (leaf,) in conn.execute("SELECT leaf FROM records ORDER BY seq")]


def test_sign_checkpoint_signs_the_root_of_all_records(tmp_path: Path, log_signer: Signer) -> None:
    path = tmp_path / "audit"
    with AuditLog.open(path, origin="fedsilo.test/run-1") as log:
        append_rounds(log, 0, 5)
        note = log.sign_checkpoint(log_signer)
        stored = log.checkpoints()
    cp = verify_checkpoint(note, [log_signer.verifier], origin="fedsilo.test/run-1").checkpoint
    assert (cp.size, cp.root) == (5, merkle.root(_leaf_hashes(path)))
    assert [(s.size, s.root, s.note) for s in stored] == [(5, cp.root, note)]


def test_signing_the_same_size_again_returns_the_stored_note(tmp_path: Path, log_signer: Signer) -> None:
    with AuditLog.open(tmp_path / "audit") as log:
        append_rounds(log, 0, 3)
        first = log.sign_checkpoint(log_signer)
        assert log.sign_checkpoint(log_signer) == first
        assert len(log.checkpoints()) == 1


def test_checkpoint_every_signs_at_each_multiple_inside_the_same_transaction(tmp_path: Path, log_signer: Signer) -> None:
    path = tmp_path / "audit"
    with AuditLog.open(path, signer=log_signer, checkpoint_every=4) as log:
        append_rounds(log, 0, 6)
        with log.batch():
            append_rounds(log, 6, 7)  # 13 records: checkpoints at 4, 8, 12
        sizes = [c.size for c in log.checkpoints()]
        root_12 = log.root(12)
    assert sizes == [4, 8, 12]
    hashes = _leaf_hashes(path)
    assert root_12 == merkle.root(hashes[:12])
    result = verify_log(path, keys=[log_signer.verifier])
    assert (result.checkpoints, result.anchored, result.unanchored) == (3, 12, 1)


def test_a_batch_that_raises_leaves_neither_records_nor_checkpoints(tmp_path: Path, log_signer: Signer) -> None:
    path = tmp_path / "audit"
    with AuditLog.open(path, signer=log_signer, checkpoint_every=2) as log:
        append_rounds(log, 0, 2)
        with pytest.raises(RuntimeError), log.batch():
            append_rounds(log, 2, 3)  # would checkpoint at 4
            raise RuntimeError("crash inside the batch")
        assert [c.size for c in log.checkpoints()] == [2]
        # The cached tree was rolled back too: new records at seq 2.. are hashed afresh.
        log.append(EventType.RUN_FINISHED, actor=COORDINATOR)
        log.append(EventType.RUN_FINISHED, actor=COORDINATOR)
        assert [c.size for c in log.checkpoints()] == [2, 4]
    assert verify_log(path, keys=[log_signer.verifier]).anchored == 4


def test_checkpoints_from_two_writers_stay_consistent(tmp_path: Path, log_signer: Signer) -> None:
    path = tmp_path / "audit"
    with AuditLog.open(path) as a, AuditLog.open(path) as b:
        append_rounds(a, 0, 3)
        a.sign_checkpoint(log_signer)
        append_rounds(b, 3, 4)
        b.sign_checkpoint(log_signer)
        a.append(EventType.RUN_FINISHED, actor=COORDINATOR)  # a's cached tree is stale: extended on signing
        a.sign_checkpoint(log_signer)
    result = verify_log(path, keys=[log_signer.verifier])
    assert (result.records, result.checkpoints, result.unanchored) == (8, 3, 0)


def test_signing_refuses_a_log_edited_behind_the_writers_back(tmp_path: Path, log_signer: Signer) -> None:
    path = tmp_path / "audit"
    with AuditLog.open(path) as log:
        append_rounds(log, 0, 4)
        log.sign_checkpoint(log_signer)
    with sqlite3.connect(path / DB_NAME) as conn:
        leaf = bytes(conn.execute("SELECT leaf FROM records WHERE seq = 1").fetchone()[0])
        conn.execute("UPDATE records SET leaf = ? WHERE seq = 1", (leaf.replace(b'"nodes":3', b'"nodes":4'),))
    with AuditLog.open(path) as log:  # a fresh writer builds its tree from the stored leaves
        append_rounds(log, 4, 1)
        with pytest.raises(VerificationError, match="no longer match its checkpoint of size 4; refusing to sign"):
            log.sign_checkpoint(log_signer)


def test_signing_needs_a_log_key_and_records(tmp_path: Path, log_signer: Signer,
                                             witness_signers: tuple[Signer, Signer]) -> None:
    with AuditLog.open(tmp_path / "audit") as log:
        with pytest.raises(ConfigError, match="needs a signer"):
            log.sign_checkpoint()
        with pytest.raises(ConfigError, match="no records to checkpoint"):
            log.sign_checkpoint(log_signer)
        with pytest.raises(ConfigError, match="is a witness key"):
            log.sign_checkpoint(witness_signers[0])
    with pytest.raises(ConfigError, match="checkpoint_every needs a signer"):
        AuditLog.open(tmp_path / "audit", checkpoint_every=10)
    with pytest.raises(ConfigError, match="whole number >= 1"):
        AuditLog.open(tmp_path / "audit", signer=log_signer, checkpoint_every=0)
    with pytest.raises(ConfigError, match="cannot sign"):
        AuditLog.open(tmp_path / "audit", read_only=True, signer=log_signer)


def test_the_origin_is_fixed_at_creation(tmp_path: Path) -> None:
    with AuditLog.open(tmp_path / "a", origin="fedsilo.test/run-1") as log:
        assert log.origin == "fedsilo.test/run-1"
    with AuditLog.open(tmp_path / "a") as log:
        assert log.origin == "fedsilo.test/run-1"
    with pytest.raises(ConfigError, match="has origin 'fedsilo.test/run-1', not 'fedsilo.test/run-2'"):
        AuditLog.open(tmp_path / "a", origin="fedsilo.test/run-2")
    with pytest.raises(ConfigError, match="origin"):
        AuditLog.open(tmp_path / "b", origin="has space")
    with AuditLog.open(tmp_path / "c") as c, AuditLog.open(tmp_path / "d") as d:
        assert c.origin != d.origin and c.origin.startswith("fedsilo-audit/")


def test_proofs_from_the_log(tmp_path: Path, log_signer: Signer) -> None:
    path = tmp_path / "audit"
    with AuditLog.open(path) as log:
        append_rounds(log, 0, 11)
        old = parse_checkpoint(parse_note(log.sign_checkpoint(log_signer)).text)
        append_rounds(log, 11, 6)
        new = parse_checkpoint(parse_note(log.sign_checkpoint(log_signer)).text)
        proof = log.consistency_proof(old.size)
        inclusion = log.inclusion_proof(7, 11)
        hashes = log.leaf_hashes()
        with pytest.raises(ConfigError, match="not between 0 and the log's 17 records"):
            log.consistency_proof(3, 18)
    merkle.verify_consistency(old.size, new.size, old.root, new.root, proof)
    merkle.verify_inclusion(7, 11, hashes[7], inclusion, old.root)


def test_store_cosigned_merges_witness_lines(tmp_path: Path, log_signer: Signer,
                                            witness_signers: tuple[Signer, Signer]) -> None:
    with AuditLog.open(tmp_path / "audit") as log:
        append_rounds(log, 0, 2)
        note = log.sign_checkpoint(log_signer)
        for w in witness_signers:
            log.store_cosigned(cosign_checkpoint(note, w))
        stored = log.latest_checkpoint()
        keys = [log_signer.verifier, *(w.verifier for w in witness_signers)]
        assert len(verify_checkpoint(stored.note, keys, min_cosignatures=2).cosignatures) == 2
        append_rounds(log, 2, 1)
        other = log.sign_checkpoint(log_signer)
        with pytest.raises(ConfigError, match="holds no checkpoint with this body"):
            log.store_cosigned(other.replace(b"\n3\n", b"\n2\n"))


def test_a_layout_1_log_is_read_and_upgraded(tmp_path: Path, log_signer: Signer) -> None:
    path = tmp_path / "audit"
    path.mkdir()
    with AuditLog.open(tmp_path / "src") as log:
        append_rounds(log, 0, 3)
    with sqlite3.connect(tmp_path / "src" / DB_NAME) as src, sqlite3.connect(path / DB_NAME) as dst:
        dst.execute("PRAGMA journal_mode=WAL")
        dst.execute("CREATE TABLE records(seq INTEGER PRIMARY KEY, leaf BLOB NOT NULL, hash TEXT NOT NULL)")
        dst.executemany("INSERT INTO records VALUES (?, ?, ?)", src.execute("SELECT seq, leaf, hash FROM records"))
        dst.execute("PRAGMA user_version=1")
    result = verify_log(path)  # read-only: layout 1 stays layout 1
    assert (result.records, result.checkpoints, result.unanchored) == (3, 0, 3)
    with AuditLog.open(path, read_only=True) as log:
        assert log.origin is None and log.checkpoints() == []
    with AuditLog.open(path) as log:  # a writer adds the checkpoint tables
        assert log.origin is not None
        log.sign_checkpoint(log_signer)
    with sqlite3.connect(path / DB_NAME) as conn:
        assert conn.execute("PRAGMA user_version").fetchone() == (2,)
    assert verify_log(path, keys=[log_signer.verifier]).anchored == 3


def test_batched_appends_with_checkpoints_keep_every_record(tmp_path: Path, log_signer: Signer) -> None:
    # Throughput is the bench's business (fedsilo bench audit, docs/benchmarks.md), never a test's: the machine
    # is shared. What a test can hold: batches of 1000 with a checkpoint every 1000 lose nothing and verify.
    with AuditLog.open(tmp_path / "audit", signer=log_signer, checkpoint_every=1000) as log:
        for first in range(0, 3000, 1000):
            with log.batch():
                for i in range(first, first + 1000):
                    log.append(EventType.UPDATE_RECEIVED, actor=COORDINATOR, run_id="run-1", round=1 + i // 100,
                               object={"type": "update", "id": f"site{i % 8}/{i // 100}", "sha256": "cd" * 32},
                               details={"site": f"site{i % 8}", "bytes": 4_000_000 + i, "l2_norm": 0.5 + i / 7})
        assert len(log) == 3000
    result = verify_log(tmp_path / "audit", keys=[log_signer.verifier])
    assert result.records == 3000 and result.signatures_checked and result.anchored == 3000
