"""Per-image soft targets kept in each unlabeled case's preprocessed voxel space.

SUD (Young et al., "SUD: Supervision by Denoising for Medical Image Segmentation", §3.3, eq. 8)
and temporal ensembling keep one soft target z per unlabeled image and update it every time the
image is visited:

    z <- z + alpha (c - z)        (first visit: z <- c)

with c the current estimate (beta a(f) + (1 - beta) f). Patches reach the network cropped,
rotated, scaled and mirrored, so the store works in *case* space through the exact patch->case
map of the unlabeled stream (``batch_u['coords']``, ``batch_u['valid']``), and only the new
estimate c ever crosses between patch and case grids. The history z never passes through an
interpolation again: were it read into the patch and written back, every rotated or scaled visit
(about a third of nnU-Net's patches) would blur it once more, and as alpha -> 0 the targets would
become repeatedly smoothed copies of themselves.

* ``read``: the stored target at every patch voxel (the z_prev of the patch's loss target), by
  linear interpolation among the *written* case voxels around it: each neighbour counts with its
  interpolation weight if it was written, and the voxel has a target when the written weight
  reaches ``min_weight`` (0.5); otherwise it reads as NaN ("no target yet"; SUD then uses
  z_prev := c). A written voxel read at its own position is therefore always "written", whatever
  its neighbours (in 2d configurations: whatever the slices above and below).
* ``update(..., values, alpha)``: c back to case space, then the update above on case voxels.
  Unwarped patches (integer coordinates: crop and mirroring, about two thirds of nnU-Net's
  augmented patches) map voxel to voxel, so the stored z equals the patch's loss target exactly;
  ``read`` and ``update`` move them between patch and case layout by flips and a transpose
  (``AxisAlignedCrop``) and do their arithmetic on whole blocks on the values' device (the GPU):
  only the stored dtype's bytes cross to the CPU and the files.
  For rotated/scaled patches the patch->case map is affine: it is fitted to the coordinates (by
  least squares; residual checked), inverted, and every case voxel inside the patch's footprint
  takes the linear interpolation of c at its patch position. Only case voxels whose interpolation
  neighbours are all valid patch voxels are updated: padding never is. Maps that are not affine
  (a user's variant with elastic deformation) fall back to linear splatting: each valid patch
  voxel spreads its value to its 2^d neighbouring case voxels with the interpolation weights, and
  a case voxel takes the weighted mean when the weights reach ``min_weight``.
  ``write(..., values)`` is ``update`` with alpha = 1 (the store takes c as it is).

Storage: one ``.npy`` file per case (``(C, Z, Y, X)``, float16 by default, NaN = never written),
memory-mapped, opened for each access: memory does not grow with the number of cases (the OS
page cache holds what is hot). A new case file is created under a temporary name and linked
into place (never over a file another process created meanwhile), and each update stores whole
voxels of valid probabilities, so a killed process leaves a usable store (a region may hold a mix
of the old and the new targets). Updates are not flushed (``msync``) one by one: every reader
(this process, other ranks, ``snapshot``'s copy) sees the shared page cache and the kernel writes
it back, so a killed process loses nothing it wrote (a crash of the machine could). ``snapshot``/``restore`` copy the store beside a checkpoint so
that ``--c`` resumes with exactly the store of that checkpoint; a snapshot records the
checkpoint's epoch (``snapshot_epoch``) so that a mismatch is detected.

``write_behind=True`` applies ``update``/``write`` in a background thread of this process, in call
order, so the main process does not wait for the file I/O and the resampling of the update
(the GPU keeps computing meanwhile). Everything that reads the files (``read``, ``keys``,
``load_case``, ``snapshot``, ``restore``, ``clear``) first waits for the queued updates, so every
result is the same as without it. ``prefetch`` queues a ``read`` there too, in order with the
updates, so that the file reads of a step overlap its forward pass (SUD prefetches before it runs
the network and reads after). ``wait()`` waits for the queue (call it before other processes read
the files, e.g. before a DDP barrier), ``close()`` also ends the thread. An update that fails in
the background is raised by the next call.

Several processes (DDP ranks) may share one store: ``update`` holds an exclusive lock
(``flock``) on the case file from reading its block to writing it back, ``read`` a shared one
while it copies its block, so two ranks updating the same case apply both updates, one after the
other (without the lock, the block one rank writes back could undo what the other wrote inside it
meanwhile). On systems without ``fcntl`` (Windows) there is no lock: one process only.

Shapes: keys (B,), coords (B, 3, *P) case voxel (z, y, x), valid (B, *P) bool,
values (B, C, *P); P is the patch (2 or 3 axes).
"""
import concurrent.futures
import contextlib
import os
import queue
import shutil
import threading
import time
from typing import Optional, Sequence

import numpy as np
import torch

from nnunet_sud.unlabeled.coordinates import sample_case_field

#: the torch dtype of each storage dtype (whole-block arithmetic converts on the device)
TORCH_DTYPES = {np.dtype(np.float16): torch.float16, np.dtype(np.float32): torch.float32,
                np.dtype(np.float64): torch.float64}

#: file in a snapshot folder holding the epoch it was taken for
SNAPSHOT_EPOCH_FILE = ".snapshot_epoch"


try:
    import fcntl
except ImportError:  # Windows: no locks (a store used by one process only)
    fcntl = None


@contextlib.contextmanager
def case_lock(path: str, exclusive: bool):
    """Hold an advisory lock on the file ``path`` (exclusive: for writers; shared: for readers)."""
    if fcntl is None:
        yield
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)  # releases the lock


class AxisAlignedCrop:
    """A patch whose valid voxels map to case voxels by a crop, axis flips and an axis order only
    (nnU-Net's patches without rotation or scaling, about two thirds of them): its valid voxels
    form a box ``patch`` (slices of the patch axes) that covers the case block ``case`` (slices of
    the case axes z, y, x) voxel for voxel. ``to_case`` / ``to_patch`` move values (C, ...) between
    the two layouts by flips and a transpose, so the store reads and updates such a patch with
    whole-block array operations instead of per-voxel indexing (at 128^3 that is most of its cost).
    ``of`` returns None for every other patch (warped, valid voxels not a box, a box one voxel thin
    along an axis, whose direction cannot be told); those take the general path."""

    def __init__(self, patch, case, order, flips, missing):
        self.patch, self.case = patch, case
        self.order = order      # case axis of every patch axis
        self.flips = flips      # patch axes that run backwards through the case
        self.missing = missing  # 2d patches: the case axis the patch does not span (one slice)

    @classmethod
    def of(cls, coords: torch.Tensor, valid: torch.Tensor, case_shape) -> "Optional[AxisAlignedCrop]":
        """coords (3, *P) case voxel of every patch voxel, valid (*P) bool, case_shape (Z, Y, X)."""
        n = valid.ndim
        box = []
        for k in range(n):
            hit = valid.any(dim=tuple(a for a in range(n) if a != k)) if n > 1 else valid
            idx = hit.nonzero()
            if idx.numel() == 0:
                return None
            box.append(slice(int(idx[0]), int(idx[-1]) + 1))
        box = tuple(box)
        if not bool(valid[box].all()):
            return None
        c = coords[(slice(None),) + box]
        if any(s < 2 for s in c.shape[1:]):
            return None
        r = c.round()
        origin = r[(slice(None),) + (0,) * n]
        order, flips = [], []
        for k in range(n):
            step = r[(slice(None),) + tuple(1 if a == k else 0 for a in range(n))] - origin
            j = int(step.abs().argmax())
            if float(step.abs().sum()) != 1.0:
                return None
            order.append(j)
            if float(step[j]) < 0:
                flips.append(k)
        if len(set(order)) != n:
            return None
        expected = origin.reshape(3, *[1] * n).expand_as(c).clone()
        for k, j in enumerate(order):  # case axis j runs along patch axis k, forwards or backwards
            ramp = torch.arange(c.shape[1 + k], dtype=c.dtype, device=c.device) * (-1 if k in flips else 1)
            expected[j] += ramp.reshape(*[1 if a != k else -1 for a in range(n)])
        if float((c - expected).abs().max()) > 1e-3:  # also: nothing warped (c - r is part of it)
            return None
        lo = r.reshape(3, -1).amin(1).long().tolist()
        hi = (r.reshape(3, -1).amax(1).long() + 1).tolist()
        if min(lo) < 0 or any(h > s for h, s in zip(hi, case_shape)):
            return None
        missing = next((j for j in range(3) if j not in order), None)
        return cls(box, tuple(slice(a, b) for a, b in zip(lo, hi)), order, flips, missing)

    def to_case(self, values: torch.Tensor) -> torch.Tensor:
        """(C, *box) in patch layout -> (C, *case block)."""
        if self.flips:
            values = values.flip([1 + k for k in self.flips])
        axes = sorted(range(len(self.order)), key=lambda k: self.order[k])  # patch axes in case-axis order
        values = values.permute(0, *[1 + k for k in axes])
        return values if self.missing is None else values.unsqueeze(1 + self.missing)

    def to_patch(self, block: torch.Tensor) -> torch.Tensor:
        """(C, *case block) -> (C, *box) in patch layout (the inverse of ``to_case``)."""
        if self.missing is not None:
            block = block.squeeze(1 + self.missing)
        axes = sorted(range(len(self.order)), key=lambda k: self.order[k])
        inverse = [axes.index(k) for k in range(len(axes))]
        block = block.permute(0, *[1 + a for a in inverse])
        return block.flip([1 + k for k in self.flips]) if self.flips else block


class SoftTargetStore:
    #: read and update crops without rotation or scaling by whole-block array operations
    #: (``AxisAlignedCrop``); False sends them through the general path (same results, slower)
    fast_crops = True

    def __init__(self, folder: str, num_classes: int, dtype=np.float16, min_weight: float = 0.5,
                 write_behind: bool = False):
        self.folder = folder
        self.num_classes = int(num_classes)
        self.dtype = np.dtype(dtype)
        if self.dtype not in TORCH_DTYPES:
            raise ValueError(f"soft-target store {folder}: dtype {self.dtype} is not supported; use float16 or float32")
        self.min_weight = float(min_weight)
        self.write_behind = bool(write_behind)
        self._queue = None   # queued updates (write_behind), created with the thread at the first one
        self._writer = None
        self._error = None
        self._prefetched = None  # ((keys, coords, valid, case_shapes), future) of the last prefetch
        #: seconds spent copying blocks out of and into the case files (in whichever thread did it):
        #: the part of the store's work that stays on the CPU when the arithmetic runs on a GPU
        self.file_seconds = 0.0
        os.makedirs(folder, exist_ok=True)

    # ------------------------------------------------------------------ write-behind
    def wait(self) -> None:
        """Block until every queued update is in the files; raise the first one that failed."""
        if self._queue is not None:
            self._queue.join()
        if self._error is not None:
            error, self._error = self._error, None
            raise RuntimeError(f"an update of the soft-target store {self.folder} failed in the background: "
                               f"{type(error).__name__}: {error}") from error

    def close(self) -> None:
        """``wait()``, then end the background thread (a later update starts a new one)."""
        try:
            self.wait()
        finally:
            if self._writer is not None:
                self._queue.put(None)
                self._writer.join()
                self._queue = self._writer = None

    def _write_loop(self, jobs: "queue.Queue"):
        while True:
            job = jobs.get()
            try:
                if job is None:
                    return
                fn, args, future = job
                if future is not None:  # a prefetched read: its result or failure goes to its reader
                    try:
                        if self._error is not None:
                            raise RuntimeError("an earlier update failed") from self._error
                        future.set_result(fn(*args))
                    except BaseException as e:  # noqa: BLE001 - raised by read()
                        future.set_exception(e)
                elif self._error is None:  # after a failure the rest is dropped; wait() raises it
                    fn(*args)
            except BaseException as e:  # noqa: BLE001 - handed to the caller by wait()
                self._error = e
            finally:
                jobs.task_done()

    def _background(self, fn, args, future=None) -> None:
        if self._error is not None:
            self.wait()  # raises the background failure
        if self._writer is None:
            self._queue = queue.Queue()
            self._writer = threading.Thread(target=self._write_loop, args=(self._queue,), daemon=True,
                                            name="soft-target-store")
            self._writer.start()
        self._queue.put((fn, args, future))

    # ------------------------------------------------------------------ files
    def case_file(self, key: str) -> str:
        return os.path.join(self.folder, f"{key}.npy")

    def _open(self, key: str, case_shape: Sequence[int], create: bool):
        path = self.case_file(key)
        if not os.path.isfile(path):
            if not create:
                return None
            tmp = os.path.join(self.folder, f".tmp_{os.getpid()}_{key}.npy")
            arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=self.dtype,
                                            shape=(self.num_classes, *map(int, case_shape)))
            arr[:] = np.nan
            arr.flush()
            del arr
            try:
                os.link(tmp, path)  # atomic, and fails if another process created the case meanwhile
            except FileExistsError:
                pass  # theirs is used: replacing it would drop what they have written into it
            except OSError:  # a file system without hard links
                if not os.path.isfile(path):
                    os.replace(tmp, path)
            if os.path.exists(tmp):
                os.remove(tmp)
        arr = np.load(path, mmap_mode="r+")
        if arr.shape != (self.num_classes, *map(int, case_shape)):
            raise RuntimeError(f"soft target file {path} has shape {arr.shape}, expected "
                               f"{(self.num_classes, *case_shape)}: it belongs to other data. Delete the folder "
                               f"{self.folder} to start the targets anew.")
        return arr

    def keys(self):
        self.wait()
        return sorted(f[:-4] for f in os.listdir(self.folder) if f.endswith(".npy") and not f.startswith("."))

    def load_case(self, key: str) -> np.ndarray:
        """The whole stored field of a case (C, Z, Y, X) as float32 (NaN where never written)."""
        self.wait()
        return np.asarray(np.load(self.case_file(key), mmap_mode="r"), dtype=np.float32)

    # ------------------------------------------------------------------ patch access
    def _copy(self, arr: np.ndarray, sl: tuple) -> np.ndarray:
        """A block of a case file, copied (the stored dtype); timed in ``file_seconds``."""
        t0 = time.perf_counter()
        block = np.array(arr[sl])
        self.file_seconds += time.perf_counter() - t0
        return block

    def _put(self, arr: np.ndarray, sl: tuple, block: np.ndarray) -> None:
        t0 = time.perf_counter()
        arr[sl] = block
        self.file_seconds += time.perf_counter() - t0

    @staticmethod
    def _block(pts: torch.Tensor, case_shape: Sequence[int], margin: int):
        lo = torch.floor(pts.min(1).values).long().clamp(min=0)
        hi = torch.floor(pts.max(1).values).long() + 1 + margin
        hi = torch.minimum(hi, torch.tensor(list(case_shape), device=pts.device))
        lo = torch.minimum(lo, hi - 1)
        return lo, hi

    def prefetch(self, keys: Sequence[str], coords: torch.Tensor, valid: torch.Tensor,
                 case_shapes: torch.Tensor) -> None:
        """Start ``read`` of these patches in the background thread (write-behind stores; others
        ignore it), after every update queued before it: the next ``read`` with the same tensors
        returns its result, so the file reads overlap what the main process does in between (the
        network's forward pass). Another ``read`` or a later ``prefetch`` drops it."""
        if not self.write_behind:
            return
        future = concurrent.futures.Future()
        args = (list(keys), coords, valid, case_shapes)
        self._prefetched = (args, future)
        self._background(self._read_now, args, future)

    def read(self, keys: Sequence[str], coords: torch.Tensor, valid: torch.Tensor,
             case_shapes: torch.Tensor) -> torch.Tensor:
        """Stored targets at the patch voxels: (B, C, *P) float32 on coords' device; NaN where
        there is no target yet (written interpolation weight below ``min_weight``) or the voxel is
        invalid. The result of a ``prefetch`` of the same tensors when there is one."""
        prefetched, self._prefetched = self._prefetched, None
        if prefetched is not None:
            (p_keys, p_coords, p_valid, p_shapes), future = prefetched
            if p_coords is coords and p_valid is valid and p_shapes is case_shapes and p_keys == list(keys):
                return future.result()
        self.wait()
        return self._read_now(keys, coords, valid, case_shapes)

    def _read_now(self, keys, coords, valid, case_shapes) -> torch.Tensor:
        b = coords.shape[0]
        out = torch.full((b, self.num_classes, *coords.shape[2:]), float("nan"), device=coords.device)
        for i in range(b):
            v = valid[i]
            if not v.any():
                continue
            arr = self._open(keys[i], case_shapes[i].tolist(), create=False)
            if arr is None:
                continue
            crop = AxisAlignedCrop.of(coords[i], v, arr.shape[1:]) if self.fast_crops else None
            if crop is not None:  # voxel to voxel: the stored values themselves (NaN where unwritten)
                with case_lock(self.case_file(keys[i]), exclusive=False):
                    block = torch.from_numpy(self._copy(arr, (slice(None),) + crop.case))
                block = block.to(out.device).float()  # the arithmetic where the network is (a GPU)
                block[:, ~torch.isfinite(block).all(0)] = float("nan")
                out[i][(slice(None),) + crop.patch] = crop.to_patch(block)
                continue
            pts = coords[i][:, v]  # (3, N)
            lo, hi = self._block(pts, arr.shape[1:], margin=1)
            with case_lock(self.case_file(keys[i]), exclusive=False):
                block = self._copy(arr, (slice(None), slice(lo[0], hi[0]), slice(lo[1], hi[1]),
                                         slice(lo[2], hi[2])))
            block = torch.from_numpy(block).to(coords.device).float()
            written = torch.isfinite(block).all(0, keepdim=True).float()
            field = torch.cat([torch.nan_to_num(block) * written, written])
            local = pts - lo.to(pts.dtype)[:, None]
            sampled = sample_case_field(field, local)  # (C + 1, N): weighted sums, written weight
            weight = sampled[-1]
            vals = sampled[:-1] / weight.clamp(min=1e-12)
            # outside the block (only possible beyond the case border) nothing is stored
            inside = ((local >= -1e-4) & (local <= (hi - lo - 1).to(local.dtype)[:, None] + 1e-4)).all(0)
            vals[:, ~inside | (weight < self.min_weight)] = float("nan")
            out[i][:, v] = vals
        return out

    def write(self, keys: Sequence[str], coords: torch.Tensor, valid: torch.Tensor, case_shapes: torch.Tensor,
              values: torch.Tensor) -> None:
        """Store patch values (B, C, *P) at the case voxels they cover (``update`` with alpha = 1)."""
        self.update(keys, coords, valid, case_shapes, values, alpha=1.0)

    def update(self, keys: Sequence[str], coords: torch.Tensor, valid: torch.Tensor, case_shapes: torch.Tensor,
               values: torch.Tensor, alpha: float) -> None:
        """z <- z + alpha (W^-1(values) - z) on the case voxels the valid patch voxels cover
        (z <- W^-1(values) where nothing was written yet); W^-1 takes the patch values (B, C, *P)
        to case space (see module doc). The stored history itself is never resampled.
        With ``write_behind`` it is queued (on copies of the tensors) and applied in the background."""
        if not self.write_behind:
            return self._update_now(keys, coords, valid, case_shapes, values, alpha)
        self._background(self._update_now, (list(keys), coords.detach().clone(), valid.detach().clone(),
                                            case_shapes.clone(), values.detach().to(torch.float32, copy=True),
                                            float(alpha)))

    def _update_now(self, keys, coords, valid, case_shapes, values, alpha) -> None:
        values = values.detach().float()
        alpha = float(alpha)
        for i in range(coords.shape[0]):
            v = valid[i]
            if not v.any():
                continue
            arr = self._open(keys[i], case_shapes[i].tolist(), create=True)
            crop = AxisAlignedCrop.of(coords[i], v, arr.shape[1:]) if self.fast_crops else None
            if crop is not None:  # voxel to voxel, every voxel of the block is covered
                self._blend(arr, keys[i], (slice(None),) + crop.case,
                            crop.to_case(values[i][(slice(None),) + crop.patch]), None, alpha)
                continue
            pts = coords[i][:, v]  # (3, N)
            lo, hi = self._block(pts, arr.shape[1:], margin=1)
            size = (hi - lo).tolist()
            local = pts - lo.to(pts.dtype)[:, None]
            rounded = local.round()
            if (local - rounded).abs().max() < 1e-3:
                # unwarped patch (crop + mirroring): one case voxel per patch voxel, exact
                idx = tuple(rounded.long())
                new = torch.zeros((self.num_classes, *size), dtype=torch.float32, device=values.device)
                new[(slice(None),) + idx] = values[i][:, v]
                where = torch.zeros(size, dtype=torch.bool, device=values.device)
                where[idx] = True
            else:
                res = self._inverse_warp(self._local_coords(coords[i], lo), values[i], valid[i], size)
                new, where = res if res is not None else self._splat(local, values[i][:, v], size)
            if where.any():
                self._blend(arr, keys[i], (slice(None), slice(lo[0], hi[0]), slice(lo[1], hi[1]), slice(lo[2], hi[2])),
                            new, where, alpha)

    def _blend(self, arr, key: str, sl: tuple, new: torch.Tensor, where: Optional[torch.Tensor], alpha: float):
        """z <- z + alpha (new - z) on the block ``sl`` of a case file (z <- new where nothing was
        written), on the voxels ``where`` (*block) or all of them (None). The arithmetic runs on new's
        device (a GPU); only the stored dtype crosses to the CPU. Read, blend and write back under the
        case's exclusive lock: one update."""
        with case_lock(self.case_file(key), exclusive=True):
            old = torch.from_numpy(self._copy(arr, sl)).to(new.device).float()
            seen = torch.isfinite(old).all(0)
            blend = torch.where(seen, (1 - alpha) * old + alpha * new, new)  # exact at alpha 0 and 1
            if where is not None:
                blend = torch.where(where, blend, old)
            self._put(arr, sl, blend.to(TORCH_DTYPES[self.dtype]).cpu().numpy())  # no flush (module doc, Storage)

    @staticmethod
    def _local_coords(coords: torch.Tensor, lo: torch.Tensor) -> torch.Tensor:
        shape = (3,) + (1,) * (coords.ndim - 1)
        return coords - lo.to(coords.dtype).reshape(shape)

    def _inverse_warp(self, local: torch.Tensor, values: torch.Tensor, valid: torch.Tensor, size):
        """Case-block voxels <- linear interpolation of the patch at their patch positions.

        local (3, *P) block coordinates of every patch voxel, values (C, *P), valid (*P). Returns
        (values (C, *size), written (*size) bool) on values' device, or None when the map is not affine.
        """
        dev = values.device
        patch = local.shape[1:]
        n = len(patch)
        grids = torch.meshgrid(*[torch.arange(s, dtype=torch.float64, device=dev) for s in patch], indexing="ij")
        p = torch.stack([g[valid] for g in grids])  # (n, N)
        y = local[:, valid].double()  # (3, N)
        x = torch.cat([p, torch.ones_like(p[:1])])  # (n + 1, N)
        coef = torch.linalg.lstsq(x.T, y.T).solution  # (n + 1, 3)
        if (x.T @ coef - y.T).abs().max() > 1e-2:
            return None  # not affine (elastic deformation): splat instead
        a, b = coef[:n].T, coef[n]  # case = a p + b, a (3, n)
        vox = torch.meshgrid(*[torch.arange(s, dtype=torch.float64, device=dev) for s in size], indexing="ij")
        vox = torch.stack(vox).reshape(3, -1)  # (3, M)
        if n == 3:
            pp = torch.linalg.solve(a, vox - b[:, None])  # (3, M)
            on_plane = torch.ones(vox.shape[1], dtype=torch.bool, device=dev)
        else:  # 2d patch: one case slice, z = b_z
            pp = torch.linalg.solve(a[1:], vox[1:] - b[1:, None])
            on_plane = (vox[0] - b[0]).abs() < 1e-3
        # patch values and validity at pp (align_corners=True: index i <-> -1 + 2 i / (P - 1))
        size_p = torch.tensor(patch, dtype=torch.float64, device=dev)[:, None]
        inside = ((pp >= 0) & (pp <= size_p - 1)).all(0) & on_plane
        norm = (2 * pp / (size_p - 1).clamp(min=1) - 1).T.flip(-1).float()  # (M, n) as (x, y[, z])
        grid = norm.reshape(1, *([1] * (n - 1)), -1, n)
        src = torch.cat([values.float(), valid[None].float()])[None]
        out = torch.nn.functional.grid_sample(src, grid, mode="bilinear", padding_mode="zeros",
                                              align_corners=True).reshape(values.shape[0] + 1, -1)
        written = inside & (out[-1] > 1 - 1e-4)
        return out[:-1].reshape(values.shape[0], *size), written.reshape(size)

    def _splat(self, local: torch.Tensor, vals: torch.Tensor, size):
        """Linear splatting of vals (C, N) at local block coordinates (3, N) into a block of ``size``.
        Returns (weighted means (C, *size), where the weights reach ``min_weight`` (*size) bool) on
        vals' device."""
        dev = vals.device
        base = torch.floor(local)
        frac = local - base
        base = base.long()
        size_t = torch.tensor(size, device=dev)[:, None]
        n_vox = size[0] * size[1] * size[2]
        acc = torch.zeros((vals.shape[0], n_vox), dtype=torch.float32, device=dev)
        wsum = torch.zeros(n_vox, dtype=torch.float32, device=dev)
        for corner in range(8):
            d = torch.tensor([(corner >> 2) & 1, (corner >> 1) & 1, corner & 1], device=dev)
            idx = base + d[:, None]
            w = torch.where(d[:, None].bool(), frac, 1 - frac).prod(0)
            ok = (w > 0) & (idx >= 0).all(0) & (idx < size_t).all(0)
            flat = ((idx[0] * size[1] + idx[1]) * size[2] + idx[2])[ok]
            acc.index_add_(1, flat, vals[:, ok] * w[ok])
            wsum.index_add_(0, flat, w[ok])
        new = (acc / wsum.clamp(min=1e-12)).reshape(vals.shape[0], *size)
        return new, (wsum >= self.min_weight).reshape(size)

    # ------------------------------------------------------------------ snapshots
    def snapshot(self, dest: str, epoch: Optional[int] = None) -> None:
        """Copy the store to the folder ``dest`` (replacing it), recording ``epoch`` there when given.
        Not atomic by itself: write to a temporary folder and rename (``nnunet_sud.robust_training``)."""
        self.wait()
        shutil.rmtree(dest, ignore_errors=True)
        shutil.copytree(self.folder, dest, ignore=shutil.ignore_patterns(".tmp_*", SNAPSHOT_EPOCH_FILE))
        if epoch is not None:
            with open(os.path.join(dest, SNAPSHOT_EPOCH_FILE), "w") as f:
                f.write(str(int(epoch)))

    @staticmethod
    def snapshot_epoch(folder: str) -> Optional[int]:
        """The epoch recorded by ``snapshot`` in ``folder`` (None: none recorded)."""
        path = os.path.join(folder, SNAPSHOT_EPOCH_FILE)
        if not os.path.isfile(path):
            return None
        with open(path) as f:
            return int(f.read().strip())

    def restore(self, src: str) -> None:
        """Make the store a copy of the snapshot ``src``."""
        self.wait()
        if not os.path.isdir(src):
            raise FileNotFoundError(src)
        shutil.rmtree(self.folder, ignore_errors=True)
        shutil.copytree(src, self.folder, ignore=shutil.ignore_patterns(SNAPSHOT_EPOCH_FILE))

    def clear(self) -> None:
        self.wait()
        shutil.rmtree(self.folder, ignore_errors=True)
        os.makedirs(self.folder, exist_ok=True)
