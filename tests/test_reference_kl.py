"""The reference policy and the KL penalty against a plain single-process PyTorch reference.

The policy starts from one tiny Llama, the reference policy from another (same shapes, other
weights), so the KL term has a gradient (at pi = pi_ref the k3 gradient is exactly 0 and the test
could not fail). Reference (independent of dapo_megatron): transformers forward of both models,
``log_softmax``, the clipped surrogate plus ``kl_coef * (exp(ref - logp) - (ref - logp) - 1)``
(k3 / low_var_kl), token mean over the batch, backward, ``clip_grad_norm_``. Tolerances: reference
log-probs abs 1e-5, loss rel 1e-5, gradients abs 1e-6 (as the train-step parity test).
"""

import pytest
import torch
from transformers import AutoModelForCausalLM

from dapo_megatron.algo.config import AlgorithmConfig
from dapo_megatron.policy.loss import LossSettings
from tests._reference_ranks import kl_update
from tests.helpers.distributed import run_on_ranks

OPT = dict(lr=1e-3, weight_decay=0.0, clip_grad=1.0, lr_warmup_steps=0, adam_eps=1e-5)
KL_COEF = 0.5
SETTINGS = LossSettings(
    algorithm=AlgorithmConfig(kl_coef=KL_COEF, use_kl_loss=True, kl_type="low_var_kl", loss_agg_mode="token-mean")
)
PROMPT_LENS = [4, 3, 5, 6]
RESPONSE_LENS = [9, 2, 7, 3]


def _hf(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def _log_probs(model, ids, lengths):
    mask = torch.arange(ids.shape[1])[None] < lengths[:, None]
    logits = model(input_ids=ids, attention_mask=mask.long()).logits
    lp = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    return torch.cat([torch.zeros(ids.shape[0], 1), lp], dim=1)


@pytest.fixture(scope="module")
def setup(tiny_hf_dirs, tmp_path_factory):
    from tests.helpers.tiny_models import make_tiny_hf_model

    policy_dir = tiny_hf_dirs["llama"]
    reference_dir = str(tmp_path_factory.mktemp("kl_ref") / "llama")
    make_tiny_hf_model("llama", reference_dir, seed=7)
    g = torch.Generator().manual_seed(0)
    n, s = len(PROMPT_LENS), max(p + r for p, r in zip(PROMPT_LENS, RESPONSE_LENS))
    ids = torch.zeros(n, s, dtype=torch.long)
    resp = torch.zeros(n, s)
    lengths = torch.tensor([p + r for p, r in zip(PROMPT_LENS, RESPONSE_LENS)])
    for i, (p, r) in enumerate(zip(PROMPT_LENS, RESPONSE_LENS)):
        ids[i, : p + r] = torch.randint(3, 1003, (p + r,), generator=g)
        resp[i, p : p + r] = 1
    adv = torch.tensor([1.0, -0.5, 0.7, -1.2])[:, None] * resp
    with torch.no_grad():
        old = _log_probs(_hf(policy_dir), ids, lengths) * resp
    batch = {
        "input_ids": ids,
        "seq_lengths": lengths,
        "response_mask": resp,
        "advantages": adv,
        "old_log_probs": old,
    }
    return policy_dir, reference_dir, batch


def reference_grads(policy_dir, reference_dir, batch, kl_coef):
    model = _hf(policy_dir).train()
    with torch.no_grad():
        ref = _log_probs(_hf(reference_dir), batch["input_ids"], batch["seq_lengths"])
    logp = _log_probs(model, batch["input_ids"], batch["seq_lengths"])
    mask = batch["response_mask"].bool()
    ratio = torch.exp(logp - batch["old_log_probs"])
    adv = batch["advantages"]
    pg = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - 0.2, 1 + 0.28))
    x = ref - logp
    kl = torch.exp(x) - x - 1
    loss = (pg + kl_coef * kl)[mask].sum() / mask.sum()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), OPT["clip_grad"])
    return loss.item(), {n: p.grad.detach().clone() for n, p in model.named_parameters()}, ref


@pytest.mark.distributed
@pytest.mark.parametrize("layout", ["TP2", "PP2"])
def test_kl_loss_gradient_matches_reference(layout, setup):
    policy_dir, reference_dir, batch = setup
    tp, pp, micro = {"TP2": (2, 1, 4), "PP2": (1, 2, 2)}[layout]
    ref_loss, ref_grads, ref_logp = reference_grads(policy_dir, reference_dir, batch, KL_COEF)
    _, no_kl_grads, _ = reference_grads(policy_dir, reference_dir, batch, 0.0)
    kl_effect = max((ref_grads[k] - no_kl_grads[k]).abs().max().item() for k in ref_grads)
    assert kl_effect > 1e-3, "the KL term barely moves the gradient: the test could not fail"

    results = run_on_ranks(
        kl_update, 2, policy_dir, reference_dir, tp, pp, batch, micro, OPT, SETTINGS, timeout=600
    )
    (metrics, grads), got_ref = results[0][0], {}
    for _, r in results:
        got_ref.update(r)
    assert sorted(got_ref) == list(range(len(PROMPT_LENS)))
    for i, n in enumerate(batch["seq_lengths"].tolist()):
        assert (got_ref[i][1:n] - ref_logp[i, 1:n]).abs().max().item() <= 1e-5, f"ref log-probs, seq {i}"
    g = max((grads[k] - ref_grads[k]).abs().max().item() for k in ref_grads)
    print(f"{layout}: loss {metrics['loss']:.6f} vs {ref_loss:.6f}; max|grad diff| {g:.2e} (KL moves it {kl_effect:.2e})")
    assert metrics["loss"] == pytest.approx(ref_loss, rel=1e-5)
    assert g <= 1e-6
