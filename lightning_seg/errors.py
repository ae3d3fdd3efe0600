"""Problems a user can fix: entry points print their message and exit non-zero, without a traceback
(`lightning_seg.entry.user_errors`)."""


class UserError(Exception):
    """Bad input, config or path; the message names the file or key and says what to do."""


class ConfigError(UserError, ValueError):
    """A config value this project cannot run with; the message names the key (`data.batch_size=3 ...`).
    A ValueError too, so callers that caught ValueError before still do."""


class MissingFileError(UserError, FileNotFoundError):
    """An input the user named is not there."""


class InputError(UserError, ValueError):
    """An input file that exists but cannot be used (unreadable, wrong channels, no run config)."""
