"""Property tests (hypothesis) for what users type and feed in: the config loader (arbitrary YAML
files and ``section.key=value`` overrides) and the prompt loader (malformed rows and bytes).

The property: a result, or a plain ``ValueError`` with a message (naming the file, override or
field), never another exception from deep inside (``TypeError``, ``KeyError``, and ``ValueError``
subclasses such as ``UnicodeDecodeError`` that name nothing).
Each case found by these tests is pinned by an explicit example below its strategy.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from dapo_megatron.config import DapoConfig, load_config
from dapo_megatron.config.schema import _SECTIONS
from dapo_megatron.data.prompts import load_prompt_records

FAST = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

SECTION_NAMES = sorted(_SECTIONS) + ["preset"]
FIELD_NAMES = sorted({f.name for cls in _SECTIONS.values() for f in dataclasses.fields(cls)})

scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**20), max_value=10**20)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12)
    | st.sampled_from(["fp32", "bf16", "dapo", "grpo", "1e-6", "nan", "-inf", "auto", "token-mean"])
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)
keys = st.sampled_from(FIELD_NAMES) | st.text(max_size=8) | st.integers() | st.booleans()
sections = st.dictionaries(keys, values, max_size=4) | values
configs = st.dictionaries(st.sampled_from(SECTION_NAMES) | st.text(max_size=8), sections, max_size=4)


def _ok_or_named_value_error(fn) -> None:
    try:
        assert isinstance(fn(), DapoConfig)
    except ValueError as exc:
        # our own ValueError, not a subclass escaping from a parser (UnicodeDecodeError, ...)
        assert type(exc) is ValueError and str(exc).strip(), repr(exc)


def _load(tmp_path: Path, text: str | bytes, overrides=()) -> DapoConfig:
    path = tmp_path / "config.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8", "surrogatepass"))
    return load_config(path, overrides, require_inputs=False)


@FAST
@given(text=st.text(max_size=200))
@example(text="preset: [dapo]")  # was TypeError: unhashable type: 'list'
@example(text="trainer:\n  seed: 2021-13-45")  # was a bare ValueError from PyYAML's timestamp
def test_arbitrary_yaml_text(tmp_path, text):
    _ok_or_named_value_error(lambda: _load(tmp_path, text))


@FAST
@given(raw=st.binary(max_size=100))
@example(raw=b"model:\n  hf_dir: \xff\xfe")  # was UnicodeDecodeError
def test_arbitrary_yaml_bytes(tmp_path, raw):
    _ok_or_named_value_error(lambda: _load(tmp_path, raw))


@FAST
@given(data=configs)
@example(data={"preset": {"a": 1}})
@example(data={"rollout": {"top_k": math.nan}, "optimizer": {"lr": "inf"}})
def test_structured_yaml(tmp_path, data):
    try:
        text = yaml.safe_dump(data, allow_unicode=True)
    except yaml.YAMLError:
        return  # not expressible as YAML (e.g. a surrogate character)
    _ok_or_named_value_error(lambda: _load(tmp_path, text))


override_keys = st.builds(
    lambda s, f: f"{s}.{f}",
    st.sampled_from(SECTION_NAMES) | st.text(max_size=6),
    st.sampled_from(FIELD_NAMES),
) | st.text(max_size=12)
overrides = st.builds(lambda k, v: f"{k}={v}", override_keys, st.text(max_size=16)) | st.text(max_size=20)


@FAST
@given(items=st.lists(overrides, max_size=4))
@example(items=["preset=[1]"])  # was TypeError: unhashable type: 'list'
@example(items=["trainer.seed=2021-13-45"])  # was ValueError naming no override
@example(items=["model=3", "model.hf_dir=x"])
def test_arbitrary_overrides(tmp_path, items):
    _ok_or_named_value_error(lambda: _load(tmp_path, "", items))


def test_overrides_that_were_bugs_name_the_override(tmp_path):
    for text, expected in (("preset=[1]", "preset"), ("trainer.seed=2021-13-45", "trainer.seed=2021-13-45")):
        try:
            _load(tmp_path, "", [text])
        except ValueError as exc:
            assert expected in str(exc), str(exc)
        else:
            raise AssertionError(f"{text} was accepted")


# ------------------------------------------------------------------------------- prompt rows

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=10,
)
messages = st.lists(
    st.fixed_dictionaries(
        {"role": st.sampled_from(["user", "system"]) | json_values, "content": json_values}
    ),
    max_size=3,
)
rows = (
    st.fixed_dictionaries(
        {},
        optional={
            "prompt": messages | json_values,
            "reward_model": st.fixed_dictionaries({}, optional={"ground_truth": json_values}) | json_values,
            "data_source": json_values,
            "extra_info": json_values,
        },
    )
    | json_values
)


def _records_or_named_error(path: Path) -> None:
    try:
        records = load_prompt_records(path)
    except ValueError as exc:
        assert type(exc) is ValueError and str(exc).startswith(str(path)), repr(exc)  # names the file
        return
    for r in records:
        assert isinstance(r.ground_truth, str) and r.messages and isinstance(r.extra_info, dict)


@FAST
@given(row=rows)
@example(row={"prompt": "hi", "reward_model": {"ground_truth": "1"}, "extra_info": 5})
def test_malformed_jsonl_rows(tmp_path, row):
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps(row) + "\n")
    _records_or_named_error(path)


@FAST
@given(raw=st.binary(max_size=80))
@example(raw=b'{"prompt": "\xff", "reward_model": {"ground_truth": "1"}}\n')  # was UnicodeDecodeError
@example(raw=b"[" * 5000 + b"]" * 5000 + b"\n")  # was RecursionError from json
def test_arbitrary_jsonl_bytes(tmp_path, raw):
    path = tmp_path / "rows.jsonl"
    path.write_bytes(raw)
    _records_or_named_error(path)


@FAST
@given(row=rows.filter(lambda r: isinstance(r, dict) and r))
def test_malformed_parquet_rows(tmp_path, row):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "rows.parquet"
    try:
        pq.write_table(pa.Table.from_pylist([row]), path)
    except (pa.ArrowException, TypeError, ValueError, OverflowError):
        return  # not representable as a parquet row
    _records_or_named_error(path)
