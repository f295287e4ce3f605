"""A real SLURM cluster of two nodes on this one machine: munge, slurmctld and two slurmd processes with
their own config, for the launcher's tests and for trying `cherry_megatron.launch.slurm` without a cluster.

    python tools/local_slurm.py start DIR     # prints the SLURM_CONF to export
    python tools/local_slurm.py stop DIR

Needs root and the Debian packages (launchers/slurm/install_packages.sh installs them). The recipe, and
why each setting, is the one measured on this machine: cgroup plugins do not work here (no freezer
namespace), so processes are tracked by /proc; nodes n1 and n2 share the host's address (127.0.0.1,
added to /etc/hosts so they resolve as MASTER_ADDR) on their own ports; daemons are stopped by their pid
files, never by name, so a real cluster's daemons on the same host are left alone.
"""
from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

NODES = ("n1", "n2")
CONF = """ClusterName=cherry
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool/%n
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.%n.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
SlurmdParameters=config_overrides
SchedulerParameters=batch_sched_delay=0
MailProg=/bin/true
ReturnToService=2
KillWait=30
{nodes}
PartitionName=debug Nodes={node_list} Default=YES MaxTime=INFINITE State=UP
"""


class LocalSlurm:
    def __init__(self, root: Path, cpus_per_node: int = 2, ctld_port: int = 16817, first_node_port: int = 17001):
        self.root, self.cpus, self.ctld_port, self.node_port = Path(root).resolve(), cpus_per_node, ctld_port, first_node_port
        self.conf = self.root / "slurm.conf"
        self.started_munge = False

    @property
    def env(self) -> dict:
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def run(self, *cmd: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(cmd, env=self.env, capture_output=True, text=True, check=check, timeout=60)

    def start(self, timeout: float = 60) -> None:
        try:
            self._start(timeout)
        except BaseException:
            self.stop()
            raise

    def _start(self, timeout: float) -> None:
        host = socket.gethostname().split(".")[0]
        for d in ("state", *(f"spool/{n}" for n in NODES)):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        nodes = "\n".join(f"NodeName={n} NodeHostname={host} NodeAddr=127.0.0.1 Port={self.node_port + i} "
                          f"CPUs={self.cpus} State=UNKNOWN" for i, n in enumerate(NODES))
        self.conf.write_text(CONF.format(host=host, ctld_port=self.ctld_port, root=self.root, nodes=nodes,
                                         node_list=",".join(NODES)))
        hosts = Path("/etc/hosts")
        if not any(line.split()[1:] == list(NODES) for line in hosts.read_text().splitlines() if line.strip()):
            with hosts.open("a") as f:
                f.write(f"127.0.0.1 {' '.join(NODES)}\n")
        self._start_munge()
        subprocess.run(["slurmctld", "-f", str(self.conf)], check=True, env=self.env, timeout=30)
        for n in NODES:
            subprocess.run(["slurmd", "-N", n, "-f", str(self.conf)], check=True, env=self.env, timeout=30)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            states = self.run("sinfo", "-h", "-N", "-o", "%T", check=False).stdout.split()
            if len(states) == len(NODES) and all(s == "idle" for s in states):
                return
            time.sleep(0.5)
        raise RuntimeError(f"SLURM nodes not idle after {timeout:.0f} s: {states}; see {self.root}/*.log")

    def _start_munge(self) -> None:
        if subprocess.run("munge -n | unmunge", shell=True, capture_output=True).returncode == 0:
            return
        if not Path("/etc/munge/munge.key").exists():
            subprocess.run(["mungekey", "--create"], check=True)
        subprocess.run(["install", "-d", "-o", "munge", "-g", "munge", "/run/munge"], check=True)
        subprocess.run(["runuser", "-u", "munge", "--", "/usr/sbin/munged"], check=True)
        self.started_munge = True

    def stop(self, timeout: float = 30) -> None:
        """Cancel every job (their processes outlive slurmd otherwise), then stop the daemons and wait."""
        if self.conf.exists() and (self.root / "slurmctld.pid").exists():
            self.run("scancel", "--full", "--user", "root", check=False)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and self.run("squeue", "-h", check=False).stdout.strip():
                time.sleep(0.5)
        pidfiles = [self.root / f"slurmd.{n}.pid" for n in NODES] + [self.root / "slurmctld.pid"]
        if self.started_munge:
            pidfiles.append(Path("/run/munge/munged.pid"))
        pids = []
        for pidfile in pidfiles:
            try:
                pids.append(int(pidfile.read_text().strip()))
                os.kill(pids[-1], signal.SIGTERM)
            except (FileNotFoundError, ValueError, ProcessLookupError):
                pass
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and any(Path(f"/proc/{pid}").exists() for pid in pids):
            time.sleep(0.2)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("action", choices=("start", "stop"))
    p.add_argument("dir", type=Path)
    args = p.parse_args(argv)
    cluster = LocalSlurm(args.dir)
    if args.action == "start":
        cluster.start()
        print(f"export SLURM_CONF={cluster.conf}")
    else:
        cluster.stop()


if __name__ == "__main__":
    main()
