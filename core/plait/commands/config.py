"""`plait config validate|explain|schema`."""

from __future__ import annotations

import json

from plait.commands.common import add_config_arguments, load_run_config


def add_arguments(parser) -> None:
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    validate = actions.add_parser("validate", help="check a config and exit 0 when it is valid")
    add_config_arguments(validate)
    explain = actions.add_parser("explain", help="print every resolved key with its value and source")
    add_config_arguments(explain)
    schema = actions.add_parser("schema", help="print the JSON schema of all keys, plugin keys included")
    schema.add_argument("--key", help="only this key")


def _short(value) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 70 else text[:67] + "..."


def run(args, pm) -> int:
    from plait.config import config_class, explain

    if args.action == "schema":
        schema = config_class(pm).model_json_schema()
        if args.key:
            schema = schema["properties"].get(args.key, {})
        print(json.dumps(schema, indent=2))
        return 0
    if args.action == "validate":
        # build_config looks the optimizer, schedule and dataset types up in the registries, then the
        # pre-flight (data files, output dirs, resume checkpoint) joins the same message; what this machine
        # lacks is a note here (the config may be meant for another machine)
        cfg, pm = load_run_config(args, pm, machine_facts="note", preflight=True)
        for note in cfg.notes:
            print(f"note: {note}")
        print(f"{args.config}: valid")
        return 0
    # explain shows values, even a path not made yet or a package this machine lacks
    cfg, pm = load_run_config(args, pm, check_sources=False, machine_facts="note")
    rows = explain(cfg)
    width = max(len(k) for k, _, _ in rows)
    for key, value, source in rows:
        print(f"{key:<{width}}  {_short(value):<72}  {source}")
    return 0
