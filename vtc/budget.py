"""Per-layer budget schedules: ToMe's ``(r, inflect)`` schedules (official code,
``tome/utils.py`` ``parse_r``) and DyMU's constant / linear / reverse-linear ones (official code
``_get_rs``; DyMU paper, Wang et al., 2025, schedule ablation, Table 5).

All functions are pure: a budget goes in, a list with one entry per layer comes out.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

SCHEDULES = ("constant", "linear", "reverse-linear")


def tome_inflection(r: int, inflect: float, num_layers: int) -> list[int]:
    """ToMe's ``(r, inflect)`` schedule (``tome.utils.parse_r``): linear from ``lo`` to ``hi`` with
    ``lo = int(r (1 - inflect))``, ``hi = 2r - lo``. inflect -1: 2r down to 0 (the paper's
    decreasing schedule); 0: constant; +1: increasing."""
    if not -1.0 <= inflect <= 1.0:
        raise ValueError(f"inflect must be in [-1, 1], got {inflect}")
    if num_layers == 1:
        return [r]
    lo = int(r * (1 - inflect))
    hi = 2 * r - lo
    return [int(lo + (hi - lo) * layer / (num_layers - 1)) for layer in range(num_layers)]


def constant_total(total: int, num_layers: int) -> list[int]:
    """``total`` spread evenly; the remainder goes one each to the first layers (DyMU's
    ``constant`` schedule)."""
    base, extra = divmod(total, num_layers)
    return [base + (1 if layer < extra else 0) for layer in range(num_layers)]


def linear_total(total: int, num_layers: int) -> list[int]:
    """More merging early: ``r0 = floor(2R/L)`` decreasing by ``r0/L`` per layer until the sum
    reaches ``total``, one partial entry, zero padding (DyMU's ``linear`` schedule). When the
    decreasing values reach 0 before the sum reaches ``total`` (small totals), the rest is that one
    partial entry, so the tail is not monotone (e.g. ``linear_total(96, 24)`` ends ``1, 1, 1, 4, 0``)."""
    r0 = (2 * total) // num_layers
    step = r0 / num_layers
    out: list[int] = []
    running = 0
    for layer in range(num_layers):
        value = int(r0 - layer * step)
        if running + value >= total or value <= 0:
            break
        out.append(value)
        running += value
    if running < total and len(out) < num_layers:
        out.append(total - running)
    return out + [0] * (num_layers - len(out))


def per_layer(
    value: int | Sequence[int],
    num_layers: int,
    schedule: str = "constant",
    inflect: float | None = None,
) -> list[int]:
    """Expand a budget into one integer per layer.

    ``value`` is an int (per-layer amount under ``constant`` or ``inflect``; the total over all
    layers under ``linear``/``reverse-linear``) or an explicit list, zero-padded to ``num_layers``.
    """
    if isinstance(value, Sequence) and not isinstance(value, str):
        values = [int(v) for v in value]
        if len(values) > num_layers:
            raise ValueError(f"explicit schedule has {len(values)} entries but the model has {num_layers} layers")
        return values + [0] * (num_layers - len(values))
    value = int(value)
    if inflect is not None:
        return tome_inflection(value, inflect, num_layers)
    if schedule == "constant":
        return [value] * num_layers
    if schedule == "linear":
        return linear_total(value, num_layers)
    if schedule == "reverse-linear":
        return linear_total(value, num_layers)[::-1]
    raise ValueError(f"unknown schedule {schedule!r}; allowed: {', '.join(SCHEDULES)}")


def default_drop_layers(num_layers: int) -> tuple[int, ...]:
    """EViT's drop locations (3, 6, 9) for 12 blocks, scaled to other depths as L/4, L/2, 3L/4."""
    return tuple(sorted({max(0, math.floor(num_layers * f)) for f in (0.25, 0.5, 0.75)}))


def split_total(total: int, counts: Sequence[int]) -> list[int]:
    """Share ``total`` tokens among parts holding ``counts`` tokens, in proportion to their size
    (largest remainder; ties to the earlier part), never giving a part more than it holds."""
    available = sum(counts)
    if not 0 <= total <= available:
        raise ValueError(f"cannot keep {total} of {available} tokens")
    if available == 0:
        return [0] * len(counts)
    exact = [total * c / available for c in counts]
    shares = [math.floor(e) for e in exact]
    order = sorted(range(len(counts)), key=lambda i: (-(exact[i] - shares[i]), i))
    for i in order[: total - sum(shares)]:
        shares[i] += 1
    return shares


def per_image_counts(what: str, tokens: int | Sequence[int], batch: int) -> list[int]:
    """One token count per image of a batch of ``batch``: ``tokens`` for every image, or a list with
    one count per image (ValueError naming ``what`` when its length is not the batch size)."""
    if isinstance(tokens, int):
        return [tokens] * batch
    if len(tokens) != batch:
        raise ValueError(f"{what}: tokens lists {len(tokens)} counts, one per image, but the batch has {batch} "
                         f"image{'s' if batch != 1 else ''}")
    return [int(t) for t in tokens]
