"""Input checks and model facts shared by the rollout engines (no engine imports here)."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from dapo_megatron.rollout.types import SamplingConfig

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json")


@dataclass(frozen=True)
class ModelFacts:
    """What the engines need to know about an HF model directory, read without loading weights.

    Attributes:
        vocab_size: rows of the embedding / LM head.
        max_context: the most tokens (prompt + response) one sequence may hold.
        eos_token_ids: ids that end a response, from ``generation_config.json`` or ``config.json``.
        tied_embeddings: whether ``lm_head.weight`` is the input embedding.
        has_tokenizer: whether tokenizer files are present.
    """

    vocab_size: int
    max_context: int
    eos_token_ids: tuple[int, ...]
    tied_embeddings: bool
    has_tokenizer: bool


def _as_id_tuple(value) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)


def read_model_facts(model_dir: str | Path, max_model_len: int | None = None) -> ModelFacts:
    """Read :class:`ModelFacts` from ``model_dir``; ``max_model_len`` caps the context if given."""
    model_dir = Path(model_dir)
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(
            f"model_dir {str(model_dir)!r} has no config.json (expected an HF model directory)"
        )
    config = json.loads(config_path.read_text())
    text_config = config.get("text_config", config)
    max_pos = text_config.get("max_position_embeddings")
    if max_model_len is not None:
        if max_model_len < 2:
            raise ValueError(f"max_model_len must be >= 2, got {max_model_len}")
        if max_pos is not None and max_model_len > max_pos:
            raise ValueError(
                f"max_model_len={max_model_len} exceeds the model's max_position_embeddings={max_pos}"
            )
        max_context = max_model_len
    elif max_pos is not None:
        max_context = int(max_pos)
    else:
        raise ValueError(f"{config_path} has no max_position_embeddings; pass max_model_len")
    eos = ()
    gen_path = model_dir / "generation_config.json"
    if gen_path.is_file():
        eos = _as_id_tuple(json.loads(gen_path.read_text()).get("eos_token_id"))
    if not eos:
        eos = _as_id_tuple(text_config.get("eos_token_id", config.get("eos_token_id")))
    return ModelFacts(
        vocab_size=int(text_config["vocab_size"]),
        max_context=max_context,
        eos_token_ids=eos,
        tied_embeddings=bool(
            text_config.get("tie_word_embeddings", config.get("tie_word_embeddings", False))
        ),
        has_tokenizer=any((model_dir / f).is_file() for f in TOKENIZER_FILES),
    )


def checkpoint_shapes(model_dir: str | Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape of the safetensors checkpoint in ``model_dir`` (headers only)."""
    from safetensors import safe_open

    model_dir = Path(model_dir)
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"model_dir {str(model_dir)!r} has no *.safetensors checkpoint")
    shapes: dict[str, tuple[int, ...]] = {}
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                shapes[name] = tuple(f.get_slice(name).get_shape())
    return shapes


def check_generate_inputs(
    prompt_token_ids: list[list[int]], n: int, sampling: SamplingConfig, facts: ModelFacts
) -> None:
    """Raise ``ValueError`` naming the offending argument if a ``generate`` call is invalid.

    Checks: ``n >= 1``; ``sampling`` is a :class:`SamplingConfig`; every prompt is a non-empty
    list of ids inside the vocabulary; prompt + ``max_new_tokens`` fits the context; stop tokens
    are inside the vocabulary.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be an int >= 1 (responses per prompt), got {n!r}")
    if not isinstance(sampling, SamplingConfig):
        raise TypeError(f"sampling must be a SamplingConfig, got {type(sampling).__name__}")
    for tok in sampling.stop_token_ids:
        if tok >= facts.vocab_size:
            raise ValueError(
                f"SamplingConfig.stop_token_ids contains {tok}, outside the vocabulary (vocab_size={facts.vocab_size})"
            )
    if isinstance(prompt_token_ids, (str, bytes)) or not isinstance(prompt_token_ids, (list, tuple)):
        raise TypeError("prompt_token_ids must be a list of token-id lists")
    for i, prompt in enumerate(prompt_token_ids):
        if isinstance(prompt, (int, str, bytes)) or len(prompt) == 0:
            raise ValueError(
                f"prompt_token_ids[{i}] must be a non-empty list of token ids, got {prompt!r:.60}"
            )
        lo, hi = min(prompt), max(prompt)
        if lo < 0 or hi >= facts.vocab_size:
            bad = lo if lo < 0 else hi
            raise ValueError(
                f"prompt_token_ids[{i}] contains token id {bad}, outside the vocabulary "
                f"(vocab_size={facts.vocab_size})"
            )
        if len(prompt) + sampling.max_new_tokens > facts.max_context:
            raise ValueError(
                f"prompt_token_ids[{i}] has {len(prompt)} tokens; with max_new_tokens="
                f"{sampling.max_new_tokens} that exceeds the context of {facts.max_context} tokens "
                "(max_model_len / max_position_embeddings)"
            )


def collect_named_tensors(
    named_tensors: Iterable[tuple[str, torch.Tensor]],
    expected_shapes: Mapping[str, tuple[int, ...]],
    optional: Iterable[str] = (),
) -> list[tuple[str, torch.Tensor]]:
    """Materialise and check the tensors of an ``update_weights`` call before any weight changes.

    Every name must be one of ``expected_shapes`` (or ``optional``, e.g. a tied ``lm_head.weight``)
    with the expected shape, and every name of ``expected_shapes`` must be present exactly once:
    the contract is full tensors for the whole model. Raises ``ValueError`` naming the tensor.
    """
    optional = set(optional)
    items: list[tuple[str, torch.Tensor]] = []
    seen: set[str] = set()
    for name, tensor in named_tensors:
        if name not in expected_shapes and name not in optional:
            raise ValueError(f"update_weights: unknown tensor name {name!r} (not a parameter of this model)")
        if name in seen:
            raise ValueError(f"update_weights: tensor {name!r} given twice")
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"update_weights: {name!r} is a {type(tensor).__name__}, not a torch.Tensor")
        want = expected_shapes.get(name)
        if want is not None and tuple(tensor.shape) != tuple(want):
            raise ValueError(
                f"update_weights: tensor {name!r} has shape {tuple(tensor.shape)}, expected {tuple(want)}"
            )
        seen.add(name)
        items.append((name, tensor))
    missing = sorted(set(expected_shapes) - seen)
    if missing:
        shown = ", ".join(repr(m) for m in missing[:5])
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise ValueError(f"update_weights: missing tensors {shown}{more} (full weights are required)")
    return items


def derive_seed(base_seed: int, prompt_index: int, sample_index: int, n: int) -> int:
    """The seed of sample ``sample_index`` of prompt ``prompt_index`` (see :class:`SamplingConfig`)."""
    return base_seed + prompt_index * n + sample_index
