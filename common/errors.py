"""User-facing errors. The CLI prints them as one line and exits non-zero, without a traceback."""


class InputError(Exception):
    """Bad input from the user: a missing file, an unknown format, a wrong column, an empty result.

    The message must name the file, field or line at fault.
    """
