import itertools
import math

import pytest
import torch
from hypothesis import given

from _oracle import axis_window as oracle_window
from _oracle import coords, is_neighbor
from gna_flex.spec import (
    axis_window,
    count_pairs,
    make_params,
    neighbors,
    unravel,
)
from strategies import gna_configs


def test_axis_window_matches_rule_exhaustively_small():
    for length in range(2, 14):
        for d in range(1, length // 2 + 1):
            for w in range(2, length // d + 1):
                for s in range(1, w + 1):
                    for c in (False, True):
                        i = torch.arange(length)
                        got = torch.stack(axis_window(i, length, w, s, d, c), dim=1).tolist()
                        want = [list(oracle_window(x, length, w, s, d, c)) for x in range(length)]
                        assert got == want, (length, w, s, d, c)


@given(gna_configs())
def test_axis_window_with_tensor_parameters(cfg):
    grid, ks, st_, di, ca = cfg
    for a in range(len(grid)):
        i = torch.arange(grid[a])
        as_int = axis_window(i, grid[a], ks[a], st_[a], di[a], ca[a])
        t = lambda x: torch.tensor(x)  # noqa: E731
        as_tensor = axis_window(i, t(grid[a]), t(ks[a]), t(st_[a]), t(di[a]), t(ca[a]))
        for x, y in zip(as_int, as_tensor):
            assert torch.equal(x, y)


@given(gna_configs(max_len=9))
def test_neighbors_vs_brute_force(cfg):
    grid, ks, st_, di, ca = cfg
    p = make_params(grid, ks, st_, di, ca)
    idx = torch.arange(p.num_tokens)
    got = neighbors(p, unravel(idx[:, None], grid), unravel(idx[None, :], grid))
    pts = coords(grid)
    want = torch.tensor([[is_neighbor(q, k, grid, ks, st_, di, ca) for k in pts] for q in pts])
    assert torch.equal(got, want)
    assert count_pairs(p) == int(want.sum())


def test_every_query_has_kernel_size_neighbours_when_not_causal():
    p = make_params((7, 9), (3, 4), (2, 3), (2, 1))
    idx = torch.arange(p.num_tokens)
    m = neighbors(p, unravel(idx[:, None], p.grid), unravel(idx[None, :], p.grid))
    assert (m.sum(1) == 12).all()


def test_stride_equal_kernel_is_blocked_attention():
    p = make_params(12, 4, 4)
    idx = torch.arange(12)
    m = neighbors(p, [idx[:, None]], [idx[None, :]])
    assert torch.equal(m, (idx[:, None] // 4) == (idx[None, :] // 4))


@pytest.mark.parametrize(
    "grid, ks, want",
    [((30, 48, 80), (18, 24, 24), 11.11), ((256, 256), (80, 80), 10.24), (32768, 2048, 16.0)],
)
def test_flop_wise_speedup_of_paper_configs(grid, ks, want):
    p = make_params(grid, ks)
    assert round(p.num_tokens**2 / count_pairs(p), 2) == want


def test_unravel_round_trip():
    grid = (3, 5, 7)
    idx = torch.arange(math.prod(grid))
    c = unravel(idx, grid)
    assert torch.equal((c[0] * 5 + c[1]) * 7 + c[2], idx)
    assert list(zip(*(x.tolist() for x in c))) == list(itertools.product(range(3), range(5), range(7)))


def test_params_expand_and_tensorise():
    p = make_params((10, 12), 4, stride=(2, 3), dilation=1, is_causal=(True, False))
    assert p.kernel_size == (4, 4) and p.stride == (2, 3) and p.is_causal == (True, False)
    assert p.as_tensor().tolist() == [[10, 12], [4, 4], [2, 3], [1, 1], [1, 0]]
    assert not p.is_dense() and make_params((4, 5), (4, 5)).is_dense()


@pytest.mark.parametrize(
    "kwargs, exc, words",
    [
        (dict(grid=(8,), kernel_size=1), ValueError, ["kernel_size[0]", "axis 0", ">= 2"]),
        (dict(grid=(8, 8), kernel_size=(3, 3), stride=(1, 4)), ValueError, ["stride[1]", "axis 1", "[1, kernel_size=3]"]),
        (dict(grid=(8,), kernel_size=3, stride=0), ValueError, ["stride[0]"]),
        (dict(grid=(8,), kernel_size=3, dilation=0), ValueError, ["dilation[0]", ">= 1"]),
        (dict(grid=(8, 9), kernel_size=(3, 5), dilation=(1, 2)), ValueError, ["axis 1", "<= the grid length 9", "5 * 2 = 10"]),
        (dict(grid=(8, 8), kernel_size=(3, 3, 3)), ValueError, ["kernel_size has 3 entries", "2 axes"]),
        (dict(grid=(8,), kernel_size=2.5), TypeError, ["kernel_size"]),
        (dict(grid=(8,), kernel_size=(True,)), TypeError, ["kernel_size[0]"]),
        (dict(grid=(8,), kernel_size=3, is_causal=(1.0,)), TypeError, ["is_causal[0]"]),
        (dict(grid=(0, 8), kernel_size=3), ValueError, ["grid[0]", ">= 1"]),
        (dict(grid=(-2,), kernel_size=3), ValueError, ["grid[0]"]),
        (dict(grid=(2, 2, 2, 2), kernel_size=2), ValueError, ["1, 2 or 3 axes"]),
        (dict(grid=(8.0,), kernel_size=2), TypeError, ["grid[0]"]),
    ],
)
def test_invalid_parameters_raise_with_argument_and_axis(kwargs, exc, words):
    with pytest.raises(exc) as info:
        make_params(**kwargs)
    for w in words:
        assert w in str(info.value), (w, str(info.value))


def test_rule_is_traceable_by_vmap_and_compile():
    p = make_params((6, 7), (3, 4), (2, 1), (1, 1), (False, True))
    t = p.as_tensor()

    def mask(qi, ki):
        q = unravel(qi, (6, 7))
        k = unravel(ki, (6, 7))
        out = torch.ones((), dtype=torch.bool)
        for a in range(2):
            g, s, e = axis_window(q[a], t[0, a], t[1, a], t[2, a], t[3, a], t[4, a])
            kk = k[a] // t[3, a]
            out = out & (k[a] % t[3, a] == g) & (s <= kk) & (kk < e)
        return out

    idx = torch.arange(42)
    got = torch.vmap(torch.vmap(mask, in_dims=(None, 0)), in_dims=(0, None))(idx, idx)
    want = neighbors(p, unravel(idx[:, None], p.grid), unravel(idx[None, :], p.grid))
    assert torch.equal(got, want)
    compiled = torch.compile(mask, backend="eager", fullgraph=True)
    assert bool(compiled(torch.tensor(5), torch.tensor(6))) == bool(want[5, 6])
