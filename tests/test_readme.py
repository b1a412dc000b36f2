"""Every python example in README.md, the user guide (docs/guide.md) and the method notes
(docs/methods/) runs, as written, offline; so does every ``vtc`` command of the guide.

The examples load hub checkpoints by name (``timm.create_model(..., pretrained=True)``,
``from_pretrained("llava-hf/...")``). Here those names resolve to tiny stand-ins with the same
token grids and depths as the real checkpoints (so the README's budgets and printed counts hold)
but small widths and random weights, saved to disk and loaded through the same pretrained-loading
code (timm's ``pretrained_cfg_overlay`` file, HF's ``from_pretrained`` on a folder). Any other hub
name an example asks for fails the test with a message saying so.
"""

from __future__ import annotations

import pathlib
import re
import shlex

import llava_models as lm
import pytest
import torch

from vtc.train.shapes_llava_model import CHAT_TEMPLATE

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
GUIDE = ROOT / "docs" / "guide.md"
DOCS = [README, GUIDE, *sorted((ROOT / "docs" / "methods").glob("*.md"))]
BLOCK = re.compile(r"^```python\n(.*?)^```", re.MULTILINE | re.DOTALL)
SHELL = re.compile(r"^```bash\n(.*?)^```", re.MULTILINE | re.DOTALL)
COMMANDS = [line for block in SHELL.findall(GUIDE.read_text()) for line in block.splitlines() if line.startswith("vtc ")]

# timm name -> create_model overrides: the real depth, patch and image size, a tiny width
TIMM_STAND_INS = {"vit_small_patch16_224": dict(embed_dim=48, num_heads=3)}
# hub id -> build_llava shape: llava-1.5-7b's 336 px / 14 px patches (24 x 24 grid), 24 CLIP layers, 32 Llama
# layers, and its chat template's format ("USER: <image>\n{question} ASSISTANT:", the same as the shapes model's)
LLAVA_STAND_INS = {"llava-hf/llava-1.5-7b-hf": dict(image_size=336, patch_size=14, vision_layers=24, text_layers=32,
                                                    chat_template=CHAT_TEMPLATE)}


def python_blocks(text: str) -> list[tuple[int, str]]:
    """``(line, code)`` of every fenced python block: the line its code starts on (1-based)."""
    return [(text.count("\n", 0, match.start(1)) + 1, match.group(1)) for match in BLOCK.finditer(text)]


BLOCKS = python_blocks(README.read_text())
EXAMPLES = [(doc, line, code) for doc in DOCS for line, code in python_blocks(doc.read_text())]


def test_the_readme_has_its_examples():
    assert len(BLOCKS) >= 4
    assert any("from_pretrained(\"llava-hf/" in code for _, code in BLOCKS)


def test_block_extraction_keeps_line_numbers():
    text = "intro\n```python\nx = 1\ny = 2\n```\n```bash\nls\n```\n```python\nz = 3\n```\n"
    assert python_blocks(text) == [(3, "x = 1\ny = 2\n"), (10, "z = 3\n")]


class StandIns:
    """Tiny local checkpoints for the hub names the README uses, built once per session."""

    def __init__(self, directory: pathlib.Path) -> None:
        self.directory = directory
        self.timm_files: dict[str, pathlib.Path] = {}
        self.llava_dirs: dict[str, pathlib.Path] = {}

    def timm_file(self, create_model, name: str) -> pathlib.Path:
        if name not in self.timm_files:
            from safetensors.torch import save_file

            torch.manual_seed(0)
            model = create_model(name, pretrained=False, **TIMM_STAND_INS[name])
            path = self.directory / f"{name}.safetensors"
            save_file(model.state_dict(), str(path))
            self.timm_files[name] = path
        return self.timm_files[name]

    def llava_dir(self, name: str) -> pathlib.Path:
        if name not in self.llava_dirs:
            folder = self.directory / name.replace("/", "--")
            lm.build_llava(folder, kind="llava", **LLAVA_STAND_INS[name])
            self.llava_dirs[name] = folder
        return self.llava_dirs[name]

    def install(self, monkeypatch) -> None:
        import timm
        import transformers

        create_model = timm.create_model

        def tiny_create_model(name, pretrained=False, **kwargs):
            if name.startswith("local-dir:"):  # shipped checkpoints (models/checkpoints) load as they are
                return create_model(name, pretrained=pretrained, **kwargs)
            if name not in TIMM_STAND_INS:
                raise AssertionError(f"a README example creates timm model {name!r}; give it a stand-in in TIMM_STAND_INS")
            if pretrained:
                kwargs.setdefault("pretrained_cfg_overlay", dict(file=str(self.timm_file(create_model, name))))
            return create_model(name, pretrained=pretrained, **TIMM_STAND_INS[name], **kwargs)

        monkeypatch.setattr(timm, "create_model", tiny_create_model)
        for cls in (transformers.LlavaForConditionalGeneration, transformers.AutoProcessor):
            monkeypatch.setattr(cls, "from_pretrained", self._local(cls.from_pretrained))

    def _local(self, from_pretrained):
        def load(name, *args, **kwargs):
            if str(name) in LLAVA_STAND_INS:
                name = self.llava_dir(str(name))
            elif not pathlib.Path(name).exists():  # shipped checkpoints (models/checkpoints) load as they are
                raise AssertionError(f"a README example loads {name!r}; give it a stand-in in LLAVA_STAND_INS")
            return from_pretrained(name, *args, **kwargs)

        return load


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory) -> StandIns:
    return StandIns(tmp_path_factory.mktemp("readme"))


def test_every_method_note_has_an_example():
    notes = [doc for doc in DOCS if doc.parent.name == "methods" and doc.name != "README.md"]
    assert len(notes) >= 7 and all(any(d == doc for d, _, _ in EXAMPLES) for doc in notes)


@pytest.mark.parametrize(("doc", "line", "code"), EXAMPLES,
                         ids=[f"{doc.relative_to(ROOT)}:{line}" for doc, line, _ in EXAMPLES])
def test_readme_example_runs(doc, line, code, stand_ins, monkeypatch, tmp_path, capsys):
    monkeypatch.chdir(tmp_path)  # examples may write (calibration folders)
    stand_ins.install(monkeypatch)
    program = compile("\n" * (line - 1) + code, str(doc), "exec")  # tracebacks point at the document's lines
    namespace = {"__name__": "__readme__"}
    with torch.random.fork_rng(devices=[]):
        exec(program, namespace)
    printed = capsys.readouterr().out
    if doc != README:
        return
    if "print(handle.token_counts)" in code:  # the counts the README prints: 197 tokens, 13 merged in each of 12 blocks
        assert printed.startswith("[197, 184, ") and "41]" in printed.splitlines()[0]
    if "print(handle.visual_tokens)" in code:
        assert "[64, 64]" in printed.splitlines()[0]  # pooled to 64 tokens per image, as the comment says


def test_the_guide_has_a_command_for_every_face():
    assert {shlex.split(line)[1] for line in COMMANDS} >= {"bench", "tune", "calibrate", "viz", "eval"}


@pytest.mark.parametrize("line", COMMANDS, ids=[shlex.split(line)[1] for line in COMMANDS])
def test_guide_command_runs(line, monkeypatch, tmp_path):
    from vtc.cli import main

    monkeypatch.chdir(tmp_path)  # commands write their outputs here
    assert main(shlex.split(line, comments=True)[1:]) == 0  # as bash reads it: "# ..." is a comment
