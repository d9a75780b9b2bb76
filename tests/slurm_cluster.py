"""A one-node SLURM cluster for the tests (issue 25): munged, slurmctld and slurmd started in a
temporary folder with their own slurm.conf, state, spool, logs and a fresh munge key, on free
ports, so that they clash neither with a system SLURM nor with another test session. Every
daemon is started in the foreground by this module and stopped by its pid.

Needs Debian's `slurm-wlm` and `munge` packages (`.ci/run` installs them) and root, as slurmd
starts jobs as the submitting user."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

DAEMONS = ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "squeue", "scancel", "scontrol", "sinfo")
INSTALL = "apt-get install slurm-wlm munge"
PARTITION = "debug"
MAX_TIME_MIN = 5  # the partition's MaxTime: a longer timeout_min is refused at submission


def _bin(name: str) -> str | None:
    return shutil.which(name, path=os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"]))


def missing() -> str | None:
    """Why no cluster can be started here, or None."""
    absent = [d for d in DAEMONS if not _bin(d)]
    if absent:
        return f"SLURM is not installed ({', '.join(absent)} not found): {INSTALL} (as root)"
    if os.geteuid() != 0:
        return "the test cluster's slurmd runs jobs as their user, so it needs root"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _node_line() -> str:
    """The node as slurmd itself sees it (`slurmd -C`: CPUs, sockets, cores, memory), so that the
    node never drains for claiming more than it has."""
    out = subprocess.run([_bin("slurmd"), "-C"], capture_output=True, text=True, check=True).stdout
    return next(line for line in out.splitlines() if line.startswith("NodeName="))


@dataclass
class SlurmCluster:
    root: Path
    conf: Path = field(init=False)
    env: dict = field(init=False)
    procs: list = field(default_factory=list)

    def __post_init__(self):
        self.conf = self.root / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}

    def run(self, *cmd: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(cmd, env=self.env, capture_output=True, text=True, check=check, timeout=60)

    def log(self, name: str) -> str:
        path = self.root / "log" / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def start(self) -> None:
        for sub in ("state", "spool", "log", "munge"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        munge = self.root / "munge"
        os.chmod(munge, 0o700)
        subprocess.run([_bin("mungekey"), "--create", f"--keyfile={munge / 'munge.key'}"], check=True,
                       capture_output=True)
        socket_path = munge / "munge.socket"
        self._daemon("munged", [_bin("munged"), "--foreground", "--force", f"--socket={socket_path}",
                                f"--key-file={munge / 'munge.key'}", f"--pid-file={munge / 'munged.pid'}",
                                f"--log-file={self.root / 'log' / 'munged.log'}",
                                f"--seed-file={munge / 'munged.seed'}"])
        self._wait(lambda: socket_path.exists(), "munged", 20)
        self.conf.write_text(self._slurm_conf(socket_path))
        self._daemon("slurmctld", [_bin("slurmctld"), "-D", "-i", "-f", str(self.conf)])
        self._wait(lambda: self.run("scontrol", "ping", check=False).stdout.count("UP") > 0, "slurmctld", 30)
        self._daemon("slurmd", [_bin("slurmd"), "-D", "-f", str(self.conf), "-N", self.node])
        self._wait(self._idle, "slurmd", 60)

    def _slurm_conf(self, munge_socket: Path) -> str:
        node = _node_line()
        self.node = node.split()[0].split("=", 1)[1]
        r, log = self.root, self.root / "log"
        return f"""\
ClusterName=idmaptest
SlurmctldHost={self.node}(127.0.0.1)
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={munge_socket},cred_expire=10
StateSaveLocation={r / 'state'}
SlurmdSpoolDir={r / 'spool'}
SlurmctldPidFile={r / 'slurmctld.pid'}
SlurmdPidFile={r / 'slurmd.pid'}
SlurmctldLogFile={log / 'slurmctld.log'}
SlurmdLogFile={log / 'slurmd.log'}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SwitchType=switch/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=2
ReturnToService=2
JobRequeue=1
EnforcePartLimits=ALL
KillWait=5
MinJobAge=600
InactiveLimit=0
SlurmctldParameters=preempt_send_user_signal
{node} NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName={PARTITION} Nodes={self.node} Default=YES MaxTime={MAX_TIME_MIN} State=UP
"""

    def _daemon(self, name: str, cmd: list[str]) -> None:
        out = open(self.root / "log" / f"{name}.out", "w")
        self.procs.append((name, subprocess.Popen(cmd, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                                  start_new_session=True)))

    def _idle(self) -> bool:
        state = self.run("sinfo", "-h", "-N", "-o", "%t", check=False).stdout.split()
        return state == ["idle"]

    def _wait(self, ready, name: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            for n, proc in self.procs:
                if proc.poll() is not None:
                    raise RuntimeError(f"{n} exited {proc.returncode}:\n{self.log(n)}"
                                       f"{(self.root / 'log' / f'{n}.out').read_text()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name} not ready within {timeout} s:\n{self.log(name)}")
            time.sleep(0.2)

    def stop(self) -> None:
        """Each daemon this cluster started, by its pid, the last started first; the jobs first,
        so that no job step outlives the slurmd that started it."""
        if self.procs:
            self.run("scancel", "--me", check=False)
            deadline = time.monotonic() + 30
            while self.run("squeue", "--me", "--noheader", check=False).stdout.strip():
                if time.monotonic() > deadline:
                    break
                time.sleep(0.5)
        for _, proc in reversed(self.procs):
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.procs.clear()

    def version(self) -> str:
        return self.run("sinfo", "--version").stdout.strip()


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    """A one-node SLURM cluster for the whole test session; tests pass `cluster.env` (SLURM_CONF)
    to what they start. Skipped where SLURM is not installed, except in CI, which installs it."""
    why = missing()
    if why:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI must run the SLURM tests, but {why}")
        pytest.skip(why)
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
