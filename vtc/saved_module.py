"""A module built from a dataclass config and saved as ``<config>.json`` + ``<weights>.safetensors``
(never pickle): the trained parts that methods load by folder (MQT's query transformer, DyVTE's
routers)."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from safetensors.torch import load_file, save_file
from torch import nn

M = TypeVar("M", bound="SavedModule")


class SavedModule(nn.Module):
    """Subclasses set the file names, the config dataclass and the method name used in messages,
    and build themselves from ``config`` alone."""

    config_file: ClassVar[str]
    weights_file: ClassVar[str]
    config_class: ClassVar[type]
    method: ClassVar[str]
    config: Any

    def save(self, folder: str | Path) -> Path:
        """``config_file`` + ``weights_file`` in ``folder`` (created)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().contiguous() for k, v in self.state_dict().items()}, str(folder / self.weights_file))
        (folder / self.config_file).write_text(json.dumps(asdict(self.config), indent=1) + "\n")
        return folder

    @classmethod
    def load(cls: type[M], folder: str | Path) -> M:
        folder = Path(folder)
        if not (folder / cls.config_file).is_file():
            raise FileNotFoundError(f"{cls.method}: no {cls.config_file} in {folder} (a folder written by {cls.__name__}.save)")
        module = cls(cls.config_class(**json.loads((folder / cls.config_file).read_text())))
        module.load_state_dict(load_file(str(folder / cls.weights_file)))
        return module
