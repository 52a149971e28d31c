"""CPU tests of gna_flex.cutlass: validation, support reasons, and the arguments handed to gna_flex._C.

The extension is replaced by a recorder where a test needs it, so every check
here runs without a GPU. tests/gpu/test_kernel.py runs the real kernel.
"""

from __future__ import annotations

import types

import pytest
import torch

from gna_flex import cutlass
from gna_flex.spec import make_params

BF16 = torch.bfloat16


def _qkv(grid=(6, 8), heads=4, heads_kv=2, dim=64, batch=2, dtype=BF16):
    q = torch.randn(batch, *grid, heads, dim, dtype=dtype)
    k = torch.randn(batch, *grid, heads_kv, dim, dtype=dtype)
    v = torch.randn(batch, *grid, heads_kv, dim, dtype=dtype)
    return q, k, v


class FakeExtension(types.SimpleNamespace):
    """Stands in for gna_flex._C: records FwdParams keyword arguments and launches."""

    def __init__(self, supports_message: str = "", has_sm90: bool = True):
        super().__init__(
            HAS_SM90=has_sm90, CUDA_ARCHS="90a" if has_sm90 else "", DTYPE_FLOAT16=0, DTYPE_BFLOAT16=1,
            supports_message=supports_message, launches=[],
        )

    def FwdParams(self, **kwargs):  # noqa: N802 (mirrors the extension's class name)
        return kwargs

    def supports(self, params):
        return self.supports_message

    def forward(self, params, stream):
        if self.supports(params):  # like the binding: the launch re-checks and raises
            raise RuntimeError(self.supports(params))
        self.launches.append((params, stream))


@pytest.fixture
def fake_kernel(monkeypatch):
    """A fake extension on a pretend sm90 device, so CPU tensors reach the argument building."""
    ext = FakeExtension()
    monkeypatch.setattr(cutlass, "_load", lambda: (ext, None))
    monkeypatch.setattr(cutlass, "_placement_reason", lambda named: None)
    monkeypatch.setattr(cutlass, "_device_reason", lambda device: None)
    monkeypatch.setattr(cutlass, "_launch", lambda e, params, device: e.forward(params, 1234))
    return ext


# --------------------------------------------------------------------------- reasons


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA answer; this machine has CUDA")
def test_not_available_without_cuda():
    assert cutlass.is_available() is False


def test_cpu_tensors_are_unsupported_and_forward_says_why():
    q, k, v = _qkv()
    params = make_params((6, 8), 3)
    reason = cutlass.unsupported_reason(q, k, v, params)
    assert reason is not None and "query is on cpu" in reason and "CUDA" in reason
    with pytest.raises(RuntimeError, match="query is on cpu"):
        cutlass.forward(q, k, v, params, scale=None)


def test_float32_is_unsupported():
    q, k, v = _qkv(dtype=torch.float32)
    reason = cutlass.unsupported_reason(q, k, v, make_params((6, 8), 3))
    assert reason is not None and "torch.float32" in reason and "bfloat16" in reason


def test_non_contiguous_head_dim_is_unsupported():
    q, k, v = _qkv(dim=64)
    q_strided = torch.randn(2, 6, 8, 4, 128, dtype=BF16)[..., ::2]
    reason = cutlass.unsupported_reason(q_strided, k, v, make_params((6, 8), 3))
    assert reason is not None and "query" in reason and "stride 2" in reason and "contiguous" in reason


def test_value_head_dim_must_match():
    q, k, _ = _qkv(dim=64)
    v = torch.randn(2, 6, 8, 2, 128, dtype=BF16)
    reason = cutlass.unsupported_reason(q, k, v, make_params((6, 8), 3))
    assert reason is not None and "value head dim 128" in reason and "64" in reason


def test_extension_not_built_reason(monkeypatch):
    monkeypatch.setattr(cutlass, "_load", lambda: (None, "ImportError: no module named gna_flex._C"))
    monkeypatch.setattr(cutlass, "_placement_reason", lambda named: None)
    q, k, v = _qkv()
    reason = cutlass.unsupported_reason(q, k, v, make_params((6, 8), 3))
    assert reason is not None and "not built" in reason and "GNA_FLEX_CUDA_ARCH=90a" in reason
    assert "no module named gna_flex._C" in reason


def test_extension_without_sm90_reason(monkeypatch):
    monkeypatch.setattr(cutlass, "_load", lambda: (FakeExtension(has_sm90=False), None))
    monkeypatch.setattr(cutlass, "_placement_reason", lambda named: None)
    q, k, v = _qkv()
    reason = cutlass.unsupported_reason(q, k, v, make_params((6, 8), 3))
    assert reason is not None and "without the sm90 kernel" in reason


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA answer; this machine has CUDA")
def test_device_reason_without_cuda():
    assert cutlass._device_reason(torch.device("cuda", 0)) == "no CUDA device is available"


def test_kernel_reason_is_passed_through(fake_kernel):
    fake_kernel.supports_message = "gna_flex sm90 kernel supports head_dim 64 or 128, got 96"
    q, k, v = _qkv(dim=96)
    assert cutlass.unsupported_reason(q, k, v, make_params((6, 8), 3)) == fake_kernel.supports_message
    with pytest.raises(RuntimeError, match="head_dim 64 or 128, got 96"):
        cutlass.forward(q, k, v, make_params((6, 8), 3), scale=None)
    assert fake_kernel.launches == []


def test_supported_inputs_give_none(fake_kernel):
    q, k, v = _qkv()
    assert cutlass.unsupported_reason(q, k, v, make_params((6, 8), 3)) is None


# --------------------------------------------------------------------------- invalid inputs


def test_grid_must_match_params():
    q, k, v = _qkv(grid=(6, 8))
    with pytest.raises(ValueError, match="grid"):
        cutlass.unsupported_reason(q, k, v, make_params((6, 9), 3))


def test_rank_must_match_params():
    q, k, v = _qkv(grid=(6, 8))
    with pytest.raises(ValueError, match="dims"):
        cutlass.forward(q, k, v, make_params((6, 8, 4), 3), scale=None)


def test_heads_kv_must_divide_heads():
    q, k, v = _qkv(heads=4, heads_kv=3)
    with pytest.raises(ValueError, match="divide"):
        cutlass.unsupported_reason(q, k, v, make_params((6, 8), 3))


def test_params_type_is_checked():
    q, k, v = _qkv()
    with pytest.raises(TypeError, match="params"):
        cutlass.unsupported_reason(q, k, v, ((6, 8), 3))


def test_out_must_match_query(fake_kernel):
    q, k, v = _qkv()
    params = make_params((6, 8), 3)
    with pytest.raises(ValueError, match="out must match query"):
        cutlass.forward(q, k, v, params, scale=None, out=torch.empty(2, 6, 8, 4, 32, dtype=BF16))
    with pytest.raises(ValueError, match="out must match query"):
        cutlass.forward(q, k, v, params, scale=None, out=torch.empty(q.shape, dtype=torch.float16))
    with pytest.raises(ValueError, match="lse_out must be float32"):
        cutlass.forward(q, k, v, params, scale=None, lse_out=torch.empty(q.shape[:-1], dtype=BF16))
    assert fake_kernel.launches == []


# --------------------------------------------------------------------------- arguments to the kernel


def test_forward_arguments_for_packed_qkv_with_extra_tokens(fake_kernel):
    batch, grid, heads, heads_kv, dim, extra = 2, (5, 7, 9), 6, 2, 64, 3
    packed = torch.randn(batch, *grid, heads + 2 * heads_kv, dim, dtype=torch.float16)
    q = packed[..., :heads, :]
    k = packed[..., heads : heads + heads_kv, :]
    v = packed[..., heads + heads_kv :, :]
    ek = torch.randn(batch, extra, heads_kv, dim, dtype=torch.float16)
    ev = torch.randn(batch, extra, heads_kv, dim, dtype=torch.float16)
    params = make_params(grid, (3, 4, 5), stride=(1, 2, 5), dilation=(1, 1, 1), is_causal=(True, False, True))

    out, lse = cutlass.forward(
        q, k, v, params, scale=0.25, additional_keys=ek, additional_values=ev, return_lse=True
    )

    assert len(fake_kernel.launches) == 1
    args, stream = fake_kernel.launches[0]
    assert stream == 1234
    packed_strides = list(packed.stride()[:-1])
    assert args["q_stride"] == args["k_stride"] == args["v_stride"] == packed_strides
    assert args["q"] == q.data_ptr() and args["k"] == k.data_ptr() and args["v"] == v.data_ptr()
    assert args["k"] - args["q"] == heads * dim * 2
    assert out.shape == q.shape and out.dtype == q.dtype and out.is_contiguous()
    assert args["o"] == out.data_ptr() and args["o_stride"] == list(out.stride()[:-1])
    assert lse.shape == q.shape[:-1] and lse.dtype == torch.float32 and lse.is_contiguous()
    assert args["lse"] == lse.data_ptr()
    assert args["extra_k"] == ek.data_ptr() and args["extra_v"] == ev.data_ptr()
    assert args["extra_k_stride"] == list(ek.stride()[:-1]) and args["num_extra"] == extra
    assert (args["batch"], args["heads"], args["heads_kv"], args["head_dim"]) == (batch, heads, heads_kv, dim)
    assert args["grid"] == list(grid) and args["kernel_size"] == [3, 4, 5]
    assert args["stride"] == [1, 2, 5] and args["dilation"] == [1, 1, 1]
    assert args["causal"] == [True, False, True]
    assert args["scale"] == 0.25 and args["dtype"] == fake_kernel.DTYPE_FLOAT16
    assert args["q_tile"] == [] and args["kv_tile"] == []


def test_forward_defaults_and_preallocated_outputs(fake_kernel):
    q, k, v = _qkv(grid=(40,), heads=2, heads_kv=1, dim=128, batch=1)
    params = make_params(40, 8, stride=4)
    out = torch.full(q.shape, float("nan"), dtype=BF16)
    lse = torch.full(q.shape[:-1], float("nan"))

    got_out, got_lse = cutlass.forward(q, k, v, params, scale=None, out=out, lse_out=lse, q_tile=(128,))

    assert got_out is out and got_lse is lse
    args, _ = fake_kernel.launches[0]
    assert args["o"] == out.data_ptr() and args["lse"] == lse.data_ptr()
    assert args["scale"] == pytest.approx(128 ** -0.5)
    assert args["dtype"] == fake_kernel.DTYPE_BFLOAT16
    assert args["q_tile"] == [128] and args["kv_tile"] == []
    assert "extra_k" not in args


def test_forward_without_lse_passes_null(fake_kernel):
    q, k, v = _qkv()
    out, lse = cutlass.forward(q, k, v, make_params((6, 8), 3), scale=0.1)
    assert lse is None and fake_kernel.launches[0][0]["lse"] == 0


def test_heads_major_layout_keeps_its_strides(fake_kernel):
    base = torch.randn(2, 4, 6, 8, 64, dtype=BF16)  # [B, heads, *grid, D]
    q = base.permute(0, 2, 3, 1, 4)  # [B, *grid, heads, D], not contiguous
    _, k, v = _qkv(heads_kv=4)
    cutlass.forward(q, k, v, make_params((6, 8), 3), scale=0.1)
    assert fake_kernel.launches[0][0]["q_stride"] == [4 * 6 * 8 * 64, 8 * 64, 64, 6 * 8 * 64]


def test_strides_of_size_one_dims_become_tma_friendly():
    q = torch.randn(6, 4, 1, 64, dtype=BF16).unsqueeze(0)  # batch 1, one head
    odd = q.as_strided(q.shape, (1, 256, 64, 1, 1))  # size-1 dims with strides TMA rejects
    assert cutlass._strides(odd) == [1536, 256, 64, 64]
    assert cutlass._strides(q) == list(q.stride()[:-1])  # valid strides are kept


def test_unsupported_reason_sees_kernel_arguments(fake_kernel):
    seen = []
    fake_kernel.supports = lambda params: seen.append(params) or ""
    q, k, v = _qkv()
    assert cutlass.unsupported_reason(q, k, v, make_params((6, 8), 3), kv_tile=(16, 8)) is None
    (args,) = seen
    assert args["o_stride"] == list(torch.empty(q.shape).stride()[:-1])
    assert args["o"] % 16 == 0 and args["kv_tile"] == [16, 8]
    assert args["scale"] == pytest.approx(64 ** -0.5)


# --------------------------------------------------------------------------- the real extension, if built


def _built_extension():
    ext, _ = cutlass._load()
    return ext if ext is not None and ext.HAS_SM90 else None


@pytest.mark.skipif(_built_extension() is None, reason="gna_flex._C with the sm90 kernel is not built here")
def test_built_extension_checks_alignment_without_a_gpu():
    ext = _built_extension()

    def params(q_address=1 << 20, heads_stride=64):
        return ext.FwdParams(
            q=q_address, k=1 << 20, v=1 << 20, o=1 << 20,
            q_stride=[8 * 4 * 64, 4 * 64, heads_stride], k_stride=[8 * 4 * 64, 4 * 64, 64],
            v_stride=[8 * 4 * 64, 4 * 64, 64], o_stride=[8 * 4 * 64, 4 * 64, 64],
            batch=2, heads=4, heads_kv=4, head_dim=64, grid=[8], kernel_size=[3], stride=[1],
            dilation=[1], causal=[False], scale=0.125, dtype=ext.DTYPE_BFLOAT16,
        )

    assert ext.supports(params()) == ""
    assert "align" in ext.supports(params(q_address=(1 << 20) + 2))
    assert "stride" in ext.supports(params(heads_stride=68))
    with pytest.raises(ValueError, match="q_stride"):
        ext.FwdParams(q=0, k=0, v=0, o=0, q_stride=[1], k_stride=[1, 1, 1], v_stride=[1, 1, 1],
                      o_stride=[1, 1, 1], batch=1, heads=1, heads_kv=1, head_dim=64, grid=[8],
                      kernel_size=[3], stride=[1], dilation=[1], causal=[False], scale=1.0, dtype=1)
