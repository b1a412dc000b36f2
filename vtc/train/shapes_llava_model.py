"""The ``shapes-llava`` architecture: HF CLIP vision config + projector + Llama decoder, with a
word-level tokenizer over the shapes vocabulary and a LLaVA-1.5 processor, all saved and loaded
like a hub checkpoint (``LlavaForConditionalGeneration`` / ``LlavaProcessor.from_pretrained``).

The tower sees 64 x 64 images in 4 x 4 patches: 256 patch tokens (+ CLS, dropped by the
``default`` feature strategy), so 256 visual tokens reach the decoder. The feature layer is the
tower's last (``vision_feature_layer=-1``) so no trained layer goes unused.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from vtc.data import shapes
from vtc.data.training import MEAN, STD

SPECIAL_TOKENS = ("<pad>", "<unk>", "<s>", "</s>", "<image>")
# The processor's chat template: a user turn of images and a question becomes exactly
# :data:`vtc.data.shapes.PROMPT` ("USER: <image>\n{question} ASSISTANT:"), LLaVA-1.5's format.
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}USER: "
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<image>\n{% endif %}{% endfor %}"
    "{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }} {% endif %}{% endfor %}"
    "{% else %}ASSISTANT: {% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}"
    "{% endif %}{% endfor %}</s> {% endif %}{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


@dataclass(frozen=True)
class ShapesLlavaShape:
    vision_width: int = 96
    vision_layers: int = 6
    vision_heads: int = 3
    patch: int = 4
    text_width: int = 128
    text_layers: int = 6
    text_heads: int = 4
    text_mlp: int = 384
    tie_embeddings: bool = False  # separate answer (LM head) and question (input) word embeddings


def word_tokenizer(words: Sequence[str]) -> Any:
    """A word-level fast tokenizer: :data:`SPECIAL_TOKENS` then ``words``; whitespace and
    punctuation split words, ``<s>`` is prepended, decoding joins words with spaces."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(dict.fromkeys([*SPECIAL_TOKENS, *words]))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", vocab["<s>"])])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"}, padding_side="left")


def build(shape: ShapesLlavaShape = ShapesLlavaShape()) -> tuple[Any, Any]:
    """A freshly initialised (model, processor) pair of the shapes-llava architecture."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    tokenizer = word_tokenizer(shapes.vocabulary())
    size = shapes.IMAGE_SIZE
    vision = CLIPVisionConfig(image_size=size, patch_size=shape.patch, hidden_size=shape.vision_width,
                              intermediate_size=4 * shape.vision_width, num_hidden_layers=shape.vision_layers,
                              num_attention_heads=shape.vision_heads)
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=shape.text_width, intermediate_size=shape.text_mlp,
                       num_hidden_layers=shape.text_layers, num_attention_heads=shape.text_heads,
                       num_key_value_heads=shape.text_heads, max_position_embeddings=512,
                       pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=shape.tie_embeddings)
    config = LlavaConfig(vision_config=vision, text_config=text,
                         image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
                         vision_feature_select_strategy="default", vision_feature_layer=-1,
                         image_seq_length=(size // shape.patch) ** 2, tie_word_embeddings=shape.tie_embeddings)
    config.vtc_shapes = asdict(shape)
    model = LlavaForConditionalGeneration(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.max_new_tokens = 4
    images = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                                image_mean=list(MEAN), image_std=list(STD), resample=3)
    processor = LlavaProcessor(image_processor=images, tokenizer=tokenizer, patch_size=shape.patch,
                               vision_feature_select_strategy="default", image_token="<image>",
                               num_additional_image_tokens=1, chat_template=CHAT_TEMPLATE)
    return model, processor
