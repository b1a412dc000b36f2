"""lmms-eval integration, installed as a plugin (no fork of lmms-eval): the ``vtc`` model
(:mod:`vtc.lmms.model`, registered by :mod:`vtc.lmms.registration` through the
``lmms_eval.models`` entry-point group) runs any HF LLaVA / LLaVA-NeXT or vtc zoo name under
reducers given in ``--model_args`` (:mod:`vtc.lmms.args`); :func:`export_lmms` writes the shapes
benchmark as a local lmms-eval task. Importing this package does not import lmms-eval.

    lmms-eval --model vtc --model_args pretrained=shapes-llava,reducers=dymu:preset=low|holov:k=16 \\
        --tasks vtc_shapes --include_path DIR --batch_size 4
"""

from vtc.lmms.args import ModelArgs, ModelArgsError, parse_model_args
from vtc.lmms.export import export_lmms

__all__ = ["ModelArgs", "ModelArgsError", "export_lmms", "parse_model_args"]
