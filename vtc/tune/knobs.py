"""What a tuning run varies and what it must reach: :class:`Knob` (one reducer option over a grid
of values) and :class:`Target` (a metric and a threshold), with their text forms
(``"tome:r=0..16:2"``, ``"agreement>=0.98"``). Pure: no model is touched."""

from __future__ import annotations

import re
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Literal, cast

from vtc.spec import parse_reducer

Value = int | float | str
Metric = Literal["agreement", "accuracy", "kl", "cosine"]
# metric -> the comparison a target on it takes (higher is better, or lower is better)
METRICS: dict[str, str] = {"agreement": ">=", "accuracy": ">=", "cosine": ">=", "kl": "<="}
_RANGES = {"agreement": (0.0, 1.0), "accuracy": (0.0, 1.0), "cosine": (-1.0, 1.0), "kl": (0.0, float("inf"))}
KNOB_FORMS = ("name:option=A..B (every integer from A to B), name:option=A..B:STEP (A, A+STEP, ... up to B), or "
              "name:option=V1,V2,... (numbers or words), other options before or after it; e.g. 'tome:r=0..16:2', "
              "'evit:keep=0.3,0.5,0.7', 'dymu:preset=low,mid,high', 'holov:k=16..128:16,crops=4'")


@dataclass(frozen=True)
class Knob:
    """One reducer budget knob: a spec template with one ``{}`` placeholder and the values it takes.

    Numeric values are kept in ascending order, words in the order given. Whether a larger value
    means more tokens (EViT ``keep``, HoloV ``k``) or fewer (ToMe ``r``) is not assumed: tuning
    orders points by the visual tokens it measures. Every spec is checked with
    :func:`vtc.spec.parse_reducer` when the knob is made.
    """

    template: str = "tome:r={}"  # reducer spec with one {} where the value goes
    values: tuple[Value, ...] = (0, 2, 4, 6, 8, 10, 12, 14, 16)  # the values the knob takes

    def __post_init__(self) -> None:
        rest = self.template.replace("{}", "", 1)
        if "{}" not in self.template or "{" in rest or "}" in rest:
            raise ValueError(f"knob template {self.template!r} needs exactly one {{}} placeholder and no other braces, "
                             f"e.g. 'tome:r={{}}'")
        values = tuple(self.values)
        if not values:
            raise ValueError(f"knob {self.template!r} has no values")
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            values = tuple(sorted(values))
        object.__setattr__(self, "values", values)
        specs = self.specs
        repeated = sorted({s for s in specs if specs.count(s) > 1})
        if repeated:
            raise ValueError(f"knob {self.template!r} gives the same spec twice: {', '.join(repeated)}")
        for value, spec in zip(values, specs):
            try:
                parse_reducer(spec)
            except (ValueError, TypeError) as error:
                raise ValueError(f"knob {self.template!r}: value {value!r} gives {spec!r}, which is not a valid "
                                 f"reducer spec: {error}") from None

    def spec(self, value: Value) -> str:
        return self.template.format(value)

    @property
    def specs(self) -> list[str]:
        """The spec of every value, in the knob's order."""
        return [self.spec(v) for v in self.values]

    def __str__(self) -> str:
        return self.template.replace("{}", ",".join(map(str, self.values)))


def _number(text: str) -> Decimal | None:
    try:
        number = Decimal(text)
    except InvalidOperation:
        return None
    return number if number.is_finite() else None


def _value(text: str) -> Value:
    """``"4"`` -> 4, ``"0.5"`` -> 0.5, ``"mid"`` -> "mid"."""
    number = _number(text)
    if number is None:
        return text
    return int(number) if number == number.to_integral_value() and "." not in text and "e" not in text.lower() else float(number)


def _bad(text: str, why: str) -> ValueError:
    return ValueError(f"bad knob {text!r}: {why}; knobs are written {KNOB_FORMS}")


def _range(span_text: str, text: str) -> list[Value]:
    """``A..B`` or ``A..B:STEP`` (in knob ``text``) as the values from A to B, both included."""
    span, _, step_text = span_text.partition(":")
    start_text, _, end_text = span.partition("..")
    parts = [start_text.strip(), end_text.strip(), step_text.strip() or "1"]
    numbers = [_number(p) for p in parts]
    if any(n is None for n in numbers):
        raise _bad(text, f"the range {span_text!r} takes numbers, A..B or A..B:STEP")
    start, end, step = cast(list[Decimal], numbers)
    if step <= 0:
        raise _bad(text, f"the step of {span_text!r} must be positive")
    count = abs(end - start) / step
    if count != count.to_integral_value():
        raise _bad(text, f"in {span_text!r}, {parts[1]} is not {parts[0]} plus a whole number of steps of {parts[2]}")
    sign = 1 if end >= start else -1
    integral = all(isinstance(_value(p), int) for p in parts)
    points = [start + sign * i * step for i in range(int(count) + 1)]
    return [int(p) if integral else float(p) for p in points]


def parse_knob(text: str) -> Knob:
    """A :class:`Knob` from text: one option of a reducer spec takes a range or a list of values
    (see :data:`KNOB_FORMS`); the other options stay as written."""
    name, colon, options = text.strip().partition(":")
    if "{" in text or "}" in text:
        raise _bad(text, "braces are not part of the text form (the template's {} is made from it)")
    if not colon or not name.strip():
        raise _bad(text, "it needs a reducer name, a colon and its options")
    groups: list[list[str]] = []  # each option followed by the extra values of a list
    for item in (part.strip() for part in options.split(",")):
        if "=" in item:
            groups.append([item])
        elif item and groups:
            groups[-1].append(item)
        else:
            raise _bad(text, f"{item!r} is not option=value nor a further value of a list")
    varying = [i for i, group in enumerate(groups) if len(group) > 1 or ".." in group[0]]
    if len(varying) != 1:
        which = "no option takes" if not varying else f"{len(varying)} options take"
        raise _bad(text, f"{which} several values; a knob varies exactly one option (vary several: give several knobs)")
    group = groups[varying[0]]
    key, _, first = group[0].partition("=")
    if len(group) == 1:
        values = _range(first.strip(), text)
    else:
        values = [_value(v) for v in [first.strip(), *group[1:]]]
    options_text = [f"{key.strip()}={{}}" if i == varying[0] else g[0] for i, g in enumerate(groups)]
    return Knob(f"{name.strip()}:{','.join(options_text)}", tuple(values))


@dataclass(frozen=True)
class Target:
    """What a budget must reach: ``metric`` compared with ``value`` (>= for agreement, accuracy and
    cosine; <= for kl), on the point estimate at the sample size used."""

    metric: Metric = "agreement"  # agreement | accuracy | cosine (higher is better) | kl (lower is better)
    value: float = 0.98  # the threshold the metric must reach

    def __post_init__(self) -> None:
        if self.metric not in METRICS:
            raise ValueError(f"unknown metric {self.metric!r}; choose from {', '.join(METRICS)}")
        low, high = _RANGES[self.metric]
        if not low <= self.value <= high:
            raise ValueError(f"a target on {self.metric} takes a number from {low:g} to {high:g}, got {self.value!r}")

    @property
    def comparison(self) -> str:
        return METRICS[self.metric]

    def met_by(self, value: float) -> bool:
        return value >= self.value if self.comparison == ">=" else value <= self.value

    def __str__(self) -> str:
        return f"{self.metric}{self.comparison}{self.value:g}"


_TARGET = re.compile(r"^\s*([A-Za-z_]+)\s*(>=|<=|=>|=<|>|<|==|=)\s*(\S+)\s*$")


def parse_target(text: str) -> Target:
    """``"agreement>=0.98"``, ``"accuracy>=0.9"``, ``"cosine>=0.99"`` or ``"kl<=0.05"``."""
    forms = "write METRIC>=VALUE for agreement, accuracy or cosine, or kl<=VALUE (e.g. 'agreement>=0.98', 'kl<=0.05')"
    match = _TARGET.match(text)
    if match is None:
        raise ValueError(f"bad target {text!r}: {forms}")
    metric, comparison, number = match.groups()
    if metric not in METRICS:
        raise ValueError(f"bad target {text!r}: unknown metric {metric!r}; choose from {', '.join(METRICS)}")
    wanted = METRICS[metric]
    if comparison != wanted:
        better = "higher" if wanted == ">=" else "lower"
        raise ValueError(f"bad target {text!r}: {metric} is better when {better}, so its target is {metric}{wanted}VALUE")
    parsed = _number(number)
    if parsed is None:
        raise ValueError(f"bad target {text!r}: {number!r} is not a number; {forms}")
    return Target(cast(Metric, metric), float(parsed))
