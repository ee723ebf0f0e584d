"""N-D grids: neighborhood attention (NATTEN semantics), blocked / grid / criss-cross
patterns and 2-D relative-position bias, vs the dense reference, vs an independent
brute-force implementation of NATTEN's window rule, and vs NATTEN itself when installed."""

import itertools
import math
import random

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import attncc
from attncc.dense import dense_mask, nonempty_tiles
from attncc.errors import SpecError
from attncc.inputs import example_inputs

from conftest import max_err

GRID_LIB = sorted(attncc.library_patterns(grid=True))
#: grid shapes per rank (ragged: not multiples of the 32-token tile)
SHAPES = {1: [(45,), (70,)], 2: [(11, 13), (9, 16)], 3: [(4, 5, 6), (5, 6, 3)]}


def _params(name):
    return {"swin_window": {"P": 4}, "maxvit_grid": {"G": 3}, "neighborhood_2d": {"kernel": 5},
            "neighborhood_2d_rpb": {"kernel": 5}, "dilated_neighborhood_2d": {"kernel": 3},
            "strided_neighborhood_2d": {"kernel": 6, "stride": 3}, "neighborhood_1d": {"dilation": 2},
            "video_causal_neighborhood_3d": {"kernel": 3}}.get(name, {})


@pytest.mark.parametrize("name", GRID_LIB)
def test_grid_library_matches_reference(name):
    path = attncc.pattern_path(name)
    kern = attncc.compile(path, name, **_params(name))
    n = len(kern.ir.grid)
    for i, grid in enumerate(SHAPES[n]):
        q, k, v, tens, sizes = example_inputs(kern.ir, 1, 2, 1, D=16, grid=grid, seed=i)
        out, lse = kern(q, k, v, return_lse=True, **tens)
        assert out.shape == (1, 2, *grid, 16) and lse.shape == (1, 2, *grid)
        ref, rlse = attncc.reference(path, q, k, v, pattern=name, return_lse=True, **_params(name), **tens)
        assert max_err(out, ref) < 5e-5, (name, grid)
        assert torch.equal(torch.isneginf(lse), torch.isneginf(rlse))
        # closed-form key boxes (no block table); the kernel visits exactly the non-empty
        # tiles of the mask in its permuted token layout, and runs the full ones mask-free
        assert kern.plan.path == "box", kern.plan.describe()
        stats = kern.tile_stats(sizes["Lq"], sizes["Lk"], H=2, Hkv=1, grid=grid)
        mask = stats["layout"].permute_mask(dense_mask(kern.ir, sizes, tens, "cpu")[:1, :1])
        ne = nonempty_tiles(mask, stats["block_m"], stats["block_n"])
        full = nonempty_tiles(~mask, stats["block_m"], stats["block_n"])
        n_tiles = (mask.shape[2] // stats["block_m"]) * (mask.shape[3] // stats["block_n"])
        assert stats["visited"] == 2 * ne, (name, grid, stats, ne)
        assert stats["full"] == 2 * (n_tiles - full), (name, grid, stats, n_tiles - full)


def _natten_window(i, L, k, d, s, causal):
    """Keys (coordinates on one axis) that query coordinate i attends to, written out from
    NATTEN's definition: work inside the dilation group of i; the window of k group
    positions follows the stride group's leader and is shifted inward at the borders."""
    g, ig = i % d, i // d
    Lg = len(range(g, L, d))
    if causal:
        last = min((ig // s) * s + s - 1, Lg - 1)
        js = [j for j in range(Lg) if j <= ig and last - j < k]
    else:
        lead = min((ig // s) * s + s // 2, Lg - 1)
        left, right = k // 2, k // 2 - (1 - k % 2)
        centre = min(max(lead, left), Lg - 1 - right)
        js = list(range(centre - left, centre + right + 1))
    return {j * d + g for j in js}


def _brute_mask(grid, kern, dil, stride, causal):
    pts = list(itertools.product(*[range(n) for n in grid]))
    m = torch.zeros(len(pts), len(pts), dtype=torch.bool)
    wins = [[_natten_window(i, grid[a], kern[a], dil[a], stride[a], causal[a]) for i in range(grid[a])]
            for a in range(len(grid))]
    for qi, qc in enumerate(pts):
        for ki, kc in enumerate(pts):
            m[qi, ki] = all(kc[a] in wins[a][qc[a]] for a in range(len(grid)))
    return m


@st.composite
def na_configs(draw):
    n = draw(st.integers(1, 3))
    grid, kern, dil, stride, causal = [], [], [], [], []
    for _ in range(n):
        L = draw(st.integers(2, {1: 40, 2: 12, 3: 6}[n]))
        d = draw(st.integers(1, max(1, L // 2)))
        k = draw(st.integers(2, max(2, L // d)))
        grid.append(L), dil.append(d), kern.append(k)
        stride.append(draw(st.integers(1, k)))
        causal.append(draw(st.booleans()))
    return tuple(grid), tuple(kern), tuple(dil), tuple(stride), tuple(causal)


def _na_spec(n):
    axes = ["t", "y", "x"][3 - n:]
    return (f"pattern na:\n    grid: {', '.join(axes)}\n"
            "    mask: neighborhood(q, kv, kernel=KER, dilation=DIL, stride=STR, causal=CAU)\n")


def _tuple(xs):
    return "(" + ", ".join(str(x) for x in xs) + ("," if len(xs) == 1 else "") + ")"


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cfg=na_configs(), seed=st.integers(0, 1000))
def test_neighborhood_property(cfg, seed):
    grid, kern_, dil, stride, causal = cfg
    src = (_na_spec(len(grid)).replace("KER", _tuple(kern_)).replace("DIL", _tuple(dil))
           .replace("STR", _tuple(stride)).replace("CAU", _tuple(causal)))
    kern = attncc.compile(src)
    q, k, v, tens, sizes = example_inputs(kern.ir, 1, 1, 1, D=16, grid=grid, seed=seed)
    want = _brute_mask(grid, kern_, dil, stride, causal)
    assert torch.equal(dense_mask(kern.ir, sizes, tens, "cpu")[0, 0], want), cfg
    # every query sees exactly prod(kernel) keys when nothing is causal
    if not any(causal):
        assert (want.sum(1) == torch.tensor(kern_).prod()).all()
    out = kern(q, k, v)
    ref = attncc.reference(src, q, k, v)
    assert max_err(out, ref) < 5e-5, cfg
    # closed-form key boxes: exactly the non-empty tiles of the permuted layout
    assert kern.plan.path == "box"
    stats = kern.tile_stats(sizes["Lq"], sizes["Lk"], grid=grid)
    pm = stats["layout"].permute_mask(want[None, None])
    assert stats["visited"] == nonempty_tiles(pm, stats["block_m"], stats["block_n"]), cfg


def _expected_token(lay, p, tile):
    """Row-major grid token at permuted position p, written out from the layout's definition
    (groups, then tiles, then rows of a tile, row-major over the axes; x = g + d * j with
    j = tile * t + row); -1 for padding."""
    n = len(lay.grid)
    J = [-(-(-(-g // d)) // max(a, b)) * max(a, b) for g, d, a, b in zip(lay.grid, lay.groups, lay.tm, lay.tn)]
    bm = math.prod(tile)
    t_id, row = divmod(p, bm)
    rows, tiles, groups = [0] * n, [0] * n, [0] * n
    for a in reversed(range(n)):
        row, rows[a] = divmod(row, tile[a])
    for a in reversed(range(n)):
        t_id, tiles[a] = divmod(t_id, J[a] // tile[a])
    for a in reversed(range(n)):
        t_id, groups[a] = divmod(t_id, lay.groups[a])
    xs = [groups[a] + lay.groups[a] * (tiles[a] * tile[a] + rows[a]) for a in range(n)]
    if any(x >= g for x, g in zip(xs, lay.grid)):
        return -1
    flat = 0
    for x, g in zip(xs, lay.grid):
        flat = flat * g + x
    return flat


def test_box_layout_permutation():
    from attncc.layout import BoxLayout

    for lay in [BoxLayout((7, 10), (2, 3), (4, 8), (8, 4)), BoxLayout((7, 10), (1, 1), (1, 32), (2, 16)),
                BoxLayout((8, 16), (1, 1), (2, 16), (1, 16)), BoxLayout((3, 5, 6), (1, 2, 1), (2, 2, 8), (1, 4, 4))]:
        x = torch.randn(2, 3, *lay.grid, 5)
        for side, tile in (("q", lay.tm), ("kv", lay.tn)):
            p = lay.permute(x, side)
            want = torch.tensor([_expected_token(lay, i, tile) for i in range(lay.length)])
            assert p.shape == (2, 3, lay.length, 5)
            assert torch.equal(lay.token_index(side), want), (lay, side)
            # position i holds grid token want[i]; padding is zeros; unpermute inverts
            assert torch.equal(p[:, :, want >= 0], x.flatten(2, 1 + lay.n)[:, :, want[want >= 0]])
            assert (p[:, :, want < 0] == 0).all()
            assert torch.equal(lay.unpermute(p, side), x)
    assert BoxLayout((8, 16), (1, 1), (2, 16), (1, 16)).is_identity()
    assert not BoxLayout((8, 16), (1, 1), (2, 8), (1, 16)).is_identity()


def test_maxvit_needs_a_group():
    kern = attncc.compile(attncc.pattern_path("maxvit_grid"), G=8)
    q, k, v, _, _ = example_inputs(kern.ir, 1, 1, 1, D=16, grid=(6, 16))
    with pytest.raises(ValueError, match=r"axis 'y' \(size 6\) has floor\(G0/8\) = 0 dilation groups"):
        kern(q, k, v)


def _random_na_configs(n, count, seed):
    """Random NATTEN configurations (grid, kernel, dilation, stride, causal) for an n-D grid."""
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        grid, kern, dil, stride, causal = [], [], [], [], []
        for _ in range(n):
            L = rng.randint(4, {1: 40, 2: 12, 3: 7}[n])
            d = rng.randint(1, max(1, L // 3))
            k = rng.randint(2, max(2, min(7, L // d)))
            grid.append(L), dil.append(d), kern.append(k)
            stride.append(rng.randint(1, k)), causal.append(rng.random() < 0.3)
        out.append((tuple(grid), tuple(kern), tuple(dil), tuple(stride), tuple(causal)))
    return out


@pytest.mark.parametrize("n", [1, 2, 3])
def test_neighborhood_matches_natten(n):
    natten = pytest.importorskip("natten")  # optional test dependency (CPU build runs its flex backend)
    fn = {1: natten.na1d, 2: natten.na2d, 3: natten.na3d}[n]
    g = torch.Generator().manual_seed(n)
    for grid, kern_, dil, stride, causal in _random_na_configs(n, 6, seed=n):
        src = (_na_spec(n).replace("KER", _tuple(kern_)).replace("DIL", _tuple(dil))
               .replace("STR", _tuple(stride)).replace("CAU", _tuple(causal)))
        kern = attncc.compile(src)
        q, k, v = (torch.randn(1, 2, *grid, 32, generator=g) for _ in range(3))
        out = kern(q, k, v)
        heads_last = [0, *range(2, 2 + n), 1, 2 + n]  # natten: (B, *grid, H, D)
        back = [0, n + 1, *range(1, n + 1), n + 2]
        nat = fn(*(x.permute(heads_last).contiguous() for x in (q, k, v)), kernel_size=kern_, stride=stride,
                 dilation=dil, is_causal=causal).permute(back)
        assert max_err(out, nat) < 5e-5, (grid, kern_, dil, stride, causal)


def test_grid_rpb_gradients():
    path = attncc.pattern_path("neighborhood_2d_rpb")
    kern = attncc.compile(path, kernel=3)
    q, k, v, tens, _ = example_inputs(kern.ir, 1, 2, 2, D=16, grid=(7, 9), seed=2)
    xs = [x.clone().requires_grad_() for x in (q, k, v, tens["rpb"])]
    kern(*xs[:3], rpb=xs[3]).square().sum().backward()
    ys = [x.double().requires_grad_() for x in (q, k, v, tens["rpb"])]
    attncc.reference(path, *ys[:3], kernel=3, rpb=ys[3]).square().sum().backward()
    for a, b in zip(xs, ys):
        assert max_err(a.grad, b.grad) < 1e-4 * (1 + b.grad.abs().max().item())


def test_grid_errors():
    with pytest.raises(SpecError, match="kernel on axis 'y' must be >= 2"):
        attncc.lower("pattern e:\n    grid: y, x\n    mask: neighborhood(q, kv, kernel=(1, 3))\n")
    with pytest.raises(SpecError, match=r"stride on axis 'x' must be in 1..kernel \(3\)"):
        attncc.lower("pattern e:\n    grid: y, x\n    mask: neighborhood(q, kv, kernel=3, stride=(1, 4))\n")
    with pytest.raises(SpecError, match="needs a grid"):
        attncc.lower("pattern e:\n    mask: q.y == kv.y\n")
    with pytest.raises(SpecError, match="unknown grid axis 'z'"):
        attncc.lower("pattern e:\n    grid: y, x\n    mask: q.z == kv.y\n")
    with pytest.raises(SpecError, match="one value per grid axis"):
        attncc.lower("pattern e:\n    grid: y, x\n    mask: neighborhood(q, kv, kernel=(3, 3, 3))\n")
    kern = attncc.compile(attncc.pattern_path("dilated_neighborhood_2d"), kernel=5, dilation=3)
    q, k, v, _, _ = example_inputs(kern.ir, 1, 1, 1, D=16, grid=(20, 12))
    with pytest.raises(ValueError, match=r"axis 'x': kernel \* dilation = 5 \* 3 = 15 must not exceed"):
        kern(q, k, v)
    with pytest.raises(ValueError, match=r"must have shape \(B, H, Y, X, D\)"):
        kern(q.flatten(2, 3), k, v)
    with pytest.raises(ValueError, match="must have the grid of q"):
        kern(q, k[:, :, :10], v)
