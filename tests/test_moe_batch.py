"""The trainer's batch carries the engine's per-token expert ids for routing replay."""

import pytest
import torch

from dapo_megatron.trainer.batch import samples_to_batch


def _sample(uid, prompt, response, routed):
    return {"uid": uid, "prompt_ids": prompt, "response_ids": response, "rollout_logprobs": [-1.0] * len(response),
            "truncated": False, "reward": float(len(response)), "routed_experts": routed}  # fmt: skip


def test_routed_experts_padded_into_the_batch():
    a = torch.randint(0, 4, (5, 3, 2))
    b = torch.randint(0, 4, (3, 3, 2))
    batch = samples_to_batch(
        [_sample("g", [1, 2], [3, 4, 5], a), _sample("g", [1], [6, 7], b)],
        pad_id=0, norm_adv_by_std=True, overlong_filter=False,
    )  # fmt: skip
    assert batch["routed_experts"].shape == (2, 5, 3, 2)
    assert torch.equal(batch["routed_experts"][0], a)
    assert torch.equal(batch["routed_experts"][1, :3], b) and not batch["routed_experts"][1, 3:].any()
    without = samples_to_batch(
        [_sample("g", [1, 2], [3, 4, 5], None), _sample("g", [1], [6, 7], b)],
        pad_id=0, norm_adv_by_std=True, overlong_filter=False,
    )  # fmt: skip
    assert "routed_experts" not in without


def test_routed_experts_of_the_wrong_length_are_rejected():
    with pytest.raises(ValueError, match="routed_experts covers 4 tokens, the sequence has 5"):
        samples_to_batch([_sample("g", [1, 2], [3, 4, 5], torch.zeros(4, 3, 2, dtype=torch.long))],
                         pad_id=0, norm_adv_by_std=False, overlong_filter=False)  # fmt: skip
