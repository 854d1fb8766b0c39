"""PII detection and the per-field policies applied before anything reaches ClickHouse.

Detectors favour privacy where a pattern is ambiguous (a 10-digit order number reads as a US
phone number), but validate what has a checksum: card numbers must pass Luhn and IBANs mod-97,
so arbitrary long numbers are left alone. Policies: redact (replace each detected span with a
placeholder), hash (keyed HMAC-SHA256 of the whole value, stable for joins), keep.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Literal

PiiAction = Literal["redact", "hash", "keep"]

# Fields of the events a policy may name, and what is safe by default.
DEFAULT_POLICY: dict[str, PiiAction] = {
    "prompt": "redact",
    "completion": "redact",
    "feedback_text": "redact",
    "error_message": "redact",  # errors can echo the request
    "unit_id": "keep",
    "tenant": "keep",
}
POLICY_FIELDS = frozenset(DEFAULT_POLICY)

_EMAIL = re.compile(r"(?<![\w.%+-])[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}(?![\w-])")
# IBAN: country code, check digits, then 11-30 alphanumerics, compact or in groups of four.
_IBAN = re.compile(r"(?<![A-Za-z0-9])[A-Z]{2}\d{2}(?:[ ]?[A-Z0-9]{4}){2,7}(?:[ ]?[A-Z0-9]{1,3})?(?![A-Za-z0-9])")
# Cards: 13-19 digits, optionally grouped by single spaces or dashes; Luhn decides.
_CARD = re.compile(r"(?<![\d-])\d(?:[ -]?\d){12,18}(?![\d]|-\d)")
_SSN = re.compile(r"(?<![\d-])(?!000|666|9\d\d)\d{3}([- ])(?!00)\d{2}\1(?!0000)\d{4}(?![\d]|-\d)")
_PHONE_INTL = re.compile(r"(?<![\w+])\+\d{1,3}(?:[ .-]?\(?\d{1,4}\)?){2,5}(?![\d]|-\d)")
_PHONE_US = re.compile(r"(?<![\w+])(?:1[ .-]?)?(?:\(\d{3}\)[ .-]?|\d{3}[ .-]?)\d{3}[ .-]?\d{4}(?![\d]|-\d)")
_IPV4 = re.compile(r"(?<![\d.])(?:\d{1,3}\.){3}\d{1,3}(?![\d]|\.\d)")
# Loose candidates; ipaddress decides. Two colons at least, so times like 12:30 never match.
_IPV6 = re.compile(r"(?<![\w:.])(?:[0-9A-Fa-f]{0,4}:){2,7}(?:(?:\d{1,3}\.){3}\d{1,3}|[0-9A-Fa-f]{1,4})?(?![\w:]|\.\d)")


def luhn_valid(digits: str) -> bool:
    total = 0
    for index, char in enumerate(reversed(digits)):
        value = ord(char) - 48
        if index % 2 == 1:
            value = value * 2 - 9 if value > 4 else value * 2
        total += value
    return total % 10 == 0


def iban_valid(candidate: str) -> bool:
    compact = candidate.replace(" ", "")
    if not 15 <= len(compact) <= 34:
        return False
    rearranged = compact[4:] + compact[:4]
    return int("".join(str(int(ch, 36)) for ch in rearranged)) % 97 == 1


def _card_ok(match: str) -> bool:
    digits = re.sub(r"[ -]", "", match)
    return 13 <= len(digits) <= 19 and luhn_valid(digits)


def _phone_ok(match: str) -> bool:
    return 7 <= sum(ch.isdigit() for ch in match) <= 15


def _ipv4_ok(match: str) -> bool:
    try:
        ipaddress.IPv4Address(match)
    except ValueError:
        return False
    return True


def _ipv6_ok(match: str) -> bool:
    groups = [group for group in match.split(":") if group]
    # Real addresses nearly always have a group of 3-4 hex digits (2001:db8::, fe80::); this
    # keeps code like a::b or Foo::bar out. The loopback ::1 and v4-mapped forms are the exceptions.
    if not groups or (match != "::1" and "." not in match and max(len(g) for g in groups) < 3):
        return False
    try:
        ipaddress.IPv6Address(match)
    except ValueError:
        return False
    return True


@dataclass(frozen=True)
class _Detector:
    kind: str
    pattern: re.Pattern[str]
    valid: Callable[[str], bool] | None
    needs: Callable[[str], bool]


_DIGIT = re.compile(r"\d")


def _has_digit(text: str) -> bool:
    return _DIGIT.search(text) is not None


# Order matters: e-mails first (they may contain digits), IBANs before cards and phones (their
# digit runs would match those), cards before SSNs and phones.
_DETECTORS: tuple[_Detector, ...] = (
    _Detector("EMAIL", _EMAIL, None, lambda t: "@" in t),
    _Detector("IBAN", _IBAN, iban_valid, _has_digit),
    _Detector("CARD", _CARD, _card_ok, _has_digit),
    _Detector("SSN", _SSN, None, _has_digit),
    _Detector("IP", _IPV6, _ipv6_ok, lambda t: "::" in t or t.count(":") >= 2),
    _Detector("IP", _IPV4, _ipv4_ok, lambda t: "." in t),
    _Detector("PHONE", _PHONE_INTL, _phone_ok, lambda t: "+" in t),
    _Detector("PHONE", _PHONE_US, _phone_ok, _has_digit),
)


@dataclass(frozen=True)
class Finding:
    kind: str  # EMAIL, PHONE, CARD, SSN, IBAN, IP
    start: int
    end: int
    text: str


def _iban_prefix(match: str) -> str | None:
    """The longest valid IBAN at the start of a grouped match (a trailing word may have joined it)."""
    parts = match.split(" ")
    for cut in range(len(parts), 0, -1):
        candidate = " ".join(parts[:cut])
        if iban_valid(candidate):
            return candidate
    return None


def redact(text: str) -> str:
    """Replaces every detected e-mail, phone, card, SSN, IBAN and IP address with [KIND]."""
    if not text:
        return text
    for detector in _DETECTORS:
        if not detector.needs(text):
            continue
        text = detector.pattern.sub(lambda m, d=detector: _replacement(d, m.group(0)), text)
    return text


def _replacement(detector: _Detector, found: str) -> str:
    if detector.kind == "IBAN":
        prefix = _iban_prefix(found)
        return found if prefix is None else f"[IBAN]{found[len(prefix) :]}"
    if detector.valid is None or detector.valid(found):
        return f"[{detector.kind}]"
    return found


def detect(text: str) -> list[Finding]:
    """What redact() would replace, in order of position (for audits and tests)."""
    findings: list[Finding] = []
    masked = text
    for detector in _DETECTORS:
        if not detector.needs(masked):
            continue
        for match in detector.pattern.finditer(masked):
            found = match.group(0)
            if detector.kind == "IBAN":
                prefix = _iban_prefix(found)
                if prefix is None:
                    continue
                found = prefix
            elif detector.valid is not None and not detector.valid(found):
                continue
            findings.append(Finding(detector.kind, match.start(), match.start() + len(found), found))
            # Mask with same-length filler so later detectors neither see it nor shift offsets.
            masked = masked[: match.start()] + "\x00" * len(found) + masked[match.start() + len(found) :]
    return sorted(findings, key=lambda f: f.start)


def keyed_hash(value: str, salt: bytes) -> str:
    """HMAC-SHA256 hex: stable for the same salt (joins and deletes still work), not reversible
    without the salt (a plain hash of a phone number or user id is brute-forced in seconds)."""
    return hmac.new(salt, value.encode(), hashlib.sha256).hexdigest()


@dataclass(frozen=True)
class PiiPolicy:
    """field -> action for the event fields in POLICY_FIELDS, plus the secret for `hash`."""

    actions: Mapping[str, PiiAction] = field(default_factory=lambda: dict(DEFAULT_POLICY))
    salt: bytes = b""
    _resolved: dict[str, PiiAction] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        unknown = set(self.actions) - POLICY_FIELDS
        if unknown:
            raise ValueError(f"unknown PII policy fields {sorted(unknown)}; known: {sorted(POLICY_FIELDS)}")
        if "hash" in self.actions.values() and not self.salt:
            raise ValueError("a PII policy with `hash` needs a secret salt")
        object.__setattr__(
            self, "_resolved", {name: self.actions.get(name, DEFAULT_POLICY[name]) for name in POLICY_FIELDS}
        )

    def action(self, field_name: str) -> PiiAction:
        return self._resolved[field_name]

    def apply(self, field_name: str, value: str) -> str:
        """The value as it may be stored. Empty stays empty (no hash of nothing)."""
        if not value:
            return value
        action = self._resolved[field_name]
        if action == "keep":
            return value
        if action == "hash":
            return keyed_hash(value, self.salt)
        return redact(value)
