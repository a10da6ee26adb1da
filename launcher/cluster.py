"""The Ray cluster a launch runs on: the workers' environment (no credentials through Ray's runtime_env) and
joining or starting the cluster (:func:`mim_scale.ray_session.start_or_join`, shared with every stage)."""

from __future__ import annotations

import os
import re
from pathlib import Path

from mim_scale import console
from mim_scale.config import Config
from mim_scale.errors import UserFacingError
from mim_scale.ray_session import start_or_join


# Names that hold credentials. Ray keeps a runtime_env in its GCS and shows it through its job and state APIs
# (and the dashboard), so none of these is ever put there: workers get credentials from the node itself
# (instance role, IRSA, a secret mounted on every node; see docs/CLUSTER.md, "Security").
SECRET_NAME = re.compile(r"SECRET|PASSWORD|PASSWD|SESSION_TOKEN|ACCESS_KEY|PRIVATE_KEY|API_KEY|CREDENTIAL(?!S_FILE|S$)"
                         r"|(^|_)TOKEN$", re.IGNORECASE)


def check_not_secret(name: str, where: str) -> None:
    """Refuse a variable whose name says it holds a credential (it would be stored in the runtime_env)."""
    if SECRET_NAME.search(name):
        raise UserFacingError(f"{where}: {name} looks like a credential; mim-scale does not pass credentials through "
                              "Ray's runtime_env (Ray stores it and its job APIs show it). Give the nodes an "
                              "instance role / IRSA, or mount the secret on every node (docs/CLUSTER.md, Security)")


def worker_env(cfg: Config, extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment every worker needs (workers are separate processes: nothing else is inherited).

    ``extra`` (``--env KEY=VALUE``) and the names listed in ``MIM_SCALE_FORWARD_ENV`` (comma-separated)
    are passed on as well, except credentials (:func:`check_not_secret` refuses them): cloud credentials
    come from the node (instance role, IRSA, a mounted secret), never from the driver's environment."""
    env = {
        "OMP_NUM_THREADS": str(max(1, int(cfg.launch.cpus_per_worker))),
        "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "torch_extensions")),
        "MIM_SCALE_LOG": os.environ.get("MIM_SCALE_LOG", "INFO"),
        "PYTHONUNBUFFERED": "1",
    }
    if not cfg.launch.use_gpu:
        env["DS_ACCELERATOR"] = "cpu"
    forward = [k.strip() for k in os.environ.get("MIM_SCALE_FORWARD_ENV", "").split(",") if k.strip()]
    for key in forward:
        check_not_secret(key, "MIM_SCALE_FORWARD_ENV")
    for key in (extra or {}):
        check_not_secret(key, "--env")
    # not secrets: where the store is, which region, the path of a credentials file the nodes hold
    for key in ("MIM_SCALE_SAMPLE_DATA", "TMPDIR", "RAY_AUTH_MODE", "AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION",
                "AWS_REGION", "GOOGLE_APPLICATION_CREDENTIALS", "NCCL_SOCKET_IFNAME", "NCCL_DEBUG", "NCCL_IB_DISABLE",
                *forward):
        if os.environ.get(key):
            env[key] = os.environ[key]
    env.update(extra or {})
    return env


def ensure_ray(cfg: Config, env: dict[str, str] | None = None) -> bool:
    """Connect to ``launch.address``, or a submitted job's cluster, or start a local cluster sized for
    ``launch.workers`` (:func:`mim_scale.ray_session.start_or_join`, the rule every stage shares); returns True
    if this call started Ray. Workers get :func:`worker_env`."""
    num_cpus = cfg.launch.ray_num_cpus or max(os.cpu_count() or 1, int(cfg.launch.workers * cfg.launch.cpus_per_worker))
    # quiet (the default): workers write the run folder's logs/rank-N.log instead of streaming to this terminal
    return start_or_join(cfg.launch.address, local_cpus=num_cpus, env_vars=worker_env(cfg, env),
                         object_store_bytes=256 * 2**20, log_to_driver=console.verbose())
