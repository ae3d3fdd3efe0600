"""Problems a user can fix: entry points print their message and exit non-zero, without a traceback."""


class UserError(Exception):
    """Bad input, config or path; the message names the file or key and says what to do."""
