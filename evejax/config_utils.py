"""Helpers for `get_config(arg)` files (big_vision style)."""
from __future__ import annotations

import ml_collections


def _coerce(key: str, text: str, default):
  if isinstance(default, bool):
    if text.lower() not in ('true', 'false', '1', '0'):
      raise ValueError(f'Config argument {key}={text!r} must be a boolean')
    return text.lower() in ('true', '1')
  return type(default)(text) if default is not None else text


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """Parses `'size=tiny,blank=True'` against `defaults`; unknown keys are an error."""
  values = dict(defaults)
  for item in filter(None, (arg or '').split(',')):
    key, sep, text = item.partition('=')
    if not sep:
      raise ValueError(f'Config argument {item!r} is not of the form key=value')
    if key not in defaults:
      raise ValueError(f'Unknown config argument {key!r}; valid: {sorted(defaults)}')
    values[key] = _coerce(key, text, defaults[key])
  return ml_collections.ConfigDict(values)
