"""Core's tokenizer and model loaders turn a bad ``base_model`` into one ConfigError."""

import json

import pytest

from plait.builtin import model as builtin_model
from plait.errors import ConfigError
from plait.testing import build_run_config


def _cfg(**keys):
    return build_run_config({"base_model": "m", **keys})[0]


@pytest.mark.parametrize("value", ["./no/such/dir", "../no_such_dir", "/no/such/dir", "~/no_such_dir"])
def test_a_local_path_that_does_not_exist_fails_before_transformers(value):
    with pytest.raises(ConfigError, match=rf"config key 'base_model': '{value}' does not exist.*\naccepted: a local"):
        builtin_model.check_model_sources(_cfg(base_model=value))
    with pytest.raises(ConfigError, match="'base_model'.*does not exist"):
        builtin_model.load_tokenizer(_cfg(base_model=value))


def test_a_hub_name_is_not_checked_as_a_path():
    builtin_model.check_model_sources(_cfg(base_model="org/some-model"))


def test_tokenizer_config_path_is_named_when_it_is_the_bad_one(tmp_path):
    with pytest.raises(ConfigError, match="config key 'tokenizer_config': .*does not exist"):
        builtin_model.load_tokenizer(_cfg(base_model="org/m", tokenizer_config=str(tmp_path / "tok")))


def test_model_folder_without_weights_names_what_is_missing(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ConfigError, match=r"'base_model': cannot load the model from .*: the directory has no "
                                          r"model\.safetensors"):
        builtin_model.load_model(_cfg(base_model=str(tmp_path)), None)


def test_model_folder_without_config_names_config_json(tmp_path):
    with pytest.raises(ConfigError, match=r"cannot load the model from .*has no config\.json"):
        builtin_model.load_model(_cfg(base_model=str(tmp_path)), None)


def test_hub_failure_is_a_config_error_with_the_reason(monkeypatch):
    import transformers

    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", offline)
    with pytest.raises(ConfigError, match=r"config key 'base_model': cannot load the tokenizer from 'org/m': "
                                          r"We couldn't connect.*\naccepted: .*hub name when a network is available"):
        builtin_model.load_tokenizer(_cfg(base_model="org/m"))


def test_hookspecs_docstring_names_the_test_file_that_exists():
    import re
    from pathlib import Path

    from plait import hookspecs

    named = re.findall(r"``(tests/\S+\.py)``", hookspecs.__doc__)
    assert named and all((Path(__file__).parent.parent / path).is_file() for path in named)


def test_strict_is_accepted_and_documented_as_no_effect():
    from plait.config.axolotl_keys import __doc__ as keys_doc
    from plait.config.schema import CoreConfig

    assert _cfg(strict=True).strict is True
    assert "no effect" in CoreConfig.model_fields["strict"].description
    assert "strict" not in keys_doc
