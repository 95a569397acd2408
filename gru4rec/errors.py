"""One exception type for user errors: the CLI prints its message on one line and exits 2."""

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130  # Ctrl-C: 128 + SIGINT, as a shell reports it


class UserError(Exception):
    """Bad input, a bad option or a broken file: the user can fix it, so no traceback."""
