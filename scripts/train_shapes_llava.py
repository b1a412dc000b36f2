#!/usr/bin/env python
"""Train the ``shapes-llava`` VLM (recipe and stages: :mod:`vtc.train.shapes_llava`).

Resumable (``--resume`` continues the run saved in ``--out``), stops cleanly at a save point
after ``--max-minutes``, logs every step to ``<out>/training.jsonl`` and draws
``<out>/learning-curve.png``; ``--device cuda`` trains on a GPU (the CPU run is the reference).

    python scripts/train_shapes_llava.py --out models/checkpoints/shapes-llava --overwrite
    python scripts/train_shapes_llava.py --out models/checkpoints/shapes-llava --resume
    python scripts/train_shapes_llava.py --curve models/checkpoints/shapes-llava   # redraw the curve
"""

from vtc.train.cli import train_main
from vtc.train.shapes_llava import ShapesLlavaRecipe, ShapesLlavaTrainer

if __name__ == "__main__":
    train_main("scripts/train_shapes_llava.py", __doc__, ShapesLlavaTrainer, ShapesLlavaRecipe)
