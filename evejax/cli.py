"""The command line every evejax CLI shares: `--config=FILE.py[:arg]` names a `get_config(arg)` file
(a `configs/...` path is also found in the installed package) and `--config.x.y=value` overrides
one of its fields, parsed as that field's type (ml_collections config_flags).

  _CONFIG = cli.define_config_flag('What the config is for.')
  ...
  cli.run(main)

A mistake on the command line (a missing config file, an override of a field the config does not
have, a missing required flag) and the errors a user can fix (`USER_ERRORS`: a config value, a
checkpoint, too many bad records, a missing input file, a full disk) exit with one line saying
what is wrong, not a traceback; `--verbosity=1` shows the traceback too.
"""

from __future__ import annotations

import errno
import functools
import sys
from collections.abc import Callable
from typing import Any

import ml_collections
from absl import app, flags
from ml_collections import config_flags

from evejax.config_utils import load_config_file, unknown_override

Loader = Callable[[str], ml_collections.ConfigDict]
NAME = 'config'


class ConfigParser(flags.ArgumentParser):
  """`--config` -> `load(spec)`, locked, so that an override must name a field it has."""

  def __init__(self, load: Loader):
    self.load = load

  def parse(self, argument: str) -> ml_collections.ConfigDict:
    config = self.load(argument)
    config.lock()
    return config

  def flag_type(self) -> str:
    return 'config object'


def define_config_flag(
  help_string: str, *, load: Loader = load_config_file, required: bool = True
) -> flags.FlagHolder:
  """Defines `--config` with its `--config.x.y=value` overrides. `load` turns the flag's value
  into the ConfigDict that the overrides are checked against and applied to (default: a
  `get_config(arg)` file). Unless `required`, the value is None without `--config`."""
  holder = config_flags.DEFINE_config_file(NAME, None, help_string)
  # config_flags' own parser reads the file relative to the working directory only; the flag
  # calls `parser.parse`, so this one decides what `--config` names.
  flags.FLAGS[NAME].parser = ConfigParser(load)
  if required:
    flags.mark_flag_as_required(NAME)
  return holder


def parse_mesh(text: str) -> dict[str, Any]:
  """A --mesh flag: 'data=2,fsdp=-1' -> axis sizes (one may be -1); 'dcn.data=2' -> the slices
  along an axis, under 'dcn' (multi-slice)."""
  sizes: dict[str, Any] = {}
  for item in filter(None, text.split(',')):
    key, sep, size = item.partition('=')
    if not sep or not size.strip().lstrip('-').isdigit():
      raise app.UsageError(f'--mesh={text!r}: expected axis=size pairs, e.g. "data=2,fsdp=-1"')
    outer, _, axis = key.strip().rpartition('.')
    (sizes.setdefault(outer, {}) if outer else sizes)[axis] = int(size)
  return sizes


def config_spec() -> str:
  """`--config` as given (`FILE.py[:arg]`), e.g. to pass it on to another command."""
  return config_flags.get_config_filename(flags.FLAGS[NAME])


def config_overrides() -> dict[str, Any]:
  """The `--config.x.y=value` overrides, by dotted key, with their parsed values."""
  return config_flags.get_override_values(flags.FLAGS[NAME])


def _unknown_overrides(argv: list[str]) -> str:
  """The overrides in `argv` that name no field of the `--config` config, each with the valid
  keys where it goes wrong ('' when there are none, or the config itself does not load)."""
  spec = next((a.split('=', 1)[1] for a in argv if a.startswith(f'--{NAME}=')), None)
  keys = [a[len(f'--{NAME}.') :].split('=', 1)[0] for a in argv if a.startswith(f'--{NAME}.')]
  if spec is None or not keys:
    return ''
  try:
    config = flags.FLAGS[NAME].parser.load(spec)
  except (FileNotFoundError, ValueError):  # absl's message already says what is wrong with it.
    return ''
  return '; '.join(filter(None, (unknown_override(config, key) for key in keys)))


def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing (for `app.run(..., flags_parser=parse_flags)`) that exits with a clear
  message on a command-line mistake."""
  try:
    return flags.FLAGS(argv)
  except (AttributeError, KeyError, FileNotFoundError, flags.Error) as error:
    # config_flags reports an unknown override as a bare AttributeError/KeyError.
    sys.exit(f'Invalid command line: {_unknown_overrides(argv) or error}')


def user_errors() -> tuple[type[BaseException], ...]:
  """What a command reports in one line: errors whose message says what to fix."""
  # Imported here: this module is imported before the flags are defined, the rest is heavy.
  from evejax.checkpoint.store import CheckpointError
  from evejax.config import ConfigError
  from evejax.data.bad_records import TooManyBadRecords
  from evejax.data.templates import BadConversation
  from evejax.train.guard import NonFiniteError

  return (
    ConfigError,
    CheckpointError,
    NonFiniteError,
    TooManyBadRecords,
    BadConversation,
    FileNotFoundError,  # Our messages name the path and what writes it.
    FileExistsError,
    NotADirectoryError,
    IsADirectoryError,
    PermissionError,
  )


def _reporting(main: Callable[[list[str]], Any], argv: list[str]) -> Any:
  verbose = flags.FLAGS.verbosity >= 1  # Read first: mains set their own logging level.
  try:
    return main(argv)
  except Exception as error:
    full_disk = isinstance(error, OSError) and error.errno == errno.ENOSPC
    if verbose or not (full_disk or isinstance(error, user_errors())):
      raise
    sys.exit(f'{type(error).__name__}: {error}')


def run(main: Callable[[list[str]], Any]) -> None:
  """`app.run(main)` with `parse_flags`, reporting `user_errors()` in one line (every evejax
  command's entry point)."""
  app.run(functools.partial(_reporting, main), flags_parser=parse_flags)
