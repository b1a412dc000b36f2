"""The built wheel installs vtc, vtc.models and vtc.kernels (models/ and kernels/ map into vtc)."""

import os
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHECKPOINTS = ROOT / "models" / "checkpoints"


def test_wheel_contains_and_imports_subpackages(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path)],
        check=True,
    )
    (wheel,) = tmp_path.glob("vtc_vlm-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        assert {"vtc/__init__.py", "vtc/models/__init__.py", "vtc/kernels/__init__.py", "vtc/reducers/tome.py",
                "vtc/train/trainer.py", "vtc/grid.py", "vtc/stats.py"} <= names
        assert not any(name.startswith(("models/", "kernels/")) for name in names), "nothing generic at top level"
        shipped = {f"vtc/models/checkpoints/{path.relative_to(CHECKPOINTS).as_posix()}"
                   for path in CHECKPOINTS.rglob("*") if path.is_file()}
        assert shipped - names == set(), "every shipped file (calibrations, mqt/, dyvte/ included) is in the wheel"
        assert {f"vtc/models/checkpoints/shapes-llava/dymu-{p}/dymu.json" for p in ("low", "mid", "high")} <= shipped
        archive.extractall(tmp_path / "site")
    site = tmp_path / "site"
    probe = (
        "import vtc, vtc.models, vtc.kernels, timm, torch\n"
        f"assert vtc.models.__file__.startswith({str(site)!r}), vtc.models.__file__\n"
        f"assert vtc.kernels.__file__.startswith({str(site)!r}), vtc.kernels.__file__\n"
        "m = timm.create_model('vit_tiny_patch16_224', img_size=32, patch_size=8, depth=2, num_classes=3)\n"
        "with vtc.apply(m, 'tome:r=2') as h:\n"
        "    m(torch.randn(1, 3, 32, 32))\n"
        "assert h.token_counts == [17, 15, 13], h.token_counts\n"
    )
    env = {**os.environ, "PYTHONPATH": str(site)}
    subprocess.run([sys.executable, "-c", probe], check=True, cwd=tmp_path, env=env)
