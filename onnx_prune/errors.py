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


def positive_count(value, what: str):
    """`value` as a positive int, None left as None: the Python API's check of what the command
    line's option types already refuse (a thread count of -1, a batch size of 2.5)."""
    import numbers

    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
        raise UserError(f"{what} must be a positive integer, got {value!r}")
    return int(value)
