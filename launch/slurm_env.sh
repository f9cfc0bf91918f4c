# shellcheck shell=bash
# Sourced in each SLURM task (one per node): the multi-process settings evejax's trainer reads
# (evejax/sharding/distributed.py) from SLURM's variables. Process 0 runs on the job's first node
# and hosts the coordinator; the port is derived from the job id so jobs sharing a node differ.
: "${SLURM_JOB_ID:?not inside a SLURM job}" "${SLURM_NTASKS:?}" "${SLURM_PROCID:?}"
: "${SLURM_JOB_NODELIST:?}"
first_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export JAX_COORDINATOR_ADDRESS="$first_node:${JAX_PORT:-$((20000 + SLURM_JOB_ID % 20000))}"
export JAX_NUM_PROCESSES="$SLURM_NTASKS"
export JAX_PROCESS_ID="$SLURM_PROCID"
