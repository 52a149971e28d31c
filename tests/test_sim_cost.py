"""gna_flex.sim cost model (estimate), its constants, and the calibration fit of benchmarks/calibrate_sim.py."""

from __future__ import annotations

import copy
import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

from gna_flex.sim import estimate, load_calibration, simulate
from gna_flex.sim.cost import cost_features, device_family, head_dim_efficiency, path_simulate_kwargs

ROOT = Path(__file__).resolve().parents[1]
# The packaged sm90 constants: calibrate_sim.py --from-results on these (see gna_flex/sim/calibration.json).
H100_FIT_FILES = ("calibrate-h100-run1.json", "calibrate-h100.json", "kernel-h100.json")


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


PAPER_3D = ((30, 48, 80), (18, 24, 24), (16, 8, 8), (2, 8, 8))


def test_packaged_constants_are_complete():
    cal = load_calibration()
    assert set(cal["families"]) >= {"sm90", "default"}
    for fam in cal["families"].values():
        assert fam["status"] in ("calibrated", "uncalibrated")
        for key in ("card", "date", "torch", "source"):
            assert fam[key]
        assert fam["dense"]["tflops"] > 0
        for path in ("flex", "kernel"):
            assert fam[path]["full_tflops"] > 0
            assert set(fam[path]["partial_tflops"]) == {"1", "2", "3"}
            assert all(v > 0 for v in fam[path]["partial_tflops"].values())
        assert fam["flex"]["permute_gbps"] > 0
        table = fam.get("head_dim_efficiency")
        if table is not None:
            ref = str(table["reference"])
            for part in ("dense", "kernel", "flex"):
                assert table[part][ref] == 1.0
                assert all(0 < v <= 1.5 for v in table[part].values())
            # every non-reference factor says where it was fitted from
            for part in ("dense", "kernel", "flex"):
                assert set(table[part]) - {ref} == set(table["fitted_from"].get(part, {}))


def test_packaged_sm90_head_dim_efficiency_is_fitted_from_the_committed_results():
    table = load_calibration()["families"]["sm90"]["head_dim_efficiency"]
    assert table["reference"] == 128
    # Measured on the H100 at head dim 64 (bench_kernel.py's runs.d64: cuDNN, the fused kernel and the flex
    # path): all three run well below their D=128 rate.
    for part in ("dense", "kernel", "flex"):
        assert 0.5 < table[part]["64"] < 0.9
        assert table["fitted_from"][part]["64"]["files"] == ["benchmarks/results/kernel-h100.json"]
        assert table["fitted_from"][part]["64"]["records"] == 6
        assert (ROOT / table["fitted_from"][part]["64"]["files"][0]).is_file()


def test_estimate_terms_add_up_and_scale():
    grid, ks, stride, tile = PAPER_3D
    rep = simulate(grid, ks, stride, q_tile=tile, kv_tile=tile)
    est = estimate(rep, heads=24, head_dim=128, batch=1, dtype=torch.bfloat16, device="sm90", path="kernel")
    assert est.gna_ms == pytest.approx(sum(est.breakdown.values()))
    assert est.speedup == pytest.approx(est.dense_ms / est.gna_ms)
    assert est.breakdown["partial_ms"] == 0 and est.breakdown["permute_ms"] == 0
    flex = estimate(rep, 24, 128, 1, "bfloat16", "sm90", "flex")
    assert flex.breakdown["permute_ms"] > 0
    # Work and bytes are linear in batch * heads; only the launch term is not.
    big = estimate(rep, 48, 128, 2, "bfloat16", "sm90", "flex")
    launch = flex.breakdown["launch_ms"]
    assert big.gna_ms - launch == pytest.approx(4 * (flex.gna_ms - launch))
    fp32 = estimate(rep, 24, 128, 1, torch.float32, "sm90", "kernel")
    assert fp32.gna_ms > 5 * est.gna_ms
    assert fp32.dtype == "float32"


def test_partial_tiles_cost_more_than_full_ones():
    grid, ks, _, tile = PAPER_3D
    sliding = simulate(grid, ks, 1, q_tile=tile, kv_tile=tile)
    strided = simulate(grid, ks, (16, 8, 8), q_tile=tile, kv_tile=tile)
    for path in ("kernel", "flex"):
        a = estimate(sliding, 24, 128, path=path)
        b = estimate(strided, 24, 128, path=path)
        assert a.breakdown["partial_ms"] > 0
        assert a.gna_ms > b.gna_ms and a.dense_ms == b.dense_ms
        # a partial tile pair is slower than a full one of the same size
        per_full = b.breakdown["full_ms"] / strided.visited_full
        per_partial = a.breakdown["partial_ms"] / sliding.visited_partial
        assert per_partial > per_full


def test_features_count_tile_work():
    rep = simulate((64, 64), (16, 16), (8, 8), q_tile=(8, 8), kv_tile=(8, 8), extra_tokens=64)
    f = cost_features(rep, heads=2, head_dim=64, batch=3, dtype="float16", path="flex")
    per_pair = 4 * 64 * 64 * 64 * 2 * 3 * 1e-12
    assert f["full_tflop"] == pytest.approx(rep.visited_full * per_pair)
    assert f["partial_tflop"] == pytest.approx(rep.visited_partial * per_pair)
    assert f["dense_tflop"] == pytest.approx(4 * 4096 * (4096 + 64) * 64 * 2 * 3 * 1e-12)
    assert f["permute_gb"] == pytest.approx((8 * 4096 + 4 * 64) * 2 * 64 * 3 * 2 * 1e-9)
    assert cost_features(rep, 2, 64, 3, "float16", "kernel")["permute_gb"] == 0


def test_device_family():
    assert device_family("sm90") == "sm90"
    assert device_family("default") == "default"
    assert device_family(torch.device("cpu")) == "default"
    if not torch.cuda.is_available():
        assert device_family(None) == "default"


@pytest.mark.parametrize(
    "kwargs, text",
    [
        (dict(path="triton"), "path"),
        (dict(dtype="int8"), "dtype"),
        (dict(heads=0), "heads"),
        (dict(head_dim=-1), "head_dim"),
        (dict(batch=1.5), "batch"),
    ],
)
def test_bad_arguments(kwargs, text):
    rep = simulate(64, 16)
    args = dict(heads=4, head_dim=64) | kwargs
    with pytest.raises(ValueError, match=text):
        estimate(rep, **args)


def test_single_tiling_must_match_the_paths_visit_rule():
    rep = simulate((16, 16), (4, 4), tiling="single", visit="box")
    estimate(rep, 4, 64, path="kernel")
    with pytest.raises(ValueError, match="visit='exact'"):
        estimate(rep, 4, 64, path="flex")


def test_calibration_fit_recovers_known_constants():
    cal = _script("calibrate_sim")
    family = "sm90"
    truth = copy.deepcopy(load_calibration()["families"][family])
    truth["dense"] = {"tflops": 555.0, "launch_us": 12.0}
    truth["flex"].update(full_tflops=333.0, permute_gbps=1800.0, launch_us=40.0,
                         partial_tflops={"1": 150.0, "2": 111.0, "3": 77.0})
    truth["kernel"].update(full_tflops=500.0, launch_us=20.0, partial_tflops={"1": 300.0, "2": 280.0, "3": 260.0})
    records = cal.synthetic(cal.CONFIGS, 24, 128, 1, torch.bfloat16, family, True, constants=truth, noise=0.0)
    fitted = cal.fit(records, family, "test card", torch.__version__)
    assert fitted["status"] == "calibrated" and fitted["card"] == "test card"
    assert fitted["dense"]["tflops"] == pytest.approx(555.0, rel=1e-6)
    for path in ("flex", "kernel"):
        assert fitted[path]["full_tflops"] == pytest.approx(truth[path]["full_tflops"], rel=1e-6)
        for r in ("1", "2", "3"):
            assert fitted[path]["partial_tflops"][r] == pytest.approx(truth[path]["partial_tflops"][r], rel=1e-6)
    assert fitted["flex"]["permute_gbps"] == pytest.approx(1800.0, rel=1e-6)
    rows = cal.predictions(records, family, fitted)
    assert rows and max(abs(r["error_pct"]) for r in rows) < 1e-6


def test_calibrate_dry_run_and_compare(tmp_path, capsys):
    cal = _script("calibrate_sim")
    out = tmp_path / "cal.json"
    assert cal.main(["--dry-run", "--quick", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    for key in ("card", "torch", "commit", "records", "constants", "predictions"):
        assert key in data
    assert all(r["dense_ms"] > 0 and r["flex_ms"] > 0 for r in data["records"])
    capsys.readouterr()
    cmp = _script("compare_sim")
    assert cmp.main([str(out), "--calibration", str(out), "--json"]) == 0
    all_rows = json.loads(capsys.readouterr().out)
    rows = [r for r in all_rows if r["path"] != "dense"]
    assert len(rows) == len(data["predictions"]) == 2 * len(data["records"])  # flex and kernel
    # one dense row per distinct dense measurement (configs of one grid share it)
    dense = [r for r in all_rows if r["path"] == "dense"]
    assert len(dense) == len({(tuple(r["grid"]), r["extra_tokens"], r["dense_ms"]) for r in data["records"]})
    assert all(r["measured_speedup"] is None and math.isfinite(r["error_pct"]) for r in dense)
    for row, pred in zip(rows, data["predictions"]):
        assert (row["name"], row["path"]) == (pred["name"], pred["path"])
        assert row["predicted_ms"] == pytest.approx(pred["predicted_ms"])
        assert math.isfinite(row["error_pct"])


def test_compare_reads_other_result_layouts(tmp_path, capsys):
    cmp = _script("compare_sim")
    f = tmp_path / "bench.json"
    f.write_text(json.dumps({
        "card": "NVIDIA H200",
        "heads": 24,
        "results": [
            {"config": {"grid": "256x256", "kernel_size": [80, 80], "stride": [16, 16], "tile": [16, 8]},
             "flex_ms": 12.6, "cudnn_ms": 88.0},
            {"grid": [32768], "window": [2048], "stride": [256], "tile": [128], "kernel_ms": 2.0},
            {"note": "no problem description: skipped"},
        ],
    }))
    assert cmp.main([str(f), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["path"] for r in rows] == ["flex", "dense", "kernel"]
    assert rows[0]["measured_speedup"] == pytest.approx(88.0 / 12.6)
    dense = estimate(simulate((256, 256), (80, 80), (16, 16), q_tile=(16, 8), kv_tile=(16, 8),
                              **path_simulate_kwargs("flex")), 24, 128, path="flex").dense_ms
    assert rows[1]["predicted_ms"] == pytest.approx(dense) and rows[1]["measured_ms"] == 88.0
    assert rows[0]["flop_speedup"] == pytest.approx(65536**2 / (65536 * 6400), rel=1e-2)


def test_dilated_reports_must_match_the_path():
    folded = simulate((32, 64), (8, 8), (8, 8), dilation=(1, 2), q_tile=(8, 8), kv_tile=(8, 8))
    native = simulate((32, 64), (8, 8), (8, 8), dilation=(1, 2), q_tile=(8, 8), kv_tile=(8, 8), fold_dilation=False,
                      visit="exact")
    assert native.visited > folded.visited and native.visited_full < folded.visited_full
    estimate(folded, 4, 64, path="kernel")
    estimate(native, 4, 64, path="flex")
    with pytest.raises(ValueError, match="fold_dilation=False"):
        estimate(folded, 4, 64, path="flex")
    with pytest.raises(ValueError, match="fold_dilation=True"):
        estimate(native, 4, 64, path="kernel")
    box = simulate((32, 64), (8, 8), dilation=(1, 2), q_tile=(8, 8), kv_tile=(8, 8), fold_dilation=False)
    with pytest.raises(ValueError, match="visit='exact'"):
        estimate(box, 4, 64, path="flex")


def test_compare_reads_bench_flex_and_bench_kernel_files(tmp_path, capsys):
    cmp = _script("compare_sim")
    flex_file = tmp_path / "flex-h200.json"
    flex_file.write_text(json.dumps({
        "benchmark": "bench_flex",
        "env": {"card": "NVIDIA H200", "capability": "9.0"},
        "setup": {"dtype": "torch.bfloat16", "batch": 1, "heads": 24, "head_dim": 128},
        "configs": [{
            "name": "3d-s1", "grid": [30, 48, 80], "kernel_size": [18, 24, 24], "stride": [1, 1, 1],
            "dense": {"ms": 270.0},
            "variants": [
                {"tile": [2, 8, 8], "block": [128, 128], "options": "a", "kernel_ms": 200.0, "whole_ms": 203.0},
                {"tile": [2, 8, 8], "block": [128, 64], "options": "a", "kernel_ms": 190.0, "whole_ms": 193.0},
                {"tile": [2, 8, 8], "block": [128, 128], "options": "b", "error": "boom"},
            ],
        }],
    }))
    kernel_file = tmp_path / "kernel-h200.json"
    kernel_file.write_text(json.dumps({"runs": {"d128": {
        "card": "NVIDIA H200", "capability": "9.0", "dtype": "bf16", "batch": 1, "heads": 24, "head_dim": 128,
        "rows": [{"name": "2d-s16", "grid": [256, 256], "kernel_size": [80, 80], "stride": [16, 16],
                  "cudnn_ms": 88.0, "kernel_ms": 9.0, "flex_ms": 12.5}],
    }}}))
    assert cmp.main([str(flex_file), str(kernel_file), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["path"] for r in rows] == ["flex", "flex-nopermute", "dense", "flex", "flex-nopermute", "flex", "kernel",
                                         "dense"]
    sliding = simulate((30, 48, 80), (18, 24, 24), 1, q_tile=(2, 8, 8), kv_tile=(2, 8, 8), visit="exact")
    est = estimate(sliding, 24, 128, path="flex")
    assert rows[0]["predicted_ms"] == pytest.approx(est.gna_ms)
    assert rows[1]["predicted_ms"] == pytest.approx(est.gna_ms - est.breakdown["permute_ms"])
    half = simulate((30, 48, 80), (18, 24, 24), 1, q_tile=(2, 8, 8), kv_tile=(1, 8, 8), visit="exact")
    assert rows[3]["predicted_ms"] == pytest.approx(estimate(half, 24, 128, path="flex").gna_ms)
    assert rows[6]["measured_speedup"] == pytest.approx(88.0 / 9.0)
    assert cmp.family_of(json.loads(kernel_file.read_text()), None) == "sm90"


def test_calibrate_measuring_code_runs_on_cpu(capsys):
    """--cpu-smoke runs the measuring code (flex_na, layout permutation, SDPA) on tiny shapes."""
    cal = _script("calibrate_sim")
    assert cal.main(["--cpu-smoke"]) == 0
    out = capsys.readouterr().out
    records = json.loads(out[out.index("["):])
    assert len(records) == len(cal.SMOKE_CONFIGS)
    for rec in records:
        assert rec["dense_ms"] > 0 and rec["flex_ms"] > 0 and rec["permute_ms"] > 0


_TABLE = {"reference": 128, "kernel": {"64": 0.5, "128": 1.0, "256": 0.9}, "dense": {"128": 1.0}}


@pytest.mark.parametrize(
    "part, head_dim, want, measured",
    [
        ("kernel", 64, 0.5, True),
        ("kernel", 128, 1.0, True),
        ("kernel", 256, 0.9, True),
        ("kernel", 90, 0.5 + 0.5 * (math.log2(90) - 6), False),  # between 64 and 128, linear in log2
        ("kernel", 181, 1.0 - 0.1 * (math.log2(181) - 7), False),  # between 128 and 256
        ("kernel", 32, 0.5, False),  # below the measured range: clamped
        ("kernel", 512, 0.9, False),  # above it: clamped
        ("dense", 64, 1.0, False),  # only the reference measured
        ("flex", 64, 1.0, False),  # no table for the part
    ],
)
def test_head_dim_efficiency_lookup(part, head_dim, want, measured):
    got, got_measured = head_dim_efficiency({"head_dim_efficiency": _TABLE}, part, head_dim)
    assert got == pytest.approx(want) and got_measured is measured


def test_head_dim_efficiency_without_a_table_is_linear_and_unmeasured():
    assert head_dim_efficiency({}, "kernel", 64) == (1.0, False)
    with pytest.raises(ValueError, match="head_dim"):
        head_dim_efficiency({"head_dim_efficiency": _TABLE}, "kernel", 0)
    with pytest.raises(ValueError, match="kernel"):
        head_dim_efficiency({"head_dim_efficiency": {"kernel": {"64": 0.0, "128": 1.0}}}, "kernel", 128)


@pytest.mark.parametrize("path", ["kernel", "flex"])
def test_estimate_scales_compute_rates_by_head_dim_efficiency(path):
    grid, ks, _, tile = PAPER_3D
    rep = simulate(grid, ks, 1, q_tile=tile, kv_tile=tile, **path_simulate_kwargs(path))
    consts = copy.deepcopy(load_calibration()["families"]["sm90"])
    heads = int(torch.randint(1, 32, ()).item())
    e_path, e_dense = (0.5 + 0.4 * torch.rand(2)).tolist()
    consts["head_dim_efficiency"] = {"reference": 128, path: {"64": e_path, "128": 1.0},
                                     "dense": {"64": e_dense, "128": 1.0}}
    cal = {"format": 1, "families": {"sm90": consts}}
    hi = estimate(rep, heads, 128, path=path, calibration=cal)
    lo = estimate(rep, heads, 64, path=path, calibration=cal)
    assert hi.efficiency == {"head_dim": 128, "gna": 1.0, "dense": 1.0, "gna_measured": True, "dense_measured": True}
    assert lo.efficiency == {"head_dim": 64, "gna": e_path, "dense": e_dense, "gna_measured": True,
                             "dense_measured": True}
    # Half the work at the lower rate: compute time times 0.5 / efficiency; launch unchanged, permutation halved.
    for term in ("full_ms", "partial_ms"):
        assert lo.breakdown[term] == pytest.approx(hi.breakdown[term] * 0.5 / e_path)
    assert lo.breakdown["launch_ms"] == hi.breakdown["launch_ms"]
    assert lo.breakdown["permute_ms"] == pytest.approx(hi.breakdown["permute_ms"] * 0.5)
    launch = consts["dense"]["launch_us"] * 1e-3
    assert lo.dense_ms - launch == pytest.approx((hi.dense_ms - launch) * 0.5 / e_dense)
    mid = estimate(rep, heads, 96, path=path, calibration=cal)
    assert not mid.efficiency["gna_measured"] and e_path < mid.efficiency["gna"] < 1.0


def test_packaged_estimate_marks_unmeasured_head_dims():
    rep = simulate((256, 256), (80, 80), (16, 16), q_tile=(16, 8), kv_tile=(16, 8))
    k64 = estimate(rep, 24, 64, path="kernel")
    assert k64.efficiency["gna_measured"] and k64.efficiency["dense_measured"] and k64.efficiency["gna"] < 0.9
    flex_rep = simulate((256, 256), (80, 80), (16, 16), q_tile=(16, 8), kv_tile=(16, 8), **path_simulate_kwargs("flex"))
    f64 = estimate(flex_rep, 24, 64, path="flex")
    assert f64.efficiency["gna_measured"] and f64.efficiency["dense_measured"]
    f256 = estimate(flex_rep, 24, 256, path="flex")
    assert not f256.efficiency["gna_measured"] and not f256.efficiency["dense_measured"]
    k32 = estimate(rep, 24, 32, path="kernel")
    assert not k32.efficiency["gna_measured"] and k32.efficiency["gna"] == k64.efficiency["gna"]
    other = estimate(rep, 24, 64, device="default", path="kernel")
    assert other.efficiency["gna"] == 1.0 and not other.efficiency["gna_measured"]


def test_head_dim_efficiency_fit_recovers_known_factors():
    cal = _script("calibrate_sim")
    family = "sm90"
    truth = copy.deepcopy(load_calibration()["families"][family])
    want = {"dense": 0.81, "kernel": 0.67, "flex": 0.74}
    truth["head_dim_efficiency"] = {"reference": 128, **{p: {"64": e, "128": 1.0} for p, e in want.items()}}
    configs = cal.CONFIGS[:3] + cal.CONFIGS[6:8]
    records = []
    for d in (128, 64):
        records += cal.synthetic(configs, 8, d, 1, torch.bfloat16, family, True, constants=truth, noise=0.0)
    table = cal.fit_head_dim_efficiency(cal.normalised(records), truth, 128, ["synthetic"])
    assert table["reference"] == 128
    for part, e in want.items():
        assert table[part] == {"64": pytest.approx(e, rel=1e-9), "128": 1.0}
        assert table["fitted_from"][part]["64"]["max_error_pct"] < 1e-6
    assert "in-sample" in table["source"] and "not measured" in table["source"]


def test_refit_from_committed_results_reproduces_the_packaged_constants():
    """calibrate_sim.py --from-results on the committed H100 files gives exactly the packaged sm90 family."""
    cal = _script("calibrate_sim")
    files = [ROOT / "benchmarks" / "results" / f for f in H100_FIT_FILES]
    if not all(f.exists() for f in files):
        pytest.skip("the committed H100 result files are not in this checkout")
    family, constants, rows = cal.refit_from_results(files)
    packaged = load_calibration()["families"]["sm90"]
    assert family == "sm90"

    def close(a, b):
        if isinstance(a, dict):
            assert set(a) == set(b)
            for k in a:
                close(a[k], b[k])
        elif isinstance(a, float):
            assert a == pytest.approx(b, rel=1e-9)
        else:
            assert a == b

    close(constants, packaged)
    # the head-dim-64 kernel and dense records meet the 15% goal under the refitted constants (flex at 64:
    # one factor for all configs, in-sample within 25%)
    d64 = [r for r in rows if r["head_dim"] == 64]
    assert {r["path"] for r in d64} == {"kernel", "dense", "flex"} and len(d64) == 18
    assert max(abs(r["error_pct"]) for r in d64 if r["path"] != "flex") < 15
    assert max(abs(r["error_pct"]) for r in d64) < 25


def test_from_results_refuses_synthetic_timings(tmp_path, capsys):
    cal = _script("calibrate_sim")
    out = tmp_path / "dry.json"
    assert cal.main(["--dry-run", "--quick", "--head-dims", "64", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert {r["head_dim"] for r in data["records"]} == {64, 128} and data["reference_head_dim"] == 128
    assert set(data["constants"]["head_dim_efficiency"]["fitted_from"]) == {"dense", "kernel", "flex"}
    capsys.readouterr()
    assert cal.main(["--from-results", str(out)]) == 2
    assert "synthetic" in capsys.readouterr().err
    # the same records, marked measured, refit (the efficiency from the head-dim-64 half)
    data["dry_run"] = False
    out.write_text(json.dumps(data))
    family, constants, rows = cal.refit_from_results([out])
    assert family == "sm90" and constants["head_dim_efficiency"]["fitted_from"]["kernel"]["64"]["records"] == 7
    assert {r["head_dim"] for r in rows} == {64, 128}


def test_committed_results_kernel_and_dense_rows_meet_the_goal(capsys):
    """compare_sim.py over the committed H100 results: every kernel and dense row, head dims 64 and 128, within 15%.

    Named exceptions: the launch-sized "1d small 4096/512" kernel records. The same kernel code measured
    0.213 ms (calibrate-h100-run1.json) and 0.411 ms (calibrate-h100.json) in two runs on H100s; both are in
    the fit, which lands between them (predicts 0.254 ms: +19% and -38%).
    """
    cmp = _script("compare_sim")
    files = sorted((ROOT / "benchmarks" / "results").glob("*h100*.json"))
    if not any(f.name == "kernel-h100.json" for f in files):
        pytest.skip("the committed H100 result files are not in this checkout")
    assert cmp.main([str(f) for f in files] + ["--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    checked = [r for r in rows if r["path"] in ("kernel", "dense")]
    assert {r["head_dim"] for r in checked} == {64, 128}
    assert all(r["head_dim_measured"] for r in checked)
    over = [(Path(r["file"]).name, r["name"], r["path"]) for r in checked if abs(r["error_pct"]) >= 15]
    assert sorted(over) == [("calibrate-h100-run1.json", "1d small 4096/512", "kernel"),
                            ("calibrate-h100.json", "1d small 4096/512", "kernel")]
