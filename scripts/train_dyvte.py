#!/usr/bin/env python
"""Train DyVTE's routers on a frozen trained LLaVA (recipe: :mod:`vtc.train.dyvte`).

Resumable (``--resume``), stops cleanly at a save point after ``--max-minutes``, logs every step to
``<out>/training.jsonl`` and draws ``<out>/learning-curve.png``. ``--out`` becomes the routers'
folder: ``vtc.apply(model, "dyvte:routers=<out>")`` loads them; copied into a checkpoint's
``dyvte/`` folder, ``dyvte:routers=<checkpoint name>`` finds them.

    python scripts/train_dyvte.py --out outputs/shapes-llava-dyvte --threads 2
    python scripts/train_dyvte.py --out outputs/shapes-llava-dyvte --resume
"""

from vtc.train.cli import train_main
from vtc.train.dyvte import DyVTERecipe, DyVTETrainer

if __name__ == "__main__":
    train_main("scripts/train_dyvte.py", __doc__, DyVTETrainer, DyVTERecipe)
