"""Real CT scans for the demo: fetched from a pinned PyPI source archive, cached, and converted
into an nnU-Net v2 raw dataset.

The source archive of ``totalsegmentator==2.18.0`` (Apache-2.0) ships two CT patients with
TotalSegmentator's 117-class 'total' label maps under ``tests/reference_files/``:

- the training patient: ``example_ct.nii.gz`` with ``example_seg_fast_force_split.nii.gz``;
- the held-out patient: the DICOM series ``example_ct_dicom/`` with ``example_seg_dicom.nii.gz``,
  whose header stores the same physical grid as the series with the y axis flipped, so its labels
  are resampled onto the image by physical coordinates, never copied index for index.

The engine does not reorient images: it trains on the stored voxel order. The training scan is
stored with direction diag(-1, -1, 1), the DICOM series with the identity, so their arrays are
rotated by 180 degrees in-plane against each other. Every image is therefore written in one
orientation, the DICOM series' (:data:`ORIENTATION`, identity direction), by a lossless flip of axes
(:func:`reorient`); the physical grid and every voxel value are unchanged.

SimpleITK and numpy are imported inside the functions so that importing this module (and the
``mednext`` command's ``--help``) stays fast.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from mednext import config
from mednext.errors import ExampleScansUnavailable

if TYPE_CHECKING:
    import numpy as np
    import SimpleITK as sitk

EXAMPLE_PACKAGE = "totalsegmentator"
EXAMPLE_VERSION = "2.18.0"
# sha256 of totalsegmentator-2.18.0.tar.gz as served by PyPI (38,049,988 bytes).
EXAMPLE_ARCHIVE_SHA256 = "5d4223ef93973bc36d710869d11e7742ead2c154c72f7f9edcaaadd5b6c4bd03"
EXAMPLE_DIRNAME = f"{EXAMPLE_PACKAGE}-{EXAMPLE_VERSION}"
# The only parts of the archive that are unpacked (paths below its top folder).
EXAMPLE_MEMBERS = ("tests/reference_files/", "totalsegmentator/map_to_binary.py")

REFERENCE_DIR = "tests/reference_files"
CLASS_TABLE_FILE = "totalsegmentator/map_to_binary.py"
CACHE_ENV = "MEDNEXT_CACHE"

DEMO_DATASET_ID = 990
DEMO_DATASET_NAME = "MedNeXtDemo"
TRAIN_CASE = "demo_train"
HELDOUT_CASE = "demo_heldout"
ORIENTATION = "LPS"  # SimpleITK's DICOMOrient code for the identity direction (the DICOM series' own)

# Grouped label set: abdominal organs of TotalSegmentator's 'total' task. Liver, spleen, stomach and
# aorta are labelled in both patients; the held-out slab (upper abdomen, 20 slices) shows no kidney,
# which is still a class so that the training patient's kidneys are not taught as background.
# Kidney cysts belong to the kidney (neither patient has one labelled).
DEFAULT_LABEL_GROUPS: dict[str, tuple[str, ...]] = {
    "liver": ("liver",),
    "spleen": ("spleen",),
    "stomach": ("stomach",),
    "aorta": ("aorta",),
    "kidney": ("kidney_left", "kidney_right", "kidney_cyst_left", "kidney_cyst_right"),
}


@dataclass(frozen=True)
class ExampleFiles:
    """Paths inside an unpacked example folder (what :func:`fetch_example_scans` returns)."""

    root: Path

    @property
    def reference_dir(self) -> Path:
        return self.root / REFERENCE_DIR

    @property
    def train_image(self) -> Path:
        return self.reference_dir / "example_ct.nii.gz"

    @property
    def train_label(self) -> Path:
        return self.reference_dir / "example_seg_fast_force_split.nii.gz"

    @property
    def heldout_dicom_dir(self) -> Path:
        return self.reference_dir / "example_ct_dicom"

    @property
    def heldout_label(self) -> Path:
        return self.reference_dir / "example_seg_dicom.nii.gz"

    @property
    def class_table(self) -> Path:
        return self.root / CLASS_TABLE_FILE

    def missing(self) -> list[Path]:
        """Required files that are absent (empty when the folder is complete)."""
        paths = [self.train_image, self.train_label, self.heldout_label, self.class_table]
        missing = [p for p in paths if not p.is_file()]
        dicom = self.heldout_dicom_dir
        if not dicom.is_dir() or not any(p.is_file() for p in dicom.iterdir()):
            missing.append(dicom)
        return missing


@dataclass
class DemoDataset:
    """What :func:`prepare_demo_dataset` built."""

    dataset_dir: Path
    dataset_name: str
    dataset_id: int
    labels: dict[str, int]
    train_case: str
    heldout_case: str
    heldout_dicom_dir: Path  # the held-out patient's DICOM series, the demo's prediction input
    heldout_image: Path  # the same series converted to NIfTI (imagesTs/)
    heldout_label: Path  # reference label on the series' exact grid (labelsTs/)
    source_dir: Path
    voxel_counts: dict[str, dict[str, int]] = field(default_factory=dict)  # case -> class -> voxels

    def to_dict(self) -> dict[str, Any]:
        out = {k: (str(v) if isinstance(v, Path) else v) for k, v in self.__dict__.items()}
        return json.loads(json.dumps(out))


# ---------------------------------------------------------------------------------------------
# Fetching


def default_cache_dir() -> Path:
    """Where the example scans are cached: :attr:`mednext.config.Settings.cache_dir`
    (``$MEDNEXT_CACHE`` if set, else ``$XDG_CACHE_HOME/mednext``, i.e. ``~/.cache/mednext``)."""
    return config.get().cache_dir


def fetch_example_scans(
    cache_dir: str | os.PathLike | None = None,
    *,
    archive: str | os.PathLike | None = None,
    quiet: bool = False,
) -> Path:
    """Return the folder holding the unpacked example scans, downloading them on first use.

    The folder is ``<cache_dir>/totalsegmentator-2.18.0`` (``cache_dir`` defaults to
    :func:`default_cache_dir`) and keeps the archive's layout: ``tests/reference_files/`` and
    ``totalsegmentator/map_to_binary.py``; :class:`ExampleFiles` names the files in it. A cached
    folder is used without any network access. Otherwise the source archive is fetched with
    ``python -m pip download --no-deps --no-binary :all: totalsegmentator==2.18.0`` (so pip's own
    index, proxy and certificate settings apply), or taken from ``archive`` when given, checked
    against its pinned sha256, and unpacked into a temporary folder that is renamed into place.

    Raises :class:`ExampleScansUnavailable` when nothing is cached and the download fails.
    """
    cache_root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    target = cache_root / EXAMPLE_DIRNAME
    if target.is_dir():
        if not ExampleFiles(target).missing():
            return target
        _say(quiet, f"Cached example scans in {target} are incomplete; fetching them again.")
    try:
        cache_root.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ExampleScansUnavailable(
            f"cannot create the cache folder {cache_root} ({err}); choose another one with "
            f"cache_dir=... or the {CACHE_ENV} environment variable"
        ) from err

    work = Path(tempfile.mkdtemp(prefix=".tmp-fetch-", dir=cache_root))
    try:
        if archive is None:
            _say(
                quiet,
                f"Downloading the example CT scans ({EXAMPLE_PACKAGE}=={EXAMPLE_VERSION} source, 38 MB)...",
            )
            archive_path = _pip_download(work / "download", target, quiet)
        else:
            archive_path = Path(archive)
            if not archive_path.is_file():
                raise ExampleScansUnavailable(f"archive {archive_path} does not exist")
        _check_sha256(archive_path)
        _say(quiet, f"Unpacking the example scans into {target}")
        unpacked = _unpack(archive_path, work / "unpacked")
        problems = ExampleFiles(unpacked).missing()
        if problems:
            raise ExampleScansUnavailable(
                f"{archive_path} lacks {', '.join(str(p.relative_to(unpacked)) for p in problems)}"
            )
        _move_into_place(unpacked, target, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target


def _say(quiet: bool, message: str) -> None:
    if not quiet:
        print(message, file=sys.stderr, flush=True)


def _pip_download(dest: Path, target: Path, quiet: bool) -> Path:
    hint = (
        f"Nothing is cached at {target}. Connect to the package registry (pip's index settings apply: "
        f"PIP_INDEX_URL, pip.conf, proxies), or run `pip download --no-deps --no-binary :all: "
        f"{EXAMPLE_PACKAGE}=={EXAMPLE_VERSION}` on a machine that can and pass the .tar.gz as "
        f"fetch_example_scans(archive=...)."
    )
    if importlib.util.find_spec("pip") is None:
        raise ExampleScansUnavailable(f"pip is not installed in {sys.executable}. {hint}")
    dest.mkdir(parents=True)
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--no-binary",
        ":all:",
        "--disable-pip-version-check",
        "--dest",
        str(dest),
        f"{EXAMPLE_PACKAGE}=={EXAMPLE_VERSION}",
    ]
    # Shown: pip's messages and progress bar go to our stderr (stdout may be a result being piped).
    shown = None if quiet else _stderr_fd()
    if shown is None:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, check=False)
        output = proc.stdout or ""
    else:
        proc = subprocess.run(cmd, stdout=shown, stderr=shown, check=False)
        output = ""
    if proc.returncode != 0:
        tail = "\n".join(output.strip().splitlines()[-8:]) if output else "(see pip's output above)"
        raise ExampleScansUnavailable(
            f"could not download {EXAMPLE_PACKAGE}=={EXAMPLE_VERSION} with pip "
            f"(exit code {proc.returncode}).\npip said:\n{tail}\n{hint}"
        )
    found = sorted(dest.glob("*.tar.gz"))
    if len(found) != 1:
        raise ExampleScansUnavailable(
            f"pip download left {[p.name for p in dest.iterdir()]} in {dest}, expected one .tar.gz"
        )
    return found[0]


def _stderr_fd() -> int | None:
    try:
        return sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # e.g. a notebook's stream without a file descriptor
        return None


def _check_sha256(archive: Path) -> None:
    digest = hashlib.sha256()
    with open(archive, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    if digest.hexdigest() != EXAMPLE_ARCHIVE_SHA256:
        raise ExampleScansUnavailable(
            f"{archive} has sha256 {digest.hexdigest()}, expected {EXAMPLE_ARCHIVE_SHA256} "
            f"({EXAMPLE_PACKAGE}-{EXAMPLE_VERSION}.tar.gz as published on PyPI): it is not the pinned release"
        )


def _unpack(archive: Path, dest: Path) -> Path:
    """Extract only :data:`EXAMPLE_MEMBERS` (regular files and folders) and return the top folder."""
    selected = []
    try:
        with tarfile.open(archive, "r:gz") as tar:
            for member in tar.getmembers():
                path = PurePosixPath(member.name)
                if path.is_absolute() or ".." in path.parts:
                    raise ExampleScansUnavailable(f"{archive}: unsafe member path {member.name!r}")
                if len(path.parts) < 2 or path.parts[0] != EXAMPLE_DIRNAME:
                    continue
                inner = "/".join(path.parts[1:])
                wanted = any(
                    inner == m.rstrip("/") or (m.endswith("/") and inner.startswith(m)) for m in EXAMPLE_MEMBERS
                )
                if not wanted:
                    continue
                if not (member.isfile() or member.isdir()):
                    raise ExampleScansUnavailable(f"{archive}: {member.name} is not a regular file or folder")
                selected.append(member)
            kwargs = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
            tar.extractall(dest, members=selected, **kwargs)
    except (tarfile.TarError, OSError, EOFError) as err:
        raise ExampleScansUnavailable(f"cannot unpack {archive}: {err}") from err
    return dest / EXAMPLE_DIRNAME


def _move_into_place(unpacked: Path, target: Path, work: Path) -> None:
    """Rename ``unpacked`` to ``target``, replacing an incomplete ``target``; if another process
    put a complete folder there meanwhile, keep that one."""
    if target.exists():
        if not ExampleFiles(target).missing():
            return
        os.rename(target, work / "stale")
    try:
        os.rename(unpacked, target)
    except OSError:
        if target.is_dir() and not ExampleFiles(target).missing():
            return  # a concurrent fetch won the race
        raise


# ---------------------------------------------------------------------------------------------
# Label tables and grouping


def load_class_table(path: str | os.PathLike, task: str = "total") -> dict[int, str]:
    """Read ``class_map[task]`` from TotalSegmentator's ``map_to_binary.py`` without executing it
    (the file is parsed with :mod:`ast` and only literal values are evaluated)."""
    path = Path(path)
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    for node in tree.body:
        if isinstance(node, ast.Assign):
            targets, value = node.targets, node.value
        elif isinstance(node, ast.AnnAssign) and node.value is not None:
            targets, value = [node.target], node.value
        else:
            continue
        if not any(isinstance(t, ast.Name) and t.id == "class_map" for t in targets):
            continue
        if not isinstance(value, ast.Dict):
            break
        for key, entry in zip(value.keys, value.values, strict=True):
            if isinstance(key, ast.Constant) and key.value == task:
                table = ast.literal_eval(entry)
                if not isinstance(table, dict) or not all(
                    isinstance(k, int) and isinstance(v, str) for k, v in table.items()
                ):
                    raise ValueError(f"{path}: class_map[{task!r}] is not a mapping of int to str")
                return dict(sorted(table.items()))
        raise ValueError(f"{path}: class_map has no task {task!r}")
    raise ValueError(f"{path}: no literal `class_map = {{...}}` assignment found")


def resolve_label_groups(
    class_table: Mapping[int, str], groups: Mapping[str, Sequence[str]] | None = None
) -> dict[str, tuple[int, ...]]:
    """Map each group name to the source class ids it merges (groups become labels 1, 2, ... in order)."""
    groups = DEFAULT_LABEL_GROUPS if groups is None else groups
    by_name = {name: idx for idx, name in class_table.items()}
    resolved: dict[str, tuple[int, ...]] = {}
    used: dict[int, str] = {}
    for group, members in groups.items():
        if group == "background":
            raise ValueError("label group name 'background' is reserved for label 0")
        ids = []
        for name in members:
            if name not in by_name:
                raise ValueError(f"label group {group!r}: unknown class {name!r} (not in the class table)")
            idx = by_name[name]
            if idx in used:
                raise ValueError(f"class {name!r} is in both groups {used[idx]!r} and {group!r}")
            used[idx] = group
            ids.append(idx)
        if not ids:
            raise ValueError(f"label group {group!r} has no classes")
        resolved[group] = tuple(ids)
    if len(resolved) > 255:
        raise ValueError("at most 255 label groups fit the uint8 label maps")
    return resolved


def group_label_array(array: np.ndarray, groups: Mapping[str, Sequence[int]]) -> np.ndarray:
    """Relabel a source label array: classes of the i-th group become i (1-based), the rest 0."""
    import numpy as np

    if not np.issubdtype(array.dtype, np.integer) or (array.size and array.min() < 0):
        raise ValueError("label arrays must hold non-negative integers")
    top = int(array.max()) if array.size else 0
    lut = np.zeros(max([top, *(max(ids) for ids in groups.values())]) + 1, dtype=np.uint8)
    for value, ids in enumerate(groups.values(), start=1):
        lut[list(ids)] = value
    return lut[array]


# ---------------------------------------------------------------------------------------------
# Geometry


def read_dicom_series(folder: str | os.PathLike) -> sitk.Image:
    """Read the one DICOM series in ``folder`` (slices sorted by position, rescaled to HU)."""
    import SimpleITK as sitk

    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"DICOM folder {folder} does not exist")
    reader = sitk.ImageSeriesReader()
    series = reader.GetGDCMSeriesIDs(str(folder))
    if not series:
        raise FileNotFoundError(f"{folder}: no DICOM series found; point to the folder holding the slice files")
    if len(series) > 1:
        raise ValueError(f"{folder} holds {len(series)} DICOM series ({', '.join(series)}); keep one per folder")
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder), series[0]))
    return reader.Execute()


def _physical_bounds(img: sitk.Image) -> tuple[np.ndarray, np.ndarray]:
    import itertools

    import numpy as np

    # Outer faces of the corner voxels, as continuous indices.
    ends = [(-0.5, s - 0.5) for s in img.GetSize()]
    corners = [img.TransformContinuousIndexToPhysicalPoint(c) for c in itertools.product(*ends)]
    pts = np.array(corners)
    return pts.min(axis=0), pts.max(axis=0)


def resample_label_to_image(label: sitk.Image, image: sitk.Image) -> sitk.Image:
    """Put ``label`` on ``image``'s grid by physical coordinates (nearest neighbour, 0 outside).

    The result has the image's size, spacing, origin and direction and the label's pixel type. A label whose header lists the
    same voxels in another axis order or orientation (a flipped axis, say) comes out with every voxel
    in its physical place, which copying the array index for index would not do.
    """
    import numpy as np
    import SimpleITK as sitk

    if label.GetDimension() != image.GetDimension():
        raise ValueError(f"label is {label.GetDimension()}D but the image is {image.GetDimension()}D")
    lo_l, hi_l = _physical_bounds(label)
    lo_i, hi_i = _physical_bounds(image)
    if np.any(np.minimum(hi_l, hi_i) <= np.maximum(lo_l, lo_i)):
        raise ValueError(
            f"label (physical extent {lo_l.round(1)}..{hi_l.round(1)} mm) does not overlap the image "
            f"({lo_i.round(1)}..{hi_i.round(1)} mm); check that both belong to the same scan"
        )
    return sitk.Resample(label, image, sitk.Transform(), sitk.sitkNearestNeighbor, 0, label.GetPixelID())


def same_geometry(a: sitk.Image, b: sitk.Image, tol: float = 1e-4) -> bool:
    """True when both images have the same size and (within ``tol``) spacing, origin and direction."""
    import numpy as np

    return (
        a.GetSize() == b.GetSize()
        and np.allclose(a.GetSpacing(), b.GetSpacing(), atol=tol)
        and np.allclose(a.GetOrigin(), b.GetOrigin(), atol=tol)
        and np.allclose(a.GetDirection(), b.GetDirection(), atol=tol)
    )


def reorient(image: sitk.Image, orientation: str = ORIENTATION) -> sitk.Image:
    """``image`` with its axes permuted/flipped to ``orientation`` (default: identity direction).

    A lossless permutation of voxels: the physical position and value of every voxel are kept."""
    import SimpleITK as sitk

    return sitk.DICOMOrient(image, orientation)


def convert_label(label: sitk.Image, image: sitk.Image, groups: Mapping[str, Sequence[int]]) -> sitk.Image:
    """Group a TotalSegmentator label map and place it on ``image``'s grid by physical coordinates."""
    import SimpleITK as sitk

    grouped = sitk.GetImageFromArray(group_label_array(sitk.GetArrayFromImage(label), groups))
    grouped.CopyInformation(label)
    return resample_label_to_image(grouped, image)


# ---------------------------------------------------------------------------------------------
# The nnU-Net v2 raw dataset


def prepare_demo_dataset(
    raw_root: str | os.PathLike,
    dataset_id: int = DEMO_DATASET_ID,
    cache_dir: str | os.PathLike | None = None,
    *,
    label_groups: Mapping[str, Sequence[str]] | None = None,
    dataset_name: str = DEMO_DATASET_NAME,
    quiet: bool = False,
) -> DemoDataset:
    """Build ``<raw_root>/Dataset<id>_<name>`` from the example scans (fetched or cached).

    - ``imagesTr/demo_train_0000.nii.gz`` + ``labelsTr/demo_train.nii.gz``: the training patient;
    - ``imagesTs/demo_heldout_0000.nii.gz`` + ``labelsTs/demo_heldout.nii.gz``: the held-out patient's
      DICOM series converted to NIfTI and its reference label on that exact grid; the DICOM folder
      itself (in the cache) is the demo's prediction input, ``DemoDataset.heldout_dicom_dir``;
    - ``dataset.json`` with one CT channel and the grouped labels (default :data:`DEFAULT_LABEL_GROUPS`).

    Images are written in the DICOM series' orientation (:func:`reorient`: the training scan's x and y
    axes are flipped, the series is already in it, so the prediction input needs no reorientation);
    labels are grouped, then resampled onto their image by physical coordinates. The dataset is built
    in a temporary folder and renamed into place, replacing an earlier build of the same name.
    """
    import SimpleITK as sitk

    if not isinstance(dataset_id, int) or not 1 <= dataset_id <= 999:
        raise ValueError(f"dataset_id must be an integer from 1 to 999, got {dataset_id!r}")
    if not dataset_name or not dataset_name.replace("_", "").replace("-", "").isalnum():
        raise ValueError(f"dataset_name must be letters, digits, '-' or '_', got {dataset_name!r}")
    raw_root = Path(raw_root)
    full_name = f"Dataset{dataset_id:03d}_{dataset_name}"
    if raw_root.is_dir():
        clashes = [p.name for p in raw_root.glob(f"Dataset{dataset_id:03d}_*") if p.is_dir() and p.name != full_name]
        if clashes:
            raise ValueError(
                f"{raw_root} already holds {clashes[0]} with dataset id {dataset_id}; pick another dataset_id "
                f"or remove that folder (nnU-Net needs ids to be unique)"
            )

    root = fetch_example_scans(cache_dir, quiet=quiet)
    files = ExampleFiles(root)
    groups = resolve_label_groups(load_class_table(files.class_table), label_groups)
    labels = {"background": 0, **{name: i for i, name in enumerate(groups, start=1)}}

    _say(quiet, f"Converting the example scans into {raw_root / full_name}")
    train_image = reorient(sitk.ReadImage(str(files.train_image)))
    train_label = convert_label(sitk.ReadImage(str(files.train_label)), train_image, groups)
    heldout_image = reorient(read_dicom_series(files.heldout_dicom_dir))
    heldout_label = convert_label(sitk.ReadImage(str(files.heldout_label)), heldout_image, groups)

    counts = {
        TRAIN_CASE: _voxel_counts(train_label, labels),
        HELDOUT_CASE: _voxel_counts(heldout_label, labels),
    }
    dataset_json = {
        "name": full_name,
        "description": (
            "Two CT patients from the source archive of totalsegmentator==2.18.0 (tests/reference_files): "
            "example_ct.nii.gz for training, the DICOM series example_ct_dicom/ held out (imagesTs/labelsTs)."
        ),
        "reference": "https://github.com/wasserth/TotalSegmentator",
        "licence": "Apache-2.0",
        "channel_names": {"0": "CT"},
        "labels": labels,
        "numTraining": 1,
        "file_ending": ".nii.gz",
        "label_sources": {name: list(ids) for name, ids in groups.items()},
    }

    raw_root.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".tmp-{full_name}-", dir=raw_root))
    try:
        build = work / full_name
        for sub in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
            (build / sub).mkdir(parents=True)
        sitk.WriteImage(train_image, str(build / "imagesTr" / f"{TRAIN_CASE}_0000.nii.gz"), useCompression=True)
        sitk.WriteImage(train_label, str(build / "labelsTr" / f"{TRAIN_CASE}.nii.gz"), useCompression=True)
        sitk.WriteImage(heldout_image, str(build / "imagesTs" / f"{HELDOUT_CASE}_0000.nii.gz"), useCompression=True)
        sitk.WriteImage(heldout_label, str(build / "labelsTs" / f"{HELDOUT_CASE}.nii.gz"), useCompression=True)
        (build / "dataset.json").write_text(json.dumps(dataset_json, indent=2) + "\n", encoding="utf-8")
        final = raw_root / full_name
        if final.exists():
            os.rename(final, work / "previous")
        os.rename(build, final)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    return DemoDataset(
        dataset_dir=final,
        dataset_name=full_name,
        dataset_id=dataset_id,
        labels=labels,
        train_case=TRAIN_CASE,
        heldout_case=HELDOUT_CASE,
        heldout_dicom_dir=files.heldout_dicom_dir,
        heldout_image=final / "imagesTs" / f"{HELDOUT_CASE}_0000.nii.gz",
        heldout_label=final / "labelsTs" / f"{HELDOUT_CASE}.nii.gz",
        source_dir=root,
        voxel_counts=counts,
    )


def _voxel_counts(label: sitk.Image, labels: Mapping[str, int]) -> dict[str, int]:
    import numpy as np
    import SimpleITK as sitk

    arr = sitk.GetArrayViewFromImage(label)
    counts = np.bincount(arr.ravel(), minlength=max(labels.values()) + 1)
    return {name: int(counts[v]) for name, v in labels.items() if name != "background"}


# ---------------------------------------------------------------------------------------------
# Facts about the scans (docs/demo-data.md is written from these)


def intensity_stats(image: sitk.Image, label: sitk.Image, labels: Mapping[str, int]) -> dict[str, dict[str, float]]:
    """Per class (and ``"foreground"``, all labels > 0): voxel count, mean, std and the 0.5, 5, 50, 95
    and 99.5 percentiles of the image inside it. ``label`` must be on ``image``'s grid."""
    import numpy as np
    import SimpleITK as sitk

    if not same_geometry(image, label):
        raise ValueError("label is not on the image's grid; resample it with resample_label_to_image first")
    values = sitk.GetArrayViewFromImage(image).astype(np.float64)
    lab = sitk.GetArrayViewFromImage(label)
    masks = {name: lab == v for name, v in labels.items() if v != 0}
    masks["foreground"] = lab > 0
    stats: dict[str, dict[str, float]] = {}
    for name, mask in masks.items():
        inside = values[mask]
        entry: dict[str, float] = {"voxels": int(inside.size)}
        if inside.size:
            p = np.percentile(inside, [0.5, 5, 50, 95, 99.5])
            entry.update(
                mean=float(inside.mean()),
                std=float(inside.std()),
                p0_5=float(p[0]),
                p5=float(p[1]),
                p50=float(p[2]),
                p95=float(p[3]),
                p99_5=float(p[4]),
            )
        stats[name] = entry
    return stats


def describe_example_scans(cache_dir: str | os.PathLike | None = None, *, quiet: bool = True) -> dict[str, Any]:
    """Geometry, source classes present (voxel counts) and grouped-organ intensities of both patients."""
    import numpy as np
    import SimpleITK as sitk

    files = ExampleFiles(fetch_example_scans(cache_dir, quiet=quiet))
    table = load_class_table(files.class_table)
    groups = resolve_label_groups(table)
    labels = {"background": 0, **{name: i for i, name in enumerate(groups, start=1)}}

    def geometry(img: sitk.Image) -> dict[str, Any]:
        return {
            "size": list(img.GetSize()),
            "spacing": [round(s, 4) for s in img.GetSpacing()],
            "origin": [round(o, 3) for o in img.GetOrigin()],
            "direction": [round(d, 4) for d in img.GetDirection()],
            "pixel_type": img.GetPixelIDTypeAsString(),
        }

    def present(label: sitk.Image) -> dict[str, int]:
        values, counts = np.unique(sitk.GetArrayViewFromImage(label), return_counts=True)
        return {table.get(int(v), f"unknown_{int(v)}"): int(c) for v, c in zip(values, counts, strict=True) if v != 0}

    out: dict[str, Any] = {"class_table_size": len(table), "patients": {}}
    pairs = {
        "train": (
            sitk.ReadImage(str(files.train_image)),
            sitk.ReadImage(str(files.train_label)),
            files.train_image.name,
        ),
        "heldout": (
            read_dicom_series(files.heldout_dicom_dir),
            sitk.ReadImage(str(files.heldout_label)),
            files.heldout_dicom_dir.name,
        ),
    }
    for key, (image, label, image_name) in pairs.items():
        on_grid = convert_label(label, image, groups)
        out["patients"][key] = {
            "image": image_name,
            "image_geometry": geometry(image),
            "label_geometry": geometry(label),
            "label_header_matches_image": same_geometry(image, label),
            "classes_present": present(label),
            "intensity_hu": intensity_stats(image, on_grid, labels),
        }
    return out
