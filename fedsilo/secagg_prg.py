"""SecAgg+ masks from AES-256 in counter mode instead of Flower's 32-bit-seeded Mersenne Twister.

Secure aggregation needs its masks to come from a cryptographically secure PRG keyed by the agreed secret
(Bonawitz et al. 2017, "Practical Secure Aggregation for Privacy-Preserving Machine Learning", CCS, Sec. 4).
Flower 1.42's ``pseudo_rand_gen`` folds each 32-byte secret into a 32-bit seed for numpy's Mersenne Twister:
a coordinator that learned one silo's private mask at the unmask stage could search the 2**32 seeds of the
remaining pairwise masks. :func:`install` replaces that function, by name, in Flower's SecAgg+ client mod and
server workflow (the only two callers), with one that expands SHA-256(secret) into the mask with AES-256-CTR
(``cryptography``). Both sides must install it (the silo agent's mod and the coordinator's secure round do,
when imported); if only one did, the masks would not cancel and the coordinator's aggregate norm check fails
the round rather than apply garbage.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np

_DOMAIN = b"fedsilo secagg+ mask v1\0"


def pseudo_rand_gen(seed: bytes, num_range: int, dimensions_list: Sequence[tuple[int, ...]]) -> list[np.ndarray]:
    """Uniform integers in [0, num_range) shaped like ``dimensions_list`` (int64), from AES-256-CTR keyed by ``seed``."""
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    if num_range < 1 or num_range > 2**63:
        raise ValueError(f"mask range {num_range} must be in 1..2**63")
    sizes = [int(np.prod(d, dtype=np.int64)) for d in dimensions_list]
    key = hashlib.sha256(_DOMAIN + bytes(seed)).digest()
    encryptor = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor()
    words = np.frombuffer(encryptor.update(bytes(8 * sum(sizes))), dtype="<u8")
    # A power-of-two range (SecAgg+'s modulus always is) takes the low bits: exactly uniform. Otherwise the
    # modulo's bias is below num_range / 2**64.
    values = words & np.uint64(num_range - 1) if num_range & (num_range - 1) == 0 else words % np.uint64(num_range)
    values = values.astype(np.int64)
    out, start = [], 0
    for dims, size in zip(dimensions_list, sizes):
        out.append(values[start:start + size].reshape(dims))
        start += size
    return out


def install() -> None:
    """Make Flower's SecAgg+ mod and workflow draw their masks from :func:`pseudo_rand_gen`."""
    import importlib

    # import_module, not "import ... as": the package re-exports a function under the client module's name
    for name in ("flwr.client.mod.secure_aggregation.secaggplus_mod", "flwr.server.workflow.secure_aggregation.secaggplus_workflow"):
        module = importlib.import_module(name)
        if not hasattr(module, "pseudo_rand_gen"):
            raise RuntimeError(f"{module.__name__} has no pseudo_rand_gen: this Flower version is not the one fedsilo's SecAgg+ was checked against")
        module.pseudo_rand_gen = pseudo_rand_gen
