"""CLI: evaluate a checkpoint on a benchmark file (records.py format); prints the metrics table.

  python -m evejax.evaluation --checkpoint=workdirs/demo --benchmark=bench/shapes.jsonl \
      --output=workdirs/demo/eval/shapes

Writes `predictions.jsonl` (one line per item, with the error of any item that failed),
`metrics.json`, the results table (`results.md`, `results.csv`) and the per-category chart
(`categories.png`) to --output; `--submission=vqav2|vizwiz` also the EvalAI result file of an
unlabelled split, `--submission=mmvet` the answers MM-Vet's GPT-4 judge grades. Progress, rate and
ETA are logged every 30 s (and shown as a live bar on a terminal).
"""

import dataclasses

from absl import app, flags, logging

from evejax import cli
from evejax.evaluation import harness
from evejax.evaluation.records import read_jsonl
from evejax.inference import cli_flags

_BENCHMARK = flags.DEFINE_string('benchmark', None, 'Benchmark JSONL file (see records.py).')
_OUTPUT = flags.DEFINE_string('output', None, 'Folder for predictions, metrics and results table.')
_BATCH_SIZE = flags.DEFINE_integer('batch_size', 8, 'Questions generated together.')
_LIMIT = flags.DEFINE_integer('limit', None, 'Evaluate only the first N items.')
_SUBMISSION = flags.DEFINE_enum(
  'submission',
  None,
  list(harness.submission_lib.FORMATS),
  "Also write a server submission file (VQAv2 test-dev, VizWiz test) or MM-Vet's judge input.",
)
_SUBMISSION_QUESTIONS = flags.DEFINE_string(
  'submission_questions',
  None,
  'vqav2: the test-std questions JSON; questions without a '
  'prediction get an empty answer, as EvalAI requires for test-dev.',
)
flags.mark_flags_as_required(['checkpoint', 'benchmark', 'output'])


def main(argv):
  del argv
  logging.set_verbosity(logging.INFO)
  records = read_jsonl(_BENCHMARK.value)[: _LIMIT.value]
  needed = harness.required_submission(records)
  if needed and _SUBMISSION.value != needed:
    raise app.UsageError(f'{harness.JUDGED}: add --submission={needed}')
  assistant = cli_flags.load_assistant()
  # The papers' benchmark protocol: greedy, with the model's repetition penalty (EVEv2: 1.05).
  greedy = dataclasses.replace(assistant.sampling, temperature=0.0)
  results = harness.run(
    assistant,
    records,
    cli_flags.sampling_config(greedy),
    _OUTPUT.value,
    batch_size=_BATCH_SIZE.value,
    submission=_SUBMISSION.value,
    submission_questions=_SUBMISSION_QUESTIONS.value,
  )
  print(harness.format_table(results), flush=True)


if __name__ == '__main__':
  cli.run(main)
