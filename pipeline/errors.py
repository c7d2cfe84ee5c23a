"""Errors the CLI turns into exit codes: bad input is exit 2 with one line, a failed stage exit 1."""


class UserError(Exception):
    """Bad input from the person or DAG calling us (unknown artifact, bad flag, missing file)."""


class StageFailed(Exception):
    """A stage ran and its verdict is 'no' (validation failed, model not blessed, ...)."""
