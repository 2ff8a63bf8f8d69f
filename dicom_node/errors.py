"""The project's own exceptions. Stages raise them; only the pipeline turns them into job states."""

from __future__ import annotations


class SctNodeError(Exception):
    """Base class of every error the node raises on purpose."""


class ConfigError(SctNodeError):
    """The configuration is missing a key, has an unknown key or a bad value (the message names it)."""


class SeriesCheckError(SctNodeError):
    """A received series failed the checks of DESIGN.md §3; the series is quarantined with this reason."""


class LoadError(SctNodeError):
    """The MR series could not be read into a volume."""


class SamplingError(SctNodeError):
    """The sCT could not be computed (model, checkpoint or device problem)."""


class WriterError(SctNodeError):
    """The sCT series could not be built or failed its own validation."""


class SendError(SctNodeError):
    """A destination did not accept the whole series (association refused, timeout, failure status)."""


class JobStateError(SctNodeError):
    """A job state transition that the state machine does not allow."""


class StorageInUseError(SctNodeError):
    """Another node holds the storage root (one node per spool)."""


class AuditChainError(SctNodeError):
    """The audit events' hash chain cannot be extended (its head marker is missing or the schema is unknown)."""
