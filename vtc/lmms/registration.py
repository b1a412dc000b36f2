"""The ``vtc`` model's manifest, which lmms-eval reads from the ``lmms_eval.models`` entry-point
group (pyproject.toml) when it starts: ``--model vtc`` then loads :class:`vtc.lmms.model.VtcModel`."""

from lmms_eval.models.registry_v2 import ModelManifest

MANIFEST = ModelManifest(model_id="vtc", chat_class_path="vtc.lmms.model.VtcModel")
