"""Hypothesis strategies for GNA configurations (shared by the test files)."""

from hypothesis import strategies as st


@st.composite
def gna_configs(draw, max_ndim=3, max_len=12, min_ndim=1):
    ndim = draw(st.integers(min_ndim, max_ndim))
    grid, ks, stride, dil, causal = [], [], [], [], []
    for _ in range(ndim):
        d = draw(st.integers(1, 3))
        w = draw(st.integers(2, 5))
        length = draw(st.integers(w * d, max(w * d, max_len)))
        grid.append(length)
        ks.append(w)
        stride.append(draw(st.integers(1, w)))
        dil.append(d)
        causal.append(draw(st.booleans()))
    return tuple(grid), tuple(ks), tuple(stride), tuple(dil), tuple(causal)
