"""The one error family of rkedge.

Every message says what happened and what to do next. Errors are raised as these types inside the
library and translated once at each edge: the CLI (exit code, message on stderr) and the HTTP server
(status code, OpenAI error envelope).
"""

from __future__ import annotations


class RkedgeError(Exception):
    """Base of every error rkedge raises on purpose.

    Args:
        message: what went wrong, in one or two sentences.
        fix: what the user can do about it (shown on its own line).
        code: a stable machine-readable identifier (used by ``--json`` output and the server).
    """

    #: Exit code at the CLI edge: 2 for bad input (the user can fix the request), 1 otherwise.
    exit_code: int = 1
    default_code: str = "rkedge_error"

    def __init__(self, message: str, *, fix: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.fix = fix
        self.code = code or self.default_code

    def __str__(self) -> str:
        if self.fix:
            return f"{self.message}\n  fix: {self.fix}"
        return self.message


class InputError(RkedgeError):
    """The request itself is wrong: a bad argument, file or combination. Exit code 2."""

    exit_code = 2
    default_code = "invalid_input"


class ModelFileError(InputError):
    """A model file that this runtime cannot or must not load."""

    default_code = "invalid_model_file"


class AbiSelectionError(InputError):
    """The runtime library's ABI is unknown, ambiguous or contradicts what was asked for."""

    default_code = "abi_selection"


class LibraryNotFoundError(RkedgeError):
    """No runtime library could be found or loaded."""

    default_code = "library_not_found"


class RuntimeInitError(RkedgeError):
    """``rkllm_init`` failed. ``failure`` names the known failure mode (F-1, F-3, ...) when recognised."""

    default_code = "init_failed"

    def __init__(self, message: str, *, fix: str | None = None, failure: str | None = None,
                 log: str = "") -> None:
        super().__init__(message, fix=fix, code=failure.lower().replace("-", "") if failure else None)
        self.failure = failure
        self.log = log


class GenerationError(RkedgeError):
    """A run ended in the runtime's ERROR state or failed to start. ``result`` holds what was generated."""

    default_code = "generation_failed"

    def __init__(self, message: str, *, fix: str | None = None, result: object | None = None) -> None:
        super().__init__(message, fix=fix)
        self.result = result


class ContextLengthExceeded(InputError):
    """The prompt does not fit in the context the model was initialised with."""

    default_code = "context_length_exceeded"


class BusyError(RkedgeError):
    """The handle is already generating; one generation per handle at a time."""

    default_code = "busy"


class ToolkitError(RkedgeError):
    """The rkllm-toolkit step (real or simulated) failed."""

    default_code = "toolkit_failed"


class CheckFailed(InputError):
    """A conversion request hit one or more error findings before any heavy work."""

    default_code = "check_failed"
