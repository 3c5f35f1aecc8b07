"""Typed, validated configuration for the DAPO trainer.

:mod:`~dapo_megatron.config.schema` holds the sections (one dataclass each);
:mod:`~dapo_megatron.config.loading` resolves defaults, a preset, the YAML file and
``section.key=value`` overrides, in that order (later wins). Unknown keys are rejected by their
dotted path with a close-match suggestion; bad values raise ``ValueError`` naming the field.
"""

from dapo_megatron.config.loading import (
    PRESETS,
    build_arg_parser,
    config_field_docs,
    config_from_argv,
    config_from_dict,
    config_to_dict,
    load_config,
    save_config,
)
from dapo_megatron.config.schema import (
    AlgorithmConfig,
    CheckpointConfig,
    DapoConfig,
    DataConfig,
    LoggingConfig,
    ModelConfig,
    OptimizerConfig,
    ParallelConfig,
    RewardConfig,
    RolloutConfig,
    TrainerConfig,
)

__all__ = [
    "PRESETS",
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
    "build_arg_parser",
    "config_field_docs",
    "config_from_argv",
    "config_from_dict",
    "config_to_dict",
    "load_config",
    "save_config",
]
