"""Fault injection: hostile and unlucky inputs, killed runs, failing disks.

The helpers that fabricate datasets and trained models live beside the pipeline's tests."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "pipeline"))


@pytest.fixture(autouse=True)
def _one_process_one_thread():
    from mednext.pipeline.workdir import COMPILE, DEFAULT_PROCESSES, engine_setting

    with engine_setting(DEFAULT_PROCESSES, 1), engine_setting(COMPILE, 0):
        torch.set_num_threads(1)
        yield
