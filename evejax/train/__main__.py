"""CLI: python -m evejax.train --config=configs/demo.py --workdir=DIR [--config.total_steps=200]."""
from absl import app, flags, logging
from ml_collections import config_flags

from evejax.train.trainer import train

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Path to a get_config(arg) file.',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for metrics, checkpoints and logs.')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  del argv
  logging.set_verbosity(logging.INFO)
  final = train(_CONFIG.value, _WORKDIR.value)
  print(f"Held-out caption/answer token accuracy: {final['eval/accuracy']:.4f} "
        f"(loss {final['eval/loss']:.4f})", flush=True)


if __name__ == '__main__':
  app.run(main)
