"""The package as a plugin: entry point, hooks, light import."""

from __future__ import annotations

import subprocess
import sys


def test_registered_through_its_entry_point():
    from plait.families import find_family
    from plait.plugins import build_plugin_manager

    # load only this entry point: another plugin being broken is not this test's business
    pm = build_plugin_manager(env={"PLAIT_LOAD_PLUGINS": "models"})
    assert pm.info["models"].distribution == "plait-models"
    assert {"model_families", "config_schema", "validate_config"} <= set(pm.info["models"].hooks)
    for model_type in ("llama", "mistral", "mixtral", "qwen2", "qwen3", "qwen2_moe", "qwen3_moe", "gemma2",
                       "gemma3_text", "gemma3", "phi3"):
        assert find_family(pm, model_type) is not None, model_type


def test_import_does_not_pull_torch_or_transformers():
    code = ("import sys, plait_models, plait_models.families; "
            "print('torch' in sys.modules, 'transformers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_hook_on_train_start(tokenizer, capsys):
    """At train start the log names what the family lacks, and generation
    stops on the chat template's end-of-turn token as well as EOS."""
    import types

    from plait.families import find_family
    from plait.plugins import PlaitPluginManager

    import plait_models
    from plait_models.testing import build_model

    pm = PlaitPluginManager()  # this plugin alone: core's loggers want a full Run
    pm.register_plugin(plait_models, "models", source="test")
    plait_models.apply_family_tokenizer_fixes(find_family(pm, "gemma2"), tokenizer)
    model = build_model("gemma2", vocab_size=len(tokenizer))
    run = types.SimpleNamespace(cfg=types.SimpleNamespace(model_config_type=None), pm=pm, model=model,
                                tokenizer=tokenizer, is_main=True)
    pm.hook.on_train_start(run=run)
    assert "models: gemma2: logits are soft-capped at 30.0" in capsys.readouterr().err
    assert model.generation_config.eos_token_id == [tokenizer.eos_token_id,
                                                    tokenizer.convert_tokens_to_ids("<end_of_turn>")]
