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


class Interrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT) during a run: the CLI prints one line, where the last checkpoint is and the command that
    continues the run, and exits with code 130 (128 + SIGINT)."""

    def __init__(self, output: str, checkpoint: "str | None", step: "int | None"):
        super().__init__(output)
        self.output, self.checkpoint, self.step = output, checkpoint, step


def interrupted_message(exc: Interrupted, argv: list, prog: str = "hcd-distill") -> str:
    """One line for an interrupted run: the last checkpoint and the ``--resume auto`` command (``argv`` without
    --resume / --overwrite, which starts afresh)."""
    import shlex
    keep, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in ("--resume",):
            skip = True
        elif a == "--overwrite" or a.startswith("--resume="):
            continue
        else:
            keep.append(a)
    if exc.checkpoint is None:
        return (f"{prog}: interrupted before the first checkpoint; nothing to resume in {exc.output}: run the "
                f"command again to start afresh")
    return (f"{prog}: interrupted; the last checkpoint is {exc.checkpoint} (step {exc.step}); continue with: "
            f"{prog} {shlex.join(keep + ['--resume', 'auto'])}")
