"""What the command line shows of the library's log records: ``targetsft``'s INFO lines as plain text on stdout,
warnings and errors on stderr; ``--quiet`` keeps warnings and errors only, ``--verbose`` adds DEBUG lines with the
logger's name."""

from __future__ import annotations

import logging
import sys


class ConsoleHandler(logging.Handler):
    """INFO and below to the current ``sys.stdout``, WARNING and above to the current ``sys.stderr`` (looked up at
    each record, so a redirected stream is honoured)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            stream = sys.stderr if record.levelno >= logging.WARNING else sys.stdout
            stream.write(self.format(record) + "\n")
            stream.flush()
        except Exception:  # noqa: BLE001 - logging must not break the command
            self.handleError(record)


def configure_logging(verbosity: int = 0) -> None:
    """Show the library's records on the console: ``verbosity`` −1 (``--quiet``) warnings and errors, 0 INFO (the
    lines each command prints), 1 (``--verbose``) DEBUG with the logger's name. Called again, it replaces its
    handler."""
    logger = logging.getLogger("targetsft")
    for handler in [h for h in logger.handlers if isinstance(h, ConsoleHandler)]:
        logger.removeHandler(handler)
    handler = ConsoleHandler()
    handler.setFormatter(logging.Formatter("%(name)s: %(message)s" if verbosity > 0 else "%(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.WARNING if verbosity < 0 else logging.DEBUG if verbosity > 0 else logging.INFO)
