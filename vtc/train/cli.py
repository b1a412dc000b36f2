"""The command line every training script shares: ``--out``, ``--resume``, ``--overwrite``,
``--curve``, and one option per field of the recipe and of :class:`RunOptions`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from vtc.commands.options import add_options, command, from_options
from vtc.train.curve import plot_curve
from vtc.train.output import OutputError
from vtc.train.state import StateMismatchError
from vtc.train.trainer import CURVE, LOG, RunOptions, Trainer


def train_main(script: str, description: str, trainer: type[Trainer], recipe: type,
               argv: list[str] | None = None) -> None:
    """Parse ``argv``, then train (or resume, or only redraw a curve); prints the card at the end."""
    parser = argparse.ArgumentParser(prog=Path(script).name, description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("outputs") / trainer.name,
                        help="folder of the run and of the checkpoint it writes")
    parser.add_argument("--overwrite", action="store_true", help="start over in an --out that holds a run or checkpoint")
    parser.add_argument("--resume", action="store_true", help="continue the run saved in --out (same recipe)")
    parser.add_argument("--curve", type=Path, metavar="DIR", help="only redraw DIR's learning curve from its log")
    add_options(parser, recipe)
    add_options(parser, RunOptions)
    args = parser.parse_args(argv)
    if args.curve:
        print(plot_curve(args.curve / LOG, args.curve / CURVE, title=trainer.name))
        return
    try:
        run = trainer(from_options(recipe, args), args.out, from_options(RunOptions, args))
        finished = run.run(args.resume, args.overwrite, command(script, argv))
    except (OutputError, StateMismatchError, FileNotFoundError) as error:
        parser.error(str(error))
    if finished:
        card = json.loads((args.out / "card.json").read_text())
        print(f"test accuracy {card['test_accuracy']:.4f} ({card['test_examples']} examples); by type "
              f"{json.dumps(card['test_by_type'])}\nsaved to {args.out}")
