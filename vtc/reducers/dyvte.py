"""DyVTE, dynamic visual-token exit (Wu et al., "Accelerating Multimodal Large Language Models via
Dynamic Visual-Token Exit and the Empirical Findings", NeurIPS 2025, arXiv 2411.19628).

A small router after each LLM layer reads the text tokens of the prompt and decides, once per
sample during prefill, whether the image tokens may leave: at the first layer whose router says
"exit", that sample's image tokens leave the sequence and the KV cache of every later layer (the
decoder site's drop machinery, :mod:`vtc.models.decoder`); text keeps its positions.

Router input (Sec. 3, the official code): ``[mean(T[:-1]), T[-1]]``, where ``T`` are the prompt's
text states after the image (everything after the first image token that is not an image token)
and ``T[-1]`` is the prompt's last token; the mean is 0 when no text stands between the image and
the last token (the official code takes a NaN mean there, which never fires). Router: ``W2 GELU(W1
f)`` with no biases, two logits (keep, exit); the decision is their argmax, or ``p_exit >
threshold`` with ``threshold=``. Routers stop after the prefill.

Departures from the official code: the hidden width is an option of the trained routers (the
official 2048 units are 16.8M parameters per layer at 7B; :mod:`vtc.train.dyvte` defaults to
256, twice the width of the shapes model's 128-wide LLM; 2048 was not tried there, so whether
256 loses anything is not measured); there is no router after the last
layer (an exit there removes nothing); positions come from the image placeholders, never a
template's offsets; batches exit per sample.

The training labels (:func:`exit_labels`, the official rule): exiting after layer k is right for a
sample when the teacher-forced answer's greedy tokens agree with the full model's on more than
99% of the answer positions and its cross-entropy stays below 1.03 times the full model's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from vtc.options import expects
from vtc.saved_module import SavedModule
from vtc.sites import DecoderInfo, DecoderReducer

CONFIG_FILE = "dyvte.json"
WEIGHTS_FILE = "routers.safetensors"
SHIPPED_FOLDER = "dyvte"  # a checkpoint's folder holding routers trained for it
MODES = ("drop", "mask")


def router_features(hidden: torch.Tensor, visual: torch.Tensor, prompt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """DyVTE's router input per row: ``[mean of the text states after the image except the last
    prompt token, the last prompt token's state]`` (B, 2D), and (B,) whether a decision is possible
    (the row has image tokens and a prompt token after them).

    ``hidden`` (B, S, D): a layer's output; ``visual`` (B, S): image tokens; ``prompt`` (B, S): the
    prompt's real tokens (padding and, in training, the answer excluded), any padding side."""
    positions = torch.arange(hidden.shape[1], device=hidden.device)
    last = torch.where(prompt, positions, -1).amax(1)
    first_image = torch.where(visual, positions, hidden.shape[1]).amin(1)
    text = prompt & ~visual & (positions > first_image[:, None]) & (positions != last[:, None])
    total = hidden.masked_fill(~text[..., None], 0).sum(1)
    mean = total / text.sum(1, keepdim=True).clamp(min=1).to(hidden.dtype)
    final = hidden.gather(1, last.clamp(min=0)[:, None, None].expand(-1, 1, hidden.shape[2]))[:, 0]
    last_is_text = (last > first_image) & ~visual.gather(1, last.clamp(min=0)[:, None])[:, 0]
    return torch.cat([mean, final], dim=-1), visual.any(1) & last_is_text


def exit_labels(full: torch.Tensor, exited: torch.Tensor, targets: torch.Tensor, agreement: float = 0.99,
                loss_ratio: float = 1.03) -> torch.Tensor:
    """(B,) bool: exiting keeps the answer. ``full`` / ``exited`` (B, S, V) are the logits that
    predict ``targets`` (B, S; -100 where no answer token is predicted) without and with the exit.
    True where the greedy tokens agree on more than ``agreement`` of the answer positions and the
    mean answer cross-entropy with the exit is below ``loss_ratio`` times the full model's."""
    answer = targets != -100
    counts = answer.sum(1)
    if bool((counts == 0).any()):
        rows = (counts == 0).nonzero().flatten().tolist()
        raise ValueError(f"dyvte: rows {rows} have no answer token to compare (targets all -100)")
    same = (full.argmax(-1) == exited.argmax(-1)) & answer
    agree = same.sum(1) / counts
    safe = targets.clamp(min=0)

    def answer_loss(logits: torch.Tensor) -> torch.Tensor:
        token = F.cross_entropy(logits.float().transpose(1, 2), safe, reduction="none")
        return (token * answer).sum(1) / counts

    return (agree > agreement) & (answer_loss(exited) < loss_ratio * answer_loss(full))


@dataclass(frozen=True)
class RouterConfig:
    """The shape of a set of routers and the model they were trained for."""

    num_layers: int  # LLM layers (a router after each but the last)
    hidden_size: int  # the LLM's width D (routers read 2D)
    width: int = 256  # hidden units of each router
    model: str = ""  # the checkpoint trained for (its folder name or hub id; "" = not recorded)


class Routers(SavedModule):
    """One two-layer router per LLM layer but the last: ``W2 GELU(W1 f)``, no biases, Xavier
    init (the official ``init_weight.py``)."""

    config_file, weights_file, config_class, method = CONFIG_FILE, WEIGHTS_FILE, RouterConfig, "dyvte"

    def __init__(self, config: RouterConfig) -> None:
        super().__init__()
        if config.num_layers < 2 or config.hidden_size < 1 or config.width < 1:
            raise ValueError(f"dyvte: routers need num_layers >= 2, hidden_size >= 1, width >= 1, got {config}")
        self.config = config
        self.first = nn.Parameter(torch.empty(config.num_layers - 1, config.width, 2 * config.hidden_size))
        self.second = nn.Parameter(torch.empty(config.num_layers - 1, 2, config.width))
        for weights in (self.first, self.second):
            for matrix in weights:
                nn.init.xavier_uniform_(matrix)

    def forward(self, layer: int, features: torch.Tensor) -> torch.Tensor:
        """(B, 2) logits (keep, exit) of the router after ``layer`` for ``features`` (B, 2D)."""
        hidden = F.gelu(features.to(self.first.dtype) @ self.first[layer].T)
        return hidden @ self.second[layer].T


def find_routers(routers: str | None, source: str | None, shipped: Path | None = None) -> Path:
    """The folder of ``routers``: a folder holding ``dyvte.json``, or the name of a checkpoint
    shipped under ``shipped`` whose folder holds routers (its ``dyvte/``); None: the applied model's
    own checkpoint's (``source``)."""
    if routers is not None and (Path(routers) / CONFIG_FILE).is_file():
        return Path(routers)
    if routers is not None:
        if shipped is not None and "/" not in routers and (shipped / routers / SHIPPED_FOLDER / CONFIG_FILE).is_file():
            return shipped / routers / SHIPPED_FOLDER
        with_routers = sorted(p.parent.parent.name for p in shipped.glob(f"*/{SHIPPED_FOLDER}/{CONFIG_FILE}")) if shipped else []
        raise FileNotFoundError(f"dyvte: routers={routers!r} is neither a folder holding {CONFIG_FILE} nor a shipped "
                                f"checkpoint with routers (shipped with routers: {', '.join(with_routers) or 'none'})")
    if source is not None and (Path(source) / SHIPPED_FOLDER / CONFIG_FILE).is_file():
        return Path(source) / SHIPPED_FOLDER
    raise ValueError(f"dyvte: give routers=<folder or shipped name>; this model ({source!r}) ships none")


@dataclass
class DyVTE(DecoderReducer):
    """Learned per-sample visual-token exit (see the module docstring).

    Args:
        routers: a folder written by :meth:`Routers.save`, or the name of a shipped checkpoint holding
            routers (``routers=shapes-llava``); default: the applied model's own checkpoint's.
        threshold: exit where ``p_exit > threshold`` (0 < threshold < 1; higher exits later); default:
            the argmax of the two logits, as the paper.
        mode: "drop" (the image tokens leave the sequence and later layers' KV cache) or "mask"
            (hidden from attention instead: the same outputs, no savings; the reference).
        module: (Python only) a :class:`Routers` module to use as it is (training).
    """

    name: ClassVar[str] = "dyvte"

    routers: str | None = None
    threshold: float | None = expects("a number between 0 and 1 (exclusive)", default=None)
    mode: str = "drop"
    module: Routers | None = field(default=None, repr=False, compare=False, metadata={"spec": False})

    def __post_init__(self) -> None:
        if self.threshold is not None and not (isinstance(self.threshold, (int, float)) and 0 < self.threshold < 1):
            raise ValueError(f"dyvte: threshold must be strictly between 0 and 1, got {self.threshold!r}")
        if self.mode not in MODES:
            raise ValueError(f"dyvte: mode must be one of {', '.join(MODES)}, got {self.mode!r}")

    def layers(self, info: DecoderInfo) -> tuple[int, ...]:
        if self.module is None:
            self.module = Routers.load(find_routers(self.routers, info.source, info.shipped))
        config = self.module.config
        if (config.num_layers, config.hidden_size) != (info.num_layers, info.hidden_size):
            raise ValueError(f"dyvte: these routers are for an LLM of {config.num_layers} layers x {config.hidden_size} "
                             f"(model {config.model or 'unrecorded'}); this one has {info.num_layers} x {info.hidden_size}")
        applied = Path(info.source).name if info.source else ""
        if config.model and applied and Path(config.model).name != applied:
            raise ValueError(f"dyvte: these routers were trained for {config.model!r}, not for this model ({applied!r}); "
                             f"an exit decision is only calibrated on the model it was trained on")
        return tuple(range(info.num_layers - 1))

    def removal(self) -> str:
        return self.mode

    def select(self, layer: int, hidden: torch.Tensor, visual: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        assert self.module is not None, "layers() loads the routers"
        self.module.to(hidden.device)
        features, decidable = router_features(hidden, visual, valid)
        logits = self.module(layer, features).float()
        if self.threshold is None:
            fire = logits[:, 1] > logits[:, 0]
        else:
            fire = logits.softmax(-1)[:, 1] > self.threshold
        return valid & ~(visual & (fire & decidable)[:, None])
