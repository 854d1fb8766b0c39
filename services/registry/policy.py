"""Promotion rules as code: parse a policy, evaluate it against a metric source, decide go/no-go.

Pure and transport-free: no I/O beyond optional file loading, no eval(). The registry service and
the rollout controller call ``load_policy``/``parse_policy`` and ``evaluate``; the same policy runs
against an offline ``EvaluationReport`` and against ``LiveMetrics`` of a canary (both implement
``MetricSource``).

Policy YAML
-----------
::

    name: promotion                # optional, default "policy"
    description: ...               # optional
    confidence: 0.95               # optional, level of every interval (lower_ci/upper_ci)
    alpha: 0.05                    # optional, no_regressions_on test level; default 1 - confidence
    rules:                         # non-empty list; each item is one of
      - aggregate.success@1.lower_ci >= 0.82             # 1. a comparison string
      - no_regressions_on: [headache_redflags, math]     # 2. a no-regression check
        metrics: [success@1]       #    optional: default every name@k both arms report
        mode: auto                 #    optional: auto (default) | paired | test
        max_regressions: 0         #    optional, paired mode: regressed cases allowed per slice
        alpha: 0.05                #    optional, test mode: overrides the policy alpha
        name: ..., severity: ...   #    optional, as below
      - rule: latency_p95_ms.point <= 900                # 3. a comparison with options
        name: latency budget       #    optional, default the rule text
        severity: warn             #    block (default): a non-pass blocks promotion; warn: reported only

A bare list is accepted as the rules of an unnamed policy.

Comparison grammar (whitespace is free)::

    comparison := reference OP NUMBER
    OP         := ">=" | "<=" | ">" | "<" | "==" | "!="
    reference  := [ ("aggregate" | "delta") "." ] metric [ "(" slice ")" ] "." field
    metric     := NAME "@" DIGITS              pass metric, e.g. success@1  (count metric)
                | "rule_violation_rate"        cases with a violation / n   (count metric)
                | NAME                         operational metric, e.g. latency_p95_ms
    slice      := NAME | 'quoted' | "quoted"
    field      := "point" | "lower_ci" | "upper_ci" | "p_value" | "n"
    NAME       := [A-Za-z_][A-Za-z0-9_-]*

Meaning:

- ``M(slice).f``: count metric M of the candidate on one slice, Wilson interval.
- ``aggregate.M.f``: M pooled over every slice of the candidate that reports it (sum of passes /
  sum of n), Wilson interval.
- ``delta.M(slice).f``: candidate minus baseline on the slice: Newcombe interval, p_value from a
  two-sided two-proportion z-test (why two-sided: see estimates.py; pair a p_value rule with a
  direction rule such as ``.point >= 0.07`` or ``.lower_ci > 0``). ``delta.M.f`` without a slice
  pools both arms over the slices that report M in both.
- ``name.f`` (operational: latency_p95_ms, cost_per_1k_tokens_usd, error_rate, ...): the
  candidate's value as the source gives it; point only unless the source has an interval (live
  ``error_rate`` has a Wilson interval). ``delta.name.f``: candidate minus baseline, point only.
- ``p_value`` exists only on ``delta.`` references (a parse error elsewhere). ``n`` is the number
  of cases (the smaller arm for a delta).

no_regressions_on
-----------------
For each listed slice and each pass metric (``metrics``, default: every name@k that both arms
report on that slice) the slice *regresses* when:

- paired (mode ``auto`` when both arms have per-case results for the metric, or mode
  ``paired``): more than ``max_regressions`` (default 0) cases that the baseline passed are
  failed by the candidate, over the case ids both arms share. The verdict is this count, not a
  test: a promotion should not knowingly break a case that worked. The regressed case ids, the
  improvements and McNemar's exact p are reported as information.
- test (mode ``auto`` with counts only, or mode ``test``): the candidate's pass rate is lower and
  a one-sided two-proportion z-test (H1: candidate < baseline) gives p < alpha. A dip within
  noise is not a regression; a significant drop is.

The rule fails when any (slice, metric) regresses. Rule violations are not part of it: write a
``rule_violation_rate(slice)`` or ``delta.rule_violation_rate(slice)`` rule for those.

Verdicts and the decision
-------------------------
Each rule gets ``pass``, ``fail``, ``missing`` (the source lacks the data: metric not measured,
no baseline, live metrics asked for a slice) or ``error`` (the rule cannot apply to this source:
unknown slice, a field the estimate does not have, such as lower_ci of a point-only latency).
``go`` is true only when every ``block`` rule passes, so nothing missing ever passes silently;
``warn`` rules are reported and never block. ``evaluate(..., strict=True)`` raises PolicyError
on the first ``error`` instead, for checking a policy against a report when it is attached.

PolicyError carries the rule index (0-based position in ``rules``), the rule text and a message,
and the column for syntax errors.
"""

from __future__ import annotations

import math
import operator
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from services.registry.estimates import (
    FIELDS,
    RULE_VIOLATION_RATE,
    Estimate,
    InvalidReference,
    MetricRef,
    MetricSource,
    MissingMetric,
    RegressionMode,
    SliceRegression,
    check_regression,
    is_count_metric,
    is_pass_metric,
)

Severity = Literal["block", "warn"]
Verdict = Literal["pass", "fail", "missing", "error"]

OPERATORS: dict[str, Callable[[float, float], bool]] = {
    ">=": operator.ge,
    "<=": operator.le,
    ">": operator.gt,
    "<": operator.lt,
    "==": operator.eq,
    "!=": operator.ne,
}
SCOPES = ("aggregate", "delta")
_OPS_TEXT = ", ".join(OPERATORS)
_FIELDS_TEXT = ", ".join(FIELDS)


class PolicyError(ValueError):
    """A malformed policy, or (strict evaluation) a rule that cannot apply to the source."""

    def __init__(
        self,
        message: str,
        *,
        index: int | None = None,
        rule: str | None = None,
        column: int | None = None,
        source: str | None = None,
    ) -> None:
        self.message = message
        self.index = index
        self.rule = rule
        self.column = column
        self.source = source
        super().__init__(str(self))

    def __str__(self) -> str:
        where = [self.source] if self.source else []
        if self.index is not None:
            where.append(f"rules[{self.index}]")
        if self.rule is not None:
            where.append(repr(self.rule))
        if self.column is not None:
            where.append(f"column {self.column}")
        return f"{' '.join(where)}: {self.message}" if where else self.message


# --- expression parsing -----------------------------------------------------------------------


class _SyntaxProblem(Exception):
    def __init__(self, message: str, column: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.column = column


@dataclass(frozen=True, slots=True)
class _Token:
    kind: Literal["number", "name", "string", "op", "punct", "end"]
    text: str
    column: int  # 1-based


_TOKEN_RE = re.compile(
    r"""
    (?P<ws>\s+)
  | (?P<number>[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?)
  | (?P<name>[A-Za-z_][A-Za-z0-9_-]*(?:@[A-Za-z0-9_]*)?)
  | (?P<string>'[^']*'|"[^"]*")
  | (?P<op>[<>=!]+)
  | (?P<punct>[.()])
    """,
    re.VERBOSE,
)


def _tokenize(text: str) -> list[_Token]:
    tokens: list[_Token] = []
    pos = 0
    while pos < len(text):
        match = _TOKEN_RE.match(text, pos)
        if match is None:
            raise _SyntaxProblem(f"unexpected character {text[pos]!r}", pos + 1)
        kind = match.lastgroup
        assert kind is not None
        if kind != "ws":
            tokens.append(_Token(kind, match.group(), pos + 1))  # type: ignore[arg-type]
        pos = match.end()
    tokens.append(_Token("end", "", len(text) + 1))
    return tokens


@dataclass(frozen=True, slots=True)
class Comparison:
    """``reference.field OP threshold``, parsed."""

    ref: MetricRef
    field: str
    op: str
    threshold: float

    def __str__(self) -> str:
        return f"{self.ref}.{self.field} {self.op} {self.threshold:g}"


@dataclass(frozen=True, slots=True)
class _Segment:
    name: str
    arg: str | None
    column: int


class _ExpressionParser:
    """Recursive descent over the token list; see the grammar in the module docstring."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.tokens = _tokenize(text)
        self.pos = 0

    def _peek(self) -> _Token:
        return self.tokens[self.pos]

    def _next(self) -> _Token:
        token = self.tokens[self.pos]
        if token.kind != "end":
            self.pos += 1
        return token

    def parse(self) -> Comparison:
        if self._peek().kind == "end":
            raise _SyntaxProblem("empty rule")
        ref, field_name = self._reference()
        op = self._operator()
        threshold = self._number(op)
        extra = self._peek()
        if extra.kind != "end":
            raise _SyntaxProblem(f"unexpected {extra.text!r} after the threshold", extra.column)
        return Comparison(ref=ref, field=field_name, op=op, threshold=threshold)

    def _segment(self) -> _Segment:
        token = self._next()
        if token.kind != "name":
            what = "end of rule" if token.kind == "end" else repr(token.text)
            raise _SyntaxProblem(f"expected a metric name, got {what}", token.column)
        if "@" in token.text and not is_pass_metric(token.text):
            raise _SyntaxProblem(
                f"bad metric name {token.text!r}: write name@k with an integer k, e.g. success@1", token.column
            )
        arg = None
        if self._peek().text == "(":
            self._next()
            slice_token = self._next()
            if slice_token.kind == "name" and "@" not in slice_token.text:
                arg = slice_token.text
            elif slice_token.kind == "string" and len(slice_token.text) > 2:
                arg = slice_token.text[1:-1]
            else:
                what = "end of rule" if slice_token.kind == "end" else repr(slice_token.text)
                raise _SyntaxProblem(f"expected a slice name inside '(...)', got {what}", slice_token.column)
            close = self._next()
            if close.text != ")":
                raise _SyntaxProblem(f"expected ')' after slice {arg!r}", close.column)
        return _Segment(token.text, arg, token.column)

    def _reference(self) -> tuple[MetricRef, str]:
        segments = [self._segment()]
        while self._peek().text == ".":
            self._next()
            segments.append(self._segment())
        last = segments[-1]
        if len(segments) == 1:
            raise _SyntaxProblem(
                f"missing field: write {self.text[: self._peek().column - 1].strip()}.point (fields: {_FIELDS_TEXT})",
                self._peek().column,
            )
        if len(segments) > 3:
            raise _SyntaxProblem("too many '.' parts: expected [aggregate.|delta.]metric[(slice)].field", last.column)
        if last.name not in FIELDS:
            raise _SyntaxProblem(f"unknown metric field {last.name!r} (expected one of {_FIELDS_TEXT})", last.column)
        if last.arg is not None:
            raise _SyntaxProblem(f"field {last.name!r} takes no '(...)'", last.column)
        scope = "candidate"
        if len(segments) == 3:
            prefix = segments[0]
            if prefix.name not in SCOPES:
                raise _SyntaxProblem(f"unknown prefix {prefix.name!r} (expected aggregate or delta)", prefix.column)
            if prefix.arg is not None:
                raise _SyntaxProblem(f"prefix {prefix.name!r} takes no '(...)'", prefix.column)
            scope = prefix.name
        metric = segments[-2]
        ref = self._metric_ref(metric, scope)
        if last.name == "p_value" and ref.scope != "delta":
            raise _SyntaxProblem(
                "p_value exists only for delta.<metric> references (a candidate-vs-baseline test)", last.column
            )
        return ref, last.name

    @staticmethod
    def _metric_ref(metric: _Segment, scope: str) -> MetricRef:
        name = metric.name
        if name in SCOPES or name in FIELDS:
            raise _SyntaxProblem(f"expected a metric name, got {name!r}", metric.column)
        if is_count_metric(name):
            if scope == "aggregate" and metric.arg is not None:
                raise _SyntaxProblem(
                    f"aggregate. pools all slices: drop '({metric.arg})' or the aggregate. prefix", metric.column
                )
            if scope == "candidate" and metric.arg is None:
                raise _SyntaxProblem(
                    f"{name} needs a slice, e.g. {name}(slice), or the aggregate. prefix", metric.column
                )
        elif metric.arg is not None:
            raise _SyntaxProblem(
                f"unknown function {name!r}: only name@k metrics and {RULE_VIOLATION_RATE} take a slice",
                metric.column,
            )
        elif scope == "aggregate":
            raise _SyntaxProblem(
                f"aggregate. applies to count metrics (name@k, {RULE_VIOLATION_RATE}); {name!r} is operational",
                metric.column,
            )
        return MetricRef(metric=name, scope=scope, slice=metric.arg)  # type: ignore[arg-type]

    def _operator(self) -> str:
        token = self._next()
        if token.kind == "end":
            raise _SyntaxProblem(f"missing comparison operator ({_OPS_TEXT})", token.column)
        if token.kind != "op":
            raise _SyntaxProblem(f"expected a comparison operator ({_OPS_TEXT}), got {token.text!r}", token.column)
        if token.text not in OPERATORS:
            raise _SyntaxProblem(f"bad operator {token.text!r} (expected one of {_OPS_TEXT})", token.column)
        return token.text

    def _number(self, op: str) -> float:
        token = self._next()
        if token.kind == "end":
            raise _SyntaxProblem(f"missing number after {op!r}", token.column)
        if token.kind != "number":
            raise _SyntaxProblem(f"the threshold must be a number, got {token.text!r}", token.column)
        return float(token.text)


def parse_expression(text: str) -> Comparison:
    """Parses one comparison rule. Raises PolicyError (with the column) when malformed."""
    try:
        return _ExpressionParser(text).parse()
    except _SyntaxProblem as problem:
        raise PolicyError(problem.message, rule=text, column=problem.column) from None


# --- policy structure ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ComparisonRule:
    index: int
    text: str
    comparison: Comparison
    name: str
    severity: Severity = "block"


@dataclass(frozen=True, slots=True)
class NoRegressionsRule:
    index: int
    text: str
    slices: tuple[str, ...]
    name: str
    severity: Severity = "block"
    metrics: tuple[str, ...] | None = None
    mode: RegressionMode = "auto"
    max_regressions: int = 0
    alpha: float | None = None


Rule = ComparisonRule | NoRegressionsRule


@dataclass(frozen=True, slots=True)
class Policy:
    name: str
    rules: tuple[Rule, ...]
    confidence: float = 0.95
    alpha: float | None = None
    description: str = ""

    @property
    def effective_alpha(self) -> float:
        """The no_regressions_on test level: ``alpha``, or 1 - confidence."""
        return self.alpha if self.alpha is not None else round(1.0 - self.confidence, 12)

    def evaluate(self, source: MetricSource, *, strict: bool = False) -> PolicyDecision:
        return evaluate(self, source, strict=strict)


_POLICY_KEYS = {"name", "description", "confidence", "alpha", "rules"}
_RULE_KEYS = {"rule", "name", "severity"}
_NO_REGRESSION_KEYS = {"no_regressions_on", "metrics", "mode", "max_regressions", "alpha", "name", "severity"}


def _probability(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < 1:
        raise ValueError(f"{what} must be a number between 0 and 1 (exclusive), got {value!r}")
    return float(value)


def _rule_text_of(item: Any) -> str:
    if isinstance(item, str):
        return item
    if isinstance(item, Mapping):
        if isinstance(item.get("rule"), str):
            return item["rule"]
        slices = item.get("no_regressions_on")
        if isinstance(slices, list):
            return f"no_regressions_on: [{', '.join(map(str, slices))}]"
    return repr(item)


def _common_options(item: Mapping[str, Any], text: str) -> tuple[str, Severity]:
    name = item.get("name", text)
    if not isinstance(name, str) or not name:
        raise ValueError(f"name must be a non-empty string, got {name!r}")
    severity = item.get("severity", "block")
    if severity not in ("block", "warn"):
        raise ValueError(f"severity must be block or warn, got {severity!r}")
    return name, severity


def _parse_rule(index: int, item: Any) -> Rule:
    text = _rule_text_of(item)
    try:
        if isinstance(item, str):
            return ComparisonRule(index, item, _ExpressionParser(item).parse(), name=item)
        if not isinstance(item, Mapping):
            raise ValueError(f"a rule must be a string or a mapping, got {type(item).__name__}")
        if "rule" in item and "no_regressions_on" in item:
            raise ValueError("a rule mapping has either rule or no_regressions_on, not both")
        if "rule" in item:
            unknown = set(item) - _RULE_KEYS
            if unknown:
                raise ValueError(f"unknown key {sorted(unknown)[0]!r} (allowed: {', '.join(sorted(_RULE_KEYS))})")
            if not isinstance(item["rule"], str):
                raise ValueError(f"rule must be a string, got {item['rule']!r}")
            name, severity = _common_options(item, text)
            return ComparisonRule(index, text, _ExpressionParser(text).parse(), name=name, severity=severity)
        if "no_regressions_on" in item:
            return _parse_no_regressions(index, item, text)
        keys = ", ".join(map(str, item)) or "nothing"
        raise ValueError(f"unknown key(s) {keys}: a rule mapping needs rule or no_regressions_on")
    except _SyntaxProblem as problem:
        raise PolicyError(problem.message, index=index, rule=text, column=problem.column) from None
    except ValueError as problem:
        raise PolicyError(str(problem), index=index, rule=text) from None


def _parse_no_regressions(index: int, item: Mapping[str, Any], text: str) -> NoRegressionsRule:
    unknown = set(item) - _NO_REGRESSION_KEYS
    if unknown:
        allowed = ", ".join(sorted(_NO_REGRESSION_KEYS))
        raise ValueError(f"unknown key {sorted(map(str, unknown))[0]!r} (allowed: {allowed})")
    slices = item["no_regressions_on"]
    if not isinstance(slices, list) or not slices or not all(isinstance(s, str) and s for s in slices):
        raise ValueError(f"no_regressions_on must be a non-empty list of slice names, got {slices!r}")
    metrics = item.get("metrics")
    if metrics is not None:
        if not isinstance(metrics, list) or not metrics or not all(isinstance(m, str) for m in metrics):
            raise ValueError(f"metrics must be a non-empty list of name@k metrics, got {metrics!r}")
        for metric in metrics:
            if not is_pass_metric(metric):
                raise ValueError(f"metrics: {metric!r} is not a pass metric (name@k, e.g. success@1)")
        metrics = tuple(metrics)
    mode = item.get("mode", "auto")
    if mode not in ("auto", "paired", "test"):
        raise ValueError(f"mode must be auto, paired or test, got {mode!r}")
    max_regressions = item.get("max_regressions", 0)
    if isinstance(max_regressions, bool) or not isinstance(max_regressions, int) or max_regressions < 0:
        raise ValueError(f"max_regressions must be an integer >= 0, got {max_regressions!r}")
    alpha = _probability(item["alpha"], "alpha") if "alpha" in item else None
    name, severity = _common_options(item, text)
    return NoRegressionsRule(
        index,
        text,
        tuple(slices),
        name=name,
        severity=severity,
        metrics=metrics,
        mode=mode,
        max_regressions=max_regressions,
        alpha=alpha,
    )


def parse_policy(data: str | Mapping[str, Any] | Sequence[Any], *, source: str | None = None) -> Policy:
    """Builds a Policy from YAML/JSON text or already-loaded data. Raises PolicyError naming the
    rule (index and text) for the first problem; ``source`` (a file name) prefixes messages."""
    if isinstance(data, str):
        try:
            data = yaml.safe_load(data)
        except yaml.YAMLError as problem:
            raise PolicyError(f"not valid YAML: {problem}", source=source) from None
    if isinstance(data, list):
        data = {"rules": data}
    if not isinstance(data, Mapping):
        raise PolicyError(f"a policy must be a mapping with rules, got {type(data).__name__}", source=source)
    unknown = set(data) - _POLICY_KEYS
    if unknown:
        allowed = ", ".join(sorted(_POLICY_KEYS))
        raise PolicyError(f"unknown policy key {sorted(map(str, unknown))[0]!r} (allowed: {allowed})", source=source)
    try:
        confidence = _probability(data.get("confidence", 0.95), "confidence")
        alpha = _probability(data["alpha"], "alpha") if "alpha" in data else None
    except ValueError as problem:
        raise PolicyError(str(problem), source=source) from None
    name = data.get("name", "policy")
    if not isinstance(name, str) or not name:
        raise PolicyError(f"name must be a non-empty string, got {name!r}", source=source)
    description = data.get("description", "") or ""
    if not isinstance(description, str):
        raise PolicyError("description must be a string", source=source)
    rules = data.get("rules")
    if not isinstance(rules, list):
        got = "nothing" if rules is None else type(rules).__name__
        raise PolicyError(f"rules must be a list of rules, got {got}", source=source)
    if not rules:
        raise PolicyError("rules is empty: a policy without rules would promote anything", source=source)
    parsed: list[Rule] = []
    for index, item in enumerate(rules):
        try:
            parsed.append(_parse_rule(index, item))
        except PolicyError as problem:
            raise PolicyError(
                problem.message, index=problem.index, rule=problem.rule, column=problem.column, source=source
            ) from None
    return Policy(name=name, rules=tuple(parsed), confidence=confidence, alpha=alpha, description=description)


def load_policy(path: str | Path) -> Policy:
    """Reads and parses a policy file; errors name the file and the rule."""
    path = Path(path)
    return parse_policy(path.read_text(encoding="utf-8"), source=str(path))


# --- evaluation --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RuleResult:
    """One rule's outcome. ``value`` is the compared field (comparison rules) or the number of
    regressed (slice, metric) checks (no_regressions_on), None when it could not be computed."""

    index: int
    rule: str
    name: str
    severity: Severity
    verdict: Verdict
    value: float | None
    op: str | None
    threshold: float | None
    detail: str
    estimate: Estimate | None = None
    regressions: tuple[SliceRegression, ...] = ()

    @property
    def blocking(self) -> bool:
        return self.severity == "block" and self.verdict != "pass"

    def to_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "rule": self.rule,
            "name": self.name,
            "severity": self.severity,
            "verdict": self.verdict,
            "value": self.value,
            "op": self.op,
            "threshold": self.threshold,
            "detail": self.detail,
            "blocking": self.blocking,
            "estimate": None if self.estimate is None else self.estimate.to_dict(),
            "regressions": [check.to_dict() for check in self.regressions],
        }


@dataclass(frozen=True, slots=True)
class PolicyDecision:
    """Go/no-go plus every rule's result, in policy order."""

    policy: str
    go: bool
    rules: tuple[RuleResult, ...]
    confidence: float
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def blocking(self) -> list[RuleResult]:
        """The rules that stop promotion."""
        return [result for result in self.rules if result.blocking]

    @property
    def warnings(self) -> list[RuleResult]:
        """warn-severity rules that did not pass."""
        return [result for result in self.rules if result.severity == "warn" and result.verdict != "pass"]

    def to_dict(self) -> dict[str, Any]:
        return {
            "policy": self.policy,
            "decision": "go" if self.go else "no-go",
            "go": self.go,
            "confidence": self.confidence,
            "counts": dict(self.counts),
            "blocking": [result.index for result in self.blocking],
            "rules": [result.to_dict() for result in self.rules],
        }

    def to_text(self) -> str:
        return render_text(self)


def _value_of(estimate: Estimate, field_name: str) -> float | None:
    value = estimate.get(field_name)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return float(value)


def _evaluate_comparison(rule: ComparisonRule, source: MetricSource, confidence: float, strict: bool) -> RuleResult:
    comparison = rule.comparison
    base = {
        "index": rule.index,
        "rule": rule.text,
        "name": rule.name,
        "severity": rule.severity,
        "op": comparison.op,
        "threshold": comparison.threshold,
    }
    try:
        estimate = source.resolve(comparison.ref, confidence)
    except MissingMetric as problem:
        return RuleResult(verdict="missing", value=None, detail=str(problem), **base)
    except InvalidReference as problem:
        if strict:
            raise PolicyError(str(problem), index=rule.index, rule=rule.text) from None
        return RuleResult(verdict="error", value=None, detail=str(problem), **base)
    value = _value_of(estimate, comparison.field)
    if value is None:
        message = f"{comparison.ref} has no {comparison.field} here ({estimate.describe()})"
        if comparison.field in ("lower_ci", "upper_ci"):
            message += ": it is a point-only metric in this source"
        if strict:
            raise PolicyError(message, index=rule.index, rule=rule.text) from None
        return RuleResult(verdict="error", value=None, detail=message, estimate=estimate, **base)
    passed = OPERATORS[comparison.op](value, comparison.threshold)
    return RuleResult(
        verdict="pass" if passed else "fail",
        value=value,
        detail=f"{comparison.ref}: {estimate.describe()}",
        estimate=estimate,
        **base,
    )


def _evaluate_no_regressions(rule: NoRegressionsRule, source: MetricSource, alpha: float, strict: bool) -> RuleResult:
    checks: list[SliceRegression] = []
    missing: list[str] = []
    errors: list[str] = []
    for slice_name in rule.slices:
        try:
            metrics = rule.metrics or tuple(source.pass_metrics(slice_name))
            if not metrics:
                missing.append(f"{slice_name}: no pass metric reported by both arms")
                continue
            for metric in metrics:
                try:
                    comparison = source.compare(slice_name, metric)
                    checks.append(
                        check_regression(
                            comparison,
                            slice_name,
                            metric,
                            mode=rule.mode,
                            alpha=rule.alpha if rule.alpha is not None else alpha,
                            max_regressions=rule.max_regressions,
                        )
                    )
                except MissingMetric as problem:
                    missing.append(str(problem))
        except MissingMetric as problem:
            missing.append(str(problem))
        except InvalidReference as problem:
            if strict:
                raise PolicyError(str(problem), index=rule.index, rule=rule.text) from None
            errors.append(str(problem))
    regressed = [check for check in checks if check.regressed]
    if regressed:
        verdict: Verdict = "fail"
    elif errors:
        verdict = "error"
    elif missing:
        verdict = "missing"
    else:
        verdict = "pass"
    lines = [("REGRESSED " if check.regressed else "ok ") + check.detail for check in checks]
    lines += [f"error: {message}" for message in errors] + [f"missing: {message}" for message in missing]
    return RuleResult(
        index=rule.index,
        rule=rule.text,
        name=rule.name,
        severity=rule.severity,
        verdict=verdict,
        value=None if verdict in ("error", "missing") else float(len(regressed)),
        op="==",
        threshold=0.0,
        detail="\n".join(lines),
        regressions=tuple(checks),
    )


def evaluate(policy: Policy, source: MetricSource, *, strict: bool = False) -> PolicyDecision:
    """Evaluates every rule of ``policy`` against ``source`` (an EvaluationReport, LiveMetrics or
    any MetricSource). Never stops at the first failure: the decision lists all rules. With
    ``strict``, a rule that cannot apply to the source (verdict "error") raises PolicyError."""
    results: list[RuleResult] = []
    for rule in policy.rules:
        if isinstance(rule, ComparisonRule):
            results.append(_evaluate_comparison(rule, source, policy.confidence, strict))
        else:
            results.append(_evaluate_no_regressions(rule, source, policy.effective_alpha, strict))
    counts = {
        verdict: sum(1 for r in results if r.verdict == verdict) for verdict in ("pass", "fail", "missing", "error")
    }
    go = not any(result.blocking for result in results)
    return PolicyDecision(policy=policy.name, go=go, rules=tuple(results), confidence=policy.confidence, counts=counts)


# --- rendering -----------------------------------------------------------------------------------


def _fmt_number(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


def render_text(decision: PolicyDecision) -> str:
    """A plain-text table for the CLI: the decision, then one row per rule (multi-line details
    are indented under their row)."""
    summary = ", ".join(f"{count} {verdict}" for verdict, count in decision.counts.items() if count)
    lines = [
        f"policy {decision.policy}: {'GO' if decision.go else 'NO-GO'}"
        f" ({len(decision.rules)} rules: {summary}; confidence {decision.confidence:g})"
    ]
    header = ("#", "verdict", "rule", "value", "threshold", "detail")
    rows = []
    for result in decision.rules:
        verdict = result.verdict.upper() + (" (warn)" if result.severity == "warn" else "")
        threshold = "-" if result.threshold is None else f"{result.op} {result.threshold:g}"
        detail_lines = result.detail.splitlines() or [""]
        rows.append((str(result.index), verdict, result.rule, _fmt_number(result.value), threshold, detail_lines))
    widths = [max(len(header[i]), *(len(row[i]) for row in rows)) for i in range(5)]
    indent = sum(widths) + 2 * 5

    def line(cells: Sequence[str], detail: str) -> str:
        return "  ".join(cell.ljust(width) for cell, width in zip(cells, widths, strict=True)) + "  " + detail

    lines.append(line(header[:5], header[5]).rstrip())
    for *cells, detail_lines in rows:
        lines.append(line(cells, detail_lines[0]).rstrip())
        lines.extend(" " * indent + extra for extra in detail_lines[1:])
    if decision.blocking:
        named = (f"rules[{r.index}]" + (f" ({r.name})" if r.name != r.rule else "") for r in decision.blocking)
        lines.append("blocking: " + ", ".join(named))
    return "\n".join(lines)
