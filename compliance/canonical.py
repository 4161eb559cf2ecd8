"""Canonical JSON: RFC 8785, the JSON Canonicalization Scheme (JCS).

The bytes of an audit record are ``canonical_json(record)``, so the same record hashes the same
everywhere. Values are limited to I-JSON (RFC 7493): strings, finite numbers, integers within
+-(2**53 - 1), booleans, null, lists and objects with string keys.

- Objects: keys sorted by their UTF-16 code units (RFC 8785 section 3.2.3), no whitespace.
- Strings: ECMAScript ``JSON.stringify`` escaping (section 3.2.2.2), output as UTF-8.
- Numbers: ECMAScript ``Number.prototype.toString`` (section 3.2.2.3); NaN and Infinity are refused.

Speed: most values (plain dicts, lists, strings, safe integers, and floats that ``repr`` already writes the
ECMAScript way) are written by the standard library's C encoder, whose output is then byte-identical to
RFC 8785 (sorted keys, the same string escapes); everything else takes the pure-Python writer below, which
is also the one that explains errors. ``tests/compliance/test_canonical.py`` checks that both agree.
"""

from __future__ import annotations

import json
import math
from typing import Any

from fedsilo.errors import ConfigError

# RFC 7493 section 2.2: integers beyond this lose precision in an IEEE 754 double.
MAX_SAFE_INTEGER = 2**53 - 1

# RFC 8785 section 3.2.2.2: the two-character escapes; every other control character is \u00xx.
_SHORT_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r"}
_ESCAPES = str.maketrans({chr(c): f"\\u{c:04x}" for c in range(0x20)} | _SHORT_ESCAPES)


def canonical_json(obj: Any) -> bytes:
    """Serialize ``obj`` as RFC 8785 canonical JSON (UTF-8 bytes).

    Raises:
        ConfigError: a value is not I-JSON (NaN, Infinity, bytes, a large integer, a non-string key,
            a lone surrogate, ...); the message names the key path, e.g. ``details.loss``.
    """
    if _plain(obj):
        try:
            return _c_encode(obj).encode("utf-8")
        except (UnicodeEncodeError, ValueError, TypeError):
            pass  # a lone surrogate, say: the writer below names the path
    return _canonical_slow(obj)


def _canonical_slow(obj: Any) -> bytes:
    """The reference writer (pure Python): every value, and the error messages."""
    parts: list[str] = []
    _write(obj, "$", parts)
    return "".join(parts).encode("utf-8")


def parse_canonical(data: bytes) -> Any:
    """Parse ``data`` and return its value, raising unless ``data`` is exactly its canonical form.

    Raises:
        ConfigError: ``data`` is not UTF-8, not JSON, not I-JSON, or not byte-for-byte canonical.
    """
    try:
        value = json.loads(data.decode("utf-8"), parse_constant=_refuse_constant)
        canonical = canonical_json(value)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ConfigError(f"not JSON: {exc}") from None
    if canonical != data:
        at = next((i for i, (a, b) in enumerate(zip(canonical, data)) if a != b), min(len(canonical), len(data)))
        raise ConfigError(f"not canonical JSON (RFC 8785): first difference at byte {at}")
    return value


def is_canonical(data: bytes) -> bool:
    """True when ``data`` is canonical JSON (RFC 8785); the bool form of :func:`parse_canonical`."""
    try:
        parse_canonical(data)
    except ConfigError:
        return False
    return True


def format_number(value: float) -> str:
    """ECMAScript ``Number.prototype.toString`` for a finite double (RFC 8785 section 3.2.2.3).

    >>> [format_number(x) for x in (1.0, -0.0, 1e21, 1e20, 1e-7, 1e-6, 333333333.33333329)]
    ['1', '0', '1e+21', '100000000000000000000', '1e-7', '0.000001', '333333333.3333333']
    """
    if value == 0:
        return "0"
    if value < 0:
        return "-" + format_number(-value)
    # repr gives the shortest digits that round-trip, as ECMA-262 requires; only the layout differs.
    mantissa, _, exp = repr(value).partition("e")
    whole, _, frac = mantissa.partition(".")
    digits = (whole + frac).lstrip("0")
    n = int(exp or 0) + len(whole) - (len(whole + frac) - len(digits))  # value = 0.digits * 10**n
    digits = digits.rstrip("0")
    k = len(digits)
    if k <= n <= 21:
        return digits + "0" * (n - k)
    if 0 < n <= 21:
        return f"{digits[:n]}.{digits[n:]}"
    if -6 < n <= 0:
        return "0." + "0" * -n + digits
    sign = "+" if n > 0 else "-"
    head = digits if k == 1 else f"{digits[0]}.{digits[1:]}"
    return f"{head}e{sign}{abs(n - 1)}"


# The C encoder matches RFC 8785 for the values _plain accepts: keys sorted by code point (equal to UTF-16 order
# when no key holds a character beyond U+FFFF), the JSON.stringify string escapes (\b \t \n \f \r \" \\ and
# \u00xx in lowercase for other control characters), int via int.__repr__ and float via float.__repr__.
_c_encode = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode


def _plain(value: Any) -> bool:
    """True when the C encoder writes ``value`` exactly as RFC 8785 does (exact built-in types only)."""
    t = type(value)
    if t is str or value is None or t is bool:
        return True
    if t is int:
        return -MAX_SAFE_INTEGER <= value <= MAX_SAFE_INTEGER
    if t is float:
        # repr and ECMAScript print the same shortest digits; they differ in layout only for integral values
        # ("1.0" vs "1"), -0.0, and exponent forms, which repr uses below 1e-4 and from 1e16 (JS: 1e-6, 1e21).
        text = float.__repr__(value)
        return math.isfinite(value) and "e" not in text and not text.endswith(".0")
    if t is dict:
        for key, item in value.items():
            if type(key) is not str or (not key.isascii() and max(key) > "\uffff") or not _plain(item):
                return False
        return True
    if t is list or t is tuple:
        return all(_plain(item) for item in value)
    return False


def _write(value: Any, path: str, out: list[str]) -> None:
    if value is None:
        out.append("null")
    elif value is True:
        out.append("true")
    elif value is False:
        out.append("false")
    elif isinstance(value, str):
        out.append(_string(value, path))
    elif isinstance(value, int):
        if abs(value) > MAX_SAFE_INTEGER:
            raise ConfigError(f"integer {value} at {path} is outside the I-JSON range +-(2**53 - 1)",
                              fix="store it as a string")
        out.append(str(int(value)))
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise ConfigError(f"{value} at {path} is not a JSON number", fix="store a finite number, or null")
        out.append(format_number(float(value)))
    elif isinstance(value, dict):
        for key in value:
            if not isinstance(key, str):
                raise ConfigError(f"key {key!r} at {path} is a {type(key).__name__}; JSON object keys are strings")
        out.append("{")
        for i, key in enumerate(sorted(value, key=_utf16_units)):
            out.append("," if i else "")
            out.append(_string(key, path))
            out.append(":")
            _write(value[key], f"{path}.{key}", out)
        out.append("}")
    elif isinstance(value, (list, tuple)):
        out.append("[")
        for i, item in enumerate(value):
            out.append("," if i else "")
            _write(item, f"{path}[{i}]", out)
        out.append("]")
    else:
        raise ConfigError(f"{type(value).__name__} at {path} is not a JSON value",
                          fix="use str, int, float, bool, None, list or dict (hex-encode bytes)")


def _string(text: str, path: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ConfigError(f"string at {path} holds a lone surrogate, which I-JSON forbids") from None
    return '"' + text.translate(_ESCAPES) + '"'


def _utf16_units(key: str) -> bytes:
    # Big-endian UTF-16 bytes compare exactly as the code units do (RFC 8785 section 3.2.3).
    return key.encode("utf-16-be", "surrogatepass")


def _refuse_constant(name: str) -> None:
    raise ValueError(f"{name} is not a JSON number")
