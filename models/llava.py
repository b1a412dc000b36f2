"""HF ``LlavaForConditionalGeneration`` / ``LlavaNextForConditionalGeneration`` adapter: all three sites.

``vtc.apply(model, "tome:r=2", "pool:tokens=64", "exit:layer=8")`` puts one reducer at each site:
the encoder (inside the vision tower, up to the vision feature layer), the connector (per-image
visual sequence, see ``llava_vision``) and the decoder (after chosen LLM layers, ``decoder``).

The model's own ``forward`` and ``generate`` keep taking the processor's inputs, with placeholders
for the full, unreduced count (rebuilt inside the model, not by the processor): vtc encodes the images,
finds each image's placeholders from ``image_token_id``, keeps as many as the image has tokens,
re-pads every row (left for ``generate``, the input's side for ``forward``) and runs the language
model from ``inputs_embeds``. ``forward`` therefore returns logits for the rebuilt, shorter
sequence (right-aligned with the input under left padding); ``labels`` are carried over to it.
``generate`` returns the caller's ``input_ids`` followed by the new tokens, as HF does.
Position ids follow ``positions="contiguous"`` (default) or ``"original"`` (``vtc.sequence``).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import Any, ClassVar

import torch
from torch import nn

from vtc.models.base import EXECUTIONS
from vtc.models.decoder import DecoderSite
from vtc.models.llava_vision import LlavaTowerAdapter, VisualPipeline, VisualTokens
from vtc.models.patching import InstancePatcher
from vtc.models.vtu import VirtualMap, VirtualUnmergeSite
from vtc.sequence import Assembled, assemble, image_slots, padding_side, repeat_covered, virtual_groups
from vtc.sites import ConnectorInfo, EncoderInfo, Reducer, Site, UnmergingReducer
from vtc.state import TokenState


def _llava_classes() -> tuple[type, ...]:
    try:
        from transformers import LlavaForConditionalGeneration, LlavaNextForConditionalGeneration
    except ImportError:
        return ()
    return (LlavaForConditionalGeneration, LlavaNextForConditionalGeneration)


class LlavaAdapter:
    """Reducers at the encoder, connector and decoder sites of one HF LLaVA(-NeXT) instance."""

    family: ClassVar[str] = "llava"
    sites: ClassVar[tuple[Site, ...]] = (Site.ENCODER, Site.CONNECTOR, Site.DECODER)
    POSITIONS: ClassVar[tuple[str, ...]] = ("contiguous", "original")
    # what vtc.apply(..., **options) takes; execution: the tower's, as for a bare encoder (vtc.models.base)
    options: ClassVar[dict[str, str]] = {"positions": " or ".join(POSITIONS), "execution": " or ".join(EXECUTIONS)}

    @classmethod
    def accepts(cls, model: object) -> bool:
        return isinstance(model, _llava_classes())

    @classmethod
    def build(cls, model: nn.Module, reducers: dict[Site, Reducer], positions: str = "contiguous",
              execution: str = "auto") -> LlavaAdapter:
        return cls(model, reducers, positions, execution)

    def __init__(self, model: nn.Module, reducers: dict[Site, Reducer], positions: str = "contiguous",
                 execution: str = "auto") -> None:
        from transformers import LlavaNextForConditionalGeneration

        if positions not in self.POSITIONS:
            raise ValueError(f"positions must be one of {', '.join(self.POSITIONS)}, got {positions!r}")
        self.model, self.inner, self.config = model, model.model, model.config
        self.positions = positions
        self.is_next = isinstance(model, LlavaNextForConditionalGeneration)
        self.family = "llava-next" if self.is_next else "llava"
        self.reducers = reducers
        tower = self.inner.vision_tower
        num_layers = tower.config.num_hidden_layers
        layers = self.config.vision_feature_layer
        layers = [layers] if isinstance(layers, int) else list(layers)
        self.feature_layers = [layer % (num_layers + 1) for layer in layers]
        encoder = reducers.get(Site.ENCODER)
        if encoder is not None and len(layers) > 1:
            raise ValueError(
                f"{encoder.name}: this model concatenates vision layers {layers}, whose token counts an encoder "
                f"reducer would make differ; use a connector reducer instead"
            )
        self.tower = LlavaTowerAdapter(tower, encoder, max(self.feature_layers), getattr(self.config, "_name_or_path", None),
                                       execution)
        strategy = self.config.vision_feature_select_strategy
        if self.is_next and strategy != "default":
            raise ValueError(
                f"vtc supports LLaVA-NeXT with vision_feature_select_strategy='default' only (HF's tile packing "
                f"assumes it); this model has {strategy!r}"
            )
        if encoder is not None and strategy == "default" and not self.tower.info.has_cls:
            raise ValueError(
                f"{encoder.name}: the 'default' feature strategy drops the first token, which on a tower without a "
                f"CLS token is a patch an encoder reducer may have merged; use vision_feature_select_strategy='full'"
            )
        connector = reducers.get(Site.CONNECTOR)
        self.pipeline = VisualPipeline(self.inner, self.config, self.tower, self.feature_layers, connector, self.is_next)
        if connector is not None:
            # LLaVA-NeXT images differ in token count (checked per image when they arrive)
            dynamic = encoder is not None and encoder.dynamic
            count = None if self.is_next or dynamic else self.tower.planned_token_counts()[-1] - self.pipeline.drop - self.pipeline.n_prefix
            feature_width = self.config.vision_config.hidden_size * len(self.feature_layers)
            connector.check_connector(ConnectorInfo(
                self.family, count, self.pipeline.n_prefix, self.tower.info.grid, self.tower.info.has_cls,
                reordered=encoder is not None, feature_width=feature_width,
                llm_width=self.config.text_config.hidden_size, source=getattr(self.config, "_name_or_path", None) or None))
            if connector.connector_needs:
                self.tower.extra_needs[self.pipeline.signal_layer] = frozenset(connector.connector_needs)
        self._patcher = InstancePatcher()
        self.decoder = self.vtu = None
        if isinstance(reducers.get(Site.DECODER), UnmergingReducer):
            self.vtu = VirtualUnmergeSite(self.inner.language_model, reducers[Site.DECODER].mode, self._patcher)
        elif Site.DECODER in reducers:
            self.decoder = DecoderSite(self.inner.language_model, reducers[Site.DECODER], self._patcher,
                                       source=getattr(self.config, "_name_or_path", None) or None)
        self.layout: Assembled | None = None
        self.visual: VisualTokens | None = None
        self.virtual = None  # vtc.models.vtu.VirtualMap of the last call under virtual unmerging

    # ----- reports -------------------------------------------------------------------------------
    @property
    def state(self) -> TokenState | None:
        """The encoder site's state after the last run block (tiles for LLaVA-NeXT)."""
        return self.tower.state

    @property
    def info(self) -> EncoderInfo:
        """The encoder site's (the tower's) info."""
        return self.tower.info

    def encode_pixels(self, pixels: torch.Tensor) -> TokenState:
        """Run the tower up to the vision feature layer on ``pixels``; the state after its last run block."""
        self.tower.encode(pixels, [self.tower.num_run])
        if self.tower.state is None:
            raise RuntimeError("the LLaVA tower ran no patched block on these pixels")
        return self.tower.state

    @property
    def token_counts(self) -> list[int]:
        return list(self.tower.token_counts)

    def planned_token_counts(self) -> list[int]:
        return self.tower.planned_token_counts()

    @property
    def image_token_counts(self) -> torch.Tensor | None:
        """(views, L + 1) real tokens per image (tile) entering each tower block, then leaving the last."""
        return self.tower.image_token_counts

    @property
    def visual_tokens(self) -> list[int]:
        """Visual tokens each image of the last call brought into the LLM (newlines included)."""
        return [] if self.visual is None else [f.shape[0] for f in self.visual.features]

    @property
    def decoder_token_counts(self) -> list[int] | None:
        """Sequence length each LLM layer ran on in the last prefill (decoder site), then the output."""
        return None if self.decoder is None else list(self.decoder.token_counts)

    @property
    def exit_layers(self) -> list[int] | None:
        """Per prompt of the last prefill: the last LLM layer that saw image tokens (decoder site)."""
        exits = None if self.decoder is None else self.decoder.exit_layers
        return None if exits is None else exits.tolist()

    # ----- install / remove ------------------------------------------------------------------------
    def install(self) -> None:
        try:
            self.tower.install()
            for site in (self.decoder, self.vtu):
                if site is not None:
                    site.install()
            self._patcher.set(self.inner, "forward", functools.partial(self.inner_forward, self.inner.forward))
            self._patcher.set(self.model, "forward", functools.partial(self.outer_forward, self.model.forward))
            self._patcher.set(self.model, "generate", functools.partial(self.generate, self.model.generate))
        except BaseException:
            self.remove()
            raise

    def remove(self) -> None:
        self._patcher.restore()
        self.tower.remove()

    # ----- the visual path -----------------------------------------------------------------------
    def encode_images(self, pixel_values: torch.Tensor, image_sizes: torch.Tensor | None = None) -> VisualTokens:
        """Vision tower, feature selection, connector reducer and projector: the LLM's visual tokens."""
        self.visual = self.pipeline.encode(pixel_values, image_sizes)
        return self.visual

    def build_inputs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, visual: VisualTokens,
                     side: str) -> Assembled:
        """The rebuilt LLM input for processor ``input_ids`` and the images' reduced tokens.

        Under virtual unmerging every placeholder a token covers keeps it (the full-length prompt
        when nothing is dropped) and ``self.virtual`` maps each position to its unique token."""
        if input_ids is None:
            raise ValueError("vtc locates image placeholders from input_ids; pass input_ids with pixel_values, not inputs_embeds")
        slots = image_slots(input_ids, self.config.image_token_id, visual.placeholders)
        embeds = self.inner.get_input_embeddings()(input_ids)
        pad = self.config.text_config.pad_token_id if self.config.text_config.pad_token_id is not None else 0
        features, anchors, groups = visual.features, visual.anchors, None
        if self.vtu is not None:
            repeated = [repeat_covered(f, cover) for f, cover in zip(visual.features, visual.covers)]
            features, anchors, groups = ([r[i] for r in repeated] for i in range(3))
        self.layout = assemble(embeds, input_ids, attention_mask, slots, features, anchors,
                               side=side, positions=self.positions, pad_token_id=pad)
        if self.vtu is not None:
            self.virtual = VirtualMap(*virtual_groups(self.layout, groups))
        return self.layout

    def _check_vision_options(self, kwargs: dict[str, Any]) -> None:
        for name in ("vision_feature_layer", "vision_feature_select_strategy"):
            value = kwargs.pop(name, None)
            if value is not None and value != getattr(self.config, name):
                raise ValueError(f"vtc planned the reducers for {name}={getattr(self.config, name)!r}; got {value!r}")
        if kwargs.get("mm_encoder_outputs") is not None:
            raise ValueError("vtc computes the image features itself; pass pixel_values, not mm_encoder_outputs")

    # ----- patched entry points ------------------------------------------------------------------
    def inner_forward(self, original, input_ids=None, pixel_values=None, attention_mask=None, position_ids=None,
                      inputs_embeds=None, image_sizes=None, **kwargs):
        """``LlavaModel.forward``: rebuild the sequence when images come in, then run the LLM."""
        if pixel_values is None:
            return original(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                            inputs_embeds=inputs_embeds, image_sizes=image_sizes, **kwargs)
        self._check_vision_options(kwargs)
        if inputs_embeds is not None:
            raise ValueError("vtc locates image placeholders from input_ids; pass input_ids with pixel_values, not inputs_embeds")
        visual = self.encode_images(pixel_values, image_sizes)
        layout = self.build_inputs(input_ids, attention_mask, visual, padding_side(attention_mask))
        if position_ids is not None:  # the caller's positions, for the tokens that remain
            position_ids = position_ids.gather(1, layout.source.clamp_min(0))
        elif self.positions == "original":
            position_ids = layout.position_ids
        with self.decoder_visual(layout):
            return original(input_ids=None, inputs_embeds=layout.inputs_embeds, attention_mask=layout.attention_mask,
                            position_ids=position_ids, **kwargs)

    def outer_forward(self, original, *args, labels=None, **kwargs):
        """``forward`` of the model with the LM head: carry ``labels`` over to the rebuilt sequence."""
        has_images = kwargs.get("pixel_values") is not None or (len(args) > 1 and args[1] is not None)
        if labels is None or not has_images:
            return original(*args, labels=labels, **kwargs)
        if self.decoder is not None and self.decoder.mode == "drop":
            raise ValueError(
                f"labels cannot follow a sequence the decoder site shortens inside the LLM; apply "
                f"{self.decoder.reducer.name} with mode=mask to compute a loss"
            )
        out = original(*args, **kwargs)
        source = self.layout.source
        moved = labels.gather(1, source.clamp_min(0)).masked_fill(source < 0, -100)
        out.loss = self.model.loss_function(logits=out.logits, labels=moved, vocab_size=self.config.text_config.vocab_size)
        return out

    def generate(self, original, inputs=None, **kwargs):
        """``generate`` from the rebuilt, left-padded sequence; returns the caller's ids + new tokens."""
        pixel_values = kwargs.pop("pixel_values", None)
        if pixel_values is None:
            return original(inputs, **kwargs)
        input_ids = inputs if inputs is not None else kwargs.pop("input_ids", None)
        self._check_vision_options(kwargs)
        if kwargs.get("inputs_embeds") is not None:
            raise ValueError("vtc locates image placeholders from input_ids; pass input_ids with pixel_values, not inputs_embeds")
        attention_mask = kwargs.pop("attention_mask", None)
        config = kwargs.get("generation_config") or self.model.generation_config
        beams = kwargs.get("num_beams") or config.num_beams or 1
        if self.decoder is not None and (beams > 1 or kwargs.get("assistant_model") is not None):
            raise ValueError(
                f"{self.decoder.reducer.name}: the decoder site keeps per-layer cache maps that beam search and "
                f"assisted decoding reorder or crop; use greedy or sampling generation with it"
            )
        if kwargs.get("max_length") is not None and kwargs.get("max_new_tokens") is None:
            # HF counts max_length from the caller's prompt; keep that meaning for the shorter one
            kwargs["max_new_tokens"] = max(1, kwargs.pop("max_length") - input_ids.shape[1])
        visual = self.encode_images(pixel_values, kwargs.pop("image_sizes", None))
        layout = self.build_inputs(input_ids, attention_mask, visual, "left")
        if self.positions == "original":
            kwargs["position_ids"] = layout.position_ids
        with self.decoder_visual(layout):
            out = original(input_ids=layout.input_ids, inputs_embeds=layout.inputs_embeds,
                           attention_mask=layout.attention_mask, **kwargs)
        sequences = out if isinstance(out, torch.Tensor) else out.sequences
        prompts = input_ids.repeat_interleave(sequences.shape[0] // input_ids.shape[0], dim=0)  # num_return_sequences
        full = torch.cat([prompts, sequences[:, layout.input_ids.shape[1]:]], dim=1)
        if isinstance(out, torch.Tensor):
            return full
        out.sequences = full
        return out

    @contextlib.contextmanager
    def decoder_visual(self, layout: Assembled) -> Iterator[None]:
        """Tell the decoder site which tokens of ``layout`` are visual (or, under virtual
        unmerging, which token stands at each position) for the duration of a call."""
        if self.vtu is not None:
            self.vtu.set_map(self.virtual)
        elif self.decoder is not None:
            self.decoder.set_visual(layout.visual)
        try:
            yield
        finally:
            if self.vtu is not None:
                self.vtu.set_map(None)
            elif self.decoder is not None:
                self.decoder.set_visual(None)
