"""The harness streams: items are encoded a window at a time as answers are generated, so the
encoded pixels held at once are bounded by two windows, not the benchmark; progress and ETA go to
the log."""

import logging
import re
import threading

from evejax.evaluation import harness
from evejax.inference import SamplingConfig
from evejax.metrics import progress


class _Pixels:
  """An encoded prompt's pixels: counts the live ones, as the memory an evaluation holds."""

  lock = threading.Lock()
  live = peak = 0

  def __init__(self, data: bytes):
    self.data = data
    with _Pixels.lock:
      _Pixels.live += 1
      _Pixels.peak = max(_Pixels.peak, _Pixels.live)

  def __del__(self):
    with _Pixels.lock:
      _Pixels.live -= 1


class _RecordingAssistant:
  """Encodes to the question's length and answers with the question; logs the order of events."""

  def __init__(self):
    self.events = []

  def encode(self, question, image, history=()):
    self.events.append(('encode', question))
    return {'tokens': [0] * len(question), 'question': question, 'pixels': _Pixels(image)}

  def answer(self, prompts, sampling):
    self.events.append(('answer', len(prompts)))
    return [p['question'] for p in prompts]


def _records(tmp_path, count):
  image = tmp_path / 'image.png'
  image.write_bytes(b'\x89PNG' + bytes(1000))  # The fake assistant only holds the bytes.
  return [
    {
      'id': str(i),
      'question': 'q' * (1 + (7 * i) % 5),  # Lengths differ: sorted within a window.
      'metric': 'exact',
      'answers': [],
      'image': str(image),
    }
    for i in range(count)
  ]


def test_encoded_images_held_are_bounded_by_the_window_not_the_benchmark(tmp_path):
  batch_size, count = 2, 80
  window = batch_size * harness.WINDOW_BATCHES
  records = _records(tmp_path, count)
  assistant = _RecordingAssistant()
  _Pixels.live = _Pixels.peak = 0
  predictions = harness.predict(assistant, records, SamplingConfig(), batch_size=batch_size)
  assert [p['prediction'] for p in predictions] == [r['question'] for r in records]
  # The window being generated plus the next one, encoded meanwhile; never the 80 items.
  assert 0 < _Pixels.peak <= 2 * window < count
  assert _Pixels.live == 0
  encoded = answered = 0
  for kind, n in assistant.events:
    if kind == 'encode':
      encoded += 1
    else:
      answered += n
      assert encoded - answered <= 2 * window  # Answers start before the benchmark is encoded.
  assert answered == count and max(n for k, n in assistant.events if k == 'answer') == batch_size


def test_progress_logs_count_rate_and_eta(tmp_path, caplog):
  records = _records(tmp_path, 20)  # Windows of 8: 8, 16, 20 items done.
  caplog.set_level(logging.INFO)
  harness.predict(
    _RecordingAssistant(), records, SamplingConfig(), batch_size=2, progress=True, log_every_s=0
  )
  lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith('evaluation:')]
  assert [re.search(r'item (\d+)/20', line).group(1) for line in lines] == ['8', '16', '20']
  assert lines[0].endswith('ETA ?')  # No rate yet: the first window includes the compilation.
  assert re.fullmatch(r'evaluation: item 20/20 \| [\d.]+ items/s \| ETA 0m00s', lines[-1])
  caplog.clear()  # Every 30 s by default: a quick run logs its last line only.
  harness.predict(_RecordingAssistant(), records, SamplingConfig(), batch_size=2, progress=True)
  lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith('evaluation:')]
  assert len(lines) == 1 and 'item 20/20' in lines[0]


def test_eta_is_the_rest_at_the_rate_since_the_first_window(monkeypatch):
  clock = iter([100.0, 104.0])  # start() at 100 s, line() at 104 s
  monkeypatch.setattr(progress.time, 'perf_counter', lambda: next(clock))
  timer = progress.Progress(20, unit='item')
  timer.start(8)
  # 8 items in 4 s: 2 items/s, the 4 left take 2 s.
  assert timer.line(16, {}) == 'item 16/20 | 2.00 items/s | ETA 0m02s'
