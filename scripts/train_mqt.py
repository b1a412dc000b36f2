#!/usr/bin/env python
"""Train MQT's query transformer on a trained LLaVA, in two stages (recipe: :mod:`vtc.train.mqt`).

Resumable (``--resume``), stops cleanly at a save point after ``--max-minutes``, logs every step to
``<out>/training.jsonl`` and draws ``<out>/learning-curve.png``. The checkpoint is the LLaVA folder
with the query transformer in ``mqt/``: ``vtc.apply(model, "mqt:tokens=16")`` finds it there.

    python scripts/train_mqt.py --out outputs/shapes-llava-mqt --threads 2
    python scripts/train_mqt.py --out outputs/shapes-llava-mqt --resume
"""

from vtc.train.cli import train_main
from vtc.train.mqt import MQTRecipe, MQTTrainer

if __name__ == "__main__":
    train_main("scripts/train_mqt.py", __doc__, MQTTrainer, MQTRecipe)
