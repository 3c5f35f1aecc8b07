"""Config: presets, YAML + override precedence, validation messages, round trip."""

from __future__ import annotations

import dataclasses
import re

import pytest
import yaml

from dapo_megatron.config import (
    PRESETS,
    AlgorithmConfig,
    DapoConfig,
    ParallelConfig,
    RolloutConfig,
    TrainerConfig,
    config_field_docs,
    config_from_argv,
    config_from_dict,
    config_to_dict,
    load_config,
    save_config,
)

REQUIRED = ["model.hf_dir=/models/x", "data.train_files=[a.parquet]"]


def write_yaml(tmp_path, data, name="cfg.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


def test_dapo_preset_paper_values():
    cfg = load_config(None, REQUIRED, preset="dapo")
    a, r, o, t = cfg.algorithm, cfg.rollout, cfg.optimizer, cfg.trainer
    assert (a.clip_ratio_low, a.clip_ratio_high) == (0.2, 0.28)
    assert a.loss_agg_mode == "token-mean"
    assert a.dynamic_sampling is True
    assert (a.overlong_buffer_enable, a.overlong_buffer_len, a.overlong_buffer_penalty_factor) == (
        True,
        4096,
        1.0,
    )
    assert r.max_response_length == 20480
    assert a.overlong_filter is False
    assert a.kl_coef == 0.0 and a.use_kl_loss is False and a.entropy_coef == 0.0
    assert (o.lr, o.lr_schedule, o.lr_warmup_steps, o.weight_decay, o.clip_grad) == (
        1e-6,
        "constant",
        20,
        0.1,
        1.0,
    )
    assert (r.n, r.temperature, r.top_p) == (16, 1.0, 1.0)
    assert (r.val_n, r.val_temperature, r.val_top_p) == (32, 1.0, 0.7)
    assert (t.train_batch_size, t.gen_batch_size, t.ppo_mini_batch_size) == (512, 1536, 32)
    assert t.train_batch_size // t.ppo_mini_batch_size == 16  # 16 updates per step


def test_grpo_preset_differs_only_where_expected():
    dapo = config_to_dict(load_config(None, REQUIRED, preset="dapo"))
    grpo = config_to_dict(load_config(None, REQUIRED, preset="grpo"))
    diff = {f"{s}.{k}": (dapo[s][k], grpo[s][k]) for s in dapo for k in dapo[s] if dapo[s][k] != grpo[s][k]}
    assert diff == {
        "algorithm.clip_ratio_high": (0.28, 0.2),
        "algorithm.loss_agg_mode": ("token-mean", "seq-mean-token-mean"),
        "algorithm.dynamic_sampling": (True, False),
        "algorithm.overlong_buffer_enable": (True, False),
        "algorithm.kl_coef": (0.0, 0.001),
        "algorithm.use_kl_loss": (False, True),
        "trainer.gen_batch_size": (1536, 512),
    }
    assert grpo["algorithm"]["kl_type"] == "low_var_kl"


def test_defaults_are_the_dapo_preset():
    defaults = config_to_dict(DapoConfig())
    for section, values in PRESETS["dapo"].items():
        for key, value in values.items():
            assert defaults[section][key] == value, f"{section}.{key}"


def test_precedence_preset_then_yaml_then_overrides(tmp_path):
    path = write_yaml(
        tmp_path,
        {
            "preset": "grpo",
            "model": {"hf_dir": "/m"},
            "data": {"train_files": ["t.parquet"]},
            "algorithm": {"clip_ratio_high": 0.25, "entropy_coef": 0.01},
            "optimizer": {"lr": 3e-6},
        },
    )
    cfg = load_config(
        path, ["algorithm.entropy_coef=0.05", "rollout.engine_options.gpu_memory_utilization=0.6"]
    )
    assert cfg.algorithm.loss_agg_mode == "seq-mean-token-mean"  # preset
    assert cfg.algorithm.clip_ratio_high == 0.25  # YAML over preset
    assert cfg.algorithm.entropy_coef == 0.05  # override over YAML
    assert cfg.optimizer.lr == 3e-6
    assert cfg.rollout.engine_options == {"gpu_memory_utilization": 0.6}
    # --preset wins over the YAML's preset key
    cfg2 = load_config(path, [], preset="dapo")
    assert cfg2.algorithm.loss_agg_mode == "token-mean"
    assert cfg2.algorithm.clip_ratio_high == 0.25


def test_override_value_types():
    cfg = load_config(
        None,
        REQUIRED
        + [
            "optimizer.lr=1e-5",  # YAML 1.1 reads this as a string; float fields accept it
            "trainer.total_steps=7",
            "data.shuffle=false",
            "data.val_files=[v1.jsonl, v2.parquet]",
            "algorithm.clip_ratio_c=3",
            "algorithm.tis_cap=null",
            "checkpoint.save_dir=null",
        ],
    )
    assert cfg.optimizer.lr == 1e-5 and isinstance(cfg.optimizer.lr, float)
    assert cfg.trainer.total_steps == 7
    assert cfg.data.shuffle is False
    assert cfg.data.val_files == ["v1.jsonl", "v2.parquet"]
    assert cfg.algorithm.clip_ratio_c == 3.0 and isinstance(cfg.algorithm.clip_ratio_c, float)
    assert cfg.algorithm.tis_cap is None and cfg.checkpoint.save_dir is None
    assert cfg.data.train_files == ["a.parquet"]


@pytest.mark.parametrize(
    "override, message",
    [
        (
            "algorithm.clip_ratio_hgh=0.3",
            "unknown config key 'algorithm.clip_ratio_hgh'; did you mean 'algorithm.clip_ratio_high'",
        ),
        ("algoritm.clip_ratio_high=0.3", "unknown config key 'algoritm'; did you mean 'algorithm'"),
        ("rollout.engine=vlm", "rollout.engine must be one of 'hf', 'vllm', got 'vlm'"),
        ("algorithm.loss_agg_mode=mean", "algorithm.loss_agg_mode must be one of"),
        (
            "trainer.train_batch_size=100",
            "trainer.train_batch_size must be divisible by trainer.ppo_mini_batch_size",
        ),
        ("algorithm.clip_ratio_low=1.5", "algorithm.clip_ratio_low must be in [0, 1), got 1.5"),
        ("algorithm.clip_ratio_c=0.5", "algorithm.clip_ratio_c must be null or > 1"),
        ("rollout.n=1", "rollout.n must be >= 2"),
        ("rollout.top_p=0", "rollout.top_p must be in (0, 1]"),
        ("trainer.total_steps=ten", "trainer.total_steps must be an int, got 'ten'"),
        ("data.shuffle=3", "data.shuffle must be a bool"),
        ("optimizer.min_lr=1", "optimizer.min_lr must be in [0, optimizer.lr="),
        ("optimizer.use_distributed_optimizer=3", "optimizer.use_distributed_optimizer must be"),
        (
            "algorithm.dynamic_sampling=false trainer.gen_batch_size=7",
            "trainer.gen_batch_size must equal trainer.train_batch_size",
        ),
        (
            "algorithm.overlong_buffer_len=30000",
            "algorithm.overlong_buffer_len must be < rollout.max_response_length",
        ),
        (
            "parallel.sequence_parallel=true",
            "parallel.sequence_parallel=true needs parallel.tensor_model_parallel_size > 1",
        ),
        ("model.dtype=float32", "model.dtype must be one of 'fp32', 'bf16', 'fp16'"),
        (
            "preset=dapoo",
            "preset must be one of ['dapo', 'dr_grpo', 'grpo'], got 'dapoo' (did you mean 'dapo'?)",
        ),
        ("trainer", "must look like section.key=value"),
    ],
)
def test_bad_values_name_the_field(override, message):
    with pytest.raises(ValueError) as info:
        load_config(None, REQUIRED + override.split(" "))
    assert message in str(info.value)


def test_unknown_key_in_yaml_named_with_path(tmp_path):
    path = write_yaml(tmp_path, {"model": {"hf_dir": "/m"}, "rollout": {"temprature": 0.7}})
    with pytest.raises(
        ValueError, match=r"unknown config key 'rollout.temprature'; did you mean 'rollout.temperature'"
    ):
        load_config(path, [])
    path = write_yaml(tmp_path, {"rollout": {"zzz_qqq": 1}}, "b.yaml")
    with pytest.raises(ValueError, match=r"unknown config key 'rollout.zzz_qqq'; valid keys here: .*engine"):
        load_config(path, [], require_inputs=False)


def test_required_inputs_and_missing_file(tmp_path):
    with pytest.raises(ValueError, match="model.hf_dir is required"):
        load_config(None, ["data.train_files=[a.parquet]"])
    with pytest.raises(ValueError, match="data.train_files is required"):
        load_config(None, ["model.hf_dir=/m"])
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_config(tmp_path / "nope.yaml", [])
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(ValueError, match="top level must be a mapping"):
        load_config(tmp_path / "list.yaml", [])


def test_direct_construction_validates():
    with pytest.raises(ValueError, match="rollout.temperature must be > 0"):
        RolloutConfig(temperature=0.0)
    with pytest.raises(ValueError, match="trainer.ppo_epochs must be >= 1"):
        TrainerConfig(ppo_epochs=0)
    with pytest.raises(ValueError, match="parallel.micro_batch_size must be an int"):
        ParallelConfig(micro_batch_size="2")
    a = AlgorithmConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):  # the algorithm config is frozen
        a.clip_ratio_low = -0.1
    with pytest.raises(ValueError, match="algorithm.clip_ratio_low"):
        dataclasses.replace(a, clip_ratio_low=-0.1)


def test_save_load_round_trip(tmp_path):
    cfg = load_config(
        None, REQUIRED + ["rollout.engine_options={a: 1, b: [x, y]}", "algorithm.tis_cap=2.0"], preset="grpo"
    )
    save_config(cfg, tmp_path / "out" / "config.yaml")
    again = load_config(tmp_path / "out" / "config.yaml", [])
    assert again == cfg
    assert config_from_dict(config_to_dict(cfg)) == cfg


def test_every_field_documented():
    docs = config_field_docs()
    assert len(docs) > 60
    missing = [k for k, v in docs.items() if len(v) < 8]
    assert not missing, missing
    cfg = DapoConfig()
    expected = {f"{s}.{f.name}" for s in config_to_dict(cfg) for f in dataclasses.fields(getattr(cfg, s))}
    assert set(docs) == expected


def test_validate_world():
    cfg = load_config(
        None, REQUIRED + ["parallel.tensor_model_parallel_size=2", "parallel.micro_batch_size=4"]
    )
    assert cfg.validate_world(16) == 8  # 32 prompts * 16 = 512 sequences over 8 dp ranks
    with pytest.raises(ValueError, match="world size 3 must be divisible"):
        cfg.validate_world(3)
    cfg.parallel.micro_batch_size = 3  # ragged micro-batches are fine (the last one is smaller)
    assert cfg.validate_world(4) == 2
    cfg.trainer.ppo_mini_batch_size = 1
    cfg.rollout.n = 3
    with pytest.raises(ValueError, match="3 sequences must be divisible by the data-parallel size 2"):
        cfg.validate_world(4)


def test_routing_recording_rules():
    """rollout.record_routing follows model.routing_replay unless set; the combinations the
    trainer cannot run are refused by name."""
    assert not load_config(None, REQUIRED).records_routing
    assert load_config(None, REQUIRED + ["model.routing_replay=rollout"]).records_routing
    assert load_config(None, REQUIRED + ["rollout.record_routing=true"]).records_routing
    for overrides, message in (
        (
            ["model.routing_replay=rollout", "rollout.record_routing=false"],
            "rollout.record_routing=true or null",
        ),
        (["model.routing_replay=rollout", "rollout.engine=vllm"], "rollout.engine=hf"),
        (
            ["rollout.record_routing=true", "parallel.max_tokens_per_micro_batch=4096"],
            "max_tokens_per_micro_batch=null",
        ),
    ):
        with pytest.raises(ValueError, match=re.escape(message)):
            load_config(None, REQUIRED + overrides)


def test_vllm_engine_refuses_to_record_routing():
    from dapo_megatron.rollout.vllm_engine import ROUTING_UNSUPPORTED, VLLMEngine

    assert "enable_return_routed_experts" in ROUTING_UNSUPPORTED and "Model Runner V2" in ROUTING_UNSUPPORTED
    with pytest.raises(ValueError, match="does not report routed experts"):
        VLLMEngine("/nonexistent", record_routing=True)


@pytest.mark.parametrize("preset", ["grpo", "dr_grpo", "dapo"])
def test_presets_run_on_the_demo_config_as_written(preset):
    """``--preset NAME`` on examples/demo_cpu.yaml (which sets a DAPO generation batch of 48 for a
    training batch of 32) needs no extra override, with options and overrides in any order."""
    yaml_cfg = yaml.safe_load(open("examples/demo_cpu.yaml"))
    train_bs = yaml_cfg["trainer"]["train_batch_size"]
    for argv in (
        ["--config", "examples/demo_cpu.yaml", "--preset", preset],
        ["trainer.total_steps=3", "--preset", preset, "trainer.seed=4", "--config", "examples/demo_cpu.yaml"],
    ):
        cfg = config_from_argv(argv)
        dynamic = PRESETS[preset]["algorithm"]["dynamic_sampling"]
        assert cfg.algorithm.dynamic_sampling is dynamic
        assert cfg.trainer.gen_batch_size == (yaml_cfg["trainer"]["gen_batch_size"] if dynamic else train_bs)
    assert (cfg.trainer.total_steps, cfg.trainer.seed) == (3, 4)
    # no dynamic sampling: the generation batch follows the training batch, also when that is overridden
    cfg = load_config(None, REQUIRED + ["algorithm.dynamic_sampling=false", "trainer.train_batch_size=64"])
    assert cfg.trainer.gen_batch_size == 64


def test_config_from_argv(tmp_path):
    path = write_yaml(tmp_path, {"model": {"hf_dir": "/m"}, "data": {"train_files": "t.jsonl"}})
    cfg = config_from_argv(["--config", str(path), "--preset", "grpo", "trainer.total_steps=3"])
    assert cfg.trainer.total_steps == 3
    assert cfg.algorithm.use_kl_loss is True
    assert cfg.data.train_files == ["t.jsonl"]


def test_kl_in_the_loss_or_in_the_reward():
    cfg = load_config(None, REQUIRED, preset="grpo")  # GRPO's KL is in the loss
    assert cfg.algorithm.use_kl_loss and cfg.algorithm.kl_coef == 0.001 and not cfg.algorithm.kl_in_reward
    cfg = load_config(None, REQUIRED + ["algorithm.use_kl_loss=false"], preset="grpo")
    assert cfg.algorithm.kl_in_reward
    assert not load_config(
        None, REQUIRED + ["algorithm.use_kl_loss=false"]
    ).algorithm.kl_in_reward  # kl_coef 0
