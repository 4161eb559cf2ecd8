"""compliance.keys: key files for the log and the witnesses."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from compliance import Signer, generate_signer, load_signer, load_verifier_keys, parse_vkey
from compliance.checkpoint import KEY_TYPE_COSIGNATURE, KEY_TYPE_NOTE
from fedsilo.errors import ConfigError


def test_generate_writes_a_0600_private_pem_and_a_public_vkey(tmp_path: Path) -> None:
    signer = generate_signer(tmp_path / "keys", "fedsilo.example/coordinator")
    private = tmp_path / "keys" / "fedsilo.example_coordinator.key"
    public = tmp_path / "keys" / "fedsilo.example_coordinator.vkey"
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert private.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert public.read_text() == signer.vkey() + "\n"
    assert parse_vkey(public.read_text().strip()) == signer.verifier
    assert signer.key_type == KEY_TYPE_NOTE


def test_the_private_key_is_0600_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        generate_signer(tmp_path, "w", role="witness")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "w.key").stat().st_mode) == 0o600


def test_load_returns_the_same_key_and_role(tmp_path: Path) -> None:
    made = generate_signer(tmp_path, "fedsilo.example/hospital0", role="witness")
    loaded = load_signer(tmp_path, "fedsilo.example/hospital0")
    assert isinstance(loaded, Signer) and loaded.key_type == KEY_TYPE_COSIGNATURE
    assert loaded.verifier == made.verifier
    assert loaded.sign(b"m") == made.sign(b"m")  # Ed25519 is deterministic


def test_keys_are_never_overwritten(tmp_path: Path) -> None:
    generate_signer(tmp_path, "k")
    before = (tmp_path / "k.key").read_bytes()
    with pytest.raises(ConfigError, match="exists; keys are never overwritten"):
        generate_signer(tmp_path, "k")
    assert (tmp_path / "k.key").read_bytes() == before


def test_a_private_key_readable_by_others_is_refused(tmp_path: Path) -> None:
    generate_signer(tmp_path, "k")
    os.chmod(tmp_path / "k.key", 0o644)
    with pytest.raises(ConfigError, match="readable by others") as info:
        load_signer(tmp_path, "k")
    assert "chmod 600" in info.value.one_line()


def test_mismatched_key_files_are_refused(tmp_path: Path) -> None:
    generate_signer(tmp_path / "a", "k")
    generate_signer(tmp_path / "b", "k")
    (tmp_path / "a" / "k.vkey").write_bytes((tmp_path / "b" / "k.vkey").read_bytes())
    with pytest.raises(ConfigError, match="are not the same key pair"):
        load_signer(tmp_path / "a", "k")
    with pytest.raises(ConfigError, match="no key 'other'"):
        load_signer(tmp_path / "a", "other")


def test_unknown_role_and_bad_names(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown key role 'auditor'; valid: log, witness"):
        generate_signer(tmp_path, "k", role="auditor")
    for name in ("", "a b", "a+b"):
        with pytest.raises(ConfigError, match="key name"):
            generate_signer(tmp_path, name)
    assert not list(tmp_path.iterdir())


def test_error_messages_never_carry_key_material(tmp_path: Path) -> None:
    generate_signer(tmp_path, "k")
    pem = (tmp_path / "k.key").read_text()
    body = pem.splitlines()[1]
    (tmp_path / "k.key").write_text(pem.replace(body, body[:-8]))  # a truncated key
    with pytest.raises(ConfigError, match="not an unencrypted PEM private key") as info:
        load_signer(tmp_path, "k")
    assert body[:12] not in info.value.one_line()


def test_load_verifier_keys_from_a_folder_or_a_list(tmp_path: Path) -> None:
    a = generate_signer(tmp_path, "a")
    b = generate_signer(tmp_path, "b", role="witness")
    assert load_verifier_keys(tmp_path) == (a.verifier, b.verifier)
    assert load_verifier_keys([a.vkey(), tmp_path / "b.vkey", a.verifier]) == (a.verifier, b.verifier)
    with pytest.raises(ConfigError, match="no verifier keys"):
        load_verifier_keys([])
    with pytest.raises(ConfigError, match="is not a folder of .vkey files"):
        load_verifier_keys(tmp_path / "a.key")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no verifier keys in"):
        load_verifier_keys(tmp_path / "empty")
    (tmp_path / "bad.vkey").write_text("not a key\n")
    with pytest.raises(ConfigError, match="bad.vkey: not a verifier key"):
        load_verifier_keys(tmp_path)
