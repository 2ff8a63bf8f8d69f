"""Checkpoint round trip, and a clear CheckpointError for every way a file can be unusable."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

import sct_model
from sct_model.checkpoint import (
    FORMAT,
    Checkpoint,
    CheckpointError,
    _payload_digest,
    load_checkpoint,
    save_checkpoint,
    sha256_of,
)
from sct_model.networks import preset
from sct_model.preprocessing import PreprocessingConfig
from tests.sct_model.phantom import tiny_checkpoint


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> tuple[Checkpoint, Path, str]:
    checkpoint = tiny_checkpoint()
    path = tmp_path_factory.mktemp("roundtrip") / "model.pt"
    return checkpoint, path, save_checkpoint(checkpoint, path)


def raw_payload(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def test_round_trip_keeps_configs_weights_and_metadata(saved):
    original, path, sha256 = saved
    loaded = load_checkpoint(path)
    assert sha256 == sha256_of(path) == loaded.file_sha256 and len(sha256) == 64
    assert loaded.model == original.model
    assert loaded.preprocessing == original.preprocessing
    assert loaded.scale_factor == original.scale_factor
    assert loaded.latent_patch_shape == original.latent_patch_shape
    assert (loaded.model_name, loaded.model_version, loaded.intended_use) == (
        "sct-ldm-test",
        "test-1",
        "tests only",
    )
    assert loaded.training_data == original.training_data
    assert loaded.code_version == sct_model.__version__ and loaded.created_utc.endswith("Z")
    for name in ("autoencoder", "mr_encoder", "unet"):
        assert loaded.state(name).keys() == original.state(name).keys()
        for key, tensor in original.state(name).items():
            assert torch.equal(loaded.state(name)[key], tensor), (name, key)
    networks = loaded.build_networks()
    assert not networks.training


def test_file_holds_plain_types_only(saved):
    _, path, _ = saved
    payload = raw_payload(path)  # weights_only=True: would raise on any other object
    assert payload["format"] == FORMAT and payload["format_version"] == 1
    assert set(payload) == {"format", "format_version", "metadata", "state", "payload_sha256"}

    def plain(value: object) -> bool:
        if isinstance(value, dict):
            return all(isinstance(k, str) and plain(v) for k, v in value.items())
        if isinstance(value, list | tuple):
            return all(plain(v) for v in value)
        return value is None or isinstance(value, str | int | float | bool)

    assert plain(payload["metadata"])
    scheduler = payload["metadata"]["model"]["scheduler"]
    assert scheduler["kind"] == "ddpm" and scheduler["num_train_timesteps"] == 1000
    assert payload["metadata"]["preprocessing"]["hu_range"] == (-1024.0, 3071.0)


def test_missing_file(tmp_path: Path):
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "absent.pt")


def test_truncated_file(saved, tmp_path: Path):
    _, path, _ = saved
    data = path.read_bytes()
    for cut in (len(data) // 2, len(data) - 100, 10):
        truncated = tmp_path / f"truncated_{cut}.pt"
        truncated.write_bytes(data[:cut])
        with pytest.raises(CheckpointError, match="corrupt or truncated"):
            load_checkpoint(truncated)


@pytest.mark.parametrize("fraction", [0.3, 0.5, 0.8])
def test_corrupt_bytes(saved, tmp_path: Path, fraction: float):
    _, path, _ = saved
    data = bytearray(path.read_bytes())
    position = int(len(data) * fraction)
    for offset in range(64):  # flip a run of bytes inside the tensor data
        data[position + offset] ^= 0xFF
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(corrupt)


def test_altered_weights_fail_the_content_digest(saved, tmp_path: Path):
    _, path, _ = saved
    payload = raw_payload(path)
    name = next(iter(payload["state"]["unet"]))
    payload["state"]["unet"][name] = payload["state"]["unet"][name] + 1e-3
    altered = tmp_path / "altered.pt"
    torch.save(payload, altered)
    with pytest.raises(CheckpointError, match="digest mismatch"):
        load_checkpoint(altered)


def test_unsupported_format_version(saved, tmp_path: Path):
    _, path, _ = saved
    payload = raw_payload(path)
    payload["format_version"] = 99
    future = tmp_path / "future.pt"
    torch.save(payload, future)
    with pytest.raises(CheckpointError, match="format version 99 is not supported"):
        load_checkpoint(future)


def test_not_an_sct_checkpoint(tmp_path: Path):
    other = tmp_path / "other.pt"
    torch.save({"state_dict": {"w": torch.zeros(2)}}, other)
    with pytest.raises(CheckpointError, match="not an sct-node checkpoint"):
        load_checkpoint(other)


def test_arbitrary_objects_are_refused_by_the_safe_loader(tmp_path: Path):
    unsafe = tmp_path / "unsafe.pt"
    # a config object instead of its dict: a pickled class the safe loader does not execute
    torch.save({"format": FORMAT, "format_version": 1, "metadata": PreprocessingConfig()}, unsafe)
    with pytest.raises(CheckpointError, match="safe loader"):
        load_checkpoint(unsafe)


def test_missing_setting_is_named(saved, tmp_path: Path):
    _, path, _ = saved
    payload = raw_payload(path)
    del payload["metadata"]["scale_factor"]
    payload["payload_sha256"] = _payload_digest(payload["metadata"], payload["state"])
    incomplete = tmp_path / "incomplete.pt"
    torch.save(payload, incomplete)
    with pytest.raises(CheckpointError, match="scale_factor"):
        load_checkpoint(incomplete)


def test_unknown_config_key_is_refused(saved, tmp_path: Path):
    _, path, _ = saved
    payload = raw_payload(path)
    payload["metadata"]["model"]["unet"]["dropout"] = 0.1
    payload["payload_sha256"] = _payload_digest(payload["metadata"], payload["state"])
    unknown = tmp_path / "unknown.pt"
    torch.save(payload, unknown)
    with pytest.raises(CheckpointError, match="dropout"):
        load_checkpoint(unknown)


def test_weights_that_do_not_fit_their_config(saved, tmp_path: Path):
    original, path, _ = saved
    payload = raw_payload(path)
    payload["metadata"]["model"]["unet"]["channels"] = (32, 128)  # the stored weights are for (32, 64)
    payload["payload_sha256"] = _payload_digest(payload["metadata"], payload["state"])
    mismatched = tmp_path / "mismatched.pt"
    torch.save(payload, mismatched)
    with pytest.raises(CheckpointError, match="unet weights do not fit"):
        load_checkpoint(mismatched)
    # and save_checkpoint refuses to write such a file in the first place
    other_unet = preset("paper").unet
    wrong = dataclasses.replace(original, model=dataclasses.replace(original.model, unet=other_unet))
    with pytest.raises(CheckpointError, match="unet weights do not fit"):
        save_checkpoint(wrong, tmp_path / "never.pt")
    assert not (tmp_path / "never.pt").exists()


def test_checkpoint_validates_its_fields():
    checkpoint = tiny_checkpoint()
    with pytest.raises(ValueError, match="scale_factor"):
        dataclasses.replace(checkpoint, scale_factor=0.0)
    with pytest.raises(ValueError, match="latent_patch_shape"):
        dataclasses.replace(checkpoint, latent_patch_shape=(3, 4, 4))  # not a multiple of the UNet's factor 2
    with pytest.raises(ValueError, match="training_data"):
        dataclasses.replace(checkpoint, training_data={"when": object()})
