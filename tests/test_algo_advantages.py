"""group_advantages and broadcast_advantages by hand."""

import math

import pytest
import torch

from dapo_megatron.algo import broadcast_advantages, group_advantages

# group a: mixed 0/1; b: singleton; c: all equal. Members of a are not contiguous.
SCORES = [1.0, 0.0, 5.0, 0.0, 2.0, 1.0, 2.0]
IDS = ["a", "a", "b", "a", "c", "a", "c"]


def test_norm_by_std_by_hand():
    adv = group_advantages(torch.tensor(SCORES), IDS, eps=1e-6)
    std_a = math.sqrt(4 * 0.25 / 3)  # unbiased: sum of squared deviations / (G - 1)
    a = 0.5 / (std_a + 1e-6)
    expected = torch.tensor([a, -a, 0.0, -a, 0.0, a, 0.0])
    torch.testing.assert_close(adv, expected)
    assert adv[2].item() == 0.0 and adv[4].item() == 0.0 and adv[6].item() == 0.0  # exactly


def test_without_std_is_the_centred_score():
    adv = group_advantages(torch.tensor(SCORES), IDS, norm_by_std=False)
    torch.testing.assert_close(adv, torch.tensor([0.5, -0.5, 0.0, -0.5, 0.0, 0.5, 0.0]))


def test_uneven_group_by_hand():
    adv = group_advantages([3.0, 1.0, 2.0, 6.0], [0, 0, 0, 0], eps=0.0)
    std = math.sqrt((0 + 4 + 1 + 9) / 3)  # mean 3
    torch.testing.assert_close(adv, torch.tensor([0.0, -2.0, -1.0, 3.0]) / std)


def test_all_equal_group_is_exactly_zero_even_with_eps_zero_and_rounding():
    adv = group_advantages(torch.tensor([0.1, 0.1, 0.1]), [7, 7, 7], eps=0.0)
    assert adv.eq(0).all()


def test_integer_tensor_ids_and_string_ids_agree():
    ids_tensor = torch.tensor([0, 0, 1, 0, 2, 0, 2])
    torch.testing.assert_close(
        group_advantages(torch.tensor(SCORES), ids_tensor), group_advantages(SCORES, IDS)
    )


def test_dtype_follows_scores():
    assert group_advantages(torch.tensor([1.0, 0.0], dtype=torch.float64), [0, 0]).dtype == torch.float64
    assert group_advantages(torch.tensor([1, 0]), [0, 0]).dtype == torch.float32
    assert group_advantages(torch.tensor([1.0, 0.0], dtype=torch.bfloat16), [0, 0]).dtype == torch.bfloat16


def test_bad_input():
    with pytest.raises(ValueError, match="group_ids"):
        group_advantages([1.0, 0.0, 1.0], ["a", "a"])
    with pytest.raises(ValueError, match="scores"):
        group_advantages(torch.zeros(2, 2), [0, 0])
    with pytest.raises(ValueError, match="scores"):
        group_advantages([1.0, float("nan")], [0, 0])
    with pytest.raises(ValueError, match="eps"):
        group_advantages([1.0, 0.0], [0, 0], eps=-1.0)
    with pytest.raises(ValueError, match="group_ids"):
        group_advantages([1.0, 0.0], torch.tensor([0.0, 1.0]))


def test_broadcast_advantages_under_the_mask():
    adv = torch.tensor([2.0, -1.0])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    torch.testing.assert_close(
        broadcast_advantages(adv, mask), torch.tensor([[2.0, 2.0, 0.0], [-1.0, 0.0, 0.0]])
    )
    with pytest.raises(ValueError, match="response_mask"):
        broadcast_advantages(adv, torch.ones(3, 2))
    with pytest.raises(ValueError, match="advantages"):
        broadcast_advantages(adv[:, None], mask)
