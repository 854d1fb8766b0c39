"""A hash-chained audit log: each entry's hash covers its fields and the previous entry's hash.

Editing an entry breaks its own hash; deleting one breaks the sequence and the next entry's
link. A chain alone cannot tell that its newest entries were cut off: compare the head hash
that `verify` reports with one recorded elsewhere (the CLI prints it) to catch that.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass

GENESIS_HASH = "0" * 64


@dataclass(frozen=True, slots=True)
class AuditEntry:
    seq: int
    at: str
    actor: str
    action: str
    subject: str
    reason: str
    details_json: str
    prev_hash: str
    hash: str

    def as_row(self) -> dict[str, object]:
        return asdict(self)


def entry_hash(seq: int, at: str, actor: str, action: str, subject: str, reason: str, details_json: str,
               prev_hash: str) -> str:
    body = json.dumps([seq, at, actor, action, subject, reason, details_json, prev_hash], separators=(",", ":"))
    return hashlib.sha256(body.encode()).hexdigest()


def seal(*, seq: int, at: str, actor: str, action: str, subject: str, reason: str, details_json: str,
         prev_hash: str) -> AuditEntry:
    digest = entry_hash(seq, at, actor, action, subject, reason, details_json, prev_hash)
    return AuditEntry(seq, at, actor, action, subject, reason, details_json, prev_hash, digest)


@dataclass(frozen=True, slots=True)
class ChainVerdict:
    ok: bool
    entries: int
    first_bad_seq: int = 0
    problem: str = ""


def verify_chain(entries: Sequence[AuditEntry]) -> ChainVerdict:
    """Walks the chain from the start; the first broken link names the entry and what is wrong."""
    prev_hash = GENESIS_HASH
    for expected_seq, entry in enumerate(entries, start=1):
        if entry.seq != expected_seq:
            problem = f"entry {expected_seq} is missing (found {entry.seq})"
            return ChainVerdict(False, len(entries), expected_seq, problem)
        if entry.prev_hash != prev_hash:
            problem = f"entry {entry.seq} does not link to entry {entry.seq - 1}"
            return ChainVerdict(False, len(entries), entry.seq, problem)
        recomputed = entry_hash(
            entry.seq, entry.at, entry.actor, entry.action, entry.subject, entry.reason, entry.details_json,
            entry.prev_hash,
        )
        if recomputed != entry.hash:
            return ChainVerdict(False, len(entries), entry.seq, f"entry {entry.seq} was modified (hash mismatch)")
        prev_hash = entry.hash
    return ChainVerdict(True, len(entries))
