"""Ed25519 keys for signers (the log) and witnesses (the silos), as files.

A signer named ``fedsilo.example/coordinator`` in folder ``keys/`` is two files, named after the key name
with every character outside ``[A-Za-z0-9._-]`` replaced by ``_``:

- ``keys/fedsilo.example_coordinator.key``: the private key, PKCS#8 PEM, unencrypted, mode 0600. It never
  leaves the machine; nothing here logs or prints it.
- ``keys/fedsilo.example_coordinator.vkey``: one line, the public verifier key
  ``<name>+<hex key ID>+<base64(type || public key)>``. Hand this file to whoever verifies.

The role fixes the key type: ``log`` signs checkpoints (0x01, signed-note Ed25519); ``witness`` cosigns
them (0x04, tlog-cosignature/v1); ``person`` signs statements by a researcher or a site officer
(:mod:`compliance.statements`, signed notes, 0x01). A key serves one role only (the cosignature spec asks
for it): each purpose has its own key files and its own folder of trusted public keys.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Iterable
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from compliance.checkpoint import KEY_TYPE_COSIGNATURE, KEY_TYPE_NOTE, Signer, VerifierKey, parse_vkey
from fedsilo.errors import ConfigError

ROLES = {"log": KEY_TYPE_NOTE, "witness": KEY_TYPE_COSIGNATURE, "person": KEY_TYPE_NOTE}
PRIVATE_SUFFIX = ".key"
PUBLIC_SUFFIX = ".vkey"
PRIVATE_MODE = 0o600
# A vkey file holds one line of a few hundred bytes; anything bigger is not one.
MAX_VKEY_FILE_BYTES = 4096

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


def key_stem(name: str) -> str:
    """The file name stem of key ``name``: characters outside [A-Za-z0-9._-] become '_'."""
    return _UNSAFE.sub("_", name)


def _role_type(role: str) -> int:
    try:
        return ROLES[role]
    except KeyError:
        raise ConfigError(f"unknown key role {role!r}; valid: {', '.join(ROLES)}") from None


def generate_signer(folder: str | Path, name: str, *, role: str = "log") -> Signer:
    """Create a new Ed25519 key for ``name`` in ``folder`` (private PEM 0600, public .vkey) and return it.

    Raises:
        ConfigError: the name is not a valid key name, the role is unknown, or a key file exists already
            (keys are never overwritten).
    """
    key_type = _role_type(role)
    private = Ed25519PrivateKey.generate()
    signer = Signer(name, private, key_type=key_type)  # checks the name
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    stem = key_stem(name)
    private_path, public_path = folder / (stem + PRIVATE_SUFFIX), folder / (stem + PUBLIC_SUFFIX)
    for path in (private_path, public_path):
        if path.exists():
            raise ConfigError(f"{path} exists; keys are never overwritten",
                              fix="use another name, or move the old key away first")
    pem = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_MODE)
    try:
        os.fchmod(fd, PRIVATE_MODE)  # whatever the umask
        os.write(fd, pem)
        os.fsync(fd)
    finally:
        os.close(fd)
    public_path.write_text(signer.vkey() + "\n", encoding="ascii")
    return signer


def load_signer(folder: str | Path, name: str) -> Signer:
    """Load the key of ``name`` from ``folder``: its private PEM and its .vkey (which gives the role).

    Raises:
        ConfigError: a file is missing or unreadable, the private key is readable by group or others, is not
            Ed25519, or does not match the .vkey.
    """
    folder = Path(folder)
    stem = key_stem(name)
    private_path, public_path = folder / (stem + PRIVATE_SUFFIX), folder / (stem + PUBLIC_SUFFIX)
    if not private_path.is_file() or not public_path.is_file():
        raise ConfigError(f"no key {name!r} in {folder} (expected {private_path.name} and {public_path.name})",
                          fix="create one with compliance.keys.generate_signer, or pass the right folder")
    mode = stat.S_IMODE(private_path.stat().st_mode)
    if os.name == "posix" and mode & 0o077:
        raise ConfigError(f"{private_path} is readable by others (mode {mode:o})",
                          fix=f"chmod 600 {private_path}")
    try:
        private = serialization.load_pem_private_key(private_path.read_bytes(), password=None)
    except (ValueError, TypeError):
        raise ConfigError(f"{private_path} is not an unencrypted PEM private key") from None
    if not isinstance(private, Ed25519PrivateKey):
        raise ConfigError(f"{private_path} is not an Ed25519 key")
    public = read_vkey_file(public_path)
    if public.name != name:
        raise ConfigError(f"{public_path} is the key of {public.name!r}, not {name!r}")
    signer = Signer(name, private, key_type=public.key_type)
    if signer.verifier != public:
        raise ConfigError(f"{private_path} and {public_path} are not the same key pair",
                          fix="restore both files from the same backup")
    return signer


def read_vkey_file(path: str | Path) -> VerifierKey:
    """Read one verifier key from a .vkey file (one line)."""
    path = Path(path)
    try:
        data = path.read_bytes()[: MAX_VKEY_FILE_BYTES + 1]
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
    if len(data) > MAX_VKEY_FILE_BYTES:
        raise ConfigError(f"{path} is larger than a verifier key file can be")
    try:
        text = data.decode("ascii").strip()
    except UnicodeDecodeError:
        raise ConfigError(f"{path} is not a verifier key (not ASCII)") from None
    try:
        return parse_vkey(text)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc.message}", fix=exc.fix) from None


def load_verifier_keys(source: str | Path | Iterable[str | Path | VerifierKey]) -> tuple[VerifierKey, ...]:
    """Trusted keys from a folder of ``*.vkey`` files, or from a list of vkey strings, files or VerifierKeys.

    Raises:
        ConfigError: a key is malformed, the folder does not exist, or there are no keys at all (an empty
            set of trusted keys would trust nothing, so it is refused rather than passing trivially).
    """
    keys: list[VerifierKey] = []
    if isinstance(source, (str, Path)):
        folder = Path(source)
        if not folder.is_dir():
            raise ConfigError(f"{folder} is not a folder of .vkey files", fix="pass the folder that holds the .vkey files")
        keys = [read_vkey_file(p) for p in sorted(folder.glob("*" + PUBLIC_SUFFIX))]
        where = str(folder)
    else:
        for item in source:
            if isinstance(item, VerifierKey):
                keys.append(item)
            elif isinstance(item, Path) or (isinstance(item, str) and item.endswith(PUBLIC_SUFFIX)):
                keys.append(read_vkey_file(item))
            else:
                keys.append(parse_vkey(item))
        where = "the list given"
    if not keys:
        raise ConfigError(f"no verifier keys in {where}", fix="add the log's and the witnesses' .vkey files")
    return tuple(dict.fromkeys(keys))  # drop exact duplicates, keep order
