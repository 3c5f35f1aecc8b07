"""Trainer checkpoints with the optimizer in Megatron's dist checkpoint: exact resume, resharding
resume, the distributed optimizer on CPU/gloo, faults while writing and reading.

Each case trains a tiny Qwen2 (tied embeddings, qkv bias) with real DAPO updates: two optimizer
steps, save, a third step. A fresh model is then built at the same or another layout, loads the
checkpoint, and takes the third step. Compared, gathered independently of the checkpoint code
(see ``tests/_ckpt_ranks.py``) and by HF parameter name:

* same layout: weights, Adam moments and the third step's weights bitwise equal (exact resume);
* another layout (TP2 -> TP1xDP2, TP2xPP2 -> TP1, DP2 -> DP1, TP2xDP2 -> TP1; plain and
  distributed optimizer): weights and Adam moments (exp_avg, exp_avg_sq) within 1e-7 of the
  saved ones, learning-rate schedule position equal, and the third step within the layout-parity
  tolerance of tests/test_train_step_parity.py (1e-5).

Faults: ENOSPC injected into the dist-checkpoint writer of one rank of a 2-rank save; a truncated
and a corrupted optimizer shard.
"""

from __future__ import annotations

import errno
import shutil
from pathlib import Path

import pytest

from tests._ckpt_ranks import load_cases_and_errors, optimizer_item, save_and_load
from tests.helpers.distributed import run_on_ranks
from tests.test_train_step_parity import OPT, make_batch

ARCH = "qwen2-tied"
MOMENT_TOL = 1e-7  # reloaded vs saved Adam moments and weights, resharded (fp32)
STEP_TOL = 1e-5  # the step after a resharded resume vs the uninterrupted one (layout parity)

pytestmark = pytest.mark.distributed

# Checkpoints: name -> (layout, distributed optimizer); DP is what the world leaves.
WORLD2_SAVES = [("plain_TP2", "TP2", False), ("dist_DP2", "DP2", True), ("dist_TP2", "TP2", True)]
WORLD4_SAVES = [("plain_TP2xPP2", "TP2xPP2", False), ("dist_TP2xDP2", "TP2xDP2", True)]
# Reloads: "<checkpoint>@<layout>" -> (layout, distributed optimizer), by the world they run in.
WORLD2_LOADS = {
    "plain_TP2@TP2": ("TP2", False),
    "dist_DP2@DP2": ("DP2", True),
    "plain_TP2@TP1xDP2": ("TP1xDP2", False),
    "dist_TP2@TP1xDP2": ("TP1xDP2", True),
}
WORLD4_LOADS = {
    "plain_TP2xPP2@TP2xPP2": ("TP2xPP2", False),
    "dist_TP2xDP2@TP2xDP2": ("TP2xDP2", True),
}
WORLD1_LOADS = {
    "plain_TP2xPP2@TP1": ("TP1", False),
    "dist_DP2@DP1": ("TP1", True),
    "dist_TP2xDP2@TP1": ("TP1", True),
}
SAME_LAYOUT = ["plain_TP2@TP2", "dist_DP2@DP2", "plain_TP2xPP2@TP2xPP2", "dist_TP2xDP2@TP2xDP2"]
OTHER_LAYOUT = [n for n in {**WORLD2_LOADS, **WORLD1_LOADS} if n not in SAME_LAYOUT]


def _cases(loads: dict) -> list:
    return [(name, name.split("@")[0], spec, distopt) for name, (spec, distopt) in loads.items()]


def _max_diff(a: dict, b: dict) -> float:
    assert sorted(a) == sorted(b), "parameter names differ"
    return max((a[k] - b[k]).abs().max().item() for k in a)


def _break_copies(root: Path) -> dict[str, str]:
    """Copies of the plain_TP2 checkpoint with one optimizer shard truncated / corrupted."""
    src = root / "plain_TP2" / "step_000002"
    out = {}
    for how in ("truncated", "corrupt"):
        dst = root / f"broken_{how}" / "step_000002"
        shutil.copytree(src, dst)
        path, offset, length, _ = optimizer_item(dst)
        data = bytearray(path.read_bytes())
        if how == "truncated":
            del data[offset + length // 2 :]
        else:  # inside the pickled header of that tensor item (tensor bytes carry no checksum)
            start = data.find(b"data.pkl", offset) + 64
            for i in range(start, start + 64):
                data[i] ^= 0xFF
        path.write_bytes(bytes(data))
        out[how] = str(dst)
    out["other optimizer"] = str(root / "dist_DP2" / "step_000002")  # loaded with the plain one
    return out


@pytest.fixture(scope="module")
def runs(tiny_hf_dirs, tmp_path_factory):
    """Checkpoints written at world 2 and 4, with their reloads at that world size and the ENOSPC
    case; then one 1-rank launch reloads them at TP1/DP1 and tries the broken copies."""
    hf_dir = tiny_hf_dirs[ARCH]
    root = tmp_path_factory.mktemp("resume")
    batch = make_batch(hf_dir)
    w2 = run_on_ranks(
        save_and_load, 2, hf_dir, batch, OPT, str(root), WORLD2_SAVES, _cases(WORLD2_LOADS), 1, timeout=900
    )[0]
    w4 = run_on_ranks(
        save_and_load, 4, hf_dir, batch, OPT, str(root), WORLD4_SAVES, _cases(WORLD4_LOADS), timeout=900
    )[0]
    broken = _break_copies(root)
    model_only = str(root / "plain_TP2xPP2" / "step_000002")
    w1, errors, model_weights = run_on_ranks(
        load_cases_and_errors,
        1,
        hf_dir,
        batch,
        OPT,
        str(root),
        _cases(WORLD1_LOADS),
        broken,
        model_only,
        timeout=900,
    )[0]
    return {
        "root": root,
        "saved": {**w2["saved"], **w4["saved"]},
        "loaded": {**w2["loaded"], **w4["loaded"], **w1},
        "fault": w2["fault"],
        "broken": broken,
        "errors": errors,
        "model_weights": model_weights,
    }


def _check(runs, name, exact):
    saved, got = runs["saved"][name.split("@")[0]], runs["loaded"][name]
    assert got["state"] == {"step": 2, "collector": {"cursor": 7}}, name
    assert got["loaded"]["scheduler_steps"] == saved["saved"]["scheduler_steps"] == 2, name
    assert got["loaded"]["lr"] == saved["saved"]["lr"], name
    keys = ("weights", "exp_avg", "exp_avg_sq")
    diffs = {k: _max_diff(saved["saved"][k], got["loaded"][k]) for k in keys}
    step = _max_diff(saved["next"]["weights"], got["next"]["weights"])
    print(f"{name}: max |reloaded - saved| {diffs}; third step {step:.2e}")
    assert all(d <= (0.0 if exact else MOMENT_TOL) for d in diffs.values()), (name, diffs)
    assert step <= (0.0 if exact else STEP_TOL), (name, step)
    # Can it fail: two Adam steps made the moments non-zero, and the third step moved the weights.
    assert min(v.abs().max().item() for v in saved["saved"]["exp_avg_sq"].values()) > 0
    assert _max_diff(saved["saved"]["weights"], saved["next"]["weights"]) > 10 * STEP_TOL


@pytest.mark.parametrize("name", SAME_LAYOUT)
def test_resume_at_the_same_layout_is_exact(runs, name):
    _check(runs, name, exact=True)


@pytest.mark.parametrize("name", OTHER_LAYOUT)
def test_resume_at_another_layout_keeps_weights_and_adam_moments(runs, name):
    _check(runs, name, exact=False)


def test_trainer_checkpoint_loads_as_a_model_checkpoint(runs):
    """``model.megatron_checkpoint`` / the conversion tools read a trainer checkpoint (written at
    TP2xPP2, holding the optimizer too) as a model checkpoint at TP1."""
    assert _max_diff(runs["saved"]["plain_TP2xPP2"]["saved"]["weights"], runs["model_weights"]) <= MOMENT_TOL


def test_enospc_in_one_writer_keeps_the_previous_checkpoint(runs):
    """Rank 1's dist-checkpoint writer process fails with ENOSPC after writing part of its data
    file, during a real 2-rank save of step 3 (TP2, distributed optimizer)."""
    fault = runs["fault"]
    for rank, r in enumerate(fault["ranks"]):
        assert r["error"] is not None, f"rank {rank} did not raise"
        kind, code, msg = r["error"]
        print(f"rank {rank}: {kind}: {msg}")
        assert kind == "CheckpointWriteError" and code == errno.ENOSPC, r["error"]
        assert "step_000003" in msg and "on rank 1" in msg and ".distcp" in msg, msg
        assert "\n" not in msg
        assert r["left"] == ["step_000002"], r["left"]  # no step_000003, no temporary left behind
        assert r["latest"] == "step_000002" and r["step"] == 2
    for k in ("weights", "exp_avg", "exp_avg_sq"):
        assert _max_diff(fault["saved"][k], fault["reloaded"][k]) == 0.0, k


@pytest.mark.parametrize("how", ["truncated", "corrupt"])
def test_broken_optimizer_shard_is_one_line_naming_the_file(runs, how):
    path, _, _, key = optimizer_item(runs["broken"][how])
    err = runs["errors"][how]
    print(err)
    assert err is not None and err.startswith("CheckpointError: ") and "\n" not in err, err
    assert str(path) in err, err
    if how == "corrupt":
        assert key in err, err  # the failed load is traced to the tensor item


def test_checkpoint_of_the_other_optimizer_kind_names_the_setting(runs):
    err = runs["errors"]["other optimizer"]
    assert err is not None and err.startswith("CheckpointError: ") and "\n" not in err, err
    assert "trainer_state.pt" in err and "optimizer.use_distributed_optimizer=true" in err, err


def test_truncated_shard_is_caught_before_loading(runs):
    from dapo_megatron.conversion.checkpoint import CheckpointError, validate_checkpoint

    path = optimizer_item(runs["broken"]["truncated"])[0]
    with pytest.raises(CheckpointError, match="truncated") as e:
        validate_checkpoint(runs["broken"]["truncated"])
    assert str(path) in str(e.value)
