"""CLI: answer questions about an image, streaming the answers to the terminal.

  python -m evejax.generate --checkpoint=workdirs/demo --image=photo.png \
      --prompt="describe the image."

Without --prompt it is a conversation: one question per line on stdin, each answer (one line on
stdout) seeing the earlier turns, as in the training data's multi-turn layout. `/reset` starts a new
conversation about the same image; an empty line or end of input ends it. Role labels go to stderr,
so `python -m evejax.generate ... < questions.txt > answers.txt` gives one answer per line.

The prompt goes through the training run's template (e.g. `USER: <image>\\n... ASSISTANT:`); without
--image the questions are asked as text only. --checkpoint may also be an official EVE folder
(EVE-7B-HD-v2.0, EVE-7B-HD-v1.0) or its `convert import` output: then the official inference
protocol applies (template, image size rule, generation_config.json), each part overridable by its
flag (--template, --max_size, --resize, --temperature, ...).
"""

import sys

from absl import flags

from evejax import cli, storage
from evejax.inference import cli_flags
from evejax.inference.assistant import Assistant

_IMAGE = flags.DEFINE_string('image', None, 'Image file (any format PIL reads).')
_PROMPT = flags.DEFINE_string(
  'prompt', None, 'The question; without it, questions come from stdin.'
)
flags.mark_flags_as_required(['checkpoint'])


def _read_image() -> bytes | None:
  if not _IMAGE.value:
    return None
  try:
    return storage.read_bytes(_IMAGE.value)
  except OSError as e:
    sys.exit(f'--image={_IMAGE.value}: {e.strerror or e}')


def _stream_answer(assistant: Assistant, prompt: dict) -> str:
  """Writes the answer to stdout as it is generated and returns it."""
  printed = ''

  def stream(texts: list[str]) -> None:
    nonlocal printed
    if texts[0].startswith(printed):  # Print only what is new (a token can change earlier bytes).
      sys.stdout.write(texts[0][len(printed) :])
      sys.stdout.flush()
      printed = texts[0]

  answer = assistant.answer(
    [prompt],
    cli_flags.sampling_config(assistant.sampling),
    seed=cli_flags.SEED.value,
    on_text=stream,
  )[0]
  sys.stdout.write(answer[len(printed) :] if answer.startswith(printed) else '\n' + answer)
  sys.stdout.write('\n')
  sys.stdout.flush()
  return answer


def _converse(assistant: Assistant, image: bytes | None) -> None:
  history: list[tuple[str, str]] = []
  while True:
    sys.stderr.write('USER: ')
    sys.stderr.flush()
    question = sys.stdin.readline().strip()
    if not question:
      return
    if question == '/reset':
      history = []
      continue
    try:
      prompt = assistant.encode(question, image, history=history)
    except ValueError as e:  # The turn is not answered and not kept; the conversation goes on.
      sys.stderr.write(f'{e}\n(type /reset to start a new conversation)\n')
      continue
    sys.stderr.write('ASSISTANT: ')
    history.append((question, _stream_answer(assistant, prompt)))


def main(argv):
  del argv
  image = _read_image()
  assistant = cli_flags.load_assistant()
  if _PROMPT.value is None:
    if assistant.preprocess.template.plain:
      sys.exit(
        f'--checkpoint={cli_flags.CHECKPOINT.value}: the run trained with the plain '
        '(caption-only) template, which has no conversation turns; pass --prompt'
      )
    _converse(assistant, image)
    return
  try:
    prompt = assistant.encode(_PROMPT.value, image)
  except ValueError as e:
    sys.exit(f'--image={_IMAGE.value} --prompt=...: {e}')
  _stream_answer(assistant, prompt)


if __name__ == '__main__':
  cli.run(main)
