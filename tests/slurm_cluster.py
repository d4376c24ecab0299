"""A real single-node SLURM cluster for the tests: munged, slurmctld and slurmd on 127.0.0.1.

`start_cluster(state_dir)` writes /etc/slurm/slurm.conf (the job's own srun reads the config only
from there: a SLURM_CONF of the submitting shell does not reach it), starts the three daemons in the
foreground as our children, and waits until `sinfo` shows the node idle. `SlurmCluster.stop()`
cancels what is still queued, stops the daemons it started by pid, and removes the slurm.conf
(or puts back the one it replaced): a slurm.conf whose controller is gone makes the SLURM executor
plugin's `scontrol show config` hang for 10 s in every later `snakemake` call.

Needs root (slurmd runs jobs as their user) and the Debian packages slurm-wlm and munge.
Anything missing raises ClusterUnavailable with the reason; the caller decides skip or fail.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

SLURM_CONF = Path("/etc/slurm/slurm.conf")
GRES_CONF = SLURM_CONF.with_name("gres.conf")
OUR_MARK = "# written by gmmvit tests/slurm_cluster.py"
PARTITION = "debug"
BINARIES = ("munged", "slurmctld", "slurmd", "sinfo", "squeue", "sbatch", "scontrol", "scancel", "srun")
CONTROLLER_PORT, NODE_PORT = 6817, 6818


class ClusterUnavailable(RuntimeError):
    """SLURM cannot be installed here or did not start; the message says why."""


@dataclass
class SlurmCluster:
    state_dir: Path
    node: str
    partition: str = PARTITION
    daemons: dict[str, subprocess.Popen] = field(default_factory=dict)
    replaced_conf: bytes | None = None  # the slurm.conf we overwrote (one of ours from a crashed run)
    replaced_gres: bytes | None = None  # likewise gres.conf

    def jobs(self) -> list[dict[str, str]]:
        """Every job the controller knows, finished ones too (MinJobAge keeps them an hour)."""
        out = run(["squeue", "--noheader", "--states=all", "--format=%i|%T|%k|%N"])
        return [dict(zip(("id", "state", "comment", "node"), line.split("|")))
                for line in out.splitlines() if line.strip()]

    def logs(self) -> str:
        return "\n".join(f"--- {path.name}\n{tail(path)}" for path in sorted(self.state_dir.glob("*.log")))

    def stop(self) -> None:
        if "slurmctld" in self.daemons and self.daemons["slurmctld"].poll() is None:
            # Jobs outlive slurmd (each runs under its own slurmstepd): cancel them while the
            # controller can still reach them, and wait until none runs.
            subprocess.run(["scancel", "--full", f"--partition={self.partition}"], capture_output=True,
                           timeout=30)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and any(
                    j["state"] in ("RUNNING", "PENDING", "COMPLETING") for j in self.jobs()):
                time.sleep(0.5)
        for name in ("slurmd", "slurmctld", "munged"):  # the reverse of the start order
            process = self.daemons.pop(name, None)
            if process is None or process.poll() is not None:
                continue
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)
        for conf, replaced in ((SLURM_CONF, self.replaced_conf), (GRES_CONF, self.replaced_gres)):
            if conf.exists() and OUR_MARK in conf.read_text():
                if replaced is not None:
                    conf.write_bytes(replaced)
                else:
                    conf.unlink()


def run(command: list[str], timeout: float = 30) -> str:
    return subprocess.run(command, capture_output=True, text=True, check=True, timeout=timeout).stdout


def tail(path: Path, lines: int = 15) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else "(no log)"


def port_in_use(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


def node_memory_mb() -> int:
    """RealMemory for the node: 90% of MemTotal, so jobs asking for mem_mb are admitted."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 9 // 10 // 1024
    return 4000


def slurm_conf(state_dir: Path, node: str, munge_socket: Path) -> str:
    """A one-node cluster without accounting; every path absolute (the daemons chdir to /)."""
    cpus = os.cpu_count() or 1
    return f"""{OUR_MARK}; removed when the tests end
ClusterName=gmmvit-tests
SlurmctldHost={node}(127.0.0.1)
SlurmctldPort={CONTROLLER_PORT}
SlurmdPort={NODE_PORT}
SlurmUser=root
AuthType=auth/munge
AuthInfo=socket={munge_socket}
CredType=cred/munge
StateSaveLocation={state_dir}/ctld-state
SlurmdSpoolDir={state_dir}/slurmd-spool
SlurmctldPidFile={state_dir}/slurmctld.pid
SlurmdPidFile={state_dir}/slurmd.pid
SlurmctldLogFile={state_dir}/slurmctld.log
SlurmdLogFile={state_dir}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
# squeue must still see finished jobs when the executor asks (there is no sacct to ask)
MinJobAge=3600
ReturnToService=2
SchedulerParameters=sched_interval=1
# one GPU as a generic resource without a device (gres.conf beside this file): the controller
# schedules and records --gpus requests; a job's program sees no GPU
GresTypes=gpu
NodeName={node} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={node_memory_mb()} Gres=gpu:1 State=UNKNOWN
PartitionName={PARTITION} Nodes={node} Default=YES MaxTime=INFINITE State=UP
"""


def wait_for(condition, seconds: float, what: str, cluster: SlurmCluster) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for name, process in cluster.daemons.items():
            if process.poll() is not None:
                raise ClusterUnavailable(f"{name} exited with {process.returncode} while waiting for "
                                         f"{what}\n{cluster.logs()}")
        if condition():
            return
        time.sleep(0.3)
    raise ClusterUnavailable(f"timed out after {seconds:.0f} s waiting for {what}\n{cluster.logs()}")


def node_state(node: str) -> str:
    try:
        return run(["sinfo", "--noheader", "--Node", f"--nodes={node}", "--format=%T"], timeout=10).strip()
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired):
        return ""


def start_cluster(state_dir: Path) -> SlurmCluster:
    """Start munged, slurmctld and slurmd; on any failure stop what started and raise."""
    missing = [b for b in BINARIES if shutil.which(b) is None]
    if missing:
        raise ClusterUnavailable(f"not installed: {', '.join(missing)} "
                                 "(apt-get install slurm-wlm munge)")
    if os.geteuid() != 0:
        raise ClusterUnavailable("slurmd must run as root to start jobs; these tests are not root")
    for conf in (SLURM_CONF, GRES_CONF):
        if conf.exists() and OUR_MARK not in conf.read_text():
            raise ClusterUnavailable(f"{conf} belongs to a real SLURM installation; not replacing it")
    busy = [p for p in (CONTROLLER_PORT, NODE_PORT) if port_in_use(p)]
    if busy:
        raise ClusterUnavailable(f"port(s) {busy} already in use: another SLURM daemon runs here")

    node = socket.gethostname().split(".")[0]
    state_dir.mkdir(parents=True, exist_ok=True)
    cluster = SlurmCluster(state_dir=state_dir, node=node)
    try:
        # our own munge key and socket: no system munged is needed or disturbed
        munge_dir = state_dir / "munge"
        munge_dir.mkdir(mode=0o700, exist_ok=True)
        key = munge_dir / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        munge_socket = munge_dir / "munge.socket"
        cluster.daemons["munged"] = subprocess.Popen(
            ["munged", "--foreground", "--force", f"--socket={munge_socket}", f"--key-file={key}",
             f"--pid-file={munge_dir}/munged.pid", f"--seed-file={munge_dir}/munged.seed",
             f"--log-file={state_dir}/munged.log"],
            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        wait_for(munge_socket.exists, 15, "munged's socket", cluster)

        for sub in ("ctld-state", "slurmd-spool"):
            (state_dir / sub).mkdir(exist_ok=True)
        SLURM_CONF.parent.mkdir(parents=True, exist_ok=True)
        cluster.replaced_conf = SLURM_CONF.read_bytes() if SLURM_CONF.exists() else None
        SLURM_CONF.write_text(slurm_conf(state_dir, node, munge_socket))
        cluster.replaced_gres = GRES_CONF.read_bytes() if GRES_CONF.exists() else None
        # slurmd counts a gpu only with a File; an empty file stands for the device
        (state_dir / "gpu0").touch()
        GRES_CONF.write_text(f"{OUR_MARK}; removed when the tests end\n"
                             f"NodeName={node} Name=gpu File={state_dir / 'gpu0'}\n")
        # -D: stay in the foreground, so the pid we hold is the daemon's; -i: ignore old state
        for name, args in (("slurmctld", ["-D", "-i"]), ("slurmd", ["-D"])):
            cluster.daemons[name] = subprocess.Popen(
                [name, *args, "-f", str(SLURM_CONF)], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        wait_for(lambda: node_state(node) == "idle", 60, f"node {node} to be idle in sinfo", cluster)
    except BaseException:
        cluster.stop()
        raise
    return cluster
