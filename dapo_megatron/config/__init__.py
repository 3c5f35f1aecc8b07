"""Typed, validated configuration for the DAPO trainer.

:mod:`~dapo_megatron.config.schema` holds the sections (one dataclass each; ``algorithm`` is
:class:`dapo_megatron.algo.config.AlgorithmConfig`); :mod:`~dapo_megatron.config.loading` resolves
defaults, a preset, the YAML file and ``section.key=value`` overrides, in that order (later wins).
Unknown keys are rejected by their dotted path with a close-match suggestion; bad values raise
``ValueError`` naming the field.
"""

from dapo_megatron.config import loading, schema
from dapo_megatron.config.loading import *  # noqa: F403  (the public names listed in loading.__all__)
from dapo_megatron.config.schema import *  # noqa: F403  (the public names listed in schema.__all__)

__all__ = sorted(schema.__all__ + loading.__all__)
