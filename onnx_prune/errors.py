"""Errors a user can act on: the CLI prints them as one line and exits with code 2."""


class UserError(Exception):
    """Bad input or usage; the message says what is wrong and what to do."""

    exit_code = 2


class TargetNotMet(Exception):
    """A verified build that misses the requested speedup or accuracy budget (exit code 1).
    `report` holds what was reached, for the caller to write; `model`, the model that reached it
    (the command line does not write it)."""

    exit_code = 1

    def __init__(self, message, report=None, model=None):
        super().__init__(message)
        self.report = report
        self.model = model
