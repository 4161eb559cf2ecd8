"""Merkle tree hashing and proofs of RFC 6962 / RFC 9162 (Certificate Transparency), bytes in and bytes out.

- Leaf hash: SHA-256(0x00 || leaf bytes); node hash: SHA-256(0x01 || left || right) (RFC 6962 section 2.1;
  the prefixes keep a leaf from passing as a node, i.e. second-preimage resistance).
- Tree hash MTH(D[n]): the empty string's SHA-256 for n = 0, the leaf hash for n = 1, otherwise
  node_hash(MTH(D[0:k]), MTH(D[k:n])) with k the largest power of two smaller than n (RFC 6962 section 2.1).
- Inclusion and consistency proofs: built as PATH and PROOF of RFC 6962 sections 2.1.1 and 2.1.2, checked with
  the verification algorithms of RFC 9162 sections 2.1.3.2 and 2.1.4.2.

Verification raises; it never returns False. Each verify function checks the proof's shape (sizes, index,
number and length of components) before hashing anything, then computes the root from the proof and compares:
a :class:`ProofShapeError` or a :class:`RootMismatchError` (with the expected and calculated roots) otherwise.
An empty proof is only valid where the tree needs none (one leaf, equal sizes, old size 0).

Layout of transparency-dev/merkle (proof/verify.go, rfc6962/rfc6962.go); see tests/compliance/test_merkle.py
for the test vectors and where they come from.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence

from fedsilo.errors import VerificationError

LEAF_PREFIX = b"\x00"  # RFC 6962 section 2.1: prepended to a leaf's bytes
NODE_PREFIX = b"\x01"  # RFC 6962 section 2.1: prepended to two child hashes
HASH_SIZE = 32  # SHA-256
EMPTY_ROOT = hashlib.sha256(b"").digest()  # MTH({}) = SHA-256()
# Tree sizes are uint64 in RFC 9162 and in checkpoints; anything larger is malformed input.
MAX_TREE_SIZE = 2**63 - 1

_sha256 = hashlib.sha256


class MerkleError(VerificationError):
    """A Merkle proof or root did not verify."""


class ProofShapeError(MerkleError):
    """The proof cannot be right for these sizes (checked before any hashing): wrong index, sizes, length."""


class RootMismatchError(MerkleError):
    """The root computed from the proof is not the expected root.

    Attributes:
        expected: the root the caller trusts (bytes).
        calculated: the root the proof leads to (bytes).
        which: "root", or for consistency proofs "old root" / "new root".
    """

    def __init__(self, what: str, *, expected: bytes, calculated: bytes, which: str = "root") -> None:
        self.expected = expected
        self.calculated = calculated
        self.which = which
        super().__init__(f"{what}: {which} mismatch (expected {expected.hex()[:16]}..., "
                         f"calculated {calculated.hex()[:16]}...)",
                         fix="the tree behind this proof is not the one that was signed; do not trust it")


def leaf_hash(leaf: bytes) -> bytes:
    """SHA-256(0x00 || leaf): the hash of one record's exact bytes."""
    return _sha256(LEAF_PREFIX + leaf).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    """SHA-256(0x01 || left || right): the hash of an inner node."""
    return _sha256(NODE_PREFIX + left + right).digest()


class CompactRange:
    """The perfect subtrees that make up a tree of ``size`` leaves: the root in O(log n) memory.

    ``append`` pushes a leaf hash and merges equal-sized subtrees (amortised one node hash per leaf);
    ``root`` folds the stack from the right, which is exactly RFC 6962's split at the largest power of two.
    The stack is the binary decomposition of ``size``, largest subtree first.
    """

    __slots__ = ("size", "_stack")

    def __init__(self, size: int = 0, stack: Sequence[bytes] = ()) -> None:
        if size < 0 or len(stack) != bin(size).count("1"):
            raise ValueError(f"a compact range of size {size} holds {bin(size).count('1')} hashes, not {len(stack)}")
        self.size = size
        self._stack = list(stack)

    def append(self, leaf_hash: bytes) -> None:
        stack = self._stack
        stack.append(leaf_hash)
        n = self.size
        self.size = n + 1
        while n & 1:
            right = stack.pop()
            stack[-1] = _sha256(NODE_PREFIX + stack[-1] + right).digest()
            n >>= 1

    def extend(self, leaf_hashes: Iterable[bytes]) -> None:
        for h in leaf_hashes:
            self.append(h)

    def extend_aligned(self, other: CompactRange) -> None:
        """Append the leaves that ``other`` summarises (a range that starts where this one ends).

        ``self.size`` must be a multiple of the largest power of two in ``other.size``, so that every
        subtree of ``other`` is a subtree of the joined tree; used to join ranges hashed in parallel.
        """
        if other.size and self.size % (1 << (other.size.bit_length() - 1)):
            raise ValueError(f"a range of {other.size} leaves cannot be joined at {self.size}")
        remaining = other.size
        for h in other._stack:  # largest subtree first
            block = 1 << (remaining.bit_length() - 1)
            self._push(h, block)
            remaining -= block

    def _push(self, subtree_hash: bytes, block: int) -> None:
        stack = self._stack
        stack.append(subtree_hash)
        n = self.size // block
        self.size += block
        while n & 1:
            right = stack.pop()
            stack[-1] = _sha256(NODE_PREFIX + stack[-1] + right).digest()
            n >>= 1

    def root(self) -> bytes:
        stack = self._stack
        if not stack:
            return EMPTY_ROOT
        h = stack[-1]
        for left in reversed(stack[:-1]):
            h = _sha256(NODE_PREFIX + left + h).digest()
        return h

    def hashes(self) -> tuple[bytes, ...]:
        return tuple(self._stack)

    def copy(self) -> CompactRange:
        return CompactRange(self.size, self._stack)


def root(leaf_hashes: Iterable[bytes]) -> bytes:
    """MTH over the given leaf hashes (already ``leaf_hash``-ed), streaming: O(log n) memory."""
    tree = CompactRange()
    tree.extend(leaf_hashes)
    return tree.root()


def inclusion_proof(index: int, leaf_hashes: Sequence[bytes]) -> list[bytes]:
    """PATH(index, D[n]) of RFC 6962 section 2.1.1 for the tree of all ``leaf_hashes``.

    Raises:
        ProofShapeError: ``index`` is not a leaf of the tree.
    """
    n = len(leaf_hashes)
    if not 0 <= index < n:
        raise ProofShapeError(f"leaf index {index} is not in a tree of size {n}")
    proof: list[bytes] = []
    _path(index, leaf_hashes, 0, n, proof)
    return proof


def consistency_proof(old_size: int, new_size: int, leaf_hashes: Sequence[bytes]) -> list[bytes]:
    """PROOF(old_size, D[new_size]) of RFC 6962 section 2.1.2; empty when old_size is 0 or equal to new_size.

    Raises:
        ProofShapeError: not 0 <= old_size <= new_size <= len(leaf_hashes).
    """
    if not 0 <= old_size <= new_size <= len(leaf_hashes):
        raise ProofShapeError(f"no consistency proof from size {old_size} to size {new_size} "
                              f"(the tree has {len(leaf_hashes)} leaves)")
    proof: list[bytes] = []
    if 0 < old_size < new_size:
        _subproof(old_size, leaf_hashes, 0, new_size, True, proof)
    return proof


def _split(n: int) -> int:
    """The largest power of two smaller than n (n >= 2)."""
    return 1 << ((n - 1).bit_length() - 1)


def _mth(leaf_hashes: Sequence[bytes], lo: int, hi: int) -> bytes:
    tree = CompactRange()
    for i in range(lo, hi):
        tree.append(leaf_hashes[i])
    return tree.root()


def _path(m: int, leaf_hashes: Sequence[bytes], lo: int, hi: int, out: list[bytes]) -> None:
    # Iterative form of PATH: descend towards leaf m, collecting siblings, then emit them bottom-up.
    siblings: list[bytes] = []
    while hi - lo > 1:
        k = _split(hi - lo)
        if m < k:
            siblings.append(_mth(leaf_hashes, lo + k, hi))
            hi = lo + k
        else:
            siblings.append(_mth(leaf_hashes, lo, lo + k))
            lo += k
            m -= k
    out.extend(reversed(siblings))


def _subproof(m: int, leaf_hashes: Sequence[bytes], lo: int, hi: int, complete: bool, out: list[bytes]) -> None:
    siblings: list[bytes] = []
    while True:
        n = hi - lo
        if m == n:
            if not complete:
                siblings.append(_mth(leaf_hashes, lo, hi))
            break
        k = _split(n)
        if m <= k:
            siblings.append(_mth(leaf_hashes, lo + k, hi))
            hi = lo + k
        else:
            siblings.append(_mth(leaf_hashes, lo, lo + k))
            lo += k
            m -= k
            complete = False
    out.extend(reversed(siblings))


# --- verification ----------------------------------------------------------------------------------------


def _check_hash(value: object, what: str) -> None:
    if not isinstance(value, (bytes, bytearray)) or len(value) != HASH_SIZE:
        size = len(value) if isinstance(value, (bytes, bytearray)) else type(value).__name__
        raise ProofShapeError(f"{what} must be {HASH_SIZE} bytes, not {size}")


def _check_proof(proof: Sequence[bytes], expected_len: int, what: str) -> None:
    if len(proof) != expected_len:
        raise ProofShapeError(f"{what} has {len(proof)} hashes; a proof for these sizes has {expected_len}")
    for i, p in enumerate(proof):
        _check_hash(p, f"{what} component {i}")


def _check_size(size: object, what: str) -> int:
    if not isinstance(size, int) or isinstance(size, bool) or not 0 <= size <= MAX_TREE_SIZE:
        raise ProofShapeError(f"{what} {size!r} is not a tree size (an integer 0..2**63-1)")
    return size


def inclusion_proof_length(index: int, size: int) -> int:
    """How many hashes an inclusion proof for leaf ``index`` in a tree of ``size`` leaves has (index < size)."""
    inner = (index ^ (size - 1)).bit_length()  # levels where the path has a sibling inside the perfect part
    border = bin(index >> inner).count("1")  # levels on the right border, each with one left sibling
    return inner + border


def verify_inclusion(index: int, size: int, leaf_hash: bytes, proof: Sequence[bytes], root: bytes) -> None:
    """Check that ``leaf_hash`` is leaf ``index`` of the tree of ``size`` leaves whose root is ``root``.

    RFC 9162 section 2.1.3.2. Steps:
      1. shape: 0 <= index < size; hashes are 32 bytes; the proof has exactly as many components as the
         path from leaf ``index`` to the root of a tree of ``size`` leaves;
      2. compute the root from ``leaf_hash`` and the proof;
      3. compare it with ``root``.

    Raises:
        ProofShapeError: step 1 failed (nothing was hashed).
        RootMismatchError: step 3 failed; carries expected and calculated roots.
    """
    # 1. shape
    _check_size(size, "tree size")
    if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < size:
        raise ProofShapeError(f"leaf index {index!r} is not in a tree of size {size}")
    _check_hash(leaf_hash, "leaf hash")
    _check_hash(root, "root")
    _check_proof(proof, inclusion_proof_length(index, size), "inclusion proof")
    # 2. compute (RFC 9162 2.1.3.2 steps 2-5)
    fn, sn, r = index, size - 1, bytes(leaf_hash)
    for p in proof:
        if sn == 0:  # unreachable after the shape check; kept as in the RFC
            raise ProofShapeError("inclusion proof is longer than the path")
        if fn & 1 or fn == sn:
            r = _sha256(NODE_PREFIX + p + r).digest()
            if not fn & 1:
                while fn and not fn & 1:
                    fn >>= 1
                    sn >>= 1
        else:
            r = _sha256(NODE_PREFIX + r + p).digest()
        fn >>= 1
        sn >>= 1
    if sn != 0:
        raise ProofShapeError("inclusion proof is shorter than the path")
    # 3. compare
    if r != root:
        raise RootMismatchError(f"inclusion proof for leaf {index} of {size}", expected=bytes(root), calculated=r)


def consistency_proof_length(old_size: int, new_size: int) -> int:
    """How many hashes a consistency proof from ``old_size`` to ``new_size`` has (0 < old_size < new_size)."""
    shift = (old_size & -old_size).bit_length() - 1  # trailing zero bits of old_size
    inner = inclusion_proof_length(old_size - 1, new_size)
    return (0 if old_size == 1 << shift else 1) + inner - shift


def verify_consistency(old_size: int, new_size: int, old_root: bytes, new_root: bytes,
                       proof: Sequence[bytes]) -> None:
    """Check that the tree of ``new_size`` leaves with ``new_root`` extends the one of ``old_size`` with ``old_root``.

    RFC 9162 section 2.1.4.2. Steps:
      1. shape: 0 <= old_size <= new_size; hashes are 32 bytes; for equal sizes the proof is empty and the roots
         are equal; for old_size 0 the proof is empty (every tree extends the empty one); otherwise the proof has
         exactly the number of components the two sizes call for;
      2. compute both roots from the proof;
      3. compare them with ``old_root`` and ``new_root``.

    Raises:
        ProofShapeError: step 1 failed (nothing was hashed), including a new size below the old one.
        RootMismatchError: step 3 failed; ``which`` says which root; carries expected and calculated roots.
    """
    # 1. shape
    _check_size(old_size, "old size")
    _check_size(new_size, "new size")
    if new_size < old_size:
        raise ProofShapeError(f"new size {new_size} is smaller than old size {old_size}: a log only grows")
    _check_hash(old_root, "old root")
    _check_hash(new_root, "new root")
    what = f"consistency proof from {old_size} to {new_size}"
    if old_size == new_size:
        _check_proof(proof, 0, what)
        if old_root != new_root:
            raise RootMismatchError(f"two trees of size {old_size}", expected=bytes(old_root),
                                    calculated=bytes(new_root), which="new root")
        return
    if old_size == 0:
        _check_proof(proof, 0, what)
        return
    _check_proof(proof, consistency_proof_length(old_size, new_size), what)
    # 2. compute (RFC 9162 2.1.4.2 steps 2-7)
    path = list(proof)
    if old_size & (old_size - 1) == 0:  # old_size is a power of two: its root is a node of the new tree
        path.insert(0, bytes(old_root))
    fn, sn = old_size - 1, new_size - 1
    while fn & 1:
        fn >>= 1
        sn >>= 1
    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0:  # unreachable after the shape check; kept as in the RFC
            raise ProofShapeError(f"{what} is longer than the path")
        if fn & 1 or fn == sn:
            fr = _sha256(NODE_PREFIX + c + fr).digest()
            sr = _sha256(NODE_PREFIX + c + sr).digest()
            if not fn & 1:
                while fn and not fn & 1:
                    fn >>= 1
                    sn >>= 1
        else:
            sr = _sha256(NODE_PREFIX + sr + c).digest()
        fn >>= 1
        sn >>= 1
    if sn != 0:
        raise ProofShapeError(f"{what} is shorter than the path")
    # 3. compare
    if fr != old_root:
        raise RootMismatchError(what, expected=bytes(old_root), calculated=fr, which="old root")
    if sr != new_root:
        raise RootMismatchError(what, expected=bytes(new_root), calculated=sr, which="new root")
