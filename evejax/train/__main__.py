"""CLI: python -m evejax.train --config=configs/demo.py --workdir=DIR [--config.total_steps=200]."""

from absl import flags, logging

from evejax import cli
from evejax.train.trainer import train

_CONFIG = cli.define_config_flag('A get_config(arg) file, as path[:arg].')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for metrics, checkpoints and logs.')
flags.mark_flags_as_required(['workdir'])


def main(argv):
  del argv
  logging.set_verbosity(logging.INFO)
  final = train(_CONFIG.value, _WORKDIR.value)  # cli.run reports a user's error in one line.
  if 'preempted' in final:
    return  # Exit status 0: the checkpoint is written; the same command resumes.
  if 'eval/accuracy' in final:
    print(
      f'Held-out caption/answer token accuracy: {final["eval/accuracy"]:.4f} '
      f'(loss {final["eval/loss"]:.4f})',
      flush=True,
    )
  else:
    print(
      f'Trained (no held-out split); final train loss {final.get("train/loss", float("nan")):.4f}',
      flush=True,
    )


if __name__ == '__main__':
  cli.run(main)
