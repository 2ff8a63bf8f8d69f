"""load_predictor: the node's one entry point into sct_model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sct_model.baseline import BulkDensityBaseline
from sct_model.checkpoint import CheckpointError
from sct_model.factory import load_predictor
from sct_model.sampler import SCTSampler


def test_bulk_density_needs_no_checkpoint():
    predictor = load_predictor("bulk_density", None, "auto")
    assert isinstance(predictor, BulkDensityBaseline) and predictor.info.method == "bulk_density"


def test_diffusion_loads_the_checkpoint_on_the_device(checkpoint_path: Path):
    predictor = load_predictor("diffusion", checkpoint_path, "cpu")
    assert isinstance(predictor, SCTSampler)
    assert predictor.info.method == "diffusion" and predictor.info.device == "cpu"
    auto = load_predictor("diffusion", checkpoint_path, "auto")
    assert auto.info.device == ("cuda:0" if torch.cuda.is_available() else "cpu")


def test_unusable_checkpoint_and_unknown_method(tmp_path: Path):
    with pytest.raises(CheckpointError, match="not found"):
        load_predictor("diffusion", tmp_path / "absent.pt", "cpu")
    with pytest.raises(ValueError, match="unknown sCT method"):
        load_predictor("cyclegan", None, "cpu")
