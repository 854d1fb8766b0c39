"""PII detectors and policies: each kind with positive probes (redacted) and negative ones (kept)."""

from __future__ import annotations

import pytest

from services.logger.pii import (
    DEFAULT_POLICY,
    PiiPolicy,
    detect,
    iban_valid,
    keyed_hash,
    luhn_valid,
    redact,
)

POSITIVE = [
    # e-mail
    ("mail me at jane.doe+ml@example.co.uk please", "EMAIL", "jane.doe+ml@example.co.uk"),
    ("JOHN_SMITH@Mail.Example.ORG", "EMAIL", "JOHN_SMITH@Mail.Example.ORG"),
    # phones: international and US formats
    ("call +44 20 7946 0958 today", "PHONE", "+44 20 7946 0958"),
    ("call +1-202-555-0143", "PHONE", "+1-202-555-0143"),
    ("ring +49 (0)30 1234567", "PHONE", "+49 (0)30 1234567"),
    ("or +33 6 12 34 56 78", "PHONE", "+33 6 12 34 56 78"),
    ("US: (415) 555-2671.", "PHONE", "(415) 555-2671"),
    ("US: 415-555-2671", "PHONE", "415-555-2671"),
    ("US: 415.555.2671", "PHONE", "415.555.2671"),
    ("US: 1 415 555 2671", "PHONE", "1 415 555 2671"),
    ("cell 4155552671", "PHONE", "4155552671"),
    # cards (Luhn-valid), with spaces, dashes, none; 15 (Amex), 16, 19 digits
    ("card 4111 1111 1111 1111 exp 12/29", "CARD", "4111 1111 1111 1111"),
    ("card 5555-5555-5555-4444", "CARD", "5555-5555-5555-4444"),
    ("amex 378282246310005", "CARD", "378282246310005"),
    ("visa 4000056655665556 debit", "CARD", "4000056655665556"),
    ("19 digits 6221 2600 0000 0000 001 ok", "CARD", "6221 2600 0000 0000 001"),
    # SSN
    ("ssn 078-05-1120 on file", "SSN", "078-05-1120"),
    ("ssn 219 09 9999", "SSN", "219 09 9999"),
    # IBAN (mod-97 valid), compact and grouped
    ("pay to DE89370400440532013000 now", "IBAN", "DE89370400440532013000"),
    ("pay to GB82 WEST 1234 5698 7654 32 thanks", "IBAN", "GB82 WEST 1234 5698 7654 32"),
    ("iban FR1420041010050500013M02606", "IBAN", "FR1420041010050500013M02606"),
    # IP addresses
    ("from 192.168.1.23 via", "IP", "192.168.1.23"),
    ("host 8.8.8.8.", "IP", "8.8.8.8"),
    ("v6 2001:db8:85a3::8a2e:370:7334 seen", "IP", "2001:db8:85a3::8a2e:370:7334"),
    ("loopback ::1 and", "IP", "::1"),
    ("mapped ::ffff:192.0.2.128 here", "IP", "::ffff:192.0.2.128"),
    ("full fe80:0000:0000:0000:0202:b3ff:fe1e:8329", "IP", "fe80:0000:0000:0000:0202:b3ff:fe1e:8329"),
]

NEGATIVE = [
    "card 4111 1111 1111 1112 is not Luhn-valid",  # one digit off
    "order 1234567812345678 shipped",  # 16 digits, not Luhn
    "the year 2024 and 12 items",
    "date 2024-01-15 at 12:30:45",
    "version 1.2.3.4.5 released",
    "not an ip 999.1.1.1",
    "semver 10.0.1 and ratio 3.14",
    "short 555-1234 extension",
    "ssn-like 000-12-3456 and 666-12-3456 are invalid",
    "iban-like DE00370400440532013000 fails mod-97",
    "C++ std::vector and a::b",
    "MAC 00:1A:2B:3C:4D:5E",
    "email-like user@localhost and @handle",
    "price $1,234.56 for 3 units",
    "id 123e4567-e89b-12d3-a456-426614174000 at 2024-05-01T12:30:45Z",
    "trace 4bf92f3577b34da6a3ce929d0e0e4736 span 00f067aa0ba902b7",
    "ISBN 978-3-16-148410-0, lat 48.8566, lon 2.3522",
    "",
]


@pytest.mark.parametrize(("text", "kind", "found"), POSITIVE)
def test_detects_and_redacts(text: str, kind: str, found: str) -> None:
    findings = detect(text)
    assert [(f.kind, f.text) for f in findings] == [(kind, found)]
    redacted = redact(text)
    assert found not in redacted
    assert f"[{kind}]" in redacted
    assert redacted == text.replace(found, f"[{kind}]")


@pytest.mark.parametrize("text", NEGATIVE)
def test_leaves_non_pii_alone(text: str) -> None:
    assert detect(text) == []
    assert redact(text) == text


def test_everything_in_one_prompt() -> None:
    prompt = (
        "I'm jane@corp.example, phone +1 (202) 555-0143, card 4242-4242-4242-4242, SSN 123-45-6789, "
        "IBAN NL91ABNA0417164300, server 10.0.0.7 / 2001:db8::1. Order 4242 4242 4242 4241 is fine."
    )
    redacted = redact(prompt)
    assert redacted == (
        "I'm [EMAIL], phone [PHONE], card [CARD], SSN [SSN], "
        "IBAN [IBAN], server [IP] / [IP]. Order 4242 4242 4242 4241 is fine."
    )


def test_checksums() -> None:
    assert luhn_valid("4111111111111111")
    assert not luhn_valid("4111111111111112")
    assert iban_valid("GB82 WEST 1234 5698 7654 32")
    assert not iban_valid("GB83 WEST 1234 5698 7654 32")


def test_policies() -> None:
    salt = b"s3cret"
    policy = PiiPolicy({**DEFAULT_POLICY, "unit_id": "hash"}, salt)
    assert policy.apply("prompt", "mail a@b.example") == "mail [EMAIL]"
    assert policy.apply("tenant", "acme") == "acme"
    hashed = policy.apply("unit_id", "user-42")
    assert hashed == keyed_hash("user-42", salt) == policy.apply("unit_id", "user-42")  # stable
    assert hashed != keyed_hash("user-42", b"other") and len(hashed) == 64
    assert policy.apply("unit_id", "") == ""
    with pytest.raises(ValueError, match="salt"):
        PiiPolicy({"unit_id": "hash"}, b"")
    with pytest.raises(ValueError, match="unknown"):
        PiiPolicy({"nickname": "keep"}, salt)
