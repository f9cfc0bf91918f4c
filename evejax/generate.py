"""CLI: answer a question about an image, streaming the answer to the terminal.

  python -m evejax.generate --checkpoint=workdirs/demo --image=photo.png \
      --prompt="describe the image."

The prompt goes through the training run's template (e.g. `USER: <image>\\n... ASSISTANT:`); without
--image the question is asked as text only.
"""
import sys

from absl import app, flags

from evejax.inference import cli_flags

_IMAGE = flags.DEFINE_string('image', None, 'Image file (any format PIL reads).')
_PROMPT = flags.DEFINE_string('prompt', None, 'The question.')
flags.mark_flags_as_required(['checkpoint', 'prompt'])


def main(argv):
  del argv
  image = None
  if _IMAGE.value:
    try:
      with open(_IMAGE.value, 'rb') as f:
        image = f.read()
    except OSError as e:
      sys.exit(f'--image={_IMAGE.value}: {e.strerror}')
  assistant = cli_flags.load_assistant()
  try:
    prompt = assistant.encode(_PROMPT.value, image)
  except ValueError as e:
    sys.exit(f'--image={_IMAGE.value} --prompt=...: {e}')
  printed = ''

  def stream(texts: list[str]) -> None:
    nonlocal printed
    if texts[0].startswith(printed):  # Print only what is new (a token can change earlier bytes).
      sys.stdout.write(texts[0][len(printed):])
      sys.stdout.flush()
      printed = texts[0]

  answer = assistant.answer([prompt], cli_flags.sampling_config(), seed=cli_flags.SEED.value,
                            on_text=stream)[0]
  sys.stdout.write(answer[len(printed):] if answer.startswith(printed) else '\n' + answer)
  sys.stdout.write('\n')


if __name__ == '__main__':
  app.run(main)
