"""Prediction inputs: a file, a folder of files, or a DICOM series folder, as lists of channel files.

nnU-Net v2 names each channel of a case ``<case>_<XXXX><ending>`` (``_0000`` for the first).
We also accept single-channel files without that suffix, and DICOM series, which are written
once to the dataset's file ending so that the engine's own reader reads them like any other case.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from mednext.files import check_plain_name

# Endings any nnU-Net v2 reader understands; a file with one of these that is not the model's
# ending is an error rather than something to skip silently.
IMAGE_ENDINGS = (".nii.gz", ".nii", ".nrrd", ".mha", ".gipl", ".png", ".bmp", ".tif", ".tiff")
# Endings SimpleITK can write a 3D volume to (for DICOM conversion).
_VOLUME_ENDINGS = (".nii.gz", ".nii", ".nrrd", ".mha", ".gipl")
_CHANNEL = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


@dataclass
class InputCase:
    """One case to predict: its id (the output file's name) and one file per channel, in order."""

    case_id: str
    files: list[Path]
    source: str = ""
    temporary: list[Path] = field(default_factory=list)


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


def cases_from_dicom(folder: Path, ending: str, num_channels: int, workspace: Path) -> list[InputCase]:
    """Read each DICOM series in ``folder`` and write it to ``workspace`` in the model's file ending."""
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
    series = dicom_series(folder)
    cases = []
    for index, series_id in enumerate(series):
        names = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), series_id)
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames(names)
        try:
            image = reader.Execute()
        except RuntimeError as err:
            raise ValueError(f"could not read DICOM series {series_id} in {folder}: {err}") from err
        if image.GetNumberOfComponentsPerPixel() != 1:
            raise ValueError(
                f"DICOM series {series_id} in {folder} has {image.GetNumberOfComponentsPerPixel()} components "
                "per pixel (colour?); the model takes one grey-value channel"
            )
        case_id = folder.name if len(series) == 1 else f"{folder.name}_{index:02d}"
        target = workspace / f"{case_id}_0000{ending}"
        sitk.WriteImage(image, str(target), True)
        cases.append(InputCase(case_id, [target], source=f"{folder} (DICOM series {series_id})", temporary=[target]))
    return cases


def collect_input_cases(path: str | Path, ending: str, num_channels: int, workspace: Path) -> list[InputCase]:
    """Turn ``path`` into cases with one file per channel.

    ``path`` is an image file, a folder of image files, a DICOM series folder, or a folder whose
    subfolders are DICOM series (one case each).

    Raises FileNotFoundError when ``path`` does not exist and ValueError, naming the file and the
    fix, for files in another ending, missing or surplus channel files, and empty folders.
    ``workspace`` receives DICOM series converted to ``ending``.
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
        cases = cases_from_dicom(path, ending, num_channels, workspace)
    else:
        # a folder of DICOM series folders (one per scan), each a case named after its folder
        cases = []
        for sub in sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")):
            if dicom_series(sub):
                cases += cases_from_dicom(sub, ending, num_channels, workspace)
    for case in cases:
        check_plain_name(case.case_id, f"{case.source}: case name")
    if not cases:
        raise ValueError(
            f"{path} holds no '{ending}' images and no DICOM series; give a folder of <case>_0000{ending} "
            "files, a single image, a DICOM series folder or a folder of DICOM series folders"
        )
    return cases
