"""RFC 8785 (JCS) canonical JSON: the RFC's own samples, then what must be refused."""

from __future__ import annotations

import json
import math
import struct

import pytest

from compliance.canonical import MAX_SAFE_INTEGER, canonical_json, format_number, is_canonical, parse_canonical
from fedsilo.errors import ConfigError

# RFC 8785 Appendix B: IEEE 754 bit patterns and their canonical text.
APPENDIX_B = [
    ("0000000000000000", "0"),
    ("8000000000000000", "0"),
    ("0000000000000001", "5e-324"),
    ("8000000000000001", "-5e-324"),
    ("7fefffffffffffff", "1.7976931348623157e+308"),
    ("ffefffffffffffff", "-1.7976931348623157e+308"),
    ("4340000000000000", "9007199254740992"),
    ("c340000000000000", "-9007199254740992"),
    ("4430000000000000", "295147905179352830000"),
    ("44b52d02c7e14af5", "9.999999999999997e+22"),
    ("44b52d02c7e14af6", "1e+23"),
    ("44b52d02c7e14af7", "1.0000000000000001e+23"),
    ("444b1ae4d6e2ef4e", "999999999999999700000"),
    ("444b1ae4d6e2ef4f", "999999999999999900000"),
    ("444b1ae4d6e2ef50", "1e+21"),
    ("3eb0c6f7a0b5ed8c", "9.999999999999997e-7"),
    ("3eb0c6f7a0b5ed8d", "0.000001"),
    ("41b3de4355555553", "333333333.3333332"),
    ("41b3de4355555554", "333333333.33333325"),
    ("41b3de4355555555", "333333333.3333333"),
    ("41b3de4355555556", "333333333.3333334"),
    ("41b3de4355555557", "333333333.33333343"),
    ("becbf647612f3696", "-0.0000033333333333333333"),
    ("43143ff3c1cb0959", "1424953923781206.2"),
]


def _double(bits: str) -> float:
    return struct.unpack(">d", bytes.fromhex(bits))[0]


@pytest.mark.parametrize(("bits", "text"), APPENDIX_B)
def test_rfc8785_appendix_b_numbers(bits: str, text: str) -> None:
    assert format_number(_double(bits)) == text
    assert canonical_json({"n": _double(bits)}) == b'{"n":' + text.encode() + b"}"


@pytest.mark.parametrize(("bits", "name"), [("7fffffffffffffff", "NaN"), ("7ff0000000000000", "Infinity")])
def test_rfc8785_appendix_b_non_numbers_are_refused(bits: str, name: str) -> None:
    with pytest.raises(ConfigError, match=r"at \$\.n is not a JSON number"):
        canonical_json({"n": _double(bits)})


@pytest.mark.parametrize(("value", "text"), [
    (1.0, "1"), (-1.5, "-1.5"), (1e21, "1e+21"), (1e20, "100000000000000000000"), (1e-7, "1e-7"), (1e-6, "0.000001"),
    (0.1, "0.1"), (123.456, "123.456"), (1.5e300, "1.5e+300"), (4.50, "4.5"), (2e-3, "0.002"),
])
def test_number_layout(value: float, text: str) -> None:
    assert format_number(value) == text


def test_rfc8785_section_3_2_2_sample() -> None:
    # The input of RFC 8785 section 3.2.2, and the output it gives.
    source = (r'{"numbers": [333333333.33333329, 1E30, 4.50, 2e-3, 0.000000000000000000000000001],'
              r' "string": "\u20ac$\u000F\u000aA'"'"r'\u0042\u0022\u005c\\\"\/", "literals": [null, true, false]}')
    expected = ('{"literals":[null,true,false],"numbers":[333333333.3333333,1e+30,4.5,0.002,1e-27],'
                '"string":"\u20ac$\\u000f\\nA\'B\\"\\\\\\\\\\"/"}').encode()
    assert canonical_json(json.loads(source)) == expected
    assert is_canonical(expected)


def test_rfc8785_section_3_2_3_keys_sort_by_utf16_code_units() -> None:
    # U+1F600 is the surrogate pair D83D DE00, so it sorts before U+FB33 (code point order would put it last).
    obj = {"\u20ac": "Euro Sign", "\r": "Carriage Return", "\ufb33": "Hebrew Letter Dalet With Dagesh", "1": "One",
           "\U0001f600": "Emoji: Grinning Face", "\u0080": "Control", "\u00f6": "Latin Small Letter O With Diaeresis"}
    keys = list(json.loads(canonical_json(obj)))
    assert keys == ["\r", "1", "\u0080", "\u00f6", "\u20ac", "\U0001f600", "\ufb33"]


def test_strings_escape_as_ecmascript_does() -> None:
    text = "\x00\x1f\x7f\u2028/\"\\\b\t\n\f\ré"
    assert canonical_json(text) == b'"\\u0000\\u001f\x7f\xe2\x80\xa8/\\"\\\\\\b\\t\\n\\f\\r\xc3\xa9"'


def test_nested_values_and_no_whitespace() -> None:
    assert canonical_json({"b": [1, {"d": None, "c": True}], "a": (False, "x")}) == \
        b'{"a":[false,"x"],"b":[1,{"c":true,"d":null}]}'


def test_integers_as_is_within_the_i_json_range() -> None:
    assert canonical_json([0, -1, MAX_SAFE_INTEGER, -MAX_SAFE_INTEGER]) == b"[0,-1,9007199254740991,-9007199254740991]"
    with pytest.raises(ConfigError, match=r"integer 9007199254740992 at \$\[0\] is outside the I-JSON range"):
        canonical_json([MAX_SAFE_INTEGER + 1])


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_floats_are_refused_naming_the_key_path(value: float) -> None:
    with pytest.raises(ConfigError, match=r"at \$\.details\.loss is not a JSON number"):
        canonical_json({"details": {"loss": value}})


@pytest.mark.parametrize(("value", "path"), [
    ({"blob": b"\x00"}, r"bytes at \$\.blob"),
    ({"s": {1, 2}}, r"set at \$\.s"),
    ([object()], r"object at \$\[0\]"),
    ({1: "one"}, r"key 1 at \$ is a int"),
    ({"k": "\ud800"}, r"lone surrogate"),
])
def test_non_json_values_are_refused(value: object, path: str) -> None:
    with pytest.raises(ConfigError, match=path):
        canonical_json(value)


def test_parse_canonical_returns_the_value() -> None:
    assert parse_canonical(b'{"a":1,"b":[1.5,"x"]}') == {"a": 1, "b": [1.5, "x"]}


@pytest.mark.parametrize("data", [
    b'{"a":1,"b":2}', b'"\xe2\x82\xac"', b"[]", b"0", b"1e+21", b"-0.5",
])
def test_is_canonical_accepts_canonical_bytes(data: bytes) -> None:
    assert is_canonical(data)


@pytest.mark.parametrize("data", [
    b'{"a": 1}',          # whitespace
    b'{"b":1,"a":2}',     # key order
    b'{"a":1,"a":1}',     # duplicate key
    b"1.0",               # number layout
    b"1E+21",
    b"-0",
    b'"\\u20ac"',         # escaped where JCS writes the character
    b'"\\/"',
    b"NaN",
    b"[9007199254740992]",  # beyond I-JSON
    b"\xef\xbb\xbf[]",    # byte order mark
    b"[]\n",              # trailing newline
    b"\xff",              # not UTF-8
    b"",
    b"[" * 100_000,       # nesting deep enough to exhaust the parser
])
def test_is_canonical_refuses_anything_else(data: bytes) -> None:
    assert not is_canonical(data)
