"""The driver's run folder, reachable from every worker: a Ray actor pinned to the driver's node.

With an object store as storage the run folder is ``./runs/NAME`` on the driver's machine, and even on a shared
file system a worker should not need the driver's path. Every worker gets a handle to one
:class:`RunFolderActor` that runs on the driver's node and writes there (targets, history, worker records,
attempt counts; :mod:`mim_scale.rundir` names them and checks every name). Calls are serialised by the actor, so
appends from several ranks never interleave within a line.

The actor is created by the driver (:func:`start_run_folder`) and passed to the workers in the train loop
config; it ends with the driver's job. Everything it does is a few small files per step at most.
"""

from __future__ import annotations

from typing import Any

from mim_scale.rundir import RunFiles

_OPS = ("read_text", "write_text", "write_bytes", "append_line", "truncate_torn_tail", "remove", "names")


class RunFolderActor:
    """One run folder on the node this actor runs on (the driver's)."""

    def __init__(self, run_dir: str):
        self._files = RunFiles(run_dir)

    def call(self, op: str, name: str, *args: Any) -> Any:
        if op not in _OPS:
            raise ValueError(f"run folder: unknown operation {op!r}")
        return getattr(self._files, op)(name, *args)

    def node_ip(self) -> str:
        import ray

        return ray.util.get_node_ip_address()


def start_run_folder(run_dir: str):
    """Start the actor on this (the driver's) node, CPU-free; returns its handle."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    node = ray.get_runtime_context().get_node_id()
    actor = ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=3)(RunFolderActor).options(
        scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=node, soft=False)).remote(str(run_dir))
    ray.get(actor.node_ip.remote())  # up before any worker needs it
    return actor


class RayRunFiles(RunFiles):
    """:class:`~mim_scale.rundir.RunFiles` whose every call runs in the driver's :class:`RunFolderActor`."""

    def __init__(self, actor, run_dir: str):
        super().__init__(run_dir)
        self._actor = actor

    def _call(self, op: str, name: str, *args: Any) -> Any:
        import ray

        return ray.get(self._actor.call.remote(op, name, *args))

    def read_text(self, name: str) -> str | None:
        return self._call("read_text", name)

    def write_text(self, name: str, text: str) -> None:
        self._call("write_text", name, text)

    def write_bytes(self, name: str, data: bytes) -> None:
        self._call("write_bytes", name, data)

    def append_line(self, name: str, line: str) -> None:
        self._call("append_line", name, line)

    def truncate_torn_tail(self, name: str) -> None:
        self._call("truncate_torn_tail", name)

    def remove(self, name: str) -> None:
        self._call("remove", name)

    def names(self, folder: str) -> list[str]:
        return self._call("names", folder)
