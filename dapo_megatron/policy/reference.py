"""The reference policy of the KL penalty: a frozen copy of the initial policy, same Megatron layout.

Built only when ``algorithm.kl_coef > 0`` (:func:`build_reference`), from the same source as the
policy (``model.megatron_checkpoint`` or ``model.hf_dir``), so a resumed run still compares with
the *initial* weights. Its log-probs come from
:meth:`~dapo_megatron.policy.train_step.PolicyTrainer.log_probs_of`, the pass that computes
the old log-probs: no grad, vocab-parallel, on this rank's rows, with the policy's micro-batching,
``rollout.temperature`` and top-k/top-p. On CUDA its weights live on the CPU between uses (moved in
for the pass, out after), so it costs no GPU memory during generation and the update.

The KL loss (``use_kl_loss: true``) uses its log-probs per token; KL in the reward
(``use_kl_loss: false``) sums them per response into the reward before the group advantages
(:func:`~dapo_megatron.trainer.rollout.kl_in_reward_advantages`).
"""

from __future__ import annotations

import torch


class ReferencePolicy:
    """A frozen :class:`~dapo_megatron.loading.LoadedModel` scored with a policy's pass structure."""

    def __init__(self, loaded, *, offload: bool | None = None):
        self.loaded = loaded
        self.model = loaded.model
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.model.eval()
        self.offload = torch.cuda.is_available() if offload is None else offload
        self.device = next(self.model.parameters()).device
        if self.offload:
            self.model.to("cpu")

    @torch.no_grad()
    def compute_log_probs(self, policy, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """``[N, S]`` reference log-probs, laid out as ``policy.compute_log_probs(batch)``."""
        if self.offload:
            self.model.to(self.device)
        try:
            return policy.log_probs_of(self.model, batch)
        finally:
            if self.offload:
                self.model.to("cpu")
                torch.cuda.empty_cache()


def build_reference(model_cfg, layout, *, moe=None) -> ReferencePolicy:
    """The frozen initial policy for ``model_cfg`` (a ``ModelConfig``) at ``layout`` (and the
    policy's ``MoESettings``, if any); call after
    :func:`~dapo_megatron.parallel.groups.initialize_parallel`, on every rank."""
    from dapo_megatron.loading import build_model_from_checkpoint, build_model_from_hf

    if model_cfg.megatron_checkpoint:
        loaded = build_model_from_checkpoint(model_cfg.megatron_checkpoint, layout, moe=moe)
    else:
        loaded = build_model_from_hf(
            model_cfg.hf_dir,
            layout,
            dtype=model_cfg.dtype,
            vocab_pad_multiple=model_cfg.vocab_pad_multiple,
            moe=moe,
        )
    return ReferencePolicy(loaded)
