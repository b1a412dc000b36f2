"""One harness result row: a reducer spec (or the unreduced model) over a folder, beside the
unreduced model; its record for the CSV and JSON, and a printed table."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from vtc.stats import wilson

UNREDUCED = "none"
COLUMNS = ("model", "spec", "images", "top1", "top1_low", "top1_high", "agreement", "visual_tokens", "gflops",
           "flops_ratio", "throughput_img_s", "reference_throughput_img_s", "speedup")


@dataclass
class HarnessRow:
    """Top-1 of one configuration, its agreement with the unreduced model and its cost."""

    spec: str  # the reducer spec string as given; "none" for the unreduced model
    images: int
    correct: int  # predictions equal to the folder's label
    agreeing: int  # predictions equal to the unreduced model's
    visual_tokens: float  # mean tokens per image leaving the encoder, prefix tokens (CLS, registers) not counted
    flops: float  # analytic FLOPs per image (vtc.measure)
    reference_flops: float  # the unreduced model's
    throughput: float | None = None  # images/s on the timed batch (None: not timed)
    reference_throughput: float | None = None  # the unreduced model's images/s, timed in the same interleaved loop
    predictions: list[int] = field(default_factory=list, repr=False)  # per image, in the folder's order

    @property
    def accuracy(self) -> float:
        return self.correct / self.images

    @property
    def interval(self) -> tuple[float, float]:
        """95% Wilson interval of the accuracy."""
        return wilson(self.correct, self.images)

    @property
    def agreement(self) -> float:
        return self.agreeing / self.images

    @property
    def flops_ratio(self) -> float:
        return self.flops / self.reference_flops

    @property
    def speedup(self) -> float | None:
        if self.throughput is None or self.reference_throughput is None:
            return None
        return self.throughput / self.reference_throughput

    def record(self) -> dict[str, object]:
        """The row's CSV / JSON fields (:data:`COLUMNS` but ``model``), rounded for reading."""
        low, high = self.interval
        speedup = self.speedup
        return {"spec": self.spec, "images": self.images, "top1": round(self.accuracy, 6), "top1_low": round(low, 6),
                "top1_high": round(high, 6), "agreement": round(self.agreement, 6), "visual_tokens": round(self.visual_tokens, 3),
                "gflops": round(self.flops / 1e9, 6), "flops_ratio": round(self.flops_ratio, 6),
                "throughput_img_s": _rounded(self.throughput, 3), "reference_throughput_img_s": _rounded(self.reference_throughput, 3),
                "speedup": _rounded(speedup, 4)}


def _rounded(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


def format_table(rows: Sequence[HarnessRow]) -> str:
    """A fixed-width table: spec, top-1 with its 95% interval, agreement, tokens, GFLOPs, images/s."""
    width = max(len("spec"), *(len(row.spec) for row in rows))
    lines = [f"{'spec':{width}s}  {'top-1 (95% interval)':22s}  agree  tokens   GFLOPs  x FLOPs   img/s  speedup"]
    for row in rows:
        low, high = row.interval
        speed = "-" if row.throughput is None else f"{row.throughput:.1f}"
        speedup = "-" if row.speedup is None else f"{row.speedup:.2f}x"
        lines.append(f"{row.spec:{width}s}  {row.accuracy:6.2%} ({low:6.2%}-{high:6.2%})  {row.agreement:5.1%}  "
                     f"{row.visual_tokens:6.1f}  {row.flops / 1e9:7.3f}  {row.flops_ratio:7.3f}  {speed:>6s}  {speedup:>7s}")
    return "\n".join(lines)
