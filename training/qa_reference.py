"""The QA reference of a checkpoint: its training cases' MR features and CT tissue composition.

``sct-train ldm`` computes it at the end of training from the training split; ``sct-train
qa-reference`` adds it to an existing checkpoint without retraining, from the cases the checkpoint
names as its training cases (``training_data["train_ids"]``) under ``--data``. The networks are not
changed; the file, and so its SHA-256, is (the reference is part of the checkpoint's verified
content). It samples one sCT per training case (the tissue envelope): minutes on a CPU for the
demo checkpoint's 105 phantoms, a GPU's work for a paper-size model.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tqdm import tqdm

from sct_model.checkpoint import Checkpoint, CheckpointError, load_checkpoint, save_checkpoint
from sct_model.features import mr_features
from sct_model.preprocessing import prepare_mr
from sct_model.reference import (
    FEATURE_SET,
    TrainingReference,
    feature_names,
    fit_feature_distribution,
    hu_histogram,
    tissue_fractions,
    tissue_statistics,
)
from sct_model.sampler import SCTSampler
from sct_model.volume import axial_grid_covering
from training.data import Case, DataError, find_cases, load_case

log = logging.getLogger(__name__)


DEFAULT_STEPS = 25  # the node's default sampling steps
SEED = 0
MIN_REFERENCE_CASES = 5  # fewer cases say nothing about a distribution


def compute_reference(
    checkpoint: Checkpoint,
    cases: Sequence[Case],
    *,
    description: str,
    device: str = "cpu",
    steps: int = DEFAULT_STEPS,
    progress: bool = True,
) -> TrainingReference:
    """The reference of ``checkpoint`` from its training ``cases``: the MR features (its own encoder),
    the tissue composition of the CTs inside their mask and of its own sCTs of the MRs (``steps``
    sampling steps, one sample, seed 0) inside the MR's body, as the node computes them."""
    if len(cases) < MIN_REFERENCE_CASES:
        raise DataError(f"a QA reference needs at least {MIN_REFERENCE_CASES} training cases, got {len(cases)}")
    sampler = SCTSampler(checkpoint, device=device)
    config = checkpoint.preprocessing
    encoder = checkpoint.model.mr_encoder
    names = feature_names(encoder.channels[0], encoder.out_channels)
    feature_rows, ct_fractions, ct_histograms, sct_fractions, sct_histograms = [], [], [], [], []
    for case in tqdm(cases, desc="QA reference", unit="case", disable=not progress):
        mr, ct, mask = load_case(case)
        model_input = prepare_mr(mr, config, checkpoint.model.size_multiple)
        feature_rows.append(mr_features(sampler.networks.mr_encoder, model_input, config.mr_output_range, device))
        ct_fractions.append(tissue_fractions(ct.array, mask.array))
        ct_histograms.append(hu_histogram(ct.array, mask.array))
        result = sampler.predict(mr, steps=steps, samples=1, seed=SEED, output_grid=axial_grid_covering(mr.grid))
        body = result.body_mask.array if result.body_mask is not None else mask.array
        sct_fractions.append(tissue_fractions(result.hu.array, body))
        sct_histograms.append(hu_histogram(result.hu.array, body))
    features = np.asarray(feature_rows)
    if features.shape[1] != len(names):
        raise ValueError(f"the encoder gave {features.shape[1]} features, {FEATURE_SET} names {len(names)}")
    return TrainingReference(
        cases=len(cases),
        description=description,
        features=fit_feature_distribution(features, names),
        tissues=tissue_statistics(
            np.asarray(ct_fractions),
            np.asarray(ct_histograms),
            np.asarray(sct_fractions),
            np.asarray(sct_histograms),
            steps,
        ),
    )


def training_cases(checkpoint: Checkpoint, data_root: Path) -> list[Case]:
    """The cases under ``data_root`` that ``checkpoint`` names as its training cases ("REGION/CASE")."""
    ids = checkpoint.training_data.get("train_ids")
    if not isinstance(ids, list) or not ids:
        raise CheckpointError(
            "the checkpoint does not list its training cases (training_data['train_ids']); "
            "compute its reference with the data split it was trained on (sct-train ldm does this itself)"
        )
    found = {f"{case.region}/{case.case_id}": case for case in find_cases(data_root)}
    missing = [case_id for case_id in ids if case_id not in found]
    if missing:
        raise DataError(
            f"{len(missing)} of the checkpoint's {len(ids)} training cases are not under {data_root} "
            f"(first: {', '.join(missing[:3])}): give --data the data set it was trained on"
        )
    return [found[case_id] for case_id in ids]


def add_reference(
    checkpoint_path: Path,
    data_root: Path,
    *,
    out_path: Path | None = None,
    device: str = "cpu",
    steps: int = DEFAULT_STEPS,
) -> tuple[Path, str, TrainingReference]:
    """Compute the reference of the checkpoint at ``checkpoint_path`` from its training cases under
    ``data_root`` and save the checkpoint with it (to ``out_path``, default: in place, atomically).
    Returns the path, the new file's SHA-256 and the reference."""
    checkpoint = load_checkpoint(checkpoint_path)
    cases = training_cases(checkpoint, data_root)
    description = f"{len(cases)} training cases listed in the checkpoint, read from {data_root}"
    reference = compute_reference(checkpoint, cases, description=description, device=device, steps=steps)
    target = out_path or checkpoint_path
    sha256 = save_checkpoint(dataclasses.replace(checkpoint, qa_reference=reference), target)
    log.info("QA reference of %d cases added: %s (sha256 %s)", len(cases), target, sha256)
    return Path(target), sha256, reference
