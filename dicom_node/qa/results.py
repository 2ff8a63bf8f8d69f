"""What a QA check says, in one shape for every check: measured quantities, each with its warn and
fail levels and a verdict; the check's verdict is the worst of its quantities, the job's the worst
of its checks.

A level is crossed when the value is strictly beyond it (``worse = "above"``: value > level;
``"below"``: value < level). A quantity that could not be measured has no value and carries its
verdict and the reason in ``note`` (e.g. a checkpoint without training statistics: ``fail``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping
from typing import Any

PASS, WARN, FAIL = "pass", "warn", "fail"
VERDICTS = (PASS, WARN, FAIL)
_RANK = {PASS: 0, WARN: 1, FAIL: 2}

ABOVE, BELOW = "above", "below"  # which side of a level is worse

# The checks, in the order they are run, stored and shown.
CHECK_NAMES = ("in_distribution", "body_agreement", "hu_plausibility", "uncertainty", "field_of_view")


def worst(verdicts: Iterable[str]) -> str:
    """The worst of ``verdicts`` (``pass`` when there are none)."""
    return max(verdicts, key=_RANK.__getitem__, default=PASS)


def judge(value: float, warn_at: float | None, fail_at: float | None, worse: str) -> str:
    """``fail`` beyond ``fail_at``, else ``warn`` beyond ``warn_at``, else ``pass`` (None: no such level).

    A value that is not a number (NaN) fails: nothing can be said of it.
    """
    if worse not in (ABOVE, BELOW):
        raise ValueError(f"worse must be {ABOVE!r} or {BELOW!r}, not {worse!r}")
    if math.isnan(value):
        return FAIL

    def beyond(level: float | None) -> bool:
        return level is not None and (value > level if worse == ABOVE else value < level)

    if beyond(fail_at):
        return FAIL
    if beyond(warn_at):
        return WARN
    return PASS


@dataclasses.dataclass(frozen=True)
class Measurement:
    """One measured quantity of a check, with its levels and verdict."""

    check: str  # e.g. "body_agreement"
    quantity: str  # e.g. "hd95"
    value: float | None  # None: not measurable (the note says why)
    unit: str  # "" for a ratio or score, "%", "mm", "HU", "mL"
    warn_at: float | None
    fail_at: float | None
    worse: str  # ABOVE or BELOW
    verdict: str
    note: str = ""

    @classmethod
    def judged(
        cls,
        check: str,
        quantity: str,
        value: float,
        unit: str,
        *,
        warn_at: float | None,
        fail_at: float | None,
        worse: str,
        note: str = "",
    ) -> Measurement:
        return cls(
            check, quantity, float(value), unit, warn_at, fail_at, worse, judge(value, warn_at, fail_at, worse), note
        )

    @classmethod
    def unmeasured(cls, check: str, quantity: str, verdict: str, note: str, unit: str = "") -> Measurement:
        return cls(check, quantity, None, unit, None, None, ABOVE, verdict, note)

    def value_text(self) -> str:
        if self.value is None:
            return "-"
        return f"{_number(self.value)} {self.unit}" if self.unit else _number(self.value)

    def levels_text(self) -> str:
        """'warn > 1.25, fail > 2' ('<' where lower is worse); '-' without levels."""
        sign = ">" if self.worse == ABOVE else "<"
        levels = (("warn", self.warn_at), ("fail", self.fail_at))
        return ", ".join(f"{name} {sign} {_number(level)}" for name, level in levels if level is not None) or "-"

    def describe(self) -> str:
        """One line: "body_agreement.hd95 = 7.2 mm (warn > 5, fail > 10): warn"."""
        text = f"{self.check}.{self.quantity} = {self.value_text()} ({self.levels_text()}): {self.verdict}"
        return f"{text}; {self.note}" if self.note else text

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> Measurement:
        return cls(**{field.name: values[field.name] for field in dataclasses.fields(cls) if field.name in values})


@dataclasses.dataclass(frozen=True)
class CheckResult:
    """One named check: its measured quantities and a one-line summary for people."""

    name: str
    measurements: tuple[Measurement, ...]
    summary: str

    @property
    def verdict(self) -> str:
        return worst(m.verdict for m in self.measurements)


@dataclasses.dataclass(frozen=True)
class QAOutcome:
    """Every check of one job."""

    checks: tuple[CheckResult, ...]

    @property
    def verdict(self) -> str:
        return worst(check.verdict for check in self.checks)

    @property
    def measurements(self) -> tuple[Measurement, ...]:
        return tuple(m for check in self.checks for m in check.measurements)

    def reasons(self) -> list[str]:
        """One line per quantity that warned or failed, failures first."""
        flagged = [m for m in self.measurements if m.verdict != PASS]
        return [m.describe() for m in sorted(flagged, key=lambda m: -_RANK[m.verdict])]

    def verdict_line(self) -> str:
        """ "fail (in_distribution fail, hu_plausibility warn; 3 pass)"."""
        flagged = [f"{c.name} {c.verdict}" for c in self.checks if c.verdict != PASS]
        passed = sum(1 for c in self.checks if c.verdict == PASS)
        return f"{self.verdict} ({', '.join(flagged + [f'{passed} pass'])})" if flagged else f"pass ({passed} checks)"


def _number(value: float) -> str:
    """Three significant digits, no exponent and no trailing zeros: 0.9, 1.25, 7.2, 1234."""
    if not math.isfinite(value):
        return f"{value:g}"
    return f"{value:.0f}" if abs(value) >= 1000 else f"{value:.3g}"
