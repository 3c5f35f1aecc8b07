"""Whole-checkpoint conversion: HF directory <-> Megatron-Core distributed checkpoint.

* :func:`convert_hf_to_megatron` checks the HF directory in this process (config, shard files,
  tensor names and shapes), then one spawned process streams the checkpoint into
  ``<out>.tmp-XXXX`` without building the model (:mod:`dapo_megatron.conversion.stream_save`:
  Megatron's keys from a meta-device model, each chunk read from safetensors, transformed and
  written on its own, so memory stays at about one parameter); metadata is written and the
  directory renamed to ``<out>`` only when everything succeeded. ``materialize=True`` instead
  launches ``tp * pp`` ranks that build the model at that layout, load the HF weights and
  ``dist_checkpointing.save`` it (the reference path).
* :func:`convert_megatron_to_hf` needs no model-parallel ranks: a TP1/PP1 model is built on the
  *meta* device only to obtain Megatron's own sharded-state-dict keys, then the checkpoint is
  read one transformer layer at a time, turned into HF tensors by the same tables (TP=1) and
  streamed into planned safetensors shards. Peak memory is about one layer.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import torch

from dapo_megatron.checkpointing import atomic_directory
from dapo_megatron.conversion.checkpoint import (
    HF_FILES_DIR,
    CheckpointMetadata,
    metadata_from_hf,
    save_sharded_model,
    validate_checkpoint,
    vocab_pad_multiple_for,
    write_metadata,
)
from dapo_megatron.conversion.hf_io import HFCheckpointReader
from dapo_megatron.conversion.hf_to_megatron import check_hf_names
from dapo_megatron.conversion.hf_writer import StreamingSafetensorsWriter, TensorSpec
from dapo_megatron.conversion.slice_reader import read_sharded
from dapo_megatron.conversion.tables import NameResolver, mappings_for
from dapo_megatron.conversion.transforms import ShardContext
from dapo_megatron.models import arch_from_hf_config, padded_vocab_size
from dapo_megatron.models.builder import have_transformer_engine
from dapo_megatron.models.hf_arch import ModelArch
from dapo_megatron.parallel.groups import init_single_process
from dapo_megatron.parallel.launch import launch
from dapo_megatron.parallel.layout import ParallelLayout
from dapo_megatron.utils.dtypes import DTYPES, HF_DTYPE_NAMES

DEFAULT_MAX_SHARD_BYTES = 5 * 10**9


def _check_output(output: Path) -> None:
    if output.exists():
        raise FileExistsError(f"output directory {output} already exists; refusing to overwrite it")
    if not output.parent.is_dir():
        raise FileNotFoundError(f"parent directory of the output, {output.parent}, does not exist")


def check_hf_checkpoint(hf_dir: str | Path) -> tuple[ModelArch, HFCheckpointReader]:
    """Validate an HF directory without loading weights: supported architecture, every shard file
    present and readable, no unmapped tensors, every needed tensor present with the shape the
    config implies (where the transform states one). Errors name the file or tensor."""
    arch = arch_from_hf_config(hf_dir)
    reader = HFCheckpointReader(hf_dir)
    for path in reader.files():
        reader._open(path)  # header + size check: catches truncated files
    rows = mappings_for(arch, transformer_engine=have_transformer_engine())
    check_hf_names(reader, arch, NameResolver(rows))
    ctx = ShardContext(arch=arch, tp_rank=0, tp_size=1, padded_vocab_size=arch.vocab_size)
    for row in rows:
        if row.megatron == "output_layer.weight" and arch.tie_word_embeddings:
            continue
        for layer in range(arch.num_layers) if row.per_layer else [None]:
            names = row.hf_names(layer)
            for n in names:
                if n not in reader:
                    raise KeyError(f"tensor {n!r} is missing from the HF checkpoint in {reader.hf_dir}")
            expected = row.transform.expected_hf_shapes(names, ctx)
            for n, shape in zip(names, expected or []):
                got = tuple(reader._open(reader.file_of(n)).get_slice(n).get_shape())
                if got != tuple(shape):
                    raise ValueError(
                        f"HF tensor {n!r} in {reader.file_of(n)} has shape {got}, but {hf_dir}/config.json "
                        f"implies {tuple(shape)} (config/weight mismatch)"
                    )
    return arch, reader


# ----------------------------------------------------------------------------- HF -> Megatron


def _hf_to_megatron_rank(
    rank: int,
    world_size: int,
    jobs: list[tuple[str, str]],
    tp: int,
    pp: int,
    dtype: str,
    vocab_pad_multiple: int,
    ep: int = 1,
):
    """On every rank: build at (tp, pp, ep), load each HF dir, save it into its (existing, empty) dir."""
    from dapo_megatron.conversion.hf_to_megatron import build_megatron_from_hf
    from dapo_megatron.parallel.groups import initialize_parallel

    layout = ParallelLayout(tp=tp, pp=pp, ep=ep)
    initialize_parallel(layout)
    stats = []
    for hf_dir, out_dir in jobs:
        t0 = time.perf_counter()
        model = build_megatron_from_hf(hf_dir, layout, dtype=dtype, vocab_pad_multiple=vocab_pad_multiple)[0]
        t1 = time.perf_counter()
        save_sharded_model(model, out_dir)
        stats.append({"load_s": t1 - t0, "save_s": time.perf_counter() - t1})
        del model
    return stats


def _hf_to_megatron_stream_rank(
    rank: int, world_size: int, jobs: list[tuple[str, str, int]], tp: int, dtype: str, progress: bool
):
    """One TP1/PP1 process: stream each HF dir into its (existing, empty) dir, no model built."""
    from dapo_megatron.conversion.stream_save import write_checkpoint_from_hf
    from dapo_megatron.parallel.groups import initialize_parallel

    initialize_parallel(ParallelLayout())
    stats = []
    for hf_dir, out_dir, padded in jobs:
        t0 = time.perf_counter()
        info = write_checkpoint_from_hf(
            hf_dir,
            out_dir,
            arch_from_hf_config(hf_dir),
            tp=tp,
            dtype=dtype,
            padded_vocab_size=padded,
            progress=progress,
        )
        stats.append({**info, "save_s": time.perf_counter() - t0})
    return stats


def convert_hf_to_megatron_many(
    jobs: list[tuple[str | Path, str | Path]],
    *,
    tp: int = 1,
    pp: int = 1,
    ep: int = 1,
    dtype: str = "fp32",
    vocab_pad_multiple: int = 128,
    hash_sources: bool = True,
    timeout: float | None = None,
    materialize: bool = False,
    progress: bool = False,
) -> list[dict]:
    """Convert several ``(hf_dir, output)`` pairs with one launched process (streaming; the
    checkpoint's chunks follow a ``tp``-way layout), or with ``materialize=True`` one launch of
    ``tp * pp * ep`` ranks that build the model and
    ``dist_checkpointing.save`` it. The checkpoint is expert-layout free (Megatron stores every
    expert under one global key), so it loads at any ``ep``. ``progress``: a
    bytes/s progress bar on stderr (streaming only)."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    plans = []
    for hf_dir, output in jobs:
        hf_dir, output = Path(hf_dir), Path(output)
        _check_output(output)
        arch, _ = check_hf_checkpoint(hf_dir)
        ParallelLayout(tp=tp, pp=pp, ep=ep).validate(arch)
        padded = padded_vocab_size(arch.vocab_size, tp, vocab_pad_multiple)
        meta = metadata_from_hf(
            hf_dir,
            dtype=dtype,
            vocab_pad_multiple=vocab_pad_multiple,
            padded_vocab_size=padded,
            written_layout={"tp": tp, "pp": pp, "ep": ep},
            hash_sources=hash_sources,
        )
        plans.append((hf_dir, output, meta))
    with ExitStack() as stack:  # each output is renamed into place only if everything succeeded
        plans = [(h, o, stack.enter_context(atomic_directory(o, collective=False)), m) for h, o, m in plans]
        if materialize:
            stats = launch(
                _hf_to_megatron_rank,
                tp * pp * ep,
                [(str(h), str(t)) for h, _, t, _ in plans],
                tp,
                pp,
                dtype,
                vocab_pad_multiple,
                ep,
                timeout=timeout,
            )[0]
        else:
            stats = launch(
                _hf_to_megatron_stream_rank,
                1,
                [(str(h), str(t), m.padded_vocab_size) for h, _, t, m in plans],
                tp,
                dtype,
                progress,
                timeout=timeout,
            )[0]
        for (hf_dir, output, tmp, meta), s in zip(plans, stats):
            write_metadata(tmp, meta, hf_dir)
            s["output"] = str(output)
    return stats


def convert_hf_to_megatron(hf_dir: str | Path, output: str | Path, **kwargs) -> dict:
    """Convert one HF directory; see :func:`convert_hf_to_megatron_many` for the options."""
    return convert_hf_to_megatron_many([(hf_dir, output)], **kwargs)[0]


# ----------------------------------------------------------------------------- Megatron -> HF


def checkpoint_hf_tensors(
    ckpt_dir: str | Path, metadata: CheckpointMetadata, *, dtype: torch.dtype | None = None
) -> tuple[list[TensorSpec], Iterator[tuple[str, torch.Tensor]]]:
    """The HF tensors of a model checkpoint: ``(specs, iterator)``, read one layer at a time.

    Needs an initialised one-rank process group (:func:`init_single_process`). ``specs`` lists
    every ``(name, shape, dtype)`` in the order the iterator yields them.
    """
    from megatron.core import parallel_state

    from dapo_megatron.models import build_gpt_model, transformer_config_from_arch
    from dapo_megatron.parallel.groups import initialize_parallel

    arch = metadata.model_arch()
    layout = ParallelLayout()
    initialize_parallel(layout)
    if (
        parallel_state.get_tensor_model_parallel_world_size()
        * parallel_state.get_pipeline_model_parallel_world_size()
        != 1
    ):
        raise RuntimeError("checkpoint_hf_tensors runs in a single TP1/PP1 process")
    config = transformer_config_from_arch(arch, layout, dtype=metadata.dtype, perform_initialization=False)
    with torch.device("meta"):
        model = build_gpt_model(arch, config, vocab_pad_multiple=vocab_pad_multiple_for(metadata, 1))
    sharded = model.sharded_state_dict()
    ctx = ShardContext(arch=arch, tp_rank=0, tp_size=1, padded_vocab_size=metadata.padded_vocab_size)
    resolver = NameResolver(mappings_for(arch, transformer_engine=have_transformer_engine()))

    groups: dict[object, list] = {}
    specs: list[TensorSpec] = []
    for name, param in model.named_parameters():
        if name == "output_layer.weight" and arch.tie_word_embeddings:
            continue
        if name not in sharded:
            raise KeyError(f"parameter {name!r} has no entry in the model's sharded state dict")
        row, layer = resolver.megatron(name)
        groups.setdefault(("layer", layer) if layer is not None else name, []).append((name, row, layer))
        out_dtype = dtype or param.dtype
        hf_shapes = [tuple(t.shape) for t in row.transform.from_shards([param], ctx)]
        specs.extend(TensorSpec(n, s, out_dtype) for n, s in zip(row.hf_names(layer), hf_shapes))

    def generate():
        for entries in groups.values():
            loaded = read_sharded({name: sharded[name] for name, _, _ in entries}, ckpt_dir)
            for name, row, layer in entries:
                hf = row.transform.from_shards([loaded[name]], ctx)
                for n, t in zip(row.hf_names(layer), hf):
                    yield n, t.to(dtype or t.dtype)
            del loaded

    return specs, generate()


def _progress_bar(total: int, desc: str, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc, smoothing=0.1)


def _megatron_to_hf_rank(
    rank, world_size, ckpt_dir: str, out_dir: str, dtype: str | None, max_shard_bytes: int, progress: bool
):
    _, metadata = validate_checkpoint(ckpt_dir)
    specs, tensors = checkpoint_hf_tensors(ckpt_dir, metadata, dtype=DTYPES[dtype] if dtype else None)
    bar = _progress_bar(sum(s.nbytes for s in specs), "megatron->hf", progress)
    writer = StreamingSafetensorsWriter(out_dir, specs, max_shard_bytes, progress=bar)
    t0 = time.perf_counter()
    for name, t in tensors:
        writer.write(name, t)
    writer.close()
    if bar is not None:
        bar.close()
    return {"bytes": sum(s.nbytes for s in specs), "seconds": time.perf_counter() - t0, "files": writer.files}


def hf_config_for_export(metadata: CheckpointMetadata, dtype: str) -> dict:
    """The source ``config.json`` with its dtype field set to the exported dtype."""
    config = dict(metadata.hf_config)
    key = "torch_dtype" if "torch_dtype" in config and "dtype" not in config else "dtype"
    config[key] = HF_DTYPE_NAMES[dtype]
    return config


def convert_megatron_to_hf(
    megatron_dir: str | Path,
    output: str | Path,
    *,
    dtype: str | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    progress: bool = True,
    in_process: bool = False,
    timeout: float | None = None,
) -> dict:
    """Export a converted or trainer model checkpoint to an HF directory at ``output``.

    ``dtype`` defaults to the checkpoint's. ``in_process``: run in this process (it then owns a
    one-rank process group) instead of a spawned one.
    """
    output = Path(output)
    _check_output(output)
    ckpt, metadata = validate_checkpoint(megatron_dir)
    dtype = dtype or metadata.dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    with atomic_directory(output, collective=False) as tmp:
        args = (str(ckpt), str(tmp), dtype, int(max_shard_bytes), progress)
        if in_process:
            init_single_process()
            stats = _megatron_to_hf_rank(0, 1, *args)
        else:
            stats = launch(_megatron_to_hf_rank, 1, *args, timeout=timeout)[0]
        (tmp / "config.json").write_text(json.dumps(hf_config_for_export(metadata, dtype), indent=2))
        for name in metadata.hf_files:
            shutil.copy2(ckpt / HF_FILES_DIR / name, tmp / name)
    return stats
