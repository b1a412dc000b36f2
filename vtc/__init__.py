"""vtc — visual-token compression for vision transformers and vision-language models.

    import timm, vtc
    model = timm.create_model("vit_small_patch16_224")
    with vtc.apply(model, "tome:r=13") as handle:
        logits = model(images)
        print(handle.token_counts)
"""

from vtc.answer import answer
from vtc.apply import Handle, apply
from vtc.reducers import M3, MQT, DyMU, DyVTE, EViT, HoloV, Pool, RandomDrop, ToMe, VirtualUnmerge, VisualExit, parse_reducer
from vtc.state import TokenState

__version__ = "0.1.0"

__all__ = [
    "DyMU", "DyVTE", "EViT", "Handle", "HoloV", "M3", "MQT", "Pool", "RandomDrop", "ToMe", "TokenState", "VirtualUnmerge", "VisualExit",
    "answer", "apply", "parse_reducer",
    "__version__",
]
