"""The plugin manager: discovery, ordering, allow/deny lists, failing plugins."""

import sys
import textwrap
import types

import pytest

from plait import hookimpl
from plait.errors import PluginError
from plait.plugins import DEFAULT_PLUGINS, build_plugin_manager


@pytest.fixture
def fake_distribution(tmp_path, monkeypatch):
    """Install a real distribution on sys.path: a .dist-info with an entry point
    and its module, found by importlib.metadata like any pip-installed package."""

    def install(name: str, module_source: str, ep_name: str | None = None):
        module = name.replace("-", "_")
        (tmp_path / f"{module}.py").write_text(textwrap.dedent(module_source))
        info = tmp_path / f"{module}-1.2.3.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.2.3\n")
        (info / "entry_points.txt").write_text(f"[plait]\n{ep_name or name} = {module}\n")
        monkeypatch.syspath_prepend(str(tmp_path))
        monkeypatch.delitem(sys.modules, module, raising=False)
        return ep_name or name

    return install


def test_core_defaults_are_registered_as_plugins():
    pm = build_plugin_manager(entry_points=False)
    assert [p.name for p in pm.list_plugins()] == list(DEFAULT_PLUGINS)
    assert all(p.distribution == "plait" for p in pm.list_plugins())


def test_entry_point_plugin_is_discovered_with_distribution_and_version(fake_distribution):
    name = fake_distribution("plait-fake-one", """
        from plait import hookimpl
        @hookimpl
        def chat_templates():
            return {"fake": "{{ messages }}"}
    """)
    pm = build_plugin_manager()
    info = pm.info[name]
    assert (info.distribution, info.version, info.source, info.hooks) == ("plait-fake-one", "1.2.3", "entrypoint",
                                                                          ["chat_templates"])
    assert {"fake": "{{ messages }}"} in pm.hook.chat_templates()


def test_later_plugins_answer_first_hooks_first_result_wins():
    class Override:
        @hookimpl
        def build_optimizer(cfg, params):
            return "override"

    pm = build_plugin_manager(entry_points=False, extra=[Override])
    assert pm.hook.build_optimizer(cfg=None, params=[]) == "override"


def test_allow_list_env_loads_only_named_plugins(fake_distribution):
    fake_distribution("plait-fake-a", "from plait import hookimpl\n")
    fake_distribution("plait-fake-b", "from plait import hookimpl\n")
    pm = build_plugin_manager(env={"PLAIT_LOAD_PLUGINS": "plait-fake-b"})
    assert "plait-fake-b" in pm.info and "plait-fake-a" not in pm.info
    pm = build_plugin_manager(env={"PLAIT_LOAD_PLUGINS": ""})
    assert [p.source for p in pm.list_plugins()] == ["builtin"] * len(DEFAULT_PLUGINS)


def test_disable_by_env_and_by_argument(fake_distribution):
    fake_distribution("plait-fake-c", "from plait import hookimpl\n")
    assert "plait-fake-c" not in build_plugin_manager(env={"PLAIT_DISABLE_PLUGINS": "plait-fake-c"}).info
    assert "plait-fake-c" not in build_plugin_manager(disable=["plait-fake-c"], env={}).info
    assert "plait.builtin.tracking" not in build_plugin_manager(disable=["plait.builtin.tracking"], env={}).info


@pytest.mark.parametrize("where", ["config", "env"])
def test_core_essential_defaults_cannot_be_disabled(where):
    from plait.plugins import ESSENTIAL_PLUGINS

    assert "plait.builtin.loss" in ESSENTIAL_PLUGINS and "plait.builtin.model" in ESSENTIAL_PLUGINS
    disable = ["plait.builtin.loss", "plait.builtin.model"]
    kwargs = {"disable": disable, "env": {}} if where == "config" else {
        "env": {"PLAIT_DISABLE_PLUGINS": ",".join(disable)}}
    key = "config key 'disable_plugins'" if where == "config" else "environment variable PLAIT_DISABLE_PLUGINS"
    with pytest.raises(PluginError, match=rf"{key}: 'plait.builtin.loss', 'plait.builtin.model' cannot be disabled"):
        build_plugin_manager(**kwargs)


def test_plugin_that_fails_to_import_names_plugin_and_distribution(fake_distribution):
    fake_distribution("plait-broken", "raise RuntimeError('boom at import')\n")
    with pytest.raises(PluginError, match=r"plugin 'plait-broken' \(distribution plait-broken 1.2.3\) failed to import.*boom at import"):
        build_plugin_manager(env={})


def test_hookimpl_with_unknown_name_is_an_error(fake_distribution):
    fake_distribution("plait-typo", """
        from plait import hookimpl
        @hookimpl
        def load_modle(cfg):
            return None
    """)
    with pytest.raises(PluginError, match=r"plugin 'plait-typo'.*plait-typo 1.2.3.*'load_modle', which is not a Plait hook"):
        build_plugin_manager(env={})


def test_hookimpl_specname_names_the_hook_and_a_typo_in_it_is_an_error():
    # one plugin may give a hook two implementations (a tryfirst one and a wrapper), under other names
    plugin = types.ModuleType("two_impls_plugin")

    @hookimpl(specname="chat_templates")
    def more_templates():
        return {"extra": "{{ messages }}"}

    plugin.more_templates = more_templates
    pm = build_plugin_manager(entry_points=False, extra=[plugin])
    assert "two_impls_plugin" in [pm.get_name(p) for p in pm.get_plugins()]
    assert any(answer == {"extra": "{{ messages }}"} for answer in pm.hook.chat_templates())

    typo = types.ModuleType("typo_specname_plugin")

    @hookimpl(specname="chat_templatez")
    def templates():
        return {}

    typo.templates = templates
    with pytest.raises(PluginError, match="typo_specname_plugin.*'chat_templatez', which is not a Plait hook"):
        build_plugin_manager(entry_points=False, extra=[typo])


def test_hookimpl_with_unknown_argument_is_an_error():
    plugin = types.ModuleType("bad_args_plugin")

    @hookimpl
    def load_model(cfg, tokeniser):
        return None

    plugin.load_model = load_model
    with pytest.raises(PluginError, match="(?s)bad_args_plugin.*invalid hook.*tokeniser"):
        build_plugin_manager(entry_points=False, extra=[plugin])


def test_config_plugins_are_imported_by_dotted_path(tmp_path, monkeypatch):
    (tmp_path / "my_local_plugin.py").write_text(
        "from plait import hookimpl\n@hookimpl\ndef chat_templates():\n    return {'local': ''}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    pm = build_plugin_manager(["my_local_plugin"], entry_points=False)
    assert pm.info["my_local_plugin"].source == "config"
    with pytest.raises(PluginError, match="'no_such_plugin_mod' listed under 'plugins:' failed to import"):
        build_plugin_manager(["no_such_plugin_mod"], entry_points=False)


def test_each_manager_is_independent():
    class One:
        @hookimpl
        def chat_templates():
            return {"one": ""}

    with_one = build_plugin_manager(entry_points=False, extra=[One])
    without = build_plugin_manager(entry_points=False)
    assert {"one": ""} in with_one.hook.chat_templates()
    assert {"one": ""} not in without.hook.chat_templates()


def test_unknown_names_in_allow_and_disable_lists_are_errors(fake_distribution):
    fake_distribution("plait-fake-e", "from plait import hookimpl\n")
    with pytest.raises(PluginError, match=r"(?s)environment variable PLAIT_LOAD_PLUGINS: 'plait-fake-ee' is not an "
                                          r"installed plugin; did you mean 'plait-fake-e'\?.*installed entry-point "
                                          r"plugins: .*plait-fake-e"):
        build_plugin_manager(env={"PLAIT_LOAD_PLUGINS": "plait-fake-ee"})
    with pytest.raises(PluginError, match=r"environment variable PLAIT_DISABLE_PLUGINS: 'zzz-nothing-like-it' is not"):
        build_plugin_manager(env={"PLAIT_DISABLE_PLUGINS": "zzz-nothing-like-it"})
    with pytest.raises(PluginError, match=r"config key 'disable_plugins': 'plait.builtin.los' .*did you mean "
                                          r"'plait.builtin.loss'"):
        build_plugin_manager(disable=["plait.builtin.los"], env={})
    # every known kind of name is accepted: entry point, core's own, a config plugin
    build_plugin_manager(["plait.builtin.loss"], disable=["plait-fake-e", "plait.builtin.tracking"],
                         env={"PLAIT_LOAD_PLUGINS": "plait-fake-e,plait.builtin.model"})


def test_trace_hooks_logs_every_call_in_call_order(caplog):
    """PLAIT_TRACE_HOOKS=1: each hook call is logged with its arguments, the
    plugins in the order they are asked (the last registered first) and the
    result; without it nothing is logged."""
    first = types.SimpleNamespace(__name__="first", chat_templates=hookimpl(lambda: {"one": "{{ x }}"}))
    second = types.SimpleNamespace(__name__="second", chat_templates=hookimpl(lambda: {"two": "{{ y }}"}))
    with caplog.at_level("INFO", logger="plait.hooks"):
        pm = build_plugin_manager(extra=[first, second], entry_points=False, env={"PLAIT_TRACE_HOOKS": "1"})
        pm.hook.chat_templates()
        with pytest.raises(ZeroDivisionError):
            pm.hook.config_schema.call_extra([lambda: 1 / 0], {})
    lines = [r.getMessage() for r in caplog.records if r.name == "plait.hooks"]
    assert lines[0] == "chat_templates(): asking second, first, plait.builtin.model"
    assert lines[1] == "chat_templates returned [dict, dict, dict]"
    assert lines[-1].startswith("config_schema raised ZeroDivisionError")
    caplog.clear()
    with caplog.at_level("INFO", logger="plait.hooks"):
        build_plugin_manager(extra=[first], entry_points=False, env={}).hook.chat_templates()
    assert not [r for r in caplog.records if r.name == "plait.hooks"]
