"""The audit trail: canonical records (RFC 8785) in an append-only SQLite log, an RFC 6962 Merkle tree over
them, Ed25519-signed C2SP checkpoints that the silos witness (tlog-cosignature/v1), and the verifier.

Imports only the standard library, ``cryptography`` and ``fedsilo.errors``, so an auditor can verify a log with a
small install.
"""

from compliance.audit_log import AuditLog, StoredCheckpoint
from compliance.canonical import canonical_json
from compliance.checkpoint import Checkpoint, NoteError, SignatureError, Signer, VerifierKey, parse_vkey
from compliance.keys import generate_signer, load_signer, load_verifier_keys
from compliance.merkle import MerkleError, ProofShapeError, RootMismatchError
from compliance.records import EventType
from compliance.verify import AuditVerificationError, CheckpointVerificationError, VerifyResult, WitnessReport, verify_log
from compliance.witness import Witness, WitnessConflictError, WitnessError

__all__ = [
    "AuditLog", "AuditVerificationError", "Checkpoint", "CheckpointVerificationError", "EventType", "MerkleError",
    "NoteError", "ProofShapeError", "RootMismatchError", "SignatureError", "Signer", "StoredCheckpoint",
    "VerifierKey", "VerifyResult", "Witness", "WitnessConflictError", "WitnessError", "WitnessReport",
    "canonical_json", "generate_signer", "load_signer", "load_verifier_keys", "parse_vkey", "verify_log",
]
