"""User-facing errors. The CLI prints ``str(error)`` as one line and exits with ``error.exit_code``."""


class SSLError(Exception):
    """A problem with what the user asked for: bad recipe, missing data, unreadable checkpoint."""

    exit_code = 2


class RecipeError(SSLError):
    """A recipe file or override is invalid."""


class DataError(SSLError):
    """A dataset path or name cannot be used."""


class CheckpointError(SSLError):
    """A checkpoint or run folder cannot be read, resumed or written."""


class Interrupted(SSLError):
    """Ctrl-C: the message says what of the command's output is kept and how to go on."""

    exit_code = 130


class TrainingError(SSLError):
    """Training cannot go on (e.g. the loss diverged); the checkpoints written so far are kept."""

    exit_code = 1
