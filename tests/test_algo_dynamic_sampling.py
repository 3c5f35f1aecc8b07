"""select_informative_groups (each filter case) and DynamicSampler (fill, trim, exhaust, resume)."""

import doctest
import io
import pickle

import pytest
import torch

import dapo_megatron.algo.dynamic_sampling as dynamic_sampling
from dapo_megatron.algo import DynamicSampler, DynamicSamplingExhaustedError, select_informative_groups


def test_filter_cases_by_hand():
    ids = ["mixed", "all1", "mixed", "all1", "all0", "all0", "single", "tiny", "tiny", "mixed"]
    values = [1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 1.0, 0.5, 0.5 + 1e-9, 1.0]
    keep = select_informative_groups(ids, values)
    assert keep.dtype == torch.bool
    assert keep.tolist() == [True, False, True, False, False, False, False, False, False, True]
    # The tolerance is on the group's range, and is configurable.
    assert select_informative_groups(["t", "t"], [0.5, 0.5 + 1e-9], atol=0.0).tolist() == [True, True]


def test_filter_with_tensor_ids_and_score_metric():
    keep = select_informative_groups(torch.tensor([3, 3, 9, 9]), torch.tensor([1.0, -1.0, -1.0, -1.0]))
    assert keep.tolist() == [True, True, False, False]


def test_filter_bad_input():
    with pytest.raises(ValueError, match="group_ids"):
        select_informative_groups([0, 0], [1.0, 0.0, 1.0])
    with pytest.raises(ValueError, match="values"):
        select_informative_groups([0, 0], [1.0, float("nan")])
    with pytest.raises(ValueError, match="atol"):
        select_informative_groups([0, 0], [1.0, 0.0], atol=-1)


def _batch(prefix, groups):
    """groups: list of per-group acc lists -> flat samples with uid, acc, score, text."""
    return [
        {"uid": f"{prefix}{g}", "acc": acc, "score": 1.0 if acc else -1.0, "text": f"{prefix}{g}/{i}"}
        for g, accs in enumerate(groups)
        for i, acc in enumerate(accs)
    ]


def test_docstring_example():
    assert doctest.testmod(dynamic_sampling, raise_on_error=True).attempted > 0


def test_fills_then_trims_exactly_to_train_batch_size():
    sampler = DynamicSampler(train_batch_size=3, max_num_gen_batches=0)
    assert not sampler.add(_batch("a", [[1, 0], [1, 1], [0, 0], [0, 1]]))  # 2 informative of 4
    assert sampler.num_kept_groups == 2
    assert sampler.add(_batch("b", [[1, 0], [1, 0], [1, 1]]))  # 2 more -> 4 >= 3
    samples, metrics = sampler.take()
    assert [s["text"] for s in samples] == ["a0/0", "a0/1", "a3/0", "a3/1", "b0/0", "b0/1"]
    assert metrics == {
        "num_gen_batches": 2,
        "num_groups_total": 7,
        "num_groups_kept": 4,
        "kept_ratio": 4 / 7,
        "solve_all_frac": 2 / 7,
        "solve_none_frac": 1 / 7,
        "num_groups_trimmed": 1,
    }
    # take() starts a new step.
    assert sampler.num_kept_groups == 0 and sampler.metrics()["num_gen_batches"] == 0


def test_groups_need_not_be_contiguous_and_are_scoped_to_one_batch():
    sampler = DynamicSampler(train_batch_size=2)
    batch = [{"uid": "p", "acc": 1}, {"uid": "q", "acc": 1}, {"uid": "p", "acc": 0}, {"uid": "q", "acc": 1}]
    sampler.add(batch)
    sampler.add([{"uid": "p", "acc": 0}, {"uid": "p", "acc": 1}])  # same id, new batch: a new group
    samples, metrics = sampler.take()
    assert [s["acc"] for s in samples] == [1, 0, 0, 1]
    assert metrics["num_groups_total"] == 3


def test_exhausted_sampler_raises_with_the_counts():
    sampler = DynamicSampler(train_batch_size=4, max_num_gen_batches=2)
    assert not sampler.add(_batch("a", [[1, 0], [1, 1], [0, 0]]))
    with pytest.raises(DynamicSamplingExhaustedError) as err:
        sampler.add(_batch("b", [[1, 1], [0, 1]]))
    message = str(err.value)
    for fragment in [
        "2 generation batches",
        "max_num_gen_batches=2",
        "kept only 2 of the 4",
        "5 groups generated",
        "2 all solved",
        "1 none solved",
    ]:
        assert fragment in message, (fragment, message)
    assert isinstance(err.value, RuntimeError)
    sampler.reset()
    assert sampler.metrics()["num_gen_batches"] == 0


def test_not_exhausted_when_the_last_allowed_batch_fills_it():
    sampler = DynamicSampler(train_batch_size=1, max_num_gen_batches=1)
    assert sampler.add(_batch("a", [[1, 0]]))


def test_unlimited_batches_with_zero():
    sampler = DynamicSampler(train_batch_size=1, max_num_gen_batches=0)
    for i in range(50):
        assert not sampler.add(_batch(f"x{i}", [[1, 1]]))
    assert sampler.add(_batch("y", [[0, 1]]))
    assert sampler.take()[1]["num_gen_batches"] == 51


def test_take_before_ready_raises():
    sampler = DynamicSampler(train_batch_size=2)
    sampler.add(_batch("a", [[0, 1]]))
    with pytest.raises(RuntimeError, match="1 of 2"):
        sampler.take()


def test_disabled_keeps_every_group_and_still_reports():
    sampler = DynamicSampler(train_batch_size=2, enabled=False)
    assert sampler.add(_batch("a", [[1, 1], [0, 0], [1, 0]]))
    samples, metrics = sampler.take()
    assert [s["uid"] for s in samples] == ["a0", "a0", "a1", "a1"]
    assert (
        metrics["kept_ratio"] == 1.0
        and metrics["solve_all_frac"] == 1 / 3
        and metrics["num_groups_trimmed"] == 1
    )


def test_configurable_metric_and_explicit_ids_and_values():
    by_score = DynamicSampler(train_batch_size=1, metric="score")
    assert by_score.add(_batch("a", [[1, 0]]))
    assert by_score.take()[1]["solve_all_frac"] == 0.0

    # Any sample type: ids and values passed alongside (tensors accepted).
    generic = DynamicSampler(train_batch_size=1)
    assert generic.add(
        ["s0", "s1", "s2", "s3"], group_ids=torch.tensor([5, 5, 6, 6]), values=[0.2, 0.2, 0.3, 0.9]
    )
    assert generic.take()[0] == ["s2", "s3"]


def test_missing_key_and_length_mismatch_are_clear():
    sampler = DynamicSampler(train_batch_size=1, metric="reward")
    with pytest.raises(ValueError, match="'reward'"):
        sampler.add(_batch("a", [[1, 0]]))
    with pytest.raises(ValueError, match="3 samples, 2 group ids"):
        sampler.add(["a", "b", "c"], group_ids=[0, 0], values=[1.0, 0.0])


@pytest.mark.parametrize(
    "kwargs,name",
    [({"train_batch_size": 0}, "train_batch_size"), ({"max_num_gen_batches": -1}, "max_num_gen_batches")],
)
def test_bad_config(kwargs, name):
    with pytest.raises(ValueError, match=name):
        DynamicSampler(**{"train_batch_size": 2, **kwargs})


BATCHES = [
    _batch("a", [[1, 0], [1, 1]]),
    _batch("b", [[0, 0], [0, 1], [1, 0]]),
    _batch("c", [[1, 1], [1, 0]]),
    _batch("d", [[0, 1], [0, 0], [1, 0]]),
    _batch("e", [[1, 0], [0, 1], [1, 1]]),
]


def _run(sampler, batches):
    steps = []
    for batch in batches:
        if sampler.add(batch):
            steps.append(sampler.take())
    return steps


@pytest.mark.parametrize("split", [1, 2, 3])
@pytest.mark.parametrize("codec", ["torch", "pickle"])
def test_state_dict_gives_exact_resume(split, codec):
    reference = _run(DynamicSampler(train_batch_size=3), BATCHES)
    assert len(reference) == 2

    first = DynamicSampler(train_batch_size=3)
    steps = _run(first, BATCHES[:split])
    state = first.state_dict()
    if codec == "torch":
        buffer = io.BytesIO()
        torch.save(state, buffer)
        buffer.seek(0)
        state = torch.load(buffer)
    else:
        state = pickle.loads(pickle.dumps(state))
    resumed = DynamicSampler(train_batch_size=3)
    resumed.load_state_dict(state)
    steps += _run(resumed, BATCHES[split:])
    assert steps == reference


def test_state_dict_is_a_snapshot():
    sampler = DynamicSampler(train_batch_size=5)
    sampler.add(_batch("a", [[1, 0]]))
    state = sampler.state_dict()
    sampler.add(_batch("b", [[1, 0]]))
    assert len(state["kept_groups"]) == 1 and state["num_gen_batches"] == 1


def test_load_state_dict_refuses_a_different_config_unless_not_strict():
    state = DynamicSampler(train_batch_size=3, metric="acc").state_dict()
    with pytest.raises(ValueError, match="metric"):
        DynamicSampler(train_batch_size=3, metric="score").load_state_dict(state)
    DynamicSampler(train_batch_size=3, metric="score").load_state_dict(state, strict=False)
    with pytest.raises(ValueError, match="format_version"):
        DynamicSampler(train_batch_size=3).load_state_dict({**state, "format_version": 99})
