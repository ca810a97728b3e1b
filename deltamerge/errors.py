"""The errors deltamerge raises.

Every failure a user can cause or meet is a :class:`DeltaMergeError` whose message is one line
naming the file and, where there is one, the tensor. The CLI prints that line and exits with the
class's ``exit_code``: 2 for bad usage or input, 1 when the result could not be made or verified,
and 128 + the signal's number when a signal stopped it (130 for Ctrl-C, 143 for SIGTERM), as a
shell reports a process that signal killed.

Every public error is importable from here. Where an error is also what the standard library
raises for the same trouble, it is that builtin too, so a caller's ``except FileNotFoundError``
or ``except ValueError`` catches it: :class:`NotFoundError` is a :class:`FileNotFoundError`,
:class:`FormatError` a :class:`ValueError`. The CLI's handler catches :class:`DeltaMergeError`
before :class:`OSError`, so the exit status stays the class's ``exit_code``.
"""

from __future__ import annotations

import signal


class DeltaMergeError(Exception):
    """Base of all deltamerge errors; ``exit_code`` is what the CLI exits with."""

    exit_code = 1


class InputError(DeltaMergeError):
    """The inputs or the options are wrong; nothing was written."""

    exit_code = 2


class NotFoundError(InputError, FileNotFoundError):
    """A path or repository that does not exist."""


class NotCachedError(NotFoundError):
    """Offline (HF_HUB_OFFLINE, or the Hub unreachable) and the files are not in the cache."""


class HubAuthError(InputError):
    """The Hub refused the request for want of a (valid) token."""


class FormatError(InputError, ValueError):
    """A file that is not what its name says: corrupt, truncated, a Git LFS pointer, hostile."""


class MismatchError(InputError):
    """Base and delta do not pair: a tensor on one side only, or shapes that cannot combine."""


class UnsupportedError(InputError):
    """A valid input that deltamerge deliberately does not handle (e.g. DoRA adapters)."""


class OutputExistsError(InputError):
    """OUT exists and is not empty, and ``force`` was not given."""


class OutputTakenError(OutputExistsError):
    """OUT was filled by someone else while the run worked: the finished partial folder is kept."""


class OutputBusyError(InputError):
    """Another run holds OUT's lock: one writer per OUT, so this one is refused at once."""


class SignatureError(InputError):
    """A pinned signer's signature is missing, is another signer's, or no longer covers the
    folder's files (one changed, added or removed after signing); checked before any weight is
    read, so nothing was written."""


class VerificationError(DeltaMergeError):
    """A checksum did not match: the base is not the publisher's, or a file was corrupted."""

    exit_code = 1


class WorkError(DeltaMergeError):
    """The job failed while running (disk full, I/O error, interrupted)."""

    exit_code = 1


class DiskSpaceError(WorkError):
    """Not enough free space for the result or the download; refused before any work."""


class InterruptedRun(WorkError):
    """A run stopped part way (a signal, a failed write); the partial folder is kept for --resume.

    ``exit_code`` is 1 after a failure, 128 + the signal's number after a signal.
    """

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code

    @classmethod
    def after(cls, exc: KeyboardInterrupt | WorkError, kept: str) -> InterruptedRun:
        """What stopped the run (a signal, or the failure's own words), then ``kept``: where
        the partial work is and how to finish it; the exit status the stop calls for."""
        if isinstance(exc, KeyboardInterrupt):
            return cls(f"interrupted; {kept}", signal_status(exc))
        return cls(f"{exc}; {kept}", 1)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where Ctrl-C raises KeyboardInterrupt, so that both stop a run alike."""


def signal_status(stop: KeyboardInterrupt) -> int:
    """The exit status for a run stopped by Ctrl-C (130) or SIGTERM (143)."""
    signum = signal.SIGTERM if isinstance(stop, Terminated) else signal.SIGINT
    return 128 + int(signum)


class PushError(WorkError):
    """A push that did not finish (a dropped connection, the Hub failing): nothing was committed.

    ``reason`` is what went wrong, ``retry`` the command that finishes it: files already uploaded
    are not sent again.
    """

    def __init__(self, reason: str, retry: str):
        super().__init__(f"{reason}; nothing was committed: run `{retry}` again to finish the push "
                         "(files already uploaded are not sent again)")
        self.reason, self.retry = reason, retry
