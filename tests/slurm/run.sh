#!/usr/bin/env bash
# Starts a single-node Slurm (slurmctld + slurmd, AuthType=auth/none) in a temporary directory
# and runs the `cluster` example through `srun -n 3 --overcommit --mpi=pmix` (Open MPI; MPICH
# would need --mpi=pmi2). Run it as root, after
#   apt-get install -y slurmctld slurmd slurm-client openmpi-bin libopenmpi-dev
# It stops both daemons and removes the directory on exit. Exit status: the example's.
set -euo pipefail
cd "$(dirname "$0")/../.."

for tool in slurmctld slurmd srun; do
    command -v "$tool" >/dev/null 2>&1 || {
        echo "slurm: $tool is not installed (apt-get install -y slurmctld slurmd slurm-client)"
        exit 1
    }
done
[[ $(id -u) == 0 ]] || { echo "slurm: run as root (SlurmUser=root)"; exit 1; }

export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target}
# The same cargo call as `cargo xtask bench` makes with MPI (xtask/src/bench.rs,
# RELEASE_BUILD_WITH_MPI): CI then compiles the release dependencies once, not twice.
cargo build --release -p parjob-bench -p parjob --features parjob-bench/mpi,parjob/mpi \
    --bin parjob-bench --example cluster
example=$CARGO_TARGET_DIR/release/examples/cluster

dir=$(mktemp -d /tmp/parjob-slurm.XXXXXX)
host=$(hostname -s)
cpus=$(nproc)
mkdir -p "$dir/state" "$dir/spool"
cat >"$dir/slurm.conf" <<CONF
ClusterName=parjob
SlurmctldHost=$host(127.0.0.1)
AuthType=auth/none
CredType=cred/none
SlurmUser=root
SlurmdUser=root
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/builtin
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
MpiDefault=none
ReturnToService=2
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd.log
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=16000
PartitionName=debug Nodes=$host Default=YES State=UP OverSubscribe=FORCE
CONF
export SLURM_CONF=$dir/slurm.conf

cleanup() {
    for pidfile in "$dir/slurmd.pid" "$dir/slurmctld.pid"; do
        [[ -s $pidfile ]] && kill "$(cat "$pidfile")" 2>/dev/null || true
    done
    sleep 1
    rm -rf "$dir"
}
trap cleanup EXIT

slurmctld -i
slurmd
# Wait (bounded) for the node to come up.
for _ in $(seq 1 60); do
    if sinfo -h -o %t 2>/dev/null | grep -qE '^(idle|mix|alloc)'; then
        break
    fi
    sleep 0.5
done
sinfo

export OMPI_MCA_btl_tcp_if_include=lo OMPI_MCA_oob_tcp_if_include=lo OMPI_MCA_mpi_yield_when_idle=1
# One local worker per rank, so that the CPU-bound lesson compares 1 rank with 2.
export PARJOB_MPI_WORKERS_PER_RANK=1
timeout 300 srun -n 3 --overcommit --mpi=pmix "$example"
