"""Lazy, validated reading of a Hugging Face safetensors checkpoint (single file or sharded)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch
from safetensors import safe_open

from dapo_megatron.utils.dtypes import SAFETENSORS_DTYPES

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


class HFCheckpointReader:
    """Name -> tensor access to ``hf_dir`` without loading the whole checkpoint.

    Tensors are read one at a time from memory-mapped safetensors files. Missing or truncated
    shard files raise errors that name the file.
    """

    def __init__(self, hf_dir: str | Path):
        self.hf_dir = Path(hf_dir)
        if not self.hf_dir.is_dir():
            raise FileNotFoundError(f"HF model directory {self.hf_dir} does not exist")
        index = self.hf_dir / INDEX_FILE
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise ValueError(f"{index}: not a valid safetensors index ({e})") from e
            self._file_of = {name: self.hf_dir / fname for name, fname in weight_map.items()}
        elif (self.hf_dir / SINGLE_FILE).exists():
            self._file_of = None
        else:
            raise FileNotFoundError(f"{self.hf_dir}: no {SINGLE_FILE} or {INDEX_FILE} found")
        self._handles: dict[Path, object] = {}
        self._headers: dict[Path, tuple[int, dict]] = {}
        self._raw: dict[Path, object] = {}
        if self._file_of is None:
            path = self.hf_dir / SINGLE_FILE
            self._file_of = {name: path for name in self._open(path).keys()}
        for path in sorted(set(self._file_of.values())):
            if not path.exists():
                raise FileNotFoundError(f"checkpoint shard {path} listed in {INDEX_FILE} is missing")

    def _open(self, path: Path):
        if path not in self._handles:
            try:
                self._handles[path] = safe_open(str(path), framework="pt", device="cpu")
            except Exception as e:  # safetensors raises its own error types
                raise ValueError(f"cannot read safetensors file {path}: {e} (truncated or corrupt?)") from e
        return self._handles[path]

    def names(self) -> list[str]:
        return list(self._file_of)

    def files(self) -> list[Path]:
        return sorted(set(self._file_of.values()))

    def __contains__(self, name: str) -> bool:
        return name in self._file_of

    def file_of(self, name: str) -> Path:
        return self._file_of[name]

    def get(self, name: str) -> torch.Tensor:
        if name not in self._file_of:
            raise KeyError(f"tensor {name!r} is missing from the HF checkpoint in {self.hf_dir}")
        path = self._file_of[name]
        try:
            return self._open(path).get_tensor(name)
        except Exception as e:
            raise ValueError(f"cannot read tensor {name!r} from {path}: {e}") from e

    def _header(self, path: Path) -> tuple[int, dict]:
        """``(start of the data section, header dict)`` of a safetensors file."""
        if path not in self._headers:
            try:
                with open(path, "rb") as f:
                    (n,) = struct.unpack("<Q", f.read(8))
                    header = json.loads(f.read(n))
            except Exception as e:
                raise ValueError(
                    f"cannot read safetensors header of {path}: {e} (truncated or corrupt?)"
                ) from e
            self._headers[path] = (8 + n, header)
        return self._headers[path]

    def read(self, name: str) -> torch.Tensor:
        """Like :meth:`get`, but reads the bytes with plain file I/O into a fresh tensor that this
        process owns (no memory map): memory is bounded by the tensors alive, not by the pages of
        the files touched so far."""
        if name not in self._file_of:
            raise KeyError(f"tensor {name!r} is missing from the HF checkpoint in {self.hf_dir}")
        path = self._file_of[name]
        start, header = self._header(path)
        info = header.get(name)
        if info is None:
            raise KeyError(f"tensor {name!r} is not in {path} (the index says it is)")
        if info["dtype"] not in SAFETENSORS_DTYPES:
            raise ValueError(f"tensor {name!r} in {path}: unsupported dtype {info['dtype']}")
        begin, end = info["data_offsets"]
        out = torch.empty(info["shape"], dtype=SAFETENSORS_DTYPES[info["dtype"]])
        if out.nbytes != end - begin:
            raise ValueError(f"tensor {name!r} in {path}: header offsets do not match its shape and dtype")
        if path not in self._raw:
            self._raw[path] = open(path, "rb", buffering=0)
        f = self._raw[path]
        view = memoryview(out.view(-1).view(torch.uint8).numpy()) if out.nbytes else memoryview(b"")
        f.seek(start + begin)
        done = 0
        while done < len(view):
            n = f.readinto(view[done:])
            if not n:
                raise ValueError(f"cannot read tensor {name!r} from {path}: file ends early (truncated?)")
            done += n
        return out

    def close(self) -> None:
        self._handles.clear()
        for f in self._raw.values():
            f.close()
        self._raw.clear()
