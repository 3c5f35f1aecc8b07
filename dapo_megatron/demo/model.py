"""The starting policy of the CPU demo: a tiny Llama that half-knows the bundled arithmetic task.

:func:`make_demo_model` builds, offline and in well under a minute on a CPU:

1. a word-level tokenizer over exactly the task's vocabulary (the words and punctuation of the
   prompt template, the digits, the operators, ``Answer`` and ``:``) with the special tokens
   ``<pad>`` (0), ``<bos>`` (1), ``<eos>`` (2), ``<unk>`` and the chat-role markers, a GPT-2 style
   byte-level space marker (``Ġ``) so ``decode`` gives back the exact text, and a tiny jinja chat
   template: ``<bos><user>{question}<assistant>`` (+ ``{answer}<eos>`` for assistant turns);
2. a tiny fp32 Llama (4 query / 2 key-value heads, so it splits over TP=2);
3. a short supervised warm start on the task's train split, prompt (chat template) -> response
   ``"Answer: N<eos>"``, with *noisy labels*: each time a row is drawn its answer is correct with
   probability ``p_correct`` and otherwise off by -2, -1, +1 or +2. The model learns the format
   exactly and, per question, a spread of answers whose mass on the right one is a bit under
   ``p_correct`` (the right answer is the mode: greedy accuracy is ~94%). Sampled at temperature
   1.0 it is right ~30% of the time, spread over the questions, so ~90% of the groups of 8
   samples are informative (neither all right nor all wrong): the DAPO demo has signal from
   step 1 and room to climb (mostly by sharpening towards the mode).

Deterministic: same arguments -> the same weights bit for bit on one machine (the build runs on
one thread with its own seeded generators and leaves the global RNG state alone).

CLI::

    python -m dapo_megatron.demo.model --out models/demo [--seed 0] [--eval]
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from dapo_megatron.demo.task import INSTRUCTION, make_demo_rows

__all__ = [
    "CHAT_TEMPLATE",
    "SPECIAL_TOKENS",
    "DemoModelConfig",
    "build_tokenizer",
    "evaluate_sampled_accuracy",
    "make_demo_model",
    "noisy_answer",
]

#: Special tokens, in id order: pad = 0 (the HF rollout engine pads with 0), bos = 1, eos = 2.
SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>", "<system>", "<user>", "<assistant>")

#: ``<bos>`` then one marker per turn; assistant turns end with ``<eos>``; the generation prompt is
#: ``<assistant>``, so a model answer is ``Answer: N<eos>`` right after it.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}<system>{{ message['content'] }}"
    "{% elif message['role'] == 'user' %}<user>{{ message['content'] }}"
    "{% elif message['role'] == 'assistant' %}<assistant>{{ message['content'] }}{{ eos_token }}"
    "{% else %}{{ raise_exception('unknown chat role: ' + message['role']) }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)

# One piece per word, digit or punctuation mark, a single leading space attached (GPT-2 style);
# any other whitespace character is a piece of its own.
_SPLIT_PATTERN = r" ?[A-Za-z]+| ?[0-9]| ?[^\sA-Za-z0-9]|\s"
_PUNCTUATION = "+-*/=()?.,:;!'\"%"


def _pre_tokenizer():
    from tokenizers import Regex, pre_tokenizers

    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_SPLIT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


def _vocabulary(extra_texts: Sequence[str] = ()) -> list[str]:
    """The word pieces, in a fixed order: the prompt template (every operator), the answer line,
    then every digit and punctuation mark with and without a leading space, the newline, then
    the pieces of ``extra_texts`` not seen yet (another task's template)."""
    pre = _pre_tokenizer()
    texts = [f"What is 0 {op} 0? {INSTRUCTION}" for op in "+-*"]
    texts += ["Answer: -0", *(f"{c} {c}" for c in "0123456789" + _PUNCTUATION), "\n", *extra_texts]
    pieces: list[str] = []
    for text in texts:
        for piece, _ in pre.pre_tokenize_str(text):
            if piece not in pieces:
                pieces.append(piece)
    return pieces


def build_tokenizer(model_max_length: int = 256, extra_texts: Sequence[str] = ()):
    """The demo tokenizer as a ``transformers`` fast tokenizer (not saved); ``extra_texts`` add
    the word pieces of another task's template (:mod:`dapo_megatron.demo.multistep`).

    The vocabulary size is odd on purpose (a reserved token is appended if needed), so the demo
    also exercises Megatron's vocabulary padding for tensor parallelism.
    """
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    tokens = list(SPECIAL_TOKENS) + _vocabulary(extra_texts)
    if len(tokens) % 2 == 0:
        tokens.append("<reserved_0>")
    vocab = {tok: i for i, tok in enumerate(tokens)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = _pre_tokenizer()
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([t for t in tokens if t.startswith("<")])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
        model_max_length=model_max_length,
    )


@dataclass(frozen=True)
class DemoModelConfig:
    """Everything that determines the built model (saved as ``demo_model.json``)."""

    seed: int = 0
    # task (see dapo_megatron.demo.task.make_demo_rows)
    max_operand: int = 9
    ops: tuple[str, ...] = ("+",)
    num_train: int = 512
    # model
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 128
    max_position_embeddings: int = 256
    tie_word_embeddings: bool = False
    # warm start
    p_correct: float = 0.4
    steps: int = 400
    batch_size: int = 64
    lr: float = 3e-3
    warmup_steps: int = 20

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first bad field."""
        if not 0.0 <= self.p_correct <= 1.0:
            raise ValueError(f"p_correct must be in [0, 1], got {self.p_correct}")
        for name in ("num_train", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.batch_size < 1 or self.intermediate_size < 1 or self.max_position_embeddings < 8:
            raise ValueError("batch_size, intermediate_size must be >= 1 and max_position_embeddings >= 8")
        if self.hidden_size % self.num_heads or self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by num_heads ({self.num_heads}) "
                f"and num_heads by num_kv_heads ({self.num_kv_heads})"
            )
        if self.warmup_steps < 0 or self.lr <= 0:
            raise ValueError(f"need warmup_steps >= 0 and lr > 0, got {self.warmup_steps}, {self.lr}")


def noisy_answer(truth: int, rng: random.Random, p_correct: float) -> int:
    """``truth`` with probability ``p_correct``, else ``truth + d`` for ``d`` uniform in {-2, -1, 1, 2}."""
    if rng.random() < p_correct:
        return truth
    return truth + rng.choice((-2, -1, 1, 2))


@contextmanager
def _one_thread():
    """Run on one intra-op thread (bit-reproducible CPU reductions), restoring the setting."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _llama_config(cfg: DemoModelConfig, tokenizer: Any):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        initializer_range=0.02,
        tie_word_embeddings=cfg.tie_word_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def _encode_rows(rows: list[dict[str, Any]], tokenizer: Any) -> list[tuple[list[int], int]]:
    """``(prompt ids, integer ground truth)`` per row, the prompt formatted by the chat template
    exactly as :class:`~dapo_megatron.data.prompts.PromptDataset` does."""
    from dapo_megatron.data.prompts import format_prompt

    out = []
    for row in rows:
        text = format_prompt(row["prompt"], tokenizer, apply_chat_template=True)
        out.append(
            (tokenizer(text, add_special_tokens=False)["input_ids"], int(row["reward_model"]["ground_truth"]))
        )
    return out


def sft_update(model: Any, optimizer: Any, scheduler: Any, seqs: list[tuple[list[int], list[int]]], pad: int) -> float:
    """One supervised update on ``(prompt ids, response ids)`` pairs: right-padded, loss on the
    response tokens only, grad-norm clip 1.0, one optimizer and scheduler step. Returns the loss."""
    width = max(len(p) + len(r) for p, r in seqs)
    input_ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    labels = torch.full((len(seqs), width), -100, dtype=torch.long)
    attention = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, (p, r) in enumerate(seqs):
        ids = p + r
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, len(p) : len(ids)] = torch.tensor(r)
        attention[i, : len(ids)] = 1
    loss = model(input_ids=input_ids, attention_mask=attention, labels=labels).loss
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    scheduler.step()
    return loss.item()


def _warm_start(model: Any, tokenizer: Any, cfg: DemoModelConfig) -> dict[str, float]:
    """Supervised warm start on noisy answers; returns a few training statistics."""
    rows = make_demo_rows(
        cfg.num_train, seed=cfg.seed, split="train", max_operand=cfg.max_operand, ops=cfg.ops
    )
    examples = _encode_rows(rows, tokenizer)
    label_rng = random.Random(f"demo-model/{cfg.seed}/labels")
    answer_ids: dict[int, list[int]] = {}

    def response_ids(value: int) -> list[int]:
        if value not in answer_ids:
            answer_ids[value] = tokenizer.encode(f"Answer: {value}", add_special_tokens=False) + [
                tokenizer.eos_token_id
            ]
        return answer_ids[value]

    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.98), weight_decay=0.0)

    def lr_factor(step: int) -> float:  # linear warmup, then linear decay to 10%
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        frac = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        return 1.0 - 0.9 * frac

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    pad = tokenizer.pad_token_id
    model.train()
    losses = []
    for _ in range(cfg.steps):
        batch = [examples[label_rng.randrange(len(examples))] for _ in range(cfg.batch_size)]
        seqs = [(p, response_ids(noisy_answer(truth, label_rng, cfg.p_correct))) for p, truth in batch]
        losses.append(sft_update(model, optimizer, scheduler, seqs, pad))
    model.eval()
    tail = losses[-20:]
    return {"first_loss": losses[0], "final_loss": sum(tail) / len(tail)}


def save_model_dir(
    model: Any, tokenizer: Any, out_dir: Path, info: dict[str, Any], *, start: float, max_new_tokens: int
) -> None:
    """Write ``model`` + ``tokenizer`` + ``demo_model.json`` (``info`` and the build time since
    ``start``) as a Hugging Face directory: under a temporary name next to ``out_dir``, renamed at
    the end, so ``out_dir`` is either absent or complete."""
    from transformers import GenerationConfig

    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        # The generic class name loads with transformers 4.x (vLLM) as well as 5.x.
        tok_cfg_path = tmp / "tokenizer_config.json"
        tok_cfg = json.loads(tok_cfg_path.read_text())
        tok_cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
        tok_cfg_path.write_text(json.dumps(tok_cfg, indent=2) + "\n")
        GenerationConfig(
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            do_sample=True,
            temperature=1.0,
            max_new_tokens=max_new_tokens,
        ).save_pretrained(tmp)
        info = {**info, "build_seconds": round(time.perf_counter() - start, 2)}
        (tmp / "demo_model.json").write_text(json.dumps(info, indent=2) + "\n")
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}.old-{tmp.name.rsplit('-', 1)[-1]}")
            out_dir.rename(old)
            tmp.rename(out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def make_demo_model(
    out_dir: str | Path,
    *,
    seed: int = 0,
    max_operand: int = 9,
    ops: Sequence[str] = ("+",),
    overwrite: bool = False,
    **options: Any,
) -> Path:
    """Build the demo starting policy and save it as a Hugging Face model directory at ``out_dir``.

    Args:
        out_dir: the model directory to create (``config.json``, ``model.safetensors``,
            ``generation_config.json``, ``tokenizer.json``, ``tokenizer_config.json``,
            ``chat_template.jinja`` and ``demo_model.json`` with the build settings).
        seed: seeds the weights, the train rows and the label noise.
        max_operand, ops: the task (:func:`~dapo_megatron.demo.task.make_demo_rows`); use
            the same values for the demo dataset.
        overwrite: replace an existing ``out_dir`` (otherwise it is an error).
        options: any other :class:`DemoModelConfig` field (``p_correct``, ``steps``,
            ``hidden_size``...).

    The directory is written next to ``out_dir`` under a temporary name and renamed at the end, so
    ``out_dir`` is either absent or complete. Returns ``out_dir``.
    """
    from transformers import LlamaForCausalLM

    unknown = sorted(set(options) - set(DemoModelConfig.__dataclass_fields__))
    if unknown:
        raise TypeError(f"make_demo_model() got unknown options {unknown}")
    cfg = DemoModelConfig(seed=seed, max_operand=max_operand, ops=tuple(ops), **options)
    cfg.validate()
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} already exists (pass overwrite=True / --overwrite to replace it)")
    out_dir.parent.mkdir(parents=True, exist_ok=True)

    start = time.perf_counter()
    tokenizer = build_tokenizer(model_max_length=cfg.max_position_embeddings)
    with _one_thread(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = LlamaForCausalLM(_llama_config(cfg, tokenizer)).to(torch.float32)
        stats = _warm_start(model, tokenizer, cfg)

    info = {**asdict(cfg), **stats, "vocab_size": len(tokenizer)}
    save_model_dir(model, tokenizer, out_dir, info, start=start, max_new_tokens=8)
    return out_dir


def evaluate_sampled_accuracy(
    model_dir: str | Path,
    *,
    num_prompts: int = 64,
    n: int = 8,
    seed: int = 0,
    split: str = "val",
    temperature: float = 1.0,
    max_new_tokens: int = 8,
    max_operand: int | None = None,
    ops: Sequence[str] | None = None,
) -> dict[str, float]:
    """Sample ``n`` responses per prompt of the task's ``split`` with the HF rollout engine and
    score them with :func:`~dapo_megatron.rewards.math.compute_score`.

    The task parameters default to those in ``demo_model.json``. Returns ``acc`` (mean over all
    samples), ``informative`` (fraction of prompts whose ``n`` samples are neither all right nor
    all wrong), ``all_right``, ``all_wrong`` and ``format_ok`` (fraction of responses that end
    with EOS and contain an ``Answer:`` line).
    """
    from transformers import AutoTokenizer

    from dapo_megatron.rewards.math import compute_score, extract_answer
    from dapo_megatron.rollout import SamplingConfig, create_engine

    model_dir = Path(model_dir)
    info_path = model_dir / "demo_model.json"
    info = json.loads(info_path.read_text()) if info_path.is_file() else {}
    max_operand = info.get("max_operand", 9) if max_operand is None else max_operand
    ops = tuple(info.get("ops", ("+",)) if ops is None else ops)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rows = make_demo_rows(num_prompts, seed=seed, split=split, max_operand=max_operand, ops=ops)
    encoded = _encode_rows(rows, tokenizer)
    engine = create_engine("hf", model_dir, seed=seed, max_batch_rows=256)
    try:
        with _one_thread():
            out = engine.generate(
                [p for p, _ in encoded],
                n,
                SamplingConfig(temperature=temperature, max_new_tokens=max_new_tokens, seed=seed),
            )
    finally:
        engine.close()
    correct, fmt_ok, per_prompt = 0, 0, []
    for row, responses in zip(rows, out):
        right = 0
        for resp in responses:
            text = tokenizer.decode(resp.token_ids, skip_special_tokens=True)
            right += bool(compute_score(text, row["reward_model"]["ground_truth"])["acc"])
            fmt_ok += resp.finish_reason == "stop" and extract_answer(text) is not None
        correct += right
        per_prompt.append(right)
    total = len(rows) * n
    return {
        "acc": correct / total,
        "informative": sum(0 < r < n for r in per_prompt) / len(rows),
        "all_right": sum(r == n for r in per_prompt) / len(rows),
        "all_wrong": sum(r == 0 for r in per_prompt) / len(rows),
        "format_ok": fmt_ok / total,
    }


def main(argv: list[str] | None = None) -> int:
    """CLI: build the demo model (and optionally print its sampled starting accuracy)."""
    parser = argparse.ArgumentParser(description="Build the tiny starting policy of the CPU DAPO demo.")
    parser.add_argument("--out", type=Path, required=True, help="model directory to create")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-operand", type=int, default=9, help="operands are drawn from 0..max-operand")
    parser.add_argument("--ops", default="+", help="operators of the task, e.g. '+-'")
    parser.add_argument("--p-correct", type=float, default=DemoModelConfig.p_correct)
    parser.add_argument("--steps", type=int, default=DemoModelConfig.steps)
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    parser.add_argument(
        "--eval", action="store_true", help="print the sampled accuracy (T=1, n=8) on 64 val prompts"
    )
    args = parser.parse_args(argv)
    if args.out.exists() and not args.overwrite:
        parser.error(f"{args.out} already exists; pass --overwrite to replace it")
    path = make_demo_model(
        args.out,
        seed=args.seed,
        max_operand=args.max_operand,
        ops=tuple(args.ops),
        overwrite=args.overwrite,
        p_correct=args.p_correct,
        steps=args.steps,
    )
    info = json.loads((path / "demo_model.json").read_text())
    print(
        f"wrote {path} (vocab {info['vocab_size']}, final SFT loss {info['final_loss']:.3f}, "
        f"{info['build_seconds']:.1f} s)"
    )
    if args.eval:
        metrics = evaluate_sampled_accuracy(path, seed=args.seed)
        print(" ".join(f"{k}={v:.3f}" for k, v in metrics.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
