"""Qwen3-MoE checkpoint conversion: HF -> Megatron (streamed, CLI with --ep) -> load resharded at EP2
and TP2xEP2 -> HF, bit for bit; logits equal transformers' (fp32, 1e-4) after each load.

References: the original safetensors tensors (bitwise) and ``transformers`` logits of the original
HF directory. The checkpoint stores every expert under one global key, so it is written once and
loaded at EP sizes it was not written at.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dapo_megatron.conversion.convert import convert_megatron_to_hf
from dapo_megatron.verify import verify

REPO = Path(__file__).resolve().parents[1]
TOL = 1e-4
pytestmark = pytest.mark.distributed


def _run_cli(tool, *args, timeout=600):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run(
        [sys.executable, str(REPO / "tools" / f"{tool}.py"), *map(str, args)],
        capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO,
    )  # fmt: skip


@pytest.fixture(scope="module")
def converted(tiny_moe_dirs, tmp_path_factory):
    out = tmp_path_factory.mktemp("moe_conv") / "ckpt"
    hf = tiny_moe_dirs["qwen3_moe"]
    res = _run_cli("convert_hf_to_megatron", "--hf-dir", hf, "--output", out, "--tp", 2, "--ep", 2, "--no-progress")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "TP2xPP1xEP2" in res.stdout
    return hf, out


def test_cli_verify_at_ep2(converted):
    hf, ckpt = converted
    res = _run_cli("verify_conversion", "--hf-dir", hf, "--megatron-dir", ckpt, "--ep", 2)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "TP1xPP1xDP2xEP2" in res.stdout and "0 differ, 0 missing" in res.stdout, res.stdout


def test_reshard_tp2xep2_and_export_bitwise(converted, tmp_path):
    hf, ckpt = converted
    result = verify(hf, megatron_dir=ckpt, tp=2, ep=2, tolerance=TOL, timeout=600)
    print(f"{result.layout}: max |logit diff| = {result.max_abs_logit_diff:.2e}")
    assert result.ok, result.problems
    assert result.tensors["compared"] == len(load_file(f"{hf}/model.safetensors"))

    out = tmp_path / "hf_back"
    convert_megatron_to_hf(ckpt, out, progress=False, in_process=True)
    ref = load_file(f"{hf}/model.safetensors")
    got = {}
    for f in sorted(out.glob("*.safetensors")):
        got.update(load_file(f))
    assert sorted(got) == sorted(ref)
    for name, t in ref.items():
        assert got[name].dtype == t.dtype and torch.equal(got[name], t), name


def test_ep_that_does_not_divide_experts_is_rejected(tiny_moe_dirs, tmp_path):
    res = _run_cli(
        "convert_hf_to_megatron", "--hf-dir", tiny_moe_dirs["qwen3_moe"], "--output", tmp_path / "x", "--ep", 3
    )
    assert res.returncode != 0
    assert "expert_model_parallel_size=3 must divide num_experts=4" in res.stdout + res.stderr
