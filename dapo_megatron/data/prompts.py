"""Prompt files in the DAPO-Math-17k schema, validated and tokenised.

A row (parquet or one JSON object per JSONL line)::

    {"prompt": [{"role": "user", "content": "..."}],       # chat messages (a plain string is accepted)
     "reward_model": {"ground_truth": "34", "style": "rule"},
     "data_source": "math_dapo",                           # optional, default "unknown"
     "extra_info": {...}}                                  # optional

Errors name the file, the row (1-based; "line" for JSONL) and the field.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

__all__ = [
    "PromptDataset",
    "PromptRecord",
    "TokenizedPrompt",
    "format_prompt",
    "dataset_from_config",
    "load_prompt_dataset",
    "load_prompt_records",
]

logger = logging.getLogger(__name__)


@dataclass
class PromptRecord:
    """One validated row."""

    messages: list[dict[str, str]]
    ground_truth: str
    data_source: str
    extra_info: dict[str, Any]
    location: str  # "path row N" / "path line N", for error messages


@dataclass
class TokenizedPrompt:
    """A prompt ready for the rollout engine."""

    input_ids: list[int]
    text: str  # the formatted prompt (chat template applied, or plain join)
    ground_truth: str
    data_source: str
    extra_info: dict[str, Any] = field(default_factory=dict)
    index: int = 0  # position in the (filtered) dataset


def _fail(location: str, message: str) -> ValueError:
    return ValueError(f"{location}: {message}")


def _check_row(row: Any, location: str, prompt_key: str) -> PromptRecord:
    if not isinstance(row, Mapping):
        raise _fail(location, f"malformed row: expected an object, got {type(row).__name__}")
    if prompt_key not in row or row[prompt_key] is None:
        raise _fail(location, f"field {prompt_key!r} is missing")
    prompt = row[prompt_key]
    if isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}]
    if not isinstance(prompt, list):
        raise _fail(
            location, f"field {prompt_key!r} must be a list of chat messages, got {type(prompt).__name__}"
        )
    messages = []
    for i, msg in enumerate(prompt):
        if (
            not isinstance(msg, Mapping)
            or not isinstance(msg.get("role"), str)
            or not isinstance(msg.get("content"), str)
        ):
            raise _fail(
                location,
                f"field {prompt_key}[{i}] must be a message {{'role': str, 'content': str}}, got {msg!r}",
            )
        messages.append({"role": msg["role"], "content": msg["content"]})
    if not any(m["content"].strip() for m in messages):
        raise _fail(location, f"field {prompt_key!r} is empty (no message has content)")
    reward_model = row.get("reward_model")
    if not isinstance(reward_model, Mapping):
        raise _fail(location, "field 'reward_model' is missing or not an object (needs 'ground_truth')")
    gt = reward_model.get("ground_truth")
    if gt is None or (isinstance(gt, str) and not gt.strip()):
        raise _fail(location, "field 'reward_model.ground_truth' is missing or empty")
    if isinstance(gt, bool) or not isinstance(gt, str | int | float):
        raise _fail(location, f"field 'reward_model.ground_truth' must be a string or number, got {gt!r}")
    extra = row.get("extra_info") or {}
    if not isinstance(extra, Mapping):
        raise _fail(location, f"field 'extra_info' must be an object, got {type(extra).__name__}")
    source = row.get("data_source") or "unknown"
    return PromptRecord(messages, str(gt), str(source), dict(extra), location)


def _iter_rows(path: Path):
    """Yield ``(location, row)`` for every row of a .parquet or .jsonl file."""
    if path.suffix == ".jsonl":
        with open(path, "rb") as f:  # decoded line by line, so a bad byte names its line
            for lineno, raw in enumerate(f, 1):
                location = f"{path} line {lineno}"
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as exc:
                    raise _fail(location, f"malformed row: not UTF-8 ({exc})") from exc
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except (json.JSONDecodeError, RecursionError) as exc:
                    message = f"malformed row: invalid JSON ({type(exc).__name__}: {exc})"
                    raise _fail(location, message) from exc
                yield location, row
    elif path.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            parquet = pq.ParquetFile(path)
        except Exception as exc:
            raise ValueError(f"{path}: cannot read parquet file: {exc}") from exc
        rowno = 0
        for batch in parquet.iter_batches(batch_size=4096):
            for row in batch.to_pylist():
                rowno += 1
                yield f"{path} row {rowno}", row
    else:
        raise ValueError(f"{path}: unsupported prompt file type {path.suffix!r}; expected .parquet or .jsonl")


def load_prompt_records(
    files: str | Path | Sequence[str | Path], prompt_key: str = "prompt"
) -> list[PromptRecord]:
    """Read and validate every row of ``files`` (in order)."""
    if isinstance(files, str | Path):
        files = [files]
    if not files:
        raise ValueError("no prompt files given")
    records = []
    for name in files:
        path = Path(name)
        if not path.is_file():
            raise FileNotFoundError(f"prompt file not found: {path}")
        before = len(records)
        records.extend(_check_row(row, location, prompt_key) for location, row in _iter_rows(path))
        if len(records) == before:
            raise ValueError(f"{path}: no rows")
    return records


def format_prompt(messages: list[dict[str, str]], tokenizer: Any, apply_chat_template: bool) -> str:
    """The prompt text: the tokenizer's chat template (with the generation prompt), or the plain
    concatenation of the message contents (blank line between messages)."""
    if not apply_chat_template:
        return "\n\n".join(m["content"] for m in messages)
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            "data.apply_chat_template is true but the tokenizer has no chat template; "
            "set data.apply_chat_template=false to use plain text prompts"
        )
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


class PromptDataset:
    """Tokenised prompts; over-long prompts are filtered (counted and logged), truncated or an error.

    Args:
        records: validated rows (:func:`load_prompt_records`).
        tokenizer: a Hugging Face tokenizer.
        max_prompt_length: limit in tokens.
        apply_chat_template: see :func:`format_prompt`.
        truncation: ``filter`` (drop), ``error``, ``left`` (drop the start, keep the last
            ``max_prompt_length`` tokens) or ``right`` (keep the first ones).
    """

    def __init__(
        self,
        records: Sequence[PromptRecord],
        tokenizer: Any,
        max_prompt_length: int,
        apply_chat_template: bool = True,
        truncation: Literal["filter", "error", "left", "right"] = "filter",
    ) -> None:
        if truncation not in ("filter", "error", "left", "right"):
            raise ValueError(f"truncation must be one of filter, error, left, right, got {truncation!r}")
        texts = [format_prompt(r.messages, tokenizer, apply_chat_template) for r in records]
        # The chat template already holds the special tokens (BOS etc.); plain text gets the defaults.
        encoded = tokenizer(texts, add_special_tokens=not apply_chat_template)["input_ids"] if texts else []
        self.items: list[TokenizedPrompt] = []
        self.num_filtered = 0
        self.num_truncated = 0
        for record, text, ids in zip(records, texts, encoded):
            ids = list(ids)
            if len(ids) > max_prompt_length:
                if truncation == "error":
                    raise ValueError(
                        f"{record.location}: prompt has {len(ids)} tokens > data.max_prompt_length="
                        f"{max_prompt_length} (data.truncation=error)"
                    )
                if truncation == "filter":
                    self.num_filtered += 1
                    continue
                ids = ids[-max_prompt_length:] if truncation == "left" else ids[:max_prompt_length]
                self.num_truncated += 1
            self.items.append(
                TokenizedPrompt(
                    ids, text, record.ground_truth, record.data_source, record.extra_info, len(self.items)
                )
            )
        if self.num_filtered:
            logger.warning(
                "filtered out %d of %d prompts longer than data.max_prompt_length=%d tokens (data.truncation=filter)",
                self.num_filtered,
                len(records),
                max_prompt_length,
            )
        if self.num_truncated:
            logger.warning(
                "truncated %d of %d prompts to data.max_prompt_length=%d tokens (data.truncation=%s)",
                self.num_truncated,
                len(records),
                max_prompt_length,
                truncation,
            )
        if records and not self.items:
            raise ValueError(
                f"all {len(records)} prompts are longer than data.max_prompt_length={max_prompt_length}"
            )

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> TokenizedPrompt:
        return self.items[index]

    def batch(self, indices: Sequence[int]) -> list[TokenizedPrompt]:
        """The prompts at ``indices`` (e.g. a batch from :class:`~dapo_megatron.data.sampler.EpochSampler`)."""
        return [self.items[i] for i in indices]


def load_prompt_dataset(
    files: str | Path | Sequence[str | Path],
    tokenizer: Any,
    max_prompt_length: int,
    prompt_key: str = "prompt",
    apply_chat_template: bool = True,
    truncation: Literal["filter", "error", "left", "right"] = "filter",
    max_prompts: int | None = None,
) -> PromptDataset:
    """Load, validate and tokenise prompt files (the arguments mirror ``DataConfig``).

    ``max_prompts`` keeps only the first rows (e.g. ``data.val_max_prompts``).
    """
    records = load_prompt_records(files, prompt_key)
    if max_prompts is not None:
        records = records[:max_prompts]
    return PromptDataset(records, tokenizer, max_prompt_length, apply_chat_template, truncation)


def dataset_from_config(
    data_cfg: Any, tokenizer: Any, split: Literal["train", "val"] = "train"
) -> PromptDataset:
    """:func:`load_prompt_dataset` with the settings of a ``DataConfig`` (``train_files`` or ``val_files``)."""
    files = data_cfg.train_files if split == "train" else data_cfg.val_files
    if not files:
        raise ValueError(f"data.{split}_files is empty")
    return load_prompt_dataset(
        files,
        tokenizer,
        max_prompt_length=data_cfg.max_prompt_length,
        prompt_key=data_cfg.prompt_key,
        apply_chat_template=data_cfg.apply_chat_template,
        truncation=data_cfg.truncation,
        max_prompts=data_cfg.val_max_prompts if split == "val" else None,
    )
