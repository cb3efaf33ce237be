"""A minimal Plait plugin: it adds one config key and one subcommand.

Every function decorated with ``@hookimpl`` must be named after a hook in
``plait.hookspecs`` and take a subset of that hook's arguments; Plait refuses
to load a plugin that gets this wrong, naming the plugin.
"""

from pydantic import BaseModel, Field

from plait import hookimpl


class TemplateKeys(BaseModel):
    """Config keys this plugin owns; they validate with the rest of the config."""

    template_greeting: str = Field("hello from a plugin", description="The greeting the template's example key holds.")


@hookimpl
def config_schema():
    return TemplateKeys


@hookimpl
def register_commands(subparsers):
    parser = subparsers.add_parser("hello", help="print a greeting (the plugin template's command)")
    parser.add_argument("--name", default="world")
    parser.set_defaults(func=_hello)


def _hello(args, pm) -> int:
    print(f"hello, {args.name}")
    return 0
