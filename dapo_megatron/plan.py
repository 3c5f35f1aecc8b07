"""Per-GPU memory plan of a DAPO run: does this config fit on these GPUs?

``python -m dapo_megatron.plan --config FILE --nodes N --gpus-per-node G --gpu-memory-gib M``
prints, for the most loaded GPU, the training side and the rollout-engine side, the peak of each
phase of a step, and exits 2 naming every part that does not fit (0 when everything fits).

The architecture comes from ``model.hf_dir/config.json`` or ``--hf-config FILE`` (a
``config.json``; ``examples/hf_configs/`` has the public ones of the example models).

Formulas (bytes; ``P`` = parameters on the most loaded pipeline stage's TP shard, ``s`` =
``data.max_prompt_length + rollout.max_response_length``, ``b`` = micro-batch size, ``h`` =
hidden size, ``f`` = FFN size, ``L_s`` = layers per stage, ``V`` = padded vocabulary):

* Parameters are counted exactly from the architecture (q/k/v/o with GQA and optional biases,
  q/k norms, gated MLP, the two norms per layer, embedding, final norm, untied output layer);
  stage 0 holds the embedding, the last stage the final norm and output layer.
* Mixture of experts (Qwen3-MoE): each layer's MLP is a router (``E h``) and ``E`` gated expert
  MLPs (``3 h f_e``); expert weights are split over ``tp x ep`` ranks, the rest over ``tp``. In the
  activation formula ``f`` is ``top_k x f_e`` (each token's routed intermediate activations). The
  distributed optimizer shards expert state over the expert-data-parallel size ``world / (tp ep pp)``.
* Weights + gradients + optimizer, as Megatron-LM's ``theoretical_memory_usage.py`` counts them,
  with our DDP's fp32 gradient buffer (``grad_reduce_in_fp32``): bf16/fp16 params ``2 + 4 + 12``
  = 18 bytes per parameter (fp32 master + Adam m, v = 12), or ``2 + 4 + 12 / dp`` with the
  distributed optimizer (ZeRO-1 shards the 12 over data-parallel ranks); fp32 params ``4 + 4 + 8``
  or ``4 + 4 + 8 / dp``.
* Tokens of one micro-batch on one GPU: ``t = s b / cp`` for padded micro-batches, ``t =
  parallel.max_tokens_per_micro_batch`` with packing (a budget per rank, after the CP split);
  the formulas below write ``s b`` for ``t`` (Korthikanti's terms are linear in the tokens).
* Activations of one micro-batch per layer: Megatron-LM's ``s b h (18 + 4 f / h) / tp`` (Korthikanti
  et al. 2022, Table 2, selective recompute with sequence parallelism; with fused attention
  ``recompute: none`` stores the same, the ``5 a s / h`` score term being absent). Full
  recompute keeps only each layer's input, ``2 s b h / tp``, plus one layer's working set.
  The first stage holds ``min(pp, micro-batches)`` micro-batches in flight under 1F1B.
* Logits: the ``[s, b, V / tp]`` shard in the compute dtype, its gradient, and the vocab-parallel
  log-prob working set (measured 1.04-1.12x the shard, ``benchmarks/logprob_memory.py``): 3x the
  shard in training, 2x in the no-grad old/ref log-prob pass (at ``log_prob_micro_batch_size``).
* Engine (vLLM, ``rollout.tensor_parallel_size``, default TP x PP of training): its
  weights ``2 P_total / t_r``; it reserves ``gpu_memory_utilization x M`` of the GPU; the KV cache is
  that minus its weights and ``--engine-overhead-gib`` (CUDA graphs, sampler), at
  ``2 L max(1, kv_heads / t_r) head_dim x 2`` bytes per token; it must hold at least one full
  ``s``-token sequence.
* Phases: during rollout the training state (weights, grads, optimizer) stays resident next to the
  engine's reservation; during training the engine sleeps when
  ``engine_options.enable_sleep_mode`` is set (level 1: weights offloaded, KV cache freed) and
  otherwise keeps its reservation.

The engine count printed (``world / engine TP``) is the one-engine-per-block layout the rollout
design targets; today's trainer starts only the first of those engines (on global rank 0), so the
per-GPU figures hold for its GPUs and the throughput of the others is not yet used.

This is a plan, not a measurement: allocator fragmentation, NCCL buffers and the CUDA context
(``--reserved-gib``, default 3) are a flat allowance.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from pathlib import Path

GIB = 1024**3


@dataclass(frozen=True)
class ParameterCount:
    """Parameters of one model, by part (exact for the supported architectures)."""

    embedding: int
    per_layer: int
    num_layers: int
    final_norm: int
    output_layer: int  # 0 when tied to the embedding
    experts_per_layer: int = 0  # the routed-expert part of per_layer (split over EP ranks)

    @property
    def total(self) -> int:
        return self.embedding + self.per_layer * self.num_layers + self.final_norm + self.output_layer


def count_parameters(arch, padded_vocab: int | None = None) -> ParameterCount:
    """Exact parameter count of a :class:`~dapo_megatron.models.hf_arch.ModelArch`."""
    h, hd = arch.hidden_size, arch.head_dim
    q, kv = arch.num_attention_heads * hd, arch.num_query_groups * hd
    attn = h * q + 2 * h * kv + q * h
    if arch.qkv_bias:
        attn += q + 2 * kv
    if arch.qk_norm:
        attn += 2 * hd
    experts = getattr(arch, "num_experts", 0) * 3 * h * getattr(arch, "moe_ffn_hidden_size", 0)
    mlp = h * arch.num_experts + experts if experts else 3 * h * arch.ffn_hidden_size
    vocab = padded_vocab or arch.vocab_size
    return ParameterCount(
        embedding=vocab * h,
        per_layer=attn + mlp + 2 * h,
        num_layers=arch.num_layers,
        final_norm=h,
        output_layer=0 if arch.tie_word_embeddings else vocab * h,
        experts_per_layer=experts,
    )


def padded_vocab_size(vocab: int, multiple: int, tp: int) -> int:
    step = multiple * tp
    return int(math.ceil(vocab / step) * step)


@dataclass
class Line:
    name: str
    gib: float
    how: str


@dataclass
class Plan:
    """The per-GPU plan; ``problems`` names what does not fit."""

    training: list[Line]
    engine: list[Line]
    phases: list[Line]
    problems: list[str]
    summary: dict

    def render(self) -> str:
        out = []
        for title, lines in (("training side (per GPU)", self.training), ("engine side (per GPU)", self.engine),
                             ("peaks", self.phases)):
            out.append(title)
            out += [f"  {ln.name:<34} {ln.gib:9.2f} GiB   {ln.how}" for ln in lines]
        out.append(" ".join(f"{k}={v}" for k, v in self.summary.items()))
        out += [f"DOES NOT FIT: {p}" for p in self.problems] or ["fits"]
        return "\n".join(out)


def memory_plan(cfg, arch, *, world_size: int, gpus_per_node: int, gpu_memory_gib: float,
                reserved_gib: float = 3.0, engine_overhead_gib: float = 2.0) -> Plan:
    """Build the :class:`Plan` of ``cfg`` (a ``DapoConfig``) for ``arch`` on ``world_size`` GPUs."""
    par, tr = cfg.parallel, cfg.trainer
    tp, pp = par.tensor_model_parallel_size, par.pipeline_model_parallel_size
    dp = cfg.validate_world(world_size)
    vocab = padded_vocab_size(arch.vocab_size, cfg.model.vocab_pad_multiple, tp)
    params = count_parameters(arch, vocab)
    if arch.num_layers % pp:
        raise ValueError(f"parallel.pipeline_model_parallel_size={pp} must divide num_layers={arch.num_layers}")
    layers_per_stage = arch.num_layers // pp
    first = params.embedding + layers_per_stage * params.per_layer
    last = layers_per_stage * params.per_layer + params.final_norm + params.output_layer
    if pp == 1:
        stage_params = params.total
    else:
        stage_params = max(first, last + (params.embedding if arch.tie_word_embeddings else 0))
    ep = getattr(par, "expert_model_parallel_size", 1)
    stage_experts = params.experts_per_layer * layers_per_stage
    shard_experts = stage_experts / (tp * ep)
    shard_params = (stage_params - stage_experts) / tp + shard_experts
    expert_dp = world_size // (tp * ep * pp)  # expert weights' replicas (their ZeRO-1 shards)

    half = cfg.model.dtype in ("bf16", "fp16")
    dist_opt = getattr(cfg.optimizer, "use_distributed_optimizer", None)
    dist_opt = True if dist_opt is None else bool(dist_opt)  # the GPU default
    w_bytes = 2 if half else 4
    opt_bytes = 12 if half else 8
    opt_per_param = opt_bytes / dp if dist_opt else opt_bytes
    weights = shard_params * w_bytes
    grads = shard_params * 4
    optim = (shard_params - shard_experts) * opt_per_param
    optim += shard_experts * (opt_bytes / expert_dp if dist_opt else opt_bytes)

    s = cfg.data.max_prompt_length + cfg.rollout.max_response_length
    b = par.micro_batch_size
    cp = par.context_parallel_size
    budget = par.max_tokens_per_micro_batch
    h, f = arch.hidden_size, arch.ffn_hidden_size
    if params.experts_per_layer:
        f = arch.moe_router_topk * arch.moe_ffn_hidden_size
    seqs_per_rank = tr.ppo_mini_batch_size * cfg.rollout.n // dp
    lp_mbs = par.log_prob_micro_batch_size or b
    if budget is None:
        tokens, lp_tokens = s * b / cp, s * lp_mbs / cp
        micro_batches = max(1, math.ceil(seqs_per_rank / b))
        tok_how = f"s={s}, b={b}" + (f", /cp={cp}" if cp > 1 else "")
    else:  # packed: at most `budget` tokens per GPU; at least one sequence per micro-batch
        tokens = lp_tokens = budget
        micro_batches = seqs_per_rank
        tok_how = f"packed: {budget} tokens/GPU" + (f" (cp={cp})" if cp > 1 else "")
    per_layer_act = tokens * h * (18 + 4 * f / h) / tp
    in_flight = min(pp, micro_batches)
    if cfg.model.recompute == "full":
        acts = (2 * tokens * h / tp) * layers_per_stage * in_flight + per_layer_act
        act_how = f"2sbh/tp x {layers_per_stage} layers x {in_flight} in flight + one layer"
    else:
        acts = per_layer_act * layers_per_stage * in_flight
        act_how = f"sbh(18+4f/h)/tp x {layers_per_stage} layers x {in_flight} in flight"
    logit_row = vocab / tp * w_bytes  # one token's logits shard
    train_logits = 3 * logit_row * tokens
    lp_logits = 2 * logit_row * lp_tokens

    training = [
        Line("weights", weights / GIB, f"{shard_params / 1e9:.3f}B params x {w_bytes} B"),
        Line("gradients (fp32 buffer)", grads / GIB, "x 4 B"),
        Line("optimizer" + (" (distributed)" if dist_opt else ""), optim / GIB,
             f"x {opt_per_param:.2f} B ({opt_bytes}{f' / dp={dp}' if dist_opt else ''})"
             + (f"; experts x {opt_bytes / expert_dp if dist_opt else opt_bytes:.2f} B "
                f"(expert dp={expert_dp})" if shard_experts else "")),
        Line("activations", acts / GIB, f"{act_how}, {tok_how}"),
        Line("logits + log-prob (train)", train_logits / GIB, f"3 x [{tokens:.0f} tokens, V/tp] with V={vocab}"),
        Line("logits + log-prob (old/ref pass)", lp_logits / GIB, f"2 x [{lp_tokens:.0f} tokens, V/tp]"),
    ]

    opts = cfg.rollout.engine_options
    rollout_tp = cfg.rollout_tensor_parallel_size
    util = float(opts.get("gpu_memory_utilization", 0.9))
    sleep = bool(opts.get("enable_sleep_mode", False))
    problems = []
    if world_size % rollout_tp:
        problems.append(f"rollout engine TP {rollout_tp} does not divide the world size {world_size}")
    if rollout_tp > gpus_per_node:
        problems.append(
            f"rollout engine TP {rollout_tp} spans more than one node of {gpus_per_node} GPUs "
            f"(set rollout.tensor_parallel_size <= {gpus_per_node})"
        )
    engine_weights = params.total * 2 / rollout_tp
    reservation = util * gpu_memory_gib * GIB
    kv_heads = max(1.0, arch.num_query_groups / rollout_tp)
    kv_per_token = 2 * arch.num_layers * kv_heads * arch.head_dim * 2
    kv_cache = reservation - engine_weights - engine_overhead_gib * GIB
    kv_tokens = max(0.0, kv_cache) / kv_per_token
    engine = [
        Line("engine reservation", reservation / GIB, f"gpu_memory_utilization={util} x {gpu_memory_gib} GiB"),
        Line("  weights", engine_weights / GIB, f"{params.total / 1e9:.2f}B x 2 B / engine TP {rollout_tp}"),
        Line("  overhead", engine_overhead_gib, "CUDA graphs, sampler (allowance)"),
        Line("  KV cache", kv_cache / GIB, f"{kv_tokens:,.0f} tokens at {kv_per_token / 1024:.1f} KiB/token"),
    ]
    if kv_tokens < s:
        problems.append(
            f"engine KV cache holds {kv_tokens:,.0f} tokens < one {s}-token sequence "
            f"(raise rollout.engine_options.gpu_memory_utilization or rollout.tensor_parallel_size)"
        )

    static = weights + grads + optim
    rollout_peak = static + reservation + reserved_gib * GIB
    work = max(acts + train_logits, lp_logits)
    train_peak = static + work + (0 if sleep else reservation) + reserved_gib * GIB
    cap = gpu_memory_gib * GIB
    phases = [
        Line("rollout phase", rollout_peak / GIB, f"training state + engine reservation + {reserved_gib} reserved"),
        Line("training phase", train_peak / GIB,
             "training state + activations/logits" + ("" if sleep else " + engine reservation (no sleep mode)")),
    ]
    for line, value in ((phases[0], rollout_peak), (phases[1], train_peak)):
        if value > cap:
            problems.append(f"{line.name}: {value / GIB:.1f} GiB > {gpu_memory_gib} GiB per GPU")
    summary = {"world": world_size, "tp": tp, "pp": pp, "cp": cp, "ep": ep, "dp": dp, "engine_tp": rollout_tp,
               "engines": world_size // rollout_tp if world_size % rollout_tp == 0 else "-",
               "params": f"{params.total / 1e9:.2f}B", "seq": s}
    return Plan(training, engine, phases, problems, summary)


def main(argv: list[str] | None = None) -> int:
    from dapo_megatron.config import load_config
    from dapo_megatron.models.hf_arch import arch_from_hf_config

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--nodes", type=int, required=True)
    ap.add_argument("--gpus-per-node", type=int, required=True)
    ap.add_argument("--gpu-memory-gib", type=float, required=True)
    ap.add_argument("--hf-config", help="config.json of the model (default: model.hf_dir/config.json)")
    ap.add_argument("--reserved-gib", type=float, default=3.0)
    ap.add_argument("--engine-overhead-gib", type=float, default=2.0)
    ap.add_argument("overrides", nargs="*", help="section.key=value")
    args = ap.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides, require_inputs=False)
        hf_config = Path(args.hf_config) if args.hf_config else Path(cfg.model.hf_dir, "config.json")
        if not hf_config.is_file():
            raise FileNotFoundError(f"no model config at {hf_config} (pass --hf-config FILE)")
        arch = arch_from_hf_config(hf_config)
        plan = memory_plan(cfg, arch, world_size=args.nodes * args.gpus_per_node,
                           gpus_per_node=args.gpus_per_node, gpu_memory_gib=args.gpu_memory_gib,
                           reserved_gib=args.reserved_gib, engine_overhead_gib=args.engine_overhead_gib)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(plan.render())
    return 2 if plan.problems else 0


if __name__ == "__main__":
    sys.exit(main())
