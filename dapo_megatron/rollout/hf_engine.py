"""Embedded rollout engine: a ``transformers`` model in this process, with a small sampling loop.

Light and dependency-free (no vLLM): meant for tests, CPU runs and as a numerical reference. Every
(prompt, sample) row owns a ``torch.Generator`` seeded from :func:`derive_seed`, so the tokens of a
row depend on its seed and the weights, not on which other rows share the batch.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

import torch

from dapo_megatron.algo.truncation import truncate_logits
from dapo_megatron.rollout.types import Response, SamplingConfig
from dapo_megatron.rollout.validation import (
    check_generate_inputs,
    checkpoint_shapes,
    collect_named_tensors,
    derive_seed,
    read_model_facts,
)
from dapo_megatron.utils.dtypes import torch_dtype


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """``"float32"`` / ``"bfloat16"`` / ``"float16"`` (or ``fp32``..., or a torch dtype) -> torch dtype."""
    return torch_dtype(dtype)


class HFEngine:
    """:class:`~dapo_megatron.rollout.RolloutEngine` on an in-process ``transformers`` model.

    Args:
        model_dir: HF model directory (safetensors), tokenizer files optional.
        dtype: ``"float32"`` (default, for exact log-probs), ``"bfloat16"`` or ``"float16"``.
        seed: seeds the engine generator used when ``SamplingConfig.seed`` is ``None``.
        device: torch device of the model (``"cpu"`` or ``"cuda"``).
        max_model_len: cap on prompt + response tokens (default: ``max_position_embeddings``).
        max_batch_rows: most (prompt, sample) rows decoded together; more are run in chunks.
        record_routing: mixture-of-experts models: record each token's chosen experts from the HF
            router of every layer into ``Response.routed_experts`` (for routing replay).
    """

    def __init__(
        self,
        model_dir: str | Path,
        *,
        dtype: str | torch.dtype = "float32",
        seed: int = 0,
        device: str | torch.device = "cpu",
        max_model_len: int | None = None,
        max_batch_rows: int = 64,
        record_routing: bool = False,
    ) -> None:
        from transformers import AutoModelForCausalLM

        if max_batch_rows < 1:
            raise ValueError(f"max_batch_rows must be >= 1, got {max_batch_rows}")
        self.model_dir = Path(model_dir)
        self.facts = read_model_facts(self.model_dir, max_model_len)
        self.device = torch.device(device)
        self.max_batch_rows = max_batch_rows
        self.model = AutoModelForCausalLM.from_pretrained(self.model_dir, dtype=resolve_dtype(dtype))
        self.model.to(self.device).eval()
        self._expected_shapes = checkpoint_shapes(self.model_dir)
        self._optional_names = ("lm_head.weight",) if self.facts.tied_embeddings else ()
        self._rng = torch.Generator().manual_seed(seed)
        self._pad_id = 0
        self._routers = _moe_routers(self.model) if record_routing else []
        if record_routing and not self._routers:
            raise ValueError(f"record_routing=True but {self.model_dir} has no mixture-of-experts router")
        self._routing_steps: list[list[torch.Tensor]] = []  # per forward: per layer [batch*width, k]
        for router in self._routers:
            router.register_forward_hook(self._record_routing)

    # ------------------------------------------------------------------ generation
    def generate(
        self, prompt_token_ids: list[list[int]], n: int, sampling: SamplingConfig
    ) -> list[list[Response]]:
        """Sample ``n`` responses per prompt (see :class:`~dapo_megatron.rollout.Response`)."""
        check_generate_inputs(prompt_token_ids, n, sampling, self.facts)
        base_seed = sampling.seed
        if base_seed is None:
            base_seed = int(torch.randint(0, 2**62, (1,), generator=self._rng))
        rows = [(i, j) for i in range(len(prompt_token_ids)) for j in range(n)]
        results: list[list[Response | None]] = [[None] * n for _ in prompt_token_ids]
        for start in range(0, len(rows), self.max_batch_rows):
            chunk = rows[start : start + self.max_batch_rows]
            prompts = [list(prompt_token_ids[i]) for i, _ in chunk]
            seeds = [derive_seed(base_seed, i, j, n) for i, j in chunk]
            for (i, j), response in zip(chunk, self._generate_rows(prompts, seeds, sampling)):
                results[i][j] = response
        return results  # type: ignore[return-value]

    def _record_routing(self, module, inputs, output) -> None:
        # Qwen3-MoE's router returns (logits, top-k weights, top-k expert ids [tokens, k]).
        if self._routing_steps:  # only inside generate()
            self._routing_steps[-1].append(output[2].detach().cpu())

    def _routing_of_rows(self, batch: int, width: int, prompts, tokens) -> list[torch.Tensor | None]:
        """Stack the recorded forwards into ``[prompt + response, layers, k]`` per row."""
        if not self._routers:
            return [None] * batch
        steps = [torch.stack(layers, dim=1) for layers in self._routing_steps]  # [b*s, L, k]
        prefill = steps[0].view(batch, width, *steps[0].shape[1:])
        decode = [st.view(batch, 1, *st.shape[1:]) for st in steps[1:]]
        full = torch.cat([prefill, *decode], dim=1) if decode else prefill
        out = []
        for r, prompt in enumerate(prompts):
            n = len(prompt) + len(tokens[r])
            row = full[r, width - len(prompt) :][: n - 1]  # positions that went through the model
            out.append(torch.cat([row, row[-1:]], dim=0))  # the last token's routing is never used
        return out

    @torch.no_grad()
    def _generate_rows(
        self, prompts: list[list[int]], seeds: list[int], sampling: SamplingConfig
    ) -> list[Response]:
        batch = len(prompts)
        width = max(len(p) for p in prompts)
        input_ids = torch.full((batch, width), self._pad_id, dtype=torch.long)
        attention_mask = torch.zeros((batch, width), dtype=torch.long)
        for r, prompt in enumerate(prompts):  # left padding: the next token is always at [:, -1]
            input_ids[r, width - len(prompt) :] = torch.tensor(prompt)
            attention_mask[r, width - len(prompt) :] = 1
        input_ids, attention_mask = input_ids.to(self.device), attention_mask.to(self.device)
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        generators = [torch.Generator().manual_seed(s) for s in seeds]
        stop_ids = set(self.facts.eos_token_ids) | set(sampling.stop_token_ids)

        tokens: list[list[int]] = [[] for _ in range(batch)]
        logprobs: list[list[float]] = [[] for _ in range(batch)]
        finish: list[str | None] = [None] * batch
        past = None
        step_ids, step_pos = input_ids, position_ids
        self._routing_steps = []
        for _ in range(sampling.max_new_tokens):
            self._routing_steps.append([])
            out = self.model(
                input_ids=step_ids,
                attention_mask=attention_mask,
                position_ids=step_pos,
                past_key_values=past,
                use_cache=True,
            )
            past = out.past_key_values
            logits = out.logits[:, -1, :].float()
            if sampling.greedy:
                logp = torch.log_softmax(logits, dim=-1)
                next_ids = logits.argmax(dim=-1).cpu()
            else:
                # The kept set the trainer uses too (one definition: algo/truncation.py)
                scaled = truncate_logits(
                    logits / sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p
                )
                logp = torch.log_softmax(scaled, dim=-1)
                probs = logp.exp().cpu()
                next_ids = torch.zeros(batch, dtype=torch.long)
                for r in range(batch):
                    if finish[r] is None:  # finished rows draw nothing: each row's stream is its own
                        next_ids[r] = torch.multinomial(probs[r], 1, generator=generators[r])[0]
            chosen = logp.cpu().gather(-1, next_ids[:, None])[:, 0]
            for r in range(batch):
                if finish[r] is not None:
                    continue
                tok = int(next_ids[r])
                tokens[r].append(tok)
                logprobs[r].append(float(chosen[r]))
                if tok in stop_ids:
                    finish[r] = "stop"
            if all(f is not None for f in finish):
                break
            step_ids = next_ids.to(self.device)[:, None]
            step_pos = step_pos[:, -1:] + 1
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones((batch, 1))], dim=-1)
        routing = self._routing_of_rows(batch, width, prompts, tokens)
        self._routing_steps = []
        return [
            Response(token_ids=t, logprobs=lp, finish_reason=f or "length", routed_experts=re)  # type: ignore[arg-type]
            for t, lp, f, re in zip(tokens, logprobs, finish, routing)
        ]

    # ------------------------------------------------------------------ weights
    @torch.no_grad()
    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy full HF-named tensors into the model; all names are checked before any copy."""
        items = collect_named_tensors(named_tensors, self._expected_shapes, self._optional_names)
        state = self.model.state_dict(keep_vars=True)
        for name, tensor in items:
            _target(state, name).copy_(tensor.to(device=self.device))

    def sleep(self) -> None:
        """No-op: the embedded engine keeps its weights where they are."""

    def wake_up(self) -> None:
        """No-op (see :meth:`sleep`)."""

    def close(self) -> None:
        """Drop the model."""
        self.model = None


_EXPERT_WEIGHT = re.compile(r"^(.*\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")


def _target(state: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    """The tensor a checkpoint name is copied into. transformers >= 5 keeps a layer's experts fused
    in memory (``experts.gate_up_proj`` [E, 2F, H] = gate rows then up rows, ``experts.down_proj``
    [E, H, F]) while checkpoints (and our export) name each expert's weights: such names map to a
    view of the fused tensor."""
    if name in state:
        return state[name].data
    m = _EXPERT_WEIGHT.match(name)
    if not m:
        raise KeyError(f"update_weights: {name!r} has no parameter in the model")
    base, expert, proj = m.group(1), int(m.group(2)), m.group(3)
    if proj == "down_proj":
        return state[f"{base}.down_proj"].data[expert]
    fused = state[f"{base}.gate_up_proj"].data[expert]
    half = fused.shape[0] // 2
    return fused[:half] if proj == "gate_proj" else fused[half:]


def _moe_routers(model) -> list[torch.nn.Module]:
    """Each decoder layer's router (Qwen3-MoE ``mlp.gate``), in layer order."""
    layers = model.model.layers
    return [layer.mlp.gate for layer in layers if hasattr(getattr(layer, "mlp", None), "experts")]
