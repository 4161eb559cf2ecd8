"""compliance.merkle against RFC 6962 test vectors, a naive reference, and a generator of corrupted proofs.

Where the vectors come from
---------------------------
- ``LEAVES``, ``ROOTS``, ``INCLUSION`` and ``CONSISTENCY`` are the vectors of transparency-dev/merkle,
  ``proof/verify_test.go`` (commit 02194e9afb6c1d95b5381350007963aa70fff472; the same values feed the JSON files
  under ``testdata/`` that ``cmd/proofgen/main.go`` writes). They go back to the Certificate Transparency
  reference tests: eight leaves (the empty string, 00, 10, 2021, 3031, 40414243, 5051525354555657,
  606162636465666768696a6b6c6d6e6f); ``ROOTS[i]`` is MTH of the first i+1 leaves with SHA-256 and the
  RFC 6962 prefixes; the proofs are PATH(m, D[n]) and PROOF(m, D[n]) of RFC 6962 sections 2.1.1-2.1.2 (Go
  indexes are 1-based in the vector tables, as here).
- The hasher vectors are transparency-dev/merkle ``rfc6962/rfc6962_test.go``, each derived by the shell
  command written next to it (``echo -n 004C313233343536 | xxd -r -p | sha256sum`` and so on).
- ``_naive_mth`` is RFC 6962 section 2.1 written out recursively; the streaming root and the proof builders
  are checked against it for every size up to 70 (and roots up to 300).

The corruption generator mirrors ``corruptInclusionProof`` / ``corruptConsistencyProof`` of verify_test.go and
adds the padded proofs of this project's brief: every corrupted probe must be rejected with a MerkleError.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import pytest

from compliance import merkle
from compliance.merkle import MerkleError, ProofShapeError, RootMismatchError
from fedsilo.errors import VerificationError


def dh(text: str) -> bytes:
    return bytes.fromhex(text)


LEAVES = [dh(""), dh("00"), dh("10"), dh("2021"), dh("3031"), dh("40414243"), dh("5051525354555657"),
          dh("606162636465666768696a6b6c6d6e6f")]
ROOTS = [dh(h) for h in (
    "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
    "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
    "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
    "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
    "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
    "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
)]
# (leaf number, 1-based; tree size; proof)
INCLUSION = [
    (1, 1, []),
    (1, 8, [dh("96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7"),
            dh("5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e"),
            dh("6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4")]),
    (6, 8, [dh("bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b"),
            dh("ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0"),
            dh("d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7")]),
    (3, 3, [dh("fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125")]),
    (2, 5, [dh("6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d"),
            dh("5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e"),
            dh("bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b")]),
]
# (old size, new size, proof)
CONSISTENCY = [
    (1, 1, []),
    (1, 8, [dh("96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7"),
            dh("5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e"),
            dh("6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4")]),
    (6, 8, [dh("0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a"),
            dh("ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0"),
            dh("d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7")]),
    (2, 5, [dh("5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e"),
            dh("bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b")]),
    (6, 7, [dh("0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a"),
            dh("b08693ec2e721597130641e8211e7eedccb4c26413963eee6c1e2ed16ffb1a5f"),
            dh("d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7")]),
]
SOME_HASH = dh("abacaba000000000000000000000000000000000000000000060061e00123456")
EMPTY_TREE_HASH = dh("e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855")
LEAF_HASHES = [merkle.leaf_hash(leaf) for leaf in LEAVES]


def _naive_mth(hashes: list[bytes]) -> bytes:
    """RFC 6962 section 2.1, literally."""
    if not hashes:
        return hashlib.sha256(b"").digest()
    if len(hashes) == 1:
        return hashes[0]
    k = 1
    while k * 2 < len(hashes):
        k *= 2
    return merkle.node_hash(_naive_mth(hashes[:k]), _naive_mth(hashes[k:]))


MANY = [merkle.leaf_hash(i.to_bytes(2, "big")) for i in range(300)]


# --- hashing -----------------------------------------------------------------------------------------------


def test_rfc6962_hasher_vectors() -> None:
    assert merkle.EMPTY_ROOT.hex() == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"  # echo -n | sha256sum
    assert merkle.leaf_hash(b"").hex() == "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d"
    assert merkle.leaf_hash(b"L123456").hex() == "395aa064aa4c29f7010acfe3f25db9485bbd4b91897b6ad7ad547639252b4d56"
    assert merkle.node_hash(b"N123", b"N456").hex() == "aa217fe888e47007fa15edab33c2b492a722cb106c64667fc2b044444de66bbb"


def test_leaf_and_node_hashes_are_domain_separated() -> None:
    h1, h2 = merkle.leaf_hash(b"Hello"), merkle.leaf_hash(b"World")
    assert h1 != h2
    assert merkle.node_hash(h1, h2) != merkle.leaf_hash(h1 + h2)  # second-preimage resistance
    assert merkle.node_hash(h1, h2) != merkle.node_hash(h2, h1)


@pytest.mark.parametrize("n", range(1, 9))
def test_roots_of_the_reference_vectors(n: int) -> None:
    assert merkle.root(LEAF_HASHES[:n]) == ROOTS[n - 1]


def test_the_streaming_root_is_rfc6962_mth_for_every_size() -> None:
    for n in range(0, 300):
        assert merkle.root(MANY[:n]) == _naive_mth(MANY[:n]), n


def test_compact_ranges_join_at_aligned_boundaries() -> None:
    for total in (0, 1, 5, 64, 65, 100, 129, 255, 256, 300):
        for chunk in (1, 2, 4, 8, 32, 64):
            tree = merkle.CompactRange()
            for start in range(0, total, chunk):
                part = merkle.CompactRange()
                part.extend(MANY[start:min(total, start + chunk)])
                tree.extend_aligned(part)
            assert (tree.size, tree.root()) == (total, _naive_mth(MANY[:total]))
    misaligned = merkle.CompactRange()
    misaligned.extend(MANY[:3])
    part = merkle.CompactRange()
    part.extend(MANY[3:7])
    with pytest.raises(ValueError, match="cannot be joined"):
        misaligned.extend_aligned(part)


def test_root_of_a_million_leaves_streams_in_constant_memory() -> None:
    # A compact range of n leaves holds popcount(n) hashes: 7 for 10**6, whatever the order of appends.
    tree = merkle.CompactRange()
    leaf = merkle.leaf_hash(b"x")
    for _ in range(10**6):
        tree.append(leaf)
    assert len(tree.hashes()) == bin(10**6).count("1") == 7
    # Equal leaves: a perfect tree of 2**k equal leaves has a root computable by k doublings.
    level = leaf
    for _ in range(19):
        level = merkle.node_hash(level, level)
    assert tree.hashes()[0] == level  # the 2**19-leaf subtree


# --- proofs ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("leaf", "size", "proof"), INCLUSION)
def test_inclusion_proofs_of_the_reference_vectors(leaf: int, size: int, proof: list[bytes]) -> None:
    assert merkle.inclusion_proof(leaf - 1, LEAF_HASHES[:size]) == proof
    merkle.verify_inclusion(leaf - 1, size, LEAF_HASHES[leaf - 1], proof, ROOTS[size - 1])


@pytest.mark.parametrize(("old", "new", "proof"), CONSISTENCY)
def test_consistency_proofs_of_the_reference_vectors(old: int, new: int, proof: list[bytes]) -> None:
    assert merkle.consistency_proof(old, new, LEAF_HASHES) == proof
    merkle.verify_consistency(old, new, ROOTS[old - 1], ROOTS[new - 1], proof)


def test_every_proof_of_small_trees_verifies_and_has_the_predicted_length() -> None:
    for n in range(1, 70):
        root = _naive_mth(MANY[:n])
        for i in range(n):
            proof = merkle.inclusion_proof(i, MANY[:n])
            assert len(proof) == merkle.inclusion_proof_length(i, n)
            merkle.verify_inclusion(i, n, MANY[i], proof, root)
        for old in range(0, n + 1):
            proof = merkle.consistency_proof(old, n, MANY)
            if 0 < old < n:
                assert len(proof) == merkle.consistency_proof_length(old, n)
            merkle.verify_consistency(old, n, _naive_mth(MANY[:old]), root, proof)


def test_the_single_entry_tree() -> None:
    # transparency-dev TestVerifyInclusionSingleEntry: the root of one leaf is its hash, the proof is empty.
    h = merkle.leaf_hash(b"data")
    merkle.verify_inclusion(0, 1, h, [], h)
    for root, leaf in ((h, b""), (b"", h), (b"", b"")):
        with pytest.raises(MerkleError):
            merkle.verify_inclusion(0, 1, leaf, [], root)


@pytest.mark.parametrize(("index", "size"), [(0, 0), (0, 1), (1, 0), (2, 1)])
def test_inclusion_probes_without_a_proof(index: int, size: int) -> None:
    # transparency-dev TestVerifyInclusion: none of these verifies.
    for leaf, root in ((SOME_HASH, b""), (b"", EMPTY_TREE_HASH), (SOME_HASH, EMPTY_TREE_HASH)):
        with pytest.raises(MerkleError):
            merkle.verify_inclusion(index, size, leaf, [], root)


# transparency-dev TestVerifyConsistency, with 32-byte stand-ins for its "don't care" roots (this module checks
# hash lengths first, so a 12-byte root is refused for its shape whatever else holds).
R1, R2 = hashlib.sha256(b"don't care 1").digest(), hashlib.sha256(b"don't care 2").digest()


@pytest.mark.parametrize(("old", "new", "root1", "root2", "proof", "ok"), [
    (0, 0, R1, R2, [], False),
    (1, 1, R1, R2, [], False),
    (0, 0, R1, R1, [], True),  # sizes that are always consistent
    (0, 1, R1, R2, [], True),
    (1, 1, R2, R2, [], True),
    (1, 0, R1, R2, [], False),  # time travel to the past
    (2, 1, R1, R2, [], False),
    (1, 2, R1, R2, [], False),  # empty proof
    (0, 0, EMPTY_TREE_HASH, R2, [], False),  # roots don't match
    (1, 1, EMPTY_TREE_HASH, R2, [], False),
    (0, 0, EMPTY_TREE_HASH, EMPTY_TREE_HASH, [EMPTY_TREE_HASH], False),  # roots match, proof not empty
    (0, 1, EMPTY_TREE_HASH, EMPTY_TREE_HASH, [EMPTY_TREE_HASH], False),
    (1, 1, EMPTY_TREE_HASH, EMPTY_TREE_HASH, [EMPTY_TREE_HASH], False),
])
def test_consistency_edge_cases(old: int, new: int, root1: bytes, root2: bytes, proof: list[bytes], ok: bool) -> None:
    if ok:
        merkle.verify_consistency(old, new, root1, root2, proof)
    else:
        with pytest.raises(MerkleError):
            merkle.verify_consistency(old, new, root1, root2, proof)


# --- corrupted proofs --------------------------------------------------------------------------------------


def _flip(proof: list[bytes], i: int, mask: int) -> list[bytes]:
    wrong = list(proof)
    wrong[i] = bytes([wrong[i][0] ^ mask]) + wrong[i][1:]
    return wrong


def corrupt_inclusion(index: int, size: int, leaf: bytes, proof: list[bytes],
                      root: bytes) -> Iterator[tuple[str, tuple]]:
    """Probes (description, verify_inclusion arguments) that must all fail; from a valid proof."""
    yield "index - 1", (index - 1, size, leaf, proof, root)
    yield "index + 1", (index + 1, size, leaf, proof, root)
    yield "index ^ 2", (index ^ 2, size, leaf, proof, root)
    yield "size * 2", (index, size * 2, leaf, proof, root)
    yield "size / 2", (index, size // 2, leaf, proof, root)
    yield "wrong leaf", (index, size, b"WrongLeaf", proof, root)
    yield "other leaf", (index, size, hashlib.sha256(b"other").digest(), proof, root)
    yield "empty root", (index, size, leaf, proof, EMPTY_TREE_HASH)
    yield "random root", (index, size, leaf, proof, SOME_HASH)
    yield "trailing garbage", (index, size, leaf, [*proof, b""], root)
    yield "trailing root", (index, size, leaf, [*proof, root], root)
    yield "preceding garbage", (index, size, leaf, [b"", *proof], root)
    yield "preceding root", (index, size, leaf, [root, *proof], root)
    yield "padded with a zero hash", (index, size, leaf, [*proof, bytes(32)], root)
    yield "a component one byte long", (index, size, leaf, [p + b"\0" for p in proof] or [b"\0"], root)
    for i in range(len(proof)):
        yield f"proof[{i}] bit 3 flipped", (index, size, leaf, _flip(proof, i, 8), root)
    if proof:
        yield "removed component", (index, size, leaf, proof[:-1], root)
        yield "removed first component", (index, size, leaf, proof[1:], root)
    if len(proof) > 1:
        yield "inserted component", (index, size, leaf, [proof[0], SOME_HASH, *proof[1:]], root)
        yield "two components swapped", (index, size, leaf, [proof[1], proof[0], *proof[2:]], root)


def corrupt_consistency(old: int, new: int, root1: bytes, root2: bytes,
                        proof: list[bytes]) -> Iterator[tuple[str, tuple]]:
    """Probes (description, verify_consistency arguments) that must all fail; from a valid, non-empty proof."""
    yield "old - 1", (old - 1, new, root1, root2, proof)
    yield "old + 1", (old + 1, new, root1, root2, proof)
    yield "old ^ 2", (old ^ 2, new, root1, root2, proof)
    yield "new * 2", (old, new * 2, root1, root2, proof)
    yield "new / 2", (old, new // 2, root1, root2, proof)
    yield "wrong old root", (old, new, b"WrongRoot", root2, proof)
    yield "wrong new root", (old, new, root1, b"WrongRoot", proof)
    yield "other old root", (old, new, SOME_HASH, root2, proof)
    yield "other new root", (old, new, root1, SOME_HASH, proof)
    yield "swapped roots", (old, new, root2, root1, proof)
    yield "empty proof", (old, new, root1, root2, [])
    yield "trailing garbage", (old, new, root1, root2, [*proof, b""])
    yield "trailing root1", (old, new, root1, root2, [*proof, root1])
    yield "trailing root2", (old, new, root1, root2, [*proof, root2])
    yield "preceding garbage", (old, new, root1, root2, [b"", *proof])
    yield "preceding root1", (old, new, root1, root2, [root1, *proof])
    yield "preceding root2", (old, new, root1, root2, [root2, *proof])
    yield "preceding proof[0]", (old, new, root1, root2, [proof[0], *proof])
    yield "padded with a zero hash", (old, new, root1, root2, [*proof, bytes(32)])
    yield "padded in front with a zero hash", (old, new, root1, root2, [bytes(32), *proof])
    yield "truncated proof", (old, new, root1, root2, proof[:-1])
    yield "removed first component", (old, new, root1, root2, proof[1:])
    for i in range(len(proof)):
        yield f"proof[{i}] bit 4 flipped", (old, new, root1, root2, _flip(proof, i, 16))
    if len(proof) > 1:
        yield "two components swapped", (old, new, root1, root2, [proof[1], proof[0], *proof[2:]])


def _accepted(verify, probes: Iterator[tuple[str, tuple]]) -> list[str]:
    wrong = []
    for desc, args in probes:
        try:
            verify(*args)
        except MerkleError:
            continue
        wrong.append(desc)
    return wrong


@pytest.mark.parametrize(("leaf", "size", "proof"), INCLUSION)
def test_every_corrupted_inclusion_proof_of_the_vectors_is_rejected(leaf: int, size: int, proof: list[bytes]) -> None:
    probes = corrupt_inclusion(leaf - 1, size, LEAF_HASHES[leaf - 1], proof, ROOTS[size - 1])
    assert _accepted(merkle.verify_inclusion, probes) == []


@pytest.mark.parametrize(("old", "new", "proof"), [c for c in CONSISTENCY if c[2]])
def test_every_corrupted_consistency_proof_of_the_vectors_is_rejected(old: int, new: int, proof: list[bytes]) -> None:
    probes = corrupt_consistency(old, new, ROOTS[old - 1], ROOTS[new - 1], proof)
    assert _accepted(merkle.verify_consistency, probes) == []


def test_every_corrupted_proof_of_generated_trees_is_rejected() -> None:
    for n in (2, 3, 5, 7, 8, 13, 16, 31, 33):
        root = merkle.root(MANY[:n])
        for i in range(n):
            proof = merkle.inclusion_proof(i, MANY[:n])
            probes = corrupt_inclusion(i, n, MANY[i], proof, root)
            assert _accepted(merkle.verify_inclusion, probes) == [], (i, n)
        for old in range(1, n):
            proof = merkle.consistency_proof(old, n, MANY)
            probes = corrupt_consistency(old, n, merkle.root(MANY[:old]), root, proof)
            assert _accepted(merkle.verify_consistency, probes) == [], (old, n)


# --- errors ------------------------------------------------------------------------------------------------


def test_a_root_mismatch_carries_expected_and_calculated_roots() -> None:
    proof = INCLUSION[1][2]
    with pytest.raises(RootMismatchError) as info:
        merkle.verify_inclusion(0, 8, LEAF_HASHES[0], proof, SOME_HASH)
    err = info.value
    assert (err.expected, err.calculated, err.which) == (SOME_HASH, ROOTS[7], "root")
    assert isinstance(err, VerificationError) and err.exit_code == 1
    assert f"expected {SOME_HASH.hex()[:16]}..., calculated {ROOTS[7].hex()[:16]}..." in str(err)


def test_a_consistency_mismatch_says_which_root() -> None:
    old, new, proof = CONSISTENCY[2]
    with pytest.raises(RootMismatchError) as info:
        merkle.verify_consistency(old, new, ROOTS[old - 1], SOME_HASH, proof)
    assert (info.value.which, info.value.expected, info.value.calculated) == ("new root", SOME_HASH, ROOTS[new - 1])


def test_the_shape_is_checked_before_any_hashing(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = merkle._sha256
    monkeypatch.setattr(merkle, "_sha256", lambda data=b"": calls.append(data) or real(data))
    old, new, proof = CONSISTENCY[1]
    with pytest.raises(ProofShapeError, match="has 4 hashes; a proof for these sizes has 3"):
        merkle.verify_consistency(old, new, ROOTS[old - 1], ROOTS[new - 1], [*proof, proof[0]])
    with pytest.raises(ProofShapeError, match="component 1 must be 32 bytes, not 31"):
        merkle.verify_inclusion(0, 8, LEAF_HASHES[0], [proof[0], proof[1][:31], proof[2]], ROOTS[7])
    with pytest.raises(ProofShapeError, match="new size 4 is smaller than old size 6"):
        merkle.verify_consistency(6, 4, ROOTS[5], ROOTS[3], [])
    assert calls == []


def test_building_proofs_for_impossible_sizes_is_refused() -> None:
    with pytest.raises(ProofShapeError):
        merkle.inclusion_proof(3, LEAF_HASHES[:3])
    with pytest.raises(ProofShapeError):
        merkle.consistency_proof(5, 4, LEAF_HASHES)
    with pytest.raises(ProofShapeError):
        merkle.consistency_proof(2, 9, LEAF_HASHES)
    assert merkle.consistency_proof(0, 5, LEAF_HASHES) == merkle.consistency_proof(5, 5, LEAF_HASHES) == []
