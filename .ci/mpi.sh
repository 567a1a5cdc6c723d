#!/usr/bin/env bash
# The MPI backend: lint it with the `mpi` feature, then run its suite (tests/mpi.rs) under
# mpirun with 3 and 5 ranks, oversubscribed, run the `cluster` example once, and once more
# through a one-node Slurm (tests/slurm/run.sh).
#
# Open MPI (and libclang, for rsmpi's bindgen) is installed when `mpirun` is missing. CI sets
# PARJOB_MPI_REQUIRED=1 (.ci/run does), which turns an MPI that cannot be installed or a suite
# that did not run into a failure; without it, a machine that cannot have MPI prints one line
# saying the MPI suite was not run and exits 0.
#
# The environment: Open MPI refuses root without the two ALLOW variables; traffic stays on
# loopback; yield_when_idle keeps busy-polling ranks from starving one another when there are
# more ranks than cores; --enable-recovery lets rank 0 outlive the rank the last case kills
# (without it mpirun ends the whole job about 1 s after a rank dies).
set -euo pipefail
cd "$(dirname "$0")/.."

required=${PARJOB_MPI_REQUIRED:-0}
skip() {
    if [[ $required == 1 ]]; then
        echo "mpi: FAILED, the MPI suite could not run (PARJOB_MPI_REQUIRED=1): $*"
        exit 1
    fi
    echo "mpi: SKIPPED, the MPI suite was not run: $* (run .ci/mpi.sh on a machine with Open MPI)"
    exit 0
}

if ! command -v mpirun >/dev/null 2>&1; then
    if [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null 2>&1; then
        echo "mpi: installing Open MPI and libclang"
        { apt-get install -y openmpi-bin libopenmpi-dev libclang1-14 libclang-common-14-dev ||
            { apt-get update && apt-get install -y openmpi-bin libopenmpi-dev libclang1-14 \
                libclang-common-14-dev; }; } >/tmp/parjob-mpi-apt.log 2>&1 ||
            skip "apt-get could not install Open MPI (log: /tmp/parjob-mpi-apt.log)"
    fi
    command -v mpirun >/dev/null 2>&1 || skip "mpirun is not installed and could not be"
fi

export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
export OMPI_MCA_btl_tcp_if_include=lo OMPI_MCA_oob_tcp_if_include=lo
export OMPI_MCA_mpi_yield_when_idle=1 OMPI_MCA_rmaps_base_oversubscribe=1
export PARJOB_MPI_REQUIRED=1

cargo clippy -p parjob-mpi -p parjob -p parjob-tests --all-targets --features parjob/mpi,parjob-tests/mpi \
    -- -D warnings
cargo test -p parjob-mpi --features mpi
for ranks in 3 5; do
    PARJOB_MPI_LAUNCH="mpirun --oversubscribe --enable-recovery -n $ranks" \
        cargo test -p parjob-tests --features mpi --test mpi
done

# Rank 0 SIGKILLed mid-run under --enable-recovery: the worker ranks must notice (rank 0 beats,
# and its pid is watched on its own host), stop their local workers and end, so that mpirun
# returns: no hang and no process of the suite left behind. (The suite cannot test this from
# inside rank 0.)
suite=$(cargo test -p parjob-tests --features mpi --test mpi --no-run --message-format=json 2>/dev/null |
    sed -n 's/.*"executable":"\([^"]*\)".*/\1/p' | tail -1)
[[ -x $suite ]] || { echo "mpi: cannot find the MPI suite's binary"; exit 1; }
rcfile=$(mktemp)
(
    PARJOB_MPI_CASES=million_tiny_tasks timeout 60 \
        mpirun --oversubscribe --enable-recovery -n 3 "$suite" >/dev/null 2>&1
    echo $? >"$rcfile"
) &
sleep 3
for pid in $(pgrep -f "$suite" || true); do
    if tr '\0' '\n' <"/proc/$pid/environ" 2>/dev/null | grep -qx OMPI_COMM_WORLD_RANK=0; then
        kill -9 "$pid"
        break
    fi
done
wait
rc=$(cat "$rcfile")
rm -f "$rcfile"
sleep 1
if [[ $rc == 124 ]] || pgrep -f "$suite" >/dev/null; then
    echo "mpi: FAILED, after rank 0 was killed the job hung or left processes behind"
    pgrep -af "$suite" || true
    exit 1
fi
echo "mpi: rank 0 killed mid-run: every rank ended by itself (mpirun status $rc)"

# The same cargo call as `cargo xtask bench` makes with MPI (xtask/src/bench.rs,
# RELEASE_BUILD_WITH_MPI): CI then compiles the release dependencies once, not twice.
cargo build --release -p parjob-bench -p parjob --features parjob-bench/mpi,parjob/mpi \
    --bin parjob-bench --example cluster
# One local worker per rank, so that the CPU-bound lesson compares 1 rank with 2.
PARJOB_MPI_WORKERS_PER_RANK=1 mpirun --oversubscribe -n 3 target/release/examples/cluster

# Slurm: a one-node slurmctld + slurmd, the example through `srun --mpi=pmix` (about 20 s once
# installed). Slurm is installed when missing; a machine that cannot have it says so in one
# line (Slurm is how users launch, not a part of parjob, so it does not fail the build).
if ! command -v slurmd >/dev/null 2>&1 && [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null 2>&1; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y slurmctld slurmd slurm-client \
        >/tmp/parjob-slurm-apt.log 2>&1 || true
fi
if command -v slurmd >/dev/null 2>&1 && [[ $(id -u) == 0 ]]; then
    tests/slurm/run.sh
else
    echo "slurm: SKIPPED, slurmd is not installed or this is not root: tests/slurm/run.sh was not run"
fi
