"""Problems a user can fix: entry points print the message alone and exit 2 (`entry.user_errors`)."""


class UserError(Exception):
    """Bad input, config or path; the message names the file or key and says what to do."""


class ConfigError(UserError, ValueError):
    """A config value this project cannot run with, named by its key; a ValueError too, for old callers."""


class MissingFileError(UserError, FileNotFoundError):
    """An input the user named is not there."""


class InputError(UserError, ValueError):
    """An input file that exists but cannot be used (unreadable, wrong channels, no run config)."""


class TrainingDiverged(UserError):
    """The loss or the weights turned non-finite. A single run stops with it; in a sweep it is a result: the
    run dir records it (`diverged.json`) and the other runs go on (lightning_seg.sweep)."""


class JobFailed(Exception):
    """A user error in a submitit job, raised for submitit to return to the launcher (`entry.user_errors`)."""
