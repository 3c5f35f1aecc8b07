"""Generation throughput of the rollout engines vs the libraries they wrap (issue 19; target <= 1.1x).

Usage::

    python benchmarks/generation.py [--shapes demo,smollm2] [--engines hf,vllm] [--repeats 5]
                                    [--models-dir models] [--json out.json]

Two pairs, each side by side in one run on the same model object, prompts, ``n`` and sampling:

- **hf**: ``HFEngine.generate`` vs ``transformers`` ``model.generate(do_sample=True)`` on the same
  rows (every prompt repeated ``n`` times, left padded, one batch, the same EOS ids). The
  ``GenerationConfig`` is spelled out (temperature, ``top_k=0``, ``top_p``) so neither the library's
  ``top_k=50`` default nor the model's ``generation_config.json`` changes the distribution.
- **vllm**: ``VLLMEngine.generate`` vs a bare ``llm.generate`` on the engine's own ``vllm.LLM``
  with the same ``TokensPrompt`` list and the same ``SamplingParams`` (per-request seeds,
  ``logprobs=0``, the same stop ids), written out here without engine code.

Shapes: ``demo``: the CPU demo (32 prompts x 8 responses, 16 new tokens, the demo model of
``dapo_megatron.demo.model.make_demo_model``, its chat-template prompts; for vLLM its head_dim-32
variant, see :func:`model_dir_for`); ``smollm2``:
SmolLM2-135M-Instruct (``tools/prepare_smollm2.py``) with 128-token responses, fewer prompts so it
runs in a few minutes. fp32, temperature 1, one torch thread (vLLM's OpenMP binding off, so it runs
on the same single thread).

Each side is called once to warm up, then ``repeats`` rounds alternate (ours, library) so the
shared machine's noise hits both alike; medians are reported. The seeds are fixed, so every round
of a side generates the same tokens. Tokens are counted per side (up to and including a stop
token); ``ratio = library tokens/s / our tokens/s`` (our time per token over the library's: <= 1.1
is the target, < 1 means faster). Models are built or converted on first use under ``--models-dir``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

SHAPES = {
    "demo": dict(prompts=32, n=8, max_new_tokens=16),
    "smollm2": dict(prompts=2, n=8, max_new_tokens=128),
}
SEED = 1234


# ----------------------------------------------------------------------------- models and prompts


def model_dir_for(shape: str, kind: str, models_dir: Path) -> Path:
    """The HF model folder of ``shape`` for engine ``kind``, built (demo, ~30 s) or converted
    (SmolLM2, ~40 s) if absent. The vLLM CPU build has no attention kernel for the demo model's
    head_dim 16, so its demo model splits the same projections into 2 query / 1 key-value heads of
    32 (same parameter count and FLOPs, warm-started the same way)."""
    if shape == "demo":
        from dapo_megatron.demo.model import make_demo_model

        heads = dict(num_heads=2, num_kv_heads=1) if kind == "vllm" else {}
        out = models_dir / ("demo-head32" if heads else "demo")
        if not (out / "config.json").is_file():
            make_demo_model(out, **heads)
        return out
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
    from prepare_smollm2 import is_complete, prepare

    out = models_dir / "smollm2-135m"
    if not is_complete(out):
        prepare(out)
    return out


STORY_TOPICS = ("a lighthouse keeper", "a lost map", "the first snow", "a robot gardener")


def make_prompts(shape: str, model_dir: Path, num: int) -> list[list[int]]:
    """``num`` prompts through the model's own chat template, as token ids: demo-task questions
    (demo; answers of ~4 tokens), or requests for a long story (smollm2), so that most rows run to
    the 128-token limit on both sides and both do the same work whatever their random streams."""
    from transformers import AutoTokenizer

    from dapo_megatron.data.prompts import format_prompt
    from dapo_megatron.demo.task import make_demo_rows

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if shape == "demo":
        messages = [r["prompt"] for r in make_demo_rows(num, seed=0, split="val")]
    else:
        topics = [STORY_TOPICS[i % len(STORY_TOPICS)] for i in range(num)]
        messages = [[{"role": "user", "content": f"Write a long story about {t}."}] for t in topics]
    texts = [format_prompt(m, tokenizer, apply_chat_template=True) for m in messages]
    return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]


def count_tokens(rows: list[list[int]], stop_ids: set[int]) -> int:
    """Generated tokens of each row up to and including its first stop token."""
    total = 0
    for row in rows:
        cut = next((t + 1 for t, tok in enumerate(row) if tok in stop_ids), len(row))
        total += cut
    return total


# ----------------------------------------------------------------------------- the two pairs


def hf_pair(
    model_dir: Path, prompts: list[list[int]], n: int, sampling
) -> tuple[Callable, Callable, Callable]:
    """(ours, library, close): each of the first two runs one generation and returns its token count."""
    from transformers import GenerationConfig

    from dapo_megatron.rollout import create_engine

    engine = create_engine("hf", model_dir, dtype="float32", seed=0)
    stop_ids = set(engine.facts.eos_token_ids) | set(sampling.stop_token_ids)
    rows = [p for p in prompts for _ in range(n)]
    width = max(len(p) for p in rows)
    input_ids = torch.zeros((len(rows), width), dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for r, p in enumerate(rows):
        input_ids[r, width - len(p) :] = torch.tensor(p)
        attention_mask[r, width - len(p) :] = 1
    gen_config = GenerationConfig(
        do_sample=True,
        temperature=sampling.temperature,
        top_k=0 if sampling.top_k == -1 else sampling.top_k,
        top_p=sampling.top_p,
        max_new_tokens=sampling.max_new_tokens,
        eos_token_id=sorted(stop_ids),
        pad_token_id=0,
    )

    def ours() -> int:
        out = engine.generate(prompts, n, sampling)
        return sum(len(r.token_ids) for group in out for r in group)

    def library() -> int:
        torch.manual_seed(SEED)
        with torch.no_grad():
            out = engine.model.generate(
                input_ids=input_ids, attention_mask=attention_mask, generation_config=gen_config
            )
        return count_tokens(out[:, width:].tolist(), stop_ids)

    return ours, library, engine.close


def vllm_pair(
    model_dir: Path, prompts: list[list[int]], n: int, sampling
) -> tuple[Callable, Callable, Callable]:
    """(ours, library, close) on one ``vllm.LLM``: our engine's ``generate`` and a bare ``llm.generate``."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from dapo_megatron.rollout import create_engine

    engine = create_engine("vllm", model_dir, dtype="float32", seed=0)
    stop_ids = sorted(set(engine.facts.eos_token_ids) | set(sampling.stop_token_ids))
    requests = [TokensPrompt(prompt_token_ids=list(p)) for p in prompts]
    params = [
        SamplingParams(
            n=n,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            top_k=sampling.top_k,
            max_tokens=sampling.max_new_tokens,
            stop_token_ids=stop_ids,
            seed=sampling.seed + i * n,
            logprobs=0,
            detokenize=False,
        )
        for i in range(len(prompts))
    ]

    def ours() -> int:
        out = engine.generate(prompts, n, sampling)
        return sum(len(r.token_ids) for group in out for r in group)

    def library() -> int:
        outs = engine.llm.generate(requests, params, use_tqdm=False)
        return sum(len(c.token_ids) for o in outs for c in o.outputs)

    return ours, library, engine.close


PAIRS = {"hf": (hf_pair, "transformers generate"), "vllm": (vllm_pair, "bare vllm.LLM.generate")}


def time_pair(ours: Callable, library: Callable, repeats: int) -> dict:
    """Warm up both, then ``repeats`` alternating rounds; seconds and token counts per side."""
    sides = {"ours": ours, "library": library}
    for name, fn in sides.items():
        start = time.perf_counter()
        fn()
        print(f"    warm-up {name}: {time.perf_counter() - start:.2f} s", file=sys.stderr, flush=True)
    times: dict[str, list[float]] = {k: [] for k in sides}
    tokens: dict[str, list[int]] = {k: [] for k in sides}
    for rnd in range(repeats):
        for name, fn in sides.items():
            start = time.perf_counter()
            count = fn()
            times[name].append(time.perf_counter() - start)
            tokens[name].append(count)
            print(f"    round {rnd + 1} {name}: {times[name][-1]:.2f} s", file=sys.stderr, flush=True)
    tok_s = {k: statistics.median(c / t for c, t in zip(tokens[k], times[k])) for k in sides}
    return {
        "times_s": times,
        "tokens": tokens,
        "median_s": {k: statistics.median(v) for k, v in times.items()},
        "tokens_per_s": tok_s,
        "ratio": tok_s["library"] / tok_s["ours"],
    }


def run_benchmark(shapes: list[str], engines: list[str], repeats: int, models_dir: Path) -> list[dict]:
    from dapo_megatron.rollout import SamplingConfig

    results = []
    for shape in shapes:
        spec = SHAPES[shape]
        sampling = SamplingConfig(temperature=1.0, max_new_tokens=spec["max_new_tokens"], seed=SEED)
        for kind in engines:
            model_dir = model_dir_for(shape, kind, models_dir)
            prompts = make_prompts(shape, model_dir, spec["prompts"])
            make, library_name = PAIRS[kind]
            ours, library, close = make(model_dir, prompts, spec["n"], sampling)
            try:
                r = time_pair(ours, library, repeats)
            finally:
                close()
                gc.collect()
            r.update(shape=shape, engine=kind, library=library_name, model=model_dir.name, **spec)
            r["prompt_tokens"] = sum(len(p) for p in prompts)
            results.append(r)
            print_result(r, flush=True)
    return results


def print_result(r: dict, flush: bool = False) -> None:
    med, tps = r["median_s"], r["tokens_per_s"]
    print(
        f"[{r['shape']}, {r['model']}] {r['prompts']} prompts x {r['n']} responses, {r['max_new_tokens']} new tokens, "
        f"median of {len(r['times_s']['ours'])}",
        flush=flush,
    )
    for side, label in (("ours", f"{r['engine']} engine"), ("library", r["library"])):
        print(
            f"  {label:<24} {med[side]:8.3f} s  {tps[side]:9.1f} tokens/s  "
            f"({statistics.median(r['tokens'][side]):.0f} tokens; {min(r['times_s'][side]):.3f} .. "
            f"{max(r['times_s'][side]):.3f} s)",
            flush=flush,
        )
    print(
        f"  ratio {r['engine']} engine / {r['library']} (time per token) = {r['ratio']:.3f}x "
        "(target <= 1.1x)",
        flush=flush,
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="demo,smollm2", help=f"comma-separated, of {sorted(SHAPES)}")
    parser.add_argument("--engines", default="hf,vllm", help=f"comma-separated, of {sorted(PAIRS)}")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--models-dir", default="models", help="where the benchmark models are kept")
    parser.add_argument("--json", default=None, help="also write the numbers to this file")
    args = parser.parse_args(argv)
    shapes = [s for s in args.shapes.split(",") if s]
    engines = [e for e in args.engines.split(",") if e]
    for name, given, known in (("--shapes", shapes, SHAPES), ("--engines", engines, PAIRS)):
        bad = sorted(set(given) - set(known))
        if bad or not given:
            parser.error(f"{name} must name some of {sorted(known)}, got {bad or given}")
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    torch.set_num_threads(args.threads)
    # vLLM's CPU worker otherwise binds its OpenMP threads to every core of the NUMA node.
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    results = run_benchmark(shapes, engines, args.repeats, Path(args.models_dir))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    main()
