"""Prediction inputs: a file, a folder of files, or a DICOM series folder, as lists of channel files.

nnU-Net v2 names each channel of a case ``<case>_<XXXX><ending>`` (``_0000`` for the first).
We also accept single-channel files without that suffix, and DICOM series, which are written
once to the dataset's file ending so that the engine's own reader reads them like any other case.
"""

from __future__ import annotations

import functools
import locale
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from mednext.errors import ImageReadError
from mednext.files import check_plain_name

# Endings any nnU-Net v2 reader understands; a file with one of these that is not the model's
# ending is an error rather than something to skip silently.
IMAGE_ENDINGS = (".nii.gz", ".nii", ".nrrd", ".mha", ".gipl", ".png", ".bmp", ".tif", ".tiff")
# Endings SimpleITK can write a 3D volume to (for DICOM conversion).
_VOLUME_ENDINGS = (".nii.gz", ".nii", ".nrrd", ".mha", ".gipl")
T = TypeVar("T")
_CHANNEL = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


@dataclass
class InputCase:
    """One case to predict: its id (the output file's name) and one file per channel, in order."""

    case_id: str
    files: list[Path]
    source: str = ""
    temporary: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def image_ending(path: str | Path) -> str | None:
    """The image file ending of ``path`` (``.nii.gz`` counts as one), or None if it is not an image."""
    name = Path(path).name.lower()
    for ending in IMAGE_ENDINGS:
        if name.endswith(ending):
            return ending
    return None


def _stem(path: Path, ending: str) -> str:
    return path.name[: -len(ending)]


def _split_channel(stem: str) -> tuple[str, int | None]:
    match = _CHANNEL.match(stem)
    if match is None:
        return stem, None
    return match["case"], int(match["channel"])


def _channel_files(case_id: str, folder: Path, ending: str, num_channels: int) -> list[Path]:
    return [folder / f"{case_id}_{c:04d}{ending}" for c in range(num_channels)]


def _check_ending(path: Path, ending: str) -> None:
    found = image_ending(path)
    if found is None or found != ending.lower():
        shown = found or (path.suffix or "(no ending)")
        raise ValueError(
            f"{path} is a '{shown}' file but this model was trained on '{ending}' files "
            f"(dataset.json 'file_ending'); convert the image to {ending}, e.g. with SimpleITK: "
            f"sitk.WriteImage(sitk.ReadImage(in), 'out{ending}')"
        )


def _missing_channels_error(case_id: str, have: set[int], num_channels: int, folder: Path, ending: str) -> ValueError:
    expected = ", ".join(p.name for p in _channel_files(case_id, folder, ending, num_channels))
    missing = [f"{case_id}_{c:04d}{ending}" for c in range(num_channels) if c not in have]
    extra = sorted(c for c in have if c >= num_channels)
    parts = [f"case '{case_id}' in {folder}: the model takes {num_channels} channel(s) ({expected})"]
    if missing:
        parts.append(f"missing: {', '.join(missing)}")
    if extra:
        parts.append("unexpected channel(s): " + ", ".join(f"{case_id}_{c:04d}{ending}" for c in extra))
    return ValueError("; ".join(parts))


def cases_from_file(path: Path, ending: str, num_channels: int) -> list[InputCase]:
    """One case from a single image file (its sibling channel files are picked up when it has a suffix)."""
    _check_ending(path, ending)
    stem = _stem(path, image_ending(path) or ending)
    case_id, channel = _split_channel(stem)
    if num_channels == 1:
        if channel not in (None, 0):
            # 'scan_0003.nii.gz' for a one-channel model: the suffix is part of the name, not a channel.
            case_id = stem
        return [InputCase(case_id, [path], source=str(path))]
    if channel is None:
        raise ValueError(
            f"{path}: the model takes {num_channels} channels, one file each, named "
            f"<case>_0000{ending} ... <case>_{num_channels - 1:04d}{ending}; rename the file(s) "
            "or give the folder that holds them"
        )
    files = _channel_files(case_id, path.parent, ending, num_channels)
    have = {c for c in range(num_channels) if files[c].is_file()}
    if len(have) != num_channels:
        raise _missing_channels_error(case_id, have, num_channels, path.parent, ending)
    return [InputCase(case_id, files, source=str(path.parent))]


def cases_from_folder(folder: Path, ending: str, num_channels: int) -> list[InputCase]:
    """Group a folder's image files into cases by their ``_XXXX`` channel suffix."""
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    images = [p for p in files if image_ending(p) is not None]
    foreign = [p for p in images if image_ending(p) != ending.lower()]
    if foreign:
        names = ", ".join(p.name for p in foreign[:5]) + (" ..." if len(foreign) > 5 else "")
        raise ValueError(
            f"{folder} holds {len(foreign)} image file(s) that are not '{ending}' files ({names}), but this "
            f"model was trained on '{ending}' files (dataset.json 'file_ending'); convert them to {ending} "
            "or move them out of the folder"
        )
    groups: dict[str, dict[int, Path]] = {}
    plain: dict[str, Path] = {}
    for p in images:
        case_id, channel = _split_channel(_stem(p, ending))
        if channel is None:
            plain[case_id] = p
        else:
            groups.setdefault(case_id, {})[channel] = p
    cases: dict[str, InputCase] = {}

    def add(case: InputCase) -> None:
        if case.case_id in cases:
            clash = ", ".join(str(f.name) for f in cases[case.case_id].files + case.files)
            raise ValueError(
                f"{folder}: files {clash} all name case '{case.case_id}'; rename one so that every case "
                f"has its own name (channels are <case>_0000{ending}, <case>_0001{ending}, ...)"
            )
        cases[case.case_id] = case

    for case_id, path in plain.items():
        if num_channels != 1:
            raise ValueError(
                f"{path}: the model takes {num_channels} channels, one file each, named "
                f"{case_id}_0000{ending} ... {case_id}_{num_channels - 1:04d}{ending}; rename the file"
            )
        add(InputCase(case_id, [path], source=str(path)))
    for case_id, channels in sorted(groups.items()):
        if set(channels) == set(range(num_channels)):
            add(InputCase(case_id, [channels[c] for c in range(num_channels)], source=str(folder)))
        elif num_channels == 1 and 0 not in channels:
            # One-channel model, names like 'scan_0001.nii.gz' without a '_0000' partner: whole stems are ids.
            for path in channels.values():
                add(InputCase(_stem(path, ending), [path], source=str(path)))
        else:
            raise _missing_channels_error(case_id, set(channels), num_channels, folder, ending)
    return [cases[k] for k in sorted(cases)]


def _locale_kept(function: Callable[..., T]) -> Callable[..., T]:
    """Run ``function`` and put the process's locale back afterwards: GDCM (SimpleITK's DICOM
    reader and writer) sets it to "C", after which Python opens text files as ASCII by default,
    in our code's process and in the engine's."""

    @functools.wraps(function)
    def kept(*args: Any, **kwargs: Any) -> T:
        saved = locale.setlocale(locale.LC_ALL)
        try:
            return function(*args, **kwargs)
        finally:
            locale.setlocale(locale.LC_ALL, saved)

    return kept


@_locale_kept
def dicom_series(folder: Path) -> list[str]:
    """The DICOM series ids in ``folder`` (empty if it holds none)."""
    import SimpleITK as sitk

    # ITK warns on stderr for every folder without a series; finding none is an answer here.
    shown = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        return list(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)) or [])
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(shown)


# Slices closer than this (mm) along the slice normal are one position; gaps may differ from the
# series' median gap by SLICE_GAP_TOLERANCE_MM or by SLICE_GAP_TOLERANCE of it, whichever is larger.
SAME_POSITION_MM = 1e-3
SLICE_GAP_TOLERANCE_MM = 0.02
SLICE_GAP_TOLERANCE = 0.02


@dataclass
class SlicePositions:
    """A DICOM series' files sorted along the slice normal, with their positions on it (mm)."""

    files: list[str]
    positions: list[float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...]  # SimpleITK's row-major 3x3: columns are row, column and normal directions


@_locale_kept
def slice_positions(files: list[str]) -> SlicePositions | None:
    """Positions of each slice along the normal of its orientation (DICOM tags 0020,0032 and
    0020,0037), sorted; None when a slice lacks either tag."""
    import SimpleITK as sitk

    found = []
    orientation = None
    for name in files:
        reader = sitk.ImageFileReader()
        reader.SetFileName(name)
        reader.LoadPrivateTagsOff()
        reader.ReadImageInformation()
        if not (reader.HasMetaDataKey("0020|0032") and reader.HasMetaDataKey("0020|0037")):
            return None
        position = [float(v) for v in reader.GetMetaData("0020|0032").split("\\")]
        if orientation is None:
            orientation = [float(v) for v in reader.GetMetaData("0020|0037").split("\\")]
        found.append((name, position))
    import numpy as np

    row, col = np.array(orientation[:3]), np.array(orientation[3:6])
    normal = np.cross(row, col)
    ordered = sorted(found, key=lambda item: float(np.dot(normal, item[1])))
    direction = tuple(float(v) for v in np.stack([row, col, normal], axis=1).ravel())
    return SlicePositions(
        files=[name for name, _ in ordered],
        positions=[float(np.dot(normal, p)) for _, p in ordered],
        origin=tuple(ordered[0][1]),
        direction=direction,
    )


def irregularities(positions: list[float]) -> tuple[float, list[str]]:
    """The median gap of sorted slice positions and a description of every duplicate or irregular gap."""
    import numpy as np

    gaps = np.diff(positions)
    typical = float(np.median(gaps[gaps > SAME_POSITION_MM])) if np.any(gaps > SAME_POSITION_MM) else 0.0
    found = []
    for i, gap in enumerate(gaps):
        if gap <= SAME_POSITION_MM:
            found.append(f"position {positions[i]:.1f} mm appears twice")
        elif abs(gap - typical) > max(SLICE_GAP_TOLERANCE_MM, SLICE_GAP_TOLERANCE * typical):
            found.append(f"{gap:.2f} mm between the slices at {positions[i]:.1f} and {positions[i + 1]:.1f} mm")
    return typical, found


@_locale_kept
def regular_volume(series: SlicePositions, spacing: float) -> Any:
    """The series resampled onto slices ``spacing`` mm apart from its first slice, each slice
    interpolated linearly between the two read slices around its position (duplicates: the first)."""
    import numpy as np
    import SimpleITK as sitk

    first = sitk.ReadImage(series.files[0])
    keep = [0] + [
        i for i in range(1, len(series.files)) if series.positions[i] - series.positions[i - 1] > SAME_POSITION_MM
    ]
    positions = np.array([series.positions[i] for i in keep])
    planes = np.stack([sitk.GetArrayFromImage(sitk.ReadImage(series.files[i]))[0] for i in keep]).astype(np.float64)
    count = int(round((positions[-1] - positions[0]) / spacing)) + 1
    targets = positions[0] + spacing * np.arange(count)
    upper = np.clip(np.searchsorted(positions, targets, side="right"), 1, len(positions) - 1)
    lower = upper - 1
    weight = np.clip((targets - positions[lower]) / (positions[upper] - positions[lower]), 0.0, 1.0)
    volume = planes[lower] * (1 - weight)[:, None, None] + planes[upper] * weight[:, None, None]
    dtype = sitk.GetArrayViewFromImage(first).dtype
    if np.issubdtype(dtype, np.integer):
        volume = np.rint(volume)
    image = sitk.GetImageFromArray(volume.astype(dtype))
    image.SetSpacing((*first.GetSpacing()[:2], float(spacing)))
    image.SetOrigin(series.origin)
    image.SetDirection(series.direction)
    return image


@_locale_kept
def cases_from_dicom(
    folder: Path, ending: str, num_channels: int, workspace: Path, allow_irregular_slices: bool = False
) -> list[InputCase]:
    """Read each DICOM series in ``folder`` and write it to ``workspace`` in the model's file ending.

    A series whose slices are missing, duplicated or unevenly spaced is refused (the volume would
    not line up with the series); with ``allow_irregular_slices`` it is resampled onto its median
    slice gap (:func:`regular_volume`), and the case carries a note saying so."""
    import SimpleITK as sitk

    if num_channels != 1:
        raise ValueError(
            f"{folder} is a DICOM series (one channel) but the model takes {num_channels} channels; "
            f"give a folder of <case>_0000{ending} ... files instead"
        )
    if ending.lower() not in _VOLUME_ENDINGS:
        raise ValueError(
            f"{folder} is a DICOM series (a 3D volume) but this model was trained on '{ending}' files; "
            f"DICOM input needs a model trained on volumes ({', '.join(_VOLUME_ENDINGS)})"
        )
    series_ids = dicom_series(folder)
    cases = []
    for index, series_id in enumerate(series_ids):
        names = list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), series_id))
        notes = []
        try:
            series = slice_positions(names) if len(names) > 1 else None
            if len(names) > 1 and series is None and not allow_irregular_slices:
                raise ImageReadError(
                    f"DICOM series {series_id} in {folder}: a slice lacks its position or orientation (tags "
                    "0020,0032 and 0020,0037), so the slices' order and spacing cannot be checked; pass "
                    "--allow-irregular-slices to read the series in the reader's order and spacing"
                )
            typical, problems = irregularities(series.positions) if series is not None else (0.0, [])
            if problems and not allow_irregular_slices:
                raise ImageReadError(
                    f"DICOM series {series_id} in {folder} has missing, duplicate or unevenly spaced slices ("
                    + "; ".join(problems[:5])
                    + ("; ..." if len(problems) > 5 else "")
                    + f"; the other slices are {typical:.2f} mm apart): the volume would not line up with the "
                    "series. Add the missing slices or remove the duplicates, or pass --allow-irregular-slices "
                    f"to resample the series onto slices {typical:.2f} mm apart"
                )
            if problems:
                image = regular_volume(series, typical)
                notes.append(
                    f"irregular slices ({'; '.join(problems[:5])}): resampled onto {image.GetDepth()} slices "
                    f"{typical:.2f} mm apart"
                )
            else:
                reader = sitk.ImageSeriesReader()
                reader.SetFileNames(names)
                image = reader.Execute()
        except RuntimeError as err:
            raise ValueError(f"could not read DICOM series {series_id} in {folder}: {err}") from err
        if image.GetNumberOfComponentsPerPixel() != 1:
            raise ValueError(
                f"DICOM series {series_id} in {folder} has {image.GetNumberOfComponentsPerPixel()} components "
                "per pixel (colour?); the model takes one grey-value channel"
            )
        case_id = folder.name if len(series_ids) == 1 else f"{folder.name}_{index:02d}"
        target = workspace / f"{case_id}_0000{ending}"
        sitk.WriteImage(image, str(target), True)
        source = f"{folder} (DICOM series {series_id})"
        cases.append(InputCase(case_id, [target], source=source, temporary=[target], notes=notes))
    return cases


def collect_input_cases(
    path: str | Path, ending: str, num_channels: int, workspace: Path, allow_irregular_slices: bool = False
) -> list[InputCase]:
    """Turn ``path`` into cases with one file per channel.

    ``path`` is an image file, a folder of image files, a DICOM series folder, or a folder whose
    subfolders are DICOM series (one case each).

    Raises FileNotFoundError when ``path`` does not exist and ValueError, naming the file and the
    fix, for files in another ending, missing or surplus channel files, and empty folders.
    ``workspace`` receives DICOM series converted to ``ending``; ``allow_irregular_slices``: see
    :func:`cases_from_dicom`.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(
            f"input {path} does not exist; give an image file, a folder of images or a DICOM folder"
        )
    if path.is_file():
        return cases_from_file(path, ending, num_channels)
    has_images = any(image_ending(p) is not None for p in path.iterdir() if p.is_file())
    if has_images:
        cases = cases_from_folder(path, ending, num_channels)
    elif dicom_series(path):
        cases = cases_from_dicom(path, ending, num_channels, workspace, allow_irregular_slices)
    else:
        # a folder of DICOM series folders (one per scan), each a case named after its folder
        cases = []
        for sub in sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")):
            if dicom_series(sub):
                cases += cases_from_dicom(sub, ending, num_channels, workspace, allow_irregular_slices)
    for case in cases:
        check_plain_name(case.case_id, f"{case.source}: case name")
    if not cases:
        raise ValueError(
            f"{path} holds no '{ending}' images and no DICOM series; give a folder of <case>_0000{ending} "
            "files, a single image, a DICOM series folder or a folder of DICOM series folders"
        )
    return cases
