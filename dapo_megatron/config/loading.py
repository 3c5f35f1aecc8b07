"""Loading the configuration: presets, YAML files and ``section.key=value`` overrides.

One dataclass per section (``model``, ``parallel``, ``data``, ``rollout``, ``algorithm``,
``reward``, ``optimizer``, ``trainer``, ``logging``, ``checkpoint``) grouped by :class:`DapoConfig`.
Every field carries its documentation in ``metadata["doc"]`` (see :func:`config_field_docs`).

Values are resolved in this order (later wins):

1. the dataclass defaults (which are the DAPO paper values),
2. a preset (``preset: dapo`` / ``preset: grpo`` at the top of the YAML, or ``--preset``),
3. the YAML file,
4. command-line overrides ``section.key=value`` (values parsed with ``yaml.safe_load``).

Unknown keys are rejected by their dotted path with a close-match suggestion; bad values raise
``ValueError`` naming the field and what was expected.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import difflib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from dapo_megatron.algo.presets import get_preset
from dapo_megatron.config.schema import _SECTIONS, AlgorithmConfig, DapoConfig, TrainerConfig

__all__ = [
    "PRESETS",
    "build_arg_parser",
    "config_field_docs",
    "config_from_argv",
    "config_from_dict",
    "config_to_dict",
    "load_config",
    "save_config",
]


# --------------------------------------------------------------------------------------------
# Presets
# --------------------------------------------------------------------------------------------

def _algorithm_preset(name: str) -> dict[str, Any]:
    """The ``algorithm`` section of a preset: the fields of the frozen instance
    :data:`dapo_megatron.algo.ALGORITHM_PRESETS` ``[name]`` (the one definition of its knobs)."""
    return dataclasses.asdict(get_preset(name))


_DAPO: dict[str, dict[str, Any]] = {
    "algorithm": _algorithm_preset("dapo"),
    "rollout": {
        "n": 16,
        "temperature": 1.0,
        "top_p": 1.0,
        "top_k": -1,
        "max_response_length": 20480,
        "val_n": 32,
        "val_temperature": 1.0,
        "val_top_p": 0.7,
    },
    "optimizer": {
        "lr": 1e-6,
        "lr_schedule": "constant",
        "lr_warmup_steps": 20,
        "weight_decay": 0.1,
        "clip_grad": 1.0,
    },
    "trainer": {"train_batch_size": 512, "gen_batch_size": 1536, "ppo_mini_batch_size": 32, "ppo_epochs": 1},
    "data": {"max_prompt_length": 2048},
}

_GRPO: dict[str, dict[str, Any]] = copy.deepcopy(_DAPO)
_GRPO["algorithm"] = _algorithm_preset("grpo")
_GRPO["trainer"]["gen_batch_size"] = 512

_DR_GRPO: dict[str, dict[str, Any]] = copy.deepcopy(_GRPO)
_DR_GRPO["algorithm"] = _algorithm_preset("dr_grpo")

#: Paper defaults by name: DAPO (Yu et al. 2025), the GRPO baseline it is compared against, and
#: Dr.GRPO (unbiased advantages and a constant loss normaliser).
PRESETS: dict[str, dict[str, dict[str, Any]]] = {"dapo": _DAPO, "grpo": _GRPO, "dr_grpo": _DR_GRPO}


# --------------------------------------------------------------------------------------------
# Loading / saving
# --------------------------------------------------------------------------------------------


def _unknown_key(path: str, key: str, known: Sequence[str]) -> ValueError:
    full = f"{path}.{key}" if path else key
    hint = difflib.get_close_matches(str(key), list(known), n=1, cutoff=0.6)
    if hint:
        suggestion = f"{path}.{hint[0]}" if path else hint[0]
        return ValueError(f"unknown config key {full!r}; did you mean {suggestion!r}?")
    return ValueError(f"unknown config key {full!r}; valid keys here: {', '.join(sorted(known))}")


def config_from_dict(data: Mapping[str, Any]) -> DapoConfig:
    """Build a :class:`DapoConfig` from nested mappings, rejecting unknown keys by dotted path."""
    if not isinstance(data, Mapping):
        raise ValueError(f"config must be a mapping of sections, got {type(data).__name__}")
    sections = {}
    for name, section in data.items():
        if name not in _SECTIONS:
            raise _unknown_key("", name, list(_SECTIONS))
        cls = _SECTIONS[name]
        if section is None:
            section = {}
        if not isinstance(section, Mapping):
            raise ValueError(f"{name} must be a mapping of keys, got {section!r}")
        names = [f.name for f in dataclasses.fields(cls)]
        for key in section:
            if key not in names:
                raise _unknown_key(name, key, names)
        sections[name] = cls(**section)
    return DapoConfig(**sections)


def config_to_dict(cfg: DapoConfig) -> dict[str, dict[str, Any]]:
    """Plain nested dict of every field (YAML/JSON-serialisable)."""
    return dataclasses.asdict(cfg)


def save_config(cfg: DapoConfig, path: str | Path) -> None:
    """Write the full resolved config as YAML; :func:`load_config` on it gives an equal config."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        yaml.safe_dump(config_to_dict(cfg), f, sort_keys=False, default_flow_style=False)


def _deep_merge(base: dict[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(base.get(key), dict):
            _deep_merge(base[key], value)
        else:
            base[key] = copy.deepcopy(value) if isinstance(value, Mapping) else value
    return base


def _parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ValueError(f"override {text!r} must look like section.key=value")
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ValueError(f"override {text!r} has an empty key part")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except Exception as exc:  # YAMLError, and e.g. ValueError from a timestamp like 2021-13-45
        raise ValueError(f"override {text!r}: cannot parse value {raw!r}: {exc}") from exc
    return parts, value


def _set_path(tree: dict[str, Any], parts: list[str], value: Any, original: str) -> None:
    node = tree
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ValueError(f"override {original!r}: {'.'.join(parts[: i + 1])} is not a section")
        node = child
    node[parts[-1]] = value


def _derive_gen_batch_size(merged: dict[str, Any], explicit: bool) -> None:
    """Without dynamic sampling one generation round is the training batch, so set
    ``trainer.gen_batch_size = trainer.train_batch_size`` (a DAPO YAML's larger generation batch
    then does not block ``--preset grpo``). A ``trainer.gen_batch_size=`` given on the command line
    is kept as written, and validation rejects it if it differs."""
    algo = merged.get("algorithm") or {}
    trainer = merged.setdefault("trainer", {})
    if explicit or not isinstance(algo, Mapping) or not isinstance(trainer, dict):
        return
    dynamic = algo.get("dynamic_sampling", AlgorithmConfig.dynamic_sampling)
    if dynamic is False:
        trainer["gen_batch_size"] = trainer.get("train_batch_size", TrainerConfig.train_batch_size)


def load_config(
    path: str | Path | None,
    overrides: Sequence[str] = (),
    preset: str | None = None,
    require_inputs: bool = True,
) -> DapoConfig:
    """Load a config: preset, then the YAML at ``path`` (optional), then ``overrides``.

    Args:
        path: YAML file with sections as top-level keys, plus an optional ``preset: dapo|grpo``.
        overrides: ``section.key=value`` strings; values are parsed with ``yaml.safe_load``
            (``null``, ``true``, ``3``, ``1e-6``, ``[a.parquet, b.parquet]``). ``preset=NAME`` is
            accepted too.
        preset: preset name; wins over the YAML's ``preset`` key.
        require_inputs: also require ``model.hf_dir`` and ``data.train_files``.
    """
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"config file not found: {p}")
        with open(p) as f:
            try:
                loaded = yaml.safe_load(f)
            except Exception as exc:  # YAMLError, UnicodeDecodeError, ValueError of a bad timestamp
                raise ValueError(f"{p}: invalid YAML: {exc}") from exc
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{p}: top level must be a mapping of sections, got {type(loaded).__name__}")
        data = loaded
    chosen = data.pop("preset", None)
    parsed = []
    for text in overrides:
        parts, value = _parse_override(text)
        if parts == ["preset"]:
            chosen = value
        else:
            parsed.append((parts, value, text))
    if preset is not None:
        chosen = preset
    merged: dict[str, Any] = {}
    if chosen is not None:
        if not isinstance(chosen, str) or chosen not in PRESETS:
            hint = difflib.get_close_matches(str(chosen), list(PRESETS), n=1)
            extra = f" (did you mean {hint[0]!r}?)" if hint else ""
            raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {chosen!r}{extra}")
        merged = copy.deepcopy(PRESETS[chosen])
    _deep_merge(merged, data)
    for parts, value, text in parsed:
        _set_path(merged, parts, value, text)
    _derive_gen_batch_size(merged, explicit=any(parts == ["trainer", "gen_batch_size"] for parts, _, _ in parsed))
    cfg = config_from_dict(merged)
    cfg.validate(require_inputs=require_inputs)
    return cfg


def config_field_docs() -> dict[str, str]:
    """``{"section.field": documentation}`` for every field (for ``--help`` style listings)."""
    return {
        f"{name}.{f.name}": f.metadata.get("doc", "")
        for name, cls in _SECTIONS.items()
        for f in dataclasses.fields(cls)
    }


def build_arg_parser(description: str = "DAPO training on Megatron-Core") -> argparse.ArgumentParser:
    """``--config FILE``, ``--preset NAME`` and positional ``section.key=value`` overrides."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", default=None, help="YAML config file")
    parser.add_argument(
        "--preset", default=None, choices=sorted(PRESETS), help="paper defaults to start from"
    )
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides (YAML values)")
    return parser


def config_from_argv(argv: Sequence[str] | None = None) -> DapoConfig:
    """Parse ``argv`` with :func:`build_arg_parser` and :func:`load_config` the result."""
    # intermixed: options and overrides in any order (``a=1 --preset grpo b=2``)
    args = build_arg_parser().parse_intermixed_args(argv)
    return load_config(args.config, args.overrides, preset=args.preset)
