"""The multi-device tests' one way to a mesh on a one-device host: Python in a subprocess that sees
N fake CPU devices (XLA's host-platform device count must be set before jax starts)."""

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_with_devices(args: list[str], devices: int, timeout: float = 300) -> str:
  """`python *args` from the repository root on `devices` CPU devices; its stdout, or a failed
  assertion showing the end of its stderr."""
  env = dict(
    os.environ,
    XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}',
    JAX_PLATFORMS='cpu',
    PYTHONPATH=REPO,
  )
  result = subprocess.run(
    [sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
  )
  assert result.returncode == 0, result.stderr[-4000:]
  return result.stdout
