"""Every hook is documented and exercised.

`test_every_hookspec_is_documented_and_tested` fails when a hookspec lacks a
docstring (saying whether the first result wins) or when no test in the tree
is named ``test_hook_<name>``. The ``test_hook_*`` tests below call each hook
through a real plugin manager, with core's defaults or a small plugin.
"""

import inspect
import json
import math
from pathlib import Path

import pytest
import torch

from plait import hookimpl, hookspecs
from plait.config import config_class
from plait.families import ModelFamily, find_family
from plait.testing import build_run_config, make_tiny_model, plugin_manager

ROOT = Path(__file__).resolve().parents[1]


def _hookspec_names():
    return [name for name, fn in inspect.getmembers(hookspecs, inspect.isfunction)
            if hasattr(fn, "plait_spec")]


def test_every_hookspec_is_documented_and_tested():
    sources = "\n".join(p.read_text() for pattern in ("tests/test_*.py", "plugins/*/tests/test_*.py",
                                                       "contrib/*/tests/test_*.py") for p in ROOT.glob(pattern))
    names = _hookspec_names()
    assert {"load_model", "wrap_parallel", "tokenize", "build_optimizer"} <= set(names)
    undocumented = [n for n in names if len((getattr(hookspecs, n).__doc__ or "").strip()) < 40]
    untested = [n for n in names if f"def test_hook_{n}(" not in sources]
    assert not undocumented, f"hookspecs without a docstring: {undocumented}"
    assert not untested, f"hookspecs without a test named test_hook_<name>: {untested}"
    for name in names:
        spec = getattr(hookspecs, name)
        firstresult = spec.plait_spec.get("firstresult", False)
        assert ("firstresult" in spec.__doc__) == firstresult, f"{name}: docstring must say firstresult iff it is"



def test_every_hookspec_docstring_names_its_arguments_default_and_caller():
    """One hop from a hook to everything about it (datasette's docs test idea):
    each argument in double backticks, core's default implementation (or that
    there is none), and who calls it."""
    import re

    problems = []
    for name in _hookspec_names():
        doc = getattr(hookspecs, name).__doc__ or ""
        for arg in inspect.signature(getattr(hookspecs, name)).parameters:
            if f"``{arg}``" not in doc:
                problems.append(f"{name}: argument {arg!r} is not described (write ``{arg}``)")
        if not re.search(r"default", doc, re.IGNORECASE):
            problems.append(f"{name}: say core's default implementation, or that there is none")
        if not re.search(r"\bcall(ed|er|s)\b", doc, re.IGNORECASE):
            problems.append(f"{name}: say who calls it (\"called by ...\")")
    assert not problems, "\n".join(problems)


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


def test_hook_config_schema():
    from pydantic import BaseModel

    class Keys(BaseModel):
        my_plugin_level: int = 1

    class Plugin:
        @hookimpl
        def config_schema():
            return Keys

    cfg, _ = build_run_config({"base_model": "m", "my_plugin_level": 2}, plugins=[Plugin])
    assert cfg.my_plugin_level == 2


def test_hook_dataset_formats():
    from pydantic import Field

    from plait.errors import ConfigError, PluginError
    from plait.registries import DatasetEntry, DatasetFormat

    class ShoutEntry(DatasetEntry):
        field_shout: str = Field("text", description="Column to shout.")

    def shout(cfg, dataset_cfg, tokenizer, batch):
        ids = [[ord(c) for c in text.upper()] for text in batch[dataset_cfg.field_shout]]
        return {"input_ids": ids, "labels": ids}

    class Shout:
        @hookimpl
        def dataset_formats():
            return [DatasetFormat("shout", shout, ShoutEntry)]

    entry = {"path": "x", "type": "shout", "field_shout": "t"}
    cfg, pm = build_run_config({"base_model": "m", "datasets": [entry]}, plugins=[Shout])
    # core's default tokenize dispatches to the registered function, with the entry as its model
    assert isinstance(cfg.datasets[0], ShoutEntry)
    out = pm.hook.tokenize(cfg=cfg, dataset_cfg=cfg.datasets[0], tokenizer=None, batch={"t": ["ab"]})
    assert out["input_ids"] == [[65, 66]]
    # the entry's keys are the format's: unknown ones are reported against it
    with pytest.raises(ConfigError, match=r"unknown key 'field_shuot' in datasets.0; did you mean 'field_shout'\?\n"
                                          r"accepted for format 'shout': path, "):
        build_run_config({"base_model": "m", "datasets": [{**entry, "field_shuot": "t"}]}, plugins=[Shout])
    with pytest.raises(ConfigError, match="'shuot' is not a known dataset type; did you mean 'shout'"):
        build_run_config({"base_model": "m", "datasets": [{"path": "x", "type": "shuot"}]}, plugins=[Shout])
    with pytest.raises(ConfigError, match=r"'shout.loud' is not accepted \(shout has no variants\)"):
        build_run_config({"base_model": "m", "datasets": [{"path": "x", "type": "shout.loud"}]}, plugins=[Shout])
    # the schema shows the format's keys
    schema = json.dumps(config_class(pm).model_json_schema())
    assert "field_shout" in schema and "Column to shout." in schema and "shout: ShoutEntry" in schema

    class Twice:
        @hookimpl
        def dataset_formats():
            return [DatasetFormat("shout", shout)]

    with pytest.raises(PluginError, match=r"'shout' is registered by two plugins: .*Shout.*Twice"):
        build_run_config({"base_model": "m"}, plugins=[Shout, Twice])

    class Untyped:
        @hookimpl
        def dataset_formats():
            return [DatasetFormat("a", shout, untyped=True), DatasetFormat("b", shout, untyped=True)]

    with pytest.raises(PluginError, match="'a' and 'b' both read entries without type"):
        build_run_config({"base_model": "m"}, plugins=[Untyped])


def test_hook_optimizers():
    from plait.errors import ConfigError
    from plait.registries import Optimizer

    def build_toy(cfg, params):
        return torch.optim.SGD(params, lr=cfg.learning_rate * 2)

    class Toy:
        @hookimpl
        def optimizers():
            return [Optimizer("sgd_toy", build_toy), Optimizer("needs_absent", build_toy,
                                                               requires=("plait_no_such_package",),
                                                               install="pip install plait-no-such-package")]

    cfg, pm = build_run_config({"base_model": "m", "optimizer": "sgd_toy", "learning_rate": 0.25}, plugins=[Toy])
    param = torch.nn.Parameter(torch.ones(3))
    optimizer = pm.hook.build_optimizer(cfg=cfg, params=[{"params": [param], "weight_decay": 0.0}])
    assert isinstance(optimizer, torch.optim.SGD) and optimizer.param_groups[0]["lr"] == 0.5
    with pytest.raises(ConfigError, match=r"'sgd_toi' is not a known optimizer; did you mean 'sgd_toy'\?") as info:
        build_run_config({"base_model": "m", "optimizer": "sgd_toi"}, plugins=[Toy])
    assert "adamw_torch" in str(info.value) and "sgd_toy" in str(info.value)
    with pytest.raises(ConfigError, match="'needs_absent' needs plait_no_such_package.*pip install plait-no-such"):
        build_run_config({"base_model": "m", "optimizer": "needs_absent"}, plugins=[Toy])


def test_hook_schedulers():
    from plait.errors import ConfigError
    from plait.registries import Scheduler

    def halving(cfg, optimizer, total_steps):
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=cfg.lr_scheduler_kwargs.get("gamma", 0.5))

    class Halving:
        @hookimpl
        def schedulers():
            return [Scheduler("halving", halving, kwargs=("gamma",))]

    cfg, pm = build_run_config({"base_model": "m", "lr_scheduler": "halving", "lr_scheduler_kwargs": {"gamma": 0.25}},
                               plugins=[Halving])
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=1.0)
    scheduler = pm.hook.build_scheduler(cfg=cfg, optimizer=optimizer, total_steps=4)
    optimizer.step()
    scheduler.step()
    assert optimizer.param_groups[0]["lr"] == 0.25
    with pytest.raises(ConfigError, match=r"'cosin' is not a known schedule; did you mean 'cosine'\?"):
        build_run_config({"base_model": "m", "lr_scheduler": "cosin"})
    with pytest.raises(ConfigError, match=r"'lr_scheduler_kwargs': \['gama'\] are not arguments of schedule "
                                          r"'halving'; accepted: gamma"):
        build_run_config({"base_model": "m", "lr_scheduler": "halving", "lr_scheduler_kwargs": {"gama": 1}},
                         plugins=[Halving])


def test_hook_configure():
    from plait.errors import ConfigError

    seen = []

    class Defaults:
        @hookimpl
        def configure(cfg):
            if cfg.source_of("micro_batch_size") == "default":
                cfg.set_by_plugin("micro_batch_size", 3, "defaults")

        @hookimpl
        def validate_config(cfg):
            seen.append(cfg.micro_batch_size)  # validate_config sees what configure set
            if cfg.micro_batch_size > 4:
                raise ConfigError("micro_batch_size: at most 4")

    cfg, _ = build_run_config({"base_model": "m"}, plugins=[Defaults])
    assert (cfg.micro_batch_size, cfg.source_of("micro_batch_size"), seen) == (3, "plugin:defaults", [3])
    cfg, _ = build_run_config({"base_model": "m", "micro_batch_size": 2}, plugins=[Defaults])
    assert cfg.micro_batch_size == 2


def test_hook_validate_config():
    from plait.errors import ConfigError

    class Rule:
        @hookimpl
        def validate_config(cfg):
            if cfg.micro_batch_size > 4:
                raise ConfigError("micro_batch_size: at most 4 with this plugin")

    build_run_config({"base_model": "m", "micro_batch_size": 4}, plugins=[Rule])
    with pytest.raises(ConfigError, match="at most 4"):
        build_run_config({"base_model": "m", "micro_batch_size": 8}, plugins=[Rule])


def test_hook_load_tokenizer(tiny_model_dir):
    cfg, pm = build_run_config({"base_model": str(tiny_model_dir), "chat_template": "llama3", "tokens": ["<tool>"]})
    tokenizer = pm.hook.load_tokenizer(cfg=cfg)
    assert tokenizer.pad_token is not None
    assert "<|start_header_id|>" in tokenizer.chat_template
    assert tokenizer.convert_tokens_to_ids("<tool>") == len(tokenizer) - 1


def test_hook_tokenize():
    # answered by the contrib example plugin for its own type only
    from transformers import AutoTokenizer

    from plait.testing import make_tiny_tokenizer
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = AutoTokenizer.from_pretrained(make_tiny_tokenizer(tmp))
    cfg, pm = build_run_config({"base_model": "m", "datasets": [{"path": "x", "type": "qa"}]})
    out = pm.hook.tokenize(cfg=cfg, dataset_cfg=cfg.datasets[0], tokenizer=tokenizer,
                           batch={"question": ["why"], "answer": ["because"]})
    assert len(out["input_ids"][0]) == len(out["labels"][0])
    assert out["labels"][0][-1] == tokenizer.eos_token_id


def test_hook_collate(tiny_model_dir):
    cfg, pm = build_run_config({"base_model": str(tiny_model_dir)})
    tokenizer = pm.hook.load_tokenizer(cfg=cfg)
    batch = pm.hook.collate(cfg=cfg, rows=[{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]},
                                           {"input_ids": [8], "labels": [8]}], tokenizer=tokenizer)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, tokenizer.pad_token_id, tokenizer.pad_token_id]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]


def test_hook_load_model(tiny_model_dir):
    cfg, pm = build_run_config({"base_model": str(tiny_model_dir), "eager_attention": True, "bf16": False})
    model = pm.hook.load_model(cfg=cfg, tokenizer=pm.hook.load_tokenizer(cfg=cfg))
    assert model.config.use_cache is False
    assert model.config._attn_implementation == "eager"
    assert next(model.parameters()).dtype == torch.float32


def test_hook_loading_context(tiny_model_dir):
    """A plugin's context is open while the model is built (here it makes
    transformers build ReLU MLPs) and closed once the loader returns."""
    import contextlib

    from transformers import AutoModelForCausalLM
    from transformers.models.llama import modeling_llama

    class ReluMlps:
        @hookimpl
        def loading_context(cfg):
            @contextlib.contextmanager
            def relu_mlps():
                built = modeling_llama.LlamaMLP.__init__

                def init(self, config):
                    built(self, config)
                    self.act_fn = torch.nn.ReLU()

                modeling_llama.LlamaMLP.__init__ = init
                try:
                    yield
                finally:
                    modeling_llama.LlamaMLP.__init__ = built
            return relu_mlps()

    cfg, pm = build_run_config({"base_model": str(tiny_model_dir)}, plugins=[ReluMlps])
    model = pm.hook.load_model(cfg=cfg, tokenizer=None)
    assert isinstance(model.model.layers[0].mlp.act_fn, torch.nn.ReLU)
    plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir)  # outside the context: transformers' own MLP
    assert not isinstance(plain.model.layers[0].mlp.act_fn, torch.nn.ReLU)


def test_hook_gradient_checkpointing_mode(tiny_model_dir):
    """Core's default answers the config's value; a plugin's answer wins, and
    the model pipeline applies it (the offloader wraps every layer)."""
    from plait.pipeline import setup_model

    cfg, pm = build_run_config({"base_model": str(tiny_model_dir), "gradient_checkpointing": True})
    assert pm.hook.gradient_checkpointing_mode(cfg=cfg) is True
    cfg, pm = build_run_config({"base_model": str(tiny_model_dir)})
    assert pm.hook.gradient_checkpointing_mode(cfg=cfg) is False

    class OffloadAlways:
        @hookimpl
        def gradient_checkpointing_mode(cfg):
            return "offload"

    cfg, pm = build_run_config({"base_model": str(tiny_model_dir)}, plugins=[OffloadAlways])
    assert pm.hook.gradient_checkpointing_mode(cfg=cfg) == "offload"
    model = setup_model(cfg, pm, pm.hook.load_tokenizer(cfg=cfg), for_training=True, device=torch.device("cpu"))
    offloaded = [m for m in model.model.layers if m._gradient_checkpointing_func.__name__ == "offloaded"]
    assert model.is_gradient_checkpointing and len(offloaded) == model.config.num_hidden_layers


def test_hook_load_adapter(tiny_model_dir):
    class FreezeAllButHead:
        @hookimpl
        def load_adapter(cfg, model):
            for name, param in model.named_parameters():
                param.requires_grad = name.startswith("lm_head")
            return model

    cfg, pm = build_run_config({"base_model": str(tiny_model_dir)}, plugins=[FreezeAllButHead])
    model = pm.hook.load_adapter(cfg=cfg, model=pm.hook.load_model(cfg=cfg, tokenizer=None))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable == ["lm_head.weight"]


def test_hook_patch_model(tiny_model_dir):
    class SwapActivation:
        @hookimpl
        def patch_model(cfg, model):
            for layer in model.model.layers:
                layer.mlp.act_fn = torch.nn.ReLU()
            return {"mlp.act_fn": "relu"}

    cfg, pm = build_run_config({"base_model": str(tiny_model_dir)}, plugins=[SwapActivation])
    model = pm.hook.load_model(cfg=cfg, tokenizer=None)
    reports = pm.hook.patch_model(cfg=cfg, model=model)
    assert {"mlp.act_fn": "relu"} in reports
    assert isinstance(model.model.layers[0].mlp.act_fn, torch.nn.ReLU)


def test_hook_wrap_parallel():
    class Wrapper:
        @hookimpl
        def wrap_parallel(cfg, model, mesh):
            return torch.nn.Sequential(model)

    cfg, pm = build_run_config({"base_model": "m"}, plugins=[Wrapper])
    wrapped = pm.hook.wrap_parallel(cfg=cfg, model=torch.nn.Linear(2, 2), mesh=None)
    assert isinstance(wrapped, torch.nn.Sequential)


def test_hook_build_loss():
    cfg, pm = build_run_config({"base_model": "m"})
    loss_fn = pm.hook.build_loss(cfg=cfg, model=None)
    torch.manual_seed(0)
    hidden, weight = torch.randn(10, 8, requires_grad=True), torch.randn(30, 8, requires_grad=True)
    labels = torch.tensor([1, 2, -100, 4, 5, -100, 7, 8, 9, 29])
    loss_sum, n = loss_fn(hidden, weight, labels)
    reference = torch.nn.functional.cross_entropy(hidden @ weight.T, labels, reduction="sum")
    assert n == 8
    torch.testing.assert_close(loss_sum, reference, rtol=1e-6, atol=1e-6)


def test_hook_build_optimizer():
    cfg, pm = build_run_config({"base_model": "m", "optimizer": "sgd", "learning_rate": 0.5})
    param = torch.nn.Parameter(torch.ones(3))
    optimizer = pm.hook.build_optimizer(cfg=cfg, params=[{"params": [param], "weight_decay": 0.0}])
    assert isinstance(optimizer, torch.optim.SGD) and optimizer.param_groups[0]["lr"] == 0.5


def test_hook_build_scheduler():
    cfg, pm = build_run_config({"base_model": "m", "learning_rate": 1.0, "warmup_steps": 2,
                                "lr_scheduler": "cosine", "cosine_min_lr_ratio": 0.1})
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=1.0)
    scheduler = pm.hook.build_scheduler(cfg=cfg, optimizer=optimizer, total_steps=12)
    lrs = []
    for _ in range(12):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs[0] < lrs[1] < lrs[2] == 1.0  # warm-up, then the peak
    assert all(a >= b for a, b in zip(lrs[2:], lrs[3:]))  # cosine never rises
    assert math.isclose(lrs[-1], 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 9 / 10)), rel_tol=1e-9)


def test_hook_save_model(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    cfg, pm = build_run_config({"base_model": str(tiny_model_dir)})
    tokenizer = pm.hook.load_tokenizer(cfg=cfg)
    model = pm.hook.load_model(cfg=cfg, tokenizer=tokenizer)
    path = pm.hook.save_model(cfg=cfg, model=model, tokenizer=tokenizer, path=str(tmp_path / "out"))
    assert (Path(path) / "model.safetensors").exists() and (Path(path) / "tokenizer.json").exists()
    reloaded = AutoModelForCausalLM.from_pretrained(path)
    torch.testing.assert_close(reloaded.lm_head.weight, model.lm_head.weight)


def test_hook_register_commands():
    from plait.testing import run_cli

    class Command:
        @hookimpl
        def register_commands(subparsers):
            parser = subparsers.add_parser("shout")
            parser.add_argument("word")
            parser.set_defaults(func=lambda args, pm: print(args.word.upper()) or 3)

    result = run_cli(["shout", "hey"], plugins=[Command])
    assert (result.exit_code, result.stdout) == (3, "HEY\n")


def test_hook_model_families():
    family = ModelFamily(name="toy", model_types=("toy_lm",), decoder_layer_class="ToyLayer")

    class Families:
        @hookimpl
        def model_families():
            return [family]

    pm = plugin_manager(Families)
    assert find_family(pm, "toy_lm") is family
    assert find_family(pm, "unknown_type") is None


def test_hook_tokenizer_loaded(tiny_model_dir, tmp_path):
    # a plugin's change to the tokenizer is what the data is tokenized with
    from datasets import load_from_disk

    from plait.testing import run_cli, write_config, write_jsonl

    class AddToken:
        calls = 0

        @hookimpl
        def tokenizer_loaded(cfg, tokenizer):
            AddToken.calls += 1
            tokenizer.add_tokens(["<tool>"], special_tokens=True)

    cfg, pm = build_run_config({"base_model": str(tiny_model_dir)}, plugins=[AddToken])
    tokenizer = pm.hook.load_tokenizer(cfg=cfg)
    assert pm.hook.tokenizer_loaded(cfg=cfg, tokenizer=tokenizer) == []  # return value ignored
    tool_id = tokenizer.convert_tokens_to_ids("<tool>")
    assert tool_id == len(tokenizer) - 1

    data = write_jsonl(tmp_path / "d.jsonl", [{"text": "call <tool> now"}, {"text": "and <tool> again"}])
    config = write_config(tmp_path / "c.yml", base_model=str(tiny_model_dir), sequence_len=64,
                          datasets=[{"path": str(data), "type": "completion"}],
                          dataset_prepared_path=str(tmp_path / "prepared"), output_dir=str(tmp_path / "out"))
    result = run_cli(["preprocess", str(config), "--no-progress"], plugins=[AddToken])
    assert result.exit_code == 0, result.stderr[-2000:]
    assert AddToken.calls == 2
    cache = result.stdout.split("prepared data: ")[1].splitlines()[0].strip()
    assert all(tool_id in row["input_ids"] for row in load_from_disk(f"{cache}/train"))


def test_hook_shard_batch():
    class FirstRowOnly:
        @hookimpl
        def shard_batch(cfg, batch, mesh):
            return {key: value[:1] for key, value in batch.items()}

    class NotConcerned:
        @hookimpl
        def shard_batch(cfg, batch, mesh):
            return None

    batch = {"input_ids": torch.arange(8).reshape(2, 4), "labels": torch.arange(8).reshape(2, 4)}
    cfg, pm = build_run_config({"base_model": "m"}, plugins=[FirstRowOnly, NotConcerned])
    part = pm.hook.shard_batch(cfg=cfg, batch=batch, mesh=None)
    assert part["input_ids"].tolist() == [[0, 1, 2, 3]]
    cfg, pm = build_run_config({"base_model": "m"}, plugins=[NotConcerned])
    assert pm.hook.shard_batch(cfg=cfg, batch=batch, mesh=None) is None  # the loop keeps the batch whole
    # plait-parallel (installed) answers only for a mesh with a cp dimension > 1
    if pm.has_plugin("parallel"):
        assert pm.hook.shard_batch(cfg=cfg, batch=batch, mesh=None) is None


def test_hook_extra_loss(tiny_model_dir, tmp_path):
    # a constant term c is added to the step's mean loss exactly once, however the
    # step is split into micro-batches (token-weighted), and never to the eval loss
    from types import SimpleNamespace

    from datasets import Dataset

    from plait.train.loop import train

    rows = [{"input_ids": list(range(10 + i, 20 + 2 * i)), "labels": [-100] * 3 + list(range(13 + i, 20 + 2 * i))}
            for i in range(8)]
    data = SimpleNamespace(train=Dataset.from_list(rows), eval=Dataset.from_list(rows[:2]))
    seen = []

    class Constant:
        @hookimpl
        def extra_loss(cfg, model, outputs, batch):
            seen.append((hasattr(outputs, "logits"), "input_ids" in batch))
            return torch.tensor(0.5)

    first = {}
    for name, plugins in (("plain", []), ("extra", [Constant])):
        cfg, pm = build_run_config({"base_model": str(tiny_model_dir), "output_dir": str(tmp_path / name),
                                    "micro_batch_size": 2, "gradient_accumulation_steps": 2, "max_steps": 1,
                                    "eval_steps": 1, "bf16": False}, plugins=plugins)
        run = train(cfg, pm, data=data)
        first[name] = (run.last_metrics["loss"], run.last_eval["eval_loss"])
    assert seen == [(True, True)] * 2  # once per training micro-batch, none in eval
    assert first["extra"][0] == pytest.approx(first["plain"][0] + 0.5, abs=1e-5)
    assert first["extra"][1] == pytest.approx(first["plain"][1], abs=1e-6)


def test_hook_chat_templates(tmp_path):
    # a plugin's names are accepted like core's; tokenizer_default_fallback_<name> keeps the tokenizer's
    # own template and uses the named one only when it has none; a name two plugins give is an error
    from plait.chat_templates import NAMED_CHAT_TEMPLATES
    from plait.errors import ConfigError, PluginError
    from plait.testing import CHATML_TEMPLATE, make_tiny_tokenizer

    toy = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}{{ eos_token }}{% endfor %}"

    class Toy:
        @hookimpl
        def chat_templates():
            return {"toy_v1": toy}

    class AlsoToy:
        @hookimpl
        def chat_templates():
            return {"toy_v1": "{{ messages }}"}

    class OwnChatml:
        @hookimpl
        def chat_templates():
            return {"chatml": "{{ messages }}"}

    class Reserved:
        @hookimpl
        def chat_templates():
            return {"tokenizer_default_fallback_x": "{{ messages }}"}

    with_template = str(make_tiny_tokenizer(tmp_path / "chatml"))
    without = str(make_tiny_tokenizer(tmp_path / "bare", chat_template=None))

    def template(base, value, plugins=(Toy,)):
        cfg, pm = build_run_config({"base_model": base, "chat_template": value}, plugins=list(plugins))
        return pm.hook.load_tokenizer(cfg=cfg).chat_template

    assert template(without, "toy_v1") == toy
    assert template(without, "llama3") == NAMED_CHAT_TEMPLATES["llama3"]  # core's, through the same hook
    assert template(with_template, "toy_v1") == toy  # a name replaces the tokenizer's template
    assert template(with_template, "tokenizer_default_fallback_toy_v1") == CHATML_TEMPLATE
    assert template(without, "tokenizer_default_fallback_toy_v1") == toy
    assert template(without, "tokenizer_default_fallback_chatml") == NAMED_CHAT_TEMPLATES["chatml"]

    with pytest.raises(ConfigError) as info:
        template(without, "toy_v2")
    message = str(info.value)
    assert "config key 'chat_template': 'toy_v2' is not a known template; did you mean 'toy_v1'?" in message
    accepted = message.split("accepted: ")[1]
    assert all(name in accepted for name in ("tokenizer_default", "chatml", "llama3", "toy_v1",
                                             "tokenizer_default_fallback_<"))
    # a mistyped fallback name fails even when the tokenizer's own template would have been used
    with pytest.raises(ConfigError, match="did you mean 'tokenizer_default_fallback_toy_v1'"):
        template(with_template, "tokenizer_default_fallback_toy_v2")

    with pytest.raises(PluginError, match="'toy_v1' is given by two plugins: 'Toy' and 'AlsoToy'"):
        template(without, "toy_v1", plugins=(Toy, AlsoToy))
    with pytest.raises(PluginError, match=r"'chatml' is given by two plugins: 'plait.builtin.model' \(distribution "
                                          r"plait .*\) and 'OwnChatml'"):
        template(without, "chatml", plugins=(OwnChatml,))
    with pytest.raises(PluginError, match="plugin 'Reserved': chat template name 'tokenizer_default_fallback_x' is "
                                          "reserved"):
        template(without, "chatml", plugins=(Reserved,))


def test_hook_build_objective():
    from plait.builtin.loss import TokenCrossEntropy

    cfg, pm = build_run_config({"base_model": "m"})
    objective = pm.hook.build_objective(cfg=cfg, model=None, loss_fn=pm.hook.build_loss(cfg=cfg, model=None))
    assert isinstance(objective, TokenCrossEntropy) and objective.unit == "tokens" and objective.perplexity
    labels = torch.tensor([[5, -100, 7, 8], [-100, 3, -100, -100]])
    assert objective.count({"labels": labels}) == 3  # trained positions after the shift
    assert objective.count({"shift_labels": labels}) == 4  # a context-parallel shard is already shifted

    class Plugin:
        @hookimpl
        def build_objective(cfg, model, loss_fn):
            return "mine"

    cfg, pm = build_run_config({"base_model": "m"}, plugins=[Plugin()])
    assert pm.hook.build_objective(cfg=cfg, model=None, loss_fn=None) == "mine"


def test_hook_install_step_hooks(tiny_model_dir, tmp_path):
    # a plugin's optimizer pre-hook that drops every gradient leaves the weights as they were (the hook
    # changes what a step does), it reads the step as the step happens, and the loop takes it off at the end
    from types import SimpleNamespace

    from datasets import Dataset

    from plait.train.loop import train

    rows = [{"input_ids": list(range(10 + i, 20 + 2 * i)), "labels": list(range(10 + i, 20 + 2 * i))}
            for i in range(6)]
    data = SimpleNamespace(train=Dataset.from_list(rows))
    seen_steps = []

    class Frozen:
        @hookimpl
        def install_step_hooks(cfg, model, optimizer, step_of):
            def drop_gradients(opt, args, kwargs):
                seen_steps.append(step_of())
                for group in opt.param_groups:
                    for param in group["params"]:
                        param.grad = None

            return [optimizer.register_step_pre_hook(drop_gradients)]

    cfg, pm = build_run_config({"base_model": str(tiny_model_dir), "output_dir": str(tmp_path / "out"),
                                "micro_batch_size": 2, "max_steps": 3, "weight_decay": 0.0, "bf16": False,
                                "learning_rate": 1e-2}, plugins=[Frozen])
    start = {name: p.detach().clone() for name, p in
             make_tiny_model_weights(tiny_model_dir).items()}
    run = train(cfg, pm, data=data)
    assert seen_steps == [0, 1, 2]
    after = dict(run.model.named_parameters())
    assert all(torch.equal(after[name].detach().cpu(), weight) for name, weight in start.items() if name in after)
    assert not run.optimizer._optimizer_step_pre_hooks and run.step_hooks == []

    # without the plugin the same run moves the weights: the comparison above can fail
    cfg, pm = build_run_config({"base_model": str(tiny_model_dir), "output_dir": str(tmp_path / "plain"),
                                "micro_batch_size": 2, "max_steps": 3, "weight_decay": 0.0, "bf16": False,
                                "learning_rate": 1e-2})
    moved = dict(train(cfg, pm, data=data).model.named_parameters())
    assert any(not torch.equal(moved[name].detach().cpu(), weight) for name, weight in start.items() if name in moved)


def make_tiny_model_weights(model_dir):
    from transformers import AutoModelForCausalLM

    return dict(AutoModelForCausalLM.from_pretrained(model_dir).named_parameters())
