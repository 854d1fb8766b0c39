"""Model version stages and the transitions allowed between them (plain rules, no I/O)."""

from __future__ import annotations

from services.common import errors

DEVELOPMENT = "development"
STAGING = "staging"
CANARY = "canary"
PRODUCTION = "production"
ARCHIVED = "archived"
STAGES = (DEVELOPMENT, STAGING, CANARY, PRODUCTION, ARCHIVED)

# Production is reached only from staging (a direct, gated swap) or canary (a finished rollout);
# leaving production happens by being replaced or rolled back, never by a bare transition.
ALLOWED: dict[str, frozenset[str]] = {
    DEVELOPMENT: frozenset({STAGING, ARCHIVED}),
    STAGING: frozenset({DEVELOPMENT, CANARY, PRODUCTION, ARCHIVED}),
    CANARY: frozenset({STAGING, PRODUCTION, ARCHIVED}),
    PRODUCTION: frozenset({ARCHIVED}),
    ARCHIVED: frozenset({STAGING}),
}


def check_stage_name(stage: str) -> str:
    if stage not in STAGES:
        raise errors.InvalidArgument(f"stage: unknown stage '{stage}' (one of {', '.join(STAGES)})")
    return stage


def check_transition(current: str, target: str, *, replacing_production: bool = False) -> None:
    """Raises FailedPrecondition naming both stages when the move is not allowed."""
    check_stage_name(target)
    if current == target:
        raise errors.FailedPrecondition(f"stage: the version is already in {target}")
    if current == PRODUCTION and target == ARCHIVED and not replacing_production:
        raise errors.FailedPrecondition(
            "stage: the production version is archived only when another version replaces it "
            "(promote a version or roll back)"
        )
    if target not in ALLOWED[current]:
        allowed = ", ".join(sorted(ALLOWED[current])) or "none"
        raise errors.FailedPrecondition(f"stage: cannot move from {current} to {target} (allowed: {allowed})")
