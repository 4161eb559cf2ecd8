"""Shared fixtures: real SQLite audit logs in tmp_path, and Ed25519 keys for the log and two witnesses."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from compliance import AuditLog, Signer, generate_signer

from audit_helpers import COORDINATOR, LOG_KEY, WITNESS_KEYS, append_rounds


@pytest.fixture
def actor() -> dict:
    return dict(COORDINATOR)


@pytest.fixture
def make_log(tmp_path: Path) -> Callable[[int], Path]:
    """Write a log of ``n`` records (run.started, then round.started rounds 1..n-1) and return its folder."""

    def make(n: int, folder: str = "run/audit") -> Path:
        path = tmp_path / folder
        with AuditLog.open(path) as log:
            append_rounds(log, 0, n)
        return path

    return make


@pytest.fixture(scope="session")
def key_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with the log's key and two witness keys (private .key and public .vkey files)."""
    folder = tmp_path_factory.mktemp("keys")
    generate_signer(folder, LOG_KEY, role="log")
    for name in WITNESS_KEYS:
        generate_signer(folder, name, role="witness")
    return folder


@pytest.fixture(scope="session")
def trusted_dir(key_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Only the public .vkey files: what a compliance officer is handed."""
    folder = tmp_path_factory.mktemp("trusted")
    for vkey in key_dir.glob("*.vkey"):
        (folder / vkey.name).write_bytes(vkey.read_bytes())
    return folder


@pytest.fixture(scope="session")
def log_signer(key_dir: Path) -> Signer:
    from compliance import load_signer

    return load_signer(key_dir, LOG_KEY)


@pytest.fixture(scope="session")
def witness_signers(key_dir: Path) -> tuple[Signer, Signer]:
    from compliance import load_signer

    return load_signer(key_dir, WITNESS_KEYS[0]), load_signer(key_dir, WITNESS_KEYS[1])
