"""The Plait plugin API.

Every hook a plugin may implement is declared here, with a docstring that says
who calls it and when, what each argument is, core's default implementation
and what it returns. This module is the reference for plugin authors;
``tests/test_hooks.py`` fails when a hook lacks a docstring or a test named
``test_hook_<name>`` that exercises it. The module reads in three parts:

1. **registries** -- hooks that contribute named things (config keys, dataset
   formats, optimizers, schedules, chat templates, model families). Every
   plugin is called and the answers are combined; a name given twice is an
   error naming both plugins. The records are in :mod:`plait.registries`.
2. **pipeline** -- in the order a run calls them: ``configure``,
   ``validate_config``, the tokenizer, the data, the model, the optimizer,
   the step.
3. **events** -- notifications from the training loop, then saving and the
   command line.

Plugin order. Plugins are registered in this order (see
:mod:`plait.plugins`): core's defaults first, then installed entry-point
plugins (sorted by entry-point name), then the config's ``plugins:`` modules.
pluggy asks the *last registered first*, so hooks that call every plugin
(``configure``, ``validate_config``, the events) run config plugins, then
entry points (reverse name order), then core; and a *firstresult* hook stops
at the first answer other than ``None``, so a third-party plugin overrides
core's default, which is registered first and marked ``trylast``. Do not rely
on the order between two entry-point plugins: a value one plugin derives in
``configure`` must not be needed by another plugin's ``configure``.

Arguments common to many hooks:

``cfg``
    The validated run configuration (a pydantic model; attribute access,
    ``cfg.learning_rate``). Plugin keys live on the same object.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Optional, Union

import pluggy

if TYPE_CHECKING:  # annotations only: importing this module stays free of torch and transformers
    import argparse
    import contextlib

    import torch
    from pydantic import BaseModel
    from torch.distributed.device_mesh import DeviceMesh
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from plait.config.schema import CoreConfig
    from plait.families import ModelFamily
    from plait.registries import DatasetEntry, DatasetFormat, Optimizer, Scheduler
    from plait.train.loop import Run

hookspec = pluggy.HookspecMarker("plait")
hookimpl = pluggy.HookimplMarker("plait")


# -------------------------------------------------------- registries

@hookspec
def config_schema() -> Optional[type[BaseModel]]:
    """Contribute configuration keys.

    Called once per run, before the config is validated.

    Returns a pydantic ``BaseModel`` subclass whose fields are the keys this
    plugin owns (flat, Axolotl style: ``lora_r``, not ``peft.lora_r``), with
    defaults and validators, or ``None`` when the plugin adds no keys. Core
    combines every contributed model with its own into one config class; two
    plugins declaring the same key is an error that names both.

    Takes no arguments. No default implementation: core's own keys are
    :class:`plait.config.schema.CoreConfig`; the caller is
    :func:`plait.config.build.config_class`.
    """


@hookspec
def dataset_formats() -> Optional[list[DatasetFormat]]:
    """Register dataset formats: the ``type:`` values of ``datasets:`` entries.

    Takes no arguments. Every plugin is called and the
    answers are combined by :func:`plait.registries.registry`; two plugins
    giving the same name is a :class:`plait.errors.PluginError` naming both.
    Called at config time (:func:`plait.config.build.build_config` builds the
    entry union and checks each ``type``) and by core's default
    :func:`tokenize`, which dispatches to the format's function.

    Returns a list of :class:`plait.registries.DatasetFormat` (name, tokenize
    function, ``entry_model`` -- a subclass of
    :class:`plait.registries.DatasetEntry` with the format's own keys --,
    optional ``check_type`` for dotted variants), or ``None``. The part of
    ``type`` before the first dot names the format.
    """


@hookspec
def optimizers() -> Optional[list[Optimizer]]:
    """Register optimizers that ``optimizer:`` can name.

    Takes no arguments. Every plugin is called and the
    answers are combined; a name given by two plugins is a
    :class:`plait.errors.PluginError` naming both. Called at config time
    (:func:`plait.config.build.build_config` looks ``cfg.optimizer`` up, with
    did-you-mean and a missing-package message) and by core's default
    :func:`build_optimizer`. Core registers torch's AdamW/SGD/Adafactor/
    Adagrad/RMSprop and the names of transformers' ``OptimizerNames`` it can
    build (torchao's 4/8-bit AdamW when torchao is installed).

    Returns a list of :class:`plait.registries.Optimizer` (name,
    ``build(cfg, params)``, ``requires``, ``install``, ``check``), or ``None``.
    """


@hookspec
def schedulers() -> Optional[list[Scheduler]]:
    """Register learning-rate schedules that ``lr_scheduler:`` can name.

    Takes no arguments. Every plugin is called and the
    answers are combined; a name given by two plugins is a
    :class:`plait.errors.PluginError` naming both. Called at config time
    (:func:`plait.config.build.build_config` looks ``cfg.lr_scheduler`` up and
    checks ``lr_scheduler_kwargs`` against the schedule's ``kwargs``) and by
    core's default :func:`build_scheduler`. Core registers every
    ``transformers`` ``SchedulerType`` its loop can step.

    Returns a list of :class:`plait.registries.Scheduler` (name,
    ``build(cfg, optimizer, total_steps)``, accepted ``kwargs``, ``check``),
    or ``None``.
    """


@hookspec
def chat_templates() -> Optional[dict[str, str]]:
    """Contribute chat templates that ``chat_template:`` can select by name.

    Called once each time a ``chat_template`` value that names a template is
    resolved to jinja (core's :func:`load_tokenizer` does it for the run's
    key; :func:`plait.chat_templates.lookup_chat_template` does it for any
    caller). Every plugin is called and the results are combined; takes no
    arguments.

    Returns a dict ``{name: jinja template}`` (names follow Axolotl's:
    ``chatml``, ``llama3``, ``gemma``, ``phi_3``, ...), or ``None``. Register
    a name only when the template renders exactly what that name means: a
    config written for Axolotl must train on the same text. Every name also
    works as ``tokenizer_default_fallback_<name>`` (the tokenizer's own
    template, or this one when it has none); ``tokenizer_default`` and that
    prefix are reserved. Two plugins giving the same name is a
    :class:`plait.errors.PluginError` that names both. Core contributes
    ``chatml`` and ``llama3``.

    Core's default implementation: ``plait.builtin.model.chat_templates``.
    """


@hookspec
def model_families() -> Optional[list[ModelFamily]]:
    """Describe the model families this plugin knows.

    Every plugin is called (results combined) when a component needs per-family
    facts: the decoder-layer class to wrap or checkpoint, LoRA targets for
    ``lora_target_linear``, the tensor-parallel plan, modules a kernel plugin
    swaps, the default chat template. Returns a list of
    :class:`plait.families.ModelFamily`, or ``None``. A model whose
    ``config.model_type`` no family claims trains through the generic path.

    Takes no arguments. No default implementation in core (plait-models
    registers the first-party families); called through
    :func:`plait.families.all_families`.
    """

# -------------------------------------------------- pipeline: config

@hookspec
def configure(cfg: CoreConfig) -> None:
    """Fill in defaults and derived values (the ``pytest_configure`` idea).

    ``cfg``
        The config just validated by pydantic; set keys through
        ``cfg.set_by_plugin(key, value, plugin_name)`` so ``plait config
        explain`` shows who set them.

    Every plugin is called, by :func:`plait.config.build.build_config`, after
    pydantic validation and before any :func:`validate_config`, in the
    plugin order of this module's docstring (later-registered plugins first:
    a config ``plugins:`` module runs before an entry-point plugin, which
    runs before core). A value another plugin derives is therefore not yet
    set when a later-asked plugin runs; read only keys the user gives, or
    derive in :func:`validate_config`'s checks. No default implementation
    in core. Return value ignored.
    """


@hookspec
def validate_config(cfg: CoreConfig) -> None:
    """Check rules that span keys of several plugins; never change ``cfg``.

    ``cfg``
        The config after every :func:`configure`.

    Every plugin is called, by :func:`plait.config.build.build_config`,
    before anything is loaded; core's own implementations check chat
    template names, collate and tracking keys (its single-key rules are
    pydantic validators). Raise
    :class:`plait.errors.ConfigError` naming the keys; return value ignored.
    Defaults and derived values belong in :func:`configure`.

    Core's default implementations: ``plait.builtin.model`` (chat template
    names), ``plait.builtin.collate`` (packing), ``plait.builtin.tracking``.
    """

# -------------------------------------- pipeline: tokenizer and data

@hookspec(firstresult=True)
def load_tokenizer(cfg: CoreConfig) -> Optional[PreTrainedTokenizerBase]:
    """Load the tokenizer for ``cfg.tokenizer_config`` (or ``cfg.base_model``).

    firstresult. Returns a ``transformers`` tokenizer with a pad token set and
    the configured chat template, special tokens and added tokens applied.

    ``cfg``
        The run config.

    Core's default (``plait.builtin.model.load_tokenizer``, asked last) uses
    ``AutoTokenizer``. Called by :func:`plait.pipeline.setup_tokenizer`, the
    first setup step of every command.
    """


@hookspec
def tokenizer_loaded(cfg: CoreConfig, tokenizer: PreTrainedTokenizerBase) -> None:
    """Adjust the run's tokenizer once it is loaded.

    Every plugin is called, right after :func:`load_tokenizer` and before any
    data is tokenized (``plait train``, ``plait preprocess``, ``plait
    inspect``), so a chat template installed or a pad token changed here is
    what the data is built with. ``tokenizer`` is modified in place (tokens
    added here make core's ``load_model`` resize the embeddings). Return value
    ignored.

    ``cfg`` is the run config; ``tokenizer`` what :func:`load_tokenizer`
    returned. No default implementation in core; called by
    :func:`plait.pipeline.setup_tokenizer`.
    """


@hookspec(firstresult=True)
def tokenize(cfg: CoreConfig, dataset_cfg: DatasetEntry, tokenizer: PreTrainedTokenizerBase,
             batch: dict[str, list]) -> Optional[dict[str, list]]:
    """Turn a batch of raw rows of one dataset into token ids and labels.

    firstresult; called by :mod:`plait.data.prepare` once per batch of rows of
    every dataset entry. Core's default (``plait.builtin.formats``, asked
    last) looks ``dataset_cfg.type`` up in the :func:`dataset_formats`
    registry and calls that format's function; implement this hook only to
    take over tokenizing as a whole.

    ``cfg``
        The run config.
    ``dataset_cfg``
        The entry of ``cfg.datasets`` being processed: an instance of its
        format's ``entry_model`` (``.type``, ``.path``, the format's keys).
    ``tokenizer``
        The run's tokenizer from :func:`load_tokenizer`.
    ``batch``
        Columns of raw rows, as ``datasets`` gives them to a batched ``map``:
        ``{"instruction": [...], "output": [...]}``.

    Returns a dict of lists with at least ``input_ids`` and ``labels`` (labels
    are ``-100`` where the token is not trained), one entry per input row
    (a format that splits long texts, such as ``completion``, may return
    more), or ``None`` when no format reads the entry.
    A format may add ``extras``: one JSON-serialisable dict per row, kept in
    the tokenized cache and handed back to :func:`collate` as the row's
    ``extras`` (a list, one dict per row of the bin); plait-vision keeps the
    rendered text and image references there so pixels are made per batch.
    One key of ``extras`` has a meaning in core: ``seq_lens``, the lengths of
    the row's segments (plait-preference: the chosen and the rejected
    sequence of a pair), which must not see each other: such a row is
    collated like a packed bin of those segments and is dropped, never
    truncated, when over ``sequence_len``; ``segment_names`` names them for
    ``plait inspect``.
    Core drops or truncates rows over ``sequence_len``. A bad row raises
    :class:`plait.errors.BadRowError` with its index in ``batch``; core turns
    that into a message with the file and the row number.
    """


@hookspec(firstresult=True)
def collate(cfg: CoreConfig, rows: list[dict], tokenizer: PreTrainedTokenizerBase) -> Optional[dict[str, Any]]:
    """Assemble a micro-batch from tokenized rows.

    firstresult. ``rows`` is a list of dicts with ``input_ids`` and ``labels``
    (lists of ints), and ``extras`` when :func:`tokenize` gave some; with
    ``sample_packing`` each element is one packed bin of
    several rows, whose ``seq_lens`` lists the rows' lengths. Returns a dict
    for the model backbone: ``input_ids``, ``labels``, and either a 2D
    ``attention_mask`` or the packing fields (``position_ids`` restarting per
    row plus the boundaries the attention backend needs: a 4D mask, a flex
    ``BlockMask``, or flash's ``cu_seq_lens_q/k`` and ``max_length_q/k``,
    which are ints). See :mod:`plait.data.packing`.

    ``cfg`` is the run config, ``tokenizer`` the run's tokenizer. Core's
    default: ``plait.builtin.collate.collate``. Called by the training loop
    for every micro-batch (training and evaluation).
    """


@hookspec(firstresult=True)
def encode_prompt(cfg: CoreConfig, tokenizer: PreTrainedTokenizerBase, text: str,
                  images: list[str]) -> Optional[dict[str, Any]]:
    """Model inputs for a prompt that shows images.

    firstresult; called by ``plait inference --image PATH`` once per prompt,
    with the model already loaded. No default implementation: without an
    answer, ``--image`` is refused.

    ``text``
        The prompt rendered by the chat template (generation prompt added),
        holding one image placeholder per image.
    ``images``
        The image file paths, in the order of the placeholders.

    Returns a dict of tensors for ``model.generate`` (``input_ids``,
    ``attention_mask``, ``pixel_values`` and whatever else the model takes),
    or ``None`` when the run is not this plugin's. plait-vision answers when
    ``processor_type`` is set, opening and resizing the images as in training.
    ``cfg`` is the run config, ``tokenizer`` the run's tokenizer.
    """


# --------------------------------------------------- pipeline: model

@hookspec
def loading_context(cfg: CoreConfig) -> Optional[contextlib.AbstractContextManager]:
    """A context manager to hold open while a loader builds the model.

    Every plugin is called; each context returned is entered, in hook order,
    around ``from_pretrained`` and left once it returns, so a plugin can
    change *how the model is built* (which modeling class transformers
    instantiates, e.g. plait-models' per-expert Llama 4 experts for
    ``llama4_linearized_experts``) while the checkpoint is read into it and a
    quantizing loader quantizes what it builds. Returns a context manager, or
    ``None`` when the config does not ask this plugin for anything.

    ``cfg`` is the run config. No default implementation in core. Called by
    :func:`plait.model.loading.loading_contexts`, which every loader enters:
    core's and plait-bnb's (through
    :func:`plait.model.choice.load_with_supported_attention`, once per
    attention backend tried) and plait-vision's.
    """


@hookspec(firstresult=True)
def load_model(cfg: CoreConfig, tokenizer: PreTrainedTokenizerBase) -> Optional[PreTrainedModel]:
    """Load the base model.

    firstresult; called after the data is prepared. Returns a
    ``transformers`` causal LM on the CPU or the run's device, in the
    configured dtype, with its embeddings resized to ``len(tokenizer)``. A
    quantization plugin answers only when ``load_in_4bit``/``load_in_8bit``
    asks for it; core answers otherwise.

    ``cfg`` is the run config, ``tokenizer`` the run's tokenizer (embeddings
    are resized to it). Core's default (``plait.builtin.model.load_model``,
    asked last): ``AutoModelForCausalLM.from_pretrained``. Called by
    :func:`plait.pipeline.setup_model`, for training
    (``plait.train.loop.build_model``) and for a trained model
    (``plait.train.trained.load_trained``: evaluate, inference, merge-lora).
    """


@hookspec(firstresult=True)
def gradient_checkpointing_mode(cfg: CoreConfig) -> Optional[Union[bool, str]]:
    """Say how the decoder layers recompute in the backward pass of this run.

    firstresult. Returns the ``gradient_checkpointing`` value to apply:
    ``False`` (none), ``True`` (plain recomputation), ``"offload"`` or
    ``"unsloth"`` (layer inputs parked in host memory); ``None`` leaves the
    answer to the next plugin.

    ``cfg`` is the run config. Core's default
    (``plait.builtin.model.gradient_checkpointing_mode``, asked last) is
    ``cfg.gradient_checkpointing``. plait-parallel answers ``True`` (or the
    top-level offload mode) for ``fsdp_config.activation_checkpointing`` when
    the run spans several processes. Called by
    :func:`plait.model.recompute.apply_gradient_checkpointing`, the one place
    checkpointing is switched on, which :func:`plait.pipeline.setup_model`
    calls once per training run right after :func:`load_model`, before the
    model moves to its device or gets adapters. A loader must not switch it
    on itself; it may still prepare for it (input gradients through frozen
    embeddings when ``cfg.gradient_checkpointing`` is set).
    """


@hookspec(firstresult=True)
def load_adapter(cfg: CoreConfig, model: PreTrainedModel) -> Optional[torch.nn.Module]:
    """Attach trainable adapters (LoRA, DoRA, ...) when ``cfg.adapter`` asks.

    firstresult. Returns the wrapped model, or ``None`` when ``cfg.adapter``
    is not this plugin's (core then trains all parameters).

    ``cfg`` is the run config, ``model`` what :func:`load_model` returned. No
    default implementation in core (plait-peft answers). Called by
    :func:`plait.pipeline.setup_model`: when training with the run config,
    else only for a saved adapter (``lora_model_dir`` pointing at it).
    """


@hookspec
def patch_model(cfg: CoreConfig, model: torch.nn.Module) -> Optional[dict[str, str]]:
    """Swap modules for faster kernels, after adapters are attached.

    Every plugin is called. Mutates ``model`` in place through public
    extension points (module replacement, attention registries). Returns a
    dict ``{module description: kernel name}`` of what it changed, printed at
    start, or ``None``.

    ``cfg`` is the run config, ``model`` the model with its adapters. Core's
    default implementation runs last (``trylast``) and only for ``tiled_mlp``: it
    tiles each decoder layer's MLP, whichever module a plugin put there
    (:mod:`plait.model.tiled_mlp`). Called by
    :func:`plait.pipeline.setup_model`, training only.
    """


@hookspec(firstresult=True)
def wrap_parallel(cfg: CoreConfig, model: torch.nn.Module, mesh: Optional[DeviceMesh]) -> Optional[torch.nn.Module]:
    """Shard or replicate the model over the run's ``DeviceMesh``.

    firstresult; called once the model is patched, only when the run spans
    more than one process. ``mesh`` is a ``torch.distributed.DeviceMesh`` (or
    ``None`` for a single process). Returns the wrapped model; the mesh it
    used is recorded on it with :func:`plait.model.mesh.attach_mesh` (the
    loop reads it back with :func:`~plait.model.mesh.mesh_of` to deal data by
    its ``dp`` dimension; no mesh: replicated with DDP).

    ``cfg`` is the run config, ``model`` the patched model. No default
    implementation in core (plait-parallel answers); without an answer the
    loop (``plait.train.loop.build_model``) replicates with DDP.
    """


@hookspec(firstresult=True)
def build_loss(cfg: CoreConfig, model: Optional[torch.nn.Module]) -> Optional[Callable[..., tuple]]:
    """Provide the loss step: hidden states to summed cross-entropy.

    firstresult. Returns a callable ``loss(hidden, head_weight, labels) ->
    (loss_sum, n_tokens)`` where ``hidden`` is ``[tokens, hidden]``, labels
    are already shifted and ``-100`` marks untrained positions. A fused
    linear + cross-entropy kernel answers here so ``[tokens, vocab]`` logits
    never exist.

    ``cfg`` is the run config, ``model`` the model being trained (its head's
    bias and softcapping). Core's default: ``plait.builtin.loss.build_loss``
    (:func:`plait.model.head.chunked_linear_cross_entropy`). Called once by
    the training loop at start and by ``plait evaluate``.
    """


@hookspec(firstresult=True)
def build_objective(cfg: CoreConfig, model: Optional[torch.nn.Module], loss_fn: Optional[Callable[..., tuple]]) -> Any:
    """Provide what one training step minimises and how micro-batches are weighed.

    firstresult; called by the loop (and ``plait evaluate``) once, after
    :func:`build_loss`. ``cfg`` is the run config, ``model`` the ready model
    (adapters, kernels, parallel wrapper applied), ``loss_fn`` the loss step
    from :func:`build_loss`. Core's default
    (:class:`plait.builtin.loss.TokenCrossEntropy`, ``trylast``) is the
    token cross-entropy through the loop's forward and ``loss_fn``.

    Returns an object with

    ``unit``
        what the step averages over, a name for the step metrics
        (``"tokens"`` for the default, ``"pairs"`` for preference pairs).
    ``count(batch) -> int``
        how many units a collated micro-batch holds. The loop divides every
        micro-batch's summed loss by the count of the whole accumulation
        window (all ranks), so accumulation equals one larger batch.
    ``loss(run, batch, *, training) -> (loss_sum, metrics)``
        the summed loss of the micro-batch (a scalar tensor with grad) and a
        dict ``{name: (sum, n)}`` of metrics summed over ``n`` items (tensors
        or numbers; ``rewards/chosen`` summed over the chosen responses), which
        the loop reports as ``sum / n`` over the step (``eval_<name>`` in
        evaluation). ``run`` is the :class:`plait.train.loop.Run`. Return the
        same names in the same order for every micro-batch, with ``(0, 0)``
        where one does not apply: ranks all-reduce the metrics as one list, so
        a name that one rank leaves out desynchronises the collectives. A
        loss that reads a statistic of the whole data-parallel batch (KTO's
        KL estimate) all-reduces it over ``run.dp_group`` (``None`` with one
        data rank; tensor-parallel ranks, which hold the same rows, are not
        in it): every rank calls ``loss`` for the same number of
        micro-batches, in training and in evaluation.
    ``perplexity``
        whether ``exp(eval_loss)`` means something (``eval_ppl`` is reported).
    ``samples`` (optional)
        ``None``, or a collection (a bounded ``deque``) that a tracker puts
        there in ``on_train_start``; the objective then appends one dict per
        trained unit, token ids and its score (plait-preference: ``prompt_ids``
        with ``chosen_ids``, ``rejected_ids``, ``reward_diff`` for a pair, or
        ``completion_ids``, ``label``, ``reward`` for a KTO row). Core's
        SwanLab tracker reads them for ``swanlab_log_completions``.

    A plugin answers only when the config asks for it (plait-preference for
    ``rl:`` or ``reward_model: true``), else returns ``None``.
    """

# ----------------------------------------------- pipeline: optimizer

@hookspec
def parameter_learning_rates(cfg: CoreConfig, model: torch.nn.Module) -> Optional[dict[str, float]]:
    """Peak learning rates of trainable parameters that do not train at ``learning_rate``.

    Every plugin is asked; called once by the training loop, after the model
    is wrapped and before :func:`build_optimizer`, by
    :func:`plait.model.params.optimizer_param_groups`, which puts parameters
    of the same learning rate (and weight decay) into one parameter group with
    that ``lr``; the schedule scales every group alike. Core's default implementation
    (``plait.builtin.lr_groups``) answers ``embedding_lr``,
    ``embedding_lr_scale`` and ``lr_groups``; plait-peft answers LoRA+
    (``loraplus_lr_ratio``).

    ``cfg``
        The run config.
    ``model``
        The model as it will train (adapters attached, possibly wrapped);
        names are those of ``model.named_parameters()``.

    Returns ``{parameter name: learning rate}`` for the parameters the plugin's
    keys concern, or ``None``/``{}``. Two plugins naming the same parameter is
    a :class:`~plait.errors.ConfigError` naming both.
    """


@hookspec(firstresult=True)
def build_optimizer(cfg: CoreConfig, params: list[dict]) -> Optional[torch.optim.Optimizer]:
    """Build the optimizer named by ``cfg.optimizer``.

    firstresult; called once by the training loop after the model is wrapped.
    Core's default (``plait.builtin.optim``, asked last) builds the
    :func:`optimizers` registry's entry for ``cfg.optimizer``; implement this
    hook only to take over optimizer construction as a whole.

    ``cfg``
        The run config (``optimizer``, ``learning_rate``, ``optim_args``, ...).
    ``params``
        A list of parameter groups (dicts with ``params`` and ``weight_decay``,
        and ``lr`` where :func:`parameter_learning_rates` gave the group its
        own learning rate; the optimizer's ``lr`` is the default of the others).

    Returns a ``torch.optim.Optimizer``, or ``None`` to let the next plugin answer.
    """


@hookspec(firstresult=True)
def build_scheduler(cfg: CoreConfig, optimizer: torch.optim.Optimizer,
                    total_steps: int) -> Optional[torch.optim.lr_scheduler.LRScheduler]:
    """Build the learning-rate schedule named by ``cfg.lr_scheduler``.

    firstresult; called once by the training loop, right after
    :func:`build_optimizer`. Core's default (``plait.builtin.optim``, asked
    last) builds the :func:`schedulers` registry's entry.

    ``cfg``
        The run config (``lr_scheduler``, ``lr_scheduler_kwargs``,
        ``warmup_steps``/``warmup_ratio``, ``cosine_min_lr_ratio``).
    ``optimizer``
        The optimizer from :func:`build_optimizer`.
    ``total_steps``
        The number of optimizer steps of the run.

    Returns a ``torch.optim.lr_scheduler.LRScheduler`` stepped once per
    optimizer step, or ``None`` to let the next plugin answer.
    """


@hookspec
def install_step_hooks(cfg: CoreConfig, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                       step_of: Callable[[], int]) -> Optional[list[Any]]:
    """Hang behaviour that acts at optimizer steps on the optimizer or the model.

    Every plugin is called, on every rank, once per run by
    the training loop (:func:`plait.train.loop.train`), right after
    :func:`build_scheduler` and before a checkpoint is restored and
    :func:`on_train_start`. This is the place for torch hooks that change
    what a step does -- ``optimizer.register_step_pre_hook`` /
    ``register_step_post_hook`` (plait-sparse keeps pruned entries at zero),
    a ``model.register_forward_pre_hook`` gated on the step (plait-qat's
    ``fake_quant_after_n_steps``) -- so that the events stay observers. No
    default implementation in core.

    ``cfg``
        The run config; answer only when your keys ask for it.
    ``model``
        The model as it trains (adapters attached, possibly wrapped).
    ``optimizer``
        The optimizer from :func:`build_optimizer`, whoever built it.
    ``step_of``
        A callable returning the optimizer steps done so far. Read it when a
        hook fires, not now: a resumed run's step is set after this call.

    Returns the handles of the hooks installed (anything with ``remove()``,
    e.g. torch's ``RemovableHandle``), which the loop removes once training
    ends (after :func:`on_train_end`), or ``None``.
    """

# ----------------------------------------------- pipeline: each step

@hookspec(firstresult=True)
def shard_batch(cfg: CoreConfig, batch: dict[str, Any], mesh: Optional[DeviceMesh]) -> Optional[dict[str, Any]]:
    """This rank's part of a collated micro-batch.

    firstresult; called by the loop on every micro-batch that :func:`collate`
    built (training and evaluation), only when the run spans more than one
    process. ``batch`` is the collated dict (tensors on the CPU or the
    device), ``mesh`` the ``DeviceMesh`` :func:`wrap_parallel` left on the
    model (:func:`plait.model.mesh.mesh_of`, may be ``None``). Returns the dict this rank
    trains on, e.g. a context-parallel slice of every sequence with
    ``shift_labels`` (labels already shifted: the loop does not shift them
    again) and ``position_ids``, or ``None`` to keep the batch whole.

    ``cfg`` is the run config. No default implementation in core
    (plait-parallel answers for context parallel).
    """


@hookspec
def extra_loss(cfg: CoreConfig, model: torch.nn.Module, outputs: Any,
               batch: dict[str, Any]) -> Optional[torch.Tensor]:
    """Add a term to the training loss of a micro-batch.

    Every plugin is called, once per training micro-batch (not in
    evaluation), after the forward pass. ``outputs`` is what the model's
    forward returned (e.g. ``router_logits`` of a mixture-of-experts model),
    ``batch`` the micro-batch as the model saw it. Returns a scalar tensor to
    add to the micro-batch's *mean* per-token loss (any coefficient already
    applied), or ``None``. The loop weights each micro-batch's term by its
    share of the step's trained tokens (all ranks), so with one micro-batch
    the loss is ``mean cross-entropy + term``, as transformers computes it.

    ``cfg`` is the run config, ``model`` the model being trained. No default
    implementation in core.
    """

# ------------------------------------------------------------ events

@hookspec
def on_train_start(run: Run) -> None:
    """The loop is about to take its first step.

    Every plugin is called. ``run`` is the :class:`plait.train.loop.Run`
    (config, model, output directory, total steps; typed fields a plugin may
    read). A plugin keeps its own state in ``run.extras`` under its own name;
    core's state is in the fields, never there. Return value ignored.

    Core's default: ``plait.builtin.tracking`` (metrics trackers).
    """


@hookspec
def on_step_end(run: Run, metrics: dict[str, float]) -> None:
    """An optimizer step finished and was logged.

    Every plugin is called, on the logging rank only. ``metrics`` is a dict:
    ``step``, ``loss``, ``lr``, ``grad_norm``, ``tokens`` (trained; named
    after the objective's ``unit``: ``pairs`` for DPO), ``input_tokens``
    (read, padding excluded), ``tokens_per_s``, and the objective's own
    metrics (:func:`build_objective`: ``rewards/margins``, ...).
    Return value ignored.

    ``run`` is the loop's ``Run``, with ``run.step`` equal to ``metrics["step"]``
    and the weights as that step left them. Where the loop reads a step's
    values one step late (``defer_step_read``: one process, fused Adam/AdamW),
    the call comes during the next step, after its backward pass and before
    its update; before an evaluation, a checkpoint, a stop or the run's end it
    comes before the next step starts. Core's default: ``plait.builtin.tracking``.
    """


@hookspec
def on_eval_end(run: Run, metrics: dict[str, float]) -> None:
    """An evaluation finished. ``metrics``: ``step``, ``eval_loss``, ``eval_ppl``
    (when the objective has a perplexity), ``eval_<unit>`` (``eval_tokens``) and
    the objective's own metrics as ``eval_<name>`` (``eval_rewards/margins``).

    Every plugin is called, on the logging rank only. Return value ignored.

    ``run`` is the loop's ``Run``. Core's default: ``plait.builtin.tracking``.
    """


@hookspec
def on_eval_predictions(run: Run, rows: list[dict[str, Any]]) -> None:
    """An evaluation generated completions for ``eval_table_size`` eval rows.

    Every plugin is called, on the logging rank only, after the rows were
    appended to ``eval_predictions.jsonl`` and before ``on_eval_end``.
    ``rows``: one dict per eval row, in row order, with ``step``, ``row``
    (its index in the eval set), ``prompt``, ``reference`` (the trained
    tokens, decoded) and ``prediction`` (the greedy completion, decoded); see
    :mod:`plait.train.generation`. Return value ignored.

    ``run`` is the loop's ``Run``. Core's default: ``plait.builtin.tracking``
    (a table for W&B and MLflow). Called by the loop's ``evaluate_and_log``.
    """


@hookspec
def on_train_end(run: Run) -> None:
    """Training finished and the final model was saved.

    Every plugin is called. Return value ignored.

    ``run`` is the loop's ``Run``. Core's default: ``plait.builtin.tracking``.
    """

# -------------------------------------------------------------- save

@hookspec(firstresult=True)
def save_model(cfg: CoreConfig, model: torch.nn.Module, tokenizer: Optional[PreTrainedTokenizerBase],
               path: str) -> Optional[str]:
    """Write the trained model in Hugging Face format to ``path``.

    firstresult. Returns the path written. A peft model saves its adapter, a
    full fine-tune its weights, both as safetensors with the tokenizer. In a
    multi-process run every rank calls it (sharded weights are gathered
    collectively) and only rank 0 writes.

    ``cfg`` is the run config, ``model`` the trained model, ``tokenizer`` the
    run's tokenizer. Core's default: ``plait.builtin.save.save_model``. Called
    by the loop at the end (``plait.output``) and for every checkpoint
    (``plait.train.checkpoint``).
    """

# --------------------------------------------------------------- CLI

@hookspec
def register_commands(subparsers: argparse._SubParsersAction) -> None:
    """Add subcommands to the ``plait`` command line.

    Every plugin is called while the CLI is built, so keep imports inside the
    command's function (``plait --help`` must not import torch). ``subparsers``
    is the ``argparse`` subparsers action: call ``subparsers.add_parser(...)``
    and ``set_defaults(func=...)``, where ``func(args, pm)`` returns an exit
    code. Return value ignored.

    No default implementation in core (core's own commands are
    :mod:`plait.commands`).
    """


# -------------------------------------------------------------- inference


@hookspec(firstresult=True)
def inference_prompt(cfg: CoreConfig, dataset_cfg: DatasetEntry, messages: list[dict[str, Any]]) -> Optional[str]:
    """The prompt text a model trained on ``dataset_cfg``'s format expects.

    firstresult; called by ``plait inference`` for every answer it generates,
    unless ``--raw`` is given. No default implementation: without an answer,
    core uses the tokenizer's chat template when it has one, else the last
    message as it is.

    ``cfg``
        The run config of the trained model.
    ``dataset_cfg``
        The first entry of ``cfg.datasets``: what the model was trained on.
    ``messages``
        The conversation so far, ``[{"role": "system"|"user"|"assistant",
        "content": str}, ...]``, ending with the user's new message.

    Returns the text to generate from (tokenized with the tokenizer's special
    tokens, as the format's training rows are: an alpaca-trained model gets
    "### Instruction: ... ### Response:" with its BOS), or ``None`` when the
    format's rows go through the chat template or ``dataset_cfg.type`` is not
    this plugin's. plait-formats answers for the alpaca types, user_defined,
    completion and pretraining.
    """
