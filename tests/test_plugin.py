"""A reducer from another installed package: declared by subclassing, found through the
``vtc.reducers`` entry-point group, applied by spec string like vtc's own."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

from vtc.reducers import REDUCERS

PLUGIN = '''
from dataclasses import dataclass
from typing import ClassVar

import torch

from vtc.merge import keep_tokens
from vtc.sites import EncoderInfo, EncoderReducer


@dataclass
class Stride(EncoderReducer):
    """Keep every ``step``-th patch token after block ``layer``."""

    name: ClassVar[str] = "stride"
    layer: int = 0
    step: int = 2

    def plan(self, info: EncoderInfo) -> list:
        return [self.step if i == self.layer else None for i in range(info.num_layers)]

    def tokens_after(self, num_tokens: int, n_prefix: int, budget: int) -> int:
        return n_prefix + -(-(num_tokens - n_prefix) // budget)

    def reduce(self, state, signals, budget, layer):
        kept = torch.arange(state.n_prefix, state.num_tokens, budget, device=state.x.device)
        return keep_tokens(state, kept.expand(state.x.shape[0], -1))
'''

PROBE = '''
import timm, torch, vtc
from vtc.spec import known_reducers

assert "stride" not in vtc.reducers.REDUCERS  # nothing imported the plugin yet
model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=3, num_classes=3)
with vtc.apply(model, "stride:layer=1") as handle:
    model(torch.randn(2, 3, 32, 32))
print(handle.token_counts)
print(vtc.parse_reducer("stride:step=4").describe())
print(sorted(known_reducers()))
try:
    vtc.parse_reducer("stride:step=two")
except ValueError as error:
    print(error)
'''


def install_plugin(site: Path) -> None:
    """Install package ``stride_plugin`` into ``site`` as pip would: the module and a dist-info
    folder whose entry_points.txt names its reducer."""
    (site / "stride_plugin").mkdir(parents=True)
    (site / "stride_plugin" / "__init__.py").write_text(PLUGIN)
    info = site / "stride_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: stride-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[vtc.reducers]\nstride = stride_plugin:Stride\n")


def run_probe(site: Path, probe: str) -> subprocess.CompletedProcess:
    path = os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-c", textwrap.dedent(probe)], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": path}, timeout=300)


def test_an_installed_plugin_reducer_applies_by_spec_string(tmp_path: Path):
    install_plugin(tmp_path)
    result = run_probe(tmp_path, PROBE)
    assert result.returncode == 0, result.stderr
    counts, spec, names, error = result.stdout.strip().splitlines()
    assert counts == "[17, 17, 9, 9]"  # CLS + 16 patches; block 1 keeps every second patch
    assert spec == "stride:step=4"
    assert names == str(sorted([*REDUCERS, "stride"]))  # the built-in reducers and the plugin's
    assert error == "stride: step must be an integer, got 'two'"


def test_a_plugin_taking_a_builtin_name_is_refused(tmp_path: Path):
    install_plugin(tmp_path)
    (tmp_path / "stride_plugin" / "__init__.py").write_text(PLUGIN.replace('"stride"', '"tome"'))
    (tmp_path / "stride_plugin-0.1.dist-info" / "entry_points.txt").write_text("[vtc.reducers]\ntome = stride_plugin:Stride\n")
    result = run_probe(tmp_path, "import vtc\nvtc.parse_reducer('tome:r=1')\n")
    assert result.returncode != 0
    assert "reducer name 'tome' of stride_plugin.Stride is taken by vtc.reducers.tome.ToMe" in result.stderr

