"""Slurm on the test bed: munge, MariaDB + slurmdbd (sacct), slurmctld, one slurmd per node namespace."""

from __future__ import annotations

import os
import secrets
import shutil
import socket
from pathlib import Path

from . import procs, pyxis
from .config import (
    CLUSTER_NAME,
    MANAGED_MARK,
    MYSQL_PORT,
    NODE_BIN,
    PARTITION,
    SLURMDBD_PORT,
    STATE,
    Shape,
    host_ip,
    netns,
    node_dir,
    node_ip,
    node_name,
)
from .procs import LOGS, run

ETC = Path("/etc/slurm")
MANAGED_FILES = ("slurm.conf", "gres.conf", "slurmdbd.conf", "plugstack.conf")
BACKUP = STATE / "backup-etc-slurm"
MUNGE = STATE / "munge"
MYSQL = STATE / "mysql"


def ctld_host() -> str:
    return socket.gethostname().split(".")[0]


def slurm_conf(shape: Shape) -> str:
    gres = f" Gres=gpu:{shape.gpus_per_node}" if shape.gpus_per_node else ""
    nodes = "\n".join(
        f"NodeName={node_name(i)} NodeHostname={node_name(i)} NodeAddr={node_ip(i)} "
        f"CPUs={shape.cpus_per_node} RealMemory=8000{gres} State=UNKNOWN"
        for i in range(1, shape.nodes + 1)
    )
    return f"""{MANAGED_MARK}
ClusterName={CLUSTER_NAME}
SlurmctldHost={ctld_host()}({host_ip()})
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={MUNGE}/munge.socket.2
CredType=cred/munge
StateSaveLocation={STATE}/slurmctld
SlurmdSpoolDir={STATE}/slurmd/%n
SlurmctldPidFile={STATE}/run/slurmctld.pid
SlurmdPidFile={STATE}/run/slurmd-%n.pid
SlurmctldLogFile={LOGS}/slurmctld.log
SlurmdLogFile={LOGS}/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerParameters=batch_sched_delay=0
ReturnToService=2
SlurmdParameters=config_overrides
MpiDefault=none
MailProg=/bin/true
GresTypes=gpu
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost={host_ip()}
AccountingStoragePort={SLURMDBD_PORT}
JobCompType=jobcomp/none
{nodes}
PartitionName={PARTITION} Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""


def gres_conf(shape: Shape) -> str:
    if not shape.gpus_per_node:
        return f"{MANAGED_MARK}\nAutoDetect=off\n"
    last = shape.gpus_per_node - 1
    return (
        f"{MANAGED_MARK}\nAutoDetect=off\n"
        f"NodeName=node[1-{shape.nodes}] Name=gpu File={STATE}/dev/nvidia[0-{last}]\n"
    )


def slurmdbd_conf(password: str) -> str:
    return f"""{MANAGED_MARK}
AuthType=auth/munge
AuthInfo=socket={MUNGE}/munge.socket.2
DbdHost={ctld_host()}
DbdPort={SLURMDBD_PORT}
SlurmUser=root
PidFile={STATE}/run/slurmdbd.pid
LogFile={LOGS}/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort={MYSQL_PORT}
StorageUser=slurm
StoragePass={password}
StorageLoc=slurm_acct_db
"""


def _is_ours(path: Path) -> bool:
    try:
        return MANAGED_MARK in path.read_text()
    except OSError:
        return False


def write_configs(shape: Shape, dbd_password: str) -> None:
    """Write /etc/slurm/{slurm,gres,slurmdbd,plugstack}.conf, keeping any file there before in BACKUP."""
    ETC.mkdir(parents=True, exist_ok=True)
    BACKUP.mkdir(parents=True, exist_ok=True)
    texts = {"slurm.conf": slurm_conf(shape), "gres.conf": gres_conf(shape),
             "slurmdbd.conf": slurmdbd_conf(dbd_password), "plugstack.conf": pyxis.plugstack_conf()}
    for name, text in texts.items():
        target = ETC / name
        if target.exists() and not _is_ours(target) and not (BACKUP / name).exists():
            shutil.copy2(target, BACKUP / name)
        target.write_text(text)
        os.chmod(target, 0o600 if name == "slurmdbd.conf" else 0o644)


def restore_configs() -> None:
    for name in MANAGED_FILES:
        target = ETC / name
        if (BACKUP / name).exists():
            shutil.copy2(BACKUP / name, target)
        elif _is_ours(target):
            target.unlink()


def _port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


DEFAULT_MUNGE = Path("/run/munge")     # slurmctld's slurmdbd connection ignores AuthInfo=socket=


def link_default_munge() -> None:
    """Point /run/munge at the test bed's munge folder (an empty /run/munge is replaced)."""
    if DEFAULT_MUNGE.is_symlink():
        DEFAULT_MUNGE.unlink()
    elif DEFAULT_MUNGE.is_dir():
        if any(DEFAULT_MUNGE.iterdir()):
            raise RuntimeError(f"{DEFAULT_MUNGE} is in use by another munged: stop it first")
        DEFAULT_MUNGE.rmdir()
        (STATE / "had-run-munge").touch()
    DEFAULT_MUNGE.symlink_to(MUNGE)


def unlink_default_munge() -> None:
    if DEFAULT_MUNGE.is_symlink() and os.readlink(DEFAULT_MUNGE) == str(MUNGE):
        DEFAULT_MUNGE.unlink()
        if (STATE / "had-run-munge").exists():
            DEFAULT_MUNGE.mkdir()


def start_munge() -> None:
    MUNGE.mkdir(parents=True, exist_ok=True)
    os.chmod(MUNGE, 0o755)
    link_default_munge()
    key = MUNGE / "munge.key"
    if not key.exists():
        key.write_bytes(secrets.token_bytes(1024))
        os.chmod(key, 0o400)
    procs.spawn("munged", [
        "munged", "-F", "-f", f"--socket={MUNGE}/munge.socket.2", f"--key-file={key}",
        f"--pid-file={MUNGE}/munged.pid", f"--seed-file={MUNGE}/munged.seed",
        f"--log-file={LOGS}/munged.log",
    ])
    sock = MUNGE / "munge.socket.2"
    procs.wait_for("munged", sock.exists, 20, dead=lambda: procs.pid_of("munged") is None)


def start_mariadb() -> str:
    """Start a private MariaDB for slurmdbd; return the password of its 'slurm' user."""
    if not (MYSQL / "mysql").is_dir():
        MYSQL.mkdir(parents=True, exist_ok=True)
        run(["mariadb-install-db", "--no-defaults", f"--datadir={MYSQL}", "--user=root",
             "--auth-root-authentication-method=socket", "--skip-test-db"])
    sock = MYSQL / "mysqld.sock"
    procs.spawn("mariadb", [
        "mariadbd", "--no-defaults", f"--datadir={MYSQL}", f"--socket={sock}", f"--port={MYSQL_PORT}",
        "--bind-address=127.0.0.1", "--user=root", f"--pid-file={MYSQL}/mysqld.pid",
        f"--log-error={LOGS}/mariadb.err", "--skip-name-resolve", "--skip-log-bin",
        "--innodb-buffer-pool-size=64M", "--performance-schema=OFF", "--innodb-lock-wait-timeout=900",
    ])
    procs.wait_for("MariaDB", lambda: _port_open("127.0.0.1", MYSQL_PORT), 60,
                   dead=lambda: procs.pid_of("mariadb") is None)
    password = secrets.token_hex(16)
    sql = (f"CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '{password}'; "
           f"ALTER USER 'slurm'@'127.0.0.1' IDENTIFIED BY '{password}'; "
           "GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';")
    # The password travels on stdin, not on the command line.
    run(["mariadb", "--no-defaults", f"--socket={sock}", "-u", "root"], input=sql)
    return password


def start_slurmdbd() -> None:
    procs.spawn("slurmdbd", ["slurmdbd", "-D"])
    procs.wait_for("slurmdbd", lambda: _port_open(host_ip(), SLURMDBD_PORT), 60,
                   dead=lambda: procs.pid_of("slurmdbd") is None)


def start_slurmctld() -> None:
    for sub in ("slurmctld", "run", "slurmd"):
        (STATE / sub).mkdir(parents=True, exist_ok=True)
    procs.spawn("slurmctld", ["slurmctld", "-D"])
    procs.wait_for("slurmctld", lambda: run(["scontrol", "ping"], check=False).returncode == 0, 60,
                   dead=lambda: procs.pid_of("slurmctld") is None)
    clusters = run(["sacctmgr", "-n", "-P", "list", "cluster", "format=cluster"], check=False).stdout
    if CLUSTER_NAME not in clusters.split():
        run(["sacctmgr", "-i", "add", "cluster", CLUSTER_NAME])


def make_fake_gpus(shape: Shape) -> None:
    dev = STATE / "dev"
    dev.mkdir(parents=True, exist_ok=True)
    for g in range(shape.gpus_per_node):
        path = dev / f"nvidia{g}"
        if not path.exists():
            os.mknod(path, 0o666 | 0o020000, os.makedev(1, 3))   # a char device like /dev/null


def start_slurmd(i: int) -> None:
    """Start nodeI's slurmd in its own network, UTS and mount namespaces.

    Not `ip netns exec`: that remounts /sys and slurmd 22.05 then fails to start its cgroup plugin.
    Inside the node: hostname nodeI, a private /run (own docker socket, own podman run root),
    /tmp (own Ray temp dir) and /dev/shm (vLLM tells nodes apart by shared memory: with one
    /dev/shm for all, ranks on two nodes believe they share one and wait forever on each other's
    IPC sockets), the node's own /etc/containers, and an /etc/resolv.conf that fails at once.
    The host's name server is out of the nodes' reach: each reverse lookup (torch's TCPStore does
    one per connection) waited 2 x 5 s for it, which added 10-20 s to every vLLM start. Names
    come from /etc/hosts, as before; a cluster's working DNS answers such lookups as fast.
    """
    nd = node_dir(i)
    for sub in ("tmp", "etc-containers"):
        (nd / sub).mkdir(parents=True, exist_ok=True)
    os.chmod(nd / "tmp", 0o1777)
    (nd / "resolv.conf").write_text("# test-bed node: no name server (names come from /etc/hosts)\n"
                                    "nameserver 127.0.0.1\noptions timeout:1 attempts:1\n")
    setup = (
        f"set -e; hostname {node_name(i)}; "
        "mount -t tmpfs -o mode=755 svt-run /run; mkdir -p /run/lock /run/user; "
        f"ln -s {MUNGE} /run/munge; "
        f"mount --bind {nd}/tmp /tmp; "
        "mount -t tmpfs -o mode=1777,size=8g svt-shm /dev/shm; "
        f"mount --bind {nd}/etc-containers /etc/containers; "
        f"mount --bind {NODE_BIN} /usr/local/sbin; "
        f"if [ -f /etc/resolv.conf ]; then mount --bind {nd}/resolv.conf /etc/resolv.conf; fi; "
        f"exec slurmd -D -N {node_name(i)}"
    )
    procs.spawn(f"slurmd-{node_name(i)}", [
        "nsenter", f"--net=/run/netns/{netns(i)}", "--",
        "unshare", "--uts", "--mount", "--propagation", "slave", "--", "sh", "-c", setup,
    ])


def in_node(i: int, argv: list[str]) -> list[str]:
    """ARGV run inside nodeI's namespaces (network, UTS, mount), entered through its slurmd."""
    pid = procs.pid_of(f"slurmd-{node_name(i)}")
    if pid is None:
        raise RuntimeError(f"{node_name(i)}: slurmd is not running")
    return ["nsenter", "-t", str(pid), "-n", "-m", "-u", "--", *argv]


def node_states() -> dict[str, str]:
    out = run(["sinfo", "-h", "-N", "-o", "%N %T"], check=False).stdout
    return dict(line.split(None, 1) for line in out.splitlines() if line.strip())


def wait_nodes_idle(shape: Shape) -> None:
    names = [node_name(i) for i in range(1, shape.nodes + 1)]

    def ready() -> bool:
        states = node_states()
        return all(states.get(n, "").rstrip("*") in ("idle", "mixed", "allocated") for n in names)

    def dead() -> bool:
        return any(procs.pid_of(f"slurmd-{n}") is None for n in names)

    procs.wait_for("the nodes to register with slurmctld", ready, 60, dead=dead)
