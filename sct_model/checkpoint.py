"""One file that holds everything inference needs, and nothing that executes code when loaded.

The file is ``torch.save`` of a dict of plain types (str, int, float, bool, None, lists, tuples,
dicts) and tensors, loaded with ``torch.load(weights_only=True)``::

    {
      "format": "sct-node/ldm-checkpoint",
      "format_version": 1,
      "metadata": {                      # plain types only (JSON-serialisable)
        "model_name", "model_version", "intended_use", "code_version", "created_utc",
        "training_data": {...},          # free-form description (data set, regions, cases, epochs)
        "scale_factor": float,           # latent = scale_factor * autoencoder latent mean
        "latent_patch_shape": [z, y, x], # training patch on the latent grid, in tensor (numpy) order:
                                         # the sliding-window size
        "preprocessing": {...},          # PreprocessingConfig: spacing, MR normalisation, HU range
        "model": {"autoencoder": {...}, "mr_encoder": {...}, "unet": {...}, "scheduler": {...}},
        "qa_reference": {...},           # optional: the training data's statistics for the node's QA
                                         # checks (sct_model.reference.TrainingReference); absent in
                                         # checkpoints made before it, which then fail the in-distribution check
      },
      "state": {"autoencoder": {name: tensor}, "mr_encoder": {...}, "unet": {...}},
      "payload_sha256": hex,             # over the metadata (canonical JSON) and every tensor's bytes
    }

The payload digest catches a corrupt file that still unpickles; :func:`sha256_of` is the file's
own SHA-256, which the node records with every sCT.

For a training script (the conventions the sampler relies on)::

    networks = preset("paper").build()                 # sct_model.networks
    mr = prepare_mr(mr_volume, preprocessing, networks.config.size_multiple)   # sct_model.preprocessing
    ct = resample_to_grid(ct_volume, mr.mr_unit.grid, default_value=HU_MIN)
    mr_unit = torch.from_numpy(mr.mr_unit.array)[None, None]          # (N, C, z, y, x): numpy order
    ct_unit = torch.from_numpy(hu_to_unit(ct.array, preprocessing))[None, None]
    latent = networks.encode_ct(ct_unit) * scale_factor                # scale_factor ~ 1 / latent std
    scheduler = networks.config.scheduler.build_training_scheduler()
    noisy = scheduler.add_noise(latent, noise, timesteps)
    prediction = networks.denoise(noisy, timesteps, networks.encode_mr(mr_unit))
    ...
    save_checkpoint(Checkpoint.from_networks(networks, scale_factor=scale_factor,
                    preprocessing=preprocessing, latent_patch_shape=(32, 32, 32),
                    model_name="sct-ldm-demo", model_version="1", training_data={...}), path)
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import io
import json
import logging
import math
import os
import pickle
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from sct_model import __version__
from sct_model.networks import ModelConfig, SCTNetworks
from sct_model.preprocessing import PreprocessingConfig
from sct_model.reference import TrainingReference

log = logging.getLogger(__name__)

FORMAT = "sct-node/ldm-checkpoint"
FORMAT_VERSION = 1
SUPPORTED_FORMAT_VERSIONS = (1,)
NETWORK_NAMES = ("autoencoder", "mr_encoder", "unet")

StateDict = dict[str, torch.Tensor]


class CheckpointError(Exception):
    """A checkpoint cannot be used: missing, corrupt, truncated, another format or version, inconsistent."""


@dataclasses.dataclass(frozen=True, eq=False)
class Checkpoint:
    """Everything inference needs. ``created_utc`` and ``code_version`` are filled in when saved."""

    model: ModelConfig
    autoencoder_state: StateDict
    mr_encoder_state: StateDict
    unet_state: StateDict
    scale_factor: float
    preprocessing: PreprocessingConfig
    latent_patch_shape: tuple[int, int, int]
    model_name: str = "sct-ldm"
    model_version: str = "0"
    intended_use: str = "research use only, not for clinical use"
    training_data: dict[str, Any] = dataclasses.field(default_factory=dict)
    qa_reference: TrainingReference | None = None  # the training data's statistics (sct-train qa-reference)
    code_version: str = __version__
    created_utc: str = ""
    format_version: int = FORMAT_VERSION
    file_sha256: str = ""  # SHA-256 of the file it was loaded from ("" when built in memory); not saved

    def __post_init__(self) -> None:
        if not (math.isfinite(self.scale_factor) and self.scale_factor > 0):
            raise ValueError(f"scale_factor must be a positive finite number, got {self.scale_factor}")
        patch = tuple(int(n) for n in self.latent_patch_shape)
        if len(patch) != 3 or any(n < 1 or n % self.model.unet.downsample_factor for n in patch):
            raise ValueError(
                f"latent_patch_shape {self.latent_patch_shape} must be three positive multiples of the UNet "
                f"downsampling factor {self.model.unet.downsample_factor}"
            )
        object.__setattr__(self, "latent_patch_shape", patch)
        object.__setattr__(self, "scale_factor", float(self.scale_factor))
        try:
            json.dumps(self.training_data)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"training_data must hold plain JSON types only: {exc}") from exc

    @classmethod
    def from_networks(cls, networks: SCTNetworks, **fields: Any) -> Checkpoint:
        """A checkpoint of ``networks`` (their config and state dicts); ``fields`` are the other fields."""
        return cls(
            model=networks.config,
            autoencoder_state=networks.autoencoder.state_dict(),
            mr_encoder_state=networks.mr_encoder.state_dict(),
            unet_state=networks.unet.state_dict(),
            **fields,
        )

    def state(self, network: str) -> StateDict:
        return {
            "autoencoder": self.autoencoder_state,
            "mr_encoder": self.mr_encoder_state,
            "unet": self.unet_state,
        }[network]

    def build_networks(self, *, device: torch.device | str = "cpu", use_flash_attention: bool = False) -> SCTNetworks:
        """The networks with their weights, in eval mode on ``device``."""
        networks = self.model.build(use_flash_attention=use_flash_attention)
        self._load_states(networks)
        return networks.to(device).eval()

    def check_states(self) -> None:
        """Raise :class:`CheckpointError` unless every state dict fits its network (names and shapes)."""
        with torch.device("meta"):
            networks = self.model.build()
        self._load_states(networks, assign=True)

    def _load_states(self, networks: SCTNetworks, *, assign: bool = False) -> None:
        for name in NETWORK_NAMES:
            module = getattr(networks, name)
            try:
                module.load_state_dict(self.state(name), strict=True, assign=assign)
            except RuntimeError as exc:
                raise CheckpointError(f"the {name} weights do not fit the {name} config: {exc}") from exc

    def metadata(self) -> dict[str, Any]:
        optional = {"qa_reference": self.qa_reference.to_dict()} if self.qa_reference is not None else {}
        return {
            "model_name": self.model_name,
            "model_version": self.model_version,
            "intended_use": self.intended_use,
            "code_version": self.code_version,
            "created_utc": self.created_utc,
            "training_data": self.training_data,
            "scale_factor": self.scale_factor,
            "latent_patch_shape": list(self.latent_patch_shape),
            "preprocessing": self.preprocessing.to_dict(),
            "model": self.model.to_dict(),
            **optional,
        }


def _plain_state(state: Mapping[str, torch.Tensor]) -> StateDict:
    return {str(k): v.detach().to("cpu").contiguous().clone() for k, v in state.items()}


def _payload_digest(metadata: Mapping[str, Any], states: Mapping[str, Mapping[str, torch.Tensor]]) -> str:
    digest = hashlib.sha256()
    digest.update(json.dumps(metadata, sort_keys=True, separators=(",", ":")).encode())
    for network in sorted(states):
        for name in sorted(states[network]):
            tensor = states[network][name].detach().to("cpu").contiguous()
            digest.update(f"\n{network}/{name}:{tensor.dtype}:{tuple(tensor.shape)}\n".encode())
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def save_checkpoint(checkpoint: Checkpoint, path: str | Path) -> str:
    """Write ``checkpoint`` to ``path`` atomically (temporary file, rename); returns the file's SHA-256."""
    path = Path(path)
    checkpoint = dataclasses.replace(
        checkpoint,
        code_version=__version__,
        created_utc=checkpoint.created_utc or dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        format_version=FORMAT_VERSION,
    )
    checkpoint.check_states()  # refuse to write weights that do not fit their configs
    metadata = checkpoint.metadata()
    states = {name: _plain_state(checkpoint.state(name)) for name in NETWORK_NAMES}
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "metadata": metadata,
        "state": states,
        "payload_sha256": _payload_digest(metadata, states),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=path.name, suffix=".tmp", dir=path.parent)
    os.close(handle)
    try:
        torch.save(payload, temporary)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    sha256 = sha256_of(path)
    log.info(
        "saved checkpoint %s (%s %s, sha256 %s)",
        path,
        checkpoint.model_name,
        checkpoint.model_version,
        sha256,
    )
    return sha256


def _require(mapping: Any, key: str, kind: type | tuple[type, ...], where: str) -> Any:
    if not isinstance(mapping, Mapping) or key not in mapping:
        raise CheckpointError(f"checkpoint is missing {where}{key!r}")
    value = mapping[key]
    if not isinstance(value, kind):
        raise CheckpointError(f"checkpoint {where}{key!r} has the wrong type {type(value).__name__}")
    return value


def load_checkpoint(path: str | Path) -> Checkpoint:
    """The checkpoint in ``path`` (with its file's SHA-256 in ``file_sha256``).

    Raises :class:`CheckpointError` naming the problem when it cannot be used: missing file, corrupt or
    truncated file, unsafe content, another format, an unsupported format version, missing or
    inconsistent settings, weights that do not fit their networks, or a content digest mismatch.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    data = path.read_bytes()  # hashed and loaded from the same bytes
    try:
        payload = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"{path}: refused by the safe loader (it holds objects other than plain types and tensors, or is "
            f"corrupt): {exc}"
        ) from exc
    except Exception as exc:  # noqa: BLE001 - whatever the reader trips over in a damaged file
        raise CheckpointError(f"{path}: not a readable checkpoint (corrupt or truncated file): {exc}") from exc
    if not isinstance(payload, Mapping) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not an sct-node checkpoint (no {FORMAT!r} format marker)")
    version = payload.get("format_version")
    if version not in SUPPORTED_FORMAT_VERSIONS:
        raise CheckpointError(
            f"{path}: checkpoint format version {version!r} is not supported by sct_model {__version__} "
            f"(supported: {', '.join(map(str, SUPPORTED_FORMAT_VERSIONS))})"
        )
    metadata = _require(payload, "metadata", Mapping, "")
    states_raw = _require(payload, "state", Mapping, "")
    states: dict[str, StateDict] = {}
    for name in NETWORK_NAMES:
        state = _require(states_raw, name, Mapping, "state/")
        if not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
            raise CheckpointError(f"checkpoint state/{name!r} must map names to tensors")
        states[name] = dict(state)
    expected_digest = _require(payload, "payload_sha256", str, "")
    if _payload_digest(metadata, states) != expected_digest:
        raise CheckpointError(f"{path}: content digest mismatch: the file is corrupt or was altered")
    try:
        checkpoint = Checkpoint(
            model=ModelConfig.from_dict(_require(metadata, "model", Mapping, "metadata/")),
            autoencoder_state=states["autoencoder"],
            mr_encoder_state=states["mr_encoder"],
            unet_state=states["unet"],
            scale_factor=float(_require(metadata, "scale_factor", (int, float), "metadata/")),
            preprocessing=PreprocessingConfig.from_dict(_require(metadata, "preprocessing", Mapping, "metadata/")),
            latent_patch_shape=tuple(_require(metadata, "latent_patch_shape", (list, tuple), "metadata/")),
            model_name=_require(metadata, "model_name", str, "metadata/"),
            model_version=_require(metadata, "model_version", str, "metadata/"),
            intended_use=_require(metadata, "intended_use", str, "metadata/"),
            training_data=dict(_require(metadata, "training_data", Mapping, "metadata/")),
            qa_reference=_qa_reference(metadata, path),
            code_version=_require(metadata, "code_version", str, "metadata/"),
            created_utc=_require(metadata, "created_utc", str, "metadata/"),
            format_version=int(version),
            file_sha256=hashlib.sha256(data).hexdigest(),
        )
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: inconsistent checkpoint settings: {exc}") from exc
    checkpoint.check_states()
    return checkpoint


def _qa_reference(metadata: Mapping[str, Any], path: Path) -> TrainingReference | None:
    if "qa_reference" not in metadata:
        return None
    try:
        return TrainingReference.from_dict(_require(metadata, "qa_reference", Mapping, "metadata/"))
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: the QA reference (training data statistics) is unreadable: {exc!r}") from exc


def sha256_of(path: str | Path, chunk_bytes: int = 1 << 20) -> str:
    """The SHA-256 (hex) of the file at ``path``."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()
