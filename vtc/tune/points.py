"""One measured configuration (:class:`Point`) and the Pareto front of several. Pure: counts and
numbers only."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from vtc.stats import wilson
from vtc.tune.knobs import METRICS

COSTS = ("visual_tokens", "flops", "flops_ratio", "latency_ms")  # lower is better; the x of a front


def label(specs: tuple[str, ...]) -> str:
    """Specs joined with `` | `` (``none`` for the unreduced model): a point's name and results key."""
    return " | ".join(specs) or "none"


@dataclass(frozen=True)
class Point:
    """A set of reducer specs measured against the unreduced model on the same examples.

    Agreement and accuracy are stored as counts of examples (their rates and 95% Wilson intervals
    follow); ``kl`` and ``cosine`` are means over examples where the model gives logits or
    embeddings (None otherwise); ``accuracy`` needs labels.
    """

    specs: tuple[str, ...]  # reducers applied together; () is the unreduced model
    examples: int  # examples scored
    visual_tokens: float  # mean visual tokens per image (a classifier: patch tokens leaving the encoder)
    visual_tokens_std: float  # their standard deviation over images (non-zero for content-dependent reducers)
    flops: float  # FLOPs per image (a classifier: the forward; a VLM: vision + prefill)
    flops_ratio: float  # flops over the unreduced model's
    agreeing: int  # examples whose prediction equals the unreduced model's
    correct: int | None = None  # examples whose prediction equals the label (None without labels)
    kl: float | None = None  # mean KL(unreduced || reduced) of the output distributions
    cosine: float | None = None  # mean cosine similarity of outputs with the unreduced model's
    latency_ms: float | None = None  # median milliseconds per batch (None when not timed)
    reference_latency_ms: float | None = None  # the unreduced model's, timed in the same loop

    @property
    def label(self) -> str:
        return label(self.specs)

    @property
    def agreement(self) -> float:
        return self.agreeing / self.examples

    @property
    def accuracy(self) -> float | None:
        return None if self.correct is None else self.correct / self.examples

    @property
    def speedup(self) -> float | None:
        if self.latency_ms is None or self.reference_latency_ms is None:
            return None
        return self.reference_latency_ms / self.latency_ms

    def metric(self, name: str) -> float:
        """The value of ``name`` (a metric or a cost); ValueError when this point has none."""
        if name not in METRICS and name not in COSTS:
            raise ValueError(f"unknown measure {name!r}; metrics: {', '.join(METRICS)}; costs: {', '.join(COSTS)}")
        value = getattr(self, name)
        if value is None:
            why = {"accuracy": "no labels were given", "latency_ms": "latency was not timed"}.get(
                name, "the model gives no logits or embeddings to compare")
            raise ValueError(f"{self.label} has no {name}: {why}")
        return float(value)

    def interval(self, name: str) -> tuple[float, float] | None:
        """95% Wilson interval of agreement or accuracy (None for other measures or without labels)."""
        count = {"agreement": self.agreeing, "accuracy": self.correct}.get(name)
        return None if count is None else wilson(count, self.examples)

    def describe(self, metric: str = "agreement") -> str:
        """``tome:r=8 (40.0 visual tokens): agreement 0.985 (95% interval 0.957-0.995, n=200)``."""
        tokens = f"{self.visual_tokens:.1f}" + (f"±{self.visual_tokens_std:.1f}" if self.visual_tokens_std else "")
        value = getattr(self, metric)
        shown = "n/a" if value is None else f"{value:.3f}" if metric in ("agreement", "accuracy") else f"{value:.4g}"
        text = f"{self.label} ({tokens} visual tokens): {metric} {shown}"
        interval = self.interval(metric)
        if interval is not None:
            text += f" (95% interval {interval[0]:.3f}-{interval[1]:.3f}, n={self.examples})"
        return text


def loss(metric: str, value: float) -> float:
    """``value`` of ``metric`` turned lower-is-better (negated where higher is better)."""
    return -value if METRICS[metric] == ">=" else value


def pareto(points: Sequence[Point], x: str = "visual_tokens", y: str = "agreement") -> list[Point]:
    """The points no other point beats: none has at most their ``x`` (a cost, lower is better) and
    at least as good a ``y`` (a metric) with one of the two strictly better. Points with equal
    ``x`` and ``y`` are all kept. Ordered by ``x``, then by ``y`` best first."""
    if x not in COSTS:
        raise ValueError(f"x must be a cost: {', '.join(COSTS)}; got {x!r}")
    if y not in METRICS:
        raise ValueError(f"y must be a metric: {', '.join(METRICS)}; got {y!r}")
    pairs = [(p.metric(x), loss(y, p.metric(y)), p) for p in points]  # both lower is better

    def beaten(cx: float, cy: float) -> bool:
        return any(ox <= cx and oy <= cy and (ox < cx or oy < cy) for ox, oy, _ in pairs)

    front = [(cx, cy, p) for cx, cy, p in pairs if not beaten(cx, cy)]
    return [p for _, _, p in sorted(front, key=lambda item: item[:2])]
