"""The objective against independent computations on one micro-batch.

Per-sequence log-probs and their gradients against a plain transformers
forward of each sequence alone (full logits, autograd): 1e-5. ORPO's and
SimPO's losses against TRL's own loss functions (``ORPOTrainer.odds_ratio_loss``,
``CPOTrainer.cpo_loss``) fed log-probs of that plain forward: 1e-5.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from plait_preference.testing import pair_rows

CHATML_USER = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"


#: the two layouts of plait_preference.collate: a row per sequence (the default), and
#: the pair's sequences as segments of one row (what sample_packing lays out)
LAYOUTS = {"rows": {}, "segments": {"sample_packing": True}}


@pytest.fixture(params=sorted(LAYOUTS))
def setup(tiny_model, request):
    from transformers import AutoModelForCausalLM

    from plait.testing import build_run_config

    cfg, pm = build_run_config({"base_model": str(tiny_model), "rl": "dpo", **LAYOUTS[request.param]})
    batch, sequences, tokenizer = collated_pairs(tiny_model, cfg, pm)
    # a row per sequence, or a row per pair
    assert batch["input_ids"].shape[0] == (len(sequences) if request.param == "rows" else len(sequences) // 2)
    return SimpleNamespace(model=AutoModelForCausalLM.from_pretrained(tiny_model), batch=batch, sequences=sequences,
                           pm=pm, tokenizer=tokenizer)


def collated_pairs(tiny_model, cfg, pm, *, kto: bool = False):
    """Four generated pairs as ``cfg``'s collator lays them out, the ``(prompt, completion)`` ids of each
    sequence, and the tokenizer. ``kto``: each row's first sequence is a KTO completion (desirable but
    for every third row), its second the row's KL sequence."""
    from transformers import AutoTokenizer

    from plait_preference.rows import CHOSEN, DESIRABLE, KL, REJECTED, UNDESIRABLE, segments_row, tokenize_responses

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    rows, sequences = [], []
    for i, r in enumerate(pair_rows(4, seed=11)):
        prompt = CHATML_USER.format(r["conversations"][0]["value"])
        responses = [r["chosen"]["value"] + "<|im_end|>", r["rejected"]["value"] + "<|im_end|>"]
        prompt_ids, completions = tokenize_responses(tokenizer, prompt, responses, 0)
        roles = [DESIRABLE if i % 3 else UNDESIRABLE, KL] if kto else [CHOSEN, REJECTED]
        row = segments_row(prompt_ids, completions, roles)
        rows.append({**row, "seq_lens": row["extras"]["seq_lens"], "extras": [row["extras"]]})
        sequences += [(prompt_ids, c) for c in completions]
    return pm.hook.collate(cfg=cfg, rows=rows, tokenizer=tokenizer), sequences, tokenizer


def plain_logps(model, sequences):
    """Per sequence: (summed response log-prob, response tokens, summed log-prob of every token after the first)."""
    out = []
    for prompt_ids, completion in sequences:
        ids = torch.tensor([prompt_ids + completion])
        logits = model(input_ids=ids).logits[0, :-1].float()
        token = torch.log_softmax(logits, -1).gather(-1, ids[0, 1:, None])[:, 0]
        out.append((token[len(prompt_ids) - 1:].sum(), len(completion), token.sum(), len(token)))
    return out


def test_segment_logps_and_gradients_equal_a_plain_forward(setup):
    from plait_preference.logps import scoring_plan, segment_logps

    ours = segment_logps(setup.model, setup.batch, scoring_plan(setup.batch))
    ours.completion.sum().backward()
    got = {n: p.grad.clone() for n, p in setup.model.named_parameters()}
    setup.model.zero_grad()
    plain = plain_logps(setup.model, setup.sequences)
    torch.stack([p[0] for p in plain]).sum().backward()
    torch.testing.assert_close(ours.completion.detach(), torch.stack([p[0] for p in plain]).detach(),
                               rtol=1e-5, atol=1e-5)
    assert ours.completion_tokens.tolist() == [p[1] for p in plain]
    for name, param in setup.model.named_parameters():
        torch.testing.assert_close(got[name], param.grad, rtol=1e-5, atol=1e-6, msg=name)


def objective_loss(setup, **keys):
    from plait.testing import build_run_config
    from plait_preference.objective import PreferenceObjective

    from plait_preference.collate import add_scoring_plan

    cfg, pm = build_run_config({"base_model": "unused", **keys})
    objective = PreferenceObjective(cfg, setup.model)
    run = SimpleNamespace(model=setup.model, device=torch.device("cpu"), pm=pm, cfg=cfg)
    batch = add_scoring_plan(cfg, setup.batch)  # what this method scores (ORPO: every chosen token too)
    loss_sum, metrics = objective.loss(run, batch)
    return loss_sum / objective.count(batch), metrics


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_orpo_loss_equals_trl(setup, beta):
    trl_orpo = pytest.importorskip("trl.experimental.orpo")
    ours, metrics = objective_loss(setup, rl="orpo", orpo_alpha=beta)
    with torch.no_grad():
        plain = plain_logps(setup.model, setup.sequences)
    avg = torch.tensor([p[0] / p[1] for p in plain])
    chosen, rejected = avg[0::2], avg[1::2]
    # TRL's ORPO NLL: chosen prompt and response, a token mean over the batch
    nll = -sum(p[2] for p in plain[0::2]) / sum(p[3] for p in plain[0::2])
    self = SimpleNamespace(beta=beta, accelerator=SimpleNamespace(device="cpu"))
    losses, chosen_rewards, rejected_rewards, _, _ = trl_orpo.ORPOTrainer.odds_ratio_loss(self, chosen, rejected)
    assert float(ours) == pytest.approx(float(nll - losses.mean()), rel=1e-5)
    assert metrics["rewards/chosen"][0] / 4 == pytest.approx(float(chosen_rewards.mean()), rel=1e-5)
    assert metrics["rewards/rejected"][0] / 4 == pytest.approx(float(rejected_rewards.mean()), rel=1e-5)


@pytest.mark.parametrize("gamma,alpha", [(0.5, 1.0), (1.0, 0.0)])
def test_simpo_loss_equals_trl(setup, gamma, alpha):
    trl_cpo = pytest.importorskip("trl.experimental.cpo")
    ours, metrics = objective_loss(setup, rl="simpo", rl_beta=2.0, simpo_gamma=gamma, cpo_alpha=alpha)
    with torch.no_grad():
        plain = plain_logps(setup.model, setup.sequences)
    avg = torch.tensor([p[0] / p[1] for p in plain])
    self = SimpleNamespace(beta=2.0, simpo_gamma=gamma, label_smoothing=0.0, loss_type="simpo", alpha=0.0,
                           accelerator=SimpleNamespace(device="cpu"))
    losses, chosen_rewards, _ = trl_cpo.CPOTrainer.cpo_loss(self, avg[0::2], avg[1::2])
    nll = -sum(p[0] for p in plain[0::2]) / sum(p[1] for p in plain[0::2])  # CPO's NLL: chosen responses only
    assert float(ours) == pytest.approx(float(losses.mean() + alpha * nll), rel=1e-5)
    assert metrics["rewards/chosen"][0] / 4 == pytest.approx(float(chosen_rewards.mean()), rel=1e-5)


def test_lora_reference_sees_no_neftune_noise(setup):
    # the policy's training forwards get NEFTune noise; the reference (the base, adapter off) scores as the
    # starting model in eval mode, so it equals the noiseless base and repeats exactly
    from peft import LoraConfig, get_peft_model

    from plait.model.neftune import attach_neftune
    from plait_preference.logps import scoring_plan, segment_logps

    plan = scoring_plan(setup.batch)
    with torch.no_grad():
        clean = segment_logps(setup.model.eval(), setup.batch, plan).completion
    model = get_peft_model(setup.model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                   target_modules=["q_proj", "v_proj"]))
    attach_neftune(model, 50.0)
    model.train()
    with torch.no_grad():
        noisy = [segment_logps(model, setup.batch, plan).completion for _ in range(2)]
    assert not torch.allclose(noisy[0], noisy[1])  # the noise is on in training forwards

    objective = objective_for(setup, model, rl="dpo")
    assert objective.reference == "adapter_off"
    first, second = (objective.reference_logps(model, setup.batch, plan).completion for _ in range(2))
    torch.testing.assert_close(first, clean, rtol=1e-5, atol=1e-5)
    assert torch.equal(first, second)
    assert model.training and all(m.training for m in model.modules())  # the policy trains on after it


def objective_for(setup, model, **keys):
    from plait.testing import build_run_config
    from plait_preference.objective import PreferenceObjective

    cfg, _ = build_run_config({"base_model": "unused", **keys})
    return PreferenceObjective(cfg, model)


@pytest.mark.parametrize("method,adapter,layout", [
    ("kto", None, "segments"), ("kto", "lora", "segments"), ("dpo", None, "segments"), ("ipo", "lora", "segments"),
    ("orpo", None, "segments"), ("simpo", None, "segments"), ("reward_model", None, "segments"),
    ("dpo", "lora", "rows"), ("kto", None, "rows")])
def test_step_waits_for_no_device(tiny_model, method, adapter, layout):
    # A training step (forward of policy and reference, or of the reward model; loss, metrics, backward)
    # on the meta device: a tensor there has a shape and no data, so whatever would make the host wait
    # for a GPU (.item(), int() or bool() of a tensor, .cpu(), nonzero, a boolean mask) raises here
    # instead. What to score, the roles' indices and the unit counts come from the CPU batch
    # (logps.ScoringPlan, objective.Roles). Both layouts: the pair bins (a block-diagonal mask), and a
    # row per sequence, whose padding mask is dropped on the host, so the forwards get token ids alone
    # and transformers' packed-row test on the position ids it made itself is answered without reading
    # them (plait.model.mask_checks).
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from plait.model.forward import head_plan
    from plait.testing import build_run_config
    from plait_preference.objective import PreferenceObjective
    from plait_preference.reward import RewardObjective, load_reward_model

    keys = {"reward_model": True} if method == "reward_model" else {"rl": method}
    cfg, pm = build_run_config({"base_model": str(tiny_model), **LAYOUTS[layout], **keys})
    batch, _, tokenizer = collated_pairs(tiny_model, cfg, pm, kto=method == "kto")
    if method == "reward_model":
        model = load_reward_model(cfg, tokenizer)
    else:
        model = AutoModelForCausalLM.from_pretrained(tiny_model)
    if adapter:
        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    objective = RewardObjective(cfg) if method == "reward_model" else PreferenceObjective(cfg, model)
    for scorer in (model, getattr(objective, "reference", None)):
        if not isinstance(scorer, (str, type(None))):
            head_plan(scorer)  # probed with real weights, as the loop does right after loading
            scorer.to("meta")
    run = SimpleNamespace(model=model, device=torch.device("meta"), pm=pm, cfg=cfg, dp_group=None)
    loss_sum, metrics = objective.loss(run, batch, training=True)
    loss_sum.backward()
    assert loss_sum.device.type == "meta" and metrics["rewards/chosen"][0].device.type == "meta"
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
