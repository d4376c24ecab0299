"""The one kind of error a user is shown as one line: a mistake in the input or a failure of the
environment (no space, no permission, a file where a folder should be), never a bug.

Every subcommand raises :class:`UserError` (or a subclass) for those; ``gmmvit`` prints
``gmmvit <command>: error: <message>`` and exits 2, with the traceback only under ``--debug`` or
``GMMVIT_DEBUG=1``. Any other exception is a programming error and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """A message for the user: what is wrong, naming the file or option, and what to do."""

    exit_code = 2
