"""Rank function for tests/test_engine_death.py: two vLLM engines (DP2), one engine core SIGKILLed."""

from __future__ import annotations

import os
import signal
import threading
import time

from tests._rollout_scale_ranks import demo_config


def _engine_core_pid(engine) -> int:
    import psutil

    (pid,) = [p for p in engine.engine_pids if psutil.Process(p).name() == "VLLM::EngineCore"]
    return pid


def _attempt(fn) -> dict:
    """Run ``fn``; the EngineError it raises (message, when) or a note that it did not raise."""
    from dapo_megatron.trainer.rollout import EngineError

    try:
        fn()
    except EngineError as err:
        return {"error": str(err), "at": time.time()}
    return {"error": None, "at": time.time()}


def kill_engines(rank, world_size, demo_root, model_dir):
    """Two scenarios on one pair of vLLM engines (each engine core in its own process):

    1. weight sync: rank 0 SIGKILLs its engine core, then both ranks push the model's weights;
    2. generate: rank 0's dead vLLM engine is replaced by an HF engine (a healthy engine 0); rank 1
       SIGSTOPs its engine core, starts a rollout collection (its generate blocks: the core does
       not answer) and a timer SIGKILLs the core 2 s later, so the kill lands mid-call.

    Returns per rank the EngineError message and time of each scenario, and the kill time."""
    import torch.distributed as dist
    from safetensors.torch import load_file

    from dapo_megatron.parallel.groups import initialize_parallel
    from dapo_megatron.parallel.layout import EnginePlacement, ParallelLayout
    from dapo_megatron.rollout import create_engine
    from dapo_megatron.trainer.rollout import build_collector

    cfg = demo_config(
        demo_root, f"model.hf_dir={model_dir}", "rollout.engine=vllm", "parallel.tensor_model_parallel_size=1"
    )
    groups = initialize_parallel(ParallelLayout(tp=1), seed=cfg.trainer.seed)
    placement = EnginePlacement(dist.get_world_size(), cfg.rollout_tensor_parallel_size)
    collector, _ = build_collector(cfg, placement, groups)
    out = {"rank": rank, "engine_processes": collector.engine.engine_pids}
    weights = load_file(f"{model_dir}/model.safetensors")
    try:
        dist.barrier()  # both engines up
        if rank == 0:
            os.kill(_engine_core_pid(collector.engine), signal.SIGKILL)
            out["killed_at"] = time.time()
        out["weight_sync"] = _attempt(lambda: collector.update_engine_weights(weights.items()))

        if rank == 0:
            collector.engine.close()
            collector.engine = create_engine("hf", model_dir, dtype="float32", seed=cfg.trainer.seed)
        else:
            core = _engine_core_pid(collector.engine)
            os.kill(core, signal.SIGSTOP)

            def kill_later():
                time.sleep(2.0)
                out["killed_at"] = time.time()
                os.kill(core, signal.SIGKILL)

            threading.Thread(target=kill_later, daemon=True).start()
        dist.barrier()
        out["generate"] = _attempt(collector.collect)
    finally:
        collector.reward_pool.close()
        collector.engine.close()
    return out
