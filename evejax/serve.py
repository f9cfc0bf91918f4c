"""Web demo: chat about an image with a trained model in the browser (Gradio, the `[demo]` extra).

  python -m evejax.serve --checkpoint=workdirs/demo [--port=7860] [--host=0.0.0.0]

The page takes an image with the first question and answers each question in a multi-turn chat,
streaming the answer in as it is generated; every answer sees the earlier turns, as in the training
data's multi-turn layout. A new image starts a new conversation about it. An unreadable image or a
conversation that fills the context is not answered: a warning on the page says why. The model is
loaded once and answers one request at a time (Gradio's queue, concurrency 1); the sampling flags
are those of `python -m evejax.generate` (default greedy).
"""

from __future__ import annotations

import queue
import time
from collections.abc import Iterator, Sequence
from concurrent import futures

from absl import flags, logging

from evejax import cli, storage
from evejax.inference import cli_flags
from evejax.inference.assistant import Assistant
from evejax.inference.prompts import Turn
from evejax.inference.sampling import SamplingConfig

try:
  import gradio as gr
except ImportError as e:
  raise SystemExit(f"{e}: the web demo needs Gradio, pip install 'evejax[demo]'") from e

_PORT = flags.DEFINE_integer('port', 7860, 'Port of the web page.')
_HOST = flags.DEFINE_string(
  'host', '127.0.0.1', 'Address to listen on; 0.0.0.0 serves other machines too.'
)
flags.mark_flags_as_required(['checkpoint'])

NOT_ANSWERED = 'Not answered'
WAY_OUT = 'Attach another image or clear the chat (the bin above it) to start a new conversation.'


def _texts(content: Sequence[dict]) -> str:
  return ' '.join(part['text'] for part in content if part['type'] == 'text')


def _files(content: Sequence[dict]) -> list[str]:
  return [part['file']['path'] for part in content if part['type'] == 'file']


def conversation(message: dict, history: Sequence[dict]) -> tuple[str | None, list[Turn], str]:
  """(image path, earlier (question, answer) turns about it, question) of a chat's new message.

  `message`: the multimodal textbox's {'text', 'files'}; `history`: Gradio's messages ({'role',
  'content': [{'type': 'text' | 'file', ...}]}). The conversation starts at the newest message
  with an image: the turns before it were about another image. A question the page did not answer
  (it showed an error instead) is left out.
  """
  image, turns, question = None, [], None
  for entry in history:
    if entry['role'] == 'user':
      if files := _files(entry['content']):
        image, turns = files[-1], []
      question = _texts(entry['content'])
    elif entry['role'] == 'assistant' and question is not None:
      turns.append((question, _texts(entry['content'])))
      question = None
  if message['files']:
    image, turns = message['files'][-1], []
  return image, turns, message['text'].strip()


class Chat:
  """The chat function of the page: answers stream from the model's own thread, which runs one
  generation at a time, so a request never sees another's cache."""

  def __init__(self, assistant: Assistant, sampling: SamplingConfig, seed: int):
    self.assistant, self.sampling, self.seed = assistant, sampling, seed
    self.model_thread = futures.ThreadPoolExecutor(max_workers=1)

  def respond(self, message: dict, history: list[dict]) -> Iterator[str]:
    """The answer so far, longer at each step; for a turn the model cannot take, no answer and a
    warning on the page that stays until closed (the question stays in the chat, unanswered)."""
    image, turns, question = conversation(message, history)
    if not question:
      gr.Warning('Type a question: an image alone is not one.', duration=None, title=NOT_ANSWERED)
      return
    if turns and self.assistant.preprocess.template.plain:
      gr.Warning(
        'This model was trained with the plain (caption-only) template, which has no '
        f'conversation turns: one question per image. {WAY_OUT}',
        duration=None,
        title=NOT_ANSWERED,
      )
      return
    try:
      prompt = self.assistant.encode(
        question, None if image is None else storage.read_bytes(image), history=turns
      )
    except ValueError as e:
      gr.Warning(f'{e}. {WAY_OUT}', duration=None, title=NOT_ANSWERED)
      return
    yield from self.stream(prompt)

  def stream(self, prompt: dict) -> Iterator[str]:
    texts = queue.Queue()
    answer = self.model_thread.submit(
      self.assistant.answer,
      [prompt],
      self.sampling,
      seed=self.seed,
      on_text=lambda rows: texts.put(rows[0]),
    )
    answer.add_done_callback(lambda _: texts.put(None))
    while (text := texts.get()) is not None:
      yield text
    yield answer.result()[0]


def build_page(chat: Chat, title: str) -> gr.ChatInterface:
  return gr.ChatInterface(
    chat.respond,
    multimodal=True,
    textbox=gr.MultimodalTextbox(
      file_types=['image'],
      file_count='single',
      placeholder='Attach an image and ask about it',
      sources=['upload'],
    ),
    title=title,
    description='Attach an image to the first question; later questions are about the same image '
    'and see the earlier turns. A new image starts a new conversation.',
    concurrency_limit=1,
    analytics_enabled=False,
  )


def main(argv):
  del argv
  start = time.perf_counter()
  assistant = cli_flags.load_assistant()
  # Once per process: every request uses this Assistant (tests/test_serve.py counts this line).
  logging.info(
    'Model loaded from %s in %.1f s', cli_flags.CHECKPOINT.value, time.perf_counter() - start
  )
  # The checkpoint's generation settings (official models: generation_config.json), flags on top.
  chat = Chat(assistant, cli_flags.sampling_config(assistant.sampling), cli_flags.SEED.value)
  page = build_page(chat, f'evejax: {cli_flags.CHECKPOINT.value}')
  page.queue(default_concurrency_limit=1).launch(server_name=_HOST.value, server_port=_PORT.value)


if __name__ == '__main__':
  cli.run(main)
