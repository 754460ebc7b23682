"""Error types raised for user input."""


class SubcloneError(ValueError):
    """Bad input from the user: the message names the value and what would be valid."""
