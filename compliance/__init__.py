"""The audit trail: canonical records (RFC 8785) in an append-only, hash-chained SQLite log, and its verifier.

Imports only the standard library and ``fedsilo.errors``, so an auditor can verify a log with a small install.
"""

from compliance.audit_log import AuditLog
from compliance.canonical import canonical_json
from compliance.records import EventType
from compliance.verify import AuditVerificationError, VerifyResult, verify_log

__all__ = ["AuditLog", "AuditVerificationError", "EventType", "VerifyResult", "canonical_json", "verify_log"]
