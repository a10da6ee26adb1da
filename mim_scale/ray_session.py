"""The one way any stage starts Ray (pre-training, fine-tuning, ``mim-scale shards build``, ``doctor``).

An address ("auto", "host:6379", "ray://host:10001") joins that cluster; without one, the driver of a submitted
Ray job (``ray job submit ... -- mim-scale ...``) joins its job's cluster; anything else starts a private local
cluster on this machine (``address="local"``: never whatever cluster ``/tmp/ray`` happens to name).
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

from mim_scale import console


def submitted_job_address() -> str | None:
    """The cluster of the Ray job this process is the driver of, else None. Ray's job supervisor gives a job's
    driver ``RAY_JOB_CONFIG_JSON_ENV_VAR`` (the job's runtime_env) and ``RAY_ADDRESS`` (its cluster's GCS
    address); a ``RAY_ADDRESS`` exported in a shell alone (often the dashboard's http:// URL, for ``ray job
    submit``) is not taken as a request to join."""
    if "RAY_JOB_CONFIG_JSON_ENV_VAR" not in os.environ:
        return None
    address = os.environ.get("RAY_ADDRESS", "")
    return address if address and "://" not in address else "auto"


def submitted_job_env_vars() -> set[str]:
    """Names of the environment variables the submitted job's runtime_env sets (none outside a job)."""
    try:
        job = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}"))
        return set(((job.get("runtime_env") or {}).get("env_vars") or {}).keys())
    except (ValueError, AttributeError):
        return set()


def start_or_join(address: str | None, *, local_cpus: int, env_vars: dict[str, str], object_store_bytes: int,
                  log_to_driver: bool, include_dashboard: bool = False) -> bool:
    """Make sure this process is connected to Ray; True if this call did it (the caller then shuts it down).

    address: the cluster to join (None: a submitted job's cluster, else a new local one of ``local_cpus`` CPUs
    and ``object_store_bytes`` of object store). env_vars: the workers' environment (their runtime_env); on a
    submitted job's cluster the job's own runtime_env wins on a shared name (Ray refuses both).
    log_to_driver: stream the workers' output to this terminal (verbose) or leave it in their log files.
    """
    import ray

    console.quiet_third_party()  # Ray's own terminal handler exists now that ray is imported
    if ray.is_initialized():
        return False
    joined = address or submitted_job_address()
    if joined and not address:
        env_vars = {k: v for k, v in env_vars.items() if k not in submitted_job_env_vars()}
    kwargs: dict[str, Any] = {"runtime_env": {"env_vars": env_vars}, "log_to_driver": log_to_driver}
    if not log_to_driver:
        kwargs["logging_level"] = logging.WARNING
    if joined:
        ray.init(address=joined, **kwargs)
    else:
        ray.init(address="local", num_cpus=local_cpus, include_dashboard=include_dashboard,
                 object_store_memory=object_store_bytes, **kwargs)
    return True
