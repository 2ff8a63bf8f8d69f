"""The MR features the QA's in-distribution check compares with the training set (``reference.FEATURE_SET``).

Computed from the MR as the model receives it (``preprocessing.prepare_mr``: on the model grid,
normalised, with its body mask), with the checkpoint's own MR encoder, on the whole volume (as in
training): per channel, the mean and standard deviation inside the body of the encoder's first block
and of its output, then the histogram of the normalised MR inside the body.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as functional

from sct_model.networks import MRConditionEncoder
from sct_model.preprocessing import ModelInput
from sct_model.reference import mr_histogram


@torch.inference_mode()
def mr_features(
    encoder: MRConditionEncoder, model_input: ModelInput, mr_range: tuple[float, float], device: torch.device | str
) -> np.ndarray:
    """The feature vector (float64) of ``model_input`` (see the module docstring), in ``feature_names`` order."""
    mr = torch.from_numpy(np.ascontiguousarray(model_input.mr_unit.array, dtype=np.float32))[None, None].to(device)
    body_array = np.asarray(model_input.body_mask.array, dtype=bool)
    body = torch.from_numpy(body_array)[None, None].to(device)
    first = encoder.layers[0](mr)
    encoding = encoder.layers[1:](first)
    values = _channel_statistics(first, body) + _channel_statistics(encoding, body)
    histogram = mr_histogram(model_input.mr_unit.array, body_array, mr_range)
    return np.concatenate([np.asarray(values, dtype=np.float64), histogram])


def _channel_statistics(activations: torch.Tensor, body: torch.Tensor) -> list[float]:
    """Mean and standard deviation of each channel of ``activations`` (1, C, z, y, x) inside ``body``
    (1, 1, Z, Y, X), which is area-downsampled to the activations' grid and thresholded at 0.5.
    An empty body gives zeros."""
    mask = functional.interpolate(body.float(), size=tuple(activations.shape[2:]), mode="area")[0, 0] > 0.5
    inside = activations[0][:, mask].double()  # (C, voxels in the body)
    if inside.shape[1] == 0:
        return [0.0] * (2 * int(activations.shape[1]))
    means = inside.mean(dim=1)
    stds = inside.std(dim=1, unbiased=False)
    return [float(v) for pair in zip(means.tolist(), stds.tolist(), strict=True) for v in pair]
