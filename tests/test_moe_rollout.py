"""Qwen3-MoE with the HF rollout engine: weight sync from an EP2 Megatron model, and routing replay.

* Weight sync: the engine starts on model A; model B is loaded into Megatron at EP2 (each rank
  holds 2 of the 4 experts) and streamed out with ``iter_hf_tensors`` (per-expert HF names, small
  buckets). After ``update_weights`` every engine parameter equals B's checkpoint bit for bit
  (transformers fuses the experts in memory; the per-expert names land in the fused tensors) and
  greedy decoding equals transformers' on B. Guard: before the update it does not.
* Routing replay: the engine records each token's top-2 experts per layer. Megatron (EP2, replay
  built in) computes old log-probs of the engine's sequences routing afresh (``none``) and
  replaying the recorded experts (``rollout``). On the same weights both agree with the engine.
  With every router weight perturbed (a stand-in for train/rollout numerics drift), replay makes
  the training-side expert choices equal the recorded ones exactly, and the log-prob mismatch to
  the engine is lower than without replay (measured, printed).
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from dapo_megatron.policy.routing_replay import routing_agreement
from dapo_megatron.rollout import SamplingConfig
from dapo_megatron.rollout.hf_engine import HFEngine
from tests._moe_ranks import export_moe, replay_logprobs
from tests._rollout_reference import load_hf, transformers_greedy
from tests.helpers.distributed import run_on_ranks
from tests.helpers.tiny_models import make_tiny_hf_model
from tests.test_moe_train import per_expert_names

pytestmark = pytest.mark.distributed
PERTURB_STD = 0.03


@pytest.fixture(scope="module")
def synced(tiny_moe_dirs, tmp_path_factory):
    root = tmp_path_factory.mktemp("moe_sync")
    dir_a, dir_b = tiny_moe_dirs["qwen3_moe"], str(root / "b")
    make_tiny_hf_model("qwen3_moe", dir_b, seed=99)
    path = str(root / "exported.safetensors")
    names = run_on_ranks(export_moe, 2, dir_b, 2, path, timeout=600)
    assert names[0] == names[1], "EP ranks yielded different tensor sequences"
    exported = load_file(path)
    engine = HFEngine(dir_a, record_routing=True)
    prompts = [[5, 17, 99, 3, 250, 8, 41], [7, 7, 300, 12], [901, 44, 2, 60, 61, 62], [10, 11]]
    greedy = SamplingConfig(temperature=0.0, max_new_tokens=12, stop_token_ids=())
    before = [r[0].token_ids for r in engine.generate(prompts, 1, greedy)]
    engine.update_weights((n, exported[n]) for n in names[0])
    return engine, dir_b, prompts, greedy, before


def test_weight_sync_from_ep2(synced):
    engine, dir_b, prompts, greedy, before = synced
    state = per_expert_names({n: p.detach() for n, p in engine.model.named_parameters()})
    ref = load_file(f"{dir_b}/model.safetensors")
    assert sorted(state) == sorted(ref)
    for name, t in ref.items():
        assert torch.equal(state[name], t), name
    model_b = load_hf(dir_b)
    expected = [transformers_greedy(model_b, p, greedy.max_new_tokens, eos_ids=()) for p in prompts]
    after = [r[0].token_ids for r in engine.generate(prompts, 1, greedy)]
    assert after == expected
    assert before != expected, "guard: model A already decodes like model B"


def test_routing_replay(synced):
    engine, dir_b, prompts, _, _ = synced
    sampling = SamplingConfig(temperature=1.0, max_new_tokens=16, seed=3, stop_token_ids=())
    responses = [r[0] for r in engine.generate(prompts, 1, sampling)]
    n = len(prompts)
    lengths = [len(p) + len(r.token_ids) for p, r in zip(prompts, responses)]
    width = max(lengths)
    layers, k = responses[0].routed_experts.shape[1:]
    ids = torch.zeros(n, width, dtype=torch.long)
    routed = torch.zeros(n, width, layers, k, dtype=torch.long)
    resp_mask = torch.zeros(n, width, dtype=torch.bool)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        assert r.routed_experts.shape == (lengths[i], layers, k)
        ids[i, : lengths[i]] = torch.tensor(p + r.token_ids)
        routed[i, : lengths[i]] = r.routed_experts
        resp_mask[i, len(p) : lengths[i]] = True
    batch = {"input_ids": ids, "seq_lengths": torch.tensor(lengths), "routed_experts": routed}
    results = run_on_ranks(replay_logprobs, 2, dir_b, 2, batch, PERTURB_STD, timeout=600)

    def gathered(phase, mode, what):
        merged = {}
        for r in results:
            if r is not None:
                merged.update(r[(phase, mode)][what])
        assert sorted(merged) == list(range(n))
        return merged

    engine_lp = torch.zeros(n, width)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        engine_lp[i, len(p) : lengths[i]] = torch.tensor(r.logprobs)
    # Routing that went through the engine's model: every position but each sequence's last.
    routed_mask = torch.zeros(n, width, dtype=torch.bool)
    for i, length in enumerate(lengths):
        routed_mask[i, : length - 1] = True

    figures = {}
    for phase in ("exact", "perturbed"):
        for mode in ("none", "rollout"):
            logp = gathered(phase, mode, "logp")
            chosen = gathered(phase, mode, "chosen")
            lp = torch.stack([logp[i] for i in range(n)])
            ch = torch.zeros_like(routed)
            for i in range(n):
                ch[i, : lengths[i]] = chosen[i]
            mismatch = (lp - engine_lp).abs()[resp_mask]
            figures[(phase, mode)] = (
                routing_agreement(routed, ch, routed_mask),
                mismatch.mean().item(),
                mismatch.max().item(),
            )
            print(
                f"{phase:9s} replay={mode:7s}: expert agreement {figures[(phase, mode)][0]:.4f}, "
                f"|logp - engine| mean {figures[(phase, mode)][1]:.2e} max {figures[(phase, mode)][2]:.2e}"
            )
    # Same weights: Megatron routes as the engine did, and log-probs agree (fp32).
    assert figures[("exact", "none")][0] == 1.0
    assert figures[("exact", "none")][2] <= 1e-4 and figures[("exact", "rollout")][2] <= 1e-4
    # Perturbed router: without replay some experts flip (guard) ...
    assert figures[("perturbed", "none")][0] < 0.99
    # ... with replay the training side uses exactly the recorded experts ...
    assert figures[("perturbed", "rollout")][0] == 1.0
    # ... and the log-prob mismatch to the engine is lower.
    assert figures[("perturbed", "rollout")][1] < figures[("perturbed", "none")][1]
