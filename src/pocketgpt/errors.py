"""The one exception type for bad user input (data, config, checkpoint); its message says what and where."""


class PocketError(ValueError):
    """An error caused by the user's input: the CLI prints the message as one line and exits with 2."""


class Interrupted(PocketError):
    """A training stage stopped by Ctrl-C after saving its checkpoint: the command ends (exit code 130) instead
    of going on as if the stage had finished, so no later stage trains on a half-trained model."""
