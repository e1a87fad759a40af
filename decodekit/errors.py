"""Typed errors. Every failure a user can cause raises a subclass of DecodekitError with a one-line message."""

ECHO_CHARS = 40  # a value echoed in a message is cut to this many characters


def clip(value: object, limit: int = ECHO_CHARS) -> str:
    """``repr(value)``, cut to ``limit`` characters: a message never echoes a whole request."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class DecodekitError(Exception):
    """Base class: the CLI prints ``str(err)`` on one line and exits non-zero."""


class InvalidParameter(DecodekitError, ValueError):
    """A bad argument: empty prompt, non-positive max_new_tokens, unknown method or option. ``param``: the
    argument at fault, where one is (the server reports it as OpenAI's ``param``)."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class ModelFileError(DecodekitError):
    """A model path that is missing, unreadable or corrupt."""


class UnsupportedArchitecture(DecodekitError):
    """A checkpoint whose architecture the runtime does not implement."""


class PromptTooLong(InvalidParameter):
    """A prompt that leaves no room in the context window."""


class DeviceUnavailable(DecodekitError):
    """A device (e.g. cuda) was asked for but is not present."""
