"""sct-node: a DICOM node for MR-only radiotherapy (MR series in, synthetic CT out, audited)."""

__version__ = "0.1.0"
