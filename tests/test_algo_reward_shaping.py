"""overlong_penalty (each segment) and overlong_mask by hand."""

import pytest
import torch

from dapo_megatron.algo import loss_sum_and_count, overlong_mask, overlong_penalty


def test_each_penalty_segment_by_hand():
    # max_len 20, buffer 4 -> expected length 16.
    lengths = torch.tensor([0, 10, 16, 17, 18, 20, 25])
    got = overlong_penalty(lengths, max_len=20, buffer_len=4)
    torch.testing.assert_close(got, torch.tensor([0.0, 0.0, 0.0, -0.25, -0.5, -1.0, -1.0]))
    assert got.dtype == torch.float32


def test_penalty_factor_scales_the_ramp_and_the_cap():
    got = overlong_penalty([18, 30], max_len=20, buffer_len=4, penalty_factor=0.5)
    torch.testing.assert_close(got, torch.tensor([-0.25, -0.5]))


def test_buffer_equal_to_max_len_ramps_from_zero():
    torch.testing.assert_close(
        overlong_penalty([0, 5, 10], max_len=10, buffer_len=10), torch.tensor([0.0, -0.5, -1.0])
    )


@pytest.mark.parametrize(
    "kwargs,name",
    [
        ({"buffer_len": 0}, "buffer_len"),
        ({"buffer_len": -1}, "buffer_len"),
        ({"buffer_len": 21}, "buffer_len"),
        ({"max_len": 0, "buffer_len": 1}, "max_len"),
        ({"penalty_factor": -1.0}, "penalty_factor"),
    ],
)
def test_bad_arguments_name_themselves(kwargs, name):
    args = {"max_len": 20, "buffer_len": 4, **kwargs}
    with pytest.raises(ValueError, match=name):
        overlong_penalty(torch.tensor([1]), **args)


def test_lengths_must_be_1d():
    with pytest.raises(ValueError, match="lengths"):
        overlong_penalty(torch.ones(2, 2), max_len=20, buffer_len=4)


def test_overlong_mask_from_truncation_flags():
    keep = overlong_mask(torch.tensor([20, 20, 5]), torch.tensor([True, False, False]))
    assert keep.tolist() == [False, True, True]  # EOS exactly at the limit is not truncated


def test_overlong_mask_from_max_len():
    assert overlong_mask([19, 20, 21], max_len=20).tolist() == [True, False, False]


def test_overlong_mask_removes_tokens_from_loss_and_count():
    keep = overlong_mask(torch.tensor([3, 2]), torch.tensor([True, False]))
    mask = torch.ones(2, 3, dtype=torch.bool) & keep[:, None]
    s, c = loss_sum_and_count(torch.ones(2, 3), mask)
    assert (s.item(), c.item()) == (3.0, 3)


def test_overlong_mask_bad_input():
    with pytest.raises(ValueError, match="truncated"):
        overlong_mask(torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="truncated"):
        overlong_mask(torch.tensor([1, 2]), torch.tensor([True]))
    with pytest.raises(ValueError, match="max_len"):
        overlong_mask(torch.tensor([1, 2]), max_len=0)
