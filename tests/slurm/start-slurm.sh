#!/usr/bin/env bash
# start-slurm.sh - bring up a throw-away, one-node SLURM cluster on loopback so that the
# project's SLURM profile (profiles/slurm) is tested against a real slurmctld/slurmd.
# Idempotent: a second run while the cluster is up only checks its health; a run with changed
# settings rewrites the configuration and restarts the daemons.
#
# Needs root and Debian 12 (bookworm): slurmctld slurmd slurm-client munge (SLURM 22.05),
# installed with apt-get when missing. No accounting daemon: `sacct` does not work, so
# Snakemake must use `--slurm-status-command squeue` (MinJobAge below makes that possible).
#
# Settings (environment):
#   SLURM_BASE=/tmp/montessori-slurm  state, logs (log/jobcomp.log: one line per finished job),
#                                     pid files, fake GPU device files
#   SLURM_PARTITION=cpu               the default partition
#   SLURM_GPU_PARTITION=              a second partition on the same node (empty: none), so a
#                                     test can see GPU jobs land in the GPU partition
#   SLURM_FAKE_GPUS=0                 N > 0: the node advertises N GPUs of type SLURM_GPU_TYPE
#                                     (Gres=gpu:TYPE:N), backed by plain files, so --gpus=TYPE:1
#                                     requests are scheduled and CUDA_VISIBLE_DEVICES is set
#   SLURM_GPU_TYPE=h100               the GRES type, i.e. what the profile's gpu_model asks for
#   SLURM_NODE_CPUS=, SLURM_NODE_MEM_MB=
#                                     advertise this many CPUs / MB instead of the detected
#                                     hardware (slurmd trusts slurm.conf: config_overrides), so
#                                     a profile written for a GPU node (8 CPUs per GPU, tens of
#                                     GB) schedules unchanged on a small machine. Nothing is
#                                     enforced: there are no cgroups and no CPU binding.
set -euo pipefail

SLURM_BASE=${SLURM_BASE:-/tmp/montessori-slurm}
SLURM_PARTITION=${SLURM_PARTITION:-cpu}
SLURM_GPU_PARTITION=${SLURM_GPU_PARTITION:-}
SLURM_FAKE_GPUS=${SLURM_FAKE_GPUS:-0}
SLURM_GPU_TYPE=${SLURM_GPU_TYPE:-h100}
SLURM_NODE_CPUS=${SLURM_NODE_CPUS:-}
SLURM_NODE_MEM_MB=${SLURM_NODE_MEM_MB:-}
ETC=/etc/slurm
NODE=localhost
CLUSTER=ci
RUN=$SLURM_BASE/run
LOG=$SLURM_BASE/log

log() { printf '[start-slurm %s] %s\n' "$(date +%T)" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }
pid_alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
wait_for() { # tries (0.1 s each) command...
    local n=$1; shift
    for _ in $(seq "$n"); do "$@" >/dev/null 2>&1 && return 0; sleep 0.1; done
    return 1
}
stop_pid() { # pidfile
    local pid
    if pid_alive "$1"; then
        pid=$(cat "$1"); kill "$pid"
        for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    fi
}

[ "$(id -u)" -eq 0 ] || die "must run as root (it installs packages and writes /etc/slurm)"
[[ "$SLURM_FAKE_GPUS" =~ ^[0-9]+$ ]] || die "SLURM_FAKE_GPUS must be a whole number, got '$SLURM_FAKE_GPUS'"
[[ "$SLURM_GPU_TYPE" =~ ^[A-Za-z0-9_.]+$ ]] || die "SLURM_GPU_TYPE must be a plain name, got '$SLURM_GPU_TYPE'"

# ------------------------------------------------------------ packages
pkgs=(slurmctld slurmd slurm-client munge)
missing=0
for b in slurmctld slurmd sbatch munged; do command -v "$b" >/dev/null 2>&1 || missing=1; done
if [ "$missing" = 1 ]; then
    command -v apt-get >/dev/null 2>&1 || die "SLURM is not installed and there is no apt-get to install ${pkgs[*]}"
    log "installing ${pkgs[*]}"
    apt-get update -qq
    # --no-install-recommends skips slurm-wlm-plugins (hdf5, rrd, ...). The packages' own
    # service start is refused by policy-rc.d in containers; this script starts the daemons.
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        "${pkgs[@]}" >/dev/null
fi

mkdir -p "$SLURM_BASE"/state/ctld "$SLURM_BASE"/state/d "$LOG" "$RUN"

# ------------------------------------------------------------ munge
if [ ! -s /etc/munge/munge.key ]; then   # normally made by the Debian postinst
    log "creating munge key"
    mungekey --create --keyfile=/etc/munge/munge.key --force
fi
chown munge:munge /etc/munge/munge.key && chmod 0400 /etc/munge/munge.key
# /run is a tmpfs and no init system runs here: make munged's directories by hand.
install -d -o munge -g munge -m 0755 /run/munge
install -d -o munge -g munge -m 0700 /var/log/munge
install -d -o munge -g munge -m 0711 /var/lib/munge
munge_ok() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }
if pid_alive /run/munge/munged.pid && munge_ok; then
    log "munged already running (pid $(cat /run/munge/munged.pid))"
else
    rm -f /run/munge/munged.pid /run/munge/munge.socket.2*
    log "starting munged"
    runuser -u munge -- /usr/sbin/munged     # it refuses to run as root
    wait_for 50 munge_ok || die "munge does not work; see /var/log/munge/munged.log"
fi

# ------------------------------------------------------------ configuration
# Hardware as slurmd sees it, e.g. "NodeName=vm CPUs=2 Boards=1 SocketsPerBoard=1
# CoresPerSocket=2 ThreadsPerCore=1 RealMemory=24105"
hw=$(slurmd -C | head -1)
getf() { sed -n "s/.*\b$1=\([0-9]*\).*/\1/p" <<<"$hw"; }
DETECTED_MEM=$(getf RealMemory)
if [ -n "$SLURM_NODE_CPUS" ]; then
    # An advertised size different from the hardware: one socket, one thread per core.
    [[ "$SLURM_NODE_CPUS" =~ ^[1-9][0-9]*$ ]] || die "SLURM_NODE_CPUS must be a positive number, got '$SLURM_NODE_CPUS'"
    NODE_CPUS="CPUs=$SLURM_NODE_CPUS Sockets=1 CoresPerSocket=$SLURM_NODE_CPUS ThreadsPerCore=1"
else
    NODE_CPUS="CPUs=$(getf CPUs) Sockets=$(getf SocketsPerBoard) CoresPerSocket=$(getf CoresPerSocket) ThreadsPerCore=$(getf ThreadsPerCore)"
fi
# Without config_overrides, more RealMemory than slurmd detects drains the node ("Low RealMemory").
MEM=${SLURM_NODE_MEM_MB:-$(( DETECTED_MEM * 9 / 10 ))}
OVERRIDES=""
if [ -n "$SLURM_NODE_CPUS$SLURM_NODE_MEM_MB" ]; then
    OVERRIDES="SlurmdParameters=config_overrides"
    # task/affinity would bind tasks to CPU ids the machine does not have.
    TASK=task/none
else
    TASK=task/affinity
fi

GRES_NODE=""; GRES_TYPES=""; gres_conf=""
if [ "$SLURM_FAKE_GPUS" -gt 0 ]; then
    # One device node per GPU (slurmd accepts only character or block devices; these are
    # copies of /dev/null), numbered so that each GPU has its own index and two one-GPU jobs
    # running at once get different CUDA_VISIBLE_DEVICES. The GRES type is what
    # `--gpus=TYPE:N` (the SLURM plugin's gpu_model) matches; an untyped gres cannot.
    mkdir -p "$SLURM_BASE/dev"
    for i in $(seq 0 $(( SLURM_FAKE_GPUS - 1 ))); do
        f=$SLURM_BASE/dev/gpu$i
        [ -c "$f" ] || { rm -f "$f"; mknod -m 0666 "$f" c 1 3 || die "cannot create the fake GPU device $f (mknod)"; }
    done
    GRES_NODE=" Gres=gpu:$SLURM_GPU_TYPE:$SLURM_FAKE_GPUS"; GRES_TYPES="GresTypes=gpu"
    gres_conf="NodeName=$NODE Name=gpu Type=$SLURM_GPU_TYPE File=$SLURM_BASE/dev/gpu[0-$(( SLURM_FAKE_GPUS - 1 ))]"
fi
PARTITIONS="PartitionName=$SLURM_PARTITION Nodes=ALL Default=YES MaxTime=INFINITE State=UP"
if [ -n "$SLURM_GPU_PARTITION" ] && [ "$SLURM_GPU_PARTITION" != "$SLURM_PARTITION" ]; then
    PARTITIONS="$PARTITIONS
PartitionName=$SLURM_GPU_PARTITION Nodes=ALL Default=NO MaxTime=INFINITE State=UP"
fi

slurm_conf=$(cat <<EOF
# Generated by tests/slurm/start-slurm.sh - one-node loopback cluster for tests.
ClusterName=$CLUSTER
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation=$SLURM_BASE/state/ctld
SlurmdSpoolDir=$SLURM_BASE/state/d
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd.pid
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
# No cgroups: works in containers without a cgroup tree.
ProctrackType=proctrack/linuxproc
TaskPlugin=$TASK
$OVERRIDES
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
# Without a default, a job with no --mem gets the whole node's memory and jobs run one by one.
DefMemPerCPU=500
# Reject requests the node cannot satisfy at submit time instead of leaving them PENDING forever.
EnforcePartLimits=ALL
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
# squeue shows finished jobs for MinJobAge seconds; Snakemake's squeue status mode needs
# MinJobAge >= 3 * slurm-init-seconds-before-status-checks.
MinJobAge=600
# A permanent, greppable record of every finished job (partition, state, exit code).
JobCompType=jobcomp/filetxt
JobCompLoc=$LOG/jobcomp.log
MpiDefault=none
ReturnToService=2
MailProg=/bin/true
$GRES_TYPES
NodeName=$NODE NodeAddr=127.0.0.1 $NODE_CPUS RealMemory=$MEM$GRES_NODE State=UNKNOWN
$PARTITIONS
EOF
)

changed=0
put() { # file content mode: write only if different; empty content = remove
    local f=$1 c=$2 m=$3
    if [ -z "$c" ]; then
        [ -e "$f" ] && { rm -f "$f"; changed=1; }
        return 0
    fi
    if [ ! -f "$f" ] || [ "$(cat "$f")" != "$c" ]; then
        printf '%s\n' "$c" > "$f"; changed=1; log "wrote $f"
    fi
    chmod "$m" "$f"
}
mkdir -p "$ETC"
put "$ETC/slurm.conf" "$slurm_conf" 0644
put "$ETC/gres.conf"  "$gres_conf"  0644

if [ "$changed" = 1 ]; then   # plugin and node changes need a restart, not a reconfigure
    for d in slurmd slurmctld; do
        pid_alive "$RUN/$d.pid" && { log "configuration changed: stopping $d"; stop_pid "$RUN/$d.pid"; }
    done
fi

# ------------------------------------------------------------ slurmctld + slurmd
if pid_alive "$RUN/slurmctld.pid"; then
    log "slurmctld already running (pid $(cat "$RUN/slurmctld.pid"))"
else
    log "starting slurmctld"
    slurmctld -c            # -c: clean start, no jobs left from an earlier run
fi
wait_for 100 bash -c 'scontrol ping | grep -q UP' ||
    die "slurmctld did not come up; see $LOG/slurmctld.log"

if pid_alive "$RUN/slurmd.pid"; then
    log "slurmd already running (pid $(cat "$RUN/slurmd.pid"))"
else
    log "starting slurmd"
    slurmd -N "$NODE"       # -N: the node is 'localhost' whatever the hostname is
fi

node_ok() { case "$(sinfo -h -n "$NODE" -o %T 2>/dev/null | head -1)" in idle|mixed|allocated) return 0;; esac; return 1; }
if ! wait_for 150 node_ok; then
    # e.g. 'drained' or 'invalid' left over from an earlier configuration
    log "node is '$(sinfo -h -n "$NODE" -o %T | head -1)', trying to resume"
    scontrol update NodeName="$NODE" State=RESUME 2>/dev/null || true
    wait_for 50 node_ok || die "node is '$(sinfo -h -n "$NODE" -o %T | head -1)': $(scontrol show node "$NODE" | grep -o 'Reason=.*'); see $LOG/slurmd.log"
fi
log "SLURM is up (partitions: $SLURM_PARTITION${SLURM_GPU_PARTITION:+ $SLURM_GPU_PARTITION}; fake gpus: $SLURM_FAKE_GPUS x $SLURM_GPU_TYPE)"
sinfo -o '%P %a %l %D %T %N %c %m %G' >&2
