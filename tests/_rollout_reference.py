"""Independent references for the rollout-engine tests: plain transformers forwards, no engine code."""

from __future__ import annotations

import torch

VOCAB = 1003
PROMPT_LENS = (320, 301)  # > two KV blocks, so a stale prefix cache shows up


def make_model_pair(root):
    """Two different random tiny Llamas of the same config, saved under ``root``: (dir_a, dir_b).

    hidden_size=128 gives head_dim 32 (the vLLM CPU attention kernels do not take head_dim 16).
    """
    from tests.helpers.tiny_models import make_tiny_hf_model

    dir_a, dir_b = root / "model_a", root / "model_b"
    make_tiny_hf_model("llama", dir_a, seed=0, hidden_size=128)
    make_tiny_hf_model("llama", dir_b, seed=1, hidden_size=128)
    return str(dir_a), str(dir_b)


def load_hf(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def long_prompts(seed: int = 0, lens=PROMPT_LENS) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in lens]


def reference_logprobs(model, prompt, response, temperature=1.0, top_k=-1, top_p=1.0) -> torch.Tensor:
    """Teacher-forced log-probs of ``response`` after ``prompt`` under ``model``, one forward, fp32.

    Sampling distribution: softmax(logits / T) restricted to the top-k, then the top-p set,
    renormalised; T == 0 means log_softmax(logits).
    """
    ids = torch.tensor([list(prompt) + list(response)])
    with torch.no_grad():
        logits = model(ids).logits[0, len(prompt) - 1 : -1].float()
    if temperature > 0:
        logits = logits / temperature
    if top_k > 0:
        kth = logits.sort(dim=-1, descending=True).values[:, top_k - 1 : top_k]
        logits = torch.where(logits >= kth, logits, torch.full_like(logits, float("-inf")))
    if top_p < 1.0:
        probs = logits.softmax(-1)
        p_sorted, idx = probs.sort(dim=-1, descending=True)
        exclusive = torch.cumsum(p_sorted, -1) - p_sorted
        keep_sorted = exclusive < top_p
        keep = torch.zeros_like(keep_sorted)
        for r in range(keep.shape[0]):
            keep[r, idx[r][keep_sorted[r]]] = True
        logits = torch.where(keep, logits, torch.full_like(logits, float("-inf")))
    logp = torch.log_softmax(logits, dim=-1)
    return logp.gather(-1, torch.tensor(response)[:, None])[:, 0]


def max_logprob_diff(model, prompts, responses, **sampling) -> float:
    """Max |engine - reference| over every sampled token of every response."""
    worst = 0.0
    for prompt, group in zip(prompts, responses):
        for resp in group:
            ref = reference_logprobs(model, prompt, resp.token_ids, **sampling)
            worst = max(worst, (ref - torch.tensor(resp.logprobs)).abs().max().item())
    return worst


def transformers_greedy(model, prompt, max_new_tokens: int, eos_ids=(2,)) -> list[int]:
    """Greedy continuation by ``model.generate``, cut after the first EOS."""
    with torch.no_grad():
        out = model.generate(
            torch.tensor([list(prompt)]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=list(eos_ids),
            pad_token_id=0,
        )[0, len(prompt) :].tolist()
    for t, tok in enumerate(out):
        if tok in eos_ids:
            return out[: t + 1]
    return out


def make_tied_pair(root):
    """Two different random tiny Qwen2 models with tied embeddings (no ``lm_head.weight`` on disk)."""
    from tests.helpers.tiny_models import make_tiny_hf_model

    dir_a, dir_b = root / "tied_a", root / "tied_b"
    make_tiny_hf_model("qwen2-tied", dir_a, seed=2, hidden_size=128)
    make_tiny_hf_model("qwen2-tied", dir_b, seed=3, hidden_size=128)
    return str(dir_a), str(dir_b)
