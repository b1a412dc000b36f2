#!/usr/bin/env python
"""Train the ``shapes-vit`` digit classifier (recipe: :mod:`vtc.train.shapes_vit`).

Resumable (``--resume`` continues the run saved in ``--out``), stops cleanly at a save point
after ``--max-minutes``, logs every step to ``<out>/training.jsonl`` and draws
``<out>/learning-curve.png``; ``--device cuda`` trains on a GPU (the CPU run is the reference).

    python scripts/train_shapes_vit.py --out models/checkpoints/shapes-vit --overwrite
    python scripts/train_shapes_vit.py --out models/checkpoints/shapes-vit --resume
"""

from vtc.train.cli import train_main
from vtc.train.shapes_vit import ShapesVitRecipe, ShapesVitTrainer

if __name__ == "__main__":
    train_main("scripts/train_shapes_vit.py", __doc__, ShapesVitTrainer, ShapesVitRecipe)
