"""reinit_weights: base_model's architecture trained from random weights (Axolotl's pretraining from scratch)."""

import pytest
import torch

from plait.errors import ConfigError
from plait.testing import build_run_config, make_tiny_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("reinit") / "model")


def loaded(model_dir, **keys):
    cfg, pm = build_run_config({"base_model": str(model_dir), **keys})
    torch.manual_seed(cfg.seed)  # as the training loop seeds before it loads the model
    return pm.hook.load_model(cfg=cfg, tokenizer=None)


def test_weights_are_fresh_seeded_and_the_architecture_is_the_checkpoints(model_dir, tmp_path):
    pretrained = loaded(model_dir)
    fresh = loaded(model_dir, reinit_weights=True)
    again = loaded(model_dir, reinit_weights=True)
    other_seed = loaded(model_dir, reinit_weights=True, seed=7)
    assert type(fresh) is type(pretrained) and fresh.config.num_hidden_layers == pretrained.config.num_hidden_layers
    names = dict(pretrained.named_parameters()).keys()
    assert dict(fresh.named_parameters()).keys() == names
    weight = "model.layers.0.self_attn.q_proj.weight"
    state = {name: dict(m.named_parameters())[weight] for name, m in
             [("pretrained", pretrained), ("fresh", fresh), ("again", again), ("other", other_seed)]}
    assert not torch.equal(state["fresh"], state["pretrained"])
    assert torch.equal(state["fresh"], state["again"]) and not torch.equal(state["fresh"], state["other"])
    # no weight file is read: a folder with the config alone builds the same model
    (tmp_path / "config_only").mkdir()
    (tmp_path / "config_only" / "config.json").write_text((model_dir / "config.json").read_text())
    from_config_only = loaded(tmp_path / "config_only", reinit_weights=True, tokenizer_config=str(model_dir))
    assert torch.equal(dict(from_config_only.named_parameters())[weight], state["fresh"])


def test_model_config_overrides_shape_the_fresh_model(model_dir):
    model = loaded(model_dir, reinit_weights=True, model_config={"num_hidden_layers": 1})
    assert len(model.model.layers) == 1


def test_rotary_scaling_is_laid_over_the_base_parameters_as_for_a_loaded_model(model_dir):
    """rope_scaling merges into the base's rope_parameters (rope_theta kept), with and without reinit_weights."""
    scaling = {"rope_scaling": {"type": "linear", "factor": 2.0}}
    pretrained, fresh = loaded(model_dir, **scaling), loaded(model_dir, reinit_weights=True, **scaling)
    assert fresh.config.rope_parameters == pretrained.config.rope_parameters
    assert fresh.config.rope_parameters["factor"] == 2.0 and fresh.config.rope_parameters["rope_theta"]


@pytest.mark.parametrize("keys, message", [
    ({"load_in_4bit": True, "adapter": "qlora", "lora_target_linear": True}, "load_in_4bit needs the checkpoint's"),
    ({"reward_model": True}, "with reward_model a plugin loads another kind of model"),
])
def test_reinit_weights_is_refused_where_it_would_be_ignored(model_dir, keys, message):
    with pytest.raises(ConfigError, match=message):
        build_run_config({"base_model": str(model_dir), "reinit_weights": True, **keys})
