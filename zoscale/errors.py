"""The errors a user sees as one line (`zoscale: error: ...`, exit 2). Importing nothing, so every
wing of the package can raise them."""


class ConfigError(ValueError):
    """A bad configuration or input: the message is one line and names the key or the file."""


class CheckpointError(ConfigError):
    """A checkpoint that cannot be used: the message is one line and names the file."""
