"""gna_flex.sim.simulate against brute-force enumeration of every (query, key) pair."""

from __future__ import annotations

import json
import math
import time

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gna_flex.sim import DEFAULT_TILES, simulate
from gna_flex.spec import count_pairs, make_params, neighbors, unravel


def _group_lengths(length: int, d: int) -> np.ndarray:
    """How many coordinates of an axis fall in each residue class modulo ``d``."""
    return np.bincount(np.arange(length) % d, minlength=d)


def brute_force(grid, ks, stride, dil, causal, q_tile, kv_tile, extra, tiling, visit, fold=True) -> dict:
    """Every count of a SimReport, by enumerating all (query, key) pairs and reducing to tiles.

    With ``fold`` tiles never mix dilation groups: a token's tile is keyed by
    its group on every axis and by its position inside the group's sub-grid (a
    box index per axis for multi tiling, a raster run for single tiling).
    Without it (multi tiling), a token's tile is its coordinate // tile.
    """
    params = make_params(grid, ks, stride, dil, causal)
    ndim, n = params.ndim, params.num_tokens
    coords_t = unravel(torch.arange(n), params.grid)
    mask = neighbors(params, [c[:, None] for c in coords_t], [c[None, :] for c in coords_t]).numpy()
    coords = [c.numpy() for c in coords_t]
    group = [c % d for c, d in zip(coords, params.dilation)]
    local = [c // d for c, d in zip(coords, params.dilation)]
    sub_len = [_group_lengths(L, d)[g] for L, d, g in zip(params.grid, params.dilation, group)]
    raster = np.zeros(n, dtype=np.int64)
    for a in range(ndim):
        raster = raster * sub_len[a] + local[a]

    if not fold:
        group = [np.zeros(n, dtype=np.int64) for _ in range(ndim)]
        local = coords

    def tile_keys(tile):
        if tiling == "multi":
            cols = group + [local[a] // tile[a] for a in range(ndim)]
        else:
            cols = group + [raster // tile[0]]
        return np.unique(np.stack(cols, axis=1), axis=0, return_inverse=True)

    q_keys, q_of = tile_keys(q_tile)
    k_keys, k_of = tile_keys(kv_tile)
    q_of, k_of = q_of.reshape(-1), k_of.reshape(-1)
    nq, nk = len(q_keys), len(k_keys)
    aq = np.zeros((nq, n)); aq[q_of, np.arange(n)] = 1
    ak = np.zeros((nk, n)); ak[k_of, np.arange(n)] = 1
    kv_vol = math.prod(kv_tile)
    q_vol = math.prod(q_tile)
    counts = aq @ mask.astype(np.float64) @ ak.T
    size_q, size_k = aq.sum(1), ak.sum(1)
    any_nb = counts > 0
    full = (counts == size_q[:, None] * size_k[None, :]) & (size_k == kv_vol)[None, :]

    reach = (aq @ mask.astype(np.float64)) > 0  # [nq, n]: keys some query of the tile attends to
    box = np.zeros_like(any_nb)
    for r in range(nq):
        keys = np.nonzero(reach[r])[0]
        same_group = np.all(np.stack([k_keys[:, a] == q_keys[r, a] for a in range(ndim)]), axis=0)
        if tiling == "multi":
            inside = same_group.copy()
            for a in range(ndim):
                lo, hi = local[a][keys].min() // kv_tile[a], local[a][keys].max() // kv_tile[a]
                inside &= (k_keys[:, ndim + a] >= lo) & (k_keys[:, ndim + a] <= hi)
        else:
            lo, hi = raster[keys].min() // kv_tile[0], raster[keys].max() // kv_tile[0]
            inside = same_group & (k_keys[:, ndim] >= lo) & (k_keys[:, ndim] <= hi)
        box[r] = inside
    assert not np.any(full & ~any_nb) and not np.any(any_nb & ~box)
    chosen = box if visit == "box" else any_nb

    n_extra = -(-extra // kv_vol)
    extra_full = extra // kv_vol
    visited = int(chosen.sum()) + nq * n_extra
    n_full = int(full.sum()) + nq * extra_full
    q_complete = size_q == q_vol
    n_full_cq = int((full & q_complete[:, None]).sum()) + int(q_complete.sum()) * extra_full
    allowed = int(mask.sum()) + n * extra
    return {
        "visited": visited,
        "visited_full": n_full,
        "visited_partial": visited - n_full,
        "visited_full_complete_q": n_full_cq,
        "perfectly_block_sparse": visited == n_full,
        "allowed_pairs": allowed,
        "flop_speedup": n * (n + extra) / allowed,
        "num_q_tiles": nq,
        "num_kv_tiles": nk,
        "num_extra_kv_tiles": n_extra,
        "padding_waste": {"q": 1 - n / (nq * q_vol), "kv": 1 - (n + extra) / ((nk + n_extra) * kv_vol)},
        "tile_speedup": (-(-n // q_vol) * -(-(n + extra) // kv_vol)) / visited,
    }


@st.composite
def sim_configs(draw, max_tokens=400):
    ndim = draw(st.integers(1, 3))
    tiling = draw(st.sampled_from(["multi", "single"]))
    grid, ks, stride, dil, causal = [], [], [], [], []
    cap = {1: 40, 2: 14, 3: 7}[ndim]
    for _ in range(ndim):
        d = draw(st.integers(1, 3))
        w = draw(st.integers(2, max(2, min(6, cap // d))))
        length = draw(st.integers(w * d, max(w * d, cap)))
        grid.append(length)
        ks.append(w)
        stride.append(draw(st.integers(1, w)))
        dil.append(d)
        causal.append(draw(st.booleans()))
    if tiling == "multi":
        q_tile = tuple(draw(st.integers(1, 5)) for _ in range(ndim))
        kv_tile = tuple(draw(st.integers(1, 5)) for _ in range(ndim))
    else:
        q_tile = (draw(st.integers(1, 24)),)
        kv_tile = (draw(st.integers(1, 24)),)
    extra = draw(st.sampled_from([0, 0, 1, 5, 8, 13]))
    visit = draw(st.sampled_from(["box", "exact"]))
    fold = tiling == "single" or draw(st.booleans())
    return (tuple(grid), tuple(ks), tuple(stride), tuple(dil), tuple(causal), q_tile, kv_tile, extra, tiling, visit,
            fold)


def _compare(cfg) -> None:
    grid, ks, stride, dil, causal, q_tile, kv_tile, extra, tiling, visit, *fold = cfg
    fold = fold[0] if fold else True
    want = brute_force(*cfg)
    rep = simulate(grid, ks, stride, dil, causal, q_tile=q_tile if tiling == "multi" else q_tile[0],
                   kv_tile=kv_tile if tiling == "multi" else kv_tile[0], extra_tokens=extra,
                   tiling=tiling, visit=visit, fold_dilation=fold)
    got = rep.asdict()
    for key, value in want.items():
        if isinstance(value, float):
            assert got[key] == pytest.approx(value, rel=1e-12), (key, cfg)
        elif isinstance(value, dict):
            for k2, v2 in value.items():
                assert got[key][k2] == pytest.approx(v2, abs=1e-12), (key, k2, cfg)
        else:
            assert got[key] == value, (key, got[key], value, cfg)
    assert rep.visited_full + rep.visited_partial == rep.visited
    assert bool(rep.reasons) != rep.perfectly_block_sparse, cfg
    assert ("not perfectly" in rep.explanation) != rep.perfectly_block_sparse


@given(sim_configs())
def test_matches_brute_force(cfg):
    _compare(cfg)


@pytest.mark.slow
@settings(max_examples=400)
@given(sim_configs())
def test_matches_brute_force_long(cfg):
    _compare(cfg)


@pytest.mark.parametrize(
    "cfg",
    [
        # perfectly block-sparse: Q tile divides the stride, KV tile divides the window
        ((16, 16), (8, 8), (4, 4), (1, 1), (False, False), (4, 4), (4, 4), 0, "multi", "box"),
        ((12,), (6,), (3,), (2,), (True,), (3,), (3,), 0, "multi", "exact"),
        # odd shapes, every causal combination, extra tokens that fill / don't fill a tile
        ((5, 7, 6), (3, 4, 2), (2, 3, 1), (1, 1, 3), (True, False, True), (2, 3, 2), (3, 2, 1), 7,
         "multi", "box"),
        ((5, 7, 6), (3, 4, 2), (2, 3, 1), (1, 1, 3), (True, False, True), (10,), (9,), 9, "single", "box"),
        ((5, 7, 6), (3, 4, 2), (2, 3, 1), (1, 1, 3), (True, False, True), (10,), (9,), 9, "single", "exact"),
        ((9, 11), (4, 5), (4, 1), (2, 2), (False, True), (7,), (16,), 16, "single", "box"),
        # tiles of the undilated grid (the flex path's order)
        ((9, 11), (4, 5), (4, 1), (2, 2), (False, True), (2, 3), (1, 4), 3, "multi", "box", False),
        ((9, 11), (4, 5), (4, 1), (2, 2), (False, True), (2, 3), (1, 4), 3, "multi", "exact", False),
        ((12, 10), (3, 3), (1, 3), (3, 2), (True, False), (1, 1), (1, 1), 0, "multi", "exact", False),
    ],
)
def test_hand_picked_configs(cfg):
    _compare(cfg)


def test_box_and_exact_differ_under_single_tiling():
    box = simulate((6, 40), (3, 3), tiling="single", q_tile=8, kv_tile=8, visit="box")
    exact = simulate((6, 40), (3, 3), tiling="single", q_tile=8, kv_tile=8, visit="exact")
    assert (box.visited, exact.visited) == (378, 234)
    multi_box = simulate((6, 40), (3, 3), q_tile=(2, 4), kv_tile=(2, 4), visit="box")
    multi_exact = simulate((6, 40), (3, 3), q_tile=(2, 4), kv_tile=(2, 4), visit="exact")
    assert multi_box.asdict() | {"visit": "exact"} == multi_exact.asdict()
    assert box.visited_full == exact.visited_full


@pytest.mark.parametrize(
    "grid, ks, want",
    [((30, 48, 80), (18, 24, 24), 11.11), ((256, 256), (80, 80), 10.24), (32768, 2048, 16.0)],
)
def test_known_flop_speedups(grid, ks, want):
    rep = simulate(grid, ks)
    assert round(rep.flop_speedup, 2) == want
    params = make_params(grid, ks)
    assert rep.flop_speedup == params.num_tokens**2 / count_pairs(params)


@pytest.mark.parametrize(
    "grid, ks, stride, tile, bound",
    [((30, 48, 80), (18, 24, 24), (16, 8, 8), (2, 8, 8), 11.11), ((256, 256), (80, 80), (16, 16), (16, 8), 10.24),
     (32768, 2048, 256, 128, 16.0)],
)
def test_paper_configs_are_perfectly_block_sparse(grid, ks, stride, tile, bound):
    rep = simulate(grid, ks, stride, q_tile=tile, kv_tile=tile)
    assert rep.perfectly_block_sparse and rep.visited_partial == 0
    assert round(rep.tile_speedup, 2) == bound == round(rep.flop_speedup, 2)
    sliding = simulate(grid, ks, 1, q_tile=tile, kv_tile=tile)
    assert not sliding.perfectly_block_sparse
    assert sliding.tile_speedup < rep.tile_speedup
    assert "stride 1 is not a multiple of the Q tile" in sliding.explanation


def test_explanation_names_axis_and_condition():
    rep = simulate((32, 30), (8, 8), (8, 8), q_tile=(8, 8), kv_tile=(8, 8))
    assert not rep.perfectly_block_sparse
    assert "axis 1: length 30 is not a multiple of the KV tile 8" in rep.explanation
    assert rep.padding_waste["q"] == pytest.approx(1 - 960 / 1024)
    causal = simulate(64, 16, 16, is_causal=True, q_tile=16, kv_tile=16)
    assert "causal" in causal.explanation and "axis 0" in causal.explanation
    misaligned = simulate(64, 12, 12, q_tile=4, kv_tile=8)
    assert "window 12 is not a multiple of the KV tile 8" in misaligned.explanation
    extra = simulate(64, 16, 16, q_tile=16, kv_tile=16, extra_tokens=5)
    assert "extra tokens" in extra.explanation and extra.visited_partial == extra.num_q_tiles


def test_default_tiles_and_json():
    for ndim, tile in DEFAULT_TILES.items():
        assert math.prod(tile) == 128
        rep = simulate((64,) * ndim, (8,) * ndim)
        assert rep.q_tile == tile and rep.kv_tile == tile
    rep = simulate((8, 8), (4, 4), tiling="single")
    assert rep.q_tile == (128,)
    data = json.loads(rep.to_json())
    for key in ("flop_speedup", "visited", "visited_full", "visited_partial", "tile_speedup",
                "perfectly_block_sparse", "padding_waste", "explanation"):
        assert key in data
    assert data == rep.asdict() | {"grid": [8, 8], "kernel_size": [4, 4], "stride": [1, 1], "dilation": [1, 1],
                                   "is_causal": [False, False], "q_tile": [128], "kv_tile": [128]}


@pytest.mark.parametrize(
    "kwargs, exc, text",
    [
        (dict(tiling="diagonal"), ValueError, "tiling"),
        (dict(visit="all"), ValueError, "visit"),
        (dict(q_tile=(0, 4)), ValueError, "q_tile[0]"),
        (dict(kv_tile=(4, 4, 4)), ValueError, "kv_tile"),
        (dict(q_tile=2.5), TypeError, "q_tile"),
        (dict(extra_tokens=-1), ValueError, "extra_tokens"),
        (dict(stride=(9, 1)), ValueError, "stride[0]"),
        (dict(tiling="single", q_tile=0), ValueError, "q_tile"),
    ],
)
def test_bad_arguments(kwargs, exc, text):
    with pytest.raises(exc, match=text.replace("[", r"\[").replace("]", r"\]")):
        simulate((16, 16), (8, 8), **kwargs)


def test_large_grid_runs_fast():
    """115,200 tokens: analytic per-axis counting, a few ms (bound generous for loaded CI machines)."""
    simulate((30, 48, 80), (18, 24, 24), (16, 8, 8))  # warm the per-axis caches' imports
    t0 = time.perf_counter()
    rep = simulate((30, 48, 80), (17, 23, 21), (3, 5, 7), dilation=(1, 2, 1), is_causal=(True, False, False))
    elapsed = time.perf_counter() - t0
    assert rep.num_tokens == 115_200 and rep.visited > 0
    assert elapsed < 0.5, f"simulate took {elapsed * 1e3:.1f} ms"
