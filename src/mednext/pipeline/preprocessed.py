"""Preprocessed data is complete or refused.

The engine writes preprocessed cases one file at a time, straight under their final names, so a
``mednext plan`` that is killed half-way leaves a folder that looks usable: the engine's trainer
takes whatever cases it finds, and writes a five-fold split of them that later runs keep using.
So :func:`preprocess` records what it wrote in ``mednext_preprocessed.json`` beside the plans, last
and atomically, and :func:`check_preprocessed` (called before every training) refuses

- data whose record is missing (preprocessing did not finish, or another tool wrote it),
- case files that differ from the record (missing, extra, cut short or rewritten),
- a raw dataset whose cases changed since (added, removed, files of other sizes),
- a ``splits_final.json`` whose cases are not the preprocessed ones.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from nnunetv2.experiment_planning.plan_and_preprocess_api import preprocess_dataset

from mednext.errors import DatasetError
from mednext.files import atomic_write_json
from mednext.pipeline.datasets import dataset_id_of, raw_case_files
from mednext.pipeline.workdir import preprocessed_folder, raw_folder

__all__ = ["MANIFEST", "check_preprocessed", "check_splits", "preprocess"]

MANIFEST = "mednext_preprocessed.json"
FORMAT_VERSION = 1
MAX_NAMED = 8  # case ids named in one message
# the engine's files of one preprocessed case (blosc2 since nnunetv2 2.6; numpy before), longest first
CASE_FILE_SUFFIXES = ("_seg.b2nd", "_seg.npy", ".b2nd", ".npz", ".npy", ".pkl")


def _manifest(base: Path) -> dict[str, Any]:
    path = base / MANIFEST
    if not path.is_file():
        return {"format_version": FORMAT_VERSION, "data": {}}
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise DatasetError(f"{path} is damaged ({err}); run 'mednext plan {base.name}' again") from None
    if not isinstance(content, dict) or not isinstance(content.get("data"), dict):
        raise DatasetError(f"{path} is not a mednext preprocessing record; run 'mednext plan {base.name}' again")
    return content


def _case_files(data_dir: Path) -> dict[str, dict[str, int]]:
    """Case id -> {file name: size} of the engine's preprocessed case files (``<id>.pkl`` and the
    data files that share its id)."""
    files: dict[str, dict[str, int]] = {}
    ids = {p.name[: -len(".pkl")] for p in data_dir.glob("*.pkl")}
    for p in sorted(data_dir.iterdir()):
        if not p.is_file() or p.name.startswith("."):
            continue
        for suffix in CASE_FILE_SUFFIXES:
            if p.name.endswith(suffix) and p.name[: -len(suffix)] in ids:
                files.setdefault(p.name[: -len(suffix)], {})[p.name] = p.stat().st_size
                break
    return files


def _raw_sizes(raw: Path) -> dict[str, list[int]]:
    return {case: [Path(f).stat().st_size for f in paths] for case, paths in raw_case_files(raw).items()}


def _differences(found: Sequence[tuple[str, set[str]]]) -> str:
    """``"label: a, b; label: c"`` for the non-empty sets of ``(label, case ids)``, '' if all are empty."""
    return "; ".join(f"{label}: {_named(ids)}" for label, ids in found if ids)


def _named(ids: Sequence[str]) -> str:
    ids = sorted(ids)
    return ", ".join(ids[:MAX_NAMED]) + (f" and {len(ids) - MAX_NAMED} more" if len(ids) > MAX_NAMED else "")


def preprocess(
    dataset_name: str, plans_identifier: str, configurations: Sequence[str], num_processes: int, **engine_kwargs: Any
) -> None:
    """Run the engine's preprocessing of ``configurations`` and record what it wrote.

    The record of these configurations is removed first and written again only when the engine
    has finished, so an interrupted run leaves no record and training refuses the data."""
    base = preprocessed_folder() / dataset_name
    plans = json.loads((base / f"{plans_identifier}.json").read_text(encoding="utf-8"))
    identifiers = {c: plans["configurations"][c]["data_identifier"] for c in configurations}
    manifest = _manifest(base)
    for ident in identifiers.values():
        manifest["data"].pop(ident, None)
    atomic_write_json(base / MANIFEST, manifest)
    preprocess_dataset(
        dataset_id_of(dataset_name), plans_identifier, list(configurations), [num_processes] * len(configurations),
        **engine_kwargs,
    )  # fmt: skip
    raw = raw_folder() / dataset_name
    raw_sizes = _raw_sizes(raw) if (raw / "dataset.json").is_file() else None
    for configuration, ident in identifiers.items():
        manifest["data"][ident] = {
            "plans": plans_identifier,
            "configuration": configuration,
            "cases": _case_files(base / ident),
            "raw": raw_sizes,
        }
    atomic_write_json(base / MANIFEST, manifest)


def check_preprocessed(dataset_name: str, configuration: str, data_identifier: str) -> list[str]:
    """Refuse preprocessed data that is incomplete, changed, or older than its raw dataset (a
    DatasetError naming the cases and the fix); return its case ids."""
    base = preprocessed_folder() / dataset_name
    replan = f"run 'mednext plan {dataset_name} --configs {configuration}' again"
    entry = _manifest(base)["data"].get(data_identifier)
    if entry is None:
        raise DatasetError(
            f"the preprocessed data {base / data_identifier} is incomplete or unverified: no record of a finished "
            f"'mednext plan' for it in {base / MANIFEST} (the plan was interrupted or failed, or another tool "
            f"wrote the folder); {replan}"
        )
    recorded = entry["cases"]
    found = _case_files(base / data_identifier)
    missing = set(recorded) - set(found)
    extra = set(found) - set(recorded)
    changed = {c for c in set(recorded) & set(found) if recorded[c] != found[c]}
    differences = _differences((("missing", missing), ("not written by the plan", extra), ("changed", changed)))
    if differences:
        raise DatasetError(
            f"the preprocessed data {base / data_identifier} differs from what 'mednext plan' wrote "
            f"({differences}); {replan}"
        )
    raw = raw_folder() / dataset_name
    if entry.get("raw") is not None and (raw / "dataset.json").is_file():
        now = _raw_sizes(raw)
        before = entry["raw"]
        added, removed = set(now) - set(before), set(before) - set(now)
        resized = {c for c in set(now) & set(before) if now[c] != before[c]}
        differences = _differences((("added", added), ("removed", removed), ("files changed", resized)))
        if differences:
            raise DatasetError(
                f"the raw dataset {os.path.realpath(raw)} changed since it was preprocessed ({differences}); {replan}"
            )
    return sorted(recorded)


def check_splits(dataset_name: str, cases: Sequence[str]) -> None:
    """Refuse a ``splits_final.json`` whose folds do not cover exactly ``cases`` (the preprocessed ones)."""
    path = preprocessed_folder() / dataset_name / "splits_final.json"
    if not path.is_file():
        return
    fix = f"delete {path} to have a new five-fold split of the {len(cases)} preprocessed cases written, or fix it"
    try:
        splits = json.loads(path.read_text(encoding="utf-8"))
        named = {c for fold in splits for part in ("train", "val") for c in fold[part]}
    except (json.JSONDecodeError, TypeError, KeyError) as err:
        raise DatasetError(f"{path} is not a list of {{'train': [...], 'val': [...]}} folds ({err}); {fix}") from None
    unknown, unused = named - set(cases), set(cases) - named
    differences = _differences((("cases not in the preprocessed data", unknown), ("cases in no fold", unused)))
    if differences:
        raise DatasetError(f"{path} does not match the dataset's cases ({differences}); {fix}")
