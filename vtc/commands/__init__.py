"""The faces of the ``vtc`` command: one module per subcommand, each a thin layer over a library
function. A module provides ``add_parser(commands)``, which registers its subparser, sets
``handler`` to a function ``(args, parser) -> exit status`` and returns the subparser."""

COMMANDS = ("demo", "eval", "bench", "tune", "calibrate", "viz")
