"""Config loading, overrides, provenance and validation errors."""

import pytest
from pydantic import BaseModel

from plait import hookimpl
from plait.config import build_config, explain, load_raw_config
from plait.errors import ConfigError
from plait.plugins import build_plugin_manager
from plait.testing import write_config


def _build(raw, *plugins, **kwargs):
    pm = build_plugin_manager(entry_points=False, extra=list(plugins))
    return build_config(pm, raw, {k: "file" for k in raw}, **kwargs)


def test_overrides_merge_and_record_sources(tmp_path):
    path = write_config(tmp_path / "c.yml", base_model="m", learning_rate=1e-4, datasets=[{"path": "a.jsonl"}])
    raw, sources = load_raw_config(path, ["learning_rate=3e-4", "datasets.0.path=b.jsonl", "micro_batch_size=4"])
    assert raw["learning_rate"] == 3e-4 and raw["datasets"][0]["path"] == "b.jsonl"
    assert sources["learning_rate"] == "override" and sources["base_model"] == "file"
    assert sources["datasets.0.path"] == "override"
    pm = build_plugin_manager(entry_points=False)
    cfg = build_config(pm, raw, sources)
    table = {key: source for key, _, source in explain(cfg)}
    assert table["micro_batch_size"] == "override"
    assert table["base_model"] == "file"
    assert table["seed"] == "default"
    assert table["datasets"] == "override"


def test_interpolation_resolves(tmp_path):
    path = tmp_path / "c.yml"
    path.write_text("base_model: m\nsequence_len: 256\neval_steps: ${sequence_len}\n")
    raw, _ = load_raw_config(path)
    assert raw["eval_steps"] == 256


def test_misspelled_key_suggests_the_right_one():
    with pytest.raises(ConfigError, match=r"unknown config key 'lerning_rate'; did you mean 'learning_rate'\?"):
        _build({"base_model": "m", "lerning_rate": 1e-4})


def test_misspelled_dataset_key_names_entry():
    with pytest.raises(ConfigError, match=r"unknown key 'tpye' in datasets.0; did you mean 'type'"):
        _build({"base_model": "m", "datasets": [{"path": "x", "tpye": "alpaca"}]})


def test_unsupported_axolotl_keys_are_reported_together(capsys, recwarn):
    raw = {"base_model": "m", "s2_attention": True, "relora": True}
    with pytest.raises(ConfigError) as info:
        _build(dict(raw))
    assert "s2_attention" in str(info.value) and "relora" in str(info.value)
    cfg = _build(dict(raw), allow_unsupported=True)
    assert cfg.base_model == "m"
    # one clean line on stderr, not a python warning with a file path and a source line
    assert capsys.readouterr().err == ("warning: ignoring Axolotl keys Plait does not support (--allow-unsupported): "
                                       "s2_attention, relora\n")
    assert not recwarn.list


def test_key_of_a_missing_plugin_names_the_package():
    with pytest.raises(ConfigError, match=r"load_in_4bit: declared by plugin 'bnb' \(plait-bnb\), which is installed "
                                          r"but not loaded"):
        _build({"base_model": "m", "load_in_4bit": True})


def test_bad_value_names_key_value_and_accepted():
    with pytest.raises(ConfigError, match=r"config key 'excess_length_strategy': 'chop' is not accepted: .*'drop' or 'truncate'"):
        _build({"base_model": "m", "excess_length_strategy": "chop"})
    with pytest.raises(ConfigError, match=r"config key 'micro_batch_size': 0 is not accepted"):
        _build({"base_model": "m", "micro_batch_size": 0})


def test_missing_required_key():
    with pytest.raises(ConfigError, match="'base_model' is required"):
        _build({})


def test_cross_key_rules():
    with pytest.raises(ConfigError, match="bf16: true and fp16: true"):
        _build({"base_model": "m", "bf16": True, "fp16": True})


def test_plugin_keys_validate_with_core_and_clash_is_named():
    class Keys(BaseModel):
        my_knob: int = 3

    class KnobPlugin:
        @hookimpl
        def config_schema():
            return Keys

    cfg = _build({"base_model": "m", "my_knob": 5}, KnobPlugin)
    assert cfg.my_knob == 5 and cfg.learning_rate > 0
    with pytest.raises(ConfigError, match="'my_knob': 'x' is not accepted"):
        _build({"base_model": "m", "my_knob": "x"}, KnobPlugin)

    class Clash(BaseModel):
        learning_rate: float = 1.0

    class ClashPlugin:
        @hookimpl
        def config_schema():
            return Clash

    with pytest.raises(ConfigError, match="'learning_rate' is declared by two plugins: 'core' and"):
        _build({"base_model": "m"}, ClashPlugin)


def test_set_by_plugin_is_recorded():
    cfg = _build({"base_model": "m"})
    cfg.set_by_plugin("sequence_len", 512, "plait-models")
    assert cfg.sequence_len == 512 and cfg.source_of("sequence_len") == "plugin:plait-models"


def test_yaml_errors_are_config_errors(tmp_path):
    path = tmp_path / "bad.yml"
    path.write_text("base_model: m\n  bad: [indent\n")
    with pytest.raises(ConfigError, match="bad.yml"):
        load_raw_config(path)
    with pytest.raises(ConfigError, match="config file not found"):
        load_raw_config(tmp_path / "missing.yml")
    with pytest.raises(ConfigError, match="is not key=value"):
        load_raw_config(None, ["learning_rate"])
