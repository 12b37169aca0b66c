"""Exact mode's store (:class:`loraga_fast.stores.exact.AccumulatorStore`): same-shape layers in one ``(B, m, n)`` fp32
tensor with per-layer views, the caller's order, the mean taken once, per-layer magnitudes, and loading."""

from __future__ import annotations

import math

import torch

from loraga_fast.stores.exact import AccumulatorStore, is_distributed

CPU = torch.device("cpu")
META = torch.device("meta")


def test_groups_by_shape_and_device_with_views_in_the_callers_order() -> None:
    specs = [("a", (4, 3), CPU), ("b", (5, 3), CPU), ("c", (4, 3), CPU), ("d", (4, 3), META), ("e", (5, 3), CPU)]
    store = AccumulatorStore(specs)
    assert [(g.shape, g.device.type, [s.name for s in g.slots]) for g in store.shape_groups] == [
        ((4, 3), "cpu", ["a", "c"]), ((5, 3), "cpu", ["b", "e"]), ((4, 3), "meta", ["d"])]
    assert [tuple(g.tensor.shape) for g in store.shape_groups] == [(2, 4, 3), (2, 5, 3), (1, 4, 3)]
    assert all(g.tensor.dtype == torch.float32 and g.tensor.is_contiguous() for g in store.shape_groups)
    assert list(store.slots) == list(store.counts()) == ["a", "b", "c", "d", "e"]  # not in group order
    group = store.shape_groups[0]
    for i, slot in enumerate(group.slots):  # views, not copies: writing a slot writes the group tensor
        assert slot.acc._base is group.tensor and slot.acc.data_ptr() == group.tensor[i].data_ptr()
    store["c"].acc.fill_(2.0)
    assert torch.equal(group.tensor[1], torch.full((4, 3), 2.0)) and group.tensor[0].abs().sum() == 0
    assert store.nbytes == 4 * (2 * 12 + 2 * 15 + 12)


def test_slot_add_is_the_weight_gradient_in_either_layout() -> None:
    store = AccumulatorStore([("lin", (5, 3), CPU), ("conv", (3, 5), CPU)])
    g, x = torch.randn(2, 7, 5), torch.randn(2, 7, 3)
    for _ in range(2):
        store["lin"].add(g, x, False)  # nn.Linear: (out, in) = G^T X
        store["conv"].add(g, x, True)  # transformers Conv1D: (in, out) = X^T G
    expected = 2 * g.reshape(-1, 5).double().T @ x.reshape(-1, 3).double()
    torch.testing.assert_close(store["lin"].acc.double(), expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(store["conv"].acc.double(), expected.T, rtol=1e-6, atol=1e-6)
    assert store.counts() == {"lin": 0, "conv": 0}  # counting is the capture op's job


def test_mean_gradients_divide_once_and_are_idempotent() -> None:
    store = AccumulatorStore([("a", (2, 2), CPU), ("b", (2, 2), CPU), ("idle", (2, 2), CPU)])
    store["a"].acc.copy_(torch.tensor([[4.0, 8.0], [12.0, 16.0]]))
    store["a"].count = 4
    store["b"].acc.fill_(3.0)
    store["b"].count = 3
    means = store.mean_gradients()
    assert list(means) == ["a", "b"]  # a layer without a backward pass has no mean
    assert torch.equal(means["a"], torch.tensor([[1.0, 2.0], [3.0, 4.0]])) and torch.equal(means["b"], torch.ones(2, 2))
    assert means["a"].data_ptr() == store["a"].acc.data_ptr()  # in place, no copy
    again = store.mean_gradients()
    assert again is means and torch.equal(again["a"], torch.tensor([[1.0, 2.0], [3.0, 4.0]]))  # not divided twice
    assert torch.equal(store.shape_groups[0].tensor[0], torch.tensor([[1.0, 2.0], [3.0, 4.0]]))


def test_magnitudes_per_layer_with_nan_inf_and_zero() -> None:
    names = ["big", "nan", "zero", "inf", "neg"]
    store = AccumulatorStore([(n, (2, 3), CPU) for n in names])
    store["big"].acc.copy_(torch.tensor([[1.0, -7.0, 2.0], [0.0, 3.0, 5.0]]))
    store["nan"].acc.copy_(torch.tensor([[1.0, float("nan"), 2.0], [0.0, 3.0, 5.0]]))
    store["inf"].acc[1, 2] = float("-inf")
    store["neg"].acc.fill_(-0.5)
    values = store.magnitudes()
    assert list(values) == names
    assert values["big"] == 7.0 and values["zero"] == 0.0 and values["inf"] == math.inf and values["neg"] == 0.5
    assert math.isnan(values["nan"])


def test_load_sets_one_pass_and_is_the_mean() -> None:
    store = AccumulatorStore([("a", (3, 2), CPU), ("b", (3, 2), CPU)])
    mean = torch.randn(3, 2)
    store.load("a", mean)
    assert store.counts() == {"a": 1, "b": 0}
    assert torch.equal(store["a"].acc, mean) and store["a"].acc.data_ptr() != mean.data_ptr()
    assert list(store.mean_gradients()) == ["a"] and torch.equal(store.mean_gradients()["a"], mean)


def test_reduce_is_a_no_op_without_torch_distributed() -> None:
    store = AccumulatorStore([("a", (2, 2), CPU)])
    store["a"].acc.fill_(1.0)
    store["a"].count = 2
    assert not is_distributed()
    store.reduce()
    assert store.counts() == {"a": 2} and torch.equal(store["a"].acc, torch.ones(2, 2))


def test_row_max_abs_matches_the_inf_norm_and_propagates_nan_and_inf() -> None:
    from loraga_fast.stores.exact import row_max_abs

    x = torch.randn(5, 7, 3, generator=torch.Generator().manual_seed(0))
    x[1, 2, 0] = -40.0  # a negative extreme is found through the minimum
    x[3, 0, 1], x[4, 6, 2] = float("nan"), float("-inf")
    expected = torch.linalg.vector_norm(x.flatten(1), ord=float("inf"), dim=1)
    got = row_max_abs(x)
    assert got[1] == 40.0 and torch.isnan(got[3]) and got[4] == float("inf")
    torch.testing.assert_close(got, expected, equal_nan=True)
    assert row_max_abs(torch.empty(0, 4, 4)).shape == (0,)
    assert row_max_abs(torch.empty(3, 0, 4)).tolist() == [0.0, 0.0, 0.0]  # an empty row shard on this rank
