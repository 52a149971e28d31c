"""Tile-major permutation, dilation folding and the index helpers of gna_flex.layout."""

import itertools
import math

import pytest
import torch
from hypothesis import given, strategies as st

from gna_flex import layout
from gna_flex.spec import unravel


@st.composite
def grids_and_tiles(draw):
    n = draw(st.integers(1, 3))
    grid = tuple(draw(st.integers(1, 9)) for _ in range(n))
    tile = tuple(draw(st.integers(1, 6)) for _ in range(n))
    return grid, tile


def _brute_positions(grid, tile):
    """Tile-major position of every raster token, by walking tiles in order (independent of layout)."""
    tiles = [-(-n // t) for n, t in zip(grid, tile)]
    pos = {}
    p = 0
    for tc in itertools.product(*[range(n) for n in tiles]):
        for rc in itertools.product(*[range(t) for t in tile]):
            c = tuple(a * t + r for a, t, r in zip(tc, tile, rc))
            if all(ci < n for ci, n in zip(c, grid)):
                pos[c] = p
            p += 1
    return pos, p


@given(grids_and_tiles(), st.booleans())
def test_permute_matches_brute_force_and_round_trips(gt, heads_last):
    grid, tile = gt
    b, h, d = 2, 3, 4
    x = torch.randn(b, *grid, h, d) if heads_last else torch.randn(b, h, *grid, d)
    y, lay = layout.permute(x, grid, tile, heads_last=heads_last)
    pos, total = _brute_positions(grid, tile)
    assert lay.num_tokens == total and lay.grid == grid
    ys = y if heads_last else y.transpose(1, 2)
    xs = x if heads_last else x.movedim(1, -2)
    seen = torch.zeros(total, dtype=torch.bool)
    for c, p in pos.items():
        assert torch.equal(ys[:, p], xs[(slice(None), *c)])
        seen[p] = True
    assert (ys[:, ~seen] == 0).all()  # padding is zero
    back = layout.unpermute(y, lay, heads_last=heads_last)
    assert torch.equal(back, x)


@given(grids_and_tiles())
def test_flat_input_and_output(gt):
    grid, tile = gt
    x = torch.randn(2, math.prod(grid), 3, 5)
    y, lay = layout.permute(x, grid, tile, flat=True)
    y2, _ = layout.permute(x.reshape(2, *grid, 3, 5), grid, tile)
    assert torch.equal(y, y2)
    assert torch.equal(layout.unpermute(y, lay, flat=True), x)


def test_extra_room_is_zero_and_grid_part_unchanged():
    x = torch.randn(1, 5, 6, 2, 3)
    y, lay = layout.permute(x, (5, 6), (2, 4), extra=7)
    assert y.shape == (1, lay.num_tokens + 7, 2, 3)
    assert (y[:, lay.num_tokens :] == 0).all()
    assert torch.equal(layout.unpermute(y[:, : lay.num_tokens], lay), x)


def test_rest_dims_can_be_heads_only():
    lse = torch.randn(2, 5, 7, 3)
    y, lay = layout.permute(lse, (5, 7), (2, 2))
    assert y.shape == (2, lay.num_tokens, 3)
    assert torch.equal(layout.unpermute(y, lay), lse)


def test_permute_is_differentiable():
    x = torch.randn(1, 5, 3, 2, 2, dtype=torch.float64, requires_grad=True)
    w = torch.randn(1, 6 * 4, 2, 2, dtype=torch.float64)

    def f(t):
        y, lay = layout.permute(t, (5, 3), (3, 2))
        return layout.unpermute(y * w, lay)

    assert torch.autograd.gradcheck(f, (x,))


@given(grids_and_tiles())
def test_index_helpers(gt):
    grid, tile = gt
    lay = layout.make_tile_layout(grid, tile)
    pos, total = _brute_positions(grid, tile)
    idx = torch.arange(total)
    coords = layout.tile_major_coords(idx, lay.tile, lay.tiles)
    valid = layout.coords_valid(coords, grid)
    assert int(valid.sum()) == math.prod(grid)
    for c, p in pos.items():
        assert tuple(int(t[p]) for t in coords) == c
    assert torch.equal(layout.tile_major_index(coords, lay.tile, lay.tiles), idx)
    # tensors as parameters (how mask_mods call it)
    ct = layout.tile_major_coords(idx, [torch.tensor(t) for t in lay.tile], [torch.tensor(t) for t in lay.tiles])
    assert all(torch.equal(a, b) for a, b in zip(ct, coords))


def test_raster_is_one_tile_per_row():
    grid = (3, 4, 5)
    lay = layout.make_tile_layout(grid, (1, 1, 5))
    idx = torch.arange(60)
    assert all(torch.equal(a, b) for a, b in zip(layout.tile_major_coords(idx, lay.tile, lay.tiles), unravel(idx, grid)))


@st.composite
def grids_and_dilations(draw):
    n = draw(st.integers(1, 3))
    grid = tuple(draw(st.integers(1, 9)) for _ in range(n))
    dil = tuple(draw(st.integers(1, 4)) for _ in range(n))
    return grid, dil


@given(grids_and_dilations(), st.booleans())
def test_fold_dilation(gd, heads_last):
    grid, dil = gd
    x = torch.randn(2, *grid, 3, 4) if heads_last else torch.randn(2, 3, *grid, 4)
    y, lay = layout.fold_dilation(x, grid, dil, heads_last=heads_last)
    m = tuple(-(-n // d) for n, d in zip(grid, dil))
    assert lay.folded_grid == m
    assert y.shape[0] == 2 * math.prod(dil)
    xs = x if heads_last else x.movedim(1, -2)
    ys = y if heads_last else y.movedim(1, -2)
    for b in range(2):
        for gs in itertools.product(*[range(d) for d in dil]):
            bb = b
            for g, d in zip(gs, dil):
                bb = bb * d + g
            for ii in itertools.product(*[range(k) for k in m]):
                c = tuple(i * d + g for i, d, g in zip(ii, dil, gs))
                inside = all(ci < n for ci, n in zip(c, grid))
                assert inside == all(i < lay.group_lengths(a)[g] for a, (i, g) in enumerate(zip(ii, gs)))
                got = ys[(bb, *ii)]
                assert torch.equal(got, xs[(b, *c)]) if inside else bool((got == 0).all())
    assert torch.equal(layout.unfold_dilation(y, lay, heads_last=heads_last), x)


def test_default_tile():
    assert layout.default_tile((1000,)) == (128,)
    assert layout.default_tile((64, 64)) == (16, 8)
    assert layout.default_tile((8, 16, 16)) == (2, 8, 8)
    assert math.prod(layout.default_tile((8, 16, 16), 64)) == 64


def test_bad_arguments():
    x = torch.randn(1, 4, 4, 2, 3)
    with pytest.raises(ValueError, match="tile\\[1\\]"):
        layout.permute(x, (4, 4), (2, 0))
    with pytest.raises(ValueError, match="grid"):
        layout.permute(x, (4, 5), (2, 2))
    with pytest.raises(ValueError, match="tile has 3 entries"):
        layout.permute(x, (4, 4), (2, 2, 2))
    with pytest.raises(ValueError, match="dilation\\[0\\]"):
        layout.fold_dilation(x, (4, 4), (0, 1))
    y, lay = layout.permute(x, (4, 4), 2)
    with pytest.raises(ValueError, match="tile-major tokens"):
        layout.unpermute(y[:, :-1], lay)
