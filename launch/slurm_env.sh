# Shared by launch/precompute.sbatch and launch/distill.sbatch: environment, rendezvous, logs,
# and the preemption protocol. Sourced inside a Slurm batch job; it is not run on its own.
#
#   one srun task per node, each running torchrun with one worker per GPU (spec/deepspeed.md §7.1)
#   MASTER_ADDR  = first host of $SLURM_JOB_NODELIST,  MASTER_PORT = 20000 + job id % 20000
#   node rank    = $SLURM_NODEID (static rendezvous: global rank 0 lives on MASTER_ADDR)
#   logs         = $LOG_ROOT/<job name>-<job id>/attempt-<restart count>/node<N>/...  (one file per rank)
#
# Knobs (environment variables; sbatch exports the submitting shell's environment to the job):
#   OVI_DMD_ROOT    repository checkout (default: the directory sbatch was run from)
#   PYTHON          interpreter with torch/deepspeed installed (default: python3)
#   GPUS_PER_NODE   workers per node (default: $SLURM_GPUS_ON_NODE, else nvidia-smi's count, else 1)
#   LOG_ROOT        where per-job log folders go (default: $OVI_DMD_ROOT/logs)
#   NODE_LOCAL_TMP  node-local scratch for JIT caches (default: ${TMPDIR:-/tmp})

set -euo pipefail

OVI_DMD_ROOT="${OVI_DMD_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}"
PYTHON="${PYTHON:-python3}"
cd "$OVI_DMD_ROOT"
export PYTHONPATH="$OVI_DMD_ROOT${PYTHONPATH:+:$PYTHONPATH}"

if [ -z "${GPUS_PER_NODE:-}" ]; then
    if [ -n "${SLURM_GPUS_ON_NODE:-}" ]; then
        GPUS_PER_NODE="$SLURM_GPUS_ON_NODE"
    elif command -v nvidia-smi >/dev/null 2>&1; then
        GPUS_PER_NODE="$(nvidia-smi -L | grep -c '^GPU')"
    else
        GPUS_PER_NODE=1
    fi
fi
export GPUS_PER_NODE

# --- rendezvous ------------------------------------------------------------------------------
# The first node's NodeAddr (= its name unless slurm.conf says otherwise): node names need not resolve.
MASTER_NODE="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"
MASTER_ADDR="$(scontrol show node "$MASTER_NODE" 2>/dev/null | grep -o 'NodeAddr=[^ ]*' | cut -d= -f2)"
MASTER_ADDR="${MASTER_ADDR:-$MASTER_NODE}"
MASTER_PORT="${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}"   # per job: no clash between jobs on one node
export MASTER_ADDR MASTER_PORT
NNODES="${SLURM_NNODES:-1}"

# --- PyTorch / DeepSpeed ---------------------------------------------------------------------
export DEEPSPEED_TIMEOUT="${DEEPSPEED_TIMEOUT:-60}"          # minutes; checkpoints of 3 x 11B engines outlast the 10-min default
export PYTORCH_CUDA_ALLOC_CONF="${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
NODE_LOCAL_TMP="${NODE_LOCAL_TMP:-${TMPDIR:-/tmp}}"
# JIT caches on node-local disk: concurrent builds on shared storage race, Triton warns about NFS.
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$NODE_LOCAL_TMP/ovi_dmd-${USER:-$(id -un)}/torch_extensions}"
export TRITON_CACHE_DIR="${TRITON_CACHE_DIR:-$NODE_LOCAL_TMP/ovi_dmd-${USER:-$(id -un)}/triton}"

# --- NCCL --------------------------------------------------------------------------------------
# NCCL_DEBUG=WARN in production, INFO while bringing a cluster up (shows the NIC/IB, rings, trees).
export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"
# Hang -> crash that Slurm sees (--kill-on-bad-exit ends the other nodes). Recent PyTorch already
# defaults to tearing down on a collective error; this keeps it explicit.
export TORCH_NCCL_ASYNC_ERROR_HANDLING="${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}"
# Site-specific, take them from your cluster's documentation and export them before sbatch
# (not set here on purpose):
#   NCCL_SOCKET_IFNAME=ib0 (or ^lo,docker)   bootstrap / socket interface
#   NCCL_IB_HCA=mlx5_0,mlx5_1,...            InfiniBand HCAs to use
#   TORCH_NCCL_DUMP_ON_TIMEOUT=1 TORCH_NCCL_TRACE_BUFFER_SIZE=2000   flight recorder for hang forensics

# --- logs ------------------------------------------------------------------------------------
ATTEMPT="${SLURM_RESTART_COUNT:-0}"
LOG_ROOT="${LOG_ROOT:-$OVI_DMD_ROOT/logs}"
JOB_LOG_DIR="$LOG_ROOT/${SLURM_JOB_NAME:-job}-$SLURM_JOB_ID"
ATTEMPT_LOG_DIR="$JOB_LOG_DIR/attempt-$ATTEMPT"
export ATTEMPT_LOG_DIR
mkdir -p "$ATTEMPT_LOG_DIR"
scontrol show hostnames "$SLURM_JOB_NODELIST" | sed "s/\$/ slots=$GPUS_PER_NODE/" > "$ATTEMPT_LOG_DIR/hostfile"

# One task per node gets every CPU of its node. Since Slurm 22.05 srun no longer inherits
# --cpus-per-task from the batch job, so it is passed on explicitly.
export SRUN_CPUS_PER_TASK="${SLURM_CPUS_PER_TASK:-${SLURM_CPUS_ON_NODE:-1}}"

echo "=== $(date -u +%FT%TZ) job $SLURM_JOB_ID attempt $ATTEMPT: $NNODES node(s) x $GPUS_PER_NODE worker(s)," \
     "master $MASTER_ADDR:$MASTER_PORT, logs $ATTEMPT_LOG_DIR ==="

# ovi_torchrun SCRIPT ARGS...: one srun task per node, each `torchrun` with GPUS_PER_NODE workers.
# Each worker's stdout/stderr goes to ATTEMPT_LOG_DIR/node<N>/<job id>_<random>/attempt_0/<local rank>/
# and is also tee'd (prefixed with the rank) into the job's --output file.
# SIGUSR1 is set to "ignore" before exec'ing torchrun: Slurm signals every process of a step, and
# torchrun has no USR1 handler (it would die and take its workers down). The disposition is
# inherited by the workers, and the trainer installs its own USR1 handler over it.
ovi_torchrun() {
    srun --nodes="$NNODES" --ntasks="$NNODES" --ntasks-per-node=1 --kill-on-bad-exit=1 --wait=60 \
        bash -c 'trap "" USR1; exec "$0" -m torch.distributed.run --nnodes="$SLURM_NNODES" \
            --nproc_per_node="$GPUS_PER_NODE" --node_rank="$SLURM_NODEID" \
            --master_addr="$MASTER_ADDR" --master_port="$MASTER_PORT" --rdzv_id="$SLURM_JOB_ID" --max_restarts=0 \
            --log-dir="$ATTEMPT_LOG_DIR/node$SLURM_NODEID" --tee=3 "$@"' "$PYTHON" "$@"
}

# ovi_run_preemptible MODE CMD...: run CMD (normally ovi_torchrun ...) in the background so that
# the batch shell can take Slurm's warning signal (#SBATCH --signal=B:USR1@SECONDS) while it waits.
#   MODE=forward  USR1 is passed to every process of the job's steps; the trainer finishes its
#                 step, checkpoints and exits 0; then the job is requeued and resumes from `latest`.
#   MODE=requeue  the job is requeued at once (Slurm stops the step with SIGTERM, then SIGKILL after
#                 KillWait); for work that resumes from what it has finished (precompute's shards).
# The return status is CMD's; a preempted job does not return (scontrol requeue ends this shell).
ovi_run_preemptible() {
    local mode="$1"; shift
    OVI_PREEMPTED=0 OVI_RESIGNAL_PID=
    trap '_ovi_on_preempt '"$mode" USR1
    "$@" &
    local pid=$! rc=0
    while :; do
        rc=0; wait "$pid" || rc=$?
        kill -0 "$pid" 2>/dev/null || break        # still running: wait was interrupted by the trap
    done
    rc=0; wait "$pid" || rc=$?                     # the child's own status (bash keeps it)
    trap "" USR1                                   # late signals: the step is over
    if [ -n "${OVI_RESIGNAL_PID:-}" ]; then kill "$OVI_RESIGNAL_PID" 2>/dev/null || true; fi
    if [ "$OVI_PREEMPTED" = 1 ]; then
        echo "=== $(date -u +%FT%TZ) job $SLURM_JOB_ID attempt $ATTEMPT: step exited $rc after the preemption signal; requeueing ==="
        _ovi_requeue
    fi
    return "$rc"
}

_ovi_on_preempt() {
    [ "$OVI_PREEMPTED" = 1 ] && return 0
    OVI_PREEMPTED=1
    echo "=== $(date -u +%FT%TZ) job $SLURM_JOB_ID attempt $ATTEMPT: preemption signal (USR1), mode $1 ==="
    case "$1" in
        forward)
            scancel --signal=USR1 "$SLURM_JOB_ID" || echo "scancel --signal=USR1 $SLURM_JOB_ID failed" >&2  # steps only
            # A worker still starting up (USR1 still ignored, no handler yet) misses it: repeat
            # until the step has ended. The trainer's flag is idempotent.
            ( while sleep "${OVI_RESIGNAL_EVERY:-30}"; do scancel --signal=USR1 "$SLURM_JOB_ID" || true; done ) &
            OVI_RESIGNAL_PID=$!
            ;;
        requeue) _ovi_requeue ;;
    esac
}

_ovi_requeue() {
    scontrol requeue "$SLURM_JOB_ID" || {
        echo "scontrol requeue $SLURM_JOB_ID failed (was the job submitted with --requeue? JobRequeue?)" >&2
        exit 1
    }
    # the controller now terminates this shell; do not start anything else meanwhile
    sleep 300
}
