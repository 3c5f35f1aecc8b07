"""The configuration schema: one typed dataclass per section, validated on construction.

One dataclass per section (``model``, ``parallel``, ``data``, ``rollout``, ``algorithm``,
``reward``, ``optimizer``, ``trainer``, ``logging``, ``checkpoint``) grouped by :class:`DapoConfig`.
Every field carries its documentation in ``metadata["doc"]`` (see
:func:`dapo_megatron.config.config_field_docs`). Reading YAML, presets and command-line
overrides is :mod:`dapo_megatron.config.loading`.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

__all__ = [
    "AlgorithmConfig",
    "CheckpointConfig",
    "DapoConfig",
    "DataConfig",
    "LoggingConfig",
    "ModelConfig",
    "OptimizerConfig",
    "ParallelConfig",
    "RewardConfig",
    "RolloutConfig",
    "TrainerConfig",
]


def _f(default: Any = dataclasses.MISSING, doc: str = "", *, factory: Any = dataclasses.MISSING) -> Any:
    """A dataclass field with its documentation in ``metadata["doc"]``."""
    if factory is not dataclasses.MISSING:
        return field(default_factory=factory, metadata={"doc": doc})
    return field(default=default, metadata={"doc": doc})


# --------------------------------------------------------------------------------------------
# Type checking / coercion shared by all sections
# --------------------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is not None:
        return repr(tp).replace("typing.", "")
    return "null" if tp is type(None) else getattr(tp, "__name__", repr(tp))


def _coerce(value: Any, tp: Any, path: str) -> Any:
    """Check ``value`` against annotation ``tp``; return it, lightly coerced.

    Coercions: int -> float; a string that parses as a float for float fields (YAML 1.1 reads
    ``1e-6`` as a string); a single string for ``list[str]`` fields; tuples -> lists.
    """
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, path)
            except ValueError as exc:
                errors.append(exc)
        raise ValueError(f"{path} must be {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value in args and type(value) is type(args[args.index(value)]):
            return value
        hint = difflib.get_close_matches(str(value), [str(a) for a in args], n=1)
        extra = f" (did you mean {hint[0]!r}?)" if hint else ""
        raise ValueError(f"{path} must be {_type_name(tp)}, got {value!r}{extra}")
    if origin is list:
        (item_tp,) = args or (Any,)
        if isinstance(value, str) and item_tp is str:
            value = [value]
        if not isinstance(value, list | tuple):
            raise ValueError(f"{path} must be a list of {_type_name(item_tp)}, got {value!r}")
        return [_coerce(v, item_tp, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ValueError(f"{path} must be a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ValueError(f"{path} must be a bool (true/false), got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ValueError(f"{path} must be an int, got {value!r}")
    if tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ValueError(f"{path} must be a float, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ValueError(f"{path} must be a string, got {value!r}")
    raise TypeError(f"unsupported annotation {tp!r} for {path}")  # programming error


class _Section:
    """Base for config sections: type-checks every field, then runs :meth:`validate`."""

    _section: ClassVar[str] = ""

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            setattr(self, f.name, _coerce(getattr(self, f.name), hints[f.name], self._path(f.name)))
        self.validate()

    def _path(self, name: str) -> str:
        return f"{self._section}.{name}" if self._section else name

    def _require(self, ok: bool, name: str, expected: str) -> None:
        if not ok:
            raise ValueError(f"{self._path(name)} must be {expected}, got {getattr(self, name)!r}")

    def validate(self) -> None:
        """Check value ranges; raise ``ValueError`` naming the field. Re-run after mutation."""


# --------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------


@dataclass
class ModelConfig(_Section):
    """The policy model."""

    _section: ClassVar[str] = "model"

    hf_dir: str = _f("", "Path to a Hugging Face model directory (config, tokenizer, weights). Required.")
    megatron_checkpoint: str | None = _f(
        None, "Optional path to an already converted Megatron checkpoint; null = convert from hf_dir."
    )
    tokenizer_dir: str | None = _f(None, "Tokenizer directory; null = hf_dir.")
    dtype: Literal["fp32", "bf16", "fp16"] = _f("bf16", "Parameter/compute dtype of the policy.")
    recompute: Literal["none", "selective", "full"] = _f(
        "none", "Activation recomputation: none, selective (attention core) or full (whole layers)."
    )
    vocab_pad_multiple: int = _f(
        128, "Pad the vocabulary to a multiple of this (times the tensor-parallel size)."
    )

    def validate(self) -> None:
        self._require(self.vocab_pad_multiple >= 1, "vocab_pad_multiple", ">= 1")


@dataclass
class ParallelConfig(_Section):
    """Model parallelism and micro-batching. The data-parallel size is world_size / (tp * pp)."""

    _section: ClassVar[str] = "parallel"

    tensor_model_parallel_size: int = _f(1, "Tensor-parallel size (TP).")
    pipeline_model_parallel_size: int = _f(1, "Pipeline-parallel size (PP).")
    sequence_parallel: bool = _f(
        False, "Megatron sequence parallelism (needs tensor_model_parallel_size > 1)."
    )
    micro_batch_size: int = _f(1, "Sequences per micro-batch in the training forward/backward.")
    log_prob_micro_batch_size: int | None = _f(
        None, "Sequences per micro-batch when computing old/ref log-probs; null = micro_batch_size."
    )
    backend: Literal["auto", "nccl", "gloo"] = _f(
        "auto", "torch.distributed backend; auto = nccl with CUDA, gloo on CPU."
    )

    def validate(self) -> None:
        self._require(self.tensor_model_parallel_size >= 1, "tensor_model_parallel_size", ">= 1")
        self._require(self.pipeline_model_parallel_size >= 1, "pipeline_model_parallel_size", ">= 1")
        self._require(self.micro_batch_size >= 1, "micro_batch_size", ">= 1")
        self._require(
            self.log_prob_micro_batch_size is None or self.log_prob_micro_batch_size >= 1,
            "log_prob_micro_batch_size",
            "null or >= 1",
        )
        if self.sequence_parallel and self.tensor_model_parallel_size == 1:
            raise ValueError(
                "parallel.sequence_parallel=true needs parallel.tensor_model_parallel_size > 1, got 1"
            )


@dataclass
class DataConfig(_Section):
    """Prompt data (DAPO-Math-17k schema: ``prompt`` chat messages, ``reward_model.ground_truth``)."""

    _section: ClassVar[str] = "data"

    train_files: list[str] = _f(doc="Training prompt files (.parquet or .jsonl). Required.", factory=list)
    val_files: list[str] = _f(
        doc="Validation prompt files (.parquet or .jsonl); empty = no validation.", factory=list
    )
    prompt_key: str = _f("prompt", "Column holding the chat messages (or a plain string).")
    max_prompt_length: int = _f(2048, "Maximum prompt length in tokens (after the chat template).")
    truncation: Literal["filter", "error", "left", "right"] = _f(
        "filter",
        "Prompts over max_prompt_length: filter (drop, with a logged count), error, left (drop the "
        "start, keep the last tokens) or right (keep the first tokens).",
    )
    apply_chat_template: bool = _f(
        True,
        "Format prompts with the tokenizer's chat template; false = join message contents as plain text.",
    )
    shuffle: bool = _f(True, "Reshuffle the training prompts every epoch.")
    seed: int = _f(1, "Seed of the epoch shuffle (the permutation for epoch e depends on (seed, e)).")
    val_max_prompts: int | None = _f(None, "Use at most this many validation prompts; null = all.")

    def validate(self) -> None:
        self._require(self.max_prompt_length >= 1, "max_prompt_length", ">= 1")
        self._require(bool(self.prompt_key), "prompt_key", "a non-empty string")
        self._require(
            self.val_max_prompts is None or self.val_max_prompts >= 1, "val_max_prompts", "null or >= 1"
        )


@dataclass
class RolloutConfig(_Section):
    """Generation of responses."""

    _section: ClassVar[str] = "rollout"

    engine: Literal["hf", "vllm"] = _f("hf", "Rollout engine: hf (transformers generate) or vllm.")
    n: int = _f(16, "Responses sampled per prompt (the group size; >= 2).")
    temperature: float = _f(1.0, "Sampling temperature for training rollouts (> 0).")
    top_p: float = _f(1.0, "Nucleus sampling for training rollouts, in (0, 1].")
    top_k: int = _f(-1, "Top-k sampling for training rollouts; -1 = off.")
    max_response_length: int = _f(20480, "Maximum generated tokens per response.")
    val_n: int = _f(32, "Responses per validation prompt (avg@val_n accuracy).")
    val_temperature: float = _f(1.0, "Validation sampling temperature (0 = greedy).")
    val_top_p: float = _f(0.7, "Validation nucleus sampling, in (0, 1].")
    val_top_k: int = _f(-1, "Validation top-k; -1 = off.")
    engine_options: dict[str, Any] = _f(
        doc="Free-form engine options passed to the engine (e.g. gpu_memory_utilization for vllm).",
        factory=dict,
    )

    def validate(self) -> None:
        self._require(self.n >= 2, "n", ">= 2 (group-relative advantages need at least 2 responses)")
        self._require(self.temperature > 0, "temperature", "> 0")
        self._require(0 < self.top_p <= 1, "top_p", "in (0, 1]")
        self._require(self.top_k == -1 or self.top_k >= 1, "top_k", "-1 (off) or >= 1")
        self._require(self.max_response_length >= 1, "max_response_length", ">= 1")
        self._require(self.val_n >= 1, "val_n", ">= 1")
        self._require(self.val_temperature >= 0, "val_temperature", ">= 0")
        self._require(0 < self.val_top_p <= 1, "val_top_p", "in (0, 1]")
        self._require(self.val_top_k == -1 or self.val_top_k >= 1, "val_top_k", "-1 (off) or >= 1")


LOSS_AGG_MODES = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")
KL_TYPES = ("k1", "k2", "k3", "low_var_kl", "abs", "mse")


@dataclass
class AlgorithmConfig(_Section):
    """The DAPO / GRPO objective, reward shaping and dynamic sampling."""

    _section: ClassVar[str] = "algorithm"

    clip_ratio_low: float = _f(0.2, "eps_low: the ratio is clipped below at 1 - clip_ratio_low, in [0, 1).")
    clip_ratio_high: float = _f(
        0.28, "eps_high: the ratio is clipped above at 1 + clip_ratio_high (Clip-Higher)."
    )
    clip_ratio_c: float | None = _f(
        None, "Dual-clip constant c (> 1) bounding the loss for negative advantages; null = off."
    )
    loss_agg_mode: Literal[
        "token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"
    ] = _f(
        "token-mean", "How per-token losses are aggregated: token-mean (DAPO) or a per-sequence mean (GRPO)."
    )
    norm_adv_by_std: bool = _f(
        True, "Divide group-centred rewards by the group std (GRPO/DAPO); false = Dr.GRPO."
    )
    dynamic_sampling: bool = _f(
        True, "Drop groups whose filter_metric is identical across all responses, and regenerate until full."
    )
    filter_metric: Literal["acc", "score", "reward"] = _f(
        "acc", "Per-response value compared within a group for dynamic sampling (reward = after shaping)."
    )
    max_num_gen_batches: int = _f(
        10, "Give up (error with counts) after this many generation rounds per step; 0 = unlimited."
    )
    overlong_buffer_enable: bool = _f(
        True, "Soft overlong punishment over the last overlong_buffer_len tokens."
    )
    overlong_buffer_len: int = _f(
        4096, "Length of the soft-punishment buffer at the end of max_response_length."
    )
    overlong_buffer_penalty_factor: float = _f(
        1.0, "Penalty at the hard limit (linear ramp over the buffer)."
    )
    overlong_filter: bool = _f(False, "Mask the loss of truncated responses (overlong filtering).")
    kl_coef: float = _f(0.0, "KL penalty coefficient against the reference model; 0 = no KL (DAPO).")
    kl_type: Literal["k1", "k2", "k3", "low_var_kl", "abs", "mse"] = _f(
        "low_var_kl", "KL estimator (low_var_kl = clamped k3, as in GRPO)."
    )
    use_kl_loss: bool = _f(
        False, "true: add the KL term to the loss (GRPO); false: subtract it from the reward."
    )
    entropy_coef: float = _f(0.0, "Entropy bonus coefficient (>= 0); 0 = off.")
    tis_cap: float | None = _f(
        None,
        "Truncated importance sampling cap for the rollout/trainer log-prob mismatch "
        "(weight min(exp(old - rollout), cap)); null = off.",
    )
    token_weighting: Literal["none", "entropy_top_rho"] = _f(
        "none",
        "Per-token loss weights: none, or entropy_top_rho (train only on the top token_weighting_rho "
        "fraction of valid tokens of each micro-batch by entropy; the token-mean count still counts "
        "all valid tokens, see algo/token_weighting.py).",
    )
    token_weighting_rho: float = _f(0.2, "rho of entropy_top_rho, in (0, 1] (Wang et al. 2025: 0.2).")
    policy_loss: Literal["dapo", "clip_cov", "kl_cov"] = _f(
        "dapo",
        "Policy loss on the shared clipped surrogate: dapo; clip_cov (no gradient on a random "
        "clip_cov_ratio of the tokens whose log-prob/advantage covariance is in [clip_cov_lower, "
        "clip_cov_upper]); kl_cov (+ kl_cov_coef * |log r| on the top kl_cov_ratio by covariance).",
    )
    clip_cov_ratio: float = _f(2e-4, "clip_cov: fraction of valid tokens detached, in [0, 1].")
    clip_cov_lower: float = _f(1.0, "clip_cov: lower covariance bound of the eligible tokens.")
    clip_cov_upper: float = _f(5.0, "clip_cov: upper covariance bound of the eligible tokens.")
    kl_cov_ratio: float = _f(2e-3, "kl_cov: fraction of valid tokens penalised, in [0, 1].")
    kl_cov_coef: float = _f(1.0, "kl_cov: coefficient of the |log-ratio| penalty (>= 0).")

    def validate(self) -> None:
        self._require(0 < self.token_weighting_rho <= 1, "token_weighting_rho", "in (0, 1]")
        self._require(0 <= self.clip_cov_ratio <= 1, "clip_cov_ratio", "in [0, 1]")
        self._require(self.clip_cov_lower <= self.clip_cov_upper, "clip_cov_lower", "<= clip_cov_upper")
        self._require(0 <= self.kl_cov_ratio <= 1, "kl_cov_ratio", "in [0, 1]")
        self._require(self.kl_cov_coef >= 0, "kl_cov_coef", ">= 0")
        self._require(0 <= self.clip_ratio_low < 1, "clip_ratio_low", "in [0, 1)")
        self._require(self.clip_ratio_high >= 0, "clip_ratio_high", ">= 0")
        self._require(self.clip_ratio_c is None or self.clip_ratio_c > 1, "clip_ratio_c", "null or > 1")
        self._require(self.max_num_gen_batches >= 0, "max_num_gen_batches", ">= 0")
        self._require(self.overlong_buffer_len >= 0, "overlong_buffer_len", ">= 0")
        self._require(self.overlong_buffer_penalty_factor >= 0, "overlong_buffer_penalty_factor", ">= 0")
        if self.overlong_buffer_enable:
            self._require(
                self.overlong_buffer_len >= 1, "overlong_buffer_len", ">= 1 when overlong_buffer_enable"
            )
        self._require(self.kl_coef >= 0, "kl_coef", ">= 0")
        self._require(self.entropy_coef >= 0, "entropy_coef", ">= 0")
        self._require(self.tis_cap is None or self.tis_cap > 0, "tis_cap", "null or > 0")


@dataclass
class RewardConfig(_Section):
    """The reward function and its worker pool."""

    _section: ClassVar[str] = "reward"

    reward_fn: str = _f(
        "dapo_megatron.rewards.math:compute_score",
        "Import path 'package.module:function' of fn(response, ground_truth) -> dict(score, acc, pred) or float.",
    )
    num_workers: int = _f(4, "Reward worker processes; 0 = run in the trainer process (no timeout).")
    timeout_s: float = _f(10.0, "Per-response timeout; a hung call is killed and scored failure_score.")
    failure_score: float = _f(-1.0, "Score given to a response whose reward call timed out or raised.")

    def validate(self) -> None:
        self._require(":" in self.reward_fn, "reward_fn", "an import path 'package.module:function'")
        self._require(self.num_workers >= 0, "num_workers", ">= 0")
        self._require(self.timeout_s > 0, "timeout_s", "> 0")


@dataclass
class OptimizerConfig(_Section):
    """Adam(W) and the learning-rate schedule."""

    _section: ClassVar[str] = "optimizer"

    lr: float = _f(1e-6, "Peak learning rate.")
    min_lr: float = _f(0.0, "Final learning rate of the cosine schedule (<= lr).")
    weight_decay: float = _f(0.1, "Decoupled weight decay.")
    adam_beta1: float = _f(0.9, "Adam beta1, in [0, 1).")
    adam_beta2: float = _f(0.999, "Adam beta2, in [0, 1).")
    adam_eps: float = _f(1e-8, "Adam epsilon (> 0).")
    clip_grad: float = _f(1.0, "Global gradient-norm clip; 0 = off.")
    lr_warmup_steps: int = _f(
        20,
        "Linear warm-up length in optimizer steps (one per mini-batch update, i.e. "
        "train_batch_size / ppo_mini_batch_size * ppo_epochs per training step): update k "
        "(1-based) runs at lr * min(1, k / lr_warmup_steps), so the first update uses "
        "lr / lr_warmup_steps; 0 = no warm-up.",
    )
    lr_schedule: Literal["constant", "cosine"] = _f("constant", "Schedule after warmup.")

    def validate(self) -> None:
        self._require(self.lr > 0, "lr", "> 0")
        self._require(0 <= self.min_lr <= self.lr, "min_lr", f"in [0, optimizer.lr={self.lr}]")
        self._require(self.weight_decay >= 0, "weight_decay", ">= 0")
        self._require(0 <= self.adam_beta1 < 1, "adam_beta1", "in [0, 1)")
        self._require(0 <= self.adam_beta2 < 1, "adam_beta2", "in [0, 1)")
        self._require(self.adam_eps > 0, "adam_eps", "> 0")
        self._require(self.clip_grad >= 0, "clip_grad", ">= 0")
        self._require(self.lr_warmup_steps >= 0, "lr_warmup_steps", ">= 0")


@dataclass
class TrainerConfig(_Section):
    """Batch sizes (in prompts), schedule and run bookkeeping."""

    _section: ClassVar[str] = "trainer"

    train_batch_size: int = _f(512, "Prompts per training step (after dynamic-sampling filtering).")
    gen_batch_size: int = _f(
        1536, "Prompts per generation round (dynamic sampling); must equal train_batch_size without it."
    )
    ppo_mini_batch_size: int = _f(
        32, "Prompts per optimizer update (train_batch_size / this = updates per step)."
    )
    ppo_epochs: int = _f(1, "Passes over each step's batch.")
    total_steps: int = _f(100, "Training steps.")
    seed: int = _f(1, "Global seed (model init of new heads, sampling, dropout).")
    val_every: int = _f(5, "Validate every N steps; 0 = never.")
    val_before_train: bool = _f(True, "Validate once before the first step.")
    save_every: int = _f(10, "Checkpoint every N steps; 0 = only at the end.")
    run_dir: str = _f("runs/dapo", "Run directory: metrics.jsonl, TensorBoard events, config.yaml.")
    project: str = _f("dapo-megatron", "Project name (for logging).")
    experiment: str = _f("dapo", "Experiment name (for logging).")

    def validate(self) -> None:
        for name in (
            "train_batch_size",
            "gen_batch_size",
            "ppo_mini_batch_size",
            "ppo_epochs",
            "total_steps",
        ):
            self._require(getattr(self, name) >= 1, name, ">= 1")
        for name in ("val_every", "save_every"):
            self._require(getattr(self, name) >= 0, name, ">= 0")
        if self.train_batch_size % self.ppo_mini_batch_size:
            raise ValueError(
                f"trainer.train_batch_size must be divisible by trainer.ppo_mini_batch_size, got "
                f"{self.train_batch_size} and {self.ppo_mini_batch_size}"
            )


@dataclass
class LoggingConfig(_Section):
    """Where metrics go (rank 0 only)."""

    _section: ClassVar[str] = "logging"

    jsonl: bool = _f(True, "Write one JSON object per step to <run_dir>/metrics.jsonl.")
    tensorboard: bool = _f(True, "Write TensorBoard scalars to <run_dir>/tensorboard.")
    progress_bar: bool = _f(True, "Show a tqdm progress bar over steps.")


@dataclass
class CheckpointConfig(_Section):
    """Checkpointing, resume and the final Hugging Face export."""

    _section: ClassVar[str] = "checkpoint"

    save_dir: str | None = _f(None, "Checkpoint directory; null = <trainer.run_dir>/checkpoints.")
    keep_last: int = _f(2, "Keep the last K checkpoints; 0 = keep all.")
    resume: str = _f("auto", "auto (latest in save_dir, if any), never, or a checkpoint path.")
    export_hf_at_end: bool = _f(True, "Convert the final weights to a Hugging Face directory.")
    export_hf_dir: str | None = _f(None, "Where to export; null = <trainer.run_dir>/hf.")

    def validate(self) -> None:
        self._require(self.keep_last >= 0, "keep_last", ">= 0")
        self._require(bool(self.resume), "resume", "'auto', 'never' or a checkpoint path")


_SECTIONS: dict[str, type[_Section]] = {
    "model": ModelConfig,
    "parallel": ParallelConfig,
    "data": DataConfig,
    "rollout": RolloutConfig,
    "algorithm": AlgorithmConfig,
    "reward": RewardConfig,
    "optimizer": OptimizerConfig,
    "trainer": TrainerConfig,
    "logging": LoggingConfig,
    "checkpoint": CheckpointConfig,
}


@dataclass
class DapoConfig:
    """The whole trainer configuration; cross-section checks run in :meth:`validate`."""

    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

    def __post_init__(self) -> None:
        self.validate(require_inputs=False)

    def validate(self, require_inputs: bool = False) -> None:
        """Re-check every section and the cross-section rules.

        ``require_inputs`` also demands ``model.hf_dir`` and ``data.train_files`` (what a real run
        needs; :func:`load_config` sets it).
        """
        for name, cls in _SECTIONS.items():
            section = getattr(self, name)
            if not isinstance(section, cls):
                raise ValueError(f"{name} must be a {cls.__name__}, got {type(section).__name__}")
            section.validate()
        t, a, r = self.trainer, self.algorithm, self.rollout
        if not a.dynamic_sampling and t.gen_batch_size != t.train_batch_size:
            raise ValueError(
                f"trainer.gen_batch_size must equal trainer.train_batch_size when "
                f"algorithm.dynamic_sampling is false, got {t.gen_batch_size} and {t.train_batch_size} "
                f"(set trainer.gen_batch_size={t.train_batch_size})"
            )
        if a.overlong_buffer_enable and a.overlong_buffer_len >= r.max_response_length:
            raise ValueError(
                f"algorithm.overlong_buffer_len must be < rollout.max_response_length when "
                f"algorithm.overlong_buffer_enable, got {a.overlong_buffer_len} >= {r.max_response_length}"
            )
        if require_inputs:
            if not self.model.hf_dir:
                raise ValueError("model.hf_dir is required (path to a Hugging Face model directory)")
            if not self.data.train_files:
                raise ValueError("data.train_files is required (a list of .parquet/.jsonl files)")

    def validate_world(self, world_size: int) -> int:
        """Check the layout against ``world_size`` ranks; return the data-parallel size.

        Each optimizer update sees ``ppo_mini_batch_size * rollout.n`` sequences, split evenly over
        the data-parallel ranks, each rank's share in micro-batches of at most
        ``parallel.micro_batch_size`` (the last one may be smaller).
        """
        mp = self.parallel.tensor_model_parallel_size * self.parallel.pipeline_model_parallel_size
        if world_size % mp:
            raise ValueError(
                f"world size {world_size} must be divisible by parallel.tensor_model_parallel_size * "
                f"parallel.pipeline_model_parallel_size = {mp}"
            )
        dp = world_size // mp
        seqs = self.trainer.ppo_mini_batch_size * self.rollout.n
        if seqs % dp:
            raise ValueError(
                f"trainer.ppo_mini_batch_size * rollout.n = {seqs} sequences must be divisible by the "
                f"data-parallel size {dp} (world {world_size} / (TP * PP = {mp}))"
            )
        return dp
