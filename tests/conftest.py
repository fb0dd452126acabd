"""Shared test fixtures."""

import os

import pytest
import torch

_ENGINE_VARS = ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")
_ORIGINAL = {var: os.environ.get(var) for var in _ENGINE_VARS}  # the user's, before any test ran


def _restore_engine_vars() -> None:
    from mednext.pipeline import workdir

    for var, value in _ORIGINAL.items():
        if value is None:
            os.environ.pop(var, None)
        else:
            os.environ[var] = value
    workdir._SET_HERE.clear()


@pytest.fixture(autouse=True)
def _fresh_engine_folders():
    """Every test starts with the engine's folder variables as the user had them: the pipeline
    points them at a test's working folder, and a fixture's monkeypatch teardown could otherwise
    restore one test's folder into the next test (seen: the demo test wrote into another test's)."""
    _restore_engine_vars()
    yield
    _restore_engine_vars()


@pytest.fixture(autouse=True)
def _settings_from_environment():
    """Every test starts with mednext's switches as the environment gives them, and a setter or
    ``config.override`` in one test does not reach the next."""
    from mednext import config

    config.reload()
    yield
    config.reload()


@pytest.fixture(autouse=True)
def _same_threads_after():
    """A test (or the CLI code it runs) that sets torch's thread count does not pass it on to the next
    test; seen: one thread left behind changed which CPU conv kernels later tests ran."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.fixture
def one_thread():
    """One intra-op thread: on a shared CPU, OpenMP barriers of two threads cost more than they save."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
