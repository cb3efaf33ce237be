"""The plugin's hooks: config keys, validation errors, patch_model, build_loss,
regional torch.compile. Runs through core's real config and plugin manager."""

import pytest

pytest.importorskip("omegaconf")  # core's config stack (absent on bare GPU images)

import torch  # noqa: E402

import plait_kernels.plugin as kernels_plugin  # noqa: E402
from plait.errors import ConfigError  # noqa: E402
from plait.testing import build_run_config, make_tiny_model  # noqa: E402


@pytest.fixture(autouse=True)
def only_this_plugin(monkeypatch):
    # load no entry-point plugins and register this one explicitly, so the test
    # sees the same manager whether or not the package is pip-installed
    monkeypatch.setenv("PLAIT_LOAD_PLUGINS", "")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "llama")


def _cfg(model_dir, **keys):
    cfg, pm = build_run_config({"base_model": str(model_dir), **keys}, plugins=[kernels_plugin])
    return cfg, pm


def _model(model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.config.use_cache = False
    return model


def test_keys_and_defaults(model_dir):
    cfg, _ = _cfg(model_dir)
    assert cfg.plait_kernels == "auto" and cfg.torch_compile is False and cfg.liger_rms_norm is None


def test_bad_mode_names_the_key_and_choices(model_dir):
    with pytest.raises(ConfigError, match=r"plait_kernels.*'fast'.*(auto|triton)"):
        _cfg(model_dir, plait_kernels="fast")


def test_off_with_liger_key_is_refused(model_dir):
    with pytest.raises(ConfigError, match="'off' disables this plugin, but liger_rope"):
        _cfg(model_dir, plait_kernels="off", liger_rope=True)


def test_liger_rms_norm_gated_needs_no_liger_and_picks_plait_kernel(model_dir, monkeypatch):
    """liger-kernel has no gated RMSNorm: the key selects Plait's Triton kernel for
    that piece only, with or without liger-kernel; 'off' refuses it by name."""
    import plait_kernels.selection as selection

    monkeypatch.setattr(selection, "liger_installed", lambda: False)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    cfg, _ = _cfg(model_dir, liger_rms_norm_gated=True, plait_kernels="torch")
    chosen = selection.choose(cfg)
    assert chosen["rms_norm_gated"] == "triton" and not any(v for k, v in chosen.items() if k != "rms_norm_gated")
    assert selection.choose(_cfg(model_dir, plait_kernels="torch")[0])["rms_norm_gated"] is None
    with pytest.raises(ConfigError, match="'off' disables this plugin, but liger_rms_norm_gated"):
        _cfg(model_dir, plait_kernels="off", liger_rms_norm_gated=True)
    with pytest.raises(ConfigError, match="liger_rms_norm_gated"):
        _cfg(model_dir, liger_rms_norm_gated="sometimes")


def test_liger_key_without_liger_installed(model_dir, monkeypatch):
    import plait_kernels.selection as selection

    monkeypatch.setattr(selection, "liger_installed", lambda: False)
    with pytest.raises(ConfigError, match="'liger_rms_norm' asks for liger-kernel, which is not installed"):
        _cfg(model_dir, liger_rms_norm=True)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU path")
def test_triton_without_gpu_or_interpreter_is_refused(model_dir, monkeypatch):
    cfg, pm = _cfg(model_dir, plait_kernels="triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ConfigError, match="need a CUDA device"):
        pm.hook.patch_model(cfg=cfg, model=_model(model_dir))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU default")
def test_auto_on_cpu_changes_nothing(model_dir):
    cfg, pm = _cfg(model_dir)
    model = _model(model_dir)
    assert pm.hook.patch_model(cfg=cfg, model=model) == []
    # core's chunked loss answers build_loss
    from plait.model.head import chunked_linear_cross_entropy

    assert pm.hook.build_loss(cfg=cfg, model=model) is chunked_linear_cross_entropy


def test_patch_model_hook_reports_and_build_loss_is_fused(model_dir, device):
    cfg, pm = _cfg(model_dir, plait_kernels="triton")  # on the CPU: the interpreter (conftest)
    model = _model(model_dir)
    reports = pm.hook.patch_model(cfg=cfg, model=model)
    assert reports == [{"LlamaRMSNorm x5": "plait triton rms_norm", "LlamaMLP x2": "plait triton swiglu",
                        "LlamaAttention x2": "plait triton rope",
                        "loss": "plait triton fused_linear_cross_entropy"}]
    loss_fn = pm.hook.build_loss(cfg=cfg, model=model)
    assert loss_fn.__name__ == "fused_linear_cross_entropy"
    hidden = torch.randn(6, model.config.hidden_size, requires_grad=True)
    labels = torch.tensor([1, 2, -100, 4, 5, -100])
    loss, n = loss_fn(hidden, model.lm_head.weight, labels)
    expected = torch.nn.functional.cross_entropy(hidden @ model.lm_head.weight.t(), labels, reduction="sum")
    assert n == 4
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=1e-5)


def test_flash_attn_keys_fuse_the_mlp_and_the_norm(model_dir, device):
    """Axolotl's flash_attn_fuse_mlp / flash_attn_rms_norm ask for a fused MLP and
    a fused RMSNorm: Plait's Triton ones (liger's where a liger key chose it), and
    only those pieces; the fused model computes what the model's own code does."""
    import plait_kernels.selection as selection

    cfg, pm = _cfg(model_dir, plait_kernels="torch", flash_attn_fuse_mlp=True)
    model = _model(model_dir)
    ids = torch.randint(3, model.config.vocab_size, (1, 9), generator=torch.Generator().manual_seed(0))
    expected = model(input_ids=ids.to(model.device)).logits
    assert pm.hook.patch_model(cfg=cfg, model=model) == [{"LlamaMLP x2": "plait triton swiglu"}]
    torch.testing.assert_close(model(input_ids=ids).logits, expected, atol=1e-5, rtol=1e-5)

    cfg, pm = _cfg(model_dir, plait_kernels="torch", flash_attn_rms_norm=True)
    assert pm.hook.patch_model(cfg=cfg, model=_model(model_dir)) == [{"LlamaRMSNorm x5": "plait triton rms_norm"}]
    both = selection.choose(_cfg(model_dir, plait_kernels="torch", flash_attn_rms_norm=True, liger_rms_norm=True,
                                 flash_attn_fuse_mlp=True)[0])
    assert (both["rms_norm"], both["glu"], both["rope"]) == ("liger", "triton", None)
    with pytest.raises(ConfigError, match="'off' disables this plugin, but flash_attn_fuse_mlp"):
        _cfg(model_dir, plait_kernels="off", flash_attn_fuse_mlp=True)


def test_tiled_mlp_with_the_llama_layout_keeps_the_model_mlp(model_dir):
    """core's tiled_mlp with tiled_mlp_use_original_mlp: false runs the MLP's own
    projections: the GLU piece is not swapped, and asking for it is refused (as in Axolotl)."""
    import plait_kernels.selection as selection

    cfg, _ = _cfg(model_dir, plait_kernels="triton", tiled_mlp=True, tiled_mlp_use_original_mlp=False)
    chosen = selection.choose(cfg)
    assert chosen["glu"] is None and chosen["rms_norm"] == "triton"
    with pytest.raises(ConfigError, match="'flash_attn_fuse_mlp' swaps the MLP, and tiled_mlp_use_original_mlp"):
        _cfg(model_dir, flash_attn_fuse_mlp=True, tiled_mlp=True, tiled_mlp_use_original_mlp=False)
    assert selection.choose(_cfg(model_dir, plait_kernels="triton", tiled_mlp=True)[0])["glu"] == "triton"


def test_tiled_mlp_tiles_the_fused_mlp(model_dir, device):
    """core's tiling runs after this plugin's swaps, so it tiles the fused MLP;
    loss and gradients stay the model's own."""
    cfg, pm = _cfg(model_dir, plait_kernels="torch", flash_attn_fuse_mlp=True, tiled_mlp=True,
                   tiled_mlp_num_shards=2)
    model, reference = _model(model_dir), _model(model_dir)
    reports = pm.hook.patch_model(cfg=cfg, model=model)
    assert {"LlamaMLP x2": "plait triton swiglu"} in reports
    assert {"PlaitGLUMLP x2": "tiled over the sequence (2 shards)"} in reports
    ids = torch.randint(3, model.config.vocab_size, (1, 9), generator=torch.Generator().manual_seed(0))
    for m in (model, reference):
        m(input_ids=ids, labels=ids).loss.backward()
    for (name, p), ref in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, ref.grad, atol=1e-5 * ref.grad.abs().max().item(), rtol=1e-4,
                                   msg=lambda m: f"{name}: {m}")


def test_family_registry_names_the_classes(model_dir):
    """A family plugin's class names win over the built-in fallback table."""
    from plait.families import ModelFamily
    from plait.hookspecs import hookimpl

    class OnlyNorms:
        @hookimpl
        def model_families(self):
            return [ModelFamily(name="llama-test", model_types=("llama",), decoder_layer_class="LlamaDecoderLayer",
                                norm_class="LlamaRMSNorm", mlp_class="NotAnMLP", mlp_activation="swiglu")]

    cfg, pm = build_run_config({"base_model": str(model_dir), "plait_kernels": "triton"},
                               plugins=[kernels_plugin, OnlyNorms()])
    report = pm.hook.patch_model(cfg=cfg, model=_model(model_dir))[0]
    assert "LlamaRMSNorm x5" in report and "LlamaMLP x2" not in report


def test_regional_torch_compile(model_dir):
    cfg, pm = _cfg(model_dir, plait_kernels="torch", torch_compile=True, torch_compile_backend="eager")
    model = _model(model_dir)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.randint(3, model.config.vocab_size, (1, 9))
    expected = model(input_ids=ids).logits
    report = pm.hook.patch_model(cfg=cfg, model=model)
    assert report == [{"LlamaDecoderLayer x2": "torch.compile (eager), per layer"}]
    assert model.state_dict().keys() == before.keys()  # in-place compile keeps parameter names
    assert all(layer._compiled_call_impl is not None for layer in model.model.layers)
    torch._dynamo.reset()
    torch.testing.assert_close(model(input_ids=ids).logits, expected, atol=1e-5, rtol=1e-5)


def test_liger_layer_norm_swaps_layer_norms_and_leaves_rms_norm_models_alone(device):
    """Axolotl's liger_layer_norm: every nn.LayerNorm becomes liger's (same
    weights, same output); an RMSNorm model has none and the report says so."""
    import pytest
    import torch

    from plait_kernels.patch import swap_layer_norms

    pytest.importorskip("liger_kernel")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.LayerNorm(32)).to(device)
    with torch.no_grad():
        model[1].weight.uniform_(0.5, 1.5)
        model[1].bias.uniform_(-0.1, 0.1)
    x = torch.randn(4, 32, device=device)
    expected = model(x)
    weight = model[1].weight
    assert swap_layer_norms(model) == 1
    assert model[1].weight is weight  # the same parameter, so an optimizer built later trains it
    assert type(model[1]).__name__ == "LigerLayerNorm" and model[1].replaces_class == "LayerNorm"
    if device == "cuda":  # liger's LayerNorm kernel does not run under Triton's CPU interpreter
        torch.testing.assert_close(model(x), expected, rtol=1e-4, atol=1e-4)
    assert swap_layer_norms(torch.nn.Sequential(torch.nn.Linear(4, 4))) == 0


def test_torch_compile_mode_needs_torch_compile_and_reaches_the_layers():
    import pytest
    import torch

    from plait_kernels.patch import compile_layers

    keys = {"base_model": "m", "torch_compile_mode": "max-autotune"}
    assert build_run_config({**keys, "torch_compile": True},
                            plugins=[kernels_plugin])[0].torch_compile_mode == "max-autotune"
    with pytest.raises(ConfigError, match="'torch_compile_mode': 'max-autotune' sets how layers are compiled"):
        build_run_config(keys, plugins=[kernels_plugin])

    class TinyDecoderLayer(torch.nn.Linear):
        pass

    model = torch.nn.Sequential(TinyDecoderLayer(4, 4))
    seen = {}
    original = torch.compile

    def recording_compile(fn, **kwargs):  # torch.compile itself, with its arguments noted
        seen.update(kwargs)
        return original(fn, **kwargs)

    torch.compile, saved = recording_compile, torch.compile
    try:
        assert compile_layers(model, None, "eager", "max-autotune-no-cudagraphs") == 1
    finally:
        torch.compile = saved
    assert seen == {"backend": "eager", "mode": "max-autotune-no-cudagraphs"}
