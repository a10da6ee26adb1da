"""The files an operator deploys (launcher/Dockerfile, ray-cluster.yaml, kuberay-rayjob.yaml) cannot be
run here (no cloud, no Kubernetes, no Docker). What can be checked is checked: the `ray up` config
against Ray's own schema validator, the RayJob's entrypoint against mim-scale's own argument parser,
the versions in the image against the ones this project runs with, and the Dockerfile against a few
hadolint-style rules (hadolint itself is not installed)."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
import yaml

import mim_scale.launcher as launcher_pkg

LAUNCHER = Path(launcher_pkg.__file__).parent
REPO = LAUNCHER.parent
DOCKERFILE = LAUNCHER / "Dockerfile"
RAY_UP = LAUNCHER / "ray-cluster.yaml"
RAYJOB = LAUNCHER / "kuberay-rayjob.yaml"
KNOWN_INSTRUCTIONS = {"FROM", "ADD", "ARG", "ENV", "RUN", "COPY", "WORKDIR", "CMD", "ENTRYPOINT", "LABEL", "USER",
                      "EXPOSE", "HEALTHCHECK", "SHELL"}


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    out, buf = [], ""
    for raw in text.splitlines():
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        buf += " " + line.rstrip("\\").strip()
        if not line.endswith("\\"):
            word, _, rest = buf.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
            buf = ""
    assert not buf, "Dockerfile ends inside a line continuation"
    return out


def dockerfile_args(instructions: list[tuple[str, str]]) -> dict[str, str]:
    args = {}
    for word, rest in instructions:
        if word == "ARG" and "=" in rest:
            key, value = rest.split("=", 1)
            args[key] = value.strip('"')
    return args


def dockerfile_problems(text: str) -> list[str]:
    """Hadolint-style findings (DL3006/DL3007 tags, DL3009/DL3015 apt, DL3013 pip pins, DL3025 exec CMD,
    DL3020 no ADD of URLs) plus COPY sources that are not in the repository."""
    problems = []
    instructions = dockerfile_instructions(text)
    words = [w for w, _ in instructions]
    problems += [f"unknown instruction {w}" for w in set(words) - KNOWN_INSTRUCTIONS]
    if words.count("FROM") != 1 or set(words[: words.index("FROM")]) - {"ARG"}:
        problems.append("one FROM, preceded only by ARGs")
    else:
        base = dict(instructions)["FROM"]
        if ":" not in base or base.endswith(":latest"):
            problems.append(f"FROM {base}: pin a tag")
    for word, rest in instructions:
        if word == "RUN" and "apt-get install" in rest:
            if "--no-install-recommends" not in rest or "rm -rf /var/lib/apt/lists" not in rest:
                problems.append(f"apt-get install without --no-install-recommends / list cleanup: {rest[:60]}")
        if word == "RUN":
            for spec in re.findall(r"pip install ([^&]+)", rest):
                for token in shlex.split(spec):
                    if token.startswith("-") or token in (".", "pip", "setuptools", "wheel") or token.startswith("http"):
                        continue
                    if re.match(r"^[A-Za-z]", token) and "==" not in token:
                        problems.append(f"unpinned pip package {token}")
        if word == "CMD":
            try:
                assert isinstance(json.loads(rest), list)
            except (ValueError, AssertionError):
                problems.append("CMD not in exec form")
        if word == "ADD" and "://" in rest:
            problems.append("ADD of a URL")
        if word == "COPY":
            problems += [f"COPY {src}: not in the repository" for src in shlex.split(rest)[:-1] if not (REPO / src).exists()]
    return problems


def test_dockerfile_is_well_formed_and_pinned():
    text = DOCKERFILE.read_text()
    assert dockerfile_problems(text) == []
    runs = " ".join(rest for w, rest in dockerfile_instructions(text) if w == "RUN")
    assert "DS_BUILD_FUSED_ADAM=1" in runs and "ds_report" in runs  # DeepSpeed ops built and checked at build time
    assert "--index-url" in runs and "torch==${TORCH}" in runs  # torch first, from the CUDA index


def test_dockerfile_rules_catch_bad_files():
    bad = ("FROM ubuntu:latest\nRUN apt-get update && apt-get install -y curl\nRUN pip install torch\n"
           "COPY no_such_dir /x\nADD https://example.com/x.tgz /x\nCMD mim-scale --help\n")
    problems = dockerfile_problems(bad)
    assert len(problems) == 6, problems
    with pytest.raises(AssertionError):
        dockerfile_instructions("RUN echo a \\\n")


def test_dockerfile_versions_are_the_ones_this_project_runs():
    import deepspeed
    import ray
    import torch

    args = dockerfile_args(dockerfile_instructions(DOCKERFILE.read_text()))
    assert args["TORCH"] == torch.__version__.split("+")[0]
    assert args["DEEPSPEED"] == deepspeed.__version__
    assert args["RAY"] == ray.__version__
    assert args["TORCH_INDEX"].endswith("cu" + args["CUDA"].replace(".", "")[:3])


def test_ray_up_config_passes_rays_validator():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load(RAY_UP.read_text())
    validate_config(prepare_config(config))  # Ray's JSON schema + node-type checks, offline
    assert config["provider"]["type"] == "aws"
    head = config["available_node_types"][config["head_node_type"]]
    assert head["resources"] == {"CPU": 0}  # no training workers on the head
    assert any("ray start --head" in c for c in config["head_start_ray_commands"])
    assert all("$RAY_HEAD_IP" in c for c in config["worker_start_ray_commands"] if "ray start" in c)
    # a broken config is caught by the same check (the validator is not a no-op)
    broken = yaml.safe_load(RAY_UP.read_text())
    broken["head_node_type"] = "no-such-type"
    with pytest.raises(ValueError):
        validate_config(prepare_config(broken))


def test_rayjob_manifest_entrypoint_parses_and_fits_the_cluster():
    import ray

    from mim_scale.cli import build_parser
    from mim_scale.config import load_config

    job = yaml.safe_load(RAYJOB.read_text())
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    spec = job["spec"]
    argv = shlex.split(spec["entrypoint"])
    assert argv[0] == "mim-scale"
    args = build_parser().parse_args(argv[1:])  # the same parser the container runs
    assert args.command == "pretrain" and args.use_gpu and args.address == "auto"
    max_workers, min_workers = args.workers
    cfg = load_config(args.config, args.overrides)
    assert cfg.model.embed_dim > 0

    cluster = spec["rayClusterSpec"]
    assert cluster["rayVersion"] == ray.__version__
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    (group,) = cluster["workerGroupSpecs"]
    assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    (container,) = group["template"]["spec"]["containers"]
    gpus = int(container["resources"]["limits"]["nvidia.com/gpu"])
    assert group["maxReplicas"] * gpus >= max_workers  # the full group fits
    if min_workers is not None:  # elastic: the floor fits on the smallest cluster (a fixed group waits for room)
        assert group["minReplicas"] * gpus >= min_workers
    images = {c["image"] for g in [cluster["headGroupSpec"], group] for c in g["template"]["spec"]["containers"]}
    ray_up_image = yaml.safe_load(RAY_UP.read_text())["docker"]["image"]
    assert images == {ray_up_image}  # one image for both ways of deploying
    env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert set(env) == {"env_vars"} and all(isinstance(v, str) for v in env["env_vars"].values())


# ------------------------------------------------------------------ security of the cluster files (issue 15)

def _ray_start_commands(config: dict) -> list[str]:
    return [c for key in ("head_start_ray_commands", "worker_start_ray_commands") for c in config[key] if "ray start" in c]


def test_ray_up_cluster_uses_tokens_loopback_dashboard_and_instance_roles():
    text = RAY_UP.read_text()
    config = yaml.safe_load(text)
    docker_env = " ".join(config["docker"]["run_options"])
    assert "RAY_AUTH_MODE=token" in docker_env and "RAY_AUTH_TOKEN_PATH=" in docker_env
    starts = _ray_start_commands(config)
    assert len(starts) == 2 and all("RAY_AUTH_MODE=token" in c for c in starts)
    (head,) = [c for c in starts if "--head" in c]
    assert "--dashboard-host=127.0.0.1" in head and "0.0.0.0" not in text.split("head_start_ray_commands")[1]
    token_path = re.search(r"RAY_AUTH_TOKEN_PATH=(\S+)", docker_env).group(1)
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):  # the token is fetched before ray start
        commands = config[key]
        fetch = [i for i, c in enumerate(commands) if "secretsmanager" in c and token_path in c]
        start = [i for i, c in enumerate(commands) if "ray start" in c]
        assert fetch and start and fetch[0] < start[0], key
        assert "umask 077" in commands[fetch[0]]
    for name, node in config["available_node_types"].items():  # credentials: instance profiles, per node type
        assert node["node_config"]["IamInstanceProfile"]["Arn"].startswith("arn:aws:iam::"), name
    assert not re.search(r"AWS_(SECRET_ACCESS_KEY|SESSION_TOKEN|ACCESS_KEY_ID)\s*[=:]", text)
    assert not re.search(r"RAY_AUTH_TOKEN\s*[=:]", text)  # the token itself is never in the file


def test_rayjob_uses_tokens_cluster_ip_and_irsa():
    from mim_scale.launcher.cluster import SECRET_NAME

    text = RAYJOB.read_text()
    spec = yaml.safe_load(text)["spec"]
    cluster = spec["rayClusterSpec"]
    assert cluster["authOptions"] == {"mode": "token"}
    major, minor = (int(x) for x in cluster["rayVersion"].split(".")[:2])
    assert (major, minor) >= (2, 52)  # Ray's token authentication
    head = cluster["headGroupSpec"]
    assert head.get("serviceType", "ClusterIP") == "ClusterIP" and not head.get("enableIngress", False)
    values = json.dumps(spec)  # the manifest's values (comments excluded): nothing exposes a service outside
    assert "LoadBalancer" not in values and "NodePort" not in values and "Ingress" not in values
    for group in [head, *cluster["workerGroupSpecs"]]:
        pod = group["template"]["spec"]
        assert pod["serviceAccountName"] == "mim-scale"  # IRSA
        for container in pod["containers"]:
            names = [e["name"] for e in container.get("env", [])]
            assert not [n for n in names if SECRET_NAME.search(n) and n != "RAY_AUTH_TOKEN"], names
    env = yaml.safe_load(spec["runtimeEnvYAML"])["env_vars"]
    assert not [k for k in env if SECRET_NAME.search(k)]
    assert not re.search(r"AWS_(SECRET_ACCESS_KEY|SESSION_TOKEN|ACCESS_KEY_ID)\s*[=:]", text)


def test_worker_env_never_carries_credentials(monkeypatch):
    from mim_scale.config import load_config
    from mim_scale.errors import UserFacingError
    from mim_scale.launcher.cluster import worker_env

    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "RAY_AUTH_TOKEN"):
        monkeypatch.setenv(key, "s3cr3t")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://minio:9000")
    monkeypatch.delenv("MIM_SCALE_FORWARD_ENV", raising=False)
    env = worker_env(load_config("tiny"))
    assert "s3cr3t" not in env.values() and env["AWS_ENDPOINT_URL"] == "http://minio:9000"
    with pytest.raises(UserFacingError, match="--env: HF_TOKEN looks like a credential"):
        worker_env(load_config("tiny"), {"HF_TOKEN": "x"})
    monkeypatch.setenv("MIM_SCALE_FORWARD_ENV", "AWS_SECRET_ACCESS_KEY")
    with pytest.raises(UserFacingError, match="MIM_SCALE_FORWARD_ENV: AWS_SECRET_ACCESS_KEY"):
        worker_env(load_config("tiny"))


def test_cluster_doc_says_what_is_exposed_where():
    doc = (REPO / "docs" / "CLUSTER.md").read_text()
    security = doc.split("## Security", 1)[1].split("\n## ", 1)[0]
    for port in ("8265", "10001", "6379", "8080", "9090"):
        assert port in security, port
    for word in ("RAY_AUTH_MODE=token", "port-forward", "IRSA", "instance profile", "runtime_env", "lifecycle"):
        assert word in security, word
    assert "dashboard-host=0.0.0.0" not in doc
