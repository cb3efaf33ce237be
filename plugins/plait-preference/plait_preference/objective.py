"""The preference objective the loop runs (``build_objective``).

One micro-batch is one forward of the policy over every segment (chosen and
rejected of each pair, or a KTO row's completion and KL sequence), and, for
the methods with a reference (DPO, IPO, KTO), one forward of the reference
without gradients: the same model with its LoRA adapter switched off, or a
frozen copy of the starting weights when every weight trains; with
``precompute_ref_log_probs`` neither: the rows carry the reference's sums
(:mod:`plait_preference.precompute`).

The loop averages over *units*: pairs (DPO, IPO, ORPO, SimPO) or rows (KTO).
Metrics are TRL's names: ``rewards/chosen``, ``rewards/rejected``,
``rewards/margins``, ``rewards/accuracies``, ``logps/chosen``, ``logps/rejected``.

``samples``: ``None``, or a collection a tracker puts there before training
(core's SwanLab tracker, for ``swanlab_log_completions``); each trained unit
is then appended as token ids and its score (:mod:`plait_preference.samples`).
"""

from __future__ import annotations

import contextlib

from plait_preference import config, losses, samples
from plait_preference.logps import segment_logps
from plait_preference.rows import CHOSEN, DESIRABLE, KL, UNDESIRABLE

REFERENCE_METHODS = ("dpo", "ipo", "kto")
#: batch keys the objective reads on the host only; they are not copied to the device
HOST_ONLY_KEYS = ("segment_index", "segment_roles")


class PreferenceObjective:
    perplexity = False

    def __init__(self, cfg, model):
        self.cfg = cfg
        self.method = cfg.rl
        self.beta = config.beta(cfg)
        self.unit = "examples" if self.method == "kto" else "pairs"
        self.reference = None
        if self.method in REFERENCE_METHODS:
            # precomputed: plait_preference.precompute scores the rows before the first step
            # (on_train_start), so no frozen copy is made
            self.reference = "precomputed" if cfg.precompute_ref_log_probs else reference_model(model)
        #: only the starting weights can score as the reference (no adapter to switch off)
        self.needs_starting_weights = not _is_peft(model)
        self._adapter_switch = None  # made on first use: the model may be wrapped after this
        self.samples = None  # see the module docstring
        self.last_scores = None  # each unit's reward margin (pairs) or reward (KTO rows) of the last micro-batch
        #: right-padded rows (a row per sequence) go without their padding mask where nothing reads it
        self.drops_padding_mask = not padding_mask_is_read(cfg, model)

    # ---------------------------------------------------------------- protocol

    def count(self, batch) -> int:
        roles = batch["segment_roles"]
        return int((roles != KL).sum()) if self.method == "kto" else int((roles == CHOSEN).sum())

    def loss(self, run, batch, *, training: bool = False):
        from plait.model.batch import drop_right_padding_mask
        from plait_preference.collate import to_device

        # what to score (collated with the batch), which segment is which and how many units there
        # are, all read from the host batch, so nothing below waits for the device (see
        # logps.ScoringPlan); test_objective.py's test_step_waits_for_no_device runs it on the meta device
        host_batch = batch
        inputs = drop_right_padding_mask(host_batch) if self.drops_padding_mask else host_batch
        # what only the host reads (the segments' layout and roles, above and in the plan) stays there
        batch = to_device({k: v for k, v in inputs.items() if k not in HOST_ONLY_KEYS}, run.device)
        plan = batch["scoring_plan"]
        policy = segment_logps(run.model, batch, plan)
        ref = self.reference_logps(run.model, batch, plan) if self.reference is not None else None
        if self.method == "kto":
            loss_sum, metrics = self.kto(policy, ref, Roles(host_batch["segment_roles"], run.device), run.dp_group)
        else:
            loss_sum, metrics = self.pairs(policy, ref, plan)
        if training and self.samples is not None:
            describe = samples.row_samples if self.method == "kto" else samples.pair_samples
            self.samples.extend(describe(host_batch, self.last_scores))
        if training:
            units = self.count(host_batch)
            for term in run.pm.hook.extra_loss(cfg=run.cfg, model=run.model, outputs=policy.outputs, batch=batch):
                if term is not None:  # meant for the micro-batch mean: weigh by its units
                    loss_sum = loss_sum + term.to(loss_sum.dtype) * units
        return loss_sum, metrics

    # --------------------------------------------------------------- reference

    def reference_logps(self, model, batch, plan):
        import torch

        if self.reference == "precomputed":
            return precomputed_logps(batch)
        with torch.no_grad(), self.reference_context(model) as ref_model:
            return segment_logps(ref_model, batch, plan)

    @contextlib.contextmanager
    def reference_context(self, model, *, precomputing: bool = False):
        """The model that scores as the reference. ``precomputing``: before the
        first step, when ``model`` still holds the starting weights."""
        from plait.model.forward import unwrap_data_parallel

        if precomputing and not self.needs_starting_weights:
            with unwrap_data_parallel(model).disable_adapter():
                yield model
        elif precomputing:
            yield model
        elif self.reference == "adapter_off":
            from plait_preference.adapter_switch import AdapterSwitch

            inner = unwrap_data_parallel(model)
            if self._adapter_switch is None or self._adapter_switch.model is not inner:
                self._adapter_switch = AdapterSwitch(inner)
            # the base scores as the starting model, as the precompute pass and a frozen copy do: in eval mode,
            # so training-only noise (neftune_noise_alpha, dropout) stays out of the reference; the policy
            # forward around it keeps its training flags
            with self._adapter_switch.off(), self._adapter_switch.evaluating():
                yield inner
        else:
            from plait_preference.sharded_reference import PendingReference, free_gathered

            if isinstance(self.reference, PendingReference):
                from plait.errors import TrainingError

                raise TrainingError("the FSDP2-sharded reference model is built at on_train_start; this run "
                                    "scored before it (set precompute_ref_log_probs: true to score without one)")
            try:
                yield self.reference
            finally:
                free_gathered(self.reference)

    # ------------------------------------------------------------------ losses

    def pairs(self, policy, ref, plan):
        import torch

        # the chosen and rejected segments: worked out at collation, moved with the plan
        chosen, rejected, n = plan.chosen, plan.rejected, int(plan.chosen.shape[0])
        c_logps, r_logps = policy.completion[chosen], policy.completion[rejected]
        cfg, beta = self.cfg, self.beta
        dpo_losses = config.dpo_losses(cfg) if self.method in ("dpo", "ipo") else ()
        # response token counts: for the per-token averages (IPO, sigmoid_norm, ORPO, SimPO, RPO's NLL)
        if (self.method not in ("dpo", "ipo") or any(name in ("ipo", "sigmoid_norm") for name, _ in dpo_losses)
                or cfg.rpo_alpha):
            c_tokens, r_tokens = policy.completion_tokens[chosen], policy.completion_tokens[rejected]
        else:
            c_tokens = r_tokens = None
        metrics = {}
        if self.method in ("dpo", "ipo"):
            c_ratio = c_logps - ref.completion[chosen]
            r_ratio = r_logps - ref.completion[rejected]
            terms = [(weight, losses.dpo(c_ratio, r_ratio, c_tokens, r_tokens, beta=beta, loss_type=name,
                                         label_smoothing=cfg.dpo_label_smoothing or 0.0))
                     for name, weight in dpo_losses]
            # one loss of weight 1 (the usual case) is itself: no multiply by 1, no add to 0
            per_pair = terms[0][1] if len(terms) == 1 and terms[0][0] == 1 else sum(w * t for w, t in terms)
            loss_sum = per_pair.sum()
            if cfg.rpo_alpha:  # RPO: TRL's "sft" loss beside the pair losses
                loss_sum = with_chosen_nll(loss_sum, metrics, c_logps, c_tokens, cfg.rpo_alpha, n)
            c_reward, r_reward = beta * c_ratio.detach(), beta * r_ratio.detach()
            shown_c, shown_r = c_logps, r_logps
        else:
            c_avg = c_logps / c_tokens.clamp(min=1)
            r_avg = r_logps / r_tokens.clamp(min=1)
            if self.method == "orpo":
                # TRL's ORPO: the chosen NLL over prompt and response, a token mean over the micro-batch
                nll = chosen_nll(policy.whole[chosen], policy.whole_tokens[chosen])
                ratio, log_odds = losses.orpo_odds_ratio(c_avg, r_avg, beta=beta)
                loss_sum = nll * n - ratio.sum()
                metrics["nll_loss"] = (nll.detach() * n, n)
                metrics["log_odds_ratio"] = (ratio.detach().sum() / beta, n)
            else:  # simpo
                gamma = cfg.simpo_gamma if cfg.simpo_gamma is not None else 0.5
                alpha = cfg.cpo_alpha if cfg.cpo_alpha is not None else 1.0
                per_pair = losses.simpo(c_avg, r_avg, beta=beta, gamma=gamma)
                loss_sum = per_pair.sum()
                if alpha:
                    loss_sum = with_chosen_nll(loss_sum, metrics, c_logps, c_tokens, alpha, n)
            c_reward, r_reward = beta * c_avg.detach(), beta * r_avg.detach()
            shown_c, shown_r = c_avg, r_avg
        margins = self.last_scores = c_reward - r_reward
        metrics.update({
            "rewards/chosen": (c_reward.sum(), n),
            "rewards/rejected": (r_reward.sum(), n),
            "rewards/margins": (margins.sum(), n),
            "rewards/accuracies": ((c_reward > r_reward).to(torch.float32).sum(), n),
            "logps/chosen": (shown_c.detach().sum(), n),
            "logps/rejected": (shown_r.detach().sum(), n),
        })
        return loss_sum, metrics

    def kto(self, policy, ref, roles, dp_group=None):
        kl_rows = roles.of(KL)
        rows = roles.of(DESIRABLE, UNDESIRABLE)  # the trained rows, in segment order
        desirable = roles.among((DESIRABLE, UNDESIRABLE), DESIRABLE)
        # where the desirable and the undesirable rows sit among ``rows`` (index tensors, not masks)
        good, bad = roles.index_among((DESIRABLE, UNDESIRABLE), DESIRABLE), \
            roles.index_among((DESIRABLE, UNDESIRABLE), UNDESIRABLE)
        # the batch's KL estimate from the mismatched pairs: detached, clamped at 0 (TRL), the mean over this
        # micro-batch of every data-parallel rank (as TRL gathers it), so N ranks train as one process would
        kl = mean_over_ranks(policy.completion.index_select(0, kl_rows).detach()
                             - ref.completion.index_select(0, kl_rows), dp_group).clamp(min=0)
        ratio = policy.completion.index_select(0, rows) - ref.completion.index_select(0, rows)
        cfg = self.cfg
        per_row = losses.kto(ratio, desirable, kl, beta=self.beta,
                             desirable_weight=cfg.kto_desirable_weight or 1.0,
                             undesirable_weight=cfg.kto_undesirable_weight or 1.0)
        rewards = self.beta * ratio.detach()
        self.last_scores = rewards
        logps = policy.completion.index_select(0, rows).detach()
        good_rewards, bad_rewards = rewards.index_select(0, good), rewards.index_select(0, bad)
        n_good, n_bad = roles.count(DESIRABLE), roles.count(UNDESIRABLE)
        metrics = {"kl": (kl, 1),
                   "rewards/chosen": (good_rewards.sum(), n_good),
                   "rewards/rejected": (bad_rewards.sum(), n_bad),
                   "logps/chosen": (logps.index_select(0, good).sum(), n_good),
                   "logps/rejected": (logps.index_select(0, bad).sum(), n_bad)}
        # TRL's: the difference of the two means, one value per micro-batch that has both kinds of row. A
        # micro-batch without adds nothing (0 of 0) but still names the metric: data-parallel ranks all-reduce
        # their metrics as one list, so every rank must list the same names (test_precompute.py, KTO under FSDP2)
        both = bool(n_good and n_bad)
        # (a zero tensor, not 0.0: the loop stacks a micro-batch's tensor sums into one vector, plait.train.metric_sums)
        margin = good_rewards.mean() - bad_rewards.mean() if both else rewards.new_zeros(())
        metrics["rewards/margins"] = (margin, int(both))
        return per_row.sum(), metrics


def chosen_nll(logps, tokens):
    """The chosen sequences' negative log-likelihood, a token mean over the
    micro-batch (TRL's NLL term of ORPO, CPO/SimPO and RPO)."""
    return -logps.sum() / tokens.sum().clamp(min=1)


def with_chosen_nll(loss_sum, metrics: dict, logps, tokens, weight: float, n: int):
    """``loss_sum`` (a sum over the micro-batch's ``n`` pairs) plus ``weight`` times the
    chosen responses' NLL, which ``metrics`` also gets as ``nll_loss``."""
    nll = chosen_nll(logps, tokens)
    metrics["nll_loss"] = (nll.detach() * n, n)
    return loss_sum + weight * nll * n


def mean_over_ranks(values, group):
    """The mean of ``values`` (1-d, on the device) together with the same
    micro-batch's values on every rank of ``group``: their sums and counts
    all-reduced, so it equals one process's mean over all those rows (TRL's
    mean of the ranks' means differs when their counts do). ``group`` None
    (one data rank): this rank's mean, no collective. The count is filled on
    the device, not copied from the host, and the all-reduce is queued like
    any kernel: nothing here waits for the device."""
    if group is None:
        return values.mean()
    import torch
    import torch.distributed as dist

    totals = torch.stack([values.sum(), values.new_full((), values.shape[0])])
    dist.all_reduce(totals, group=group)
    return totals[0] / totals[1]


class Roles:
    """The segments' roles of a micro-batch, read on the host: index tensors
    and flags (moved to ``device``) and counts, so selecting the chosen or
    rejected sums, or KTO's desirable rows, takes no boolean mask on the
    device (each one a host sync: the device must count it first)."""

    def __init__(self, roles_on_host, device):
        from plait.data.batching import move_to_device as move

        self._roles = roles_on_host
        self._move = lambda tensor: move(tensor, device)

    def of(self, *names):
        """Index of the segments holding any of ``names``, in segment order."""
        return self._move(self._holding(names).nonzero()[:, 0])

    def among(self, names, name):
        """Over the segments holding any of ``names`` (in order): which hold ``name`` (bool, on the device)."""
        return self._move(self._subset(names) == name)

    def index_among(self, names, name):
        """Over the segments holding any of ``names`` (in order): the positions of those holding ``name``."""
        return self._move((self._subset(names) == name).nonzero()[:, 0])

    def count(self, name) -> int:
        return int((self._roles == name).sum())

    def _subset(self, names):
        return self._roles[self._holding(names)]

    def _holding(self, names):
        import torch

        return torch.isin(self._roles, torch.tensor(names))


def precomputed_logps(batch):
    from plait.errors import TrainingError
    from plait_preference.logps import SegmentLogps

    ref = batch.get("ref_logps")
    if ref is None:
        raise TrainingError("precompute_ref_log_probs: true, but these rows carry no reference log-probs (they are "
                            "computed for the training and eval rows of plait train); set precompute_ref_log_probs: "
                            "false to score with a reference model here")
    return SegmentLogps(ref, None)


def padding_mask_is_read(cfg, model) -> bool:
    """Whether anything but attention reads the padding mask of a batch of
    right-padded rows: NEFTune scales its noise by each row's real length, and
    an MoE model's router loss leaves padding out. Otherwise the mask can go
    (core's :func:`plait.model.batch.drop_right_padding_mask`): under causal
    attention no real token looks at the padding after it."""
    from plait.model.forward import unwrap

    config = getattr(unwrap(model), "config", None)
    experts = any(getattr(config, name, None) for name in ("num_experts", "num_local_experts", "n_routed_experts",
                                                            "moe_num_experts", "num_experts_per_tok"))
    return bool(cfg.neftune_noise_alpha) or experts


def _is_peft(model) -> bool:
    from plait.model.forward import unwrap_data_parallel

    inner = unwrap_data_parallel(model)
    return hasattr(inner, "disable_adapter") and hasattr(inner, "peft_config")


def needs_frozen_copy(cfg) -> bool:
    """Whether the run keeps a frozen copy of the starting model as its
    reference: a method with a reference, every weight training, nothing precomputed."""
    return cfg.rl in REFERENCE_METHODS and not cfg.adapter and not cfg.precompute_ref_log_probs


def reference_model(model):
    """``"adapter_off"`` for a peft model (its base is the reference), else a
    frozen copy of the starting weights: under FSDP2 a
    :class:`~plait_preference.sharded_reference.PendingReference` that
    ``on_train_start`` shards like the policy."""
    import copy

    from plait.model.forward import unwrap_data_parallel
    from plait_preference.sharded_reference import pending_for

    inner = unwrap_data_parallel(model)
    if _is_peft(model):
        return "adapter_off"
    pending = pending_for(inner)
    if pending is not None:
        return pending
    frozen = copy.deepcopy(inner)
    frozen.requires_grad_(False)
    frozen.eval()
    return frozen
