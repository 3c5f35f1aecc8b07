"""The configuration schema: one typed dataclass per section, validated on construction.

One dataclass per section (``model``, ``parallel``, ``data``, ``rollout``, ``algorithm``,
``reward``, ``optimizer``, ``trainer``, ``logging``, ``checkpoint``) grouped by :class:`DapoConfig`.
Every field carries its documentation in ``metadata["doc"]`` (see
:func:`dapo_megatron.config.config_field_docs`). Reading YAML, presets and command-line
overrides is :mod:`dapo_megatron.config.loading`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from dapo_megatron.algo.config import AlgorithmConfig
from dapo_megatron.utils.typed_config import TypedSection, doc_field

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


# --------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------


@dataclass
class ModelConfig(TypedSection):
    """The policy model."""

    _section: ClassVar[str] = "model"

    hf_dir: str = doc_field(
        "", "Path to a Hugging Face model directory (config, tokenizer, weights). Required."
    )
    megatron_checkpoint: str | None = doc_field(
        None, "Optional path to an already converted Megatron checkpoint; null = convert from hf_dir."
    )
    tokenizer_dir: str | None = doc_field(None, "Tokenizer directory; null = hf_dir.")
    dtype: Literal["fp32", "bf16", "fp16"] = doc_field("bf16", "Parameter/compute dtype of the policy.")
    recompute: Literal["none", "selective", "full"] = doc_field(
        "none", "Activation recomputation: none, selective (attention core) or full (whole layers)."
    )
    vocab_pad_multiple: int = doc_field(
        128, "Pad the vocabulary to a multiple of this (times the tensor-parallel size)."
    )
    moe_aux_loss_coeff: float = doc_field(
        0.0, "MoE only: weight of the router load-balancing loss; 0 = off (the usual RL setting)."
    )
    routing_replay: Literal["none", "rollout"] = doc_field(
        "none",
        "MoE only: rollout = replay the rollout engine's per-token expert choices in the old-log-prob "
        "and update forwards; none = route afresh.",
    )

    def validate(self) -> None:
        self._require(self.vocab_pad_multiple >= 1, "vocab_pad_multiple", ">= 1")
        self._require(self.moe_aux_loss_coeff >= 0, "moe_aux_loss_coeff", ">= 0")


@dataclass
class ParallelConfig(TypedSection):
    """Model parallelism and micro-batching. The data-parallel size is world_size / (tp * pp * cp)."""

    _section: ClassVar[str] = "parallel"

    tensor_model_parallel_size: int = doc_field(1, "Tensor-parallel size (TP).")
    pipeline_model_parallel_size: int = doc_field(1, "Pipeline-parallel size (PP).")
    expert_model_parallel_size: int = doc_field(
        1, "MoE only: experts split over this many ranks (EP), taken from the TP x DP ranks."
    )
    sequence_parallel: bool = doc_field(
        False, "Megatron sequence parallelism (needs tensor_model_parallel_size > 1)."
    )
    micro_batch_size: int = doc_field(1, "Sequences per micro-batch in the training forward/backward.")
    log_prob_micro_batch_size: int | None = doc_field(
        None, "Sequences per micro-batch when computing old/ref log-probs; null = micro_batch_size."
    )
    max_tokens_per_micro_batch: int | None = doc_field(
        None,
        "Sequence packing: token budget per rank and micro-batch. Sequences are binned (balanced, "
        "the same number of micro-batches on every data-parallel rank) and packed end to end in THD, "
        "each padded to a multiple of TP (with SP) x 2*CP (with CP); the budget counts those padded "
        "tokens divided by context_parallel_size and must hold the longest sequence. null = no "
        "packing: micro-batches of micro_batch_size sequences, right-padded (under CP: packed, "
        "micro_batch_size sequences each).",
    )
    context_parallel_size: int = doc_field(
        1,
        "Context-parallel size (CP): every packed sequence is split over CP ranks in the zigzag "
        "layout (rank r keeps chunks r and 2*CP-1-r). The token-level loss uses local sums "
        "(algorithm.loss_agg_mode token-mean, no token_weighting, policy_loss dapo).",
    )
    backend: Literal["auto", "nccl", "gloo"] = doc_field(
        "auto", "torch.distributed backend; auto = nccl with CUDA, gloo on CPU."
    )

    def validate(self) -> None:
        self._require(self.tensor_model_parallel_size >= 1, "tensor_model_parallel_size", ">= 1")
        self._require(self.pipeline_model_parallel_size >= 1, "pipeline_model_parallel_size", ">= 1")
        self._require(self.expert_model_parallel_size >= 1, "expert_model_parallel_size", ">= 1")
        self._require(self.micro_batch_size >= 1, "micro_batch_size", ">= 1")
        self._require(self.context_parallel_size >= 1, "context_parallel_size", ">= 1")
        self._require(
            self.max_tokens_per_micro_batch is None or self.max_tokens_per_micro_batch >= 1,
            "max_tokens_per_micro_batch",
            "null or >= 1",
        )
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
class DataConfig(TypedSection):
    """Prompt data (DAPO-Math-17k schema: ``prompt`` chat messages, ``reward_model.ground_truth``)."""

    _section: ClassVar[str] = "data"

    train_files: list[str] = doc_field(
        doc="Training prompt files (.parquet or .jsonl). Required.", factory=list
    )
    val_files: list[str] = doc_field(
        doc="Validation prompt files (.parquet or .jsonl); empty = no validation.", factory=list
    )
    prompt_key: str = doc_field("prompt", "Column holding the chat messages (or a plain string).")
    max_prompt_length: int = doc_field(2048, "Maximum prompt length in tokens (after the chat template).")
    truncation: Literal["filter", "error", "left", "right"] = doc_field(
        "filter",
        "Prompts over max_prompt_length: filter (drop, with a logged count), error, left (drop the "
        "start, keep the last tokens) or right (keep the first tokens).",
    )
    apply_chat_template: bool = doc_field(
        True,
        "Format prompts with the tokenizer's chat template; false = join message contents as plain text.",
    )
    shuffle: bool = doc_field(True, "Reshuffle the training prompts every epoch.")
    seed: int = doc_field(1, "Seed of the epoch shuffle (the permutation for epoch e depends on (seed, e)).")
    val_max_prompts: int | None = doc_field(None, "Use at most this many validation prompts; null = all.")

    def validate(self) -> None:
        self._require(self.max_prompt_length >= 1, "max_prompt_length", ">= 1")
        self._require(bool(self.prompt_key), "prompt_key", "a non-empty string")
        self._require(
            self.val_max_prompts is None or self.val_max_prompts >= 1, "val_max_prompts", "null or >= 1"
        )


@dataclass
class RolloutConfig(TypedSection):
    """Generation of responses."""

    _section: ClassVar[str] = "rollout"

    engine: Literal["hf", "vllm"] = doc_field("hf", "Rollout engine: hf (transformers generate) or vllm.")
    n: int = doc_field(16, "Responses sampled per prompt (the group size; >= 2).")
    temperature: float = doc_field(1.0, "Sampling temperature for training rollouts (> 0).")
    top_p: float = doc_field(
        1.0,
        "Nucleus sampling for training rollouts, in (0, 1]. The engines report log-probs of the "
        "truncated distribution and the trainer applies the same truncation (exact, vocab-parallel) "
        "to old/new log-probs and the entropy (policy/truncation.py).",
    )
    top_k: int = doc_field(
        -1, "Top-k sampling for training rollouts; -1 = off. Applied in the trainer too, as top_p."
    )
    max_response_length: int = doc_field(20480, "Maximum generated tokens per response.")
    val_n: int = doc_field(32, "Responses per validation prompt (avg@val_n accuracy).")
    val_temperature: float = doc_field(1.0, "Validation sampling temperature (0 = greedy).")
    val_top_p: float = doc_field(0.7, "Validation nucleus sampling, in (0, 1].")
    val_top_k: int = doc_field(-1, "Validation top-k; -1 = off.")
    tensor_parallel_size: int | None = doc_field(
        None,
        "GPUs (ranks) per rollout engine, the engine's own TP; one engine per block of this many "
        "consecutive ranks, on the block's first rank. null = the training TP x PP x CP (one engine "
        "per data-parallel replica). The hf engine runs on one device of its block.",
    )
    engine_options: dict[str, Any] = doc_field(
        doc="Free-form engine options passed to the engine (e.g. gpu_memory_utilization for vllm).",
        factory=dict,
    )
    record_routing: bool | None = doc_field(
        None,
        "MoE only: the engines record each token's experts, which reach the training ranks with the "
        "batch; the trainer reports rollout/expert_agreement (the fraction of the engine's expert "
        "choices the training forward used). null = on with model.routing_replay=rollout (which "
        "needs it). hf engine only; padded micro-batches only (no max_tokens_per_micro_batch / CP).",
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
        self._require(
            self.tensor_parallel_size is None or self.tensor_parallel_size >= 1,
            "tensor_parallel_size",
            ">= 1 or null",
        )
        self._require(
            "tensor_parallel_size" not in self.engine_options,
            "engine_options.tensor_parallel_size",
            "absent: set rollout.tensor_parallel_size instead",
        )


@dataclass
class RewardConfig(TypedSection):
    """The reward function and its worker pool."""

    _section: ClassVar[str] = "reward"

    reward_fn: str = doc_field(
        "dapo_megatron.rewards.math:compute_score",
        "Import path 'package.module:function' of fn(response, ground_truth) -> dict(score, acc, pred) or float.",
    )
    num_workers: int = doc_field(4, "Reward worker processes; 0 = run in the trainer process (no timeout).")
    timeout_s: float = doc_field(
        10.0, "Per-response timeout; a hung call is killed and scored failure_score."
    )
    failure_score: float = doc_field(-1.0, "Score given to a response whose reward call timed out or raised.")

    def validate(self) -> None:
        self._require(":" in self.reward_fn, "reward_fn", "an import path 'package.module:function'")
        self._require(self.num_workers >= 0, "num_workers", ">= 0")
        self._require(self.timeout_s > 0, "timeout_s", "> 0")


@dataclass
class OptimizerConfig(TypedSection):
    """Adam(W) and the learning-rate schedule."""

    _section: ClassVar[str] = "optimizer"

    lr: float = doc_field(1e-6, "Peak learning rate.")
    min_lr: float = doc_field(0.0, "Final learning rate of the cosine schedule (<= lr).")
    weight_decay: float = doc_field(0.1, "Decoupled weight decay.")
    adam_beta1: float = doc_field(0.9, "Adam beta1, in [0, 1).")
    adam_beta2: float = doc_field(0.999, "Adam beta2, in [0, 1).")
    adam_eps: float = doc_field(1e-8, "Adam epsilon (> 0).")
    clip_grad: float = doc_field(1.0, "Global gradient-norm clip; 0 = off.")
    lr_warmup_steps: int = doc_field(
        20,
        "Linear warm-up length in training steps (rollout batches, the DAPO paper's unit: "
        "20). The ramp is per optimizer update: with U = train_batch_size / "
        "ppo_mini_batch_size * ppo_epochs updates per training step, update k (1-based, "
        "counted over the run) runs at lr * min(1, k / (lr_warmup_steps * U)), so the first "
        "update uses lr / (lr_warmup_steps * U), not 0; 0 = no warm-up.",
    )
    lr_schedule: Literal["constant", "cosine"] = doc_field("constant", "Schedule after warmup.")
    use_distributed_optimizer: bool | None = doc_field(
        None,
        "Megatron's distributed optimizer (ZeRO-1: Adam state and fp32 master weights sharded over "
        "data-parallel ranks); null = on with CUDA, off on CPU. Checkpoints reshard with either.",
    )

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
class TrainerConfig(TypedSection):
    """Batch sizes (in prompts), schedule and run bookkeeping."""

    _section: ClassVar[str] = "trainer"

    train_batch_size: int = doc_field(512, "Prompts per training step (after dynamic-sampling filtering).")
    gen_batch_size: int = doc_field(
        1536, "Prompts per generation round (dynamic sampling); must equal train_batch_size without it."
    )
    ppo_mini_batch_size: int = doc_field(
        32, "Prompts per optimizer update (train_batch_size / this = updates per step)."
    )
    ppo_epochs: int = doc_field(1, "Passes over each step's batch.")
    max_consecutive_skipped_steps: int = doc_field(
        3,
        "An optimizer step whose loss or gradient norm is NaN/inf is skipped (no update; counted in "
        "train/skipped_steps); this many skipped in a row stop the run with an error.",
    )
    total_steps: int = doc_field(100, "Training steps.")
    seed: int = doc_field(1, "Global seed (model init of new heads, sampling, dropout).")
    val_every: int = doc_field(5, "Validate every N steps; 0 = never.")
    val_before_train: bool = doc_field(True, "Validate once before the first step.")
    save_every: int = doc_field(10, "Checkpoint every N steps; 0 = only at the end.")
    run_dir: str = doc_field("runs/dapo", "Run directory: metrics.jsonl, TensorBoard events, config.yaml.")
    project: str = doc_field("dapo-megatron", "Project name (for logging).")
    experiment: str = doc_field("dapo", "Experiment name (for logging).")

    def validate(self) -> None:
        for name in (
            "train_batch_size",
            "gen_batch_size",
            "ppo_mini_batch_size",
            "ppo_epochs",
            "total_steps",
            "max_consecutive_skipped_steps",
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
class LoggingConfig(TypedSection):
    """Where metrics go (rank 0 only)."""

    _section: ClassVar[str] = "logging"

    jsonl: bool = doc_field(True, "Write one JSON object per step to <run_dir>/metrics.jsonl.")
    tensorboard: bool = doc_field(True, "Write TensorBoard scalars to <run_dir>/tensorboard.")
    progress_bar: bool = doc_field(True, "Show a tqdm progress bar over steps.")


@dataclass
class CheckpointConfig(TypedSection):
    """Checkpointing, resume and the final Hugging Face export."""

    _section: ClassVar[str] = "checkpoint"

    save_dir: str | None = doc_field(None, "Checkpoint directory; null = <trainer.run_dir>/checkpoints.")
    keep_last: int = doc_field(2, "Keep the last K checkpoints; 0 = keep all.")
    resume: str = doc_field("auto", "auto (latest in save_dir, if any), never, or a checkpoint path.")
    export_hf_at_end: bool = doc_field(True, "Convert the final weights to a Hugging Face directory.")
    export_hf_dir: str | None = doc_field(None, "Where to export; null = <trainer.run_dir>/hf.")

    def validate(self) -> None:
        self._require(self.keep_last >= 0, "keep_last", ">= 0")
        self._require(bool(self.resume), "resume", "'auto', 'never' or a checkpoint path")


_SECTIONS: dict[str, type[TypedSection]] = {
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
        p = self.parallel
        if self.model.routing_replay == "rollout" and r.record_routing is False:
            raise ValueError(
                "model.routing_replay=rollout replays the engine's expert choices: it needs "
                "rollout.record_routing=true or null, got false"
            )
        if self.records_routing:
            if r.engine != "hf":
                raise ValueError(
                    f"model.routing_replay=rollout / rollout.record_routing need an engine that reports "
                    f"routed experts: rollout.engine=hf (the {r.engine} engine does not, see "
                    f"rollout/vllm_engine.py ROUTING_UNSUPPORTED)"
                )
            if p.max_tokens_per_micro_batch is not None or p.context_parallel_size > 1:
                raise ValueError(
                    "model.routing_replay=rollout / rollout.record_routing work on padded micro-batches: "
                    "set parallel.max_tokens_per_micro_batch=null and parallel.context_parallel_size=1 "
                    f"(got {p.max_tokens_per_micro_batch} and {p.context_parallel_size})"
                )
        if p.max_tokens_per_micro_batch is not None:
            from dapo_megatron.parallel.layout import ParallelLayout

            longest = self.data.max_prompt_length + r.max_response_length
            cp = p.context_parallel_size
            multiple = ParallelLayout(
                tp=p.tensor_model_parallel_size, sp=p.sequence_parallel, cp=cp
            ).packed_sequence_multiple
            need = -(-longest // multiple) * multiple // cp
            if p.max_tokens_per_micro_batch < need:
                raise ValueError(
                    f"parallel.max_tokens_per_micro_batch={p.max_tokens_per_micro_batch} cannot hold the "
                    f"longest sequence: data.max_prompt_length + rollout.max_response_length = {longest} "
                    f"tokens need {need} per rank (context_parallel_size={cp}, padding multiple {multiple})"
                )
        if require_inputs:
            if not self.model.hf_dir:
                raise ValueError("model.hf_dir is required (path to a Hugging Face model directory)")
            if not self.data.train_files:
                raise ValueError("data.train_files is required (a list of .parquet/.jsonl files)")

    @property
    def records_routing(self) -> bool:
        """Whether the engines record routed experts (``rollout.record_routing``, null = on with
        ``model.routing_replay=rollout``)."""
        if self.rollout.record_routing is None:
            return self.model.routing_replay == "rollout"
        return self.rollout.record_routing

    @property
    def rollout_tensor_parallel_size(self) -> int:
        """Ranks per rollout engine: ``rollout.tensor_parallel_size``, default the ranks of one
        data-parallel replica (training TP x PP x CP)."""
        p = self.parallel
        replica = p.tensor_model_parallel_size * p.pipeline_model_parallel_size * p.context_parallel_size
        return self.rollout.tensor_parallel_size or replica

    def validate_world(self, world_size: int) -> int:
        """Check the layout against ``world_size`` ranks; return the data-parallel size.

        Each optimizer update sees ``ppo_mini_batch_size * rollout.n`` sequences, split evenly over
        the data-parallel ranks, each rank's share in micro-batches of at most
        ``parallel.micro_batch_size`` (the last one may be smaller).
        """
        p = self.parallel
        mp = p.tensor_model_parallel_size * p.pipeline_model_parallel_size * p.context_parallel_size
        if world_size % mp:
            raise ValueError(
                f"world size {world_size} must be divisible by parallel.tensor_model_parallel_size * "
                f"parallel.pipeline_model_parallel_size * parallel.context_parallel_size = {mp}"
            )
        p = self.parallel
        emp = p.tensor_model_parallel_size * p.expert_model_parallel_size * p.pipeline_model_parallel_size
        if world_size % emp:
            raise ValueError(
                f"world size {world_size} must be divisible by parallel.tensor_model_parallel_size * "
                f"parallel.expert_model_parallel_size * parallel.pipeline_model_parallel_size = {emp}"
            )
        dp = world_size // mp
        rollout_tp = self.rollout_tensor_parallel_size
        if world_size % rollout_tp:
            raise ValueError(
                f"world size {world_size} must be divisible by rollout.tensor_parallel_size = {rollout_tp}"
            )
        seqs = self.trainer.ppo_mini_batch_size * self.rollout.n
        if seqs % dp:
            raise ValueError(
                f"trainer.ppo_mini_batch_size * rollout.n = {seqs} sequences must be divisible by the "
                f"data-parallel size {dp} (world {world_size} / (TP * PP * CP = {mp}))"
            )
        return dp
