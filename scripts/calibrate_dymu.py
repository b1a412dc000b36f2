#!/usr/bin/env python
"""Same as ``vtc calibrate`` (:mod:`vtc.commands.calibrate`): DyMU thresholds for a model.

    python scripts/calibrate_dymu.py --model shapes-vit --preset mid --out models/checkpoints/shapes-vit/dymu-mid
"""

import sys

from vtc.cli import main

if __name__ == "__main__":
    sys.exit(main(["calibrate", *sys.argv[1:]]))
