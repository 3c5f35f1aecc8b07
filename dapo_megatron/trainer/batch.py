"""From rollout samples to the training batch tensors of :mod:`dapo_megatron.policy.train_step`."""

from __future__ import annotations

import torch

from dapo_megatron.algo import group_advantages, overlong_mask


def samples_to_batch(
    samples: list[dict], *, pad_id: int, norm_adv_by_std: bool, overlong_filter: bool
) -> dict:
    """Right-padded ``[N, S]`` tensors for ``N`` samples (prompt + response each).

    * ``response_mask``: 1 on response tokens; 0 for every token of a truncated response when
      ``overlong_filter`` (DAPO's overlong filtering).
    * ``advantages``: the group-relative advantage of the sample's shaped reward, on its tokens.
    * ``rollout_log_probs``: the engine's log-probs of the response tokens (TIS, mismatch metric).
    * ``routed_experts``: only when every sample carries the engine's expert ids (MoE routing
      replay): int ``[N, S, layers, top_k]``, zeros on padding.
    * ``rewards`` ``[N]`` (shaped) and ``group_index`` ``[N]`` (one id per prompt group): what
      :func:`advantages_with_kl_in_reward` recomputes the advantages from.
    """
    n = len(samples)
    lengths = [len(s["prompt_ids"]) + len(s["response_ids"]) for s in samples]
    width = max(lengths)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    response_mask = torch.zeros(n, width)
    rollout_log_probs = torch.zeros(n, width)
    for i, s in enumerate(samples):
        p, r = len(s["prompt_ids"]), len(s["response_ids"])
        input_ids[i, : p + r] = torch.tensor(s["prompt_ids"] + s["response_ids"], dtype=torch.long)
        response_mask[i, p : p + r] = 1.0
        rollout_log_probs[i, p : p + r] = torch.tensor(s["rollout_logprobs"], dtype=torch.float32)
    if overlong_filter:
        truncated = torch.tensor([s["truncated"] for s in samples])
        keep = overlong_mask(torch.tensor([len(s["response_ids"]) for s in samples]), truncated)
        response_mask *= keep.to(response_mask.dtype)[:, None]
    groups: dict[str, int] = {}
    group_index = torch.tensor([groups.setdefault(s["uid"], len(groups)) for s in samples], dtype=torch.long)
    rewards = torch.tensor([s["reward"] for s in samples], dtype=torch.float64)
    adv = group_advantages(rewards, group_index, norm_by_std=norm_adv_by_std)
    batch = {
        "input_ids": input_ids,
        "seq_lengths": torch.tensor(lengths, dtype=torch.long),
        "response_mask": response_mask,
        "advantages": adv.float()[:, None] * response_mask,
        "rollout_log_probs": rollout_log_probs,
        "rewards": rewards,
        "group_index": group_index,
    }
    routed = [s.get("routed_experts") for s in samples]
    if routed and all(r is not None for r in routed):
        experts = torch.zeros(n, width, *routed[0].shape[1:], dtype=torch.long)
        for i, r in enumerate(routed):
            if r.shape[0] != lengths[i]:
                raise ValueError(
                    f"sample {i}: routed_experts covers {r.shape[0]} tokens, the sequence has {lengths[i]}"
                )
            experts[i, : lengths[i]] = r
        batch["routed_experts"] = experts
    return batch


def advantages_with_kl_in_reward(
    batch: dict, kl_sums: torch.Tensor, *, kl_coef: float, norm_adv_by_std: bool
) -> torch.Tensor:
    """KL in the reward (GRPO with ``use_kl_loss: false``, as verl): the sequence reward becomes
    ``r_i - kl_coef * sum_t kl_t`` (``kl_sums`` ``[N]``, over the response tokens, against the
    reference policy) before the group-relative advantage; returns the new ``[N, S]`` advantages."""
    shaped = batch["rewards"].double() - kl_coef * kl_sums.double()
    adv = group_advantages(shaped, batch["group_index"], norm_by_std=norm_adv_by_std)
    return adv.float()[:, None] * batch["response_mask"]
