"""Errors meant for the person at the terminal."""


class UserFacingError(RuntimeError):
    """An error whose message names the input at fault and what to do; the CLI prints it without a trace."""
