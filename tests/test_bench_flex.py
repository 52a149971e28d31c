"""benchmarks/bench_flex.py on the CPU: config selection, mask building, JSON writing (tiny dry run)."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_flex  # noqa: E402
import common  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:.*flex_attention called without torch.compile")


def test_dry_run_writes_complete_json(tmp_path):
    out = tmp_path / "flex.json"
    payload = bench_flex.main(["--dry-run", "--configs", "dry-3d,dry-1d", "--out", str(out)])
    data = json.loads(out.read_text())
    assert data["env"]["card"] == "cpu" and data["env"]["torch"] and data["env"]["commit"]
    assert [c["name"] for c in data["configs"]] == ["dry-3d", "dry-1d"]
    for c in data["configs"]:
        assert c["dense"]["ms"] > 0 and c["flop_bound"] > 1
        assert len(c["variants"]) == len(next(x for x in bench_flex.DRY_CONFIGS if x.name == c["name"]).layouts)
        for v in c["variants"]:
            assert "error" not in v, v.get("error")
            assert v["spot_check_max_abs_err"] < 1e-4
            assert v["max_abs_diff_vs_first_variant"] < 1e-4
            assert v["kernel_ms"] > 0 and v["whole_ms"] > 0
            assert v["mask"]["warm_ms"] > 0 and v["mask"]["cold_ms"] > 0
        assert c["best_whole"]["whole_speedup"] == pytest.approx(c["dense"]["ms"] / c["best_whole"]["whole_ms"])
    assert payload["configs"][0]["variants"][0]["block_bound"] == pytest.approx(8.0)  # perfectly block-sparse


def test_selection():
    args = bench_flex.parse_args(["--quick"])
    configs, opts = bench_flex.select(args)
    assert [c.name for c in configs] == [c.name for c in bench_flex.CONFIGS]
    assert all(len(c.layouts) == 1 for c in configs) and len(opts) == 1
    args = bench_flex.parse_args(["--options", "all", "--configs", "3d-s1"])
    configs, opts = bench_flex.select(args)
    assert [c.name for c in configs] == ["3d-s1"] and opts == list(bench_flex.KERNEL_OPTIONS)
    with pytest.raises(SystemExit):
        bench_flex.select(bench_flex.parse_args(["--configs", "nope"]))
    assert not bench_flex.options_fit(bench_flex.KERNEL_OPTIONS["m128n128w8s2"], (128, 64))


def test_common_helpers():
    assert common.card_slug("NVIDIA H100 80GB HBM3") == "h100"
    assert common.card_slug("NVIDIA H200") == "h200"
    assert common.attention_tflops(10**6, 24, 128, 1, 1.0) == pytest.approx(4 * 128 * 24 * 1e6 / 1e-3 / 1e12)
    table = common.format_table([{"a": 1.5, "b": None}], [("a", "A", "{:.1f}"), ("b", "B", "{}")])
    assert "1.5" in table and "-" in table
