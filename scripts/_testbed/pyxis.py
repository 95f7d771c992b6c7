"""Pyxis and enroot on the test bed: built once from their release sources, loaded by every slurmd.

The sources come from ../shared/third_party next to the checkout when it is there, else from
GitHub's release archives; either way each tarball must match SHA256SUMS below (the same pins as
../shared/third_party/SHA256SUMS). enroot is built against glibc (FORCE_GLIBC=1, system kernel
headers, Debian's static libbsd/libmd for strlcpy) and installed in CACHE/enroot; Pyxis is built
against this Slurm's spank.h. Both are cached, stamped with the tarballs' sums and this recipe.
enroot keeps its state per node (/run and /tmp are the node's own), and the test image becomes a
squashfs file in CACHE/image, imported from node1's dockerd (`enroot import dockerd://…`).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tarfile
import time
import urllib.request
from pathlib import Path

from .config import CACHE, IMAGE, MANAGED_MARK, ROOT, STATE
from .procs import run

ENROOT = CACHE / "enroot"                       # enroot's prefix: bin/enroot, etc/enroot/enroot.conf
PYXIS_SO = CACHE / "pyxis" / "spank_pyxis.so"
PYXIS_IMAGE = CACHE / "image" / "slurm-vllm-test.sqsh"
SOURCES = {
    "enroot-4.1.2.tar.gz": ("817e8d551135e6f3fc311d1ee57b03fb4d30325acba732f8dea43069ca11f8d3",
                            "https://github.com/NVIDIA/enroot/archive/refs/tags/v4.1.2.tar.gz"),
    "pyxis-0.24.0.tar.gz": ("063653ba39125ac29796cc6079701d1ec34dd4c5baf698efacc0f36bf3619681",
                            "https://github.com/NVIDIA/pyxis/archive/refs/tags/v0.24.0.tar.gz"),
}
THIRD_PARTY = ROOT.parent / "shared" / "third_party"
RECIPE = "1"          # bump when the build steps below change
LIBS = "-l:libbsd.a /usr/lib/x86_64-linux-gnu/libbsd.a /usr/lib/x86_64-linux-gnu/libmd.a"

# enroot's settings on the nodes: every path the node's own. Containers live in the node's state
# folder named by its host name, not under the node's /tmp: that is a bind mount, and `enroot list`
# (so Pyxis's reuse of a named container) finds a container's processes by the root of its mount,
# which a bind mount of a sub-folder does not show as the folder's path.
ENROOT_CONF = f"""{MANAGED_MARK}
ENROOT_RUNTIME_PATH        /run/enroot/user-$(id -u)
ENROOT_CACHE_PATH          {STATE}/nodes/$(hostname)/enroot-cache/user-$(id -u)
ENROOT_DATA_PATH           {STATE}/nodes/$(hostname)/enroot-data/user-$(id -u)
ENROOT_TEMP_PATH           /tmp
ENROOT_SQUASH_OPTIONS      -noI -noD -noF -noX -no-duplicates
ENROOT_MOUNT_HOME          no
ENROOT_RESTRICT_DEV        no
ENROOT_ROOTFS_WRITABLE     yes
"""


def _log(msg: str) -> None:
    print(f"testbed: {msg}", flush=True)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def source(name: str) -> Path:
    """The release tarball NAME, checked against its pinned SHA-256 (downloaded when not shipped)."""
    want, url = SOURCES[name]
    local = THIRD_PARTY / name
    target = local if local.exists() else CACHE / "sources" / name
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        _log(f"downloading {url}")
        tmp = target.with_suffix(".part")
        with urllib.request.urlopen(url, timeout=120) as answer, tmp.open("wb") as out:
            shutil.copyfileobj(answer, out)
        tmp.rename(target)
    got = _sha256(target)
    if got != want:
        raise RuntimeError(f"{target}: SHA-256 {got} is not the pinned {want}")
    return target


def _unpack(tarball: Path, into: Path) -> Path:
    if into.exists():
        shutil.rmtree(into)
    into.mkdir(parents=True)
    with tarfile.open(tarball) as tar:
        tar.extractall(into, filter="data")
    (top,) = list(into.iterdir())
    return top


def _stamp() -> str:
    return ",".join([RECIPE, *(sha for sha, _ in SOURCES.values())])


def ensure_built() -> None:
    """enroot in CACHE/enroot and spank_pyxis.so in CACHE/pyxis, built unless this very build is there."""
    stamp = CACHE / "pyxis" / ".stamp"
    built = PYXIS_SO.exists() and (ENROOT / "bin" / "enroot").exists()
    if built and stamp.exists() and stamp.read_text() == _stamp():
        (ENROOT / "etc" / "enroot" / "enroot.conf").write_text(ENROOT_CONF)
        return
    t0 = time.monotonic()
    build = CACHE / "build"
    src = _unpack(source("enroot-4.1.2.tar.gz"), build / "enroot")
    # The release archive has no submodules: system kernel headers and makeself stand in for them.
    include = src / "deps" / "dist" / "linux" / "include"
    include.mkdir(parents=True, exist_ok=True)
    for sub in ("/usr/include/linux", "/usr/include/asm-generic", "/usr/include/x86_64-linux-gnu/asm"):
        shutil.copytree(sub, include / Path(sub).name)
    (src / "deps" / "linux-headers").mkdir(parents=True, exist_ok=True)
    (src / "deps" / "linux-headers" / ".stamp").touch()
    (src / "deps" / "makeself").mkdir(parents=True, exist_ok=True)
    shutil.copy2("/usr/bin/makeself", src / "deps" / "makeself" / "makeself.sh")
    if ENROOT.exists():
        shutil.rmtree(ENROOT)
    make = ["make", f"-j{os.cpu_count() or 2}", "FORCE_GLIBC=1", f"LDLIBS={LIBS}", f"prefix={ENROOT}",
            f"sysconfdir={ENROOT}/etc"]
    run(make, cwd=src)
    run([*make, "install"], cwd=src)
    psrc = _unpack(source("pyxis-0.24.0.tar.gz"), build / "pyxis")
    run(["make", f"-j{os.cpu_count() or 2}"], cwd=psrc)
    PYXIS_SO.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(psrc / "spank_pyxis.so", PYXIS_SO)
    shutil.rmtree(build)
    (ENROOT / "etc" / "enroot" / "enroot.conf").write_text(ENROOT_CONF)
    run([str(ENROOT / "bin" / "enroot"), "version"])
    stamp.write_text(_stamp())
    _log(f"enroot and pyxis built in {time.monotonic() - t0:.0f} s")


def plugstack_conf() -> str:
    """/etc/slurm/plugstack.conf: Pyxis in srun (its --container-* options) and in every slurmd."""
    return f"{MANAGED_MARK}\nrequired {PYXIS_SO} runtime_path=/run/pyxis\n"


def ensure_image(in_node1: list[str], digest: str) -> None:
    """The test image as a squashfs file, imported from node1's dockerd unless this rootfs's is there.

    IN_NODE1 is the argv prefix that runs a command inside node1 (its dockerd answers there)."""
    digest += "-cmd-env"             # the docker image's own additions (engines.import_images)
    stamp = PYXIS_IMAGE.with_suffix(".stamp")
    if PYXIS_IMAGE.exists() and stamp.exists() and stamp.read_text() == digest:
        return
    t0 = time.monotonic()
    tmp = PYXIS_IMAGE.with_suffix(".part.sqsh")
    tmp.unlink(missing_ok=True)
    run([*in_node1, str(ENROOT / "bin" / "enroot"), "import", "--output", str(tmp), f"dockerd://{IMAGE}"])
    tmp.rename(PYXIS_IMAGE)
    stamp.write_text(digest)
    _log(f"test image imported for enroot in {time.monotonic() - t0:.0f} s")


def link_node_bin(node_bin: Path, apptainer: Path) -> None:
    """NODE_BIN, the nodes' /usr/local/sbin (on root's PATH): the site's apptainer and enroot."""
    # Updated in place: running nodes have this very folder bind-mounted (a new one would not show).
    node_bin.mkdir(parents=True, exist_ok=True)
    links = {"apptainer": apptainer, **{exe.name: exe for exe in (ENROOT / "bin").iterdir()}}
    for name, target in links.items():
        link = node_bin / name
        if link.is_symlink() and link.readlink() == target:
            continue
        link.unlink(missing_ok=True)
        link.symlink_to(target)
