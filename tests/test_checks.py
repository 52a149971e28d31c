import pytest
import torch

from gna_flex.checks import check_inputs


def _qkv(grid=(6, 7), heads=4, heads_kv=2, d=8, dtype=torch.float32):
    return (torch.randn(1, *grid, heads, d, dtype=dtype), torch.randn(1, *grid, heads_kv, d, dtype=dtype),
            torch.randn(1, *grid, heads_kv, d, dtype=dtype))


def test_valid_inputs_give_params_and_shape():
    q, k, v = _qkv()
    ek, ev = torch.randn(1, 3, 2, 8), torch.randn(1, 3, 2, 8)
    params, shape = check_inputs(q, k, v, 3, 2, additional_keys=ek, additional_values=ev)
    assert params.grid == (6, 7) and params.stride == (2, 2)
    assert (shape.heads, shape.heads_kv, shape.head_dim, shape.num_extra) == (4, 2, 8, 3)


def _case(name):
    q, k, v = _qkv()
    ek = ev = None
    ndim = None
    if name == "query rank":
        q = q[0, 0, 0]
    elif name == "rank for ndim":
        ndim = 3
    elif name == "key rank":
        k = k[..., 0]
    elif name == "dtype":
        k = k.double()
    elif name == "grid":
        v = torch.randn(1, 6, 8, 2, 8)
    elif name == "batch":
        k = torch.randn(2, 6, 7, 2, 8)
    elif name == "head dim":
        k = torch.randn(1, 6, 7, 2, 4)
    elif name == "gqa":
        k, v = torch.randn(1, 6, 7, 3, 8), torch.randn(1, 6, 7, 3, 8)
    elif name == "value heads":
        v = torch.randn(1, 6, 7, 1, 8)
    elif name == "integer tensor":
        q = q.long()
    elif name == "not a tensor":
        q = q.tolist()
    elif name == "extra alone":
        ek = torch.randn(1, 3, 2, 8)
    elif name == "extra heads":
        ek, ev = torch.randn(1, 3, 1, 8), torch.randn(1, 3, 1, 8)
    elif name == "extra tokens":
        ek, ev = torch.randn(1, 3, 2, 8), torch.randn(1, 4, 2, 8)
    elif name == "extra dtype":
        ek, ev = torch.randn(1, 3, 2, 8).half(), torch.randn(1, 3, 2, 8).half()
    elif name == "extra rank":
        ek, ev = torch.randn(3, 2, 8), torch.randn(3, 2, 8)
    elif name == "kernel too large":
        return (q, k, v, 8, 1, 1, False, None, None, None)
    return (q, k, v, 3, 1, 1, False, ek, ev, ndim)


@pytest.mark.parametrize(
    "name, exc, words",
    [
        ("query rank", ValueError, ["query", "4, 5 or 6 dims"]),
        ("rank for ndim", ValueError, ["query must have 6 dims"]),
        ("key rank", ValueError, ["key must have 5 dims"]),
        ("dtype", TypeError, ["key dtype"]),
        ("grid", ValueError, ["value grid axis 1", "size 8"]),
        ("batch", ValueError, ["key batch 2"]),
        ("head dim", ValueError, ["key head dim 4"]),
        ("gqa", ValueError, ["(3) must divide query heads (4)"]),
        ("value heads", ValueError, ["value has 1 heads"]),
        ("integer tensor", TypeError, ["query must be a floating-point"]),
        ("not a tensor", TypeError, ["query must be a torch.Tensor"]),
        ("extra alone", ValueError, ["given together"]),
        ("extra heads", ValueError, ["additional_keys has 1 heads"]),
        ("extra tokens", ValueError, ["3 tokens", "4"]),
        ("extra dtype", TypeError, ["additional_keys dtype"]),
        ("extra rank", ValueError, ["additional_keys must have 4 dims"]),
        ("kernel too large", ValueError, ["kernel_size[0]", "grid length 6"]),
    ],
)
def test_bad_inputs_raise_clear_errors(name, exc, words):
    with pytest.raises(exc) as info:
        check_inputs(*_case(name))
    for w in words:
        assert w in str(info.value), (w, str(info.value))


def test_device_mismatch_is_reported():
    if not torch.cuda.is_available():
        q, k, v = _qkv()
        k = k.to("meta")
        with pytest.raises(ValueError, match="key is on meta"):
            check_inputs(q, k, v, 3)


def test_check_inputs_for_params_grid_and_type():
    from gna_flex.checks import check_inputs_for
    from gna_flex.spec import make_params

    q, k, v = _qkv()
    assert check_inputs_for(q, k, v, make_params((6, 7), 3)).heads == 4
    with pytest.raises(ValueError, match=r"differs from params.grid \(6, 8\)"):
        check_inputs_for(q, k, v, make_params((6, 8), 3))
    with pytest.raises(TypeError, match="GNAParams"):
        check_inputs_for(q, k, v, (6, 7))
