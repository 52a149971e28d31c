"""gna_flex.sim.recommend: ranking of nearby configs by predicted speedup."""

from __future__ import annotations

import math

import pytest

from gna_flex.sim import estimate, recommend, simulate
from gna_flex.sim.cost import path_simulate_kwargs


def _check_entry(r, grid, heads=24, head_dim=128, path="kernel"):
    rep = simulate(grid, r.kernel_size, r.stride, q_tile=r.q_tile, kv_tile=r.kv_tile, **path_simulate_kwargs(path))
    assert rep.asdict() == r.report.asdict()
    est = estimate(rep, heads, head_dim, path=path)
    assert r.predicted_speedup == pytest.approx(est.speedup)
    assert r.perfectly_block_sparse == rep.perfectly_block_sparse


@pytest.mark.parametrize("path", ["kernel", "flex"])
def test_paper_3d_search_finds_perfectly_block_sparse_configs(path):
    recs = recommend((30, 48, 80), (18, 24, 24), path=path, top=6)
    assert len(recs) == 6
    speeds = [r.predicted_speedup for r in recs]
    assert speeds == sorted(speeds, reverse=True)
    assert recs[0].perfectly_block_sparse
    assert [r.rank for r in recs] == list(range(1, 7))
    for r in recs:
        assert r.kernel_size == (18, 24, 24) and math.prod(r.q_tile) == 128
        _check_entry(r, (30, 48, 80), path=path)
    # every perfectly block-sparse candidate beats the sliding window one
    sliding = estimate(simulate((30, 48, 80), (18, 24, 24), 1), 24, 128, path=path)
    assert recs[-1].predicted_speedup > sliding.speedup


def test_fixed_stride_searches_tiles_and_shows_the_input():
    recs = recommend((30, 48, 80), (18, 24, 24), stride=1, q_tile=None, top=3)
    assert all(r.stride == (1, 1, 1) for r in recs)
    inputs = [r for r in recs if r.is_input]
    assert len(inputs) == 1 and inputs[0].q_tile == (2, 8, 8)
    ranked = [r for r in recs if r.rank > 0]
    assert [r.predicted_speedup for r in ranked] == sorted([r.predicted_speedup for r in ranked], reverse=True)
    assert ranked[0].predicted_speedup >= inputs[0].predicted_speedup


def test_fixed_everything_returns_the_input_only():
    recs = recommend((256, 256), (80, 80), (16, 16), q_tile=(16, 8), kv_tile=(16, 8))
    assert len(recs) == 1
    assert recs[0].is_input and recs[0].rank == 1 and recs[0].perfectly_block_sparse
    _check_entry(recs[0], (256, 256))


def test_kernel_size_tolerance():
    recs = recommend((64, 64), (13, 11), stride=1, q_tile=(8, 8), kernel_size_tolerance=(3, 0), top=20)
    assert {r.kernel_size[1] for r in recs} == {11}
    assert {r.kernel_size[0] for r in recs if not r.is_input} <= set(range(10, 17))
    assert len({r.kernel_size for r in recs}) > 1
    for r in recs:
        _check_entry(r, (64, 64))


def test_asdict_is_flat():
    r = recommend(1024, 128, top=1)[0]
    d = r.asdict()
    assert d["predicted_speedup"] == r.predicted_speedup and "explanation" in d and "report" not in d


@pytest.mark.parametrize(
    "kwargs, text",
    [
        (dict(kernel_size_tolerance=-1), "kernel_size_tolerance"),
        (dict(top=0), "top"),
        (dict(tile_volume=100), "tile_volume"),
        (dict(q_tile=(0, 8)), r"q_tile\[0\]"),
        (dict(kernel_size_tolerance=(200, 200)), "candidates"),
    ],
)
def test_bad_arguments(kwargs, text):
    with pytest.raises(ValueError, match=text):
        recommend((2048, 2048), (16, 16), **kwargs)


@pytest.mark.parametrize("path", ["kernel", "flex"])
def test_padded_grid_ranking_matches_estimate(path):
    """16x44x80 (Cosmos): axis 1 is not a tile multiple, so flex counts padded Q tiles as partial."""
    recs = recommend((16, 44, 80), (8, 16, 16), path=path, top=4, extra_tokens=100)
    for r in recs:
        rep = simulate((16, 44, 80), r.kernel_size, r.stride, q_tile=r.q_tile, kv_tile=r.kv_tile, extra_tokens=100)
        assert r.predicted_speedup == pytest.approx(estimate(rep, 24, 128, path=path).speedup)


@pytest.mark.parametrize("path", ["kernel", "flex"])
def test_dilated_ranking_uses_the_paths_tiling(path):
    """The kernel tiles inside a dilation group, the flex path tiles the undilated grid."""
    recs = recommend((32, 64), (8, 8), dilation=(1, 2), path=path, top=3, q_tile=(8, 16))
    kwargs = {"kernel": dict(visit="box", fold_dilation=True), "flex": dict(visit="exact", fold_dilation=False)}
    for r in recs:
        rep = simulate((32, 64), r.kernel_size, r.stride, (1, 2), q_tile=r.q_tile, kv_tile=r.kv_tile,
                       **kwargs[path])
        assert r.report.asdict() == rep.asdict()
        assert r.predicted_speedup == pytest.approx(estimate(rep, 24, 128, path=path).speedup)
    if path == "flex":
        assert not any(r.perfectly_block_sparse for r in recs)
