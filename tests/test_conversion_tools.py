"""HF <-> Megatron checkpoint conversion: bitwise round trip, resharding on load, CLIs, bad input.

References are independent of the code under test: the original safetensors tensors (bitwise) and
``transformers`` logits of the original HF directory (fp32, tolerance 1e-4 over valid positions).
A checkpoint is written once at TP2xPP2 and loaded at TP1, PP2 and TP4.
"""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dapo_megatron.conversion.checkpoint import CheckpointError, validate_checkpoint
from dapo_megatron.conversion.hf_io import HFCheckpointReader
from dapo_megatron.parallel.launch import launch
from dapo_megatron.verify import make_batch
from tests import _conversion_ranks as ranks
from tests.helpers.distributed import run_on_ranks

REPO = Path(__file__).resolve().parents[1]
TOL = 1e-4
pytestmark = pytest.mark.distributed


def _tool(name):
    spec = importlib.util.spec_from_file_location(name, REPO / "tools" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _run_cli(tool, *args, timeout=300):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run(
        [sys.executable, str(REPO / "tools" / f"{tool}.py"), *map(str, args)],
        capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO,
    )  # fmt: skip


def _hf_state(d):
    r = HFCheckpointReader(d)
    return {n: r.get(n) for n in r.names()}


def _assert_bitwise(got: dict, ref: dict, what: str):
    assert sorted(got) == sorted(ref), f"{what}: tensor names differ"
    for name, t in ref.items():
        g = got[name]
        assert g.dtype == t.dtype and g.shape == t.shape, f"{what}: {name} dtype/shape"
        assert torch.equal(g, t), f"{what}: {name} differs"


def _leftovers(parent: Path, stem: str):
    return [p.name for p in parent.iterdir() if p.name.startswith(stem)]


@pytest.fixture(scope="module")
def work(tiny_hf_dirs, tmp_path_factory):
    """HF dirs (4 tiny + a 4-KV-head qwen2 for TP4), all converted once at TP2xPP2, and the
    transformers reference logits."""
    from transformers import AutoModelForCausalLM

    from dapo_megatron.conversion.convert import convert_hf_to_megatron_many
    from tests.helpers.tiny_models import tiny_hf_config

    root = tmp_path_factory.mktemp("conv")
    hf = dict(tiny_hf_dirs)
    cfg = tiny_hf_config("qwen2")
    cfg.num_key_value_heads = 4
    torch.manual_seed(7)
    m = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        for name, p in m.named_parameters():
            p.uniform_(0.8, 1.2) if "norm" in name else p.normal_(0.0, 0.08)
    m.save_pretrained(root / "qwen2-kv4")
    hf["qwen2-kv4"] = str(root / "qwen2-kv4")

    ckpt = {a: root / f"{a}.mcore" for a in hf}
    convert_hf_to_megatron_many([(hf[a], ckpt[a]) for a in hf], tp=2, pp=2, timeout=600)
    ids, mask = make_batch(1003)
    ref = {}
    for a, d in hf.items():
        model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
        with torch.no_grad():
            ref[a] = model(input_ids=ids, attention_mask=mask).logits
    return {"root": root, "hf": hf, "ckpt": ckpt, "ids": ids, "mask": mask, "ref": ref}


def _assert_logits(got, ref, mask, what):
    for i in range(mask.shape[0]):
        n = int(mask[i].sum())
        diff = (got[i, :n] - ref[i, :n]).abs().max().item()
        assert diff <= TOL, f"{what}: sequence {i} max |logit diff| {diff:.2e} > {TOL}"


def test_checkpoint_metadata(work):
    for a, ckpt in work["ckpt"].items():
        path, meta = validate_checkpoint(ckpt)
        assert meta.written_layout == {"tp": 2, "pp": 2, "ep": 1} and meta.dtype == "fp32"
        assert meta.padded_vocab_size == 1024 and meta.arch["vocab_size"] == 1003
        assert meta.hf_config == json.loads(Path(work["hf"][a], "config.json").read_text())
        assert "model.safetensors" in meta.source_files and len(meta.source_files["model.safetensors"]) == 64
        assert "generation_config.json" in meta.hf_files
        assert not _leftovers(ckpt.parent, ckpt.name + ".tmp")


def test_roundtrip_bitwise_and_reshard(work):
    """TP2xPP2 checkpoint -> HF (bitwise, loadable without key warnings) and -> logits at TP1, PP2, TP4."""
    from transformers import AutoModelForCausalLM

    root, ids, mask, ref = work["root"], work["ids"], work["mask"], work["ref"]
    tiny = ["llama", "qwen2", "qwen2-tied", "qwen3"]
    jobs = [(str(work["ckpt"][a]), str(root / f"{a}.hf")) for a in tiny]
    tp1 = run_on_ranks(ranks.export_and_logits, 1, jobs, 300_000, ids, timeout=600)[0]

    for a in tiny:
        out = root / f"{a}.hf"
        _assert_bitwise(_hf_state(out), load_file(Path(work["hf"][a], "model.safetensors")), a)
        index = json.loads((out / "model.safetensors.index.json").read_text())
        assert len(set(index["weight_map"].values())) > 1, "expected several shards at 300 kB"
        assert (out / "generation_config.json").exists()
        model, info = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, output_loading_info=True)
        assert not any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), (a, info)
        _assert_logits(tp1[str(work["ckpt"][a])], ref[a], mask, f"{a} TP1")

    pp2_ckpts = {a: str(work["ckpt"][a]) for a in ("llama", "qwen2-tied")}
    trainer = root / "trainer_step_1"
    pp2 = {}
    # launch(), not run_on_ranks(): dist_checkpointing.save starts a Manager, which daemonic ranks cannot.
    for r in launch(
        ranks.logits_from_checkpoints,
        2,
        pp2_ckpts,
        1,
        2,
        ids,
        {"qwen2-tied": str(trainer / "model")},
        timeout=600,
    ):
        pp2.update(r)
    for a in pp2_ckpts:
        _assert_logits(pp2[a], ref[a], mask, f"{a} PP2")
        torch.testing.assert_close(pp2[a], tp1[str(work["ckpt"][a])], rtol=0, atol=1e-5)

    tp4 = run_on_ranks(
        ranks.logits_from_checkpoints,
        4,
        {"qwen2-kv4": str(work["ckpt"]["qwen2-kv4"])},
        4,
        1,
        ids,
        timeout=600,
    )
    got = next(r for r in tp4 if r)["qwen2-kv4"]
    _assert_logits(got, ref["qwen2-kv4"], mask, "qwen2-kv4 TP4")

    # The trainer-saved checkpoint (model/ + optimizer state) exports through the CLI.
    (trainer / "optimizer").mkdir()
    (trainer / "optimizer" / "state.pt").write_bytes(b"not a model")
    res = _run_cli(
        "convert_megatron_to_hf", "--megatron-dir", trainer, "--output", root / "trainer.hf", "--no-progress"
    )
    assert res.returncode == 0, res.stderr
    _assert_bitwise(
        _hf_state(root / "trainer.hf"),
        load_file(Path(work["hf"]["qwen2-tied"], "model.safetensors")),
        "trainer",
    )


def test_cli_convert_and_verify(work, tmp_path):
    hf = work["hf"]["qwen3"]
    out = tmp_path / "q3.mcore"
    res = _run_cli("convert_hf_to_megatron", "--hf-dir", hf, "--output", out, "--tp", 2)
    assert res.returncode == 0, res.stderr
    res = _run_cli("verify_conversion", "--hf-dir", hf, "--megatron-dir", out, "--pp", 2)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "TP1xPP2xDP1: max |logit diff|" in res.stdout and "0 differ, 0 missing" in res.stdout
    # Same architecture, different weights: tensors differ and logits are off -> exit 1.
    from tests.helpers.tiny_models import make_tiny_hf_model

    make_tiny_hf_model("qwen3", tmp_path / "other", seed=99)
    res = _run_cli("verify_conversion", "--hf-dir", tmp_path / "other", "--megatron-dir", out)
    assert res.returncode == 1, res.stdout + res.stderr
    assert "FAIL: tensor 'model.embed_tokens.weight'" in res.stdout


def _bad_hf_dirs(src: str, root: Path) -> dict[str, tuple[Path, str]]:
    """{case: (hf dir, text the error must contain)}."""
    from transformers import AutoModelForCausalLM

    cases = {}
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    sharded = root / "missing_shard"
    model.save_pretrained(sharded, max_shard_size="300KB")
    shards = sorted(sharded.glob("model-*.safetensors"))
    assert len(shards) > 1
    shards[-1].unlink()
    cases["missing shard"] = (sharded, shards[-1].name)

    trunc = root / "truncated"
    shutil.copytree(src, trunc)
    f = trunc / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-1000])
    cases["truncated"] = (trunc, str(f))

    shape = root / "shape"
    shutil.copytree(src, shape)
    cfg = json.loads((shape / "config.json").read_text())
    cfg["intermediate_size"] += 32
    (shape / "config.json").write_text(json.dumps(cfg))
    cases["shape mismatch"] = (shape, "model.layers.0.mlp.gate_proj.weight")

    arch = root / "arch"
    shutil.copytree(src, arch)
    cfg = json.loads((arch / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    (arch / "config.json").write_text(json.dumps(cfg))
    cases["unsupported architecture"] = (arch, "gpt2")
    return cases


def test_bad_hf_input(work, tmp_path, capsys):
    tool = _tool("convert_hf_to_megatron")
    for case, (hf_dir, needle) in _bad_hf_dirs(work["hf"]["llama"], tmp_path).items():
        out = tmp_path / f"out_{case.replace(' ', '_')}"
        with pytest.raises(SystemExit) as exit_info:
            tool.main(["--hf-dir", str(hf_dir), "--output", str(out)])
        assert exit_info.value.code == 2, case
        err = capsys.readouterr().err
        assert needle in err, f"{case}: {err!r} does not name {needle!r}"
        assert not _leftovers(tmp_path, out.name), f"{case}: output left behind"
    # One real subprocess: the message reaches stderr and the exit status is non-zero.
    existing = tmp_path / "exists"
    existing.mkdir()
    res = _run_cli("convert_hf_to_megatron", "--hf-dir", work["hf"]["llama"], "--output", existing)
    assert res.returncode == 2 and "already exists" in res.stderr and str(existing) in res.stderr


def test_bad_megatron_checkpoints(work, tmp_path, capsys):
    src = work["ckpt"]["llama"]
    tool = _tool("convert_megatron_to_hf")

    def broken(name, damage):
        d = tmp_path / name
        shutil.copytree(src, d)
        return d, damage(d)

    def no_meta(d):
        (d / "dapo_metadata.json").unlink()
        return "dapo_metadata.json"

    def no_distcp(d):
        f = sorted(d.glob("*.distcp"))[0]
        f.unlink()
        return f.name

    def short_distcp(d):
        f = sorted(d.glob("*.distcp"))[-1]
        f.write_bytes(f.read_bytes()[:100])
        return f"{f.name} is truncated"

    def no_index(d):
        (d / ".metadata").unlink()
        return ".metadata"

    for name, damage in [
        ("no_meta", no_meta),
        ("no_distcp", no_distcp),
        ("short", short_distcp),
        ("no_index", no_index),
    ]:
        d, needle = broken(name, damage)
        with pytest.raises(CheckpointError, match=needle.replace(".", r"\.")):
            validate_checkpoint(d)
        out = tmp_path / f"{name}.hf"
        with pytest.raises(SystemExit) as exit_info:
            tool.main(["--megatron-dir", str(d), "--output", str(out), "--no-progress"])
        assert exit_info.value.code == 2
        assert needle in capsys.readouterr().err
        assert not _leftovers(tmp_path, out.name)
    with pytest.raises(SystemExit) as exit_info:
        tool.main(["--megatron-dir", str(tmp_path / "nope"), "--output", str(tmp_path / "x")])
    assert exit_info.value.code == 2
    assert "does not exist" in capsys.readouterr().err
