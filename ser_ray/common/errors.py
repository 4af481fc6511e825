"""The one exception type for a user's mistake.

A mistake the user can fix — a flag, a file, a corpus, a manifest, a protocol, a model, where
files live — raises a subclass of :class:`UserError` (each also derives from the builtin type
its callers have always caught, e.g. ``ValueError``). A job's edge
(:func:`ser_ray.cli.reports_user_errors`) prints it as one ``error: …`` line and exits 2;
``--verbose`` shows the traceback. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """A mistake the user can fix; its message names the file or value and the fix."""


class MissingInputError(UserError, FileNotFoundError):
    """A file or folder the user named is not there, or holds nothing usable."""


class SettingsError(UserError, ValueError):
    """A flag's value, a settings or protocol file, a variant or a model that cannot work."""
