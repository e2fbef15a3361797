"""User-facing errors.

A `JaxtuneError` carries a message written for the person running jaxtune: what went wrong, which
file or key, and what to do. The CLI prints it as one line (no traceback); library callers get a
normal exception.
"""


class JaxtuneError(Exception):
    """An error caused by input (config, files, arguments), reported without a traceback."""


class ModelLoadError(JaxtuneError):
    """A checkpoint directory or file cannot be read as a supported model."""
