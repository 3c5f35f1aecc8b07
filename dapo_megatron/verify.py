"""Check a conversion against transformers: logits at a layout, and tensor-by-tensor equality.

:func:`verify` launches ``tp * pp * dp`` ranks. Each builds the Megatron model at the layout,
from the HF directory or from a Megatron checkpoint, and runs the same right-padded batch through
Megatron-Core's schedule; the logits are compared (valid positions only) with a single-process
``transformers`` forward of the HF directory. With a Megatron checkpoint every HF tensor exported
from the loaded model is also compared with the HF file, bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

DEFAULT_LENGTHS = (13, 7, 10, 4)


def make_batch(vocab_size: int, lengths=DEFAULT_LENGTHS, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded random ``input_ids [b, s]`` and ``attention_mask [b, s]``."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.zeros(len(lengths), max(lengths), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        ids[i, :n] = torch.randint(3, vocab_size, (n,), generator=g)
        mask[i, :n] = 1
    return ids, mask


def gather_vocab_parallel_logits(logits: torch.Tensor) -> torch.Tensor:
    """The full-vocabulary logits from this rank's TP shard (verification only: the training path
    never gathers the vocabulary)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    tp = ps.get_tensor_model_parallel_world_size()
    if tp == 1:
        return logits.detach()
    parts = [torch.empty_like(logits) for _ in range(tp)]
    dist.all_gather(parts, logits.detach().contiguous(), group=ps.get_tensor_model_parallel_group())
    return torch.cat(parts, dim=-1)


def _verify_rank(rank, world_size, hf_dir, megatron_dir, tp, pp, sp, input_ids, ep=1):
    from megatron.core import parallel_state as ps

    from dapo_megatron.conversion.hf_io import HFCheckpointReader
    from dapo_megatron.loading import build_model_from_checkpoint, build_model_from_hf
    from dapo_megatron.parallel.groups import initialize_parallel
    from dapo_megatron.parallel.layout import ParallelLayout
    from dapo_megatron.policy.schedule import run_microbatches

    layout = ParallelLayout(tp=tp, pp=pp, sp=sp, ep=ep)
    initialize_parallel(layout)
    if megatron_dir:
        loaded = build_model_from_checkpoint(megatron_dir, layout)
    else:
        loaded = build_model_from_hf(hf_dir, layout)
    loaded.model.eval()
    out: dict = {"logits": {}, "tensors": None}

    if megatron_dir:
        reader = HFCheckpointReader(hf_dir)
        seen, mismatched = [], []
        for name, t in loaded.hf_tensors():
            if rank != 0:
                continue
            seen.append(name)
            if name not in reader:
                mismatched.append((name, "not in the HF checkpoint"))
                continue
            ref = reader.get(name)
            if ref.shape != t.shape or ref.dtype != t.dtype:
                mismatched.append((name, f"{tuple(t.shape)} {t.dtype} vs HF {tuple(ref.shape)} {ref.dtype}"))
            elif not torch.equal(ref, t):
                mismatched.append((name, f"max |diff| {(ref.double() - t.double()).abs().max().item():.3e}"))
        if rank == 0:
            missing = sorted(set(reader.names()) - set(seen))
            missing = [n for n in missing if not (n == "lm_head.weight" and loaded.arch.tie_word_embeddings)]
            out["tensors"] = {"compared": len(seen), "mismatched": mismatched, "missing": missing}

    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    mine = list(range(input_ids.shape[0]))[dp_rank::dp]
    seq, vocab = input_ids.shape[1], loaded.arch.vocab_size
    mbs = [{"input_ids": input_ids[i : i + 1], "index": torch.tensor([i])} for i in mine]

    def collect(mb, logits):
        return {int(mb["index"][0]): gather_vocab_parallel_logits(logits)[0, :seq, :vocab].float()}

    if mbs:
        with torch.no_grad():
            results = run_microbatches(
                loaded.model, mbs, collect, forward_only=True, sequence_parallel_multiple=tp if sp else 1
            )
        for r in results:
            out["logits"].update(r)
    keep = ps.is_pipeline_last_stage() and ps.get_tensor_model_parallel_rank() == 0
    if not keep:
        out["logits"] = {}
    return out


@dataclass
class VerifyResult:
    layout: str
    max_abs_logit_diff: float
    tolerance: float
    tensors: dict | None = None  # {"compared", "mismatched", "missing"} with a Megatron checkpoint
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def verify(
    hf_dir: str | Path,
    *,
    megatron_dir: str | Path | None = None,
    tp: int = 1,
    pp: int = 1,
    sp: bool = False,
    dp: int = 1,
    ep: int = 1,
    tolerance: float = 1e-4,
    timeout: float | None = None,
) -> VerifyResult:
    """Compare Megatron (from ``hf_dir`` or ``megatron_dir``) at TPxPPxDP(+SP) with transformers.

    ``ep``: experts split over that many ranks (MoE); the launch then has at least ``tp*pp*ep`` ranks
    (each expert is split over TP as well, so TP2xEP2 runs on 4)."""
    import math

    from transformers import AutoModelForCausalLM

    from dapo_megatron.models import arch_from_hf_config
    from dapo_megatron.parallel.launch import launch

    arch = arch_from_hf_config(hf_dir)
    ids, mask = make_batch(arch.vocab_size)
    world = math.lcm(tp * pp * dp, tp * pp * ep)
    dp = world // (tp * pp)
    results = launch(
        _verify_rank, world, str(hf_dir), str(megatron_dir) if megatron_dir else None, tp, pp, sp, ids, ep,
        timeout=timeout,
    )  # fmt: skip
    got: dict[int, torch.Tensor] = {}
    for r in results:
        got.update(r["logits"])
    ref_model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = ref_model(input_ids=ids, attention_mask=mask).logits
    layout = f"TP{tp}xPP{pp}xDP{dp}{f'xEP{ep}' if ep > 1 else ''}{'+SP' if sp else ''}"
    problems = []
    if sorted(got) != list(range(ids.shape[0])):
        problems.append(f"logits came back for sequences {sorted(got)}, expected all {ids.shape[0]}")
    diff = 0.0
    for i, logits in got.items():
        n = int(mask[i].sum())
        diff = max(diff, (logits[:n] - ref[i, :n]).abs().max().item())
    if diff > tolerance:
        problems.append(f"max |logit diff| {diff:.3e} > tolerance {tolerance:.1e}")
    tensors = results[0]["tensors"]
    if tensors is not None:
        for name, why in tensors["mismatched"]:
            problems.append(f"tensor {name!r}: {why}")
        for name in tensors["missing"]:
            problems.append(f"tensor {name!r} of the HF checkpoint is missing from the Megatron checkpoint")
    return VerifyResult(
        layout=layout, max_abs_logit_diff=diff, tolerance=tolerance, tensors=tensors, problems=problems
    )
