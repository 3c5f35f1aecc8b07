"""Embedded rollout engine: a ``transformers`` model in this process, with a small sampling loop.

Light and dependency-free (no vLLM): meant for tests, CPU runs and as a numerical reference. Every
(prompt, sample) row draws its tokens from its own uniforms (a ``torch.Generator`` seeded from
:func:`derive_seed`), so the tokens of a row depend on its seed and the weights, not on which other
rows share the batch. At least as fast as ``transformers`` ``generate`` on the same rows
(``benchmarks/generation.py``): batched decoding with a KV cache, each prompt prefilled once for its
``n`` rows, vectorised sampling.
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


# Per row and vocabulary entry, the fp32/fp64 buffers of one sampling step (logits, scaled and
# filtered logits, log-probs, probabilities, their fp64 running sum, top-p sort), for the budget.
_SAMPLING_BYTES_PER_VOCAB = 48
# Steps of uniforms drawn per row generator at a time (a fixed block, so the stream of a row does
# not depend on max_new_tokens or on the other rows).
_NOISE_BLOCK = 64


class RowNoise:
    """One uniform in [0, 1) per row and step, row ``r`` drawn from its own ``torch.Generator``
    seeded with ``seeds[r]``: the value at (row, step) depends on that row's seed alone."""

    def __init__(self, seeds: list[int], device: torch.device) -> None:
        self._generators = [torch.Generator().manual_seed(s) for s in seeds]
        self._device = device
        self._block: torch.Tensor | None = None

    def step(self, t: int) -> torch.Tensor:
        """``[rows]`` fp64 uniforms of step ``t`` (steps are asked for in order)."""
        if t % _NOISE_BLOCK == 0:
            block = [torch.rand(_NOISE_BLOCK, generator=g, dtype=torch.float64) for g in self._generators]
            self._block = torch.stack(block).to(self._device)
        return self._block[:, t % _NOISE_BLOCK]


def sample_rows(
    logits: torch.Tensor, sampling: SamplingConfig, uniforms: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw one token per row; returns ``(token_ids [B], log-prob of each under its distribution [B])``.

    ``logits``: ``[B, V]`` fp32. Greedy: argmax, log-prob under ``log_softmax(logits)``. Otherwise
    the processed distribution ``p = softmax(truncate_logits(logits / T))`` is sampled by inverse CDF
    with ``uniforms`` (``[B]``, fp64 in [0, 1)): the token is the first ``v`` with
    ``sum(p[:v+1]) > u * sum(p)``, so each row's draw depends on its own uniform only, and a token
    with ``p == 0`` (filtered out) is never drawn.
    """
    if sampling.greedy:
        logp = torch.log_softmax(logits, dim=-1)
        ids = logits.argmax(dim=-1)
    else:
        # the kept set the trainer uses too (one definition: algo/truncation.py)
        scaled = truncate_logits(logits / sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p)
        logp = torch.log_softmax(scaled, dim=-1)
        cdf = logp.exp().double().cumsum(dim=-1)
        total = cdf[:, -1:]
        # strictly below the total, so the search never runs past the last kept token
        target = torch.minimum(uniforms[:, None] * total, torch.nextafter(total, torch.zeros_like(total)))
        ids = torch.searchsorted(cdf, target, right=True)[:, 0]
    return ids, logp.gather(-1, ids[:, None])[:, 0]


def _kv_bytes_per_token(config, dtype: torch.dtype) -> int:
    """Bytes of KV cache one token takes over all layers."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    return text.num_hidden_layers * 2 * kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()


class HFEngine:
    """:class:`~dapo_megatron.rollout.RolloutEngine` on an in-process ``transformers`` model.

    One call decodes all its (prompt, sample) rows together, as many per batch as the KV-cache
    budget holds: each distinct prompt is prefilled once and its KV cache shared by its ``n``
    rows, every step is one batched forward, and sampling is vectorised (inverse-CDF draws from
    per-row uniforms, see :func:`sample_rows`), with one host sync per step (all rows done?).

    Args:
        model_dir: HF model directory (safetensors), tokenizer files optional.
        dtype: ``"float32"`` (default, for exact log-probs), ``"bfloat16"`` or ``"float16"``.
        seed: seeds the engine generator used when ``SamplingConfig.seed`` is ``None``.
        device: torch device of the model (``"cpu"`` or ``"cuda"``).
        max_model_len: cap on prompt + response tokens (default: ``max_position_embeddings``).
        kv_cache_gib: memory budget of one batch of rows (its KV cache at full length, plus the
            fp32 vocabulary-sized sampling buffers); more rows are run in batches one after another.
        max_batch_rows: optional cap on the rows of one batch (``None``: the budget alone decides).
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
        kv_cache_gib: float = 1.0,
        max_batch_rows: int | None = None,
        record_routing: bool = False,
    ) -> None:
        from transformers import AutoModelForCausalLM

        if max_batch_rows is not None and max_batch_rows < 1:
            raise ValueError(f"max_batch_rows must be >= 1 or None, got {max_batch_rows}")
        if not kv_cache_gib > 0:
            raise ValueError(f"kv_cache_gib must be > 0, got {kv_cache_gib}")
        self.model_dir = Path(model_dir)
        self.facts = read_model_facts(self.model_dir, max_model_len)
        self.device = torch.device(device)
        self.max_batch_rows = max_batch_rows
        self.kv_cache_bytes = int(kv_cache_gib * 2**30)
        self.model = AutoModelForCausalLM.from_pretrained(self.model_dir, dtype=resolve_dtype(dtype))
        self.model.to(self.device).eval()
        self._kv_bytes_per_token = _kv_bytes_per_token(self.model.config, resolve_dtype(dtype))
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
        width = max(len(p) for p in prompt_token_ids)
        per_batch = self.rows_per_batch(width + sampling.max_new_tokens)
        for start in range(0, len(rows), per_batch):
            chunk = rows[start : start + per_batch]
            prompt_ids = sorted({i for i, _ in chunk})
            local = {i: k for k, i in enumerate(prompt_ids)}
            seeds = [derive_seed(base_seed, i, j, n) for i, j in chunk]
            responses = self._generate_rows(
                [prompt_token_ids[i] for i in prompt_ids], [local[i] for i, _ in chunk], seeds, sampling
            )
            for (i, j), response in zip(chunk, responses):
                results[i][j] = response
        return results  # type: ignore[return-value]

    def rows_per_batch(self, tokens_per_row: int) -> int:
        """How many rows of ``tokens_per_row`` (prompt + response) one batch takes (>= 1)."""
        per_row = (
            tokens_per_row * self._kv_bytes_per_token + _SAMPLING_BYTES_PER_VOCAB * self.facts.vocab_size
        )
        rows = max(1, self.kv_cache_bytes // per_row)
        return rows if self.max_batch_rows is None else min(rows, self.max_batch_rows)

    def _record_routing(self, module, inputs, output) -> None:
        # Qwen3-MoE's router returns (logits, top-k weights, top-k expert ids [tokens, k]).
        if self._routing_steps:  # only inside generate()
            self._routing_steps[-1].append(output[2].detach().cpu())

    def _routing_of_rows(self, width: int, prompts, prompt_of_row, lengths) -> list[torch.Tensor | None]:
        """Stack the recorded forwards into ``[prompt + response, layers, k]`` per row (the prefill
        ran once per distinct prompt; its routing is shared by that prompt's rows)."""
        if not self._routers:
            return [None] * len(prompt_of_row)
        steps = [torch.stack(layers, dim=1) for layers in self._routing_steps]  # [b*s, L, k]
        prefill = steps[0].view(len(prompts), width, *steps[0].shape[1:])[torch.tensor(prompt_of_row)]
        decode = [st.view(len(prompt_of_row), 1, *st.shape[1:]) for st in steps[1:]]
        full = torch.cat([prefill, *decode], dim=1) if decode else prefill
        out = []
        for r, k in enumerate(prompt_of_row):
            prompt = prompts[k]
            n = len(prompt) + lengths[r]
            row = full[r, width - len(prompt) :][: n - 1]  # positions that went through the model
            out.append(torch.cat([row, row[-1:]], dim=0))  # the last token's routing is never used
        return out

    @torch.no_grad()
    def _generate_rows(
        self, prompts: list[list[int]], prompt_of_row: list[int], seeds: list[int], sampling: SamplingConfig
    ) -> list[Response]:
        """Decode one batch: row ``r`` continues ``prompts[prompt_of_row[r]]`` with seed ``seeds[r]``."""
        device, steps = self.device, sampling.max_new_tokens
        rows, width = len(prompt_of_row), max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), width), self._pad_id, dtype=torch.long)
        prompt_mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for k, prompt in enumerate(prompts):  # left padding: the next token is always at [:, -1]
            input_ids[k, width - len(prompt) :] = torch.tensor(prompt)
            prompt_mask[k, width - len(prompt) :] = 1
        input_ids, prompt_mask = input_ids.to(device), prompt_mask.to(device)
        position_ids = (prompt_mask.cumsum(-1) - 1).clamp(min=0)
        # Prefill each distinct prompt once; its n rows share the resulting KV cache.
        self._routing_steps = [[]]
        out = self.model(
            input_ids=input_ids,
            attention_mask=prompt_mask,
            position_ids=position_ids,
            use_cache=True,
            logits_to_keep=1,
        )
        past = out.past_key_values
        row_prompt = torch.tensor(prompt_of_row, device=device)
        if prompt_of_row != list(range(len(prompts))):
            past.reorder_cache(row_prompt)
        logits = out.logits[:, -1, :].float().index_select(0, row_prompt)
        attention_mask = torch.ones((rows, width + steps), dtype=torch.long, device=device)
        attention_mask[:, :width] = prompt_mask.index_select(0, row_prompt)
        next_pos = position_ids[:, -1:].index_select(0, row_prompt) + 1
        noise = None if sampling.greedy else RowNoise(seeds, device)
        stop_ids = torch.tensor(
            sorted(set(self.facts.eos_token_ids) | set(sampling.stop_token_ids)),
            dtype=torch.long,
            device=device,
        )

        tokens = torch.zeros((rows, steps), dtype=torch.long, device=device)
        logprobs = torch.zeros((rows, steps), dtype=torch.float32, device=device)
        done = torch.zeros(rows, dtype=torch.bool, device=device)
        length = torch.full((rows,), steps, dtype=torch.long, device=device)
        taken = steps
        for t in range(steps):
            uniforms = None if noise is None else noise.step(t)
            next_ids, chosen = sample_rows(logits, sampling, uniforms)
            tokens[:, t], logprobs[:, t] = next_ids, chosen
            stopped = torch.isin(next_ids, stop_ids) & ~done
            length = torch.where(stopped, t + 1, length)
            done |= stopped
            if bool(done.all()):  # the one host sync of a step
                taken = t + 1
                break
            if t + 1 < steps:
                self._routing_steps.append([])
                out = self.model(
                    input_ids=next_ids[:, None],
                    attention_mask=attention_mask[:, : width + t + 1],
                    position_ids=next_pos + t,
                    past_key_values=past,
                    use_cache=True,
                )
                past = out.past_key_values
                logits = out.logits[:, -1, :].float()
        length = length.clamp(max=taken).tolist()
        stopped_rows = done.tolist()
        token_rows, logprob_rows = tokens.tolist(), logprobs.tolist()
        routing = self._routing_of_rows(width, prompts, prompt_of_row, length)
        self._routing_steps = []
        return [
            Response(
                token_ids=token_rows[r][: length[r]],
                logprobs=logprob_rows[r][: length[r]],
                finish_reason="stop" if stopped_rows[r] else "length",
                routed_experts=routing[r],
            )
            for r in range(rows)
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
