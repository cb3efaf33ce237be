"""Argument and config handling shared by the subcommands."""

from __future__ import annotations

import sys


def add_config_arguments(parser) -> None:
    """``CONFIG [key=value ...]`` and the flags every config-taking command has."""
    parser.add_argument("config", help="path to the YAML config")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="override config keys (OmegaConf dotlist: lr=1e-4 datasets.0.path=x.jsonl); "
                             "before or after the flags")
    parser.add_argument("--allow-unsupported", action="store_true",
                        help="warn about Axolotl keys Plait does not support instead of failing")


def load_run_config(args, pm=None, *, check_sources: bool = True, extra_checks=(), machine_facts: str = "refuse",
                    preflight: bool = False):
    """Read, merge and validate the config named on the command line.

    Builds the run's plugin manager (adding the config's ``plugins:``) and
    returns ``(cfg, pm)``. Raises :class:`plait.errors.ConfigError` naming
    every problem found, before any model work. ``check_sources`` also refuses
    a ``base_model`` or ``tokenizer_config`` that names a local path that does
    not exist (off for commands that create it, like ``quickstart``, or only
    show the config). ``extra_checks`` are run on the typed config and their
    problems join the same message. ``machine_facts="note"`` turns what this
    machine lacks (:class:`plait.errors.MachineFactError`) into notes.
    ``preflight`` adds the pre-flight of the machine and the filesystem
    (:func:`file_preflight`) to the same message.
    """
    from plait.config import build_config, load_raw_config
    from plait.config.problems import Problems
    from plait.model.loading import check_model_sources
    from plait.plugins import build_plugin_manager, split_plugin_entries

    raw, sources = load_raw_config(args.config, args.overrides)
    problems = Problems()
    plait_entries, axolotl_entries = split_plugin_entries(raw.get("plugins") or [], problems)
    if isinstance(raw.get("plugins"), (str, list)):
        raw["plugins"] = plait_entries  # the Axolotl integrations are resolved below, not imported
    disable = plugin_names(raw, "disable_plugins")
    if pm is None or plait_entries or disable:
        pm = build_plugin_manager(plait_entries, disable=disable, extra=getattr(args, "extra_plugins", []))
    resolve_axolotl_plugins(axolotl_entries, pm, problems, raw, sources)
    checks = [check_model_sources] if check_sources else []
    if preflight:
        checks.append(lambda cfg: file_preflight(cfg, problems))
    cfg = build_config(pm, raw, sources, allow_unsupported=args.allow_unsupported, problems=problems,
                       extra_checks=[*checks, *extra_checks], machine_facts=machine_facts)
    return cfg, pm


def file_preflight(cfg, problems) -> None:
    """The machine and filesystem checks `plait train` makes before any model
    loads (:mod:`plait.train.preflight`), filed with the config's other
    problems: a missing file or an unwritable directory under their own group,
    a package this machine lacks (flash-attn) as a machine fact (a note for
    validate, a refusal for train)."""
    from plait.train.preflight import preflight

    report = preflight(cfg)
    for note in report.notes:
        problems.note(note)
    for problem in report.problems:
        if problem.machine and problems.machine_facts == "note":
            problems.note(problem.message)
        else:
            problems.add("machine" if problem.machine else "preflight", problem.message)


def plugin_names(raw: dict, key: str) -> list[str]:
    """``plugins:`` / ``disable_plugins:`` as a list of names (one string is one
    name); a value of another shape gives none here, and the schema reports it."""
    value = raw.get(key)
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(name, str) for name in value):
        return value
    return []


def resolve_axolotl_plugins(entries: list[str], pm, problems, raw: dict | None = None,
                            sources: dict | None = None) -> None:
    """Axolotl integrations under ``plugins:``: a note for each Plait serves,
    a problem for each it cannot; what a served one does to the config's keys
    in Axolotl (a default it sets) is applied to ``raw``, with notes, and
    recorded in ``sources``."""
    from plait.config.axolotl_plugins import INTEGRATIONS, integration_of, resolve

    loaded = {info.name for info in pm.list_plugins()}
    for entry in entries:
        note, problem = resolve(entry, loaded)
        if note:
            problems.note(note)
            if raw is not None:
                before = dict(raw)
                for line in INTEGRATIONS[integration_of(entry)].apply(raw):
                    problems.note(line)
                for key in (key for key in raw if raw[key] != before.get(key)):
                    if sources is not None:
                        sources[key] = f"Axolotl's {integration_of(entry)} integration"
        if problem:
            problems.add("plugins", problem)


def not_implemented(name: str) -> int:
    print(f"plait {name} is not implemented yet", file=sys.stderr)
    return 2
