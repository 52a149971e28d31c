"""Build script for gna_flex: pure Python, plus the CUDA extension ``gna_flex._C`` when asked.

The package metadata lives in pyproject.toml; this file only adds the optional
extension. ``gna_flex._C`` (csrc/binding.cpp plus the kernels under csrc/) is
built when ``nvcc`` is found AND a GPU architecture is requested or detected:

* ``GNA_FLEX_CUDA_ARCH``: ``90a``, ``100a`` or both (``"90a;100a"``; ``9.0``,
  ``sm_90a`` and ``90`` are read as ``90a``). ``none`` builds no extension.
* unset: ``nvidia-smi --query-gpu=compute_cap`` (9.0 -> 90a, 10.0 -> 100a);
  with no such GPU, nothing is built and the package is pure Python.

Kernel builds need the CUDA/CuTe headers of the ``nvidia-cutlass`` wheel (or
``CUTLASS_INCLUDE=/path/to/cutlass/include``) and pybind11, outside pip's build
isolation::

    pip install nvidia-cutlass==4.2.0.0 pybind11
    GNA_FLEX_CUDA_ARCH=90a pip install --no-build-isolation -e .

While working on the kernel, ``GNA_FLEX_CUDA_ARCH=90a python setup.py build_ext
--inplace`` rebuilds only what changed (objects are kept in build/gna_flex-cuda/).

Other environment variables: ``GNA_FLEX_BUILD_JOBS`` (parallel nvcc processes,
default: CPU count), ``GNA_FLEX_NVCC_FLAGS`` (extra nvcc flags, e.g. ``-lineinfo``),
``CUDA_HOME`` (toolkit root, default: the one of ``nvcc`` on PATH).

An explicit ``GNA_FLEX_CUDA_ARCH`` that cannot be honoured (no nvcc, no CUTLASS
headers, no pybind11) is an error; an auto-detected one only prints why the
extension is skipped.

.ci/compile_csrc.sh imports this file (under another module name) for
:func:`compile_check`, so the flags live in one place.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent
CSRC = ROOT / "csrc"
EXTENSION = "gna_flex._C"

ARCH_ENV = "GNA_FLEX_CUDA_ARCH"
JOBS_ENV = "GNA_FLEX_BUILD_JOBS"
NVCC_FLAGS_ENV = "GNA_FLEX_NVCC_FLAGS"

# Architectures with kernels, and the csrc/ subfolder holding each one's sources.
# Only the arch-specific ("a") targets: wgmma / tcgen05 exist only there.
ARCH_DIRS = {"90a": "sm90", "100a": "sm100"}
CAPABILITY_TO_ARCH = {(9, 0): "90a", (10, 0): "100a"}

NVCC_FLAGS = [
    "-std=c++17",
    "-O3",
    "--expt-relaxed-constexpr",
    "--use_fast_math",
    "-DNDEBUG",
    "-Xptxas=--warn-on-spills",
    "-Xcompiler=-fPIC",
]


class BuildConfigError(RuntimeError):
    """A requested kernel build that cannot be done; the message says what is missing."""


def log(message: str) -> None:
    print(f"gna_flex setup: {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- architectures


def parse_archs(value: str) -> list[str]:
    """``"90a;100a"`` -> ``["90a", "100a"]``; ``"none"`` or ``""`` -> ``[]``.

    Separators: ``;``, ``,`` or spaces. ``9.0``, ``sm_90``, ``sm_90a``, ``90`` all
    mean ``90a``. Raises ValueError naming GNA_FLEX_CUDA_ARCH for anything else.
    """
    archs: list[str] = []
    for token in re.split(r"[;,\s]+", value.strip().lower()):
        if token in ("", "none"):
            continue
        given = token
        token = token.removeprefix("sm_").removeprefix("compute_")
        if re.fullmatch(r"\d+\.\d+", token):
            major, minor = token.split(".")
            token = f"{major}{minor}"
        if token.isdigit():
            token += "a"
        if token not in ARCH_DIRS:
            raise ValueError(
                f"{ARCH_ENV}={value!r}: unknown architecture {given!r}; "
                f"allowed: {', '.join(ARCH_DIRS)} (separated by ';') or 'none'"
            )
        if token not in archs:
            archs.append(token)
    return archs


def detect_archs() -> list[str]:
    """Architectures of the visible GPUs that have kernels (via nvidia-smi); [] if none."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return []
    try:
        result = subprocess.run(
            [smi, "--query-gpu=compute_cap", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=60, check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return []
    archs: list[str] = []
    for line in result.stdout.split():
        try:
            major, minor = (int(x) for x in line.strip().split("."))
        except ValueError:
            continue
        arch = CAPABILITY_TO_ARCH.get((major, minor))
        if arch is not None and arch not in archs:
            archs.append(arch)
    return archs


# --------------------------------------------------------------------------- toolchain


def find_nvcc() -> str | None:
    """``$CUDA_HOME/bin/nvcc`` when CUDA_HOME is set, else nvcc on PATH."""
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and (Path(home) / "bin" / "nvcc").is_file():
        return str(Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc")


def cuda_root(nvcc: str) -> Path:
    """The toolkit root nvcc itself uses (its ``TOP``), so wrapper scripts on PATH work."""
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and (Path(home) / "include" / "cuda_runtime.h").is_file():
        return Path(home)
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "probe.cu"
        source.write_text("")
        result = subprocess.run(
            [nvcc, "--dryrun", "-c", str(source), "-o", str(Path(tmp) / "probe.o")],
            capture_output=True, text=True, check=False,
        )
    match = re.search(r"^#\$ TOP=(.+)$", result.stdout + result.stderr, re.MULTILINE)
    if match is None:
        return Path(nvcc).resolve().parent.parent
    return Path(match.group(1).strip()).resolve()


def cuda_lib_dir(root: Path) -> Path:
    for candidate in (root / "lib64", root / "lib", root / "targets" / "x86_64-linux" / "lib"):
        if (candidate / "libcudart.so").exists():
            return candidate
    raise BuildConfigError(f"libcudart.so not found under the CUDA toolkit at {root}")


def cutlass_includes() -> list[Path] | None:
    """CUTLASS/CuTe include dirs: ``$CUTLASS_INCLUDE`` or the nvidia-cutlass wheel's copy."""
    override = os.environ.get("CUTLASS_INCLUDE")
    if override:
        include = Path(override)
        if not (include / "cute").is_dir():
            return None
        util = include.parent / "tools" / "util" / "include"
        return [include] + ([util] if util.is_dir() else [])
    spec = importlib.util.find_spec("cutlass_library")
    if spec is None or not spec.submodule_search_locations:
        return None
    source = Path(list(spec.submodule_search_locations)[0]) / "source"
    include = source / "include"
    if not (include / "cute").is_dir():
        return None
    return [include, source / "tools" / "util" / "include"]


def pybind11_include() -> str | None:
    try:
        import pybind11
    except ImportError:
        return None
    return pybind11.get_include()


# --------------------------------------------------------------------------- sources


def kernel_sources(archs: list[str]) -> dict[Path, list[str]]:
    """Every csrc/**/*.cu and the architectures to compile it for.

    Files under csrc/sm90/ are built for 90a only, under csrc/sm100/ for 100a
    only (their instructions exist on no other target); other .cu files for
    every requested architecture. Files whose architecture is not requested
    are left out.
    """
    dir_arch = {folder: arch for arch, folder in ARCH_DIRS.items()}
    plan: dict[Path, list[str]] = {}
    for source in sorted(CSRC.rglob("*.cu")):
        top = source.relative_to(CSRC).parts[0]
        wanted = [dir_arch[top]] if top in dir_arch else list(archs)
        wanted = [a for a in wanted if a in archs]
        if wanted:
            plan[source] = wanted
    return plan


def has_sm90_kernel(plan: dict[Path, list[str]]) -> bool:
    return any("90a" in archs and source.relative_to(CSRC).parts[0] == "sm90" for source, archs in plan.items())


def nvcc_command(nvcc: str, source: Path, obj: Path, archs: list[str], includes: list[Path]) -> list[str]:
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    extra = shlex.split(os.environ.get(NVCC_FLAGS_ENV, ""))
    return [
        nvcc, *NVCC_FLAGS, *gencode, *extra,
        f"-I{CSRC}", *(f"-I{p}" for p in includes),
        "-c", str(source), "-o", str(obj),
    ]


def build_jobs(default: int | None = None) -> int:
    value = os.environ.get(JOBS_ENV) or os.environ.get("MAX_JOBS")
    if value:
        jobs = int(value)
        if jobs < 1:
            raise ValueError(f"{JOBS_ENV} must be >= 1, got {value}")
        return jobs
    return default or os.cpu_count() or 1


def _newest_header_mtime() -> float:
    headers = [p for ext in ("*.h", "*.hpp", "*.cuh", "*.inl") for p in CSRC.rglob(ext)]
    return max((p.stat().st_mtime for p in headers), default=0.0)


@dataclass
class CompileResult:
    source: Path
    obj: Path
    seconds: float
    output: str
    returncode: int
    cached: bool = False


def compile_kernels(
    nvcc: str,
    plan: dict[Path, list[str]],
    includes: list[Path],
    out_dir: Path,
    jobs: int,
    *,
    incremental: bool = True,
) -> list[Path]:
    """Compile each .cu of ``plan`` to an object under ``out_dir``, ``jobs`` nvcc at a time.

    With ``incremental``, an object is reused when it is newer than its source
    and every csrc header and was built with the same command. Raises
    BuildConfigError listing the files that failed (their nvcc output is printed).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    headers_mtime = _newest_header_mtime()

    def one(item: tuple[Path, list[str]]) -> CompileResult:
        source, archs = item
        rel = source.relative_to(CSRC)
        obj = out_dir / rel.with_suffix(".o")
        obj.parent.mkdir(parents=True, exist_ok=True)
        command = nvcc_command(nvcc, source, obj, archs, includes)
        stamp = obj.with_suffix(".cmd")
        digest = hashlib.sha256("\0".join(command).encode()).hexdigest()
        if (
            incremental
            and obj.exists()
            and stamp.exists()
            and stamp.read_text() == digest
            and obj.stat().st_mtime >= max(source.stat().st_mtime, headers_mtime)
        ):
            return CompileResult(source, obj, 0.0, "", 0, cached=True)
        start = time.perf_counter()
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        seconds = time.perf_counter() - start
        if result.returncode == 0:
            stamp.write_text(digest)
        elif stamp.exists():
            stamp.unlink()
        output = result.stdout + result.stderr
        if result.returncode != 0:
            output = "$ " + shlex.join(command) + "\n" + output
        return CompileResult(source, obj, seconds, output, result.returncode)

    start = time.perf_counter()
    failed: list[CompileResult] = []
    objects: list[Path] = []
    log(f"compiling {len(plan)} CUDA source(s) with {jobs} parallel nvcc job(s)")
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        for res in pool.map(one, plan.items()):
            rel = res.source.relative_to(ROOT)
            status = "cached" if res.cached else ("ok" if res.returncode == 0 else "FAILED")
            log(f"  {rel} [{', '.join(plan[res.source])}]: {status} ({res.seconds:.1f} s)")
            if res.output.strip():
                print(res.output.rstrip(), file=sys.stderr, flush=True)
            if res.returncode:
                failed.append(res)
            else:
                objects.append(res.obj)
    log(f"CUDA sources done in {time.perf_counter() - start:.1f} s")
    if failed:
        names = ", ".join(str(r.source.relative_to(ROOT)) for r in failed)
        raise BuildConfigError(f"nvcc failed on {names} (output above)")
    return objects


# --------------------------------------------------------------------------- the build plan


@dataclass
class BuildPlan:
    archs: list[str]
    nvcc: str
    cuda_root: Path
    cutlass: list[Path]
    pybind11: str


def plan_build() -> BuildPlan | None:
    """Decide whether to build gna_flex._C; None (and a printed reason) for pure Python."""
    value = os.environ.get(ARCH_ENV)
    explicit = value is not None and value.strip() != ""
    if explicit and value.strip().lower() == "none":
        log(f"{ARCH_ENV}=none: installing pure Python, without the CUDA extension")
        return None
    archs = parse_archs(value) if explicit else detect_archs()
    if not archs:
        log(f"no sm90/sm100 GPU detected and {ARCH_ENV} unset: installing pure Python, without the CUDA extension")
        return None

    def missing(what: str) -> None:
        message = f"cannot build the CUDA extension for {';'.join(archs)}: {what}"
        if explicit:
            raise BuildConfigError(f"{message} ({ARCH_ENV}={value!r} asked for it)")
        log(f"{message}; installing pure Python (set {ARCH_ENV}=none to silence this)")

    nvcc = find_nvcc()
    if nvcc is None:
        return missing("nvcc not found (set CUDA_HOME or put nvcc on PATH)")
    cutlass = cutlass_includes()
    if cutlass is None:
        return missing(
            "CUTLASS headers not found (no cute/ under $CUTLASS_INCLUDE or in the nvidia-cutlass "
            "wheel): pip install nvidia-cutlass==4.2.0.0 and build with --no-build-isolation, "
            "or set CUTLASS_INCLUDE"
        )
    pybind = pybind11_include()
    if pybind is None:
        return missing("pybind11 not importable: pip install pybind11 and build with --no-build-isolation")
    return BuildPlan(archs, nvcc, cuda_root(nvcc), cutlass, pybind)


def object_dir(archs: list[str]) -> Path:
    return ROOT / "build" / "gna_flex-cuda" / "-".join(archs)


def host_defines(plan: dict[Path, list[str]], archs: list[str]) -> list[tuple[str, str]]:
    defines = [("GNA_FLEX_CUDA_ARCHS", '"' + ";".join(archs) + '"')]
    if has_sm90_kernel(plan):
        defines.append(("GNA_FLEX_WITH_SM90", "1"))
    return defines


# --------------------------------------------------------------------------- CI compile check


def compile_check(archs: list[str], jobs: int, out_dir: Path) -> None:
    """Compile every csrc .cu for ``archs`` and binding.cpp to objects (no link, no GPU).

    Used by .ci/compile_csrc.sh. Raises BuildConfigError on any compile error.
    """
    nvcc = find_nvcc()
    if nvcc is None:
        raise BuildConfigError("nvcc not found")
    plan = kernel_sources(archs)
    if plan:
        includes = cutlass_includes()
        if includes is None:
            raise BuildConfigError("CUTLASS headers not found (pip install nvidia-cutlass==4.2.0.0 or set CUTLASS_INCLUDE)")
        compile_kernels(nvcc, plan, includes, out_dir, jobs, incremental=False)
    else:
        log(f"no .cu sources under csrc/ for {';'.join(archs)}")
    pybind = pybind11_include()
    if pybind is None:
        log("pybind11 not importable: binding.cpp not checked")
        return
    cxx = os.environ.get("CXX") or shutil.which("c++") or "g++"
    defines = [f"-D{name}={value}" for name, value in host_defines(plan, archs)]
    command = [
        cxx, "-std=c++17", "-fPIC", "-fvisibility=hidden", "-Wall", "-Wextra", *defines,
        f"-I{CSRC}", f"-I{cuda_root(nvcc) / 'include'}", f"-I{pybind}",
        f"-I{sysconfig.get_paths()['include']}",
        "-c", str(CSRC / "binding.cpp"), "-o", str(out_dir / "binding.o"),
    ]
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    log(f"  csrc/binding.cpp: {'ok' if result.returncode == 0 else 'FAILED'} ({time.perf_counter() - start:.1f} s)")
    if (result.stdout + result.stderr).strip():
        print((result.stdout + result.stderr).rstrip(), file=sys.stderr)
    if result.returncode != 0:
        raise BuildConfigError("binding.cpp failed to compile:\n$ " + shlex.join(command))


# --------------------------------------------------------------------------- setuptools


def _setup() -> None:
    from setuptools import Extension, setup
    from setuptools.command.build_ext import build_ext

    build = plan_build()
    if build is None:
        setup()
        return

    class BuildCudaExtension(build_ext):
        """Compiles the .cu files in parallel with nvcc, then lets setuptools build and link the binding."""

        def build_extension(self, ext: Extension) -> None:
            if ext.name == EXTENSION:
                start = time.perf_counter()
                plan = kernel_sources(build.archs)
                objects = compile_kernels(
                    build.nvcc, plan, build.cutlass, object_dir(build.archs), build_jobs()
                )
                ext.extra_objects = [str(p) for p in objects]
                ext.define_macros = host_defines(plan, build.archs)
                if not has_sm90_kernel(plan):
                    log("no sm90 kernel sources found: gna_flex._C will report the kernel as not built")
                # setuptools would skip the link when binding.cpp is older than the
                # .so, even though kernel objects or the arch list changed.
                self.force = True
                super().build_extension(ext)
                log(f"gna_flex._C built for {';'.join(build.archs)} in {time.perf_counter() - start:.1f} s")
            else:
                super().build_extension(ext)

    lib = cuda_lib_dir(build.cuda_root)
    log(f"building gna_flex._C for {';'.join(build.archs)} with {build.nvcc} (CUDA at {build.cuda_root})")
    extension = Extension(
        EXTENSION,
        sources=[str((CSRC / "binding.cpp").relative_to(ROOT))],
        include_dirs=[str(CSRC), str(build.cuda_root / "include"), build.pybind11],
        library_dirs=[str(lib)],
        # cudart only: the kernel reaches the driver (cuTensorMapEncodeTiled)
        # through cudaGetDriverEntryPoint, so libcuda is not a link dependency.
        libraries=["cudart"],
        runtime_library_dirs=[str(lib)],
        extra_compile_args=["-std=c++17", "-O2", "-fvisibility=hidden"],
        language="c++",
    )
    setup(ext_modules=[extension], cmdclass={"build_ext": BuildCudaExtension})


if __name__ == "__main__":
    try:
        _setup()
    except (BuildConfigError, ValueError) as error:
        sys.exit(f"gna_flex setup: error: {error}")
