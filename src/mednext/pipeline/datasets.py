"""nnU-Net v2 raw datasets: register a folder in the working folder, resolve names and ids, and
check a raw dataset before the engine sees it; and wrappers of the engine's preprocessed datasets
whose loaded cases pass through a function (:class:`TransformedDatasetClass`).

The engine's own checks are asserts deep in multiprocessing workers; these run first and say which
file is wrong and how to fix it. Everything raised here is a :class:`DatasetError` (a ValueError),
which the CLI prints without a traceback.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mednext.errors import DatasetError, ImageReadError, UnsafePathError
from mednext.files import check_plain_name
from mednext.pipeline.integrity import check_complete, check_file_finite
from mednext.pipeline.workdir import preprocessed_folder, raw_folder, results_folder

DATASET_NAME = re.compile(r"^Dataset(\d{3})_([A-Za-z0-9_\-]+)$")
FIRST_FREE_ID = 900  # ids chosen for folders without a DatasetXXX_ prefix start here (nnU-Net reserves lower ones)
MAX_LISTED = 12  # problems listed in one error message
SITK_ENDINGS = (".nii.gz", ".nrrd", ".mha", ".gipl", ".nii")
NATURAL_2D_ENDINGS = (".png", ".bmp")
NON_FINITE_IN_TRAINING = (
    "the engine would train on them as zeros or stop in an assertion; replace them (e.g. with numpy.nan_to_num "
    "and a value that means 'no signal' in this modality) or remove the case, then run mednext plan again"
)


@dataclass
class RawDatasetInfo:
    """What the checks learnt about a raw dataset."""

    folder: Path
    name: str
    file_ending: str
    num_channels: int
    labels: dict[str, int | list[int]]
    cases: dict[str, dict] = field(default_factory=dict)  # case id -> {"images": [paths], "label": path}
    spatial_dims: int = 3


# ----------------------------------------------------------------------------- names and ids


def dataset_id_of(name: str) -> int:
    """The numeric id of ``DatasetXXX_Name``."""
    m = DATASET_NAME.match(name)
    if not m:
        raise DatasetError(f"{name!r} is not a dataset name of the form DatasetXXX_Name (e.g. Dataset901_Lesions)")
    return int(m.group(1))


def _known_names() -> list[str]:
    """Dataset names found in the raw and preprocessed folders (and results when set)."""
    names: set[str] = set()
    for folder in (raw_folder, preprocessed_folder, results_folder):
        try:
            root = folder()
        except DatasetError:  # that folder is not set
            continue
        if root.is_dir():
            names.update(d.name for d in root.iterdir() if DATASET_NAME.match(d.name))
    return sorted(names)


def resolve_dataset(spec: str | int) -> str:
    """Turn ``Dataset901_Lesions``, ``901`` or ``"901"`` into the dataset's full name.

    The dataset must exist in the working folder (raw, preprocessed or results)."""
    text = str(spec).strip()
    known = _known_names()
    if text.isdigit():
        matches = [n for n in known if dataset_id_of(n) == int(text)]
        if len(matches) == 1:
            return matches[0]
        if len(matches) > 1:
            raise DatasetError(
                f"dataset id {text} is ambiguous: {', '.join(matches)}; pass the full name or remove the duplicate"
            )
    elif text in known:
        return text
    available = ", ".join(known) if known else "none"
    raise DatasetError(
        f"dataset {text!r} not found in the working folder (known datasets: {available}); run "
        f"'mednext plan /path/to/DatasetXXX_Name' first, or check --workdir"
    )


def register_dataset(path: str | os.PathLike, dataset_id: int | None = None) -> str:
    """Make the raw dataset folder ``path`` available in nnUNet_raw and return its name.

    A folder named ``DatasetXXX_Name`` keeps its name; another folder gets the next free id from
    900 and its own name (``Dataset900_<folder>``). A folder already inside nnUNet_raw is used as
    is. Elsewhere the folder is linked (a symlink; copied where links are not allowed), never moved.
    """
    src = Path(path).expanduser().resolve()
    if not src.is_dir():
        raise DatasetError(f"{src} is not a folder; pass the dataset folder that holds dataset.json and imagesTr/")
    raw = raw_folder()
    m = DATASET_NAME.match(src.name)
    if m and dataset_id is None:
        name = src.name
    else:
        base = m.group(2) if m else re.sub(r"[^A-Za-z0-9_\-]", "_", src.name)
        if dataset_id is None:
            used = {dataset_id_of(n) for n in _known_names()}
            # a folder already registered under another id keeps it
            for n in _known_names():
                target = raw / n
                if target.is_symlink() and target.resolve() == src:
                    return n
            dataset_id = next(i for i in range(FIRST_FREE_ID, 1000) if i not in used)
        name = f"Dataset{dataset_id:03d}_{base}"
    target = raw / name
    if src.parent.resolve() == raw.resolve() and src.name == name:
        return name
    if target.exists() or target.is_symlink():
        if target.resolve() == src:
            return name
        raise DatasetError(
            f"{target} already exists and is not {src}; remove it, or rename your folder to another "
            f"DatasetXXX_Name with a free id"
        )
    clash = [n for n in _known_names() if dataset_id_of(n) == dataset_id_of(name) and n != name]
    if clash:
        raise DatasetError(
            f"dataset id {dataset_id_of(name)} is already used by {clash[0]} in the working folder; rename "
            f"{src} to Dataset<free id>_{DATASET_NAME.match(name).group(2)}"
        )
    raw.mkdir(parents=True, exist_ok=True)
    try:
        os.symlink(src, target, target_is_directory=True)
    except OSError:
        tmp = raw / f".{name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(src, tmp)
        os.replace(tmp, target)
    return name


# ----------------------------------------------------------------------------- validation


def _supported_endings() -> list[str]:
    from nnunetv2.imageio.reader_writer_registry import LIST_OF_IO_CLASSES

    return sorted({e for c in LIST_OF_IO_CLASSES for e in c.supported_file_endings})


def read_dataset_json(folder: str | os.PathLike) -> dict:
    """Load and check ``folder/dataset.json``; raise a DatasetError naming the field and the fix."""
    path = Path(folder) / "dataset.json"
    if not path.is_file():
        raise DatasetError(
            f"{path} is missing; every nnU-Net v2 raw dataset needs a dataset.json with channel_names, "
            f"labels, numTraining and file_ending"
        )
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise DatasetError(f"{path} is not valid JSON (line {err.lineno}, column {err.colno}: {err.msg})") from err
    if not isinstance(meta, dict):
        raise DatasetError(f"{path} must hold a JSON object, not {type(meta).__name__}")
    if "channel_names" not in meta and "modality" in meta:
        meta["channel_names"] = meta["modality"]  # nnU-Net v1 name, still read by the engine
    example = (
        '"channel_names": {"0": "CT"}, "labels": {"background": 0, "tumour": 1}, "numTraining": 10, '
        '"file_ending": ".nii.gz"'
    )
    missing = [k for k in ("channel_names", "labels", "numTraining", "file_ending") if k not in meta]
    if missing:
        raise DatasetError(f"{path} lacks {', '.join(missing)}; add them, e.g. {{{example}}}")
    channels = meta["channel_names"]
    if not isinstance(channels, dict) or not channels:
        raise DatasetError(f'{path}: "channel_names" must be a non-empty object like {{"0": "CT"}}')
    keys = sorted(channels, key=lambda k: int(k) if str(k).isdigit() else -1)
    if [str(k) for k in keys] != [str(i) for i in range(len(keys))]:
        raise DatasetError(
            f'{path}: "channel_names" keys must be "0", "1", ... without gaps, got {list(channels)}; '
            f"they number the _0000, _0001, ... image files"
        )
    labels = meta["labels"]
    if not isinstance(labels, dict) or not labels:
        raise DatasetError(f'{path}: "labels" must be an object like {{"background": 0, "tumour": 1}}')
    for lname, value in labels.items():
        ok = (isinstance(value, int) and not isinstance(value, bool) and value >= 0) or (
            isinstance(value, list) and value and all(isinstance(v, int) and v >= 0 for v in value)
        )
        if not ok:
            raise DatasetError(
                f'{path}: label "{lname}" has value {value!r}; label values must be non-negative integers '
                f"(or lists of them for regions)"
            )
    if labels.get("background") != 0:
        raise DatasetError(f'{path}: "labels" must contain "background": 0 (got {labels.get("background")!r})')
    ints = [v for v in labels.values() if isinstance(v, int)]
    if len(ints) != len(set(ints)):
        raise DatasetError(f'{path}: "labels" assigns the same value to two names: {labels}')
    if len(ints) == len(labels) and sorted(ints) != list(range(len(ints))):
        by_value = sorted(labels, key=lambda k: labels[k])
        renumbered = ", ".join(f'"{k}": {i}' for i, k in enumerate(by_value))
        raise DatasetError(
            f'{path}: "labels" values must be consecutive 0, 1, 2, ... (the engine trains one output per value), '
            f"got {sorted(ints)}; renumber them, e.g. {{{renumbered}}}, and write the label maps with the same values"
        )
    _check_regions(path, labels, meta.get("regions_class_order"))
    if not isinstance(meta["numTraining"], int) or meta["numTraining"] < 1:
        raise DatasetError(f'{path}: "numTraining" must be a positive integer, got {meta["numTraining"]!r}')
    ending = meta["file_ending"]
    supported = _supported_endings()
    if not isinstance(ending, str) or ending.lower() not in supported:
        raise DatasetError(
            f'{path}: "file_ending" {ending!r} is not read by the engine; use one of {", ".join(supported)}'
        )
    return meta


def _check_regions(path: Path, labels: dict, order: Any) -> None:
    """A label set with regions (a name listing several values, BraTS-style) needs
    ``regions_class_order``: per region, in the order of "labels", the value its voxels get in a
    predicted label map (later regions are painted over earlier ones), as the engine reads it."""
    if not any(isinstance(v, list) and len(set(v)) > 1 for v in labels.values()):
        return
    as_sets = {name: set(value) if isinstance(value, list) else {value} for name, value in labels.items()}
    regions = {name: values for name, values in as_sets.items() if name != "ignore" and values != {0}}
    names = ", ".join(f'"{n}"' for n in regions)
    suggestion = []
    for i, values in enumerate(regions.values()):
        later = set().union(*list(regions.values())[i + 1 :])
        suggestion.append(min(values - later) if values - later else max(values))
    advice = (
        f"give one label value per region ({names}, in this order): the value its voxels get in a predicted "
        f'label map, later regions painted over earlier ones, e.g. "regions_class_order": {suggestion}'
    )
    if order is None:
        raise DatasetError(
            f'{path}: "labels" define regions (lists of values) but "regions_class_order" is missing; ' + advice
        )
    if not isinstance(order, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in order):
        raise DatasetError(f'{path}: "regions_class_order" must be a list of label values, got {order!r}; ' + advice)
    if len(order) != len(regions):
        raise DatasetError(
            f'{path}: "regions_class_order" has {len(order)} value(s) for {len(regions)} region(s); ' + advice
        )
    known = allowed_label_values({k: v for k, v in labels.items() if k != "ignore"}) - {0}
    unknown = [v for v in order if v not in known]
    if unknown:
        raise DatasetError(
            f'{path}: "regions_class_order" names value(s) {unknown} that no region in "labels" holds '
            f"(they hold {sorted(known)}); " + advice
        )


def allowed_label_values(labels: dict) -> set[int]:
    values: set[int] = set()
    for v in labels.values():
        values.update(v if isinstance(v, list) else [v])
    return values


def _collect_cases(folder: Path, meta: dict, problems: list[str]) -> dict[str, dict]:
    ending = meta["file_ending"]
    num_channels = len(meta["channel_names"])
    if "dataset" in meta:  # explicit file lists (nnU-Net v2 allows this instead of the folder layout)
        cases = {}
        for case, entry in meta["dataset"].items():
            try:
                check_plain_name(case, f'{folder / "dataset.json"}: "dataset" case identifier')
            except UnsafePathError as err:
                problems.append(str(err))
                continue
            images = [Path(folder, p) if not os.path.isabs(p) else Path(p) for p in entry.get("images", [])]
            label = entry.get("label")
            label = Path(folder, label) if label and not os.path.isabs(label) else (Path(label) if label else None)
            for p in [*images, label]:
                if p is None or not p.is_file():
                    problems.append(f'{folder / "dataset.json"}: case "{case}" names {p}, which does not exist')
            cases[case] = {"images": images, "label": label}
        return cases
    images_dir, labels_dir = folder / "imagesTr", folder / "labelsTr"
    for d in (images_dir, labels_dir):
        if not d.is_dir():
            raise DatasetError(f"{d} is missing; a raw dataset holds imagesTr/ (CASE_0000{ending}) and labelsTr/")
    pattern = re.compile(r"^(.+)_(\d{4})" + re.escape(ending) + "$")
    channels: dict[str, dict[int, Path]] = {}
    for f in sorted(images_dir.iterdir()):
        if f.name.startswith("."):
            continue
        if not f.name.endswith(ending):
            problems.append(
                f"{f}: file ending differs from dataset.json's file_ending {ending!r}; convert it or remove it"
            )
            continue
        m = pattern.match(f.name)
        if not m:
            problems.append(f"{f}: image names must be CASE_XXXX{ending} (channel suffix _0000, _0001, ...); rename it")
            continue
        try:
            check_plain_name(m.group(1), f"{f}: case identifier")
        except UnsafePathError as err:
            problems.append(str(err))
            continue
        channels.setdefault(m.group(1), {})[int(m.group(2))] = f
    labels = {
        f.name[: -len(ending)]: f for f in sorted(labels_dir.iterdir()) if f.name.endswith(ending) and f.is_file()
    }
    for f in sorted(labels_dir.iterdir()):
        if not f.name.startswith(".") and not f.name.endswith(ending):
            problems.append(f"{f}: file ending differs from dataset.json's file_ending {ending!r}")
    cases: dict[str, dict] = {}
    for case, chans in channels.items():
        expected = list(range(num_channels))
        missing = [c for c in expected if c not in chans]
        extra = [c for c in chans if c >= num_channels]
        natural_rgb = ending in NATURAL_2D_ENDINGS and list(chans) == [0]
        if missing and not natural_rgb:
            names = ", ".join(f"{case}_{c:04d}{ending}" for c in missing)
            problems.append(
                f"{images_dir}: case {case} lacks channel file(s) {names}; dataset.json declares "
                f"{num_channels} channel(s) in channel_names"
            )
        if extra:
            names = ", ".join(str(chans[c]) for c in extra)
            problems.append(
                f"{names}: channel index beyond the {num_channels} channel(s) in dataset.json's channel_names; "
                f"add the channel to channel_names or remove the file"
            )
        if case not in labels:
            problems.append(
                f"{chans[min(chans)]}: image without label; add labelsTr/{case}{ending} or remove the image"
            )
        cases[case] = {"images": [chans[c] for c in sorted(chans) if c < num_channels], "label": labels.get(case)}
    for case, f in labels.items():
        if case not in channels:
            problems.append(f"{f}: label without image; add imagesTr/{case}_0000{ending} or remove the label")
    if len(cases) != meta["numTraining"] and not problems:
        problems.append(
            f'{folder / "dataset.json"}: "numTraining" is {meta["numTraining"]} but imagesTr holds {len(cases)} '
            f"case(s); set numTraining to {len(cases)}"
        )
    return cases


def raw_case_files(folder: str | os.PathLike) -> dict[str, list[Path]]:
    """Case id -> its image files and label of the raw dataset ``folder``, as the checks pair them."""
    folder = Path(folder)
    cases = _collect_cases(folder, read_dataset_json(folder), [])
    return {case: [*entry["images"], *([entry["label"]] if entry["label"] else [])] for case, entry in cases.items()}


def _geometry(path: Path, ending: str) -> tuple[tuple[int, ...], tuple[float, ...], tuple[float, ...], int]:
    """(size, spacing, origin, channels-in-file) in the file's own axis order; header only where possible."""
    if ending in SITK_ENDINGS:
        import SimpleITK as sitk

        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        reader.ReadImageInformation()
        return (
            tuple(reader.GetSize()),
            tuple(reader.GetSpacing()),
            tuple(reader.GetOrigin()),
            reader.GetNumberOfComponents(),
        )
    if ending in NATURAL_2D_ENDINGS:
        from PIL import Image

        with Image.open(path) as im:
            return (im.size[::-1], (1.0, 1.0), (0.0, 0.0), len(im.getbands()))
    from nnunetv2.imageio.reader_writer_registry import determine_reader_writer_from_file_ending

    rw = determine_reader_writer_from_file_ending(ending, str(path))()
    data, props = rw.read_images([str(path)])
    return tuple(data.shape[1:]), tuple(props["spacing"]), (0.0,) * (data.ndim - 1), data.shape[0]


def _read_label(path: Path, ending: str) -> np.ndarray:
    if ending in SITK_ENDINGS:
        import SimpleITK as sitk

        return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
    if ending in NATURAL_2D_ENDINGS:
        from PIL import Image

        with Image.open(path) as im:
            return np.asarray(im)
    from nnunetv2.imageio.reader_writer_registry import determine_reader_writer_from_file_ending

    rw = determine_reader_writer_from_file_ending(ending, str(path))()
    return rw.read_seg(str(path))[0]


def validate_raw_dataset(folder: str | os.PathLike, check_labels: bool = True) -> RawDatasetInfo:
    """Check a raw dataset folder before fingerprinting; raise one DatasetError listing every problem found
    (file, what is wrong, the fix). Checks dataset.json, image/label pairing, channel files, image/label
    size, spacing and origin agreement, and that label values are declared in dataset.json."""
    folder = Path(folder)
    meta = read_dataset_json(folder)
    ending = meta["file_ending"]
    problems: list[str] = []
    cases = _collect_cases(folder, meta, problems)
    if not cases and not problems:
        problems.append(f"{folder / 'imagesTr'} holds no CASE_0000{ending} images")
    allowed = allowed_label_values(meta["labels"])
    dims = 3
    for case, entry in cases.items():
        if len(problems) >= MAX_LISTED:
            break
        if entry["label"] is None or any(not Path(p).is_file() for p in entry["images"]):
            continue
        try:
            for p in [*entry["images"], entry["label"]]:
                check_complete(p)
            for p in entry["images"]:
                check_file_finite(p, NON_FINITE_IN_TRAINING)
        except ImageReadError as err:
            problems.append(str(err))
            continue
        try:
            geo = {p: _geometry(Path(p), ending) for p in [*entry["images"], entry["label"]]}
        except Exception as err:  # unreadable file: name it
            problems.append(f"case {case}: a file could not be read ({err}); re-export it")
            continue
        label_path = entry["label"]
        lsize, lspacing, lorigin, _ = geo[label_path]
        dims = 2 if ending in NATURAL_2D_ENDINGS or len(lsize) == 2 else 3
        if ending in NATURAL_2D_ENDINGS and len(entry["images"]) == 1:
            in_file = geo[entry["images"][0]][3]
            if in_file not in (1, len(meta["channel_names"])):
                problems.append(
                    f"{entry['images'][0]}: holds {in_file} colour channel(s) but dataset.json declares "
                    f"{len(meta['channel_names'])} in channel_names"
                )
        for img in entry["images"]:
            size, spacing, origin, _ = geo[img]
            if size != lsize:
                problems.append(
                    f"{img}: size {size} differs from its label {label_path.name} {lsize}; image and label must "
                    f"cover the same voxel grid (resample the label onto the image)"
                )
            elif not np.allclose(spacing, lspacing, rtol=1e-4, atol=1e-5):
                problems.append(
                    f"{img}: spacing {tuple(round(s, 6) for s in spacing)} differs from its label {label_path.name} "
                    f"{tuple(round(s, 6) for s in lspacing)}; write the label with the image's spacing"
                )
            elif not np.allclose(origin, lorigin, rtol=0, atol=1e-3 * max(1.0, max(spacing))):
                problems.append(
                    f"{img}: origin {tuple(round(o, 4) for o in origin)} differs from its label {label_path.name} "
                    f"{tuple(round(o, 4) for o in lorigin)}; write the label with the image's origin"
                )
        if check_labels:
            values = np.unique(_read_label(label_path, ending))
            bad = [int(v) for v in values if int(v) not in allowed or v != int(v)]
            if bad:
                problems.append(
                    f"{label_path}: label value(s) {bad} are not in dataset.json's labels {meta['labels']}; add them "
                    f"to labels or fix the label map"
                )
    if problems:
        more = f"\n  ... and more (first {MAX_LISTED} shown)" if len(problems) >= MAX_LISTED else ""
        raise DatasetError(
            f"raw dataset {folder} has {len(problems)} problem(s):\n  - " + "\n  - ".join(problems[:MAX_LISTED]) + more
        )
    return RawDatasetInfo(
        folder=folder,
        name=folder.name,
        file_ending=ending,
        num_channels=len(meta["channel_names"]),
        labels=meta["labels"],
        cases=cases,
        spatial_dims=dims,
    )


# ----------------------------------------------------------------------------- training-time case transforms


CaseTransform = Callable[[Any, Any, Any, dict], tuple]
"""A function of a loaded case ``(data, seg, seg_prev, properties)`` returning a new one."""


class TransformedDataset:
    """One of the engine's datasets whose ``load_case`` passes each case through ``transform``;
    everything else is the wrapped dataset's."""

    def __init__(self, dataset: Any, transform: CaseTransform) -> None:
        self.dataset = dataset
        self.transform = transform

    def load_case(self, identifier: str) -> tuple:
        return self.transform(*self.dataset.load_case(identifier))

    def __getitem__(self, identifier: str) -> tuple:
        return self.load_case(identifier)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name in ("dataset", "transform"):  # unpickling looks these up first
            raise AttributeError(name)
        return getattr(self.dataset, name)


class TransformedDatasetClass:
    """Stands in for the engine's dataset class (a trainer's ``dataset_class``): the datasets it makes
    pass their loaded cases through ``transform``; its static methods (``get_identifiers``,
    ``unpack_dataset``, ``save_case``) are those of ``base``. Stand-ins nest: the innermost
    transform runs first."""

    def __init__(self, base: Any, transform: CaseTransform) -> None:
        self.base = base
        self.transform = transform

    def __call__(self, *args: Any, **kwargs: Any) -> TransformedDataset:
        return TransformedDataset(self.base(*args, **kwargs), self.transform)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name in ("base", "transform"):
            raise AttributeError(name)
        return getattr(self.base, name)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.base!r}, {self.transform!r})"
