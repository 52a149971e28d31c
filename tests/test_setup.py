"""CPU tests of setup.py's build decisions: architecture parsing, source plan, nvcc flags."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setup_module():
    """setup.py imported under another name, so its setup() call does not run."""
    spec = importlib.util.spec_from_file_location("gna_flex_setup_under_test", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


@pytest.mark.parametrize(
    "value, expected",
    [
        ("90a", ["90a"]),
        ("90a;100a", ["90a", "100a"]),
        ("9.0, 10.0", ["90a", "100a"]),
        ("sm_90a sm_90", ["90a"]),
        ("90", ["90a"]),
        ("none", []),
        ("", []),
    ],
)
def test_parse_archs(setup_module, value, expected):
    assert setup_module.parse_archs(value) == expected


@pytest.mark.parametrize("value", ["80", "sm_89", "120a", "hopper"])
def test_parse_archs_rejects_unknown(setup_module, value):
    with pytest.raises(ValueError, match="GNA_FLEX_CUDA_ARCH.*allowed: 90a, 100a"):
        setup_module.parse_archs(value)


def test_kernel_sources_follow_their_folder(setup_module, tmp_path, monkeypatch):
    for rel in ("sm90/a.cu", "sm90/sub/b.cu", "sm100/c.cu", "common.cu", "binding.cpp", "sm90/h.cuh"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("")
    monkeypatch.setattr(setup_module, "CSRC", tmp_path)

    plan = {str(p.relative_to(tmp_path)): archs for p, archs in setup_module.kernel_sources(["90a"]).items()}
    assert plan == {"common.cu": ["90a"], "sm90/a.cu": ["90a"], "sm90/sub/b.cu": ["90a"]}

    both = setup_module.kernel_sources(["90a", "100a"])
    plan = {str(p.relative_to(tmp_path)): archs for p, archs in both.items()}
    assert plan["sm100/c.cu"] == ["100a"] and plan["common.cu"] == ["90a", "100a"]
    assert setup_module.has_sm90_kernel(both)
    assert not setup_module.has_sm90_kernel(setup_module.kernel_sources(["100a"]))


def test_nvcc_command(setup_module, monkeypatch):
    monkeypatch.setenv(setup_module.NVCC_FLAGS_ENV, "-lineinfo")
    cmd = setup_module.nvcc_command("nvcc", Path("x.cu"), Path("x.o"), ["90a", "100a"], [Path("/inc")])
    for flag in ("-std=c++17", "-O3", "--expt-relaxed-constexpr", "--use_fast_math", "-DNDEBUG",
                 "-Xptxas=--warn-on-spills", "-Xcompiler=-fPIC", "-lineinfo", "-I/inc",
                 "-gencode=arch=compute_90a,code=sm_90a", "-gencode=arch=compute_100a,code=sm_100a"):
        assert flag in cmd
    assert cmd[-4:] == ["-c", "x.cu", "-o", "x.o"]


def test_build_jobs(setup_module, monkeypatch):
    monkeypatch.delenv("MAX_JOBS", raising=False)
    monkeypatch.setenv(setup_module.JOBS_ENV, "3")
    assert setup_module.build_jobs() == 3
    monkeypatch.setenv(setup_module.JOBS_ENV, "0")
    with pytest.raises(ValueError, match=setup_module.JOBS_ENV):
        setup_module.build_jobs()


def test_plan_build_none_and_missing_nvcc(setup_module, monkeypatch):
    monkeypatch.setenv(setup_module.ARCH_ENV, "none")
    assert setup_module.plan_build() is None
    monkeypatch.setattr(setup_module, "find_nvcc", lambda: None)
    monkeypatch.setenv(setup_module.ARCH_ENV, "90a")
    with pytest.raises(setup_module.BuildConfigError, match="nvcc not found"):
        setup_module.plan_build()
    # Auto-detected but unbuildable: pure Python, no error.
    monkeypatch.delenv(setup_module.ARCH_ENV)
    monkeypatch.setattr(setup_module, "detect_archs", lambda: ["90a"])
    assert setup_module.plan_build() is None
