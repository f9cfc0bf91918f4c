"""Helpers for `get_config(arg)` files (big_vision style) and for the typed config sections built
from them (`from_mapping`)."""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import pathlib
import runpy
import typing
from collections.abc import Mapping
from typing import Any

import ml_collections

from evejax import storage


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


def resolve_config_path(path: str) -> str:
  """`path` (a config file or a recipe folder) as given if it exists; else, for a `configs/...`
  path, the same one in the installed `configs` package, so that the README's `--config=configs/..`
  works from any directory after `pip install`. Any other missing path is an error naming it."""
  if storage.exists(path):
    return path
  parts = pathlib.PurePath(path).parts
  packaged = parts[0] == 'configs' and len(parts) > 1
  if packaged:
    spec = importlib.util.find_spec('configs')
    for root in (spec.submodule_search_locations or []) if spec else []:
      if os.path.exists(os.path.join(root, *parts[1:])):
        return os.path.join(root, *parts[1:])
  where = ', nor in the installed configs package' if packaged else ''
  raise FileNotFoundError(f'Config {path!r} does not exist (relative to {os.getcwd()}{where})')


def load_config_file(spec: str) -> ml_collections.ConfigDict:
  """`path/to/config.py[:arg]` -> the ConfigDict its `get_config(arg)` returns (the path as
  `resolve_config_path` finds it)."""
  path, _, arg = spec.partition(':')
  return run_config_module(resolve_config_path(path))['get_config'](arg or None)


def run_config_module(path: str) -> dict[str, Any]:
  """The globals of a config file after running it: a local file, or one on object storage."""
  if not storage.is_url(path):
    return runpy.run_path(path)
  namespace = {'__file__': path, '__name__': '<run_path>'}
  exec(compile(storage.read_text(path), path, 'exec'), namespace)  # What runpy does, from text.
  return namespace


def unknown_override(config: ml_collections.ConfigDict, dotted: str) -> str | None:
  """A message if `dotted` (e.g. 'optim.lr') is not a key of `config`, else None."""
  node, walked = config, []
  for key in dotted.split('.'):
    if not isinstance(node, ml_collections.ConfigDict) or key not in node:
      where = '.'.join(['config', *walked])
      valid = sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
      return f'--config.{dotted}: {where} has no key {key!r}; valid keys: {valid}'
    node, walked = node[key], walked + [key]
  return None


def apply_overrides(
  config: ml_collections.ConfigDict, overrides: Mapping[str, Any], where: str = ''
) -> ml_collections.ConfigDict:
  """Sets dotted keys ({'optim.lr': 1e-3}, as `--config.optim.lr`) on `config`, in place; an
  unknown key is an error naming it (`where` says whose override it was)."""
  for key, value in overrides.items():
    message = unknown_override(config, key)
    if message:
      raise ValueError(f'{where}: {message}' if where else message)
    parent, _, leaf = key.rpartition('.')
    (config[parent] if parent else config)[leaf] = value  # ConfigDict resolves dotted parents.
  return config


_SCALARS = (bool, int, float, str)


def _check_type(where: str, value, kind) -> Any:
  """`value` as the scalar type `kind` (an int is a valid float), else a clear error."""
  if kind is float and isinstance(value, int) and not isinstance(value, bool):
    return float(value)
  if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
    raise ValueError(f'{where}={value!r} must be of type {kind.__name__}')
  return value


def from_mapping(cls: type, values: Mapping[str, Any], where: str):
  """The frozen dataclass `cls` from a (ConfigDict) mapping: unknown keys are an error naming the
  valid ones, scalar fields are type-checked, dataclass-typed fields are built recursively and
  absent fields keep their defaults (the one place those live)."""
  if isinstance(values, ml_collections.ConfigDict):
    values = values.to_dict()
  if dataclasses.is_dataclass(values):
    return values
  fields = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(values) - fields)
  if unknown:
    raise ValueError(f'{where} has unknown keys {unknown}; valid keys: {sorted(fields)}')
  hints = typing.get_type_hints(cls)
  kwargs = {}
  for name, value in values.items():
    kind = hints[name]
    if dataclasses.is_dataclass(kind):
      value = from_mapping(kind, value, f'{where}.{name}')
    elif kind in _SCALARS:
      value = _check_type(f'{where}.{name}', value, kind)
    elif isinstance(value, ml_collections.ConfigDict):
      value = value.to_dict()
    kwargs[name] = value
  return cls(**kwargs)
