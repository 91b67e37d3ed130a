"""KVState: bucketed views, capacity, parked rows, rollback."""
import pytest
import torch

from adadecode_fx.runtime import KVState

SHAPES = [((1, 2, 1, 8), (1, 2, 1, 4)), ((1, 2, 1, 8), (1, 2, 1, 4)), ((1, 3, 1, 6), (1, 3, 1, 5))]


def state(capacity=50, bucket=16, shapes=SHAPES):
    return KVState(shapes, capacity, torch.float64, "cpu", bucket)


def test_buffers_follow_kv_shapes():
    s = state()
    assert len(s.buffers) == len(SHAPES) and s.fill == [0, 0, 0] and s.parked == {}
    for (k, v), (ks, vs) in zip(s.buffers, SHAPES):
        assert k.shape == (1, ks[1], 50, ks[3]) and v.shape == (1, vs[1], 50, vs[3])
        assert k.dtype == v.dtype == torch.float64
        assert not k.any() and not v.any()


@pytest.mark.parametrize("upto,length", [(1, 16), (15, 16), (16, 16), (17, 32), (32, 32), (33, 48), (49, 50),
                                         (50, 50)])
def test_views_round_up_to_bucket_within_capacity(upto, length):
    s = state(capacity=50, bucket=16)
    views = s.views(upto)
    assert len(views) == len(SHAPES)
    for (k, v), (bk, bv) in zip(views, s.buffers):
        assert k.shape[2] == v.shape[2] == length
        assert k.shape[:2] == bk.shape[:2] and k.shape[3] == bk.shape[3] and v.shape[3] == bv.shape[3]


def test_views_alias_the_buffers():
    s = state(bucket=8)
    k, v = s.views(3)[1]
    k[0, 0, 2].fill_(7.0)
    v.index_copy_(2, torch.tensor([5]), torch.ones(1, 2, 1, 4, dtype=torch.float64))
    assert s.buffers[1][0][0, 0, 2].eq(7.0).all()
    assert s.buffers[1][1][:, :, 5].eq(1.0).all()
    assert not s.buffers[0][0].any()  # other layers untouched


def test_bucket_one_gives_exact_lengths():
    s = state(capacity=10, bucket=1)
    assert [s.views(n)[0][0].shape[2] for n in (1, 4, 10)] == [1, 4, 10]


def test_capacity_exceeded():
    s = state(capacity=20, bucket=16)
    assert s.views(20)[0][0].shape[2] == 20
    with pytest.raises(RuntimeError, match="capacity 20 exceeded"):
        s.views(21)


def test_park_concatenates_in_arrival_order():
    s = state()
    a, b, c = (torch.full((1, n, 4), float(x)) for n, x in ((2, 1), (1, 2), (3, 3)))
    s.park(1, a)
    s.park(1, b)
    s.park(2, c)
    got = s.take_parked(1)
    assert torch.equal(got, torch.cat([a, b], dim=1))
    assert got[0, :, 0].tolist() == [1.0, 1.0, 2.0]
    assert s.take_parked(1) is None  # taking empties the slot
    assert torch.equal(s.take_parked(2), c)
    assert s.take_parked(0) is None and s.parked == {}


def test_rollback_moves_fill_only():
    s = state()
    s.fill = [12, 9, 7]
    s.buffers[0][0].fill_(3.0)
    assert s.pending_rows() == 5
    s.rollback(10)
    assert s.fill == [10, 9, 7]
    s.rollback(8)
    assert s.fill == [8, 8, 7]
    assert s.pending_rows() == 1
    s.rollback(20)  # never grows
    assert s.fill == [8, 8, 7]
    assert s.buffers[0][0].eq(3.0).all()  # stale rows stay; they are masked by position, not cleared


def test_rollback_with_parked_rows_is_refused():
    s = state()
    s.fill = [6, 4, 4]
    s.park(0, torch.zeros(1, 2, 4))
    with pytest.raises(AssertionError, match="parked"):
        s.rollback(5)
    assert s.fill == [6, 4, 4]
