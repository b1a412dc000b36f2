"""DyMU calibrations: per-layer thresholds found on calibration images (DyMU paper, Sec. 3.1,
batch-level threshold finding), their files and the merge schedules they aim at.

:class:`CalibrationRecorder` is the encoder reducer a calibration run applies: in every block of
every batch it ranks the A-token edges of all images jointly, merges the best ``B * r_l`` (simple
images give more of them) and records the score of the first rejected edge, that batch's
threshold; a layer's threshold is the mean over batches. Running a model over images is the job of
:func:`vtc.dymu.calibrate`. A :class:`Calibration` is saved as ``thresholds.safetensors`` (float64,
so a reloaded calibration is bit-identical to the measured one) + ``dymu.json`` in a folder, and
checked against the encoder it is applied to: its layer and token counts, and its checkpoint name
when both sides know it. Shipped calibrations live in ``<checkpoint>/dymu-<preset>`` under the
folder of checkpoints vtc ships (:attr:`vtc.sites.EncoderInfo.shipped`).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from vtc.budget import constant_total, linear_total
from vtc.kernels import bipartite_match
from vtc.merge import batch_top_edges, bipartite_merge_map, merge_capacity, merge_tokens
from vtc.sites import EncoderInfo, EncoderReducer, Signal, Signals
from vtc.state import TokenState

# Share of patch tokens kept: DyMU-low / mid / high's 72 / 192 / 384 of 576 for LLaVA-1.5 (the
# official configs ``ViT-L-14-336-tome-72out``, ``-192out``, ``-384out``).
PRESETS = {"low": 1 / 8, "mid": 1 / 3, "high": 2 / 3}
SCHEDULES = ("constant", "linear", "reverse-linear")
TENSORS, CONFIG = "thresholds.safetensors", "dymu.json"


@dataclass
class Calibration:
    """Per-layer thresholds and what they were calibrated for.

    ``merges`` are the per-layer average merges per image (``r_l``; 0: the layer never merges,
    stored with threshold 1). ``target`` is the average patch tokens (prefix excluded) leaving the
    last layer that calibration aimed at; ``realised`` the average the thresholds give on the
    calibration images (used as ``DyMU(calibration=..., cap=cap)``), ``held_out`` /
    ``held_out_std`` on other images when given; ``cap`` the per-image cap ratio calibration used.
    """

    thresholds: list[float]
    merges: list[int]
    schedule: str
    target: float
    encoder: dict[str, Any]
    model_id: str | None = None
    preset: str | None = None
    images: int = 0
    batch_size: int = 0
    realised: float | None = None
    held_out: float | None = None
    held_out_std: float | None = None
    cap: float | None = None

    def __str__(self) -> str:
        return f"<DyMU calibration of {self.model_id or 'an encoder'}, {self.target:g} tokens>"

    def save(self, folder: str | Path, overwrite: bool = False) -> Path:
        """Write ``thresholds.safetensors`` and ``dymu.json`` into ``folder``; an existing
        calibration there is only replaced with ``overwrite=True``."""
        from safetensors.torch import save_file

        folder = Path(folder)
        if any((folder / name).exists() for name in (TENSORS, CONFIG)) and not overwrite:
            raise FileExistsError(f"{folder} already holds a DyMU calibration; pass overwrite=True to replace it")
        folder.mkdir(parents=True, exist_ok=True)
        save_file({"thresholds": torch.tensor(self.thresholds, dtype=torch.float64),  # as measured, bit for bit
                   "merges": torch.tensor(self.merges, dtype=torch.int64)}, str(folder / TENSORS))
        meta = {k: v for k, v in asdict(self).items() if k not in ("thresholds", "merges")}
        (folder / CONFIG).write_text(json.dumps({"method": "dymu", **meta}, indent=2) + "\n")
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> Calibration:
        from safetensors.torch import load_file

        folder = Path(folder)
        if not (folder / TENSORS).is_file() or not (folder / CONFIG).is_file():
            raise FileNotFoundError(f"{folder} is not a DyMU calibration folder (it needs {TENSORS} and {CONFIG})")
        meta = json.loads((folder / CONFIG).read_text())
        if meta.pop("method", None) != "dymu":
            raise ValueError(f"{folder / CONFIG} is not a DyMU calibration")
        tensors = load_file(str(folder / TENSORS))
        return cls(thresholds=tensors["thresholds"].tolist(), merges=tensors["merges"].tolist(), **meta)

    def check(self, info: EncoderInfo, source: str) -> None:
        """Raise ValueError when this calibration was made for another encoder."""
        mine = {key: self.encoder.get(key) for key in ("num_layers", "num_tokens", "n_prefix")}
        theirs = {"num_layers": info.num_layers, "num_tokens": info.num_tokens, "n_prefix": info.n_prefix}
        if mine != theirs:
            raise ValueError(f"the DyMU calibration {source} was made for an encoder with {mine}, but this one has {theirs}")
        if self.model_id and info.model_id and self.model_id != info.model_id:
            raise ValueError(
                f"the DyMU calibration {source} was made for model {self.model_id!r}, but this model is "
                f"{info.model_id!r}; calibrate this model (scripts/calibrate_dymu.py) or copy the folder and edit "
                f"model_id in its {CONFIG} if the weights are the same"
            )


def shipped_folder(root: Path, model_id: str, preset: str) -> Path:
    """Where the calibration shipped for ``model_id`` at ``preset`` lives under ``root``."""
    return root / model_id / f"dymu-{preset}"


def load_calibration(name_or_path: str | Path, shipped: Path | None = None) -> Calibration:
    """A calibration from a folder, or by name ``<model>/<preset>`` among those shipped under
    ``shipped`` (the folder of shipped checkpoints)."""
    path = Path(name_or_path)
    if path.is_dir():
        return Calibration.load(path)
    model, _, preset = str(name_or_path).rpartition("/")
    if shipped is not None and model and preset in PRESETS and shipped_folder(shipped, model, preset).is_dir():
        return Calibration.load(shipped_folder(shipped, model, preset))
    raise FileNotFoundError(
        f"no DyMU calibration folder or shipped calibration named {str(name_or_path)!r}; shipped names are "
        f"<model>/<preset> with preset in {', '.join(PRESETS)} (see models/checkpoints/*/dymu-*)"
    )


def find_calibration(info: EncoderInfo, calibration: str | Calibration | None, preset: str | None) -> Calibration:
    """The calibration a DyMU reducer gives or names, checked against the encoder it is applied to."""
    if isinstance(calibration, Calibration):
        calibration.check(info, "given")
        return calibration
    if calibration is not None:
        found = load_calibration(calibration, info.shipped)
        found.check(info, repr(calibration))
        return found
    if preset is None:
        raise ValueError("dymu: give calibration= (a saved calibration's name or folder) or preset=")
    folder = shipped_folder(info.shipped, info.model_id, preset) if info.model_id and info.shipped else None
    if folder is None or not folder.is_dir():
        raise ValueError(
            f"dymu: no calibration ships for preset {preset!r} of model {info.model_id or '(unnamed)'}; run "
            f"scripts/calibrate_dymu.py --preset {preset} (or vtc.dymu.calibrate) and pass calibration=<folder>"
        )
    found = Calibration.load(folder)
    found.check(info, f"{info.model_id}/{preset}")
    return found


class MergeScheduleError(ValueError):
    """A target whose merges one layer cannot make (more than half its tokens); the fields let a
    command line name its own options in the advice."""

    def __init__(self, target: float, layer: int, merges: int, cap: int) -> None:
        self.target, self.layer, self.merges, self.cap = target, layer, merges, cap
        super().__init__(f"{self.problem}; raise the target, use schedule=linear, or pass clamp=True")

    @property
    def problem(self) -> str:
        return (f"a target of {self.target} tokens needs {self.merges} merges in layer {self.layer}, more than half "
                f"of the tokens it gets (at most {self.cap})")


def merge_schedule(info: EncoderInfo, target: float | str, schedule: str, clamp: bool = False) -> tuple[float, list[int]]:
    """(target patch tokens, per-layer merges r_l) for an average ``target`` (or a preset name).

    A layer asked for more merges than half its tokens (counted as ToMe would) is an error,
    or with ``clamp`` gets its cap and hands the excess to the layers before it (nearest first):
    shallow encoders need this for low targets. Not in the paper, whose encoders have 24-27 layers.
    """
    patches = info.num_tokens - info.n_prefix
    if isinstance(target, str):
        if target not in PRESETS:
            raise ValueError(f"unknown DyMU preset {target!r}; allowed: {', '.join(PRESETS)}")
        target = round(PRESETS[target] * patches)
    if not 0 < target <= patches:
        raise ValueError(f"target of {target} tokens is outside 1..{patches}, the patch tokens this encoder has")
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; allowed: {', '.join(SCHEDULES)}")
    total, layers = patches - math.ceil(target), info.num_layers
    merges = constant_total(total, layers) if schedule == "constant" else linear_total(total, layers)
    if schedule == "reverse-linear":
        merges = merges[::-1]
    while (over := _first_overflow(merges, info)) is not None:
        layer, cap = over
        if not clamp or layer == 0:
            raise MergeScheduleError(target, layer, merges[layer], cap)
        excess, merges[layer] = merges[layer] - cap, cap
        for i in range(excess):
            merges[layer - 1 - i % layer] += 1
    return float(target), merges


def _first_overflow(merges: list[int], info: EncoderInfo) -> tuple[int, int] | None:
    """(layer, cap) of the first layer asked for more merges than ToMe could make there."""
    n = info.num_tokens
    for layer, r in enumerate(merges):
        cap = merge_capacity(n, info.n_prefix)
        if r > cap:
            return layer, cap
        n -= r
    return None


@dataclass
class CalibrationRecorder(EncoderReducer, register=False):
    """Batch-level bipartite merging that records thresholds (DyMU paper, Sec. 3.1, batch-level
    threshold finding)."""

    name: ClassVar[str] = "dymu-calibration"  # in messages; not a spec name
    needs: ClassVar[frozenset[Signal]] = frozenset({Signal.KEY_MEAN})
    dynamic: ClassVar[bool] = True

    target: float | str = "mid"
    schedule: str = "constant"
    cap: float | None = None
    clamp: bool = False
    prop_attn: bool = True

    def plan(self, info: EncoderInfo) -> list[int | None]:
        self.target_tokens, self.merges = merge_schedule(info, self.target, self.schedule, self.clamp)
        self.sums = torch.zeros(info.num_layers, dtype=torch.float64)
        self.counts = torch.zeros(info.num_layers, dtype=torch.float64)
        return [r or None for r in self.merges]

    def tokens_after(self, num_tokens: int, n_prefix: int, budget: int) -> int:
        return num_tokens

    def reduce(self, state: TokenState, signals: Signals, budget: int, layer: int) -> TokenState:
        score, partner = bipartite_match(signals.need(Signal.KEY_MEAN).float(), state.n_prefix, state.valid)
        if self.cap is not None:  # edges beyond rank cap * r_l within their own image are masked first
            rank = score.argsort(dim=1, descending=True, stable=True).argsort(dim=1)
            score = score.masked_fill(rank >= int(self.cap * budget), float("-inf"))
        is_src, threshold = batch_top_edges(score, budget * score.shape[0])
        self.sums[layer] += threshold
        self.counts[layer] += 1
        dest, real, n_out = bipartite_merge_map(is_src, partner, state.num_tokens, state.n_prefix, state.valid)
        return merge_tokens(state, dest, n_out, self.prop_attn, real)
