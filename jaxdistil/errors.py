"""The one error type users see: a one-line message naming the problem and the fix."""


class UserError(Exception):
    """Bad input from the user (missing file, wrong vocab, malformed config...).

    The CLI prints ``error: <message>`` on one line and exits with status 2; the message must say
    what is wrong and how to fix it.
    """
