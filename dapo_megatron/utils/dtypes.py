"""The one dtype vocabulary: config names, Hugging Face names and safetensors codes -> torch dtypes."""

from __future__ import annotations

import torch

__all__ = ["DTYPES", "HF_DTYPE_NAMES", "SAFETENSORS_CODES", "SAFETENSORS_DTYPES", "torch_dtype"]

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
"""Config spelling (``model.dtype``, ``--dtype``) -> torch dtype."""

_HF_NAMES: dict[str, str] = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
"""Hugging Face / vLLM spelling (``torch_dtype`` in ``config.json``) -> config spelling."""

HF_DTYPE_NAMES: dict[str, str] = {v: k for k, v in _HF_NAMES.items()}
"""Config spelling -> Hugging Face / vLLM spelling (``"fp32"`` -> ``"float32"``)."""

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
"""Safetensors header code -> torch dtype."""

SAFETENSORS_CODES: dict[torch.dtype, str] = {v: k for k, v in SAFETENSORS_DTYPES.items()}
"""Torch dtype -> safetensors header code."""


def torch_dtype(name: str | torch.dtype, what: str = "dtype") -> torch.dtype:
    """``"fp32"``/``"bf16"``/``"fp16"``, their HF spellings (``"float32"``, ...) or a torch dtype.

    ``ValueError`` naming ``what`` and the accepted names otherwise.
    """
    if isinstance(name, torch.dtype):
        return name
    key = _HF_NAMES.get(name, name)
    if key not in DTYPES:
        raise ValueError(f"{what} must be one of {sorted(DTYPES) + sorted(_HF_NAMES)}, got {name!r}")
    return DTYPES[key]
