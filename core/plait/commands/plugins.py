"""`plait plugins`: what is installed, with versions and the hooks each implements."""

from __future__ import annotations

import json


def add_arguments(parser) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.add_argument("--hook", metavar="NAME", help="only plugins implementing this hook")


def run(args, pm) -> int:
    from plait.errors import PlaitError

    if args.hook and not hasattr(pm.hook, args.hook):
        known = ", ".join(sorted(n for n in dir(pm.hook) if not n.startswith("_")))
        raise PlaitError(f"--hook {args.hook!r} is not a Plait hook; hooks: {known}")
    plugins = [p for p in pm.list_plugins() if not args.hook or args.hook in p.hooks]
    if args.json:
        print(json.dumps([p.__dict__ for p in plugins], indent=2))
        return 0
    for p in plugins:
        dist = f"{p.distribution} {p.version}" if p.distribution else p.source
        print(f"{p.name}  [{dist}]")
        print(f"    hooks: {', '.join(p.hooks)}")
    return 0
