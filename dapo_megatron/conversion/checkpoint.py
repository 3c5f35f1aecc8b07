"""Megatron-Core distributed model checkpoints with a self-describing metadata file.

A model checkpoint directory holds

* a Megatron-Core ``dist_checkpointing`` checkpoint (torch_dist backend) of
  ``model.sharded_state_dict()``: ``metadata.json``, ``.metadata``, ``common.pt``, ``*.distcp``.
  Tensors are stored by global key and offset, so the checkpoint reshards on load (write at
  TP2xPP2, load at TP1, TP4, PP2 ...);
* ``dapo_metadata.json`` (:class:`CheckpointMetadata`): architecture, the HF ``config.json``,
  vocabulary padding, dtype, source hashes, format version - everything an export back to HF needs;
* ``hf_files/``: tokenizer and generation-config files copied from the HF source, if any.

The directory is written by the package's one atomic-save protocol
(:func:`dapo_megatron.checkpointing.atomic_directory`: ``<dir>.tmp-XXXX``, renamed when every rank
succeeded), so a directory under its final name is complete. A trainer checkpoint is the same
kind of directory whose dist checkpoint also holds the optimizer state
(:mod:`dapo_megatron.trainer.checkpoint`); it loads and exports as a model checkpoint.
:func:`resolve_model_dir` also accepts the older trainer layout with the model in ``<step>/model``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from dapo_megatron.checkpointing import (
    CheckpointError,
    atomic_directory,
    check_files,
    is_temporary,
    load_sharded,
    save_sharded,
)

FORMAT_VERSION = 1
METADATA_FILE = "dapo_metadata.json"
HF_FILES_DIR = "hf_files"
MODEL_SUBDIR = "model"  # where trainer checkpoints before the optimizer moved in kept the model
# Files copied from an HF model directory besides config.json and the weights.
HF_EXTRA_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)


@dataclass
class CheckpointMetadata:
    """Contents of ``dapo_metadata.json``: what is needed to rebuild the model and export it to HF."""

    arch: dict[str, Any]  # ModelArch.to_dict()
    hf_config: dict[str, Any]  # the source config.json, verbatim
    dtype: str  # parameter dtype of the stored tensors: fp32 | bf16 | fp16
    vocab_pad_multiple: int  # as given to the builder when the checkpoint was written
    padded_vocab_size: int  # rows of the stored embedding / output layer
    written_layout: dict[str, int] = field(default_factory=dict)  # {"tp": .., "pp": ..} (informational)
    source_files: dict[str, str] = field(default_factory=dict)  # file name -> sha256 of the HF source
    hf_files: list[str] = field(default_factory=list)  # names copied into hf_files/
    source: str = ""  # where it came from (HF dir, or "trainer step N")
    format_version: int = FORMAT_VERSION

    def model_arch(self):
        from dapo_megatron.models.hf_arch import ModelArch

        return ModelArch(**self.arch)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_file(cls, path: str | Path) -> CheckpointMetadata:
        path = Path(path)
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise CheckpointError(f"checkpoint metadata file {path} is missing") from None
        except json.JSONDecodeError as e:
            raise CheckpointError(f"checkpoint metadata file {path} is not valid JSON: {e}") from e
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        missing = sorted(
            f.name for f in fields(cls) if f.name not in raw and f.name in ("arch", "hf_config", "dtype")
        )
        if unknown or missing:
            raise CheckpointError(f"{path}: unknown keys {unknown}, missing keys {missing}")
        if raw.get("format_version", 0) > FORMAT_VERSION:
            raise CheckpointError(
                f"{path}: format_version {raw['format_version']} is newer than supported ({FORMAT_VERSION})"
            )
        return cls(**raw)


def sha256_file(path: str | Path, chunk: int = 16 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def metadata_from_hf(
    hf_dir: str | Path,
    *,
    dtype: str,
    vocab_pad_multiple: int,
    padded_vocab_size: int,
    written_layout: dict[str, int] | None = None,
    hash_sources: bool = True,
) -> CheckpointMetadata:
    """Metadata for a checkpoint converted from the HF model in ``hf_dir``."""
    from dapo_megatron.conversion.hf_io import HFCheckpointReader
    from dapo_megatron.models.hf_arch import arch_from_hf_config

    hf_dir = Path(hf_dir)
    arch = arch_from_hf_config(hf_dir)
    hf_config = json.loads((hf_dir / "config.json").read_text())
    sources = [hf_dir / "config.json", *HFCheckpointReader(hf_dir).files()]
    index = hf_dir / "model.safetensors.index.json"
    if index.exists():
        sources.append(index)
    return CheckpointMetadata(
        arch=arch.to_dict(),
        hf_config=hf_config,
        dtype=dtype,
        vocab_pad_multiple=vocab_pad_multiple,
        padded_vocab_size=padded_vocab_size,
        written_layout=dict(written_layout or {}),
        source_files={p.name: sha256_file(p) for p in sources} if hash_sources else {},
        hf_files=[n for n in HF_EXTRA_FILES if (hf_dir / n).is_file()],
        source=str(hf_dir.resolve()),
    )


def write_metadata(
    ckpt_dir: str | Path, metadata: CheckpointMetadata, hf_dir: str | Path | None = None
) -> None:
    """Copy ``metadata.hf_files`` from ``hf_dir`` into ``hf_files/`` and write ``dapo_metadata.json``
    (last, atomically: its presence marks a complete checkpoint)."""
    ckpt_dir = Path(ckpt_dir)
    if metadata.hf_files:
        if hf_dir is None:
            raise ValueError("metadata lists hf_files but no hf_dir to copy them from was given")
        (ckpt_dir / HF_FILES_DIR).mkdir(exist_ok=True)
        for name in metadata.hf_files:
            shutil.copy2(Path(hf_dir) / name, ckpt_dir / HF_FILES_DIR / name)
    tmp = ckpt_dir / (METADATA_FILE + ".tmp")
    tmp.write_text(metadata.to_json())
    os.replace(tmp, ckpt_dir / METADATA_FILE)


def save_model_checkpoint(
    model,
    ckpt_dir: str | Path,
    metadata: CheckpointMetadata,
    *,
    hf_dir: str | Path | None = None,
    tmp_dir: str | Path | None = None,
) -> Path:
    """Save ``model`` (this rank's stage/shard; call on **every** rank) to ``ckpt_dir``.

    Writes the dist checkpoint and the metadata with the atomic-save protocol
    (:func:`~dapo_megatron.checkpointing.atomic_directory`: into ``<ckpt_dir>.tmp-XXXX``, or
    ``tmp_dir``, renamed when every rank succeeded), so an interrupted save never leaves
    ``ckpt_dir`` looking valid. ``ckpt_dir`` must not exist. Data-parallel replicas are
    deduplicated by ``dist_checkpointing``. ``hf_dir``: where ``metadata.hf_files`` are copied from.
    """
    import torch.distributed as dist

    ckpt_dir = Path(ckpt_dir)
    with atomic_directory(ckpt_dir, tmp_dir=tmp_dir) as tmp:
        save_sharded_model(model, tmp)
        if not dist.is_initialized() or dist.get_rank() == 0:
            write_metadata(tmp, metadata, hf_dir)
    return ckpt_dir


def save_sharded_model(model, out_dir: str | Path) -> None:
    """Only the ``dist_checkpointing`` part (no metadata, no rename) into the existing, empty
    ``out_dir``; collective over all ranks."""
    from dapo_megatron.conversion.names import unwrap_model

    save_sharded(unwrap_model(model).sharded_state_dict(), out_dir)


def resolve_model_dir(path: str | Path) -> Path:
    """The model checkpoint inside ``path``: ``path`` itself (a converted checkpoint, or a trainer
    checkpoint, whose optimizer state is ignored) or ``path/model`` (older trainer checkpoints)."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"Megatron checkpoint directory {path} does not exist")
    for cand in (path, path / MODEL_SUBDIR):
        if (cand / METADATA_FILE).exists() or (cand / "metadata.json").exists():
            return cand
    raise CheckpointError(
        f"{path} is not a model checkpoint: neither {path / METADATA_FILE} nor "
        f"{path / MODEL_SUBDIR / METADATA_FILE} exists"
    )


def validate_checkpoint(path: str | Path) -> tuple[Path, CheckpointMetadata]:
    """Check that a model checkpoint is complete before anything is built; return its directory
    (after :func:`resolve_model_dir`) and metadata. Raises :class:`CheckpointError` naming the file:
    missing metadata, missing Megatron files, ``.distcp`` files that are missing or shorter than
    the chunks the index says they hold."""
    ckpt = resolve_model_dir(path)
    if is_temporary(ckpt):
        raise CheckpointError(f"{ckpt} is an unfinished temporary checkpoint directory")
    metadata = CheckpointMetadata.from_file(ckpt / METADATA_FILE)
    check_files(ckpt)
    for name in metadata.hf_files:
        if not (ckpt / HF_FILES_DIR / name).exists():
            raise CheckpointError(f"file {ckpt / HF_FILES_DIR / name} listed in {METADATA_FILE} is missing")
    return ckpt, metadata


def vocab_pad_multiple_for(metadata: CheckpointMetadata, tp: int) -> int:
    """The ``vocab_pad_multiple`` that makes the builder reproduce the stored padded vocabulary at
    ``tp`` (so a checkpoint written at one TP loads at another)."""
    padded = metadata.padded_vocab_size
    if padded % tp:
        raise CheckpointError(
            f"stored padded vocabulary {padded} is not divisible by tensor_model_parallel_size={tp}"
        )
    return padded // tp


def check_model_fits(gpt, ckpt: Path, metadata: CheckpointMetadata) -> None:
    """Raise :class:`CheckpointError` if ``gpt`` was built with another padded vocabulary."""
    if getattr(gpt, "vocab_size", metadata.padded_vocab_size) != metadata.padded_vocab_size:
        raise CheckpointError(
            f"{ckpt}: stored padded vocabulary is {metadata.padded_vocab_size} rows but the model has "
            f"{gpt.vocab_size}; build it with vocab_pad_multiple=vocab_pad_multiple_for(metadata, tp)"
        )


@torch.no_grad()
def load_model_checkpoint(model, path: str | Path, *, strict: bool = True) -> CheckpointMetadata:
    """Load a model checkpoint (converted, or the model part of a trainer checkpoint) into
    ``model`` at its own layout (call on every rank). Returns the checkpoint's metadata."""
    from dapo_megatron.conversion.names import unwrap_model

    ckpt, metadata = validate_checkpoint(path)
    gpt = unwrap_model(model)
    check_model_fits(gpt, ckpt, metadata)
    request = gpt.sharded_state_dict()
    state = load_sharded(request, ckpt)
    # A trainer checkpoint's common state also holds the optimizer's: keep the model's keys.
    gpt.load_state_dict({k: v for k, v in state.items() if k in request}, strict=strict)
    return metadata


def build_megatron_from_checkpoint(path: str | Path, layout, *, recompute: str = "none", moe=None):
    """Build this rank's model at ``layout`` from a model checkpoint and load it.

    Returns ``(model, arch, transformer_config, padded_vocab_size)``; see
    :func:`dapo_megatron.loading.build_model_from_checkpoint` for the policy-facing wrapper. Call
    after :func:`dapo_megatron.parallel.groups.initialize_parallel`.
    """
    from dapo_megatron.models import build_gpt_model, transformer_config_from_arch

    ckpt, metadata = validate_checkpoint(path)
    arch = metadata.model_arch()
    config = transformer_config_from_arch(
        arch, layout, dtype=metadata.dtype, recompute=recompute, **({"moe": moe} if moe else {})
    )
    model = build_gpt_model(arch, config, vocab_pad_multiple=vocab_pad_multiple_for(metadata, layout.tp))
    load_model_checkpoint(model, ckpt)
    return model, arch, config, metadata.padded_vocab_size
