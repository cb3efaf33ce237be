"""use_eaft: entropy-aware focal training weights each token's cross-entropy by its top-k entropy."""

import pytest
import torch
import torch.nn.functional as F

from plait.errors import ConfigError
from plait.model.head import chunked_linear_cross_entropy, logits_cross_entropy, token_cross_entropy
from plait.testing import build_run_config


def reference_eaft(logits, labels, alpha, k):
    """Written from the definition: CE_i * H_i ** alpha, H_i the entropy of softmax(top-k logits of i)."""
    total = 0.0
    for row, label in zip(logits.double(), labels):
        ce = -F.log_softmax(row, dim=-1)[label]
        p = F.softmax(row.topk(k).values, dim=-1)
        entropy = -(p * torch.log(p + 1e-10)).sum()
        total = total + ce * entropy ** alpha
    return total


@pytest.mark.parametrize("alpha, k", [(1.0, 20), (0.5, 3), (2.0, 64)])
def test_eaft_weights_each_token_by_its_top_k_entropy(alpha, k):
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(12, 64, generator=gen) * 3
    labels = torch.randint(0, 64, (12,), generator=gen)
    got = token_cross_entropy(logits, labels, (alpha, k))
    assert got.item() == pytest.approx(reference_eaft(logits, labels, alpha, k).item(), rel=1e-5)
    # the weight carries no gradient: d loss / d logits is the weight times the plain cross-entropy's gradient
    logits.requires_grad_(True)
    token_cross_entropy(logits, labels, (alpha, k)).backward()
    with torch.no_grad():
        p = F.softmax(logits.topk(k).values, dim=-1)
        weight = (-(p * torch.log(p + 1e-10)).sum(-1)) ** alpha
    plain = logits.detach().clone().requires_grad_(True)
    (F.cross_entropy(plain, labels, reduction="none") * weight).sum().backward()
    torch.testing.assert_close(logits.grad, plain.grad)


def test_the_chunked_head_and_the_logits_path_give_the_same_eaft_loss():
    gen = torch.Generator().manual_seed(1)
    hidden, weight = torch.randn(10, 16, generator=gen), torch.randn(50, 16, generator=gen)
    labels = torch.randint(0, 50, (10,), generator=gen)
    labels[[0, 4]] = -100
    chunked, n = chunked_linear_cross_entropy(hidden, weight, labels, chunk_size=3, eaft=(1.0, 20))
    logits, m = logits_cross_entropy(hidden @ weight.t(), labels, eaft=(1.0, 20))
    assert n == m == 8 and chunked.item() == pytest.approx(logits.item(), rel=1e-6)
    plain, _ = chunked_linear_cross_entropy(hidden, weight, labels)
    assert chunked.item() != pytest.approx(plain.item(), rel=1e-3)  # the weighting changes the loss


def test_the_run_builds_the_eaft_loss_and_the_fused_kernel_steps_aside(tmp_path):
    from plait.testing import make_tiny_model

    model_dir = make_tiny_model(tmp_path / "m")
    cfg, pm = build_run_config({"base_model": str(model_dir), "use_eaft": True, "eaft_alpha": 0.5, "eaft_k": 5})
    loss_fn = pm.hook.build_loss(cfg=cfg, model=None)
    assert loss_fn.keywords["eaft"] == (0.5, 5)
    plugin = pytest.importorskip("plait_kernels.plugin")
    assert plugin.build_loss(cfg=cfg, model=None) is None


def test_eaft_is_refused_for_preference_training():
    pytest.importorskip("plait_preference")
    with pytest.raises(ConfigError, match="'use_eaft' weights the next-token cross-entropy"):
        build_run_config({"base_model": "m", "use_eaft": True, "rl": "dpo",
                          "datasets": [{"path": "d.jsonl", "type": "chatml.intel"}]})
