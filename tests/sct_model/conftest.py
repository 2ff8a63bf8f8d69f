"""Fixtures for the sct_model tests (the data itself is made in ``phantom.py``)."""

from __future__ import annotations

from pathlib import Path

import pytest

from sct_model.checkpoint import save_checkpoint
from sct_model.networks import SchedulerConfig
from sct_model.volume import Volume
from tests.sct_model.phantom import HEAD_CENTRE_LPS, grid_around, head_mr, tiny_checkpoint


@pytest.fixture(scope="session")
def axial_head() -> Volume:
    """A 32³ axial head at 3 mm, centred on the head."""
    return head_mr(grid_around(HEAD_CENTRE_LPS, (32, 32, 32), (3.0, 3.0, 3.0)))


@pytest.fixture(scope="session")
def checkpoint_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A DDPM (DDIM-sampled, epsilon) tiny checkpoint file."""
    path = tmp_path_factory.mktemp("ckpt") / "tiny-ddpm.pt"
    save_checkpoint(tiny_checkpoint(), path)
    return path


@pytest.fixture(scope="session")
def rflow_checkpoint_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "tiny-rflow.pt"
    save_checkpoint(tiny_checkpoint(SchedulerConfig(kind="rflow", prediction_type="v_prediction")), path)
    return path
