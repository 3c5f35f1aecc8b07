"""Write a sharded HF safetensors checkpoint tensor by tensor, without holding a shard in memory.

The names, shapes and dtypes of all tensors are known before any data exists (they follow from
the architecture), so the shard layout and every file header are planned up front; each tensor's
bytes are then appended to its file as it arrives and dropped. Output files follow the HF
convention: ``model-0000i-of-0000n.safetensors`` plus ``model.safetensors.index.json``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from dapo_megatron.utils.dtypes import SAFETENSORS_CODES

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str | int) -> int:
    """``"5GB"`` -> 5e9 bytes, ``"500MiB"`` -> 500 * 2**20, ``1024`` -> 1024."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([\d.]+)\s*([A-Za-z]*)\s*", str(text))
    if not m or m.group(2).upper() not in _UNITS:
        raise ValueError(f"cannot parse size {text!r} (examples: 5GB, 500MB, 2GiB)")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return torch.Size(self.shape).numel() * self.dtype.itemsize


def plan_shards(specs: Sequence[TensorSpec], max_shard_bytes: int) -> list[list[TensorSpec]]:
    """Consecutive tensors grouped into files of at most ``max_shard_bytes`` (a larger tensor gets
    a file of its own)."""
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        if shards[-1] and size + spec.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.nbytes
    return [s for s in shards if s]


def _header(shard: Sequence[TensorSpec]) -> bytes:
    meta: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for spec in shard:
        if spec.dtype not in SAFETENSORS_CODES:
            raise ValueError(f"tensor {spec.name!r}: dtype {spec.dtype} cannot be stored in safetensors")
        meta[spec.name] = {
            "dtype": SAFETENSORS_CODES[spec.dtype],
            "shape": list(spec.shape),
            "data_offsets": [offset, offset + spec.nbytes],
        }
        offset += spec.nbytes
    raw = json.dumps(meta, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # keep the data 8-byte aligned
    return len(raw).to_bytes(8, "little") + raw


class StreamingSafetensorsWriter:
    """Accepts tensors in exactly the order of ``specs`` and streams them into planned shard files.

    ``progress``: an object with ``update(nbytes)`` (e.g. a ``tqdm`` bar in bytes) or None.
    """

    def __init__(self, out_dir: str | Path, specs: Sequence[TensorSpec], max_shard_bytes: int, progress=None):
        self.out_dir = Path(out_dir)
        names = [s.name for s in specs]
        if len(set(names)) != len(names):
            raise ValueError("duplicate tensor names in the export plan")
        self.shards = plan_shards(specs, max_shard_bytes)
        n = len(self.shards)
        self.files = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        self._queue = [(i, spec) for i, shard in enumerate(self.shards) for spec in shard]
        self._pos = 0
        self._fh = None
        self._file_idx = -1
        self.progress = progress

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if self._pos >= len(self._queue):
            raise ValueError(f"tensor {name!r} was not in the export plan (all planned tensors written)")
        idx, spec = self._queue[self._pos]
        if name != spec.name:
            raise ValueError(f"export order: got tensor {name!r}, expected {spec.name!r}")
        if tuple(tensor.shape) != tuple(spec.shape) or tensor.dtype != spec.dtype:
            raise ValueError(
                f"tensor {name!r}: got {tuple(tensor.shape)} {tensor.dtype}, planned {spec.shape} {spec.dtype}"
            )
        if idx != self._file_idx:
            self._close_file()
            self._file_idx = idx
            self._fh = open(self.out_dir / self.files[idx], "wb")
            self._fh.write(_header(self.shards[idx]))
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
        self._fh.write(memoryview(data.numpy()))
        self._pos += 1
        if self.progress is not None:
            self.progress.update(spec.nbytes)

    def _close_file(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def close(self) -> None:
        """Finish the last file and write ``model.safetensors.index.json``; fails if tensors are missing."""
        self._close_file()
        if self._pos != len(self._queue):
            missing = [s.name for _, s in self._queue[self._pos :]]
            raise ValueError(f"export incomplete: {len(missing)} tensor(s) never written, e.g. {missing[:3]}")
        weight_map = {spec.name: self.files[i] for i, shard in enumerate(self.shards) for spec in shard}
        index = {
            "metadata": {"total_size": sum(s.nbytes for shard in self.shards for s in shard)},
            "weight_map": weight_map,
        }
        (self.out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
