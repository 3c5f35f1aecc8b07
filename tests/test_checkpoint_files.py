"""Trainer checkpoint files: weights_only loading and faults that name the file.

Issue 20 items 4/5 (the per-file part): optimizer/trainer-state files are read with
``torch.load(weights_only=True)``; a truncated or corrupt file, a file holding pickled code, or a
file of another kind gives one ``ValueError`` line naming the file; a write that fails with
``ENOSPC`` raises ``OSError`` naming the path and leaves the previous checkpoint the newest
complete one (the ``*.tmp-*`` directory is ignored by ``latest_checkpoint``).
"""

from __future__ import annotations

import argparse
import errno

import pytest
import torch

from dapo_megatron import checkpointing
from dapo_megatron.trainer import checkpoint as ckpt


def _optimizer_file_state():
    """A real AdamW + LambdaLR state after one step (tensors, dicts, lists, scalars)."""
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(4, 3))
    opt = torch.optim.AdamW([p], lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    p.grad = torch.randn(4, 3)
    opt.step()
    sched.step()
    rng = {"cpu": torch.get_rng_state()}
    return {"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "rng": rng}


def test_roundtrip_weights_only(tmp_path):
    state = _optimizer_file_state()
    f = tmp_path / "rank_00000.pt"
    checkpointing.save_file(state, f)
    back = checkpointing.load_file(f, "optimizer state", ("optimizer", "scheduler", "rng"))
    exp_avg = state["optimizer"]["state"][0]["exp_avg"]
    assert torch.equal(back["optimizer"]["state"][0]["exp_avg"], exp_avg)
    assert torch.equal(back["rng"]["cpu"], state["rng"]["cpu"])
    assert back["scheduler"]["last_epoch"] == 1


@pytest.mark.parametrize("keep", [0, 10, 0.5])
def test_truncated_file_names_path(tmp_path, keep):
    f = tmp_path / "rank_00001.pt"
    torch.save(_optimizer_file_state(), f)
    data = f.read_bytes()
    n = int(len(data) * keep) if isinstance(keep, float) else keep
    f.write_bytes(data[:n])
    with pytest.raises(ValueError) as e:
        checkpointing.load_file(f, "optimizer state")
    msg = str(e.value)
    assert str(f) in msg and "optimizer state" in msg and "\n" not in msg


def test_corrupt_bytes_names_path(tmp_path):
    f = tmp_path / "rank_00000.pt"
    torch.save(_optimizer_file_state(), f)
    data = bytearray(f.read_bytes())
    start = data.find(b"data.pkl") + 64  # inside the pickled structure (tensor bytes carry no checksum)
    for i in range(start, start + 64):
        data[i] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=str(f)):
        checkpointing.load_file(f, "optimizer state")


def test_pickled_code_refused(tmp_path):
    f = tmp_path / "trainer_state.pt"
    torch.save({"step": 3, "obj": argparse.Namespace(x=1)}, f)  # outside the weights_only allow-list
    with pytest.raises(ValueError) as e:
        checkpointing.load_file(f, "trainer state")
    assert str(f) in str(e.value) and "\n" not in str(e.value)


def test_file_of_another_kind_names_field(tmp_path):
    f = tmp_path / "rank_00000.pt"
    torch.save({"model": torch.zeros(2)}, f)
    with pytest.raises(ValueError) as e:
        checkpointing.load_file(f, "optimizer state", ("optimizer", "scheduler", "rng"))
    msg = str(e.value)
    assert str(f) in msg and "optimizer" in msg and "scheduler" in msg and "rng" in msg


def test_enospc_write_names_path_and_keeps_previous(tmp_path, monkeypatch):
    save_dir = tmp_path / "checkpoints"
    prev = ckpt.step_dir(save_dir, 2)
    prev.mkdir(parents=True)
    tmp = save_dir / "step_000003.tmp-deadbeef" / "optimizer"
    tmp.mkdir(parents=True)
    real_save = torch.save

    def failing_save(obj, path, *a, **k):  # the writer dies midway: part of the file, then ENOSPC
        with open(path, "wb") as fh:
            fh.write(b"PK\x03\x04partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", failing_save)
    target = tmp / "rank_00000.pt"
    with pytest.raises(OSError) as e:
        checkpointing.save_file(_optimizer_file_state(), target)
    monkeypatch.setattr(torch, "save", real_save)
    assert e.value.errno == errno.ENOSPC
    assert str(target) in str(e.value)
    assert ckpt.latest_checkpoint(save_dir) == prev
    with pytest.raises(ValueError, match=str(target)):  # the partial file itself is refused by name
        checkpointing.load_file(target, "optimizer state")


def test_atomic_directory_renames_only_on_success(tmp_path):
    final = tmp_path / "out" / "step_000001"
    with checkpointing.atomic_directory(final) as tmp:
        assert checkpointing.is_temporary(tmp) and tmp.parent == final.parent
        (tmp / "a.pt").write_bytes(b"x")
    assert (final / "a.pt").read_bytes() == b"x"
    assert sorted(p.name for p in final.parent.iterdir()) == ["step_000001"]
    with pytest.raises(FileExistsError, match=str(final)):
        with checkpointing.atomic_directory(final):
            pass


def test_atomic_directory_failure_names_checkpoint_and_cleans_up(tmp_path, monkeypatch):
    final = tmp_path / "step_000002"

    def failing_save(obj, path, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(checkpointing.CheckpointWriteError) as e:
        with checkpointing.atomic_directory(final) as tmp:
            checkpointing.save_file({"x": 1}, tmp / "trainer_state.pt")
    assert e.value.errno == errno.ENOSPC
    assert str(final) in str(e.value) and "trainer_state.pt" in str(e.value) and "\n" not in str(e.value)
    assert list(tmp_path.iterdir()) == []  # neither the checkpoint nor its temporary directory
    with pytest.raises(KeyError):  # not a write failure: re-raised as it is, still cleaned up
        with checkpointing.atomic_directory(final):
            raise KeyError("bug")
    assert list(tmp_path.iterdir()) == []


def test_prune_keeps_last_k_and_removes_interrupted_saves(tmp_path):
    for step in (1, 2, 3, 4):
        ckpt.step_dir(tmp_path, step).mkdir()
    (tmp_path / "step_000003.tmp-0123abcd").mkdir()  # a save killed before its rename
    (tmp_path / "step_000009.tmp-0123abcd").mkdir()  # newer than any complete one: not touched
    (tmp_path / "notes").mkdir()
    removed = checkpointing.prune(tmp_path, ckpt.STEP_DIR, keep_last=2)
    assert sorted(p.name for p in removed) == ["step_000001", "step_000002", "step_000003.tmp-0123abcd"]
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == ["notes", "step_000003", "step_000004", "step_000009.tmp-0123abcd"]
    assert ckpt.latest_checkpoint(tmp_path) == ckpt.step_dir(tmp_path, 4)
    checkpointing.prune(tmp_path, ckpt.STEP_DIR, keep_last=0)  # 0 = keep every complete one
    assert ckpt.latest_checkpoint(tmp_path) == ckpt.step_dir(tmp_path, 4)
    assert len(checkpointing.complete_checkpoints(tmp_path, ckpt.STEP_DIR)) == 2
