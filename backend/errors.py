"""Errors that reach a person: each carries a stable code (for the wire and for tests) and a
message that names the problem."""


class OccnetError(Exception):
    """A failure the user can act on. `code` is a short machine-readable slug."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message

    def __str__(self) -> str:  # the message alone: it is what a person reads
        return self.message


class Cancelled(Exception):
    """Raised inside a reconstruction when the caller asked to stop."""


class CheckpointError(OccnetError):
    def __init__(self, message: str):
        super().__init__("bad_checkpoint", message)


class InputError(OccnetError):
    def __init__(self, message: str):
        super().__init__("bad_input", message)
