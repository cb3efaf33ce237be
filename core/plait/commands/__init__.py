"""One module per ``plait`` subcommand: ``add_arguments(parser)`` and ``run(args, pm)``."""
