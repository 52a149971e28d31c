"""A literal transcription of the window rule of DESIGN.md, in plain Python.

Used only by tests, as an oracle independent of gna_flex.spec's vectorised
version.
"""

import itertools


def axis_window(i, L, w, s, d, c):
    g, ii = i % d, i // d
    Lg = L // d + (1 if g < L % d else 0)
    left = w // 2
    if c:
        leader = min((ii // s) * s + s - 1, Lg - 1)
        start = max(leader - (w - 1), 0)
        end = ii + 1
    else:
        leader = min((ii // s) * s + s // 2, Lg - 1)
        start = min(max(leader - left, 0), Lg - w)
        end = start + w
    return g, start, end


def is_neighbor(q, k, grid, ks, st, di, ca):
    for a in range(len(grid)):
        g, start, end = axis_window(q[a], grid[a], ks[a], st[a], di[a], ca[a])
        if not (k[a] % di[a] == g and start <= k[a] // di[a] < end):
            return False
    return True


def coords(grid):
    return list(itertools.product(*[range(n) for n in grid]))
