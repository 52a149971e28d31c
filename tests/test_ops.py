import pytest
import torch

from gna_flex import ops, reference
from gna_flex.spec import make_params


@pytest.mark.parametrize("extra", [0, 3])
def test_flex_backward_op_matches_reference_gradients(extra):
    # The kernel op's backward runs this op; inside a custom op autograd is off
    # unless the implementation turns it back on (ops.eager_dispatch).
    q = torch.randn(1, 5, 6, 4, 8, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(1, 5, 6, 2, 8, dtype=torch.float64, requires_grad=True) for _ in range(2))
    ek = torch.randn(1, extra, 2, 8, dtype=torch.float64, requires_grad=True) if extra else None
    ev = torch.randn(1, extra, 2, 8, dtype=torch.float64, requires_grad=True) if extra else None
    grad = torch.randn(1, 5, 6, 4, 8, dtype=torch.float64)
    got = torch.ops.gna_flex.na_flex_backward(
        grad, q, k, v, ek, ev, [5, 6], [3, 4], [2, 2], [1, 1], [False, True], 0.3
    )
    inputs = [t for t in (q, k, v, ek, ev) if t is not None]
    out = reference.na(q, k, v, (3, 4), (2, 2), 1, (False, True), scale=0.3, additional_keys=ek,
                       additional_values=ev, compute_dtype=torch.float64)
    want = torch.autograd.grad(out, inputs, grad)
    assert len(got) == len(want)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_select_backend_explicit_and_fallback():
    q = torch.randn(1, 8, 2, 16)
    params = make_params(8, 3)
    assert ops.select_backend(None, q, q, q, params) == "flex"  # CPU tensors: the kernel cannot run them
    assert ops.select_backend("reference", q, q, q, params) == "reference"
    with pytest.raises(RuntimeError, match="cannot run these inputs"):
        ops.select_backend("cutlass", q, q, q, params)


def test_kernel_op_has_fake_implementation():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        q = torch.empty(2, 6, 7, 4, 64, dtype=torch.bfloat16, device="cuda")
        k = torch.empty(2, 6, 7, 2, 64, dtype=torch.bfloat16, device="cuda")
        out, lse = torch.ops.gna_flex.na_cutlass(q, k, k, None, None, [6, 7], [3, 3], [1, 1], [1, 1],
                                                 [False, False], 0.125)
    assert out.shape == q.shape and out.dtype == torch.bfloat16
    assert lse.shape == q.shape[:-1] and lse.dtype == torch.float32


def test_kernel_path_traces_without_graph_breaks(monkeypatch):
    # Pretend the kernel can run (CPU stand-in computes the reference) and check that
    # dispatch + custom op compile into one graph with fullgraph=True.
    import gna_flex
    from gna_flex import cutlass

    monkeypatch.setattr(cutlass, "_static_reason", lambda *args: None)

    def fake_forward(query, key, value, params, *, scale, additional_keys=None, additional_values=None,
                     return_lse=False, **_):
        out, lse = reference.na(query, key, value, params.kernel_size, params.stride, params.dilation,
                                params.is_causal, scale=scale, additional_keys=additional_keys,
                                additional_values=additional_values, return_lse=True)
        return out.to(query.dtype), lse

    monkeypatch.setattr(cutlass, "forward", fake_forward)
    q = torch.randn(1, 6, 7, 2, 16)

    def f(q):
        return gna_flex.na2d(q, q, q, (3, 3), (2, 1)) * 2

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(q), 2 * reference.na(q, q, q, (3, 3), (2, 1)), rtol=0, atol=1e-5)
