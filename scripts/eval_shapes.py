#!/usr/bin/env python
"""Same as ``vtc eval`` (:mod:`vtc.commands.eval`): every reducer at several budgets on the shipped
shapes checkpoints, or ``--cards`` to check their cards.

    python scripts/eval_shapes.py --examples 1000 --out outputs/shapes
    python scripts/eval_shapes.py --cards
"""

import sys

from vtc.cli import main

if __name__ == "__main__":
    sys.exit(main(["eval", *sys.argv[1:]]))
