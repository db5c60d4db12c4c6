"""The error type users see.

Anything that is the user's input being wrong (a missing file, a malformed line, an
unknown option value) raises `CaptionLibError` with a one-line message that names the
file (and line) and says what is wrong. The command line prints that line and exits 2;
other exceptions are bugs and keep their traceback.
"""


class CaptionLibError(Exception):
    """A problem with the user's input, explained in one line."""
