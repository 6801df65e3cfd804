"""UserError: a problem with the command line, paths, models or data, reported before training starts."""


class UserError(ValueError):
    """Raised for bad flags, paths, model names or class counts; the CLI prints it without a traceback."""
