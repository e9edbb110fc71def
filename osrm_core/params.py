"""Declared parameters: what a merge method or an init lets the user set.

A :class:`ParamSpec` names one parameter with its default, help, and its allowed values (a
number interval or a list of choices). The command line's flags, the config checks and the
app's widgets are all built from the specs, so a new parameter is one declaration.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from osrm_core.errors import OsrmInputError


def check_real(
    name: str,
    value: object,
    *,
    low: float,
    high: float,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """Return ``value`` as a float, or raise OsrmInputError naming ``name``, the value and the range.

    NaN and non-numbers (including bool and str) are refused.
    """
    # A value of the wrong type (a string from a form, a bool) is reported like one out of range:
    # both are invalid parameter values for the user.
    v = float(value) if isinstance(value, numbers.Real) and not isinstance(value, bool) else None
    inside = (
        v is not None
        and (low < v if low_open else low <= v)
        and (v < high if high_open else v <= high)
    )
    if not inside:
        allowed = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise OsrmInputError(f"{name} must be a number in {allowed}, got {value!r}")
    return v


def check_choice(name: str, value: object, choices: Sequence[str]) -> str:
    """Return ``value`` if it is one of ``choices``, else raise OsrmInputError listing them."""
    if not isinstance(value, str) or value not in choices:
        raise OsrmInputError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")
    return value


@dataclass(frozen=True)
class Interval:
    """The numbers a parameter allows: ``low`` to ``high``, each end open or closed."""

    low: float
    high: float = math.inf
    low_open: bool = False
    high_open: bool = False

    def check(self, name: str, value: object) -> float:
        return check_real(name, value, low=self.low, high=self.high, low_open=self.low_open,
                          high_open=self.high_open or self.high == math.inf)


@dataclass(frozen=True)
class ParamSpec:
    """One parameter: ``choices`` for a string option, ``interval`` (the values allowed) and
    ``range`` (low, high: the span a widget offers) for a number."""

    name: str
    default: Any
    help: str
    choices: tuple[str, ...] | None = None
    range: tuple[float, float] | None = None
    interval: Interval | None = None

    def check(self, value: object, where: str | None = None) -> Any:
        """``value`` if allowed (a number as a float), else OsrmInputError naming ``where``
        (default the parameter's name) and what is allowed."""
        name = where or self.name
        if self.choices is not None:
            return check_choice(name, value, self.choices)
        return value if self.interval is None else self.interval.check(name, value)


def number_param(default: float, help: str, interval: Interval, widget: tuple[float, float] | None = None) -> Any:
    """A dataclass field for a number parameter: checked in ``interval``; ``widget`` is the
    span the app's widget offers (``interval``'s ends by default)."""
    return field(default=default, metadata={"help": help, "interval": interval,
                                            "range": widget or (interval.low, interval.high)})


def share_param(default: float, help: str) -> Any:
    """A number parameter that is a share in (0, 1] (a density, a fraction of a rank); the
    widget starts at 0.01."""
    return number_param(default, help, Interval(0.0, 1.0, low_open=True), widget=(0.01, 1.0))


def choice_param(default: str, help: str) -> Any:
    """A dataclass field for a string option; its choices are the field's ``Literal`` type."""
    return field(default=default, metadata={"help": help})
