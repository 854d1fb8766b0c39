"""Drift of LLM traffic: prompt length and output tokens (numeric), finish reasons (categorical), refusal rate.

The reference is an :class:`LLMReferenceProfile` built once from a reference window of
``PredictionEvent`` rows; the current window arrives as an :class:`LLMTrafficWindow` of aggregates
(counts per reference bin, finish-reason counts, refusal count) that SQL can compute, optionally with
small samples of the numeric columns for KS and Wasserstein.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from . import _validation as v
from .drift import (
    DEFAULT_THRESHOLDS,
    CategoricalDriftReport,
    DriftThresholds,
    NumericDriftReport,
    ProportionDriftResult,
    Status,
    categorical_drift,
    numeric_drift,
    two_proportion_drift,
    worst_status,
)
from .profiles import (
    DEFAULT_MAX_POINTS,
    DEFAULT_N_BINS,
    CategoricalProfile,
    NumericProfile,
    build_categorical_profile,
    build_numeric_profile,
)


@dataclass(frozen=True)
class LLMReferenceProfile:
    """Reference statistics of LLM traffic; JSON-serialisable like :class:`~.profiles.ReferenceProfile`."""

    prompt_length: NumericProfile
    output_tokens: NumericProfile
    finish_reasons: CategoricalProfile
    refusals: int
    total: int

    def __post_init__(self) -> None:
        v.successes_trials(self.refusals, self.total, "refusals", "total")

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form."""
        return {
            "prompt_length": self.prompt_length.to_dict(),
            "output_tokens": self.output_tokens.to_dict(),
            "finish_reasons": self.finish_reasons.to_dict(),
            "refusals": self.refusals,
            "total": self.total,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LLMReferenceProfile:
        """Inverse of :meth:`to_dict`."""
        try:
            return cls(
                prompt_length=NumericProfile.from_dict(data["prompt_length"]),
                output_tokens=NumericProfile.from_dict(data["output_tokens"]),
                finish_reasons=CategoricalProfile.from_dict(data["finish_reasons"]),
                refusals=int(data["refusals"]),
                total=int(data["total"]),
            )
        except (KeyError, TypeError) as exc:
            raise ValueError(f"data is not an LLM reference profile: {exc!r}") from exc


def _records(
    prompt_lengths: ArrayLike, output_tokens: ArrayLike, finish_reasons: Iterable[object], refused: ArrayLike
) -> tuple[NDArray[np.float64], NDArray[np.float64], list[str], NDArray[Any]]:
    """Checked per-request columns: one entry each, refused as booleans (or 0/1)."""
    prompts = v.sample(prompt_lengths, "prompt_lengths")
    outputs = v.sample(output_tokens, "output_tokens")
    reasons = [str(r) for r in finish_reasons]
    flags = np.asarray(refused)
    if flags.ndim != 1 or not np.isin(flags, [0, 1]).all():
        raise ValueError("refused must be a one-dimensional sequence of booleans (or 0/1)")
    if not (prompts.size == outputs.size == len(reasons) == flags.size):
        raise ValueError(
            "prompt_lengths, output_tokens, finish_reasons and refused must have one entry per request, got sizes "
            f"{prompts.size}, {outputs.size}, {len(reasons)}, {flags.size}"
        )
    return prompts, outputs, reasons, flags


def build_llm_profile(
    prompt_lengths: ArrayLike,
    output_tokens: ArrayLike,
    finish_reasons: Iterable[object],
    refused: ArrayLike,
    *,
    n_bins: int = DEFAULT_N_BINS,
    max_points: int = DEFAULT_MAX_POINTS,
) -> LLMReferenceProfile:
    """Profile a reference window of LLM requests (one entry per request in every argument)."""
    prompts, outputs, reasons, flags = _records(prompt_lengths, output_tokens, finish_reasons, refused)
    return LLMReferenceProfile(
        prompt_length=build_numeric_profile(prompts, n_bins=n_bins, max_points=max_points),
        output_tokens=build_numeric_profile(outputs, n_bins=n_bins, max_points=max_points),
        finish_reasons=build_categorical_profile(reasons),
        refusals=int(flags.sum()),
        total=int(flags.size),
    )


@dataclass(frozen=True)
class LLMTrafficWindow:
    """Aggregates of the current LLM traffic window, binned on the reference profile's bins."""

    prompt_length_counts: tuple[int, ...]
    output_tokens_counts: tuple[int, ...]
    finish_reason_counts: Mapping[str, int]
    refusals: int
    total: int
    prompt_length_sample: tuple[float, ...] | None = None
    output_tokens_sample: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        v.successes_trials(self.refusals, self.total, "refusals", "total")

    @classmethod
    def from_records(
        cls,
        profile: LLMReferenceProfile,
        prompt_lengths: ArrayLike,
        output_tokens: ArrayLike,
        finish_reasons: Iterable[object],
        refused: ArrayLike,
        *,
        keep_samples: bool = True,
    ) -> LLMTrafficWindow:
        """Aggregate raw current rows in Python (what the SQL does in production)."""
        prompts, outputs, reasons, flags = _records(prompt_lengths, output_tokens, finish_reasons, refused)
        return cls(
            prompt_length_counts=tuple(int(c) for c in profile.prompt_length.bin_counts(prompts)),
            output_tokens_counts=tuple(int(c) for c in profile.output_tokens.bin_counts(outputs)),
            finish_reason_counts=dict(Counter(reasons)),
            refusals=int(flags.sum()),
            total=int(flags.size),
            prompt_length_sample=tuple(float(x) for x in prompts) if keep_samples else None,
            output_tokens_sample=tuple(float(x) for x in outputs) if keep_samples else None,
        )


@dataclass(frozen=True)
class LLMDriftReport:
    """Drift of each LLM traffic signal and the worst status among them."""

    prompt_length: NumericDriftReport
    output_tokens: NumericDriftReport
    finish_reasons: CategoricalDriftReport
    refusal_rate: ProportionDriftResult
    status: Status


def llm_traffic_drift(
    profile: LLMReferenceProfile, window: LLMTrafficWindow, *, thresholds: DriftThresholds = DEFAULT_THRESHOLDS
) -> LLMDriftReport:
    """Compare a current LLM traffic window with the reference profile."""
    prompt = numeric_drift(
        profile.prompt_length,
        bin_counts=window.prompt_length_counts,
        values=window.prompt_length_sample,
        thresholds=thresholds,
    )
    output = numeric_drift(
        profile.output_tokens,
        bin_counts=window.output_tokens_counts,
        values=window.output_tokens_sample,
        thresholds=thresholds,
    )
    reasons = categorical_drift(profile.finish_reasons, window.finish_reason_counts, thresholds=thresholds)
    refusal = two_proportion_drift(
        profile.refusals, profile.total, window.refusals, window.total, thresholds=thresholds
    )
    status = worst_status([prompt.status, output.status, reasons.status, refusal.status])
    return LLMDriftReport(prompt, output, reasons, refusal, status)
