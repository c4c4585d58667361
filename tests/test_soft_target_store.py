"""The soft-target store (SUD's z per unlabeled image, in case voxel space): the history is never
resampled, unwarped patches are exact, written voxels read as written whatever their neighbours.
All patches come from nnU-Net's real training transforms (rotation, scaling, mirroring)."""
import numpy as np
import pytest
import torch

from nnunet_sud.targets.store import SoftTargetStore
from nnunet_sud.unlabeled.coordinates import sample_case_field
from nnunet_sud.unlabeled.loader import UnlabeledDataLoader
from test_unlabeled_stream import LABELS, InMemoryDataset, initial_patch, nnunet_transforms, smooth_field


def sphere(shape, radius):
    g = np.meshgrid(*[np.arange(s, dtype=np.float32) - (s - 1) / 2 for s in shape], indexing="ij")
    fg = (sum(x ** 2 for x in g) <= radius ** 2).astype(np.float32)
    return np.stack([1 - fg, fg])  # (2, *shape) sharp two-class target


def whole_case_batch(key, case_shape):
    """An unwarped patch covering the whole case: coords = the case grid, all valid."""
    grids = torch.meshgrid(*[torch.arange(s, dtype=torch.float32) for s in case_shape], indexing="ij")
    return {"keys": [key], "coords": torch.stack(grids)[None], "valid": torch.ones((1, *case_shape), dtype=torch.bool),
            "case_shapes": torch.tensor([case_shape])}


def augmented_batches(case_shape, patch, n, seed):
    """n batches of 2 patches of one case "s" through nnU-Net's geometric training transforms."""
    np.random.seed(seed)
    torch.manual_seed(seed)
    dl = UnlabeledDataLoader(InMemoryDataset({"s": np.zeros((1, *case_shape), np.float32)}), 2,
                             initial_patch(patch, 3), patch, LABELS, transforms=nnunet_transforms(patch, 3))
    return [dl.generate_train_batch() for _ in range(n)]


def is_warped(b):
    return bool(((b["coords"] - b["coords"].round()).abs().amax() > 1e-3).item())


def nearest(field, coords):
    """field (C, Z, Y, X) at the nearest case voxel of coords (3, *P): a perfect, sharp prediction."""
    idx = coords.round().long()
    for a, n in enumerate(field.shape[1:]):
        idx[a] = idx[a].clamp(0, n - 1)
    return field[:, idx[0], idx[1], idx[2]]


def test_alpha0_keeps_a_sharp_target_through_30_augmented_visits(tmp_path):
    """alpha = 0: visits must not change a stored target at all (the old store read z_prev by
    interpolation and wrote the blend back by a second one: about 10,000 soft voxels and 7 % of
    the foreground mass gone after 30 such visits of a 40^3 sphere)."""
    case, patch = (40, 40, 40), (24, 24, 24)
    z0 = sphere(case, 12)
    store = SoftTargetStore(str(tmp_path / "s"), 2)
    store.write(**whole_case_batch("s", case), values=torch.from_numpy(z0)[None])
    batches = augmented_batches(case, patch, 15, seed=0)
    assert sum(is_warped(b) for b in batches) >= 3  # rotated/scaled patches are among them
    g = torch.Generator().manual_seed(0)
    for b in batches:  # 15 batches x 2 patches = 30 visits
        garbage = torch.softmax(torch.randn((2, 2, *patch), generator=g) * 3, 1)
        store.update(b["keys"], b["coords"], b["valid"], b["case_shapes"], garbage, alpha=0.0)
    assert np.abs(store.load_case("s") - z0).max() <= 1e-3


def test_perfect_predictions_do_not_blur_the_target(tmp_path):
    """alpha = 0.5, 30 visits whose estimate is the sharp sphere itself: only the new estimate is
    resampled (once per visit), so soft voxels stay within about a voxel of the surface and the
    foreground mass is kept; they do not accumulate visit after visit."""
    case, patch = (40, 40, 40), (24, 24, 24)
    z0 = torch.from_numpy(sphere(case, 12))
    store = SoftTargetStore(str(tmp_path / "s"), 2)
    store.write(**whole_case_batch("s", case), values=z0[None])
    for b in augmented_batches(case, patch, 15, seed=1):
        est = torch.stack([nearest(z0, b["coords"][i]) for i in range(2)])
        store.update(b["keys"], b["coords"], b["valid"], b["case_shapes"], est, alpha=0.5)
    z = store.load_case("s")
    soft = int(((z[1] > 0.05) & (z[1] < 0.95)).sum())
    surface = 4 * np.pi * 12 ** 2  # voxels on the sphere's surface
    assert soft < 2 * surface, soft  # a band about one voxel wide
    assert abs(z[1].sum() - z0[1].sum().item()) / z0[1].sum().item() < 0.01


def test_alpha1_on_unwarped_patches_stores_the_estimate_exactly(tmp_path):
    from batchgeneratorsv2.transforms.spatial.mirroring import MirrorTransform
    case = (10, 12, 12)
    store = SoftTargetStore(str(tmp_path / "s"), 3, dtype=np.float32)
    np.random.seed(3)
    torch.manual_seed(3)
    dl = UnlabeledDataLoader(InMemoryDataset({"s": np.zeros((1, *case), np.float32)}), 2, (8, 8, 8), (8, 8, 8),
                             LABELS, transforms=MirrorTransform(allowed_axes=(0, 1, 2)))
    g = torch.Generator().manual_seed(3)
    store.write(**whole_case_batch("s", case), values=torch.softmax(torch.randn((1, 3, *case), generator=g), 1))
    for _ in range(5):
        b = dl.generate_train_batch()
        est = torch.softmax(torch.randn((2, 3, 8, 8, 8), generator=g), 1)
        for i in range(2):  # one patch at a time: the two may overlap
            one = {k: v[i:i + 1] for k, v in b.items() if k != "data"}
            before = store.load_case("s")
            store.update(one["keys"], one["coords"], one["valid"], one["case_shapes"], est[i:i + 1], alpha=1.0)
            after = store.load_case("s")
            idx = one["coords"][0].round().long()
            assert np.array_equal(after[:, idx[0], idx[1], idx[2]], est[i].numpy())  # bit-exact
            untouched = np.ones(case, bool)
            untouched[idx[0].numpy(), idx[1].numpy(), idx[2].numpy()] = False
            assert np.array_equal(after[:, untouched], before[:, untouched])
            # and at alpha = 0.3 the case-space update is the patch's eq. 8 target, voxel for voxel
            store.update(one["keys"], one["coords"], one["valid"], one["case_shapes"], 1 - est[i:i + 1], alpha=0.3)
            want = 0.7 * est[i].numpy() + 0.3 * (1 - est[i].numpy())
            assert np.allclose(store.load_case("s")[:, idx[0], idx[1], idx[2]], want, atol=1e-6)


def test_2d_a_written_slice_reads_as_written_whatever_its_neighbours(tmp_path):
    """2d configurations: patches lie on one case slice (integer z). A written voxel beside unwritten
    ones (the slices above and below) must read back as written, with its value."""
    case = (5, 8, 9)
    store = SoftTargetStore(str(tmp_path / "s"), 2, dtype=np.float32)
    g = torch.Generator().manual_seed(0)

    def slice_batch(z):
        yy, xx = torch.meshgrid(torch.arange(8.0), torch.arange(9.0), indexing="ij")
        coords = torch.stack([torch.full_like(yy, float(z)), yy, xx])[None]
        return {"keys": ["s"], "coords": coords, "valid": torch.ones((1, 8, 9), dtype=torch.bool),
                "case_shapes": torch.tensor([case])}

    v2 = torch.softmax(torch.randn((1, 2, 8, 9), generator=g), 1)
    store.write(**slice_batch(2), values=v2)
    got = store.read(**slice_batch(2))
    assert torch.allclose(got, v2, atol=1e-6)  # written, although slices 1 and 3 are not
    assert torch.isnan(store.read(**slice_batch(3))).all()
    v3 = torch.softmax(torch.randn((1, 2, 8, 9), generator=g), 1)
    store.write(**slice_batch(3), values=v3)
    assert torch.allclose(store.read(**slice_batch(2)), v2, atol=1e-6)
    assert torch.allclose(store.read(**slice_batch(3)), v3, atol=1e-6)


def test_read_is_normalised_over_written_neighbours(tmp_path):
    """Between a written and an unwritten voxel, read returns the written value once its weight
    reaches min_weight (0.5), and "no target" below it."""
    store = SoftTargetStore(str(tmp_path / "s"), 2, dtype=np.float32)
    case = (1, 1, 4)
    store.write(["s"], torch.tensor([[[[[0.0]]], [[[0.0]]], [[[1.0]]]]]), torch.ones((1, 1, 1, 1), dtype=torch.bool),
                torch.tensor([case]), torch.tensor([0.2, 0.8]).reshape(1, 2, 1, 1, 1))  # voxel x = 1 only
    xs = torch.tensor([0.4, 0.6, 1.0, 1.3, 1.6])
    coords = torch.stack([torch.zeros(5), torch.zeros(5), xs]).reshape(1, 3, 1, 1, 5)
    got = store.read(["s"], coords, torch.ones((1, 1, 1, 5), dtype=torch.bool), torch.tensor([case]))[0, :, 0, 0]
    assert torch.isnan(got[:, 0]).all()  # weight of x = 1 is 0.4
    for j in (1, 2, 3):  # weights 0.6, 1, 0.7
        assert torch.allclose(got[:, j], torch.tensor([0.2, 0.8]))
    assert torch.isnan(got[:, 4]).all()  # weight 0.4


def _augmented_batches(field, patch, n, seed, geometric=True):
    np.random.seed(seed)
    torch.manual_seed(seed)
    cases = {"a": field[None], "b": field[None] * 0.5}
    t = nnunet_transforms(patch, 3) if geometric else None
    if not geometric:
        from batchgeneratorsv2.transforms.spatial.mirroring import MirrorTransform
        t = MirrorTransform(allowed_axes=(0, 1, 2))
    ip = initial_patch(patch, 3) if geometric else patch
    dl = UnlabeledDataLoader(InMemoryDataset(cases), 2, ip, patch, LABELS, transforms=t)
    return [dl.generate_train_batch() for _ in range(n)], cases


def _field_values(cases, b, i):
    f = torch.from_numpy(cases[b["keys"][i]])
    return torch.cat([sample_case_field(f, b["coords"][i]), 1 - sample_case_field(f, b["coords"][i])])


def linear_field(shape):
    g = np.meshgrid(*[np.arange(s, dtype=np.float32) for s in shape], indexing="ij")
    return (0.03 * g[0] - 0.02 * g[1] + 0.025 * g[2] - 0.2).astype(np.float32)


def low_frequency_field(shape):
    g = np.meshgrid(*[np.arange(s, dtype=np.float32) for s in shape], indexing="ij")
    return (0.5 * np.sin(0.12 * g[0] + 0.1 * g[1] + 1) * np.cos(0.09 * g[2] - 0.5)).astype(np.float32)


@pytest.mark.parametrize("kind,dtype,tol", [("linear", np.float32, 1e-3), ("smooth", np.float16, 0.01)])
def test_store_round_trip_through_real_augmented_patches(tmp_path, kind, dtype, tol):
    """Write a known field through augmented patches, read it back through other patches.
    A linear field survives linear interpolation exactly (error: float rounding only); a smooth
    one within the interpolation error of two linear interpolations plus float16 storage."""
    field = (linear_field if kind == "linear" else low_frequency_field)((20, 24, 24))
    store = SoftTargetStore(str(tmp_path / "s"), 2, dtype=dtype)
    writes, cases = _augmented_batches(field, (14, 16, 16), 40, seed=1)
    n_warped = 0
    for b in writes:
        vals = torch.stack([_field_values(cases, b, i) for i in range(2)])
        vals = torch.where(b["valid"][:, None], vals, torch.full_like(vals, 7.0))  # padding: a marker value
        store.write(b["keys"], b["coords"], b["valid"], b["case_shapes"], vals)
        n_warped += int(((b["coords"] - b["coords"].round()).abs().amax() > 1e-3).item())
    assert n_warped > 3
    # padding never written: the marker appears nowhere in the store
    for k in ("a", "b"):
        stored = store.load_case(k)
        assert not np.any(np.abs(stored[np.isfinite(stored)] - 7.0) < 1)
    reads, _ = _augmented_batches(field, (14, 16, 16), 20, seed=2)
    # where every interpolation neighbour was written: the interpolation error only (tol); where only
    # some were (weight in [0.5, 1)), the read is a mean of written voxels within a voxel per axis:
    # off by at most the field's gradient summed over the axes
    bound = tol + sum(np.abs(np.diff(field, axis=a)).max() for a in range(3))
    errs, edge_errs, seen = [], [], 0
    for b in reads:
        got = store.read(b["keys"], b["coords"], b["valid"], b["case_shapes"])
        for i in range(2):
            want = _field_values(cases, b, i)
            written = torch.from_numpy(np.isfinite(store.load_case(b["keys"][i])).all(0, keepdims=True)).float()
            full = sample_case_field(written, b["coords"][i])[0] > 1 - 1e-5
            ok = b["valid"][i] & torch.isfinite(got[i]).all(0)
            assert (ok | ~full | ~b["valid"][i]).all()  # fully written voxels always have a target
            seen += int((ok & full).sum())
            errs.append((got[i][:, ok & full] - want[:, ok & full]).abs().max().item() if (ok & full).any() else 0.0)
            edge = ok & ~full
            edge_errs.append((got[i][:, edge] - want[:, edge]).abs().max().item() if edge.any() else 0.0)
            assert torch.isnan(got[i][:, ~b["valid"][i]]).all()  # invalid voxels read as "no target"
    assert seen > 10000
    assert max(errs) < tol, max(errs)
    assert max(edge_errs) < bound, (max(edge_errs), bound)


def test_store_is_exact_for_unwarped_patches(tmp_path):
    field = smooth_field((10, 12, 12), 9) / 3
    store = SoftTargetStore(str(tmp_path / "s"), 2, dtype=np.float32)
    batches, cases = _augmented_batches(field, (10, 12, 12), 6, seed=3, geometric=False)
    for b in batches[:3]:
        store.write(b["keys"], b["coords"], b["valid"], b["case_shapes"],
                    torch.stack([_field_values(cases, b, i) for i in range(2)]))
    for b in batches[3:]:
        got = store.read(b["keys"], b["coords"], b["valid"], b["case_shapes"])
        for i in range(2):
            assert torch.allclose(got[i], _field_values(cases, b, i), atol=1e-6)


def test_unvisited_voxels_read_as_no_target(tmp_path):
    store = SoftTargetStore(str(tmp_path / "s"), 2)
    b = whole_case_batch("c", (4, 4, 4))
    assert torch.isnan(store.read(b["keys"], b["coords"], b["valid"], b["case_shapes"])).all()
    half = dict(b, valid=b["valid"].clone())
    half["valid"][:, :2] = False
    store.write(half["keys"], half["coords"], half["valid"], half["case_shapes"], torch.full((1, 2, 4, 4, 4), 0.5))
    got = store.read(b["keys"], b["coords"], b["valid"], b["case_shapes"])
    assert torch.isnan(got[0, :, :2]).all() and (got[0, :, 2:] == 0.5).all()


def _same_store_two_ways(tmp_path, batches, num_classes, dtype=np.float32):
    """Apply the same updates and reads to a store with and without the whole-block path for crops;
    return (number of patches that took it, the two stores, the reads of each)."""
    from nnunet_sud.targets.store import AxisAlignedCrop
    stores = [SoftTargetStore(str(tmp_path / name), num_classes, dtype=dtype) for name in ("fast", "general")]
    stores[1].fast_crops = False
    g = torch.Generator().manual_seed(0)
    reads = ([], [])
    fast = 0
    for n, b in enumerate(batches):
        for i in range(b["coords"].shape[0]):
            fast += AxisAlignedCrop.of(b["coords"][i], b["valid"][i], b["case_shapes"][i].tolist()) is not None
        est = torch.softmax(torch.randn((b["coords"].shape[0], num_classes, *b["valid"].shape[1:]), generator=g), 1)
        for s, r in zip(stores, reads):
            r.append(s.read(b["keys"], b["coords"], b["valid"], b["case_shapes"]))
            for i in range(b["coords"].shape[0]):  # one patch at a time: the two may overlap
                s.update(b["keys"][i:i + 1], b["coords"][i:i + 1], b["valid"][i:i + 1], b["case_shapes"][i:i + 1],
                         est[i:i + 1], alpha=1.0 if n == 0 else 0.3)
    return fast, stores, reads


def test_whole_block_path_for_crops_gives_what_the_general_path_gives(tmp_path):
    """Crops without rotation or scaling (mirrored, partly outside the case) are read and updated by
    whole-block operations (AxisAlignedCrop); through nnU-Net's real transforms, a mix of such crops
    and warped patches leaves the same store and reads the same targets as the per-voxel path."""
    batches = augmented_batches((20, 24, 24), (14, 16, 16), 20, seed=5)
    mirrored, _ = _augmented_batches(np.zeros((12, 14, 14), np.float32), (10, 16, 12), 10, seed=6, geometric=False)
    crops = sum(not is_warped(b) for b in batches)
    assert 3 <= crops < len(batches)  # both kinds of patch
    fast, (a, b), (ra, rb) = _same_store_two_ways(tmp_path, batches + mirrored, 3)
    assert fast >= 2 * (crops + len(mirrored)) - 2  # crops take the whole-block path (not only by chance)
    for k in set(a.keys()) | set(b.keys()):
        za, zb = a.load_case(k), b.load_case(k)
        assert np.array_equal(np.isfinite(za), np.isfinite(zb)), k
        assert np.allclose(za[np.isfinite(za)], zb[np.isfinite(zb)], atol=1e-6), k
    for x, y in zip(ra, rb):
        assert torch.equal(torch.isnan(x), torch.isnan(y))
        assert torch.allclose(torch.nan_to_num(x), torch.nan_to_num(y), atol=1e-5)


def test_whole_block_path_for_2d_patches_with_flips_and_swapped_axes(tmp_path):
    """2d patches lie on one case slice; a patch whose axes run against, or across, the case axes
    (mirrored, or a user's transposing transform) still maps voxel to voxel, also partly outside."""
    from nnunet_sud.targets.store import AxisAlignedCrop
    case = (3, 7, 9)
    yy, xx = torch.meshgrid(torch.arange(8.0), torch.arange(6.0), indexing="ij")

    def patch(z, swap, flip_y, y0, x0):
        y, x = (xx, yy) if swap else (yy, xx)
        y = (y.shape[0] - 1 - y if flip_y else y) if not swap else y.flip(1) if flip_y else y
        coords = torch.stack([torch.full_like(yy, float(z)), y + y0, x + x0])
        valid = ((coords >= 0) & (coords <= torch.tensor(case).view(3, 1, 1) - 1)).all(0)
        return {"keys": ["s"], "coords": coords[None], "valid": valid[None], "case_shapes": torch.tensor([case])}

    batches = [patch(z, swap, flip, y0, x0) for z in (0, 2) for swap in (False, True) for flip in (False, True)
               for y0, x0 in ((0, 0), (-2, 3), (1, -1))]
    crop = AxisAlignedCrop.of(batches[5]["coords"][0], batches[5]["valid"][0], case)
    v = torch.arange(2 * 8 * 6, dtype=torch.float32).reshape(2, 8, 6)[(slice(None),) + crop.patch]
    assert torch.equal(crop.to_patch(crop.to_case(v)), v)  # the two layouts are each other's inverse
    fast, (a, b), (ra, rb) = _same_store_two_ways(tmp_path, batches, 2)
    assert fast == len(batches)
    za, zb = a.load_case("s"), b.load_case("s")
    assert np.array_equal(np.isfinite(za), np.isfinite(zb)) and np.isfinite(za).any()
    assert np.allclose(za[np.isfinite(za)], zb[np.isfinite(zb)], atol=1e-6)
    for x, y in zip(ra, rb):
        assert torch.equal(torch.isnan(x), torch.isnan(y))
        assert torch.allclose(torch.nan_to_num(x), torch.nan_to_num(y), atol=1e-6)
