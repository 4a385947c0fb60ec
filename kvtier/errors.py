"""The exception types for bad input from whoever runs kvtier."""


class UsageError(ValueError):
    """An argument, a configuration file or a variable that cannot be used. Commands print its message as one
    line and exit 2 without a traceback, so the message must name the input and what it accepts."""


class ConfigError(UsageError):
    """A configuration key that does not exist or a value that is not acceptable."""
