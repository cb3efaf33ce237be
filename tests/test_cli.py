"""The command line: help without torch, one-line errors with exit 2, explain, plugins, schema."""

import json
import os
import subprocess
import sys
from pathlib import Path

from plait.hookspecs import hookimpl
from plait.testing import run_cli, write_config, write_jsonl

PLAIT = [sys.executable, "-m", "plait.cli"]
TEMPLATE = Path(__file__).resolve().parents[1] / "contrib" / "plait-plugin-template"


def template_plugin():
    """The plugin template, imported from its folder: it is a starting point to
    copy, not installed into the development environment."""
    if str(TEMPLATE) not in sys.path:
        sys.path.insert(0, str(TEMPLATE))
    import plait_plugin_template

    return plait_plugin_template


def test_help_imports_none_of_the_heavy_libraries():
    # --help must answer at once: importing torch, transformers or datasets by mistake costs seconds on
    # every call. Checked by what gets imported, not by a stopwatch, which a busy CI machine defeats.
    code = (
        "import contextlib, io, sys\n"
        "from plait import cli\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    cli.main(['--help'])\n"
        "heavy = ('torch', 'transformers', 'datasets', 'numpy', 'peft', 'tokenizers', 'safetensors', 'pyarrow')\n"
        "print(' '.join(name for name in heavy if name in sys.modules) or 'none')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "none", f"plait --help imported: {out}"
    help_text = subprocess.run(PLAIT + ["--help"], capture_output=True, text=True, check=True).stdout
    assert "train" in help_text and "preprocess" in help_text


def test_misspelled_key_exits_2_with_suggestion_and_no_traceback(tmp_path):
    cfg = write_config(tmp_path / "c.yml", base_model="m", lerning_rate=1e-4)
    proc = subprocess.run(PLAIT + ["config", "validate", str(cfg)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "lerning_rate" in proc.stderr and "did you mean 'learning_rate'" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_debug_flag_shows_the_traceback(tmp_path):
    cfg = write_config(tmp_path / "c.yml", base_model="m", lerning_rate=1e-4)
    proc = subprocess.run(PLAIT + ["--debug", "config", "validate", str(cfg)], capture_output=True, text=True)
    assert proc.returncode != 0 and "Traceback" in proc.stderr


def test_explain_shows_override_and_default_sources(tmp_path):
    cfg = write_config(tmp_path / "c.yml", base_model="m", micro_batch_size=2)
    result = run_cli(["config", "explain", str(cfg), "micro_batch_size=4"])
    assert result.exit_code == 0, result.stderr
    rows = {line.split()[0]: line.split() for line in result.stdout.splitlines()}
    assert rows["micro_batch_size"][1:] == ["4", "override"]
    assert rows["base_model"][-1] == "file"
    assert rows["seed"][1:] == ["42", "default"]


def _data(tmp_path):
    """A data file that exists: validate refuses a config with no data or a missing file."""
    return [{"path": str(write_jsonl(tmp_path / "x.jsonl", [{"instruction": "a", "output": "b"}])), "type": "alpaca"}]


def test_validate_ok(tmp_path):
    cfg = write_config(tmp_path / "c.yml", base_model="m", datasets=_data(tmp_path), output_dir=str(tmp_path / "out"))
    assert run_cli(["config", "validate", str(cfg)]).exit_code == 0


def test_plugins_json_lists_core_and_installed_packages():
    result = run_cli(["plugins", "--json"])
    plugins = {p["name"]: p for p in json.loads(result.stdout)}
    assert plugins["plait.builtin.model"]["hooks"] == ["chat_templates", "gradient_checkpointing_mode", "load_model",
                                                       "load_tokenizer", "patch_model", "validate_config"]
    # the contrib example is installed by `make install` and needs no other step
    assert plugins["qa-format"]["distribution"] == "plait-qa-format"
    assert plugins["qa-format"]["version"] == "0.1.0"


def test_plugins_filtered_by_hook():
    result = run_cli(["plugins", "--json", "--hook", "build_loss"])
    assert [p["name"] for p in json.loads(result.stdout)][0] == "plait.builtin.loss"
    bad = run_cli(["plugins", "--hook", "no_such_hook"])
    assert bad.exit_code == 2 and "not a Plait hook" in bad.stderr


def test_schema_includes_plugin_keys():
    result = run_cli(["config", "schema"], plugins=[template_plugin()])
    properties = json.loads(result.stdout)["properties"]
    assert "learning_rate" in properties and "template_greeting" in properties


def test_bad_override_is_one_line_error(tmp_path):
    cfg = write_config(tmp_path / "c.yml", base_model="m")
    result = run_cli(["config", "validate", str(cfg), "learning_rate"])
    assert result.exit_code == 2 and result.stderr.startswith("error: override 'learning_rate' is not key=value")


def test_plugin_subcommand_is_available():
    assert run_cli(["hello"], plugins=[template_plugin()]).stdout == "hello, world\n"


def test_disabled_plugin_is_not_loaded(tmp_path):
    env = dict(os.environ, PLAIT_DISABLE_PLUGINS="qa-format")
    proc = subprocess.run(PLAIT + ["plugins", "--json"], capture_output=True, text=True, env=env, check=True)
    assert "qa-format" not in {p["name"] for p in json.loads(proc.stdout)}


def _preprocess_config(tmp_path, base_model):
    return write_config(tmp_path / "p.yml", base_model=str(base_model), output_dir=str(tmp_path / "out"),
                        datasets=[{"path": str(tmp_path / "d.jsonl"), "type": "alpaca"}])


def test_missing_local_base_model_is_one_clear_error(tmp_path):
    cfg = _preprocess_config(tmp_path, tmp_path / "no_such_model")
    for command in (["preprocess", str(cfg), "--no-progress"], ["train", str(cfg)], ["config", "validate", str(cfg)]):
        result = run_cli(command)
        assert result.exit_code == 2, (command, result.stderr)
        assert f"config key 'base_model': '{tmp_path / 'no_such_model'}' does not exist" in result.stderr
        if command[0] == "config":  # validate names every problem at once: the data file is missing too
            assert result.stderr.startswith("error: 2 problems") and "d.jsonl' not found" in result.stderr
        else:
            assert result.stderr.startswith("error: config key 'base_model'")
        assert "accepted: a local directory with config.json" in result.stderr and "hub name" in result.stderr
        assert "Traceback" not in result.stderr


def test_base_model_folder_without_tokenizer_is_one_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    result = run_cli(["preprocess", str(_preprocess_config(tmp_path, tmp_path / "empty"))])
    assert result.exit_code == 2, result.stderr
    assert "config key 'base_model': cannot load the tokenizer from" in result.stderr
    assert "has no tokenizer.json" in result.stderr and "accepted: a local directory" in result.stderr


def test_validate_rejects_the_optimizer_and_scheduler_train_rejects(tmp_path):
    cfg = write_config(tmp_path / "c.yml", base_model="m")
    bad = run_cli(["config", "validate", str(cfg), "optimizer=bogus"])
    assert bad.exit_code == 2 and "config key 'optimizer': 'bogus' is not a known optimizer" in bad.stderr
    bad = run_cli(["config", "validate", str(cfg), "lr_scheduler=bogus"])
    assert bad.exit_code == 2 and "config key 'lr_scheduler': 'bogus' is not a known schedule" in bad.stderr


def test_overrides_and_flags_mix_in_any_order_for_every_subcommand():
    from plait.cli import build_parser
    from plait.plugins import build_plugin_manager

    parser = build_parser(build_plugin_manager(entry_points=False))
    flags = {"preprocess": ["--no-progress"], "inspect": ["--rows", "2"], "evaluate": ["--json"],
             "inference": ["--raw"], "merge-lora": ["--out", "o"], "quickstart": ["--regenerate"]}
    for command in ("train", "preprocess", "inspect", "evaluate", "inference", "merge-lora", "quickstart",
                    "config validate", "config explain"):
        flag = flags.get(command, [])
        argv = [*command.split(), "c.yml", "a=1", *flag, "--allow-unsupported", "b=2", "--debug", "c.d=3"]
        args = parser.parse_args(argv)
        assert (args.config, args.overrides, args.allow_unsupported, args.debug) == \
            ("c.yml", ["a=1", "b=2", "c.d=3"], True, True), command
    assert parser.parse_args(["quickstart"]).config == "examples/quickstart.yml"
    assert parser.parse_args(["train", "c.yml"]).debug is False


def test_override_after_a_flag_is_applied(tmp_path):
    cfg = write_config(tmp_path / "c.yml", base_model="m")
    result = run_cli(["config", "explain", str(cfg), "--allow-unsupported", "micro_batch_size=4"])
    assert result.exit_code == 0, result.stderr
    rows = {line.split()[0]: line.split() for line in result.stdout.splitlines()}
    assert rows["micro_batch_size"][1:] == ["4", "override"]


def test_debug_flag_after_the_subcommand_shows_the_traceback(tmp_path):
    cfg = write_config(tmp_path / "c.yml", base_model="m", lerning_rate=1e-4)
    proc = subprocess.run(PLAIT + ["config", "validate", str(cfg), "--debug"], capture_output=True, text=True)
    assert proc.returncode != 0 and "Traceback" in proc.stderr and "unrecognized arguments" not in proc.stderr


def test_unknown_plugin_names_are_errors(tmp_path):
    for variable in ("PLAIT_LOAD_PLUGINS", "PLAIT_DISABLE_PLUGINS"):
        env = dict(os.environ, **{variable: "formatz"})
        proc = subprocess.run(PLAIT + ["plugins"], capture_output=True, text=True, env=env)
        assert proc.returncode == 2, proc.stderr
        assert f"{variable}: 'formatz' is not an installed plugin; did you mean 'formats'?" in proc.stderr
        assert "installed entry-point plugins:" in proc.stderr and "qa-format" in proc.stderr
    cfg = write_config(tmp_path / "c.yml", base_model="m", disable_plugins=["formatz"])
    result = run_cli(["config", "validate", str(cfg)])
    assert result.exit_code == 2 and "config key 'disable_plugins': 'formatz' is not an installed plugin" in result.stderr


class LoggingCommand:
    """A plugin command that logs from a plugin logger and from a library logger."""

    @hookimpl
    def register_commands(self, subparsers):
        import logging
        import warnings

        def run(args, pm):
            logging.getLogger("plait_example.plugin").info("chose the fused path")
            logging.getLogger("some_library").info("library chatter")
            logging.getLogger("some_library").warning("library warning")
            warnings.warn("library deprecation", DeprecationWarning, stacklevel=1)
            warnings.warn_explicit("plugin warning", UserWarning, "plugin.py", 1, module="plait_example.plugin")
            return 0

        sub = subparsers.add_parser("log-something")
        sub.set_defaults(func=run)


def test_plugin_info_lines_are_shown_and_library_warnings_only_with_verbose():
    import warnings

    with warnings.catch_warnings():  # the CLI changes the process's filters
        result = run_cli(["log-something"], plugins=[LoggingCommand()])
    assert result.exit_code == 0
    assert "plait_example.plugin: chose the fused path" in result.stderr
    assert "plugin warning" in result.stderr  # a plugin's own warning is for the user
    assert "library" not in result.stderr  # quiet by default
    with warnings.catch_warnings():
        result = run_cli(["log-something", "--verbose"], plugins=[LoggingCommand()])
    assert result.exit_code == 0
    assert "library warning" in result.stderr and "library deprecation" in result.stderr
    assert "library chatter" not in result.stderr  # INFO from libraries stays hidden


def test_torch_and_torchao_start_up_warnings_only_with_verbose():
    # they bypass the CLI's handler (torch's logger has its own), so their loggers' levels decide
    import logging
    import warnings

    from plait.logs import QUIET_LIBRARY_LOGGERS

    pytree = logging.getLogger("torch.utils._pytree")
    assert "torch.utils._pytree" in QUIET_LIBRARY_LOGGERS
    with warnings.catch_warnings():
        run_cli(["log-something"], plugins=[LoggingCommand()])
    assert not pytree.isEnabledFor(logging.WARNING) and not logging.getLogger("torchao").isEnabledFor(logging.WARNING)
    with warnings.catch_warnings():
        run_cli(["log-something", "--verbose"], plugins=[LoggingCommand()])
    assert pytree.isEnabledFor(logging.WARNING)


def test_validate_refuses_an_unknown_chat_template_name(tmp_path):
    cfg = write_config(tmp_path / "c.yml", base_model="m", chat_template="chatmll",
                       datasets=[{"path": "x.jsonl", "type": "chat_template", "chat_template": "llama3"}])
    result = run_cli(["config", "validate", str(cfg)])
    assert result.exit_code == 2
    assert "'chatmll' is not a known template; did you mean 'chatml'?" in result.stderr
    cfg = write_config(tmp_path / "d.yml", base_model="m",
                       datasets=[{"path": "x.jsonl", "type": "chat_template", "chat_template": "lama3"}])
    result = run_cli(["config", "validate", str(cfg)])
    assert result.exit_code == 2 and "of dataset 'x.jsonl': 'lama3' is not a known template" in result.stderr
    ok = write_config(tmp_path / "e.yml", base_model="m", chat_template="tokenizer_default_fallback_chatml",
                      datasets=_data(tmp_path), output_dir=str(tmp_path / "out"))
    assert run_cli(["config", "validate", str(ok)]).exit_code == 0
