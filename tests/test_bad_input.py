"""A corpus of bad specs: each is one short error naming the key, exit 2, no traceback, under a second."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from slurm_vllm.login import cli

pytestmark = pytest.mark.unit

BASE = {
    "name": "t",
    "model": {"path": "/models/m"},
    "slurm": {"nodes": 2, "gpus_per_node": 4},
    "jobs_root": "/shared/jobs",
}


def mutate(path: str, value: object) -> dict[str, object]:
    """BASE with the dotted PATH set to VALUE (sections made as needed)."""
    data = yaml.safe_load(yaml.safe_dump(BASE))
    *parents, last = path.split(".")
    node = data
    for part in parents:
        node = node.setdefault(part, {})
    node[last] = value
    return data


# (the spec's value at a key, what the one-line error must name)
VALUES: list[tuple[str, object, str]] = [
    ("name", "", "name:"),
    ("name", "a b", "name:"),
    ("name", "x" * 65, "name:"),
    ("name", "-x", "name:"),
    ("name", 5, "name:"),
    ("name", None, "name:"),
    ("name", "a\nb", "name:"),
    ("model", "m", "model:"),
    ("model.path", "", "model.path"),
    ("model.path", 3, "model.path"),
    ("model.path", "/m\n/n", "model.path"),
    ("model.path", "  ", "model.path"),
    ("model.served_name", ["a"], "model.served_name"),
    ("model.served_name", "a\x07", "model.served_name"),
    ("model.extra", 1, "model.extra"),
    ("slurm", [], "slurm:"),
    ("slurm.nodes", 0, "slurm.nodes"),
    ("slurm.nodes", -1, "slurm.nodes"),
    ("slurm.nodes", 10**12, "slurm.nodes"),
    ("slurm.nodes", 10**30, "slurm.nodes"),
    ("slurm.nodes", "2", "slurm.nodes"),
    ("slurm.nodes", 2.5, "slurm.nodes"),
    ("slurm.nodes", True, "slurm.nodes"),
    ("slurm.gpus_per_node", -1, "slurm.gpus_per_node"),
    ("slurm.gpus_per_node", 65, "slurm.gpus_per_node"),
    ("slurm.gpus_per_node", "4", "slurm.gpus_per_node"),
    ("slurm.cpus_per_task", 0, "slurm.cpus_per_task"),
    ("slurm.cpus_per_task", 10**6, "slurm.cpus_per_task"),
    ("slurm.mem", "lots", "slurm.mem"),
    ("slurm.mem", "64 G", "slurm.mem"),
    ("slurm.mem", "-1", "slurm.mem"),
    ("slurm.mem", "1P", "slurm.mem"),
    ("slurm.mem", 64, "slurm.mem"),
    ("slurm.time", "forever", "slurm.time"),
    ("slurm.time", "1:2:3:4", "slurm.time"),
    ("slurm.time", "", "slurm.time"),
    ("slurm.time", "01:00:00\n", "slurm.time"),
    ("slurm.time", 60, "slurm.time"),
    ("slurm.time", 3600, 'slurm.time: YAML read the unquoted value as the number 3600 (1:00:00 unquoted'),
    ("vllm.args", {"gpu_memory_utilization": float("nan")}, "vllm.args.gpu_memory_utilization: nan is not"),
    ("vllm.args", {"max_model_len": float("inf")}, "vllm.args.max_model_len: inf is not a finite"),
    ("env", {"RATIO": float("-inf")}, "env.RATIO: -inf is not a finite number"),
    ("env", {None: "x"}, "env: key None is not a string"),
    ("env", {True: "x"}, "env: key True is not a string"),
    ("vllm.args", {1: "x"}, "vllm.args: key 1 is not a string"),
    ("slurm.extra_directives", {None: "x"}, "slurm.extra_directives: key None is not a string"),
    ("secret_env", {False: "/f"}, "secret_env: key False is not a string"),
    ("slurm.time", "\u0661\u0660", "slurm.time"),             # Arabic-Indic digits: not Slurm's
    ("slurm.time", "-2", "slurm.time"),
    ("slurm.mem", "\u0665\u0660G", "slurm.mem"),
    ("slurm.partition", "gpu\ntouch /tmp/PWNED #", "slurm.partition"),
    ("slurm.partition", 1, "slurm.partition"),
    ("slurm.account", "a\rb", "slurm.account"),
    ("slurm.qos", "q\x00", "slurm.qos"),
    ("slurm.constraint", "c\n", "slurm.constraint"),
    ("slurm.exclusive", "yes", "slurm.exclusive"),
    ("slurm.extra_directives", ["mail"], "slurm.extra_directives"),
    ("slurm.extra_directives", {"output": "/tmp/x"}, "slurm.extra_directives.output"),
    ("slurm.extra_directives", {"signal": "USR1@5"}, "slurm.extra_directives.signal"),
    ("slurm.extra_directives", {"time": "1"}, "slurm.extra_directives.time"),
    ("slurm.extra_directives", {"ntasks": 4}, "slurm.extra_directives.ntasks"),
    ("slurm.extra_directives", {"mail_type": "END\nX"}, "slurm.extra_directives.mail_type"),
    ("slurm.extra_directives", {"mail\ntype": "END"}, "slurm.extra_directives"),
    ("slurm.extra_directives", {"x": [1]}, "slurm.extra_directives.x"),
    ("slurm.setup", "module load x", "slurm.setup"),
    ("slurm.setup", [1], "slurm.setup"),
    ("slurm.python", 3, "slurm.python"),
    ("slurm.python", "/py\n", "slurm.python"),
    ("slurm.template", ["t"], "slurm.template"),
    ("slurm.template", "/nonexistent/t.j2", "slurm.template"),
    ("slurm.nodez", 2, "slurm.nodez"),
    ("parallelism.tensor", 0, "parallelism.tensor"),
    ("parallelism.tensor", "two", "parallelism.tensor"),
    ("parallelism.tensor", 3, "parallelism.tensor"),
    ("parallelism.pipeline", -2, "parallelism.pipeline"),
    ("parallelism.pipeline", 3, "parallelism.tensor"),
    ("parallelism.data", 0, "parallelism.data"),
    ("parallelism.data", "two", "parallelism.data"),
    ("parallelism.data", 3, "parallelism.data=3"),
    ("parallelism.zeta", 2, "parallelism.zeta"),
    ("container.runtime", "singularity", "container.runtime"),
    ("container.runtime", "docker", "container.image"),
    ("container.image", 3, "container.image"),
    ("container.image", "img\n", "container.image"),
    ("container.binds", "/a:/a", "container.binds"),
    ("container.binds", ["/a"], "container.binds[0]"),
    ("container.binds", [":/a"], "container.binds[0]"),
    ("container.binds", ["/a:/a:rx"], "container.binds[0]"),
    ("container.binds", ["/a:/a\n"], "container.binds[0]"),
    ("container.options", "--rm", "container.options"),
    ("container.options", ["-v\n"], "container.options[0]"),
    ("container.gpus", "all", "container.gpus"),
    ("network.interface", "-x", "network.interface"),
    ("network.interface", "eth0 eth1", "network.interface"),
    ("network.interface", "averyveryverylongname", "network.interface"),
    ("network.interface", 0, "network.interface"),
    ("nccl.ib_hca", "mlx5\n", "nccl.ib_hca"),
    ("nccl.ib_gid_index", -5, "nccl.ib_gid_index"),
    ("nccl.ib_gid_index", 300, "nccl.ib_gid_index"),
    ("nccl.debug", "LOUD", "nccl.debug"),
    ("env", ["A=1"], "env:"),
    ("env", {"HF_TOKEN": "x"}, "env.HF_TOKEN"),
    ("env", {"1A": "x"}, "env.1A"),
    ("env", {"A-B": "x"}, "env.A-B"),
    ("env", {"A": "x\ny"}, "env.A"),
    ("env", {"A": [1]}, "env.A"),
    ("env", {"A": True}, "env.A"),
    ("secret_env", {"HF_TOKEN": "hf_abc"}, "secret_env.HF_TOKEN"),
    ("env", {"PGPASSWORD": "x"}, "env.PGPASSWORD: looks like a secret"),
    ("env", {"MYSQL_PWD": "x"}, "env.MYSQL_PWD: looks like a secret"),
    ("env", {"HF_TOKEN_2": "x"}, "env.HF_TOKEN_2: looks like a secret"),
    ("env", {"CLIENT_SECRET_1": "x"}, "env.CLIENT_SECRET_1: looks like a secret"),
    ("env", {"SLACK_WEBHOOK_URL": "https://hooks/x"}, "env.SLACK_WEBHOOK_URL: looks like a secret"),
    ("env", {"SENTRY_DSN": "https://k@s/1"}, "env.SENTRY_DSN: looks like a secret"),
    ("env", {"HTTPS_PROXY": "http://user:pw@proxy:3128"}, "env.HTTPS_PROXY: looks like a secret"),
    ("env", {"RAY_AUTH_MODE": "disabled"}, "env.RAY_AUTH_MODE: set by slurm_vllm"),
    ("secret_env", {"RAY_AUTH_MODE": "/f"}, "secret_env.RAY_AUTH_MODE: set by slurm_vllm"),
    ("secret_env", {"VLLM_HOST_IP": "/f"}, "secret_env.VLLM_HOST_IP: set by slurm_vllm"),
    ("secret_env", {"NCCL_SOCKET_IFNAME": "/f"}, "secret_env.NCCL_SOCKET_IFNAME: set by slurm_vllm"),
    ("container.options", ["-ie", "HF_TOKEN=x"], "container.options[0]: '-ie'"),
    ("container.options", ["-ieHF_TOKEN=x"], "container.options[0]"),
    ("container.options", ["--env-host"], "container.options[0]: '--env-host'"),
    ("container.options", ["--env-merge=PATH=x"], "container.options[0]"),
    ("secret_env", {"T": 5}, "secret_env.T"),
    ("vllm.args", {"tensor_parallel_size": 2}, "vllm.args.tensor_parallel_size"),
    ("vllm.args", {"api_key": "k"}, "vllm.args.api_key"),
    ("vllm.args", {"host": "0.0.0.0"}, "vllm.args.host"),
    ("vllm.args", {"Max Len": 1}, "vllm.args.Max Len"),
    ("vllm.args", {"x": [1]}, "vllm.args.x"),
    ("vllm.args", {"x": "a\nb"}, "vllm.args.x"),
    ("vllm.port", 80, "vllm.port"),
    ("vllm.port", 70000, "vllm.port"),
    ("vllm.port", "auto8", "vllm.port"),
    ("vllm.api_key", "sk-123", "vllm.api_key"),
    ("ray.port", 0, "ray.port"),
    ("ray.extra", 1, "ray.extra"),
    ("jobs_root", "", "jobs_root"),
    ("jobs_root", "jobs", "jobs_root"),
    ("jobs_root", 3, "jobs_root"),
    ("jobs_root", "/j\n", "jobs_root"),
    ("jobs_root", "/scratch/%u/jobs", "jobs_root: '/scratch/%u/jobs': '%' is not allowed"),
    ("network", {"trusted": False}, "network.trusted: false, and slurm.nodes is 2"),
    ("network.trusted", "no", "network.trusted"),
    ("ready_timeout", 1, "ready_timeout"),
    ("ready_timeout", 10**9, "ready_timeout"),
    ("ready_timeout", "1h", "ready_timeout"),
    ("preflight", "yes", "preflight"),
    ("mode", "bach", "mode"),
    ("mode", "batch", "batch.input: required"),
    ("batch", {"input": "/x.jsonl"}, "batch: only with mode: batch"),
    # §1: option prefixes, argv positions, managed and secret-bearing flags
    ("slurm.extra_directives", {"output=/tmp/x": True}, "slurm.extra_directives.output=/tmp/x"),
    ("slurm.extra_directives", {"sig": "USR1@5"}, "as --signal, which is managed"),
    ("slurm.extra_directives", {"part": "debug"}, "as --partition, which is managed"),
    ("slurm.extra_directives", {"out": "/tmp/x"}, "as --output, which is managed"),
    ("slurm.extra_directives", {"gre": "gpu:1"}, "as --gres"),
    ("slurm.extra_directives", {"export": "ALL,HF_TOKEN=x"}, "slurm.extra_directives.export"),
    ("slurm.extra_directives", {"wait": True}, "slurm.extra_directives.wait"),
    ("slurm.extra_directives", {"Gres": "gpu:1"}, "slurm.extra_directives.Gres"),
    ("slurm.extra_directives", {"gres gpu": 1}, "slurm.extra_directives.gres gpu"),
    ("vllm.args", {"api-k": "k"}, "as --api-key"),
    ("vllm.args", {"hos": "0.0.0.0"}, "as --host"),
    ("vllm.args", {"config": "/x.yaml"}, "vllm.args.config"),
    ("vllm.args", {"hf_token": "hf_x"}, "secret_env"),
    ("vllm.args", {"hf-tok": "hf_x"}, "as --hf-token"),
    ("vllm.args", {"served": "x"}, "as --served-model-name"),
    ("vllm.args", {"tensor_parallel": 2}, "as --tensor-parallel-size"),
    ("vllm.args", {"aws_secret_access_key": "x"}, "a secret on vLLM's command line"),
    ("vllm.args", {"chat_template": "--x"}, "vllm.args.chat_template"),
    ("container.image", "--privileged", "container.image"),
    ("model.path", "--trust-remote-code", "model.path"),
    ("model.served_name", "--api-key", "model.served_name"),
    ("slurm.python", "-c", "slurm.python"),
    ("container.binds", ["/a:/a,/b:/b"], "container.binds[0]"),
    ("container.options", ["-e", "HF_TOKEN=x"], "container.options[0]"),
    ("container.options", ["--env=HF_TOKEN=x"], "container.options[0]"),
    ("container.options", ["-eHF_TOKEN=x"], "container.options[0]"),
    ("container.options", ["--env-file", "/x"], "container.options[0]"),
    ("container.options", ["--name", "x"], "container.options[0]"),
    # §2: secrets by the words of the name
    ("env", {"AWS_ACCESS_KEY_ID": "x"}, "env.AWS_ACCESS_KEY_ID"),
    ("env", {"S3_ACCESS_KEY": "x"}, "env.S3_ACCESS_KEY"),
    ("env", {"OPENAI_KEY": "x"}, "env.OPENAI_KEY"),
    ("env", {"PRIVATE_KEY": "x"}, "env.PRIVATE_KEY"),
    ("env", {"GITHUB_PAT": "x"}, "env.GITHUB_PAT"),
    ("env", {"DB_PASS": "x"}, "env.DB_PASS"),
    ("env", {"DATABASE_URL": "x"}, "env.DATABASE_URL"),
    ("env", {"CREDENTIALS": "x"}, "env.CREDENTIALS"),
    ("env", {"AZURE_STORAGE_CONNECTION_STRING": "x"}, "env.AZURE_STORAGE_CONNECTION_STRING"),
    ("env", {"WANDB_API_KEY": "x"}, "env.WANDB_API_KEY"),
    ("secret_env", {"HF_TOKEN": "$HOME/t"}, "secret_env.HF_TOKEN"),
    # ${} and paths
    ("jobs_root", "$HOME/jobs", "jobs_root"),
    ("model.path", "/m/${", "model.path"),
    ("model.path", "/m/${1}", "model.path"),
    ("model.path", "/m/${SLURM_VLLM_SURELY_UNSET_VAR}", "SLURM_VLLM_SURELY_UNSET_VAR"),
]

TEXTS: list[tuple[str, bytes, str]] = [
    ("not-utf8", b"name: t\nmodel: {path: /m}\nx: \xff\xfe\n", "not UTF-8"),
    ("binary", b"\x7fELF\x02\x01\x01\x00" + bytes(range(256)), "not UTF-8"),
    ("nul", b"name: t\x00\n", "NUL"),
    ("deep", ("x: " + "[" * 3000 + "]" * 3000 + "\n").encode(), "nested more than"),
    (
        "alias-bomb",
        (
            "a: &a [1,1,1,1,1,1,1,1,1,1]\n"
            + "".join(
                f"{c}: &{c} [" + ",".join([f"*{p}"] * 10) + "]\n"
                for p, c in zip("abcdefg", "bcdefgh", strict=True)
            )
        ).encode(),
        "aliases",
    ),
    ("duplicate", b"name: t\nmodel: {path: /m}\nname: u\n", "duplicate key 'name'"),
    ("duplicate-nested", b"name: t\nmodel: {path: /m, path: /n}\n", "duplicate key 'path'"),
    ("not-yaml", b"name: t\n  model: : :\n", "not valid YAML"),
    ("list", b"- name: t\n", "expected a mapping"),
    ("empty", b"", "expected a mapping"),
    ("huge", b"name: t\n" + b"#" * (2 << 20), "bytes: at most 1048576 are read; a spec is at most"),
    ("5000-digit-int", b"name: t\nmodel: {path: /m}\nslurm: {nodes: " + b"9" * 5000 + b"}\n",
     "a value YAML cannot hold: Exceeds the limit"),
    ("long-path-component", b"name: t\nmodel: {path: /" + b"a" * 5000 + b"/m}\n",
     "model.path: File name too long"),
    ("tab-indent", b"name: t\nmodel:\n\tpath: /m\n", "not valid YAML"),
    ("sexagesimal-time", b"name: t\nmodel: {path: /m}\nslurm: {time: 1:00:00}\n",
     'quote it, e.g. time: "1:00:00"'),
    ("nan-arg", b"name: t\nmodel: {path: /m}\nvllm: {args: {gpu_memory_utilization: .nan}}\n",
     "vllm.args.gpu_memory_utilization: nan is not a finite number"),
    ("null-env-key", b"name: t\nmodel: {path: /m}\nenv: {~: x}\n", "env: key None is not a string"),
]


def run_validate(spec: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """`validate SPEC` in process (how fast a refusal comes: benchmarks/login_node.py)."""
    code = cli.main(["validate", str(spec)])
    return code, capsys.readouterr().err


def check(code: int, err: str, names: str) -> None:
    assert code == 2, err
    assert "Traceback" not in err and 1 <= len(err.splitlines()) <= 3, err
    assert names in err, err
    assert len(err) < 600, err


@pytest.mark.parametrize(("key", "value", "names"), VALUES, ids=[f"{k}={v!r}"[:50] for k, v, _ in VALUES])
def test_bad_value(
    key: str, value: object, names: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = tmp_path / "bad.yaml"
    spec.write_text(yaml.safe_dump(mutate(key, value)))
    check(*run_validate(spec, capsys), names)


@pytest.mark.parametrize(("label", "text", "names"), TEXTS, ids=[t[0] for t in TEXTS])
def test_bad_file(
    label: str, text: bytes, names: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = tmp_path / "bad.yaml"
    spec.write_bytes(text)
    check(*run_validate(spec, capsys), names)


@pytest.mark.parametrize(
    ("config", "names"),
    [
        ('{"num_attention_heads": "32"}', "num_attention_heads is '32'"),
        ('{"text_config": null, "num_hidden_layers": "x"}', "num_hidden_layers is 'x'"),
        ('{"text_config": [1]}', "text_config is list"),
        ("{not json", "not valid JSON"),
        ("[1, 2]", "a JSON list"),
        (None, "is a folder"),
    ],
)
def test_a_broken_model_config_is_named(
    config: str | None, names: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = tmp_path / "model"
    model.mkdir()
    if config is None:
        (model / "config.json").mkdir()
    else:
        (model / "config.json").write_text(config)
    spec = tmp_path / "s.yaml"
    spec.write_text(yaml.safe_dump({**BASE, "model": {"path": str(model)}}))
    check(*run_validate(spec, capsys), names)


def test_render_into_a_missing_folder_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec = tmp_path / "s.yaml"
    spec.write_text(yaml.safe_dump({**BASE, "jobs_root": str(tmp_path / "jobs")}))
    code = cli.main(["render", str(spec), "-o", str(tmp_path / "missing" / "x.sbatch")])
    check(code, capsys.readouterr().err, "render -o: cannot write")


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("slurm.time", "UNLIMITED"),
        ("slurm.time", "10080"),
        ("slurm.time", "7-00:00:00"),
        ("slurm.time", "30:00"),
        ("slurm.time", "2-12"),
        ("slurm.time", "unlimited"),
        ("slurm.time", "-1"),
        ("env", {"OMP_NUM_THREADS": 4, "RATIO": 0.5}),
        ("slurm.mem", "500G"),
        ("slurm.mem", "0"),
        ("env", {"TOKENIZERS_PARALLELISM": "false", "MAX_TOKENS": 5, "HF_TOKEN_PATH": "/t",
                 "HF_HUB_DISABLE_IMPLICIT_TOKEN": "1", "NCCL_IB_PKEY": "0", "SSH_AUTH_SOCK": "/s"}),
        ("slurm.extra_directives", {"gres": "gpu:4", "mail_type": "END", "--reservation": "r",
                                    "some-future-option": "x", "mem-per-gpu": "10G"}),
        ("vllm.args", {"max_model_len": 256, "max_num_batched_tokens": 512, "model_impl": "auto",
                       "config_format": "hf", "port_x": 1}),
        ("container.options", ["--shm-size=1g", "--cap-add", "SYS_NICE"]),
        ("container.options", ["-it", "--ipc=host"]),
        ("env", {"HTTP_PROXY": "http://proxy:3128", "NO_PROXY": "localhost", "MAX_TOKENS": 8,
                 "HF_HUB_DISABLE_IMPLICIT_TOKEN": "1", "TOKENIZERS_PARALLELISM": "false"}),
    ],
)
def test_valid_input_slurm_accepts_is_accepted(
    key: str, value: object, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = tmp_path / "ok.yaml"
    spec.write_text(yaml.safe_dump(mutate(key, value)))
    assert cli.main(["validate", str(spec)]) == 0, capsys.readouterr().err


def test_expansion_happens_once_with_an_escape(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """${NAME} is the login node's value; $${ is a literal ${ that no later step expands (the
    node's init reads the resolved spec with expand=False)."""
    from slurm_vllm.core import spec as spec_mod

    monkeypatch.setenv("SLURM_VLLM_T_MODEL", "/models/m")
    monkeypatch.setenv("SLURM_VLLM_T_SECRET", "s3cr3t")
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({**BASE, "model": {"path": "${SLURM_VLLM_T_MODEL}"},
                                    "env": {"LITERAL": "a$${SLURM_VLLM_T_SECRET}b", "DOLLAR": "$x $$y"}}))
    job = spec_mod.load(path)
    assert job.model.path == "/models/m"
    assert job.env == {"LITERAL": "a${SLURM_VLLM_T_SECRET}b", "DOLLAR": "$x $$y"}
    again = spec_mod.parse(yaml.safe_load(spec_mod.dump(job)), expand=False)
    assert again == job and "s3cr3t" not in spec_mod.dump(again)


@pytest.mark.parametrize("root", ["/shared/a:b/jobs", "/shared/a,b/jobs"])
def test_a_jobs_root_that_breaks_a_container_bind_is_refused(
    root: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The job folder is bound into the container as host:container: ':' or ',' in it would split it."""
    spec = tmp_path / "bad.yaml"
    docker = {"runtime": "docker", "image": "i"}
    spec.write_text(yaml.safe_dump({**BASE, "jobs_root": root, "container": docker}))
    check(*run_validate(spec, capsys), "jobs_root: ")
    spec.write_text(yaml.safe_dump({**BASE, "jobs_root": root}))        # no container: no bind, fine
    assert cli.main(["validate", str(spec)]) == 0


def test_a_newline_from_the_login_environment_is_refused_like_one_in_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("SLURM_VLLM_T_PART", "gpu\ntouch /tmp/PWNED #")
    spec = tmp_path / "s.yaml"
    spec.write_text(yaml.safe_dump(mutate("slurm.partition", "${SLURM_VLLM_T_PART}")))
    check(*run_validate(spec, capsys), "slurm.partition: control character")


PYXIS_REFUSED = [
    (["--container-image=/other.sqsh"], "container.options[0]: '--container-image=/other.sqsh'"),
    (["--container-mounts", "/a:/a"], "container.options[0]"),
    (["--container-name=x"], "container.options[0]"),
    (["--container-env=HF_TOKEN"], "container.options[0]"),
    (["--no-container-entrypoint"], "container.options[0]"),
    (["--container-unshare=net"], "container.options[0]"),     # Ray and vLLM need the node's network
    (["--container-writable", "-w", "node9"], "container.options[1]: '-w'"),
    (["--nodelist=node9"], "container.options[0]"),
    (["--jobid=1"], "container.options[0]"),
    (["--export=NONE"], "container.options[0]"),
    (["-c", "2"], "container.options[0]"),
    (["--gres=gpu:1"], "container.options[0]"),
    (["-J", "x"], "container.options[0]"),
]


@pytest.mark.parametrize(("options", "names"), PYXIS_REFUSED, ids=[o[0] for o, _ in PYXIS_REFUSED])
def test_a_pyxis_option_slurm_vllm_sets_is_refused(
    options: list[str], names: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = tmp_path / "bad.yaml"
    pyxis = {"runtime": "pyxis", "image": "/shared/vllm.sqsh", "options": options}
    spec.write_text(yaml.safe_dump({**BASE, "container": pyxis}))
    check(*run_validate(spec, capsys), names)


def test_pyxis_images_a_relative_path_refused_references_and_options_accepted(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = tmp_path / "s.yaml"
    relative = {"runtime": "pyxis", "image": "./vllm.sqsh"}
    spec.write_text(yaml.safe_dump({**BASE, "container": relative}))
    check(*run_validate(spec, capsys), "container.image: './vllm.sqsh': a squashfs file must be an absolute")
    for image in ("/shared/vllm.sqsh", "nvcr.io#nvidia/vllm:25.09-py3", "docker://vllm/vllm-openai:v0.11.0",
                  "dockerd://localhost/x:1", "vllm/vllm-openai"):
        ok = {"runtime": "pyxis", "image": image,
              "options": ["--container-writable", "--container-remap-root", "--container-workdir=/w"]}
        spec.write_text(yaml.safe_dump({**BASE, "container": ok}))
        assert cli.main(["validate", str(spec)]) == 0, capsys.readouterr().err
