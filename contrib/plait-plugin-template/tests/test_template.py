import plait_plugin_template
from plait.testing import build_run_config, run_cli


def test_subcommand_runs():
    result = run_cli(["hello", "--name", "plait"], plugins=[plait_plugin_template])
    assert result.exit_code == 0 and result.stdout == "hello, plait\n"


def test_config_key_is_validated():
    cfg, _ = build_run_config({"base_model": "m", "template_greeting": "hi"}, plugins=[plait_plugin_template])
    assert cfg.template_greeting == "hi"
