"""Dice and HD95 (nnunet_sud.evaluation.metrics) against volumes with hand-derived answers.

HD95 definition under test (medpy.metric.binary.hd95): surface = mask XOR erosion with the
face-connectivity structure; distances from each surface voxel to the nearest surface voxel of
the other mask (physical units), both directions pooled, numpy's linear 95th percentile.
"""
import itertools

import numpy as np
import pytest
from scipy.spatial.distance import cdist

from nnunet_sud.evaluation.metrics import (confusion_counts, dice, hd95, image_diagonal, squeeze_singleton_axes,
                                           surface_distances, surface_mask)


# ----------------------------------------------------------------------------- helpers
def box(shape, lo, hi):
    """Boolean array with True in the box [lo, hi) (per axis)."""
    m = np.zeros(shape, dtype=bool)
    m[tuple(slice(a, b) for a, b in zip(lo, hi))] = True
    return m


def brute_force_surface(mask):
    """Independent surface definition: foreground voxels with a face neighbour that is background
    or outside the array."""
    padded = np.pad(mask, 1, constant_values=False)
    surf = np.zeros_like(mask)
    core = tuple(slice(1, -1) for _ in range(mask.ndim))
    for ax in range(mask.ndim):
        for step in (-1, 1):
            neighbour = np.roll(padded, step, axis=ax)[core]
            surf |= mask & ~neighbour
    return surf


def brute_force_hd95(a, b, spacing):
    """HD95 from explicit pairwise distances between surface-voxel coordinates (mm)."""
    sa = np.argwhere(brute_force_surface(a)) * np.asarray(spacing)
    sb = np.argwhere(brute_force_surface(b)) * np.asarray(spacing)
    d = cdist(sa, sb)
    return float(np.percentile(np.concatenate([d.min(axis=1), d.min(axis=0)]), 95))


def random_blob(rng, shape, thresh=0.55, sigma=2.0):
    from scipy.ndimage import gaussian_filter
    return gaussian_filter(rng.random(shape), sigma) > thresh


# ------------------------------------------------------------------- known answers: HD95
def test_hd95_disjoint_cubes_3d_anisotropic():
    """A = [0,n)^3, B = A shifted by k >= n voxels along axis 0 (spacing s there).

    Every B voxel has row >= k, and B's bottom face (row k) is a full n x n face, so an A surface
    voxel in row i is at distance exactly (k - i) s; by symmetry B gives the same multiset.
    A's surface has n^2 voxels in rows 0 and n-1 and the 4n-4 voxel ring in rows 1..n-2.
    n=4, k=6: distances 6s (16x), 5s (12x), 4s (12x), 3s (16x), pooled twice = 112 values; the
    95th percentile position 0.95 * 111 = 105.45 lies in the top block (positions 80..111): 6s = k*s.
    """
    n, k = 4, 6
    spacing = (2.0, 0.7, 0.5)
    shape = (n + k + 3, n + 4, n + 4)
    a = box(shape, (1, 2, 2), (1 + n, 2 + n, 2 + n))
    b = box(shape, (1 + k, 2, 2), (1 + k + n, 2 + n, 2 + n))
    s = spacing[0]
    counts = [n * n if i in (0, n - 1) else 4 * n - 4 for i in range(n)]
    pooled = np.concatenate([np.repeat((k - i) * s, c) for i, c in enumerate(counts)] * 2)
    assert pooled.size == 112
    expected = np.percentile(pooled, 95)
    assert expected == pytest.approx(k * s)
    assert hd95(a, b, spacing) == pytest.approx(expected, abs=1e-12)
    assert hd95(b, a, spacing) == pytest.approx(expected, abs=1e-12)
    # the one-directional distances are exactly (k - i) s per row
    d = surface_distances(a, b, spacing)
    assert sorted(d) == pytest.approx(sorted(pooled[: pooled.size // 2]))


def test_hd95_overlapping_cubes_anisotropic():
    """A = [0,n)^3, B = A shifted by k < n along axis 0 (spacing s), lateral spacings t, u >= k s.

    Distances of A's surface voxels to B's surface (derived by hand):
    * row 0 (bottom face, n^2 voxels): k s (B starts at row k, its bottom face covers it);
    * rows 1..k-1, lateral ring (4n-4 voxels each): (k - i) s;
    * rows k..n-1, lateral ring: 0 (they lie on B's lateral faces);
    * row n-1 interior ((n-2)^2 voxels, inside B): min(k s [B top face], (n-1-k) s [B bottom],
      >= t, >= u [B lateral faces]) = k s.
    B's multiset is the same (mirror symmetry). n=10, k=2: 164 of 488 values are k s (33.6% > 5%),
    so HD95 = k s.
    """
    n, k = 10, 2
    spacing = (0.5, 1.5, 2.0)
    s = spacing[0]
    assert min(spacing[1:]) >= k * s and n - 1 - k >= k
    shape = (n + k + 2, n + 2, n + 2)
    a = box(shape, (1, 1, 1), (1 + n, 1 + n, 1 + n))
    b = box(shape, (1 + k, 1, 1), (1 + k + n, 1 + n, 1 + n))
    ring = 4 * n - 4
    parts = [np.repeat(k * s, n * n)]
    parts += [np.repeat((k - i) * s, ring) for i in range(1, k)]
    parts += [np.repeat(0.0, ring * (n - k))]
    parts += [np.repeat(k * s, (n - 2) ** 2)]
    one_dir = np.concatenate(parts)
    assert one_dir.size == int(surface_mask(a).sum()) == 488
    expected = np.percentile(np.concatenate([one_dir, one_dir]), 95)
    assert expected == pytest.approx(k * s)
    assert sorted(surface_distances(a, b, spacing)) == pytest.approx(sorted(one_dir))
    assert sorted(surface_distances(b, a, spacing)) == pytest.approx(sorted(one_dir))
    assert hd95(a, b, spacing) == pytest.approx(expected, abs=1e-12)


def test_hd95_2d_bars_interpolated_percentile():
    """2d: one-pixel-wide bars of length L in the same column, B shifted by k = L rows (spacing s).

    Every pixel is a surface pixel; A's pixel in row i is at (k - i) s from B (B's first row is
    k), so each direction gives {s, 2s, ..., L s} once and the pooled 2L values hold each twice.
    L = 20: sorted positions 36, 37 = 19s and 38, 39 = 20s; position 0.95 * 39 = 37.05 gives
    19s + 0.05 (20s - 19s) = 19.05 s (numpy's linear interpolation).
    """
    L = 20
    spacing = (0.8, 3.0)
    a = box((2 * L + 4, 5), (1, 2), (1 + L, 3))
    b = box((2 * L + 4, 5), (1 + L, 2), (1 + 2 * L, 3))
    pooled = np.concatenate([np.arange(1, L + 1) * spacing[0]] * 2)
    assert np.percentile(pooled, 95) == pytest.approx(19.05 * spacing[0])
    assert hd95(a, b, spacing) == pytest.approx(19.05 * spacing[0], abs=1e-12)


def test_hd95_identical_and_single_voxel():
    a = box((6, 7, 8), (1, 1, 1), (4, 5, 6))
    assert hd95(a, a, (1.0, 2.0, 3.0)) == 0.0
    # single voxels at (1,1) and (4,5) in 2d with spacing (2, 0.5): every distance is the same
    p = np.zeros((6, 7), bool)
    q = np.zeros((6, 7), bool)
    p[1, 1] = q[4, 5] = True
    assert hd95(p, q, (2.0, 0.5)) == pytest.approx(np.hypot(3 * 2.0, 4 * 0.5))


def test_hd95_object_touching_image_border():
    """Voxels outside the image count as background: a mask filling the whole image has all
    border voxels as surface (scipy's binary_erosion border_value=0, as medpy)."""
    full = np.ones((5, 6), bool)
    assert surface_mask(full).sum() == 5 * 6 - 3 * 4
    inner = box((5, 6), (1, 1), (4, 5))
    # surface of `inner` is its whole 3x4 block minus the 1x2 interior: 10 pixels; `full`'s
    # surface ring is 1 pixel away from the nearest surface pixel of inner (spacing 1)
    assert hd95(full, inner, 1.0) == pytest.approx(brute_force_hd95(full, inner, (1.0, 1.0)))


def test_hd95_matches_brute_force_on_random_shapes():
    """Random blobs (2d and 3d, anisotropic spacing, some touching the image border) against an
    independent O(N*M) implementation (explicit neighbour test + pairwise distances)."""
    rng = np.random.default_rng(7)
    n_checked = 0
    for shape in [(20, 24), (31, 17), (12, 14, 16), (9, 20, 15), (16, 16, 16)]:
        for _ in range(3):
            a, b = random_blob(rng, shape), random_blob(rng, shape)
            if not a.any() or not b.any():
                continue
            spacing = tuple(rng.uniform(0.3, 3.0, size=len(shape)))
            assert hd95(a, b, spacing) == pytest.approx(brute_force_hd95(a, b, spacing), rel=1e-12, abs=1e-12)
            n_checked += 1
    assert n_checked >= 10


# -------------------------------------------------------------------- empty structures
def test_empty_structure_definitions():
    shape, spacing = (4, 5, 6), (2.0, 1.0, 0.5)
    empty = np.zeros(shape, bool)
    some = box(shape, (1, 1, 1), (3, 3, 3))
    diag = np.sqrt((4 * 2.0) ** 2 + (5 * 1.0) ** 2 + (6 * 0.5) ** 2)
    assert image_diagonal(shape, spacing) == pytest.approx(diag)
    # both empty: NaN (Dice as nnU-Net, HD95 undefined)
    assert np.isnan(dice(empty, empty))
    assert np.isnan(hd95(empty, empty, spacing))
    # exactly one empty: Dice 0, HD95 = image diagonal (default) or the given value
    for p, r in ((some, empty), (empty, some)):
        assert dice(p, r) == 0.0
        assert hd95(p, r, spacing) == pytest.approx(diag)
        assert np.isnan(hd95(p, r, spacing, one_empty=float("nan")))
        assert hd95(p, r, spacing, one_empty=123.0) == 123.0
    with pytest.raises(ValueError):
        hd95(some, empty, spacing, one_empty="max")
    with pytest.raises(ValueError):
        surface_distances(some, empty, spacing)


def test_argument_checks():
    a = np.ones((3, 4), bool)
    with pytest.raises(ValueError, match="shape"):
        dice(a, np.ones((4, 3), bool))
    with pytest.raises(ValueError, match="spacing"):
        hd95(a, a, (1.0, 2.0, 3.0))
    with pytest.raises(ValueError, match="positive"):
        hd95(a, a, (1.0, -2.0))
    # scalar spacing = isotropic
    b = box((8, 8), (0, 0), (2, 2))
    c = box((8, 8), (5, 0), (7, 2))
    assert hd95(b, c, 2.5) == pytest.approx(hd95(b, c, (2.5, 2.5)))


# ---------------------------------------------------------------------------------- Dice
def test_dice_known_values():
    a = box((10, 10), (0, 0), (4, 5))   # 20 pixels
    b = box((10, 10), (2, 0), (6, 5))   # 20 pixels, 10 shared
    assert confusion_counts(a, b) == (10, 10, 10, 70)
    assert dice(a, b) == pytest.approx(2 * 10 / (20 + 20))
    assert dice(a, a) == 1.0
    ignore = np.zeros((10, 10), bool)
    ignore[4:6, :] = True               # hides b's 10 unmatched pixels
    assert dice(a, b, ignore) == pytest.approx(2 * 10 / (2 * 10 + 10))


def test_dice_agrees_with_nnunet():
    """Same TP/FP/FN and Dice as nnunetv2.evaluation.evaluate_predictions (incl. ignore mask and
    the both-empty NaN convention, whose formula nnU-Net applies in compute_metrics)."""
    from nnunetv2.evaluation.evaluate_predictions import compute_tp_fp_fn_tn

    rng = np.random.default_rng(3)
    for t in range(12):
        shape = (9, 11, 7) if t % 2 else (15, 13)
        ref = rng.random(shape) < rng.uniform(0, 0.5)
        pred = rng.random(shape) < rng.uniform(0, 0.5)
        if t == 0:
            ref[:] = pred[:] = False
        if t == 1:
            pred[:] = False
        ignore = (rng.random(shape) < 0.2) if t % 3 == 0 else None
        tp, fp, fn, tn = compute_tp_fp_fn_tn(ref, pred, ignore)
        assert confusion_counts(pred, ref, ignore) == (tp, fp, fn, tn)
        nn_dice = np.nan if tp + fp + fn == 0 else 2 * tp / (2 * tp + fp + fn)
        ours = dice(pred, ref, ignore)
        assert (np.isnan(ours) and np.isnan(nn_dice)) or ours == pytest.approx(nn_dice, abs=1e-15)


# ---------------------------------------------------------------------------------- misc
def test_squeeze_singleton_axes():
    arr = np.zeros((1, 5, 6))
    out, sp = squeeze_singleton_axes(arr, (999.0, 0.5, 0.7))
    assert out.shape == (5, 6) and sp == (0.5, 0.7)
    out, sp = squeeze_singleton_axes(np.zeros((3, 1, 4)), (1.0, 2.0, 3.0))
    assert out.shape == (3, 4) and sp == (1.0, 3.0)
    out, sp = squeeze_singleton_axes(np.zeros((1, 1)), (1.0, 2.0))
    assert out.shape == (1,) and sp == (2.0,)


# ----------------------------------------------------------------- agreement with medpy
def test_hd95_agrees_with_medpy():
    """medpy.metric.binary.hd95 (the implementation UA-MT / SSL4MIS use) on random shapes with
    anisotropic spacing, 2d and 3d, connectivity 1 and 2. Needs the optional test dependency medpy."""
    medpy_binary = pytest.importorskip("medpy.metric.binary")
    rng = np.random.default_rng(11)
    n_checked = 0
    shapes = [(25, 30), (40, 18), (14, 20, 18), (22, 12, 30), (10, 10, 10)]
    for shape, conn, _ in itertools.product(shapes, (1, 2), range(3)):
        a = random_blob(rng, shape, thresh=rng.uniform(0.5, 0.6))
        b = random_blob(rng, shape, thresh=rng.uniform(0.5, 0.6))
        if not a.any() or not b.any():
            continue
        spacing = tuple(rng.uniform(0.25, 4.0, size=len(shape)))
        ours = hd95(a, b, spacing, connectivity=conn)
        theirs = medpy_binary.hd95(a, b, voxelspacing=spacing, connectivity=conn)
        assert ours == pytest.approx(theirs, rel=1e-12, abs=1e-12)
        n_checked += 1
    # also the hand-built overlapping cubes and a shape touching the border, without spacing
    a = box((12, 12, 12), (0, 0, 0), (10, 10, 10))
    b = box((12, 12, 12), (2, 0, 0), (12, 10, 10))
    assert hd95(a, b) == pytest.approx(medpy_binary.hd95(a, b))
    assert n_checked >= 20
