"""The one exception type for bad user input (data, config, checkpoint); its message says what and where."""


class PocketError(ValueError):
    """An error caused by the user's input: the CLI prints the message as one line and exits with 2."""
