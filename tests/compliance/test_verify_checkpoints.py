"""verify_log with signed checkpoints, trusted keys and witnesses: forgeries the hash chain alone cannot see.

Each test edits the SQLite files directly, as an attacker with write access to the coordinator's disk would,
usually repairing everything a forger can repair (stored hashes, prev links, seq fields) so that only the
signed checkpoints or the silos' copies can tell.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

import compliance.verify as verify_module
from audit_helpers import COORDINATOR, append_rounds
from compliance import (
    AuditLog,
    AuditVerificationError,
    CheckpointVerificationError,
    EventType,
    Signer,
    Witness,
    canonical_json,
    verify_log,
)
from compliance.audit_log import DB_NAME
from compliance.checkpoint import Checkpoint, parse_note, sign_checkpoint
from compliance.records import GENESIS_PREV
from compliance.witness import WITNESS_DB
from fedsilo.errors import ConfigError, VerificationError

ORIGIN = "fedsilo.test/run-1"
N = 20  # checkpoints at 8 and 16, cosigned by the witness; records 16..19 unanchored


@pytest.fixture
def world(tmp_path: Path, log_signer: Signer, witness_signers: tuple[Signer, Signer]) -> dict:
    """A coordinator log with checkpoints every 8 records, each cosigned by hospital0's witness."""
    path = tmp_path / "audit"
    witness = Witness(tmp_path / "sites" / "hospital0" / "audit", witness_signers[0], log_keys=[log_signer.verifier])
    held = 0
    with AuditLog.open(path, origin=ORIGIN, signer=log_signer) as log:
        for start in (0, 8):
            append_rounds(log, start, 8)
            note = log.sign_checkpoint()
            log.store_cosigned(witness.cosign(note, log.consistency_proof(held), old_size=held))
            held = start + 8
        append_rounds(log, 16, N - 16)
    return {"path": path, "witness": witness.folder, "tmp": tmp_path}


@pytest.fixture
def db(world: dict) -> Iterator[sqlite3.Connection]:
    conn = sqlite3.connect(world["path"] / DB_NAME)
    yield conn
    conn.commit()
    conn.close()


def _leaf(db: sqlite3.Connection, seq: int) -> bytes:
    return bytes(db.execute("SELECT leaf FROM records WHERE seq = ?", (seq,)).fetchone()[0])


def _rewrite_from(db: sqlite3.Connection, start: int, edit=None) -> None:
    """Re-serialize records from ``start`` on with fixed seq fields, stored hashes and prev links (a forger's
    repair after an edit), applying ``edit(record)`` to the record at ``start`` first."""
    rows = db.execute("SELECT seq, leaf FROM records WHERE seq >= ? ORDER BY seq", (start,)).fetchall()
    prev = GENESIS_PREV if start == 0 else hashlib.sha256(_leaf(db, start - 1)).hexdigest()
    db.execute("DELETE FROM records WHERE seq >= ?", (start,))
    for i, (_, leaf) in enumerate(rows):
        record = json.loads(bytes(leaf))
        if i == 0 and edit is not None:
            record = edit(record) or record
        record.update(seq=start + i, prev=prev)
        leaf = canonical_json(record)
        prev = hashlib.sha256(leaf).hexdigest()
        db.execute("INSERT INTO records(seq, leaf, hash) VALUES (?, ?, ?)", (start + i, leaf, prev))
    db.commit()


def _broken(world: dict, **kwargs) -> AuditVerificationError:
    with pytest.raises(AuditVerificationError) as info:
        verify_log(world["path"], **kwargs)
    return info.value


def _root(path: Path, size: int) -> str:
    with AuditLog.open(path, read_only=True) as log:
        return log.root(size).hex()


def test_an_intact_signed_and_witnessed_log_verifies(world: dict, trusted_dir: Path) -> None:
    result = verify_log(world["path"], keys=trusted_dir, witnesses=[world["witness"]])
    assert (result.records, result.checkpoints, result.anchored, result.unanchored) == (N, 2, 16, 4)
    assert result.signatures_checked and result.root == _root(world["path"], N)
    (w,) = result.witnesses
    assert (w.checkpoints, w.latest, w.cosignatures_checked) == (2, 16, True)
    assert result.warnings == ("4 of 20 records (seq 16..19) come after the last checkpoint: no signature covers "
                               "them yet",)


def test_without_keys_roots_are_checked_and_the_missing_signature_check_is_reported(world: dict) -> None:
    result = verify_log(world["path"])
    assert (result.checkpoints, result.signatures_checked, result.anchored) == (2, False, 16)
    assert "the signatures of 2 checkpoints were not checked (pass trusted keys: --keys DIR)" in result.warnings


def test_a_flipped_byte_in_a_field_rehashed_and_rechained(world: dict, db: sqlite3.Connection,
                                                          trusted_dir: Path) -> None:
    signed = _root(world["path"], 8)
    _rewrite_from(db, 5, lambda r: r.update(run_id="run-2"))  # every chain check now passes
    err = _broken(world, keys=trusted_dir)
    assert isinstance(err, CheckpointVerificationError)
    assert (err.checkpoint, err.seq, err.expected, err.got) == (8, 0, signed, _root(world["path"], 8))
    assert str(err).startswith(f"audit log broken at checkpoint of size 8 (records 0..7): root mismatch: the "
                               f"records are not the ones signed (expected {signed[:12]}..., computed ")


def test_an_edit_after_the_first_checkpoint_names_the_records_since_it(world: dict, db: sqlite3.Connection) -> None:
    _rewrite_from(db, 11, lambda r: r.update(details={"nodes": 2}))
    err = _broken(world)
    assert (err.checkpoint, err.seq) == (16, 8)
    assert "(records 8..15)" in str(err)


def test_a_deleted_record_renumbered_and_rechained(world: dict, db: sqlite3.Connection, trusted_dir: Path) -> None:
    db.execute("DELETE FROM records WHERE seq = 3")
    db.execute("UPDATE records SET seq = seq - 1 WHERE seq > 3")
    _rewrite_from(db, 3)
    err = _broken(world, keys=trusted_dir)
    assert (err.checkpoint, err.reason) == (8, "root mismatch: the records are not the ones signed")


def test_a_deleted_record_not_renumbered(world: dict, db: sqlite3.Connection) -> None:
    db.execute("DELETE FROM records WHERE seq = 3")
    db.commit()
    err = _broken(world)
    assert (err.seq, err.reason, err.checkpoint) == (3, "seq gap, a record was removed", None)


def test_two_records_swapped_and_rechained(world: dict, db: sqlite3.Connection) -> None:
    a, b = json.loads(_leaf(db, 9)), json.loads(_leaf(db, 10))
    a["time"], b["time"] = b["time"], a["time"]  # the forger keeps times in order
    db.execute("UPDATE records SET leaf = ? WHERE seq = 9", (canonical_json(b),))
    db.execute("UPDATE records SET leaf = ? WHERE seq = 10", (canonical_json(a),))
    _rewrite_from(db, 9)
    err = _broken(world)
    assert (err.checkpoint, err.seq) == (16, 8)


def test_the_tail_cut_below_the_last_checkpoint(world: dict, db: sqlite3.Connection) -> None:
    db.execute("DELETE FROM records WHERE seq >= 12")
    db.commit()
    err = _broken(world)
    assert (err.checkpoint, err.seq) == (16, 12)
    assert "the log ends at 12 records, below this checkpoint: records were cut from its end" in err.reason


def test_the_tail_cut_with_its_checkpoints_is_caught_by_the_witness(world: dict, db: sqlite3.Connection,
                                                                    trusted_dir: Path) -> None:
    db.execute("DELETE FROM records WHERE seq >= 12")
    db.execute("DELETE FROM checkpoints WHERE size > 12")
    db.commit()
    assert verify_log(world["path"], keys=trusted_dir).records == 12  # the log alone cannot tell
    err = _broken(world, keys=trusted_dir, witnesses=[world["witness"]])
    assert (err.checkpoint, err.seq, err.source) == (16, 12, f"witness {world['witness']}")


def test_the_whole_log_rebuilt_and_resigned_with_an_untrusted_key(world: dict, trusted_dir: Path) -> None:
    forger = Signer("fedsilo.test/coordinator", Ed25519PrivateKey.generate())  # the same name, another key
    fake = world["tmp"] / "fake"
    with AuditLog.open(fake, origin=ORIGIN, signer=forger, checkpoint_every=8) as log:
        append_rounds(log, 0, 3)
        log.append(EventType.RUN_FAILED, actor=COORDINATOR, outcome="failure", reason="made up")
        append_rounds(log, 4, N - 4)
    shutil.rmtree(world["path"])
    shutil.copytree(fake, world["path"])
    assert verify_log(world["path"]).checkpoints == 2  # self-consistent: without keys nothing is wrong
    err = _broken(world, keys=trusted_dir)
    assert (err.checkpoint, err.seq) == (8, 0)
    assert "no signature by a trusted key (signed by: fedsilo.test/coordinator+" in err.reason
    err = _broken(world, witnesses=[world["witness"]])  # and the silo's copy disagrees even without keys
    assert (err.checkpoint, err.source, err.reason) == (8, f"witness {world['witness']}",
                                                       "root mismatch: the records are not the ones signed")


def test_a_fork_resigned_with_the_real_key_is_caught_only_by_the_witness(world: dict, db: sqlite3.Connection,
                                                                         log_signer: Signer, trusted_dir: Path) -> None:
    # Someone holding the coordinator's key rewrites history and re-signs: two checkpoints of size 8 now exist
    # with different roots, the log's and the one hospital0 cosigned.
    witnessed = _root(world["path"], 8)
    _rewrite_from(db, 2, lambda r: r.update(details={"nodes": 1}))
    db.execute("DELETE FROM checkpoints")
    for size in (8, 16):
        root = bytes.fromhex(_root(world["path"], size))
        note = sign_checkpoint(Checkpoint(ORIGIN, size, root), log_signer)
        db.execute("INSERT INTO checkpoints(size, root, note) VALUES (?, ?, ?)", (size, root, note))
    db.commit()
    assert verify_log(world["path"], keys=trusted_dir).checkpoints == 2
    err = _broken(world, keys=trusted_dir, witnesses=[world["witness"]])
    assert (err.checkpoint, err.source, err.expected) == (8, f"witness {world['witness']}", witnessed)
    assert err.got == _root(world["path"], 8)


def test_an_altered_checkpoint_note_or_row(world: dict, db: sqlite3.Connection, trusted_dir: Path) -> None:
    note = bytes(db.execute("SELECT note FROM checkpoints WHERE size = 16").fetchone()[0])
    db.execute("UPDATE checkpoints SET note = ? WHERE size = 16", (note.replace(b"\n16\n", b"\n15\n"),))
    db.commit()
    assert "the note states another size" in _broken(world).reason
    assert "invalid signature by key fedsilo.test/coordinator" in _broken(world, keys=trusted_dir).reason
    db.execute("UPDATE checkpoints SET note = ?, root = ? WHERE size = 16", (note, bytes(32)))
    db.commit()
    assert _broken(world).reason.startswith("the stored root differs from the signed one")
    db.execute("UPDATE checkpoints SET root = ?, note = ? WHERE size = 16", (bytes(32), b"garbage"))
    db.commit()
    assert _broken(world).reason.startswith("malformed note")


def test_a_checkpoint_of_another_log_is_refused(world: dict, db: sqlite3.Connection, log_signer: Signer) -> None:
    with AuditLog.open(world["tmp"] / "other", origin="fedsilo.test/run-2") as other:
        append_rounds(other, 0, 8)
        note = other.sign_checkpoint(log_signer)
    db.execute("UPDATE checkpoints SET note = ? WHERE size = 8", (note,))
    db.commit()
    err = _broken(world)
    assert (err.checkpoint, err.reason, err.expected, err.got) == (8, "the note is for another log", ORIGIN,
                                                                  "fedsilo.test/run-2")


def test_a_witness_cosignature_that_does_not_verify(world: dict, trusted_dir: Path) -> None:
    with sqlite3.connect(world["witness"] / WITNESS_DB) as conn:
        note = parse_note(bytes(conn.execute("SELECT cosigned FROM cosigned WHERE size = 8").fetchone()[0]))
        sig = note.signatures[-1]
        flipped = sig.signature[:20] + bytes([sig.signature[20] ^ 1]) + sig.signature[21:]
        forged = type(note)(note.text, (*note.signatures[:-1], type(sig)(sig.name, sig.key_id, flipped)))
        conn.execute("UPDATE cosigned SET cosigned = ? WHERE size = 8", (forged.to_bytes(),))
    err = _broken(world, keys=trusted_dir, witnesses=[world["witness"]])
    assert err.checkpoint == 8 and "invalid signature by key fedsilo.test/hospital0" in err.reason


def test_a_witness_key_not_among_the_trusted_is_reported(world: dict, key_dir: Path, tmp_path: Path) -> None:
    only_log = tmp_path / "only-log"
    only_log.mkdir()
    shutil.copy(key_dir / "fedsilo.test_coordinator.vkey", only_log)
    result = verify_log(world["path"], keys=only_log, witnesses=[world["witness"]])
    assert not result.witnesses[0].cosignatures_checked
    assert any("cosignatures of witness" in w for w in result.warnings)


def test_keys_without_any_checkpoint_fail(make_log, trusted_dir: Path) -> None:
    with pytest.raises(AuditVerificationError, match="holds no checkpoint to check them against"):
        verify_log(make_log(3), keys=trusted_dir)


def test_a_witness_that_never_saw_the_log_fails(world: dict, tmp_path: Path, log_signer: Signer,
                                               witness_signers: tuple[Signer, Signer]) -> None:
    other = Witness(tmp_path / "sites" / "hospital1" / "audit", witness_signers[1], log_keys=[log_signer.verifier])
    with pytest.raises(VerificationError, match="holds no checkpoint of this log"):
        verify_log(world["path"], witnesses=[other.folder])
    with pytest.raises(ConfigError, match="no witness state"):
        verify_log(world["path"], witnesses=[tmp_path / "nowhere"])


# --- the chunked, multi-process path ------------------------------------------------------------------------


@pytest.fixture
def small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(verify_module, "CHUNK_RECORDS", 4)  # 20 records: 5 chunks, checkpoints inside them


def test_worker_processes_give_the_same_result(world: dict, trusted_dir: Path, small_chunks: None) -> None:
    one = verify_log(world["path"], keys=trusted_dir, witnesses=[world["witness"]], workers=1)
    two = verify_log(world["path"], keys=trusted_dir, witnesses=[world["witness"]], workers=2)
    assert one == two and two.anchored == 16 and two.root == _root(world["path"], N)


def test_worker_processes_catch_a_broken_link_between_chunks(world: dict, db: sqlite3.Connection,
                                                            small_chunks: None) -> None:
    record = json.loads(_leaf(db, 12))  # the first record of the fourth chunk
    record["prev"] = "f" * 64
    leaf = canonical_json(record)
    db.execute("UPDATE records SET leaf = ?, hash = ? WHERE seq = 12", (leaf, hashlib.sha256(leaf).hexdigest()))
    db.commit()
    for workers in (1, 2):
        with pytest.raises(AuditVerificationError) as info:
            verify_log(world["path"], workers=workers)
        assert (info.value.seq, info.value.reason, info.value.got) == (12, "prev hash mismatch", "f" * 64)


def test_worker_processes_report_the_first_problem_in_log_order(world: dict, db: sqlite3.Connection,
                                                               small_chunks: None) -> None:
    db.execute("DELETE FROM records WHERE seq = 18")
    db.execute("UPDATE records SET hash = ? WHERE seq = 6", ("0" * 64,))
    db.commit()
    with pytest.raises(AuditVerificationError) as info:
        verify_log(world["path"], workers=2)
    assert (info.value.seq, info.value.reason) == (6, "stored hash does not match the leaf")


def test_a_time_going_backwards_across_chunks(world: dict, db: sqlite3.Connection, small_chunks: None) -> None:
    _rewrite_from(db, 8, lambda r: r.update(time="2000-01-01T00:00:00.000000Z"))
    with pytest.raises(AuditVerificationError) as info:
        verify_log(world["path"], workers=2)
    assert (info.value.seq, info.value.reason) == (8, "time goes backwards")


def test_a_forged_far_seq_is_the_gap_it_makes(world: dict, db: sqlite3.Connection) -> None:
    # MAX(seq) + 1 is 10**12 now; the verifier must not plan that many records, only find the gap at 20.
    leaf = _leaf(db, 19)
    db.execute("INSERT INTO records(seq, leaf, hash) VALUES (?, ?, ?)", (10**12, leaf, hashlib.sha256(leaf).hexdigest()))
    db.commit()
    err = _broken(world)
    assert (err.seq, err.reason, err.got) == (20, "seq gap, a record was removed", str(10**12))


def test_a_dead_worker_is_replaced_by_checking_its_chunks_here(world: dict, small_chunks: None) -> None:
    uri = f"{(world['path'] / DB_NAME).resolve().as_uri()}?mode=ro"
    jobs = [(uri, start, min(N, start + 4), ()) for start in range(0, N, 4)]
    with verify_module._WorkerPool(2) as pool:
        pool.procs[1].kill()  # our own child
        pool.procs[1].wait()
        chunks = list(pool.map(jobs))
    assert chunks == [verify_module._scan(*job) for job in jobs]
    assert pool.broken == {1}
