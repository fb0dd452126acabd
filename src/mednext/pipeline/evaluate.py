"""Evaluation of predicted label maps: per-case and mean per-class Dice and normalised surface Dice.

Files are read with nnU-Net v2's reader for their ending (SimpleITK for .nii.gz/.nrrd/.mha,
scikit-image for .png/.bmp/.tif) and Dice counts come from nnU-Net's own evaluation helpers.

Normalised surface Dice (NSD, Nikolov et al. 2021) at tolerance tau (mm; one for all classes, or one
per class, :class:`Tolerances`): the fraction of the
surface voxels of prediction and reference that lie within tau of the other's surface,
``(|{p in S_pred : d(p, S_ref) <= tau}| + |{r in S_ref : d(r, S_pred) <= tau}|) / (|S_pred| + |S_ref|)``.
A surface voxel is a foreground voxel with at least one face neighbour (6-connectivity in 3D,
4 in 2D) outside the mask or outside the image; distances are Euclidean between voxel centres,
in mm, with the spacing from the image header. Axes of size 1 are dropped, so a single slice is
evaluated in 2D. A class absent from both prediction and reference has no score (NaN, ``null``
in JSON) and is left out of the means; absent from only one of them it scores 0.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mednext.files import atomic_write, atomic_write_json, atomic_write_text
from mednext.pipeline.integrity import check_complete
from mednext.pipeline.io import IMAGE_ENDINGS, image_ending

DEFAULT_TOLERANCE_MM = 2.0
NSD_DEFINITION = (
    "normalised surface Dice (Nikolov et al. 2021): (|{p in S_pred: d(p, S_ref) <= tau}| + "
    "|{r in S_ref: d(r, S_pred) <= tau}|) / (|S_pred| + |S_ref|), S a mask's surface voxels (foreground voxels "
    "with a face neighbour outside the mask or the image), d the Euclidean distance in mm between voxel centres "
    "with the spacing of the image header, tau the class's tolerance in nsd_tolerance_mm; null when both are empty"
)


# ----------------------------------------------------------------------------- metrics on masks


def dice(pred: np.ndarray, ref: np.ndarray, ignore: np.ndarray | None = None) -> float:
    """Dice of two boolean masks (NaN when both are empty); voxels in ``ignore`` do not count."""
    from nnunetv2.evaluation.evaluate_predictions import compute_tp_fp_fn_tn

    tp, fp, fn, _ = compute_tp_fp_fn_tn(ref.astype(bool), pred.astype(bool), ignore)
    denominator = 2 * tp + fp + fn
    return float(2 * tp / denominator) if denominator > 0 else math.nan


def surface_voxels(mask: np.ndarray) -> np.ndarray:
    """Foreground voxels with a face neighbour in the background (outside the array counts as background)."""
    from scipy import ndimage

    mask = mask.astype(bool)
    structure = ndimage.generate_binary_structure(mask.ndim, 1)
    interior = ndimage.binary_erosion(mask, structure=structure, border_value=0)
    return mask & ~interior


def _squeeze(mask: np.ndarray, spacing: Sequence[float]) -> tuple[np.ndarray, tuple[float, ...]]:
    keep = [a for a, n in enumerate(mask.shape) if n > 1] or [mask.ndim - 1]
    return mask.reshape([mask.shape[a] for a in keep]), tuple(float(spacing[a]) for a in keep)


def normalized_surface_dice(
    pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float], tolerance_mm: float = DEFAULT_TOLERANCE_MM
) -> float:
    """NSD of two boolean masks of one shape; ``spacing`` in mm per array axis (NaN when both are empty)."""
    from scipy import ndimage

    if pred.shape != ref.shape:
        raise ValueError(f"masks differ in shape: {pred.shape} vs {ref.shape}")
    if len(spacing) != pred.ndim:
        raise ValueError(f"spacing {tuple(spacing)} has {len(spacing)} entries for a {pred.ndim}D mask")
    if tolerance_mm < 0:
        raise ValueError(f"tolerance {tolerance_mm} mm must be >= 0")
    pred, spacing_used = _squeeze(pred.astype(bool), spacing)
    ref, _ = _squeeze(ref.astype(bool), spacing)
    has_pred, has_ref = bool(pred.any()), bool(ref.any())
    if not has_pred and not has_ref:
        return math.nan
    if not has_pred or not has_ref:
        return 0.0
    # Every surface voxel lies in the union's bounding box, so distances computed inside it
    # (plus one background voxel of margin for the border test) are exact.
    union = pred | ref
    box = []
    for axis in range(union.ndim):
        hit = np.flatnonzero(union.any(axis=tuple(a for a in range(union.ndim) if a != axis)))
        box.append(slice(hit[0], hit[-1] + 1))
    pred = np.pad(pred[tuple(box)], 1)
    ref = np.pad(ref[tuple(box)], 1)
    surface_pred, surface_ref = surface_voxels(pred), surface_voxels(ref)
    to_ref = ndimage.distance_transform_edt(~surface_ref, sampling=spacing_used)
    to_pred = ndimage.distance_transform_edt(~surface_pred, sampling=spacing_used)
    # a hair of slack so that a distance equal to the tolerance counts despite float rounding
    limit = tolerance_mm + 1e-6
    within = np.count_nonzero(to_ref[surface_pred] <= limit) + np.count_nonzero(to_pred[surface_ref] <= limit)
    return float(within / (np.count_nonzero(surface_pred) + np.count_nonzero(surface_ref)))


# ----------------------------------------------------------------------------- tolerances


def _tolerance_value(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"{what}: {value!r} is not a number of mm")
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{what}: {value} must be a finite number of mm >= 0")
    return float(value)


@dataclass(frozen=True)
class Tolerances:
    """NSD tolerances in mm: ``default_mm`` for every class, except those named in ``per_class_mm``
    (class name -> mm, the names of the evaluation's classes)."""

    default_mm: float = DEFAULT_TOLERANCE_MM
    per_class_mm: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "default_mm", _tolerance_value(self.default_mm, "--tolerance"))
        per_class = {}
        for name, value in dict(self.per_class_mm).items():
            if not isinstance(name, str) or not name:
                raise ValueError(f"--tolerance: class names must be non-empty strings, got {name!r}")
            per_class[name] = _tolerance_value(value, f"--tolerance {name}")
        object.__setattr__(self, "per_class_mm", per_class)

    @classmethod
    def of(cls, value: float | Mapping[str, float] | Tolerances | None) -> Tolerances:
        """A number (every class), a mapping class name -> mm (the others get 2 mm), or Tolerances."""
        if isinstance(value, Tolerances):
            return value
        if value is None:
            return cls()
        if isinstance(value, Mapping):
            return cls(DEFAULT_TOLERANCE_MM, value)
        return cls(value)

    def for_class(self, name: str) -> float:
        return self.per_class_mm.get(name, self.default_mm)

    def check_names(self, classes: Iterable[str], source: str) -> None:
        """Refuse tolerances for classes that are not among ``classes`` (the classes of ``source``)."""
        classes = list(classes)
        unknown = [name for name in self.per_class_mm if name not in classes]
        if unknown:
            raise ValueError(
                f"--tolerance names {', '.join(map(repr, unknown))}, not a class of {source}; its classes are "
                f"{', '.join(classes) or '(none)'}"
            )

    def describe(self) -> str:
        """``2 mm`` or ``2 mm (liver 1 mm, tumour 3 mm)``."""
        text = f"{self.default_mm:g} mm"
        if self.per_class_mm:
            text += " (" + ", ".join(f"{n} {v:g} mm" for n, v in self.per_class_mm.items()) + ")"
        return text


def parse_tolerances(tokens: Sequence[str] | None) -> Tolerances:
    """``mednext evaluate --tolerance`` tokens: at most one number of mm for every class, and
    ``CLASS=MM`` for single classes (``["liver=2", "tumour=1", "3"]``). None or empty: 2 mm."""
    default: float | None = None
    per_class: dict[str, float] = {}
    example = "e.g. --tolerance 2, or --tolerance liver=2 tumour=1 3 (3 mm for the other classes)"
    for token in tokens or []:
        name, equals, text = token.rpartition("=")
        name = name.strip()
        if equals and not name:
            raise ValueError(f"--tolerance {token!r}: give the class name before '=', {example}")
        try:
            value = float(text)
        except ValueError:
            if equals:
                raise ValueError(f"--tolerance {token!r}: {text!r} is not a number of mm; {example}") from None
            raise ValueError(
                f"--tolerance {token!r} is neither a number of mm (every class) nor CLASS=MM (one class); "
                f"{example}. Give the folders before --tolerance, or write --tolerance=2."
            ) from None
        value = _tolerance_value(value, f"--tolerance {token!r}")
        if equals:
            if name in per_class:
                raise ValueError(f"--tolerance names class {name!r} twice; give it once")
            per_class[name] = value
        elif default is not None:
            raise ValueError(
                f"--tolerance gives two tolerances for all classes ({default:g} and {value:g}); give one number "
                f"and CLASS=MM for the classes that differ, {example}"
            )
        else:
            default = value
    return Tolerances(DEFAULT_TOLERANCE_MM if default is None else default, per_class)


# ----------------------------------------------------------------------------- labels


@dataclass
class LabelSet:
    """Classes to score: name -> label values (a region is several values), and an optional ignore label."""

    classes: dict[str, tuple[int, ...]]
    ignore: int | None = None
    source: str = "label values found in the files"

    @classmethod
    def from_dataset_json(cls, path: str | os.PathLike) -> LabelSet:
        path = Path(path)
        try:
            content = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as err:
            raise ValueError(f"--labels {path}: cannot read it as JSON ({err})") from err
        labels = content.get("labels") if isinstance(content, dict) else None
        if not isinstance(labels, dict) or not labels:
            raise ValueError(f"--labels {path}: no 'labels' object (name -> value) as in an nnU-Net dataset.json")
        classes: dict[str, tuple[int, ...]] = {}
        ignore = None
        for name, value in labels.items():
            values = tuple(value) if isinstance(value, (list, tuple)) else (value,)
            if not values or not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
                raise ValueError(f"--labels {path}: label {name!r} has value {value!r}; use an int or a list of ints")
            if name == "ignore":
                ignore = values[0]
            elif values != (0,):
                classes[name] = values
        return cls(classes, ignore, source=str(path))


def _inferred_name(value: int) -> str:
    return f"label_{value}"


# ----------------------------------------------------------------------------- files


@dataclass
class CaseResult:
    case: str
    prediction: str
    reference: str
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)


@dataclass
class Evaluation:
    """All results of one evaluation; :meth:`to_dict` is what the JSON file holds."""

    prediction_folder: str
    reference_folder: str
    file_ending: str
    tolerance_mm: float  # the tolerance of every class not named in ``tolerances``
    labels: LabelSet
    cases: list[CaseResult]
    missing_predictions: list[str]
    tolerances: Tolerances | None = None  # None: ``tolerance_mm`` for every class

    def tolerance_for(self, name: str) -> float:
        """The NSD tolerance (mm) used for class ``name``."""
        return self.tolerances.for_class(name) if self.tolerances is not None else self.tolerance_mm

    def class_names(self) -> list[str]:
        names = list(self.labels.classes)
        for case in self.cases:
            names += [n for n in case.metrics if n not in names]
        return names

    def mean(self) -> dict[str, dict[str, float]]:
        """Per class: the mean over cases (NaN scores skipped) and how many cases scored."""
        result = {}
        for name in self.class_names():
            row: dict[str, float] = {}
            for metric in ("dice", "nsd"):
                values = [c.metrics.get(name, {}).get(metric, math.nan) for c in self.cases]
                values = [v for v in values if not math.isnan(v)]
                row[metric] = float(np.mean(values)) if values else math.nan
            row["n"] = sum(not math.isnan(c.metrics.get(name, {}).get("dice", math.nan)) for c in self.cases)
            result[name] = row
        return result

    def foreground_mean(self) -> dict[str, float]:
        """Mean of the per-class means (classes without any score skipped)."""
        mean = self.mean()
        out = {}
        for metric in ("dice", "nsd"):
            values = [row[metric] for row in mean.values() if not math.isnan(row[metric])]
            out[metric] = float(np.mean(values)) if values else math.nan
        return out

    def to_dict(self) -> dict[str, Any]:
        return _json_safe(
            {
                "prediction_folder": self.prediction_folder,
                "reference_folder": self.reference_folder,
                "file_ending": self.file_ending,
                "tolerance_mm": self.tolerance_mm,
                "nsd_tolerance_mm": {name: self.tolerance_for(name) for name in self.class_names()},
                "labels": {name: list(values) for name, values in self.labels.classes.items()},
                "ignore_label": self.labels.ignore,
                "labels_from": self.labels.source,
                "metric_definitions": {
                    "dice": "2|P&R| / (|P| + |R|); null when both are empty",
                    "nsd": NSD_DEFINITION,
                },
                "mean": self.mean(),
                "foreground_mean": self.foreground_mean(),
                "cases": [
                    {"case": c.case, "prediction": c.prediction, "reference": c.reference, "metrics": c.metrics}
                    for c in self.cases
                ],
                "missing_predictions": self.missing_predictions,
            }
        )

    def csv_text(self) -> str:
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(["case", "class", "dice", "nsd", "nsd_tolerance_mm"])
        for case in self.cases:
            for name in self.class_names():
                m = case.metrics.get(name, {})
                tolerance = f"{self.tolerance_for(name):g}"
                writer.writerow([case.case, name, _fmt_csv(m.get("dice")), _fmt_csv(m.get("nsd")), tolerance])
        for name, row in self.mean().items():
            tolerance = f"{self.tolerance_for(name):g}"
            writer.writerow(["mean", name, _fmt_csv(row["dice"]), _fmt_csv(row["nsd"]), tolerance])
        fg = self.foreground_mean()
        writer.writerow(["mean", "all classes", _fmt_csv(fg["dice"]), _fmt_csv(fg["nsd"]), ""])
        return buffer.getvalue()

    def table(self) -> str:
        """Per-class means, then per-case means over classes, as aligned text."""
        mean = self.mean()
        width = max([len("class"), len("all classes"), *map(len, mean)])
        lines = [
            f"{len(self.cases)} case(s), NSD tolerance {self._tolerance_text()}, classes from {self.labels.source}",
            f"{'class':<{width}}  {'Dice':>7}  {'NSD':>7}  cases",
        ]
        for name, row in mean.items():
            lines.append(f"{name:<{width}}  {_fmt(row['dice'])}  {_fmt(row['nsd'])}  {row['n']:>5}")
        fg = self.foreground_mean()
        lines.append(f"{'all classes':<{width}}  {_fmt(fg['dice'])}  {_fmt(fg['nsd'])}")
        case_width = max([len("case"), *(len(c.case) for c in self.cases)])
        lines += ["", f"{'case':<{case_width}}  {'Dice':>7}  {'NSD':>7}   (mean over classes)"]
        for case in self.cases:
            per = {m: [v[m] for v in case.metrics.values() if not math.isnan(v[m])] for m in ("dice", "nsd")}
            dice_mean = float(np.mean(per["dice"])) if per["dice"] else math.nan
            nsd_mean = float(np.mean(per["nsd"])) if per["nsd"] else math.nan
            lines.append(f"{case.case:<{case_width}}  {_fmt(dice_mean)}  {_fmt(nsd_mean)}")
        if self.missing_predictions:
            lines += ["", f"{len(self.missing_predictions)} reference case(s) without a prediction (not evaluated): "
                      + ", ".join(self.missing_predictions)]  # fmt: skip
        return "\n".join(lines)

    def _tolerance_text(self) -> str:
        if self.tolerances is None:
            return f"{self.tolerance_mm:g} mm"
        return self.tolerances.describe()


def _fmt(value: float) -> str:
    return f"{'-':>7}" if math.isnan(value) else f"{value:7.4f}"


def _fmt_csv(value: float | None) -> str:
    return "" if value is None or math.isnan(value) else f"{value:.6f}"


def _json_safe(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, (float, np.floating)):
        return None if math.isnan(value) else float(value)
    if isinstance(value, np.integer):
        return int(value)
    return value


def write_evaluation(evaluation: Evaluation, json_path: str | os.PathLike) -> tuple[Path, Path]:
    """Write the JSON file and a CSV beside it (same name, ``.csv``); returns both paths."""
    json_path = Path(json_path)
    csv_path = json_path.with_suffix(".csv")
    atomic_write_json(json_path, evaluation.to_dict(), allow_nan=False)
    atomic_write_text(csv_path, evaluation.csv_text())
    return json_path, csv_path


# ----------------------------------------------------------------------------- reading and geometry


def _reader_for(ending: str, example: Path) -> Any:
    import contextlib

    from nnunetv2.imageio.reader_writer_registry import determine_reader_writer_from_file_ending

    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        try:
            return determine_reader_writer_from_file_ending(ending, str(example), verbose=False)()
        except RuntimeError as err:
            raise ValueError(f"no nnU-Net reader can open {example} ({ending} files)") from err


def _read(reader: Any, path: Path) -> tuple[np.ndarray, dict]:
    import contextlib

    check_complete(path)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            seg, properties = reader.read_seg(str(path))
    except Exception as err:
        raise ValueError(f"cannot read {path}: {err}") from err
    if seg.shape[0] != 1:
        raise ValueError(f"{path} holds {seg.shape[0]} channels; a label map has one")
    if not np.allclose(seg, np.round(seg)):
        raise ValueError(f"{path} holds non-integer values; evaluate label maps, not probabilities or images")
    return seg[0].astype(np.int32), properties


def _geometry_problems(pred_props: dict, ref_props: dict, pred_shape: tuple, ref_shape: tuple) -> list[str]:
    problems = []
    if pred_shape != ref_shape:
        problems.append(f"size {pred_shape[::-1]} vs {ref_shape[::-1]} (x, y, z)")
        return problems
    sp, sr = np.asarray(pred_props.get("spacing", ())), np.asarray(ref_props.get("spacing", ()))
    if sp.shape == sr.shape and not np.allclose(sp, sr, rtol=1e-4, atol=1e-6):
        problems.append(f"spacing {tuple(sp[::-1].tolist())} vs {tuple(sr[::-1].tolist())} mm (x, y, z)")
    ip, ir = pred_props.get("sitk_stuff"), ref_props.get("sitk_stuff")
    if ip and ir:
        if not np.allclose(ip["origin"], ir["origin"], atol=1e-3):
            problems.append(f"origin {tuple(ip['origin'])} vs {tuple(ir['origin'])} mm")
        if not np.allclose(ip["direction"], ir["direction"], atol=1e-4):
            problems.append(f"direction {tuple(ip['direction'])} vs {tuple(ir['direction'])}")
    ap = (pred_props.get("nibabel_stuff") or {}).get("original_affine")
    ar = (ref_props.get("nibabel_stuff") or {}).get("original_affine")
    if ap is not None and ar is not None and not np.allclose(ap, ar, atol=1e-3):
        problems.append(f"affine {np.asarray(ap).tolist()} vs {np.asarray(ar).tolist()}")
    return problems


def evaluate_case(
    prediction: Path,
    reference: Path,
    labels: LabelSet | None,
    tolerance_mm: float | Mapping[str, float] | Tolerances = DEFAULT_TOLERANCE_MM,
    reader: Any = None,
) -> CaseResult:
    """Dice and NSD of every class for one prediction/reference pair (ValueError on geometry mismatch).

    ``tolerance_mm``: the NSD tolerance of every class, or per class (:meth:`Tolerances.of`)."""
    from nnunetv2.evaluation.evaluate_predictions import region_or_label_to_mask

    tolerances = Tolerances.of(tolerance_mm)

    ending = image_ending(prediction) or ""
    reader = reader or _reader_for(ending, prediction)
    pred, pred_props = _read(reader, prediction)
    ref, ref_props = _read(reader, reference)
    problems = _geometry_problems(pred_props, ref_props, pred.shape, ref.shape)
    if problems:
        raise ValueError(
            f"prediction {prediction} and reference {reference} are not on the same grid: "
            + "; ".join(problems)
            + ". Predictions must keep the reference image's geometry (mednext predict does); resample the "
            "prediction onto the reference (nearest neighbour) or pair the right files."
        )
    spacing = [float(s) for s in pred_props.get("spacing", [1.0] * pred.ndim)]
    if len(spacing) != pred.ndim:
        spacing = [1.0] * pred.ndim
    if labels is None:
        values = sorted((set(np.unique(pred).tolist()) | set(np.unique(ref).tolist())) - {0})
        classes = {_inferred_name(v): (v,) for v in values}
        ignore = None
    else:
        classes, ignore = labels.classes, labels.ignore
    ignore_mask = ref == ignore if ignore is not None else None
    result = CaseResult(_case_id(prediction, ending), str(prediction), str(reference))
    for name, values in classes.items():
        region = values[0] if len(values) == 1 else values
        pred_mask = region_or_label_to_mask(pred, region)
        ref_mask = region_or_label_to_mask(ref, region)
        if ignore_mask is not None:
            pred_mask = pred_mask & ~ignore_mask
            ref_mask = ref_mask & ~ignore_mask
        result.metrics[name] = {
            "dice": dice(pred_mask, ref_mask),
            "nsd": normalized_surface_dice(pred_mask, ref_mask, spacing, tolerances.for_class(name)),
            "voxels_prediction": int(np.count_nonzero(pred_mask)),
            "voxels_reference": int(np.count_nonzero(ref_mask)),
        }
    return result


def _case_id(path: Path, ending: str) -> str:
    return path.name[: -len(ending)] if ending else path.stem


def _images(folder: Path, ending: str) -> dict[str, Path]:
    return {
        _case_id(p, ending): p
        for p in sorted(folder.iterdir())
        if p.is_file() and not p.name.startswith(".") and image_ending(p) == ending.lower()
    }


def _detect_ending(folder: Path) -> str:
    endings = sorted({e for p in folder.iterdir() if p.is_file() and (e := image_ending(p)) is not None})
    if not endings:
        raise ValueError(f"{folder} holds no label maps (files ending in {', '.join(IMAGE_ENDINGS)})")
    if len(endings) > 1:
        raise ValueError(
            f"{folder} holds files of several endings ({', '.join(endings)}); give --labels dataset.json "
            "(its 'file_ending' decides) or keep one kind of file in the folder"
        )
    return endings[0]


def evaluate_folders(
    prediction_folder: str | os.PathLike,
    reference_folder: str | os.PathLike,
    labels: str | os.PathLike | LabelSet | None = None,
    tolerance_mm: float | Mapping[str, float] | Tolerances = DEFAULT_TOLERANCE_MM,
    strict: bool = False,
    progress: Any = None,
) -> Evaluation:
    """Evaluate every prediction in ``prediction_folder`` against the same-named file in ``reference_folder``.

    ``labels``: a dataset.json (its 'labels', regions and 'ignore' label, and 'file_ending'), a
    :class:`LabelSet`, or None: the prediction folder's dataset.json if it has one (mednext predict
    writes it), else every non-zero value found (classes ``label_<value>``). ``tolerance_mm``: the NSD
    tolerance in mm of every class, or per class: a mapping class name -> mm (other classes 2 mm) or
    :class:`Tolerances`; a name that is not one of the classes is an error. Reference cases without
    a prediction are listed in ``missing_predictions``; with ``strict`` they are an error, as is a
    prediction without a reference.
    """
    pred_dir, ref_dir = Path(prediction_folder), Path(reference_folder)
    for name, folder in (("prediction", pred_dir), ("reference", ref_dir)):
        if not folder.is_dir():
            raise FileNotFoundError(f"{name} folder {folder} does not exist")
    tolerances = Tolerances.of(tolerance_mm)
    ending = None
    if labels is None and (pred_dir / "dataset.json").is_file():
        labels = pred_dir / "dataset.json"
    if labels is not None and not isinstance(labels, LabelSet):
        labels_path = Path(labels)
        if not labels_path.is_file():
            raise FileNotFoundError(f"--labels {labels_path} does not exist")
        ending = json.loads(labels_path.read_text(encoding="utf-8")).get("file_ending")
        labels = LabelSet.from_dataset_json(labels_path)
    if isinstance(labels, LabelSet):
        tolerances.check_names(labels.classes, labels.source)
    else:
        _check_inferred_names(tolerances)
    ending = ending or _detect_ending(pred_dir)
    predictions = _images(pred_dir, ending)
    references = _images(ref_dir, ending)
    if not predictions:
        raise ValueError(f"{pred_dir} holds no '{ending}' predictions")
    orphans = sorted(set(predictions) - set(references))
    if orphans:
        raise ValueError(
            f"{len(orphans)} prediction(s) have no reference '{ending}' file of the same name in {ref_dir}: "
            + ", ".join(orphans[:10])
            + (" ..." if len(orphans) > 10 else "")
            + ". Give the folder that holds the reference label maps (e.g. labelsTr)."
        )
    missing = sorted(set(references) - set(predictions))
    if missing and strict:
        raise ValueError(
            f"{len(missing)} reference case(s) in {ref_dir} have no prediction in {pred_dir} (pass --chill to "
            "evaluate the predictions there are): " + ", ".join(missing[:20]) + (" ..." if len(missing) > 20 else "")
        )
    reader = _reader_for(ending, next(iter(predictions.values())))
    cases = []
    for case, path in predictions.items():
        cases.append(evaluate_case(path, references[case], labels, tolerances, reader))
        if progress is not None:
            progress(cases[-1])
    if isinstance(labels, LabelSet):
        label_set = labels
    else:
        label_set = _inferred_labels(cases)
        tolerances.check_names(label_set.classes, "the label maps (label_<value> per value found)")
    per_class = tolerances if tolerances.per_class_mm else None
    return Evaluation(str(pred_dir), str(ref_dir), ending, tolerances.default_mm, label_set, cases, missing, per_class)


def _check_inferred_names(tolerances: Tolerances) -> None:
    """Without a dataset.json the classes are ``label_<value>``: refuse other names before reading files."""
    bad = [name for name in tolerances.per_class_mm if not re.fullmatch(r"label_\d+", name)]
    if bad:
        raise ValueError(
            f"--tolerance names class(es) {', '.join(map(repr, bad))}, but without a dataset.json (--labels, or "
            "one in the prediction folder) the classes are the label values found, named label_<value> (e.g. "
            "label_1=1); give --labels dataset.json to use its names"
        )


def write_engine_summary(evaluation: Evaluation, path: str | os.PathLike, num_processes: int = 1) -> Path:
    """Write nnU-Net's ``summary.json`` for the predictions of ``evaluation``, computed by the engine's
    own evaluation (``compute_metrics_on_folder``), which ``find_best_configuration`` and nnU-Net's
    tools read: its Dice, IoU and voxel counts per case and class or region. Returns ``path``."""
    from nnunetv2.evaluation.evaluate_predictions import compute_metrics_on_folder, save_summary_json

    predictions = _images(Path(evaluation.prediction_folder), evaluation.file_ending)
    regions_or_labels = [v[0] if len(v) == 1 else tuple(v) for v in evaluation.labels.classes.values()]
    reader = _reader_for(evaluation.file_ending, next(iter(predictions.values())))
    with contextlib.redirect_stdout(io.StringIO()):
        result = compute_metrics_on_folder(
            evaluation.reference_folder, evaluation.prediction_folder, None, reader, evaluation.file_ending,
            regions_or_labels, evaluation.labels.ignore, max(1, num_processes), chill=True,
        )  # fmt: skip
    return atomic_write(path, lambda tmp: save_summary_json(result, str(tmp)))


def _inferred_labels(cases: Iterable[CaseResult]) -> LabelSet:
    names: set[str] = set()
    for case in cases:
        names |= set(case.metrics)
    values = sorted(int(n.split("_", 1)[1]) for n in names)
    classes = {_inferred_name(v): (v,) for v in values}
    # classes a case lacks entirely were absent from both files there: no score, as in a labelled run
    for case in cases:
        for name in classes:
            case.metrics.setdefault(
                name, {"dice": math.nan, "nsd": math.nan, "voxels_prediction": 0, "voxels_reference": 0}
            )
        case.metrics = {name: case.metrics[name] for name in classes}
    return LabelSet(classes)
