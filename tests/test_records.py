"""The job folder's typed files: round trips, and one clear error for a malformed or foreign file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from slurm_vllm.core.errors import JobFolderError
from slurm_vllm.core.jobdir import JobDir
from slurm_vllm.core.records import (
    Endpoint,
    HeadInfo,
    PreflightResult,
    PreflightRow,
    RankFailure,
    RayNode,
    RayNodes,
    Rendezvous,
    Stage,
    StageInfo,
)

pytestmark = pytest.mark.unit

EXAMPLES = [
    StageInfo(Stage.RAY_JOINED, "1/2", 1795976541.6),
    HeadInfo("node1", "10.77.0.11", "eth0", 20064, 20072),
    Rendezvous("10.77.0.11", 20065),
    RayNodes((RayNode("10.77.0.11", 1.0), RayNode("10.77.0.12", 1.0))),
    Endpoint("http://10.77.0.11:20072/v1", "tiny", "10.77.0.11", 20072, "/jobs/x/api_key", "7"),
    Endpoint("http://10.77.0.11:20072/v1", "tiny", "10.77.0.11", 20072, None, "7"),
    PreflightResult("gloo", 2, (PreflightRow(1 << 20, 0.5, 2.0, 2.0, True),), "gloo over TCP"),
    RankFailure(1, "node2", "ray-worker exited (code 1)"),
]


@pytest.mark.parametrize("record", EXAMPLES, ids=lambda r: type(r).__name__)
def test_round_trip_through_the_folder(record: object, tmp_path: Path) -> None:
    jd = JobDir(tmp_path)
    path = tmp_path / "f.json"
    jd.write(path, record)  # type: ignore[arg-type]
    assert jd.read(path, type(record)) == record  # type: ignore[arg-type]
    data = json.loads(path.read_text())
    assert data["schema"] == 1 and data["kind"] == type(record).KIND  # type: ignore[attr-defined]
    assert not list(tmp_path.glob(".*.tmp"))          # written through a temporary file, renamed


@pytest.mark.parametrize(("text", "message"), [
    ("{not json", "f.json: not JSON"),
    ("[]", "f.json: not a slurm_vllm head file"),
    ('{"kind": "endpoint", "schema": 1}', "f.json: not a slurm_vllm head file (kind 'endpoint')"),
    ('{"kind": "head", "schema": 2, "host": "n"}', "f.json: schema 2, this slurm_vllm reads schema 1"),
    ('{"kind": "head", "schema": 1, "host": "n", "ip": "1.2.3.4", "interface": "eth0", "gcs_port": 1}',
     "malformed head file: api_port: required key is missing"),
    ('{"kind": "head", "schema": 1, "host": "n", "ip": "1.2.3.4", "interface": "eth0", "gcs_port": "x",'
     ' "api_port": 2}', "malformed head file: gcs_port: expected int, got 'x'"),
        ('{"kind": "head", "schema": 1, "host": "n", "ip": "1.2.3.4", "interface": "eth0", "gcs_port": 1,'
         ' "api_port": 2, "gcs_prot": 3}', "malformed head file: gcs_prot: unknown key; valid keys: host"),
        ('{"kind": "head", "schema": 1, "host": "n", "ip": "1.2.3.4", "interface": "eth0", "gcs_port": true,'
         ' "api_port": 2}', "malformed head file: gcs_port: expected int, got True"),
])
def test_bad_files_are_one_line_errors(text: str, message: str, tmp_path: Path) -> None:
    path = tmp_path / "f.json"
    path.write_text(text)
    with pytest.raises(JobFolderError) as err:
        HeadInfo.read(path)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_unknown_stage_and_missing_file_are_errors(tmp_path: Path) -> None:
    path = tmp_path / "stage"
    path.write_text('{"kind": "stage", "schema": 1, "stage": "WARMING", "detail": "", "time": 0}')
    with pytest.raises(JobFolderError, match="stage: 'WARMING' is not one of PENDING, STARTING"):
        StageInfo.read(path)
    with pytest.raises(JobFolderError, match="cannot read"):
        HeadInfo.read(tmp_path / "absent.json")


def test_stage_file_and_job_id(tmp_path: Path) -> None:
    jd = JobDir(tmp_path / "job")
    jd.create("name: x\n", "{}", api_key=True)
    assert jd.read_stage().stage == Stage.PENDING
    jd.write_stage(Stage.LOADING, "vllm serve TP2xPP1")
    assert str(jd.read_stage()) == "LOADING: vllm serve TP2xPP1"
    assert [line.split()[1] for line in jd.stage_log.read_text().splitlines()] == ["PENDING", "LOADING"]
    jd.write_job_id("42")
    assert jd.job_id() == "42"
    assert jd.api_key.stat().st_mode & 0o777 == 0o600 and jd.ray_token.stat().st_mode & 0o777 == 0o600
    assert [s for s in Stage if s.final] == [Stage.DONE, Stage.FAILED, Stage.CANCELLED, Stage.TIMEOUT]


def test_stage_times_are_each_stage_last_write(tmp_path: Path) -> None:
    """`preflight --ray` reports from them: the last RAY_JOINED line is the one with every node."""
    jd = JobDir(tmp_path / "job")
    jd.create("name: x\n", "{}", api_key=False)
    with open(jd.stage_log, "a") as f:
        f.write("100.000 STARTING 2 nodes: node1,node2\n101.500 RAY_HEAD 10.77.0.11:20064\n"
                "102.000 RAY_JOINED 1/2\nnot a stage line\n103.250 RAY_JOINED 2/2\n104.0 WARMING up\n")
    times = jd.stage_times()
    assert times[Stage.STARTING] == 100.0 and times[Stage.RAY_HEAD] == 101.5
    assert times[Stage.RAY_JOINED] == 103.25 and Stage.LOADING not in times
    assert JobDir(tmp_path / "absent").stage_times() == {}


def test_endpoint_reads_its_key(tmp_path: Path) -> None:
    key = tmp_path / "api_key"
    key.write_text("sk-abc\n")
    key.chmod(0o600)
    assert Endpoint("u", "m", "h", 1, str(key), "1").api_key() == "sk-abc"
    assert Endpoint("u", "m", "h", 1, None, "1").api_key() is None
    with pytest.raises(JobFolderError, match="cannot read the API key"):
        Endpoint("u", "m", "h", 1, str(tmp_path / "gone"), "1").api_key()


def test_batch_progress_lines() -> None:
    from slurm_vllm.core.records import BatchProgress

    p = BatchProgress(output="/o.jsonl", total=1000, done=250, resumed=50, ok=190, refused=10, lost=0,
                      in_flight=8, tokens_in=3000, tokens_out=1600, elapsed=20.0, rate=10.0)
    assert p.line() == "250/1000 done, 10.0 req/s, ETA 0:01:15"
    assert p.summary() == ("250/1000 done (190 ok, 10 refused this run), 3000 tokens in, 1600 out, "
                           "10.0 req/s in 20 s → /o.jsonl")
    assert BatchProgress.from_json(p.to_json()) == p
    assert BatchProgress(**{**p.__dict__, "rate": 0.0}).line() == "250/1000 done, 0.0 req/s"
