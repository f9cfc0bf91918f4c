"""CLI: python -m evejax.train --config=configs/demo.py --workdir=DIR [--config.total_steps=200]."""
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from evejax.checkpoint import CheckpointError
from evejax.config_utils import load_config_file, unknown_override
from evejax.data.bad_records import TooManyBadRecords
from evejax.train.guard import NonFiniteError
from evejax.train.trainer import train

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Path to a get_config(arg) file.',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for metrics, checkpoints and logs.')
flags.mark_flags_as_required(['config', 'workdir'])


def parse_flags(argv: list[str]) -> list[str]:
  """absl parsing, with a clear message naming an unknown `--config.x.y` override."""
  try:
    return flags.FLAGS(argv)
  except (AttributeError, KeyError, flags.Error) as error:
    spec = next((a.split('=', 1)[1] for a in argv if a.startswith('--config=')), None)
    overrides = [a[len('--config.'):].split('=', 1)[0] for a in argv if a.startswith('--config.')]
    messages = [m for m in (unknown_override(load_config_file(spec), o) for o in overrides) if m]
    sys.exit('Invalid command line: ' + ('; '.join(messages) if spec and messages else str(error)))


def main(argv):
  del argv
  logging.set_verbosity(logging.INFO)
  try:
    final = train(_CONFIG.value, _WORKDIR.value)
  except (CheckpointError, NonFiniteError, TooManyBadRecords) as error:  # Expected: no traceback.
    sys.exit(f'{type(error).__name__}: {error}')
  if 'preempted' in final:
    return  # Exit status 0: the checkpoint is written; the same command resumes.
  if 'eval/accuracy' in final:
    print(f"Held-out caption/answer token accuracy: {final['eval/accuracy']:.4f} "
          f"(loss {final['eval/loss']:.4f})", flush=True)
  else:
    print(f"Trained (no held-out split); final train loss {final.get('train/loss', float('nan')):.4f}",
          flush=True)


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
