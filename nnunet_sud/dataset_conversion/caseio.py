"""Reading source cases: file endings, folder scans, geometry, label values, h5 arrays.

Image files are checked with SimpleITK's header reader (no pixel data), falling back to the
nnU-Net reader/writer for the file ending when SimpleITK cannot open a file. Label values are
read in full. h5 cases (UA-MT Left Atrium, SSL4MIS ACDC) are loaded into (z, y, x) arrays, the
array order of SimpleITK, and written as NIfTI.
"""
import os
import re
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from nnunet_sud.errors import UserFacingError

_CHANNEL_RE = re.compile(r"^(.+)_(\d{4})$")


def supported_file_endings() -> List[str]:
    """All file endings nnU-Net's reader/writers accept, longest first (".nii.gz" before ".gz")."""
    from nnunetv2.imageio.reader_writer_registry import LIST_OF_IO_CLASSES
    endings = {e.lower() for rw in LIST_OF_IO_CLASSES for e in rw.supported_file_endings}
    return sorted(endings, key=len, reverse=True)


def split_ending(filename: str, endings: Sequence[str]) -> Tuple[str, Optional[str]]:
    """(stem, ending) of a file name; ending None when nnU-Net cannot read that kind of file."""
    low = filename.lower()
    for e in endings:
        if low.endswith(e):
            return filename[: -len(e)], filename[len(filename) - len(e):]
    return filename, None


def list_image_files(folder: str, endings: Sequence[str], what: str) -> Dict[str, List[str]]:
    """{ending: [file names]} of the readable, non-hidden files of ``folder``."""
    if not os.path.isdir(folder):
        raise UserFacingError(f"{what} folder {folder} does not exist")
    out: Dict[str, List[str]] = {}
    for f in sorted(os.listdir(folder)):
        if f.startswith(".") or not os.path.isfile(os.path.join(folder, f)):
            continue
        _, e = split_ending(f, endings)
        if e is not None:
            out.setdefault(e, []).append(f)
    return out


def choose_file_ending(found: Dict[str, List[str]], requested: Optional[str], folder: str) -> str:
    """The one file ending of a folder (or ``requested``); mixed endings are an error."""
    if requested:
        req = requested if requested.startswith(".") else "." + requested
        if req not in found:
            raise UserFacingError(f"--file-ending {requested}: no such files in {folder} "
                                  f"(found: {', '.join(found) or 'none'})")
        return req
    if not found:
        raise UserFacingError(f"no image files in {folder}: expected files nnU-Net can read "
                              f"(.nii.gz, .nii, .nrrd, .mha, .png, .tif, ...)")
    if len(found) > 1:
        counts = ", ".join(f"{e}: {len(v)}" for e, v in found.items())
        raise UserFacingError(f"{folder} mixes file endings ({counts}); nnU-Net needs one ending per dataset. "
                              f"Convert the files to one format or pass --file-ending to use only one kind.")
    return next(iter(found))


def group_channels(files: Sequence[str], ending: str, channel_suffix: str,
                   label_ids: Sequence[str], folder: str) -> Dict[str, List[str]]:
    """{case id: [channel-0 file, channel-1 file, ...]} for the image files of a folder.

    ``channel_suffix``: "yes" (nnU-Net naming CASE_0000<ending>), "no" (one file per case, CASE<ending>)
    or "auto": channel naming if every file carries a ``_XXXX`` suffix and the stripped names (not
    the full ones) match the label files.
    """
    stems = [f[: -len(ending)] for f in files]
    _check_suffixed_twins(files, stems, ending, folder)
    if channel_suffix == "auto":
        all_suffixed = bool(stems) and all(_CHANNEL_RE.match(s) for s in stems)
        labels = set(label_ids)
        stripped = {_CHANNEL_RE.match(s).group(1) for s in stems} if all_suffixed else set()
        channel_suffix = "yes" if all_suffixed and (stripped & labels or not set(stems) & labels) else "no"
    cases: Dict[str, Dict[int, str]] = {}
    for f, s in zip(files, stems):
        if channel_suffix == "yes":
            m = _CHANNEL_RE.match(s)
            if m is None:
                raise UserFacingError(f"{os.path.join(folder, f)}: name lacks nnU-Net's channel suffix "
                                      f"(CASE_0000{ending}); rename it or pass --channel-suffix no")
            cases.setdefault(m.group(1), {})[int(m.group(2))] = os.path.join(folder, f)
        else:
            cases.setdefault(s, {})[0] = os.path.join(folder, f)
    out = {}
    n_ch = None
    for cid in sorted(cases):
        ch = cases[cid]
        if sorted(ch) != list(range(len(ch))):
            raise UserFacingError(f"case '{cid}' in {folder} has channels {sorted(ch)}; channels must be numbered "
                                  f"0000, 0001, ... without gaps ({cid}_0000{ending}, ...)")
        if n_ch is None:
            n_ch, first = len(ch), cid
        elif len(ch) != n_ch:
            raise UserFacingError(f"case '{cid}' in {folder} has {len(ch)} channel(s) but case '{first}' has {n_ch}; "
                                  f"every case needs the same channels")
        out[cid] = [ch[i] for i in range(len(ch))]
    return out


def _check_suffixed_twins(files: Sequence[str], stems: Sequence[str], ending: str, folder: str) -> None:
    """``CASE<ending>`` beside ``CASE_0000<ending>`` would become two cases ('CASE' and 'CASE_0000'):
    the same image twice, and with a label for CASE the labeled image would also be unlabeled."""
    by_stem = dict(zip(stems, files))
    twins = [(by_stem[m.group(1)], f) for f, s in zip(files, stems)
             for m in [_CHANNEL_RE.match(s)] if m is not None and m.group(1) in by_stem]
    if twins:
        listed = "; ".join(f"{os.path.join(folder, a)} and {b}" for a, b in twins[:5])
        raise UserFacingError(
            f"{len(twins)} image(s) exist with and without nnU-Net's channel suffix: {listed}"
            f"{' ...' if len(twins) > 5 else ''}. They would become two cases each (e.g. '{twins[0][0][:-len(ending)]}' "
            f"and '{twins[0][1][:-len(ending)]}'), and the image of a labeled case would also land in "
            f"imagesUnlabeled. Keep one name per image (remove the copy), or rename one if they are different "
            f"cases.")


@dataclass
class Geometry:
    """Grid of an image file: size in SimpleITK order (x, y, z), spacing, origin, direction."""
    size: Tuple[int, ...]
    spacing: Tuple[float, ...]
    origin: Optional[Tuple[float, ...]] = None
    direction: Optional[Tuple[float, ...]] = None
    components: int = 1

    def describe(self) -> str:
        s = f"size {self.size}, spacing {tuple(round(x, 5) for x in self.spacing)}"
        if self.origin is not None:
            s += f", origin {tuple(round(x, 4) for x in self.origin)}"
        return s


def read_geometry(path: str) -> Geometry:
    """Header geometry of an image file (no pixel data read where SimpleITK can read the header)."""
    import SimpleITK as sitk
    if not os.path.isfile(path):
        raise UserFacingError(f"file {path} does not exist")
    try:
        r = sitk.ImageFileReader()
        r.SetFileName(path)
        r.ReadImageInformation()
        return Geometry(tuple(r.GetSize()), tuple(r.GetSpacing()), tuple(r.GetOrigin()), tuple(r.GetDirection()),
                        r.GetNumberOfComponents())
    except RuntimeError:
        pass
    from nnunetv2.imageio.reader_writer_registry import determine_reader_writer_from_file_ending
    _, ending = split_ending(os.path.basename(path), supported_file_endings())
    try:
        rw = determine_reader_writer_from_file_ending(ending or "", path, allow_nonmatching_filename=True,
                                                      verbose=False)()
        arr, props = rw.read_images([path])
    except Exception as e:
        raise UserFacingError(f"cannot read {path} ({type(e).__name__}: {e}); is it a valid image file?") from None
    return Geometry(tuple(arr.shape[1:][::-1]), tuple(props["spacing"][::-1]))


def check_same_geometry(ref: Geometry, other: Geometry, ref_name: str, other_name: str, tol: float) -> None:
    """Raise naming both files when shape, spacing, origin or direction differ (beyond ``tol``)."""
    problems = []
    if tuple(ref.size) != tuple(other.size):
        problems.append(f"shape {ref.size} vs {other.size}")
    elif not np.allclose(ref.spacing, other.spacing, rtol=0, atol=tol):
        problems.append(f"spacing {ref.spacing} vs {other.spacing}")
    if not problems and ref.origin is not None and other.origin is not None:
        if not np.allclose(ref.origin, other.origin, rtol=0, atol=tol):
            problems.append(f"origin {ref.origin} vs {other.origin}")
        elif not np.allclose(ref.direction, other.direction, rtol=0, atol=tol):
            problems.append(f"direction {ref.direction} vs {other.direction}")
    if problems:
        raise UserFacingError(
            f"geometry mismatch between {ref_name} and {other_name}: {'; '.join(problems)}. Image channels and "
            f"label of a case must share one voxel grid: resample the label (or image) onto the other's grid, or "
            f"fix the header (--geometry-tolerance allows small differences).")


def read_label_array(path: str) -> np.ndarray:
    """Pixel data of a label file."""
    import SimpleITK as sitk
    try:
        img = sitk.ReadImage(path)
    except RuntimeError:
        img = None
    if img is not None:
        if img.GetNumberOfComponentsPerPixel() != 1:
            raise UserFacingError(f"label {path} has {img.GetNumberOfComponentsPerPixel()} components per voxel; "
                                  f"labels must be single-channel integer maps")
        return sitk.GetArrayFromImage(img)
    from nnunetv2.imageio.reader_writer_registry import determine_reader_writer_from_file_ending
    _, ending = split_ending(os.path.basename(path), supported_file_endings())
    try:
        rw = determine_reader_writer_from_file_ending(ending or "", path, allow_nonmatching_filename=True,
                                                      verbose=False)()
        return rw.read_seg(path)[0][0]
    except Exception as e:
        raise UserFacingError(f"cannot read label {path} ({type(e).__name__}: {e})") from None


def label_values(arr: np.ndarray, name: str) -> List[int]:
    """Sorted distinct values of a label map; non-integer or negative values are an error."""
    if np.issubdtype(arr.dtype, np.integer) or arr.dtype == bool:
        a = arr.astype(np.int64, copy=False) if arr.dtype == bool else arr
        mn, mx = int(a.min()), int(a.max())
        if mn >= 0 and mx < 65536:
            counts = np.bincount(a.ravel().astype(np.intp, copy=False), minlength=mx + 1)
            vals = np.nonzero(counts)[0].tolist()
        else:
            vals = np.unique(a).tolist()
    else:
        u = np.unique(arr)
        if np.any(np.isnan(u)) or not np.all(np.equal(np.round(u), u)):
            bad = [float(v) for v in u if np.isnan(v) or v != np.round(v)][:5]
            raise UserFacingError(f"label {name} contains non-integer values (e.g. {bad}); labels must be integer "
                                  f"class maps (is this an image in the label folder?)")
        vals = [int(v) for v in u]
    vals = [int(v) for v in vals]
    if vals and vals[0] < 0:
        raise UserFacingError(f"label {name} contains negative values {[v for v in vals if v < 0][:5]}; labels must "
                              f"be 0 (background), 1, 2, ...")
    return vals


def check_label_values(vals: Sequence[int], allowed: Optional[Sequence[int]], name: str, hint: str = "") -> None:
    """Error when a label uses values outside ``allowed`` (None: anything non-negative is fine)."""
    if allowed is None:
        return
    bad = sorted(set(vals) - set(allowed))
    if bad:
        raise UserFacingError(f"label {name} contains unexpected values {bad} (allowed: {sorted(allowed)}). "
                              f"{hint or 'Fix the label or declare the classes (--label-names).'}")


# ---------------------------------------------------------------------------------------------- h5
@dataclass
class H5Case:
    """Where the arrays of an h5 case are: one 3D file, or 2D slice files stacked along z."""
    files: List[str]
    axes: str = "zyx"                   # array axis order in the file ("xyz" for UA-MT's Left Atrium)
    spacing: Tuple[float, float, float] = (1.0, 1.0, 1.0)  # x, y, z in mm (used when the file stores none)
    stacked: bool = False               # files are 2D slices to stack (z = slice index)
    has_label: bool = True
    extra: dict = field(default_factory=dict)


def _stored_spacing(f, axes: str) -> Optional[Tuple[float, float, float]]:
    """Spacing stored in an h5 file (attribute ``spacing`` of the file or of ``image``, or a dataset)."""
    for holder in (f.attrs, f["image"].attrs):
        if "spacing" in holder:
            sp = np.asarray(holder["spacing"], dtype=float).ravel()
            break
    else:
        if "spacing" in f and hasattr(f["spacing"], "shape"):
            sp = np.asarray(f["spacing"][()], dtype=float).ravel()
        else:
            return None
    if sp.size != 3 or np.any(sp <= 0):
        return None
    return tuple(sp.tolist()) if axes == "xyz" else tuple(sp[::-1].tolist())


def load_h5_case(case: H5Case, case_id: str, with_label: bool):
    """(image zyx float32, label zyx uint8 or None, spacing xyz) of an h5 case."""
    import h5py
    images, labels, spacing = [], [], None
    for path in case.files:
        try:
            with h5py.File(path, "r") as f:
                if "image" not in f:
                    raise UserFacingError(f"{path} has no dataset 'image' (datasets: {', '.join(f.keys())})")
                images.append(np.asarray(f["image"][()]))
                if with_label:
                    if "label" not in f:
                        raise UserFacingError(f"{path} has no dataset 'label' (case '{case_id}')")
                    labels.append(np.asarray(f["label"][()]))
                if spacing is None and not case.stacked:
                    spacing = _stored_spacing(f, case.axes)
        except OSError as e:
            raise UserFacingError(f"cannot open {path} as h5 ({e})") from None
    spacing = spacing or tuple(case.spacing)
    want = 2 if case.stacked else 3
    for arr, what in [(a, "image") for a in images] + [(a, "label") for a in labels]:
        if arr.ndim != want:
            raise UserFacingError(f"case '{case_id}': {what} in {case.files[0]} has {arr.ndim} dimensions, expected "
                                  f"{want} ({'2D slices' if case.stacked else 'a 3D volume'})")
    if case.stacked:
        shapes = {a.shape for a in images + labels}
        if len(shapes) != 1:
            raise UserFacingError(f"case '{case_id}': its slice files have different shapes {sorted(shapes)}; "
                                  f"they cannot be stacked ({os.path.dirname(case.files[0])})")
        image = np.stack(images, 0)
        label = np.stack(labels, 0) if with_label else None
    else:
        image, label = images[0], (labels[0] if with_label else None)
    if case.axes == "xyz":
        image = image.transpose(2, 1, 0)
        label = label.transpose(2, 1, 0) if label is not None else None
    if label is not None and label.shape != image.shape:
        raise UserFacingError(f"case '{case_id}': image shape {image.shape} and label shape {label.shape} differ "
                              f"in {case.files[0]}")
    return np.ascontiguousarray(image, dtype=np.float32), \
        (None if label is None else np.ascontiguousarray(label)), spacing


def write_array(arr_zyx: np.ndarray, spacing_xyz: Sequence[float], path: str) -> None:
    """Write a (z, y, x) array as an image with the given spacing (identity direction, zero origin)."""
    import SimpleITK as sitk
    img = sitk.GetImageFromArray(arr_zyx)
    img.SetSpacing(tuple(float(s) for s in spacing_xyz))
    sitk.WriteImage(img, path, useCompression=True)
