"""Errors that effad-hpc raises for bad input: each names the file, key or value at fault.

The CLI prints these as one line and exits with status 2; anything else is a bug and keeps
its traceback.
"""


class EffadError(Exception):
    """Base class: a problem with the user's input or environment, not a bug."""


class ConfigError(EffadError):
    """A config file or override is malformed: unknown key, wrong type, invalid value."""


class DataError(EffadError):
    """A data set on disk does not follow its layout, or a file in it cannot be read."""


class WeightsError(EffadError):
    """Pretrained weights a backbone needs are missing or do not fit the model."""


class StoreError(EffadError):
    """A feature store on disk is missing, incomplete or does not match the config."""


class CheckpointError(EffadError):
    """A checkpoint or trained model is missing, unreadable or belongs to another config."""


class TrainingError(EffadError):
    """Training cannot go on, e.g. a loss became NaN or infinite."""


class StorageError(EffadError):
    """An output cannot be written: a read-only or full file system, a path below a regular file."""
