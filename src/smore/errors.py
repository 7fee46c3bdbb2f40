"""The library's one exception type for a user's mistake.

:class:`UserError` is raised for what the user can fix: a bad config value, data file, checkpoint or command-line
argument; its message names the field and the fix. It subclasses ``ValueError``, so ``except ValueError`` code keeps
working. The CLI prints a ``UserError`` as one line; any other exception is a bug and shows its traceback.
"""

from __future__ import annotations


class UserError(ValueError):
    """A mistake in what the user gave (config, data, checkpoint, arguments); the message says how to fix it."""
