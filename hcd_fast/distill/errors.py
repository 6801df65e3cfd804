"""Errors the hcd-distill CLI reports without a traceback.

- ``UserError`` (exit code 2): a bad flag, path, model name, class count, data or output folder, found
  before the first training step (or a file met later that cannot be used), named in the message.
- ``TrainingError`` (exit code 1): training itself failed, e.g. a non-finite loss; the message names the
  step and what was kept.
"""


class UserError(ValueError):
    """Raised for bad flags, paths, model names or class counts; the CLI prints it without a traceback."""


class TrainingError(RuntimeError):
    """Raised when training cannot go on (a non-finite loss); the CLI prints it and exits with code 1."""
