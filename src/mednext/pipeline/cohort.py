"""Predicting a cohort: parts, continuing, progress and the overlap of reading, network and writing.

``mednext predict`` on a folder of hundreds of scans runs three stages per case: read and
preprocess (the plans' reader, the engine's preprocessor), the network's sliding window, and
export (the engine's resampling back to the input's grid, argmax, writing the file).
:func:`run_cases` can keep one case in each stage at once: while the network segments case *k*, a
reader thread prepares case *k+1* and a writer thread exports case *k-1*, with at most three cases
in memory. That pays where the network runs on a GPU. On the CPU the network's threads already use
every core, and any other busy thread makes them wait for each other: there the stages run one
after the other (the measurements are in docs/benchmarks.md).

Splitting a cohort across machines (:func:`select_part`) takes every ``num_parts``-th case of the
sorted case list, as nnU-Net's ``-num_parts/-part_id`` do. Each run writes a record of its settings
(:func:`record_name`) before it writes any segmentation; ``--continue-prediction`` skips the cases
that a record with the same settings lists and whose files are all present (every output is
written atomically, so a present file is a whole one), and refuses a folder whose records name
other settings: segmentations of two models in one folder would look alike and mean different things.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from mednext.pipeline.io import InputCase

RECORD_PREFIX = "mednext_predict"
# Settings that change what a segmentation is; a continued prediction must use the same.
RECORD_SETTINGS = ("results_folder", "folds", "checkpoint", "tta", "step_size", "crop_body")
# Non-terminal output: a line about the windows of a long case at most this often (seconds).
WINDOW_LOG_INTERVAL_S = 30.0
# Terminal output: a second bar for the windows of cases with at least this many network forwards.
WINDOW_BAR_MIN_FORWARDS = 8


def check_parts(num_parts: int, part_id: int) -> None:
    """A ValueError unless ``0 <= part_id < num_parts``."""
    if num_parts < 1:
        raise ValueError(f"--num-parts {num_parts} must be at least 1")
    if not 0 <= part_id < num_parts:
        raise ValueError(
            f"--part-id {part_id} must be between 0 and {num_parts - 1} for --num-parts {num_parts} "
            "(run one command per part, part ids 0 to num_parts-1)"
        )


def select_part(cases: Sequence[InputCase], num_parts: int = 1, part_id: int = 0) -> list[InputCase]:
    """Part ``part_id`` of ``num_parts``: every ``num_parts``-th case of the cases sorted by name,
    starting at ``part_id`` (nnU-Net's split, so parts are alike in size and together hold every case)."""
    check_parts(num_parts, part_id)
    ordered = sorted(cases, key=lambda c: c.case_id)
    return ordered[part_id::num_parts]


def record_name(num_parts: int = 1, part_id: int = 0) -> str:
    """``mednext_predict.json`` for a whole run, ``mednext_predict.part-K-of-N.json`` for part K."""
    if num_parts == 1:
        return f"{RECORD_PREFIX}.json"
    return f"{RECORD_PREFIX}.part-{part_id}-of-{num_parts}.json"


def case_outputs(out_dir: Path, case_id: str, ending: str, save_probabilities: bool) -> list[Path]:
    """The files a finished case has in ``out_dir``."""
    files = [out_dir / f"{case_id}{ending}"]
    if save_probabilities:
        files += [out_dir / f"{case_id}.npz", out_dir / f"{case_id}.pkl"]
    return files


def finished_cases(
    out_dir: Path, settings: dict[str, Any], cases: Sequence[InputCase], ending: str, save_probabilities: bool
) -> set[str]:
    """The cases ``--continue-prediction`` may skip: listed, with the same source, by a record in
    ``out_dir`` whose settings equal ``settings``, and with all their files present.

    A record with other settings is a ValueError naming the record, the settings that differ and
    the fix; so is a segmentation present without any record (its origin is unknown)."""
    records = {}
    for path in sorted(out_dir.glob(f"{RECORD_PREFIX}*.json")):
        try:
            records[path] = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise ValueError(
                f"{path} cannot be read ({err}); --continue-prediction needs it to know which settings made the "
                "segmentations there: remove the folder's segmentations or predict into another folder"
            ) from err
    for path, record in records.items():
        differ = [k for k in RECORD_SETTINGS if record.get(k) != settings.get(k)]
        if differ:
            detail = "; ".join(f"{k}: {record.get(k)!r} there, {settings.get(k)!r} now" for k in differ)
            raise ValueError(
                f"--continue-prediction: {path} records segmentations made with other settings ({detail}). "
                "Continue with the same model and settings, or predict into another folder (-o)"
            )
    if not records:
        present = [c.case_id for c in cases if (out_dir / f"{c.case_id}{ending}").exists()]
        if present:
            raise ValueError(
                f"--continue-prediction: {out_dir} holds segmentations ({', '.join(present[:5])}"
                f"{', ...' if len(present) > 5 else ''}) but no {RECORD_PREFIX}*.json record of the settings "
                "that made them; predict into another folder (-o), or without --continue-prediction to redo them"
            )
        return set()
    sources = {}
    for record in records.values():
        sources.update(record.get("cases") or {})
    done = set()
    for case in cases:
        if sources.get(case.case_id) != case.source:
            continue
        if all(f.is_file() for f in case_outputs(out_dir, case.case_id, ending, save_probabilities)):
            done.add(case.case_id)
    return done


def _format_duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


class Progress:
    """Progress of a cohort: one line per finished case (count, time, time left), and for long
    cases the windows. ``bar``: tqdm bars on standard error (cases, and windows of long cases)
    instead of the periodic window lines; the case lines then go through tqdm's writer."""

    def __init__(self, total: int, log: Callable[[str], Any] = print, bar: bool = False, skipped: int = 0) -> None:
        self.total = total
        self.done = 0
        self.log = log
        self.skipped = skipped
        self.start = time.perf_counter()
        self._case_bar = None
        self._window_bar = None
        self._window_logged = 0.0
        self._case = ""
        if bar:
            from tqdm import tqdm

            self._tqdm = tqdm
            self._case_bar = tqdm(total=total, unit="case", file=sys.stderr, dynamic_ncols=True, position=0)

    def say(self, line: str) -> None:
        if self._case_bar is not None:
            self._tqdm.write(line, file=sys.stdout)
        else:
            self.log(line)

    def case_started(self, case_id: str) -> None:
        """The network starts on ``case_id`` (the name its window lines and bar carry)."""
        self._case = case_id

    def windows(self, done: int, total: int, fold: int = 0, folds: int = 1) -> None:
        """``done`` of ``total`` network forwards of the current case's sliding window (fold ``fold``
        of ``folds``)."""
        if self._case_bar is not None:
            if total < WINDOW_BAR_MIN_FORWARDS:
                return
            if self._window_bar is None or self._window_bar.total != total * folds:
                self._close_window_bar()
                self._window_bar = self._tqdm(
                    total=total * folds, unit="window", file=sys.stderr, dynamic_ncols=True, position=1,
                    leave=False, desc=self._case,
                )  # fmt: skip
            self._window_bar.n = fold * total + done
            self._window_bar.refresh()
            return
        now = time.perf_counter()
        if done == 1 and fold == 0:  # a case's first forward: its first line comes an interval later
            self._window_logged = now
        elif now - self._window_logged >= WINDOW_LOG_INTERVAL_S and done < total:
            self._window_logged = now
            of_fold = f" of fold {fold + 1}/{folds}" if folds > 1 else ""
            case = f"{self._case}: " if self._case else ""
            self.log(f"  {case}window batch {done}/{total}{of_fold}")

    def case_finished(self, case_id: str, target: Path, seconds: float) -> None:
        """``case_id`` is written to ``target``; ``seconds`` from the network's start on it."""
        self.done += 1
        self._close_window_bar()
        elapsed = time.perf_counter() - self.start
        left = elapsed / self.done * (self.total - self.done)
        tail = f", about {_format_duration(left)} left" if self.done < self.total else ""
        self.say(f"  [{self.done}/{self.total}] {case_id}: {target} ({seconds:.1f} s{tail})")
        if self._case_bar is not None:
            self._case_bar.update(1)

    def _close_window_bar(self) -> None:
        if self._window_bar is not None:
            self._window_bar.close()
            self._window_bar = None

    def close(self) -> None:
        self._close_window_bar()
        if self._case_bar is not None:
            self._case_bar.close()
            self._case_bar = None


def _one_torch_thread() -> None:
    # The background stages' torch operations run on one thread each: the network keeps the
    # cores it was given, rather than three OpenMP teams contending (spinning) for them.
    import torch

    torch.set_num_threads(1)


def run_cases(
    predictor: Any,
    cases: Sequence[InputCase],
    workspace: Path,
    place: Callable[[InputCase, list[Path]], Path],
    progress: Progress,
    save_probabilities: bool = False,
    crop_body: bool = False,
    overlap: bool = True,
) -> list[Path]:
    """Segment ``cases`` with ``predictor`` (a :class:`~mednext.pipeline.predictor.MedNeXtPredictor`)
    and return the segmentations in case order.

    Each case is exported into ``workspace`` and then handed to ``place(case, files)``, which moves
    the files into the output folder and returns the segmentation's final path. ``overlap``: read
    the next case and export the previous one in two background threads while the network runs;
    otherwise one stage after the other. Any error stops the run once the stages in flight end;
    cases already placed stay complete.
    """
    predictor.window_progress = progress.windows

    def export(case: InputCase, logits: Any, properties: dict, started: float) -> Path:
        files = predictor.export_case(logits, properties, workspace / case.case_id, save_probabilities)
        target = place(case, files)
        progress.case_finished(case.case_id, target, time.perf_counter() - started)
        return target

    def segment(case: InputCase, prepared: tuple[Any, dict]) -> tuple[Any, dict, float]:
        for note in case.notes:
            progress.say(f"  {case.case_id}: {note}")
        progress.case_started(case.case_id)
        started = time.perf_counter()
        data, properties = prepared
        return predictor.logits_of_prepared(data), properties, started

    written: list[Path] = []
    try:
        if not overlap:
            for case in cases:
                logits, properties, started = segment(case, predictor.prepare_case(case, crop_body))
                written.append(export(case, logits, properties, started))
            return written
        with (
            ThreadPoolExecutor(1, thread_name_prefix="mednext-read", initializer=_one_torch_thread) as reader,
            ThreadPoolExecutor(1, thread_name_prefix="mednext-write", initializer=_one_torch_thread) as writer,
        ):
            try:
                reading: Future | None = reader.submit(predictor.prepare_case, cases[0], crop_body) if cases else None
                writing: Future | None = None
                for i, case in enumerate(cases):
                    assert reading is not None
                    prepared = reading.result()
                    reading = (
                        reader.submit(predictor.prepare_case, cases[i + 1], crop_body) if i + 1 < len(cases) else None
                    )
                    logits, properties, started = segment(case, prepared)
                    del prepared
                    if writing is not None:
                        written.append(writing.result())
                    writing = writer.submit(export, case, logits, properties, started)
                    del logits
                if writing is not None:
                    written.append(writing.result())
            except BaseException:
                reader.shutdown(wait=True, cancel_futures=True)
                writer.shutdown(wait=True, cancel_futures=True)
                raise
        return written
    finally:
        predictor.window_progress = None
        progress.close()
