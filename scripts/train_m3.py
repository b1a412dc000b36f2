#!/usr/bin/env python
"""Fine-tune a trained LLaVA with M3's nested scales (recipe: :mod:`vtc.train.m3`).

Resumable (``--resume``), stops cleanly at a save point after ``--max-minutes``, logs every step to
``<out>/training.jsonl`` and draws ``<out>/learning-curve.png``.

    python scripts/train_m3.py --out outputs/shapes-llava-m3 --threads 2
    python scripts/train_m3.py --out outputs/shapes-llava-m3 --resume
"""

from vtc.train.cli import train_main
from vtc.train.m3 import M3Recipe, M3Trainer

if __name__ == "__main__":
    train_main("scripts/train_m3.py", __doc__, M3Trainer, M3Recipe)
