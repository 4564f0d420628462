"""The one exception type for mistakes a user can make (bad config, bad table, missing file)."""


class CxrflowError(Exception):
    """A user-facing error. Its message names the file, row or key at fault; the CLI prints it without a traceback."""
