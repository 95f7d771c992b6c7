"""The Python API's pure parts: the stage shown next to Slurm's state, waits, the job index, `list` rows."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from slurm_vllm.core import index
from slurm_vllm.core.errors import SlurmVllmError, WaitTimeout
from slurm_vllm.core.jobdir import JobDir
from slurm_vllm.core.plan import Plan
from slurm_vllm.core.records import BatchProgress, Endpoint, Stage, StageInfo
from slurm_vllm.core.slurm import SlurmJob
from slurm_vllm.login import api, listing, status
from slurm_vllm.login.api import JobEnded

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(("stage", "slurm", "shown"), [
    (Stage.LOADING, "RUNNING", Stage.LOADING),
    (Stage.LOADING, None, Stage.LOADING),                 # Slurm forgot the job: the ranks' word
    (Stage.PENDING, "PENDING", Stage.PENDING),
    (Stage.READY, "CANCELLED by 0", Stage.CANCELLED),     # killed before the head could say so
    (Stage.LOADING, "TIMEOUT", Stage.TIMEOUT),
    (Stage.RAY_HEAD, "NODE_FAIL", Stage.FAILED),
    (Stage.RAY_HEAD, "OUT_OF_MEMORY", Stage.FAILED),
    (Stage.READY, "COMPLETED", Stage.DONE),
    (Stage.FAILED, "COMPLETED", Stage.FAILED),            # a final stage the ranks wrote wins
    (Stage.CANCELLED, "RUNNING", Stage.CANCELLED),
])
def test_reconcile(stage: Stage, slurm: str | None, shown: Stage) -> None:
    assert status.reconcile(StageInfo(stage, "d"), slurm)[0] == shown


def test_reconcile_says_why_when_the_ranks_did_not() -> None:
    assert status.reconcile(StageInfo(Stage.LOADING), "NODE_FAIL") == (Stage.FAILED, "Slurm says NODE_FAIL")


@pytest.mark.parametrize(("current", "target", "done"), [
    (Stage.READY, Stage.LOADING, True), (Stage.LOADING, Stage.READY, False),
    (Stage.RAY_JOINED, Stage.RAY_JOINED, True), (Stage.DONE, Stage.READY, False),
    (Stage.DONE, Stage.DONE, True), (Stage.READY, Stage.DONE, False)])
def test_reached(current: Stage, target: Stage, done: bool) -> None:
    assert status.reached(current, target) is done


def make_job(tmp_path: Path, name: str = "j", job_id: str | None = None) -> api.Job:
    jd = JobDir(tmp_path / name)
    plan = Plan(name=name, nodes=2, gpus_per_node=4, tp=4, pp=2, served_name="m", model_path="/m",
                vllm_args=(), gcs_port=None, api_port=None, ready_timeout=60, api_key=True)
    jd.create("name: j\n", plan.to_json(), api_key=True)
    if job_id:
        jd.write_job_id(job_id)
    return api.Job(jd)


def test_wait_reports_progress_and_returns_at_the_stage(tmp_path: Path) -> None:
    job = make_job(tmp_path)
    seen: list[str] = []

    def ranks() -> None:       # the next stage once the waiter reported the last (no race with its polls)
        last = Stage.PENDING
        for stage in (Stage.STARTING, Stage.RAY_HEAD, Stage.LOADING, Stage.READY):
            deadline = time.monotonic() + 10
            while last.value not in seen and time.monotonic() < deadline:
                time.sleep(0.01)
            job.dir.write_stage(stage, stage.value.lower())
            last = stage

    t = threading.Thread(target=ranks)
    t.start()
    status = job.wait(Stage.READY, timeout=20, progress=lambda s: seen.append(s.stage.value), poll=0.1)
    t.join()
    assert status.stage == Stage.READY
    assert seen == ["PENDING", "STARTING", "RAY_HEAD", "LOADING", "READY"]


def test_wait_raises_when_the_job_ends_first_or_time_runs_out(tmp_path: Path) -> None:
    job = make_job(tmp_path)
    job.dir.write_stage(Stage.FAILED, "rank 1 on node2: ray-worker exited")
    with pytest.raises(JobEnded, match="FAILED: rank 1 on node2") as err:
        job.wait(Stage.READY, timeout=5)
    assert err.value.status.stage == Stage.FAILED
    other = make_job(tmp_path, "k")
    t0 = time.monotonic()
    with pytest.raises(WaitTimeout, match="still PENDING after 1 s"):
        other.wait(Stage.READY, timeout=1, poll=0.2)
    assert time.monotonic() - t0 < 10                  # gives up near its timeout (no host-speed claim)


def test_endpoint_only_while_ready(tmp_path: Path) -> None:
    job = make_job(tmp_path)
    with pytest.raises(SlurmVllmError, match="no endpoint yet"):
        job.endpoint()
    ep = Endpoint("http://h:1/v1", "m", "h", 1, str(job.dir.api_key), "7")
    job.dir.write(job.dir.endpoint, ep)
    job.dir.write_stage(Stage.READY)
    assert job.endpoint() == ep and job.endpoint().api_key().startswith("sk-")  # type: ignore[union-attr]
    job.dir.write_stage(Stage.CANCELLED)
    with pytest.raises(SlurmVllmError, match="the endpoint is gone"):
        job.endpoint()


def test_a_job_id_resolves_through_the_index_whatever_jobs_root(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLURM_VLLM_INDEX", str(tmp_path / "index"))
    monkeypatch.setenv("SLURM_VLLM_JOBS_ROOT", str(tmp_path / "elsewhere"))
    job = make_job(tmp_path / "own-root", job_id="31")
    index.record("31", job.path, job.plan())
    assert api.job("31").path == job.path.resolve()
    assert [j.path for j in api.jobs()] == [job.path.resolve()]
    with pytest.raises(SlurmVllmError, match="job 32: no job folder"):
        api.job("32")
    # A pending job: indexed at submission, its folder not made yet; listed with its plan's shape.
    index.record("33", tmp_path / "own-root" / "j-33", job.plan())
    pending = api.job("33")
    assert pending.job_id == "33" and pending.dir.read_stage().stage == Stage.PENDING
    assert api.job(str(tmp_path / "own-root" / "j-33")).job_id == "33"      # by the folder to be
    rows = listing.rows(states={"33": SlurmJob("PENDING", "1:00:00"), "31": SlurmJob("RUNNING", "5:00")})
    assert [(r.job_id, r.stage, r.tp_pp) for r in rows] == [
        ("33", "PENDING", "TP4xPP2"), ("31", "PENDING", "TP4xPP2")]
    # Slurm forgot it and it never started: gone from the index.
    rows = listing.rows(states={"31": SlurmJob("RUNNING")})
    assert [r.job_id for r in rows] == ["31"]
    assert index.lookup("33") is None


def test_an_array_id_is_the_sharded_batch_as_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`123` names the job array whose tasks `123_0`, `123_1` are indexed (newer than a plain job
    123 of before the cluster's ids restarted); its status sums the shards and ends as the worst."""
    monkeypatch.setenv("SLURM_VLLM_INDEX", str(tmp_path / "index"))
    old = make_job(tmp_path, "old-900041", job_id="900041")
    index.record("900041", old.path, old.plan())
    assert isinstance(api.job("900041"), api.Job)
    time.sleep(0.01)
    shards = [make_job(tmp_path, f"b-900041_{k}", job_id=f"900041_{k}") for k in range(2)]
    for shard in shards:
        index.record(str(shard.job_id), shard.path, shard.plan())
    array = api.job("900041")
    assert isinstance(array, api.ArrayJob) and [j.path for j in array.shards] == [j.path for j in shards]
    assert array.path.name == "b-900041_*"

    def progress(total: int, done: int, rate: float) -> BatchProgress:
        return BatchProgress(output=str(tmp_path / "out.jsonl.parts" / "part-0-of-2.jsonl"), total=total,
                             done=done, resumed=0, ok=done, refused=0, lost=0, in_flight=0, tokens_in=done,
                             tokens_out=2 * done, elapsed=10.0, rate=rate, finished=done == total)

    shards[0].dir.write(shards[0].dir.batch, progress(50, 50, 5.0))
    shards[0].dir.write_stage(Stage.DONE, "50/50 done")
    shards[1].dir.write(shards[1].dir.batch, progress(70, 20, 2.0))
    shards[1].dir.write_stage(Stage.BATCH, "20/70 done")
    st = array.status()
    assert st.stage == Stage.BATCH and st.job_id == "900041"
    assert st.batch is not None and (st.batch.total, st.batch.done, st.batch.rate) == (120, 70, 2.0)
    assert st.batch.output == str(tmp_path / "out.jsonl") and not st.batch.finished
    assert st.detail.startswith("70/120 done, 2.0 req/s") and "shards: 1 DONE, 1 BATCH" in st.detail
    shards[1].dir.write_stage(Stage.FAILED, "rank 1 on node2: ray-worker exited")
    st = array.status()
    assert st.stage == Stage.FAILED and st.detail.startswith("shard 900041_1: rank 1 on node2")
    with pytest.raises(JobEnded):
        array.wait(Stage.DONE, timeout=5)
    shards[1].dir.write(shards[1].dir.batch, progress(70, 70, 2.0))
    shards[1].dir.write_stage(Stage.DONE, "70/70 done")
    st = array.wait(Stage.DONE, timeout=5)
    assert st.stage == Stage.DONE and st.batch is not None and st.batch.finished
    assert "120/120 done" in st.detail and "(2 shards)" in st.detail


def test_list_rows_and_table(tmp_path: Path) -> None:
    job = make_job(tmp_path, "serve", job_id="5")
    ep = Endpoint("http://10.0.0.1:20072/v1", "m", "10.0.0.1", 20072, None, "5")
    job.dir.write(job.dir.endpoint, ep)
    job.dir.write_stage(Stage.READY)
    now = job.dir.plan.stat().st_mtime + 3725
    row = listing.row(job, SlurmJob("RUNNING", "55:10"), now)
    assert (row.job_id, row.name, row.stage, row.nodes, row.tp_pp, row.url, row.time_left) == (
        "5", "serve", "READY", 2, "TP4xPP2", ep.url, "55:10")
    ended = listing.row(job, SlurmJob("CANCELLED by 0"), now)
    assert ended.stage == "CANCELLED" and ended.url == "" and ended.time_left == ""
    batch = make_job(tmp_path, "batch", job_id="6")
    batch.dir.write_stage(Stage.BATCH, "120/1000 done, 23.4 req/s, ETA 0:00:38")
    sending = listing.row(batch, SlurmJob("RUNNING", "10:00"), now)
    line = "120/1000 done, 23.4 req/s, ETA 0:00:38"
    assert (sending.stage, sending.url, sending.progress) == ("BATCH", "", line)
    text = listing.table([row, sending])
    assert text.splitlines()[0].split() == ["JOBID", "NAME", "STAGE", "NODES", "TPxPP", "AGE", "LEFT",
                                            "URL", "/", "PROGRESS"]
    assert text.splitlines()[1].split() == ["5", "serve", "READY", "2", "TP4xPP2", "1h02m", "55:10", ep.url]
    assert text.splitlines()[2].endswith(f"10:00  {line}")
    assert listing.age(59) == "0m59s" and listing.age(90000) == "1d01h"


def test_the_package_exports_are_never_shadowed_by_a_submodule() -> None:
    """`slurm_vllm.submit(...)` must stay the API function even after the code that submits has been
    imported: a submodule of the same name would replace the attribute on first import."""
    import importlib
    import pkgutil

    import slurm_vllm

    modules = {m.name for m in pkgutil.iter_modules(slurm_vllm.__path__)}
    assert not modules & set(slurm_vllm.__all__)
    for module in pkgutil.walk_packages(slurm_vllm.__path__, "slurm_vllm."):
        if not module.name.endswith("__main__"):
            importlib.import_module(module.name)
    assert slurm_vllm.submit is api.submit and slurm_vllm.job is api.job


def test_an_arrays_status_asks_slurm_once_for_all_its_shards(tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """1,000 shards were 1,000 squeues a poll: now one squeue (and at most one sacct) per status.
    The real commands run; only their count is taken."""
    from slurm_vllm.core import proc

    shards = [make_job(tmp_path, f"b-700001_{k}", job_id=f"700001_{k}") for k in range(40)]
    calls: list[str] = []
    real = proc.run

    def counted(argv: list[str], **kw: object) -> object:
        calls.append(argv[0])
        return real(argv, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(proc, "run", counted)
    st = api.ArrayJob("700001", shards).status()
    assert st.stage == Stage.PENDING
    assert calls.count("squeue") == 1 and calls.count("sacct") <= 1, calls
