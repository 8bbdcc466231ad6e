"""Command-line programs report bad input in one line: `error: <message>`, exit status 2.

  if __name__ == "__main__":
    cli.run(main)            # an argparse program: main(argv)
    cli.run_absl(main)       # an absl program (train.py), config-file errors included

The traceback appears only when asked for: `--traceback` on the command line, or the
environment variable TPS_TRACEBACK=1. Only errors of input (ValueError and its subclasses,
the checkpoint errors among them; a missing file; KeyError) are shortened; anything else is
raised as it is. This module imports neither JAX nor absl until a program runs.
"""

from __future__ import annotations

import os
import re
import sys
from typing import Callable

TRACEBACK_ENV = "TPS_TRACEBACK"
TRACEBACK_FLAG = "--traceback"
BAD_INPUT = (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, KeyError)
EXIT_STATUS = 2


def _wants_traceback(argv: list[str]) -> tuple[bool, list[str]]:
  """Whether a traceback was asked for, and argv without the flag."""
  asked = TRACEBACK_FLAG in argv or os.environ.get(TRACEBACK_ENV, "") not in ("", "0")
  return asked, [a for a in argv if a != TRACEBACK_FLAG]


def message(error: BaseException) -> str:
  """The one line that names the problem: the innermost error's message (an error re-raised
  with a formatted traceback as its text, as absl's config flags do, gives its last line)."""
  while True:
    inner = error.__cause__ or (None if error.__suppress_context__ else error.__context__)
    if not isinstance(inner, BAD_INPUT):
      break
    error = inner
  text = str(error.args[0]) if isinstance(error, KeyError) and error.args else str(error)
  lines = [l.strip() for l in text.splitlines() if l.strip()]
  if not lines:
    return type(error).__name__
  if len(lines) == 1:
    return lines[0]
  m = re.fullmatch(r"[\w.]+(?:Error|Exception): (.*)", lines[-1])
  return m.group(1) if m else lines[-1]


def _fail(error: BaseException) -> None:
  print(f"error: {message(error)}", file=sys.stderr)
  sys.exit(EXIT_STATUS)


def run(main: Callable[[list[str]], object], argv: list[str] | None = None) -> None:
  """Runs an argparse program `main(argv)`, reporting bad input in one line."""
  import argparse  # pylint: disable=g-import-not-at-top

  def error(parser, text):  # argparse's usage errors, in the same one line
    raise ValueError(f"{parser.prog}: {text}")

  argparse.ArgumentParser.error = error
  asked, argv = _wants_traceback(list(sys.argv[1:] if argv is None else argv))
  try:
    main(argv)
  except BAD_INPUT as e:
    if asked:
      raise
    _fail(e)


def _missing_field(argv: list[str], error: BaseException) -> str:
  """The one line for a `--config.a.b=v` override whose field does not exist."""
  field = str(error).strip("\"'")
  flag = next((a.split("=")[0] for a in argv if a.startswith("--config.")
               and a.split("=")[0].split(".")[-1] == field), None)
  return (f"{flag or '--config...' + field}: the config has no field {field!r}; an override "
          f"sets only fields the config file defines.")


def run_absl(main: Callable[[list[str]], object]) -> None:
  """`absl.app.run(main)`, with flag and config-file errors and bad input in one line."""
  from absl import app, flags  # pylint: disable=g-import-not-at-top
  asked, rest = _wants_traceback(sys.argv[1:])
  sys.argv = sys.argv[:1] + rest

  def parse(argv):
    try:
      return flags.FLAGS(argv)
    except flags.Error as e:
      if asked:
        raise
      _fail(e)
    except (AttributeError, KeyError) as e:  # ml_collections: an override of a missing field
      if asked:
        raise
      _fail(ValueError(_missing_field(argv, e)))
    except OSError as e:
      _unwrap(e)

  def _unwrap(e: OSError):
    """ml_collections wraps a config file's own OSError (a missing path) in one of its own."""
    if asked or not isinstance(e.__cause__, BAD_INPUT):
      raise e
    _fail(e.__cause__)

  def guarded(argv):
    try:
      return main(argv)
    except BAD_INPUT as e:
      if asked:
        raise
      _fail(e)
    except OSError as e:
      _unwrap(e)

  app.run(guarded, flags_parser=parse)
