"""The fast paths must never accept what the thorough paths refuse.

- ``canonical_json`` writes plain values with the C encoder; it must give the pure-Python RFC 8785 writer's bytes.
- The verifier checks records with one compiled pattern; whatever it accepts must be canonical JSON (the
  parse-and-reserialize check), a valid record (the schema check), and yield the same fields.
Random values, records and mutations of records (seeded, so failures reproduce) compare the two sides.
"""

from __future__ import annotations

import hashlib
import json
import random
import sqlite3
from pathlib import Path

import pytest

from compliance import AuditVerificationError, canonical_json, verify_log
from compliance.audit_log import DB_NAME
from compliance.canonical import _canonical_slow, parse_canonical
from compliance.records import EVENT_TYPES, check_record, make_record
from compliance.verify import _RECORD, _fast_fields
from fedsilo.errors import ConfigError

FLOATS = [0.0, -0.0, 1.0, -1.0, 0.5, 0.1, 1 / 3, 2 / 3, 1e-4, 1.5e-4, 1e-5, 1e-6, 1e-7, 123456.789, 1e15, 1e16,
          1.5e16, 1e20, 1e21, 1e22, 5e-324, 1.7976931348623157e308, 0.30000000000000004, 4.35, 0.5003000000000001,
          333333333.33333329, 9007199254740993.0, -2.5e-8, float("nan"), float("inf")]
INTS = [0, 1, -1, 7, 10**15, 2**53 - 1, -(2**53 - 1), 2**53, -(2**53), 10**20]
STRINGS = ["", "a", "hospital0", 'quote"', "back\\slash", "tab\t", "nl\n", "\x00\x1f\x7f", "é", "€", "\ud83d\ude00",
           "\U0001f600", "\ue000", "\ud800", "a/b", "</script>", "\u2028"]


def _value(rng: random.Random, depth: int = 0):
    kind = rng.randrange(8 if depth < 3 else 5)
    if kind == 0:
        return rng.choice(FLOATS + [rng.uniform(-1e6, 1e6), rng.random() * 10 ** rng.randint(-8, 22)])
    if kind == 1:
        return rng.choice(INTS + [rng.randint(-10**6, 10**6)])
    if kind == 2:
        return rng.choice(STRINGS) + rng.choice(STRINGS)
    if kind == 3:
        return rng.choice([None, True, False])
    if kind == 4:
        return rng.choice(STRINGS)
    if kind == 5:
        return [_value(rng, depth + 1) for _ in range(rng.randrange(4))]
    if kind == 6:
        return tuple(_value(rng, depth + 1) for _ in range(rng.randrange(3)))
    keys = ["a", "b", "B", "z", "é", "\ue000", "\U0001f600", "\U0001f601", "10", "1", "", "key"]
    return {rng.choice(keys) + rng.choice(["", "x", "\U0001f600"]): _value(rng, depth + 1) for _ in range(rng.randrange(5))}


def _encode(value) -> bytes | str:
    try:
        return canonical_json(value)
    except ConfigError as exc:
        return "error: " + exc.message


def _encode_slow(value) -> bytes | str:
    try:
        return _canonical_slow(value)
    except ConfigError as exc:
        return "error: " + exc.message


def test_canonical_json_fast_path_equals_the_rfc8785_writer() -> None:
    rng = random.Random(8785)
    for _ in range(5000):
        value = _value(rng)
        assert _encode(value) == _encode_slow(value), repr(value)


@pytest.mark.parametrize("value", FLOATS + INTS + STRINGS)
def test_canonical_json_fast_path_on_every_edge_value(value) -> None:
    assert _encode(value) == _encode_slow(value)
    assert _encode({"k": [value]}) == _encode_slow({"k": [value]})


def test_non_bmp_keys_sort_by_utf16_code_units() -> None:
    # U+E000 sorts after U+1F600 in UTF-16 (surrogates D83D...), before it by code point: the fast path must step aside.
    assert canonical_json({"\ue000": 1, "\U0001f600": 2}) == '{"\U0001f600":2,"\ue000":1}'.encode()


# --- the verifier's record pattern --------------------------------------------------------------------------

ACTORS = [{"kind": "coordinator", "id": "coordinator"}, {"kind": "silo", "id": "h0", "site": "hospital0"},
          {"kind": "silo", "id": "é", "site": "x\ty"},
          {"kind": "person", "id": "officer1", "site": "hospital0", "role": "site-officer", "key": "ed25519:" + "0f" * 32}]
OBJECTS = [None, {"type": "update", "id": "h0/1", "sha256": "ab" * 32}, {"type": "plan", "id": "p", "sha256": None}]


def _record(rng: random.Random, seq: int) -> dict:
    details = rng.choice([None, {}, {"nodes": 3}, {"l2_norm": rng.choice(FLOATS[:28]), "site": "h0"},
                          {"bytes": rng.choice(INTS[:7]), "a": True, "z": None}, {"nested": {"x": [1, 2]}},
                          {"b": rng.uniform(0, 1), "a": "quote\"d", "c": -rng.uniform(0, 100)},
                          {"k" + str(i): i for i in range(rng.randrange(12))}])
    if details is not None:
        details = {k: v for k, v in details.items() if not (isinstance(v, float) and v != v)}
    return make_record(rng.choice(sorted(EVENT_TYPES)), seq=seq, prev=hashlib.sha256(str(seq).encode()).hexdigest(),
                       actor=rng.choice(ACTORS), object=rng.choice(OBJECTS), run_id=rng.choice([None, "run-1"]),
                       round=rng.choice([None, 0, 7, 10**14]), outcome=rng.choice(["success", "failure", "denied"]),
                       reason=rng.choice([None, "why", "a\nb"]), details=details)


def _mutations(rng: random.Random, leaf: bytes) -> list[bytes]:
    text = leaf.decode("utf-8")
    out = []
    for _ in range(6):  # random single-byte edits
        i = rng.randrange(len(leaf))
        out.append(leaf[:i] + bytes([rng.randrange(32, 127)]) + leaf[i + 1:])
        out.append(leaf[:i] + leaf[i + 1:])
        out.append(leaf[:i] + rng.choice([b" ", b"0", b"\\", b'"', b",", b"1", b"e", b"."]) + leaf[i:])
    for old, new in [(":1,", ":1.0,"), (":3}", ":3.0}"), (":3}", ":03}"), (":0,", ":-0,"), (":7,", ":7e0,"),
                     ('"a":', '"\\u0061":'), ("/", "\\/"), ('","', '", "'), ("{", "{ "), ('"site":', '"site" :'),
                     (":null", ":nuLL"), (":true", ":True"), ("\\n", "\\u000a"), ("\\t", "\\u0009"), ("é", "\\u00e9"),
                     ('"nodes":3', '"nodes":3,"nodes":3'), ('"a":', '"b":'), ('"z":', '"a":'), ("success", "Success"),
                     ("0.", "00."), ('"l2_norm":', '"l2_norm":-'), ("}", "} ")]:
        if old in text:
            out.append(text.replace(old, new, 1).encode())
    return out


def _thorough(leaf: bytes, seq: int):
    try:
        record = parse_canonical(leaf)
        check_record(record)
    except ConfigError:
        return None
    return (record["event"].encode(), record["prev"].encode(), str(record["seq"]).encode(), record["time"].encode())


def test_the_record_pattern_accepts_only_canonical_valid_records() -> None:
    rng = random.Random(6962)
    accepted_fast = 0
    for i in range(1500):
        leaf = canonical_json(_record(rng, i))
        for candidate in [leaf, *_mutations(rng, leaf)]:
            m = _RECORD.fullmatch(candidate)
            fast = _fast_fields(m, set()) if m else None
            if fast is not None:
                accepted_fast += 1
                assert fast == _thorough(candidate, i), candidate
    assert accepted_fast > 1000  # the fast path does carry most valid records


def _log_with(tmp_path: Path, make_log, leaf_edit) -> Path:
    path = make_log(5)
    with sqlite3.connect(path / DB_NAME) as conn:
        leaf = bytes(conn.execute("SELECT leaf FROM records WHERE seq = 2").fetchone()[0])
        new = leaf_edit(leaf)
        assert new != leaf
        conn.execute("UPDATE records SET leaf = ?, hash = ? WHERE seq = 2", (new, hashlib.sha256(new).hexdigest()))
    return path


@pytest.mark.parametrize(("old", "new"), [
    (b'"nodes":3', b'"nodes":3.0'),  # an integral float
    (b'"nodes":3', b'"nodes":3e0'),
    (b'"nodes":3', b'"nodes":03'),
    (b'"nodes":3', b'"nodes": 3'),  # whitespace
    (b'"nodes":3', b'"nodes":3,"nodes":3'),  # a duplicate key
    (b'"nodes":3', b'"zz":1,"nodes":3'),  # keys out of order
    (b'"run_id":"run-1"', b'"run_id":"\\u0072un-1"'),  # an unneeded escape
    (b'"outcome"', b'"outcom\\u0065"'),
    (b'"schema":2', b'"schema":2.0'),
])
def test_non_canonical_json_is_caught_at_its_seq(tmp_path: Path, make_log, old: bytes, new: bytes) -> None:
    path = _log_with(tmp_path, make_log, lambda leaf: leaf.replace(old, new, 1))
    with pytest.raises(AuditVerificationError) as info:
        verify_log(path)
    assert info.value.seq == 2 and info.value.reason.startswith(("leaf is not canonical JSON", "leaf is not JSON"))


def test_a_canonical_record_the_pattern_does_not_cover_still_verifies(tmp_path: Path, make_log) -> None:
    # Non-ASCII, nested details and floats below 1e-4 take the full path, and pass it.
    def edit(leaf: bytes) -> bytes:
        record = json.loads(leaf)
        record["details"] = {"site": "Hôpital", "tiny": 1e-7, "nested": {"list": [1, 2.5]}}
        return canonical_json(record)

    path = _log_with(tmp_path, make_log, edit)
    with sqlite3.connect(path / DB_NAME) as conn:  # repair the next link, as the writer would have made it
        leaf2 = bytes(conn.execute("SELECT leaf FROM records WHERE seq = 2").fetchone()[0])
        record = json.loads(bytes(conn.execute("SELECT leaf FROM records WHERE seq = 3").fetchone()[0]))
        record["prev"] = hashlib.sha256(leaf2).hexdigest()
        leaf3 = canonical_json(record)
        conn.execute("UPDATE records SET leaf = ?, hash = ? WHERE seq = 3", (leaf3, hashlib.sha256(leaf3).hexdigest()))
        record = json.loads(bytes(conn.execute("SELECT leaf FROM records WHERE seq = 4").fetchone()[0]))
        record["prev"] = hashlib.sha256(leaf3).hexdigest()
        leaf4 = canonical_json(record)
        conn.execute("UPDATE records SET leaf = ?, hash = ? WHERE seq = 4", (leaf4, hashlib.sha256(leaf4).hexdigest()))
    assert b"\\u" not in leaf2 and "Hôpital".encode() in leaf2
    assert verify_log(path).records == 5
