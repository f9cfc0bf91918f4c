#!/usr/bin/env bash
# The ablation study of docs/ablations.md, end to end on a CPU: text-only LLMs, the EVEv2
# decomposition sweep and the EVEv1 PAL sweep (3 seeds each), then the tables and figures.
#
#   bash benchmarks/ablations.sh v2 ROOT   # text LLM -> PEL stage 0 -> copy -> 6 variants x 3 seeds
#   bash benchmarks/ablations.sh v1 ROOT   # text LLM (EVEv1) -> PAL weight 0 / 1 x 3 seeds
#   bash benchmarks/ablations.sh report ROOT [OUT]   # results.{csv,json}, curves.png, final.png
#
# Every step resumes (finished runs are skipped), so an interrupted study continues where it was.
# STEPS (default 120) sets each ablation run's length; SEEDS (default 0,1,2) the seeds; V2_RUNS the
# decomposition variants (indices in sweep(add)'s order; default all); COPIES_SEEDS the seeds of
# the frozen-LLM contrast run (default SEEDS).
set -euo pipefail
cd "$(dirname "$0")/.."
what=$1
root=$2
out=${3:-docs/ablations}
steps=${STEPS:-120}
seeds=${SEEDS:-0,1,2}
v2_runs=()
if [[ -n ${V2_RUNS:-} ]]; then v2_runs=(--runs="$V2_RUNS"); fi
keys=eval/accuracy,eval/loss,eval_text/loss,bench/exact/accuracy
curves=eval/accuracy,eval_text/loss,train/loss
v2="configs/eve_v2/ablate_decomposition.py:root=$root/eve_v2,steps=$steps,bench=$root/bench/shapes.jsonl"
v1="configs/eve_v1/ablate_pal.py:root=$root/eve_v1,steps=$steps,bench=$root/bench/shapes.jsonl"

bench() {  # The held-out shapes questions (50 images x 3 turns) for exact match.
  [[ -f $root/bench/shapes.jsonl ]] || python -m evejax.evaluation.convert --format=shapes \
    --config=configs/demo.py --out="$root/bench/shapes.jsonl" --limit=50
}

case $what in
  v2)
    bench
    python -m evejax.train --config=configs/text_llm.py --workdir="$root/eve_v2/llm"
    python -m evejax.recipe --config=configs/eve_v2:size=tiny,text_llm=True \
      --workdir="$root/eve_v2" --stages=stage0,copy
    for seed in ${seeds//,/ }; do  # Every variant's first seed first: a partial study compares.
      python -m evejax.sweep --config="$v2" --workdir="$root/eve_v2/ablate" --seeds="$seed" \
        --mode=run "${v2_runs[@]}"
    done
    # The recipe's stage-1.0 rule for contrast: the LLM frozen, only vision weights train.
    python -m evejax.sweep --config="$v2,train=copies" --workdir="$root/eve_v2/ablate_copies" \
      --seeds="${COPIES_SEEDS:-$seeds}" --runs=0 --mode=run
    ;;
  v1)
    bench
    python -m evejax.train --config=configs/text_llm.py:model=eve_v1_tiny \
      --workdir="$root/eve_v1/llm"
    for seed in ${seeds//,/ }; do
      python -m evejax.sweep --config="$v1" --workdir="$root/eve_v1/ablate" --seeds="$seed" \
        --mode=run
    done
    ;;
  report)
    python -m evejax.sweep --config="$v2" --workdir="$root/eve_v2/ablate" --seeds="$seeds" \
      "${v2_runs[@]}" --mode=results --plot --keys="$keys" --curves="$curves" --out="$out/decomposition"
    python -m evejax.sweep --config="$v2,train=copies" --workdir="$root/eve_v2/ablate_copies" \
      --seeds="$seeds" --runs=0 --mode=results --plot --keys="$keys" --curves="$curves" \
      --out="$out/decomposition_copies"
    python -m evejax.sweep --config="$v1" --workdir="$root/eve_v1/ablate" --seeds="$seeds" \
      --mode=results --plot --keys="$keys,eval/pal_loss" --curves="$curves" --out="$out/pal"
    ;;
  *)
    echo "usage: $0 v2|v1|report ROOT [OUT]" >&2
    exit 2
    ;;
esac
