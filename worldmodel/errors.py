"""The one exception type that means "the user asked for something wrong".

`run.py` turns a :class:`UserError` into a one-line message and exit code 2;
anything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """Bad input from the user: a config key, a value, a file, a run folder."""
