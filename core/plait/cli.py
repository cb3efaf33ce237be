"""The ``plait`` command line.

Built with argparse; every subcommand lives in its own module under
:mod:`plait.commands` with ``add_arguments(parser)`` and ``run(args, pm)``.
Command modules import nothing heavy at module level, so ``plait --help``
never imports torch. Plugins add subcommands through ``register_commands``.

Every subcommand parses its flags and ``key=value`` overrides in any order
(``plait preprocess cfg.yml --no-progress lr=1e-4``) and accepts ``--debug``
and ``--verbose`` anywhere. Bad input (:class:`plait.errors.PlaitError`) prints one message and
exits 2; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

#: subcommand -> (module under plait.commands, one-line help)
COMMANDS = {
    "train": ("train", "fine-tune a model from a config"),
    "quickstart": ("quickstart", "generate a tiny model and task, train it on the CPU, show accuracy before/after"),
    "preprocess": ("preprocess", "tokenize and cache the datasets of a config"),
    "inspect": ("inspect", "show tokenized rows with trained and masked tokens apart"),
    "evaluate": ("evaluate", "report eval loss and perplexity of a trained model"),
    "inference": ("inference", "chat with a trained model"),
    "merge-lora": ("merge_lora", "merge a LoRA adapter into its base model"),
    "plugins": ("plugins", "list installed plugins, their versions and hooks"),
    "config": ("config", "validate, explain or print the schema of a config"),
    "examples": ("examples", "list the example configs, or copy one into the current directory"),
}


class SubcommandParser(argparse.ArgumentParser):
    """The parser of every subcommand (plugins' included).

    Flags and positionals may be intermixed (argparse's
    ``parse_known_intermixed_args``), so overrides after a flag are still
    overrides; ``--debug`` is accepted here as well as before the subcommand.
    A parser with its own subcommands, or a ``REMAINDER`` positional, parses
    the classic way (argparse cannot intermix those).
    """

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("conflict_handler", "resolve")  # a plugin's own --debug wins over ours
        super().__init__(*args, **kwargs)
        self._intermixing = False
        self.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                          help="show tracebacks for errors")
        self.add_argument("--verbose", action="store_true", default=argparse.SUPPRESS,
                          help="show every library's warnings and progress bars")

    def parse_known_args(self, args=None, namespace=None):
        classic = self._intermixing or any(a.nargs in (argparse.PARSER, argparse.REMAINDER) for a in self._actions)
        if classic:
            return super().parse_known_args(args, namespace)
        self._intermixing = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._intermixing = False


def build_parser(pm) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="plait",
        description="Fine-tune large language models from one YAML file.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    parser.add_argument("--verbose", action="store_true", help="show every library's warnings and progress bars")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=SubcommandParser)
    for name, (module_name, help_text) in COMMANDS.items():
        module = importlib.import_module(f"plait.commands.{module_name}")
        sub = subparsers.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(sub)
        sub.set_defaults(func=module.run)
    pm.hook.register_commands(subparsers=subparsers)
    return parser


def main(argv: list[str] | None = None, *, extra_plugins=()) -> int:
    from plait.errors import PlaitError
    from plait.logs import set_verbose, show_library_bars, show_plait_logs, verbose
    from plait.plugins import build_plugin_manager

    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv
    # before any library is imported: transformers reads its verbosity once
    set_verbose("--verbose" in argv)
    show_plait_logs()
    try:
        pm = build_plugin_manager(extra=list(extra_plugins))
        parser = build_parser(pm)
        try:
            args = parser.parse_args(argv)
        except SystemExit as exc:  # --help, or argparse's own usage error (exit 2)
            return int(exc.code or 0)
        if not getattr(args, "func", None):
            parser.print_help()
            return 0
        args.extra_plugins = list(extra_plugins)
        show_library_bars(verbose())  # after parsing: --help imports no library
        return int(args.func(args, pm) or 0)
    except PlaitError as exc:
        if debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return getattr(exc, "exit_code", 2)  # 2, or the shell's status for a signal that stopped training
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def entry_point() -> None:  # console script
    sys.exit(main())


if __name__ == "__main__":
    entry_point()
