"""User-facing errors: raised for bad input, printed by the CLI as one paragraph without a traceback."""


class SATrainError(Exception):
    """An error the user can fix; the message names the offending field and the fix."""


class ConfigError(SATrainError, ValueError):
    """A configuration value is invalid."""


class DataError(SATrainError):
    """Input data is missing, empty, corrupt or inconsistent with the model."""


class CheckpointError(SATrainError):
    """A checkpoint is missing, unreadable, or not a sa_train checkpoint."""


class DiskFullError(SATrainError):
    """An output (checkpoint, export) cannot be written: its disk is full; nothing partial is left."""
