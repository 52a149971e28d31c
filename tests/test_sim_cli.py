"""The gna-sim command line (gna_flex.sim.cli) and the tile-visit plot."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from gna_flex.sim import simulate
from gna_flex.sim.cli import main

PAPER = ["--grid", "30x48x80", "--kernel-size", "18x24x24", "--stride", "16x8x8", "--q-tile", "2x8x8",
         "--kv-tile", "2x8x8"]


def test_table(capsys):
    assert main(PAPER) == 0
    out = capsys.readouterr().out
    assert "11.11x" in out and "72,900" in out
    assert "perfectly block-sparse" in out and "yes" in out
    assert "predicted, kernel (sm90)" in out and "predicted, flex (sm90)" in out


def test_table_explains_partial_tiles(capsys):
    assert main(["--grid", "256x256", "--kernel-size", "80x80", "--q-tile", "16x8", "--kv-tile", "16x8"]) == 0
    out = capsys.readouterr().out
    assert "not perfectly block-sparse" in out and "axis 0" in out and "axis 1" in out


def test_json_matches_simulate(capsys):
    assert main(PAPER + ["--json", "--extra-tokens", "5", "--causal", "0x0x1", "--path", "flex"]) == 0
    data = json.loads(capsys.readouterr().out)
    rep = simulate((30, 48, 80), (18, 24, 24), (16, 8, 8), is_causal=(False, False, True), q_tile=(2, 8, 8),
                   kv_tile=(2, 8, 8), extra_tokens=5)
    assert {k: v for k, v in data.items() if k != "estimates"} == json.loads(rep.to_json())
    assert [e["path"] for e in data["estimates"]] == ["flex"]


def test_single_tiling_shows_the_matching_path(capsys):
    assert main(["--grid", "16x16", "--kernel-size", "4x4", "--tiling", "single", "--visit", "exact",
                 "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["tiling"] == "single" and [e["path"] for e in data["estimates"]] == ["flex"]


def test_recommend(capsys):
    assert main(["--grid", "30x48x80", "--kernel-size", "18x24x24", "--stride", "1", "--recommend",
                 "--top", "3"]) == 0
    out = capsys.readouterr().out
    assert "<- input" in out and "rank" in out
    assert main(["--grid", "256x256", "--kernel-size", "80x80", "--recommend", "--json", "--top", "2"]) == 0
    recs = json.loads(capsys.readouterr().out)
    assert len(recs) == 2 and recs[0]["perfectly_block_sparse"] is True


@pytest.mark.parametrize(
    "argv",
    [
        ["--grid", "30x48", "--kernel-size", "18x24x24"],
        ["--grid", "30x48", "--kernel-size", "1x2"],
        ["--grid", "30xa", "--kernel-size", "4"],
        ["--kernel-size", "4"],
        ["--grid", "64", "--kernel-size", "8", "--stride", "9"],
        ["--grid", "64", "--kernel-size", "8", "--tiling", "diagonal"],
        ["--grid", "64", "--kernel-size", "8", "--causal", "maybe"],
        ["--grid", "64", "--kernel-size", "8", "--recommend", "--tiling", "single"],
        ["--grid", "64", "--kernel-size", "8", "--heads", "0"],
    ],
)
def test_bad_arguments_one_line_exit_2(argv, capsys):
    assert main(argv) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert captured.out == ""
    assert err.startswith("gna-sim: error: ") and "\n" not in err


def test_module_entry_point():
    res = subprocess.run([sys.executable, "-m", "gna_flex.sim", "--grid", "256x256", "--kernel-size", "80x80",
                          "--stride", "16x16", "--q-tile", "16x8", "--kv-tile", "16x8"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "10.24x" in res.stdout
    bad = subprocess.run([sys.executable, "-m", "gna_flex.sim", "--grid", "8", "--kernel-size", "9"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1


@pytest.mark.parametrize(
    "argv",
    [
        PAPER[:6],  # 3-D, stride 16x8x8, default tiles
        ["--grid", "256x256", "--kernel-size", "80x80", "--q-tile", "16x8", "--kv-tile", "16x8"],
        ["--grid", "512", "--kernel-size", "64", "--q-tile", "32", "--kv-tile", "32", "--plot-q-tile", "3"],
        ["--grid", "20x21", "--kernel-size", "5x6", "--dilation", "2x3", "--causal", "1x0", "--q-tile", "4x4",
         "--kv-tile", "4x2"],
    ],
)
def test_plot_png(argv, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    png = tmp_path / "visits.png"
    assert main(argv + ["--plot", str(png)]) == 0
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000
    assert "plot written" in capsys.readouterr().out


def test_plot_bad_tile_index(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    assert main(["--grid", "64x64", "--kernel-size", "8x8", "--plot", str(tmp_path / "x.png"),
                 "--plot-q-tile", "9x0"]) == 2
    assert "q_tile_index[0]" in capsys.readouterr().err


def test_plot_without_matplotlib(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert main(["--grid", "64", "--kernel-size", "8", "--plot", str(tmp_path / "x.png")]) == 1
    err = capsys.readouterr().err
    assert "matplotlib" in err and "gna_flex[plot]" in err and err.count("\n") == 1


def test_dilated_config_gets_one_report_per_path(capsys):
    assert main(["--grid", "32x64", "--kernel-size", "8x8", "--dilation", "1x2", "--q-tile", "8x8",
                 "--kv-tile", "8x8", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["fold_dilation"] is True
    flex = simulate((32, 64), (8, 8), dilation=(1, 2), q_tile=(8, 8), kv_tile=(8, 8), fold_dilation=False,
                    visit="exact")
    kernel = simulate((32, 64), (8, 8), dilation=(1, 2), q_tile=(8, 8), kv_tile=(8, 8))
    from gna_flex.sim import estimate

    by_path = {e["path"]: e for e in data["estimates"]}
    assert by_path["flex"]["gna_ms"] == pytest.approx(estimate(flex, 24, 128, path="flex").gna_ms)
    assert by_path["kernel"]["gna_ms"] == pytest.approx(estimate(kernel, 24, 128, path="kernel").gna_ms)
    assert main(["--grid", "32x64", "--kernel-size", "8x8", "--dilation", "1x2", "--undilated-tiles",
                 "--visit", "exact", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["fold_dilation"] is False
