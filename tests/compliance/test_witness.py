"""Witness: cosigns a checkpoint only if it extends the last one it cosigned; refuses replays, forks, bad proofs."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from audit_helpers import append_rounds
from compliance import AuditLog, Signer, Witness, WitnessConflictError, WitnessError
from compliance.checkpoint import Checkpoint, SignatureError, sign_checkpoint, verify_checkpoint
from compliance.witness import WITNESS_DB, read_witness_vkey, read_witnessed
from fedsilo.errors import ConfigError, VerificationError

ORIGIN = "fedsilo.test/run-1"


@pytest.fixture
def log(tmp_path: Path, log_signer: Signer):
    with AuditLog.open(tmp_path / "coordinator" / "audit", origin=ORIGIN) as log:
        yield log


@pytest.fixture
def witness(tmp_path: Path, witness_signers: tuple[Signer, Signer], log_signer: Signer) -> Witness:
    return Witness(tmp_path / "sites" / "hospital0" / "audit", witness_signers[0], log_keys=[log_signer.verifier])


def _checkpoint(log: AuditLog, signer: Signer, n: int) -> bytes:
    append_rounds(log, len(log), n)
    return log.sign_checkpoint(signer)


def test_cosigns_the_first_checkpoint_and_each_consistent_one(log: AuditLog, witness: Witness, log_signer: Signer,
                                                             witness_signers: tuple[Signer, Signer]) -> None:
    first = _checkpoint(log, log_signer, 5)
    cosigned = witness.cosign(first, log.consistency_proof(0, 5))
    keys = [log_signer.verifier, witness_signers[0].verifier]
    assert verify_checkpoint(cosigned, keys, origin=ORIGIN, min_cosignatures=1).checkpoint.size == 5
    second = _checkpoint(log, log_signer, 6)
    witness.cosign(second, log.consistency_proof(5), old_size=5)
    held = witness.latest(ORIGIN)
    assert (held.size, held.note) == (11, second)
    assert [c.size for c in witness.checkpoints(ORIGIN)] == [5, 11]
    assert read_witness_vkey(witness.folder) == witness_signers[0].vkey()


def test_the_state_survives_a_restart(tmp_path: Path, log: AuditLog, witness: Witness, log_signer: Signer,
                                      witness_signers: tuple[Signer, Signer]) -> None:
    witness.cosign(_checkpoint(log, log_signer, 4), [])
    again = Witness(witness.folder, witness_signers[0], log_keys=[log_signer.verifier])
    assert again.latest(ORIGIN).size == 4
    with sqlite3.connect(witness.folder / WITNESS_DB) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)


def test_a_replayed_old_checkpoint_is_refused(log: AuditLog, witness: Witness, log_signer: Signer) -> None:
    old = _checkpoint(log, log_signer, 3)
    witness.cosign(old, [])
    new = _checkpoint(log, log_signer, 3)
    witness.cosign(new, log.consistency_proof(3))
    with pytest.raises(WitnessError, match="already cosigned size 6; a smaller size is an old checkpoint replayed") as info:
        witness.cosign(old, [])
    assert (info.value.size, info.value.held_size) == (3, 6)
    assert witness.latest(ORIGIN).size == 6


def test_a_fork_at_the_same_size_is_refused(tmp_path: Path, log: AuditLog, witness: Witness, log_signer: Signer) -> None:
    honest = _checkpoint(log, log_signer, 4)
    witness.cosign(honest, [])
    with AuditLog.open(tmp_path / "forked", origin=ORIGIN) as fork:  # same origin and key, other records
        append_rounds(fork, 0, 3)
        fork.append("run.finished", actor={"kind": "coordinator", "id": "other"})
        forked = fork.sign_checkpoint(log_signer)
    with pytest.raises(WitnessError, match="holds another root for this size: the log forked") as info:
        witness.cosign(forked, [])
    assert info.value.expected == log.root() and info.value.calculated == fork_root(tmp_path / "forked")


def fork_root(path: Path, size: int | None = None) -> bytes:
    with AuditLog.open(path, read_only=True) as log:
        return log.root(size)


def test_the_same_checkpoint_again_is_a_retry(log: AuditLog, witness: Witness, log_signer: Signer) -> None:
    note = _checkpoint(log, log_signer, 2)
    first = witness.cosign(note, [])
    assert witness.cosign(note, []) == first  # not signed again
    with pytest.raises(WitnessError, match="needs an empty proof"):
        witness.cosign(note, [bytes(32)])


def test_a_fork_that_grows_is_refused_by_the_consistency_proof(tmp_path: Path, log: AuditLog, witness: Witness,
                                                               log_signer: Signer) -> None:
    witness.cosign(_checkpoint(log, log_signer, 5), [])
    with AuditLog.open(tmp_path / "forked", origin=ORIGIN) as fork:
        append_rounds(fork, 0, 2)
        fork.append("run.finished", actor={"kind": "coordinator", "id": "other"})
        append_rounds(fork, 3, 7)
        note, proof = fork.sign_checkpoint(log_signer), fork.consistency_proof(5)
    with pytest.raises(WitnessError, match="does not hold \\(old root mismatch\\)") as info:
        witness.cosign(note, proof)
    assert info.value.expected == log.root(5) and info.value.calculated == fork_root(tmp_path / "forked", 5)


@pytest.mark.parametrize("corrupt", [
    pytest.param(lambda p: [*p, bytes(32)], id="padded with a zero hash"),
    pytest.param(lambda p: [p[0], *p], id="padded in front"),
    pytest.param(lambda p: p[:-1], id="one hash short"),
    pytest.param(lambda p: [*p[:-1], p[-1][:31]], id="a hash of 31 bytes"),
    pytest.param(lambda p: [*p[:-1], p[-1] + b"\0"], id="a hash of 33 bytes"),
    pytest.param(lambda p: [], id="empty"),
])
def test_a_padded_or_wrong_size_consistency_proof_is_refused(log: AuditLog, witness: Witness, log_signer: Signer,
                                                            corrupt) -> None:
    witness.cosign(_checkpoint(log, log_signer, 5), [])
    note = _checkpoint(log, log_signer, 9)
    proof = log.consistency_proof(5)
    with pytest.raises(WitnessError, match="malformed consistency proof from size 5"):
        witness.cosign(note, corrupt(proof))
    assert witness.latest(ORIGIN).size == 5
    witness.cosign(note, proof)  # the right proof still works


def test_a_flipped_bit_in_the_proof_is_refused(log: AuditLog, witness: Witness, log_signer: Signer) -> None:
    witness.cosign(_checkpoint(log, log_signer, 5), [])
    note = _checkpoint(log, log_signer, 9)
    proof = log.consistency_proof(5)
    proof[1] = bytes([proof[1][0] ^ 1]) + proof[1][1:]
    with pytest.raises(WitnessError, match="does not hold"):
        witness.cosign(note, proof)


def test_a_proof_from_another_size_is_a_conflict_naming_the_held_size(log: AuditLog, witness: Witness,
                                                                     log_signer: Signer) -> None:
    witness.cosign(_checkpoint(log, log_signer, 5), [])
    _checkpoint(log, log_signer, 2)
    note = _checkpoint(log, log_signer, 3)
    with pytest.raises(WitnessConflictError, match="starts at size 7, but the witness holds size 5") as info:
        witness.cosign(note, log.consistency_proof(7), old_size=7)
    assert info.value.held_size == 5
    witness.cosign(note, log.consistency_proof(info.value.held_size), old_size=info.value.held_size)


def test_a_checkpoint_signed_by_an_untrusted_key_is_refused(log: AuditLog, witness: Witness) -> None:
    stranger = Signer("fedsilo.test/coordinator", Ed25519PrivateKey.generate())  # same name, other key
    append_rounds(log, 0, 2)
    note = sign_checkpoint(Checkpoint(ORIGIN, 2, log.root()), stranger)
    with pytest.raises(SignatureError, match="no signature by a trusted key"):
        witness.cosign(note, [])
    assert witness.latest(ORIGIN) is None


def test_origins_are_witnessed_separately(tmp_path: Path, log: AuditLog, witness: Witness, log_signer: Signer) -> None:
    witness.cosign(_checkpoint(log, log_signer, 6), [])
    with AuditLog.open(tmp_path / "run-2", origin="fedsilo.test/run-2") as other:
        append_rounds(other, 0, 2)
        witness.cosign(other.sign_checkpoint(log_signer), [])
    assert [c.size for c in read_witnessed(witness.folder, ORIGIN)] == [6]
    assert [c.size for c in read_witnessed(witness.folder, "fedsilo.test/run-2")] == [2]


def test_a_witness_needs_a_witness_key_and_log_keys(tmp_path: Path, log_signer: Signer,
                                                   witness_signers: tuple[Signer, Signer]) -> None:
    with pytest.raises(ConfigError, match="witness key"):
        Witness(tmp_path, log_signer, log_keys=[log_signer.verifier])
    with pytest.raises(ConfigError, match="no log key"):
        Witness(tmp_path, witness_signers[0], log_keys=[witness_signers[1].verifier])
    with pytest.raises(ConfigError, match="no verifier keys"):
        Witness(tmp_path, witness_signers[0], log_keys=[])
    with pytest.raises(ConfigError, match="no witness state"):
        read_witnessed(tmp_path / "nowhere", ORIGIN)


def test_errors_are_verification_errors(log: AuditLog, witness: Witness, log_signer: Signer) -> None:
    witness.cosign(_checkpoint(log, log_signer, 3), [])
    with pytest.raises(VerificationError) as info:
        witness.cosign(log.checkpoints()[0].note.replace(b"\n3\n", b"\n2\n"), [])
    assert info.value.exit_code == 1
