"""The ablation tool: arms table, aggregation against hand-computed values, resume, one tiny run."""

import json
import math

import pytest

from dapo_megatron import ablate
from dapo_megatron.ablate import (
    ARMS,
    Arm,
    aggregate,
    arm_overrides,
    pending_runs,
    run_dir,
    run_summary,
    select_arms,
)


def test_arm_overrides_chain_parents_first():
    arms = {
        "a": Arm("a", None, ("x=1", "y=1")),
        "b": Arm("b", "a", ("y=2",)),
        "c": Arm("c", "b", ("z=3",)),
    }
    assert arm_overrides("c", arms) == ["x=1", "y=1", "y=2", "z=3"]
    with pytest.raises(ValueError, match="unknown arm 'd'"):
        arm_overrides("d", arms)
    assert select_arms("c,a", arms) == ["c", "a"]
    with pytest.raises(ValueError, match="unknown arm"):
        select_arms("a,nope", arms)


def test_table_arms_are_valid_configs():
    """Every arm's overrides load on the ablation config; the chain ends at the DAPO base."""
    from dapo_megatron.config import load_config

    base = load_config("examples/ablation_cpu.yaml", require_inputs=False)
    for name in ARMS:
        cfg = load_config("examples/ablation_cpu.yaml", arm_overrides(name), require_inputs=False)
        if name == "grpo":
            a = cfg.algorithm
            assert (a.loss_agg_mode, a.clip_ratio_high, a.kl_coef, a.use_kl_loss) == (
                "seq-mean-token-mean", 0.2, 0.001, True
            )
            assert not a.dynamic_sampling and not a.overlong_buffer_enable
            assert cfg.trainer.gen_batch_size == cfg.trainer.train_batch_size
        if name == "dapo":
            assert cfg.algorithm == base.algorithm, "the dapo arm must be the base config"


def _rows(vals, entropies, clip_high, per_step_generated=10.0):
    """Metrics rows: validation at steps 0, 2, 4 (vals), training steps 1..4."""
    rows = [{"step": 0, "val/acc_avg@4": vals[0]}]
    for step in range(1, 5):
        r = {
            "step": step,
            "rollout/generated_responses": per_step_generated,
            "entropy": entropies[step - 1],
            "pg_clipfrac_low": 0.0,
            "pg_clipfrac_high": clip_high[step - 1],
            "response_length/mean": 5.0 + step,
            "response_length/clip_ratio": 0.1,
            "rollout/responses_per_kept_group": 8.0 * step,
        }
        if step % 2 == 0:
            r["val/acc_avg@4"] = vals[step // 2]
        rows.append(r)
    return rows


def test_run_summary_and_aggregation_hand_computed():
    r1 = run_summary(_rows([0.2, 0.5, 0.4], [1.0, 0.9, 0.8, 0.7], [0.1, 0.2, 0.3, 0.4]), target=0.45)
    assert r1["val"] == [(0, 0.2, 0.0), (2, 0.5, 20.0), (4, 0.4, 40.0)]
    assert (r1["final_val"], r1["best_val"], r1["final_entropy"]) == (0.4, 0.5, 0.7)
    assert r1["samples_to_target"] == 20.0  # first reached at step 2, after 2 x 10 responses
    assert r1["clipfrac_high"] == pytest.approx(0.25)
    assert r1["gain"] == pytest.approx(0.4 - 0.2)  # final minus step 0
    assert r1["responses_per_group"] == pytest.approx(8.0 * (1 + 2 + 3 + 4) / 4)
    rows = _rows([0.2, 0.5, 0.4], [1.0, 0.9, 0.8, 0.7], [0.1, 0.2, 0.3, 0.4])
    assert run_summary([rows[0], *rows], target=0.45)["val"] == r1["val"]  # a repeated step counts once
    r2 = run_summary(_rows([0.2, 0.3, 0.6], [1.0, 1.0, 1.0, 0.5], [0.0] * 4, 30.0), target=0.45)
    assert r2["samples_to_target"] == 120.0
    r3 = run_summary(_rows([0.2, 0.3, 0.3], [1.0] * 4, [0.0] * 4), target=0.45)
    assert r3["samples_to_target"] is None
    agg = aggregate({"arm": [r1, r2, r3]})["arm"]
    m, s = agg["final_val"]
    assert m == pytest.approx((0.4 + 0.6 + 0.3) / 3)
    assert s == pytest.approx(math.sqrt(((0.4 - m) ** 2 + (0.6 - m) ** 2 + (0.3 - m) ** 2) / 2))
    assert agg["samples_to_target"] == (pytest.approx(70.0), pytest.approx(math.sqrt(2 * 50.0**2)))
    assert agg["reached"] == 2 and agg["seeds"] == 3
    assert agg["final_entropy"][0] == pytest.approx((0.7 + 0.5 + 1.0) / 3)
    table = ablate.markdown_table({"arm": agg}, target=0.45)
    assert "0.433 ± 0.153" in table and "(2/3 reached 0.45)" in table
    assert f"| {agg['gain'][0]:+.3f} ± {agg['gain'][1]:.3f} |" in table  # signed mean, unsigned spread


def test_plot_panels_split_chain_and_beyond_with_dapo_in_each():
    summaries = {a: [] for a in ("grpo", "dapo", "dapo+overlong_filter", "dapo+clip_cov", "dapo+kl_cov")}
    panels = dict(ablate.plot_panels(summaries))
    assert list(panels.values()) == [
        ["grpo", "dapo", "dapo+overlong_filter"],
        ["dapo", "dapo+clip_cov", "dapo+kl_cov"],
    ]
    assert [a for a, arm in ablate.ARMS.items() if arm.group == "beyond"] == [
        "dapo+entropy_top_rho", "dapo+clip_cov", "dapo+kl_cov", "dapo+adaptive_clip", "dapo+prompt_skipping",
    ]  # fmt: skip


def test_pending_runs_skip_finished(tmp_path):
    (run_dir(tmp_path, "dapo", 2)).mkdir(parents=True)
    (run_dir(tmp_path, "dapo", 2) / "done.json").write_text("{}")
    (run_dir(tmp_path, "grpo", 1)).mkdir(parents=True)  # started, not finished: resumed
    assert pending_runs(tmp_path, ["grpo", "dapo"], [1, 2]) == [("grpo", 1), ("dapo", 1), ("grpo", 2)]


@pytest.mark.distributed
def test_ablate_one_arm_two_steps_then_resume_skips(tmp_path):
    """The real tool on 1 arm x 1 seed x 2 steps (a barely warm-started model); a second call
    launches nothing (the run's log is not touched) and rewrites the same table."""
    from dapo_megatron.demo.multistep import make_multistep_model, write_multistep_dataset

    model = make_multistep_model(tmp_path / "model", steps=5, num_train=32)
    data = write_multistep_dataset(tmp_path / "data", num_train=32, num_val=4)
    out = tmp_path / "abl"
    args = [
        "--config", "examples/ablation_cpu.yaml", "--seeds", "1", "--arms", "grpo", "--out", str(out),
        f"model.hf_dir={model}", f"data.train_files=[{data['train']}]", f"data.val_files=[{data['val']}]",
        "trainer.total_steps=2", "trainer.train_batch_size=2",
        "trainer.ppo_mini_batch_size=2", "rollout.n=4", "rollout.val_n=2", "rollout.max_response_length=12",
        "trainer.val_every=2", "trainer.save_every=1", "trainer.val_before_train=false",
    ]  # fmt: skip
    assert ablate.main(args) == 0
    d = run_dir(out, "grpo", 1)
    assert (d / "done.json").is_file(), (d / "train.log").read_text()[-3000:]
    rows = [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert rows[1]["ref_kl/mean"] >= 0  # the KL arm built and used its reference policy
    md = (out / "ablation.md").read_text()
    assert "`grpo` | 1 |" in md
    assert all((out / p).is_file() for p in ("val_acc_vs_step.png", "entropy_vs_step.png"))
    log_size = (d / "train.log").stat().st_size
    assert ablate.main(args) == 0
    assert (d / "train.log").stat().st_size == log_size, "a finished run was launched again"
    assert (out / "ablation.md").read_text() == md
