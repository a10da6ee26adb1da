"""``mim-scale doctor``: what an operator checks before a long run, on the head and on every node.

    mim-scale doctor --config large --address auto --use-gpu --storage /fsx/runs \\
        --set data.shards=/fsx/shards/manifest.json

On the machine it runs on (the head, where the driver runs) and on every live node of the Ray cluster (one
Ray task pinned to each node), it checks:

- torch, and with ``--use-gpu`` CUDA and the GPUs torch sees (against the GPUs Ray counts on that node);
- the DeepSpeed ops the engine will use (FusedAdam on GPU, DeepSpeedCPUAdam with optimizer offload): built
  into the install, or JIT-compiled at the first step, which needs ninja, a C++ compiler (and nvcc for GPU
  ops) on that node and costs about a minute per op; and no build lock left in the extensions folder by a
  process killed mid-build (every later process would wait on it for ever, silently);
- the storage path (``--storage``, default ``launch.storage``): it exists or can be made, a file can be
  written and removed there, and its free space (``--min-free-gb``);
- the shard manifest (``data.shards``): readable from that node, and its first shard opens.

On the head only: the ``prometheus`` binary that ``mim-scale monitor`` starts (or ``--prometheus-url``
answering ``/-/ready``). It prints, per node, what is fine and what to fix, and exits 1 when something
would stop a run (a ``FIX`` line), 0 otherwise (``warn`` lines do not block). Object-store paths
(``s3://``) are not probed here: the run's first checkpoint is.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import sys
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

from mim_scale.config import Config, load_config

OK, WARN, FIX = "ok", "warn", "FIX"
NODE_TIMEOUT_S = 300.0  # a node whose check has not answered by then is reported as not answering
# a JIT build of one op takes about a minute: a lock older than this was left by a process that died building
STALE_BUILD_LOCK_S = 15 * 60.0


@dataclass
class Finding:
    level: str  # OK, WARN or FIX
    what: str  # the check: "torch", "gpus", "deepspeed", "storage", "shards", "prometheus", "node"
    message: str


@dataclass
class NodeReport:
    node: str  # host name (and Ray node IP)
    role: str  # "head" (this machine, where the driver runs) or "node"
    findings: list[Finding] = field(default_factory=list)
    ray_node_id: str = ""  # the Ray node the check ran on (node reports)

    @property
    def blocking(self) -> bool:
        return any(f.level == FIX for f in self.findings)

    def add(self, level: str, what: str, message: str) -> None:
        self.findings.append(Finding(level, what, message))


@dataclass
class Spec:
    """What every node checks (plain data: it travels to the Ray tasks)."""

    use_gpu: bool
    offload_optimizer: bool
    storage: str
    shards: str
    allow_external_shard_urls: bool
    min_free_gb: float


def spec_from(cfg: Config, storage: str | None = None, min_free_gb: float = 20.0) -> Spec:
    return Spec(use_gpu=cfg.launch.use_gpu, offload_optimizer=cfg.train.offload_optimizer,
                storage=storage or cfg.launch.storage, shards=cfg.data.shards,
                allow_external_shard_urls=cfg.data.allow_external_shard_urls, min_free_gb=min_free_gb)


# -- the checks of one node ------------------------------------------------------------------------

def check_here(spec: Spec, role: str = "node", ray_gpus: float | None = None) -> NodeReport:
    """Every per-node check, run in this process (on the head directly, on a node inside a Ray task)."""
    host = socket.gethostname()
    report = NodeReport(node=host, role=role)
    for check in (_check_torch, _check_deepspeed, _check_storage, _check_shards):
        try:
            check(spec, report, ray_gpus) if check is _check_torch else check(spec, report)
        except Exception as exc:  # noqa: BLE001 - a check that breaks is itself a finding, not a crash
            report.add(FIX, check.__name__[7:], f"the check failed: {type(exc).__name__}: {exc}")
    return report


def _check_torch(spec: Spec, report: NodeReport, ray_gpus: float | None) -> None:
    try:
        import torch
    except ImportError as exc:
        report.add(FIX, "torch", f"torch does not import ({exc}): install it as scripts/setup.sh does")
        return
    cuda = torch.version.cuda or "none"
    report.add(OK, "torch", f"torch {torch.__version__}, built for CUDA {cuda}, Python {sys.version.split()[0]}")
    if not spec.use_gpu:
        return
    seen = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if torch.version.cuda is None:
        report.add(FIX, "gpus", "this torch is a CPU build: install the CUDA build (see launcher/Dockerfile)")
    elif seen == 0:
        report.add(FIX, "gpus", "torch sees no GPU (driver, CUDA_VISIBLE_DEVICES, or the container's --gpus)")
    else:
        names = sorted({torch.cuda.get_device_name(i) for i in range(seen)})
        report.add(OK, "gpus", f"{seen} GPU(s) visible to torch: {', '.join(names)}")
    if ray_gpus is not None and ray_gpus != seen:
        report.add(FIX if seen < ray_gpus else WARN, "gpus",
                   f"Ray counts {ray_gpus:g} GPU(s) on this node but torch sees {seen}: workers placed here would "
                   "fail or idle (check `ray start --num-gpus` and CUDA_VISIBLE_DEVICES)")


def _ops_needed(spec: Spec) -> list[tuple[str, str]]:
    """(op name, why) of the DeepSpeed ops a worker builds: the optimizer's (mim_scale.engine.deepspeed_engine.
    make_optimizer) and, on CPU, the shared-memory collectives DeepSpeed's CPU accelerator loads in
    ``init_distributed`` wherever it can build them."""
    if not spec.use_gpu:
        import deepspeed.ops

        # CPU runs use torch's AdamW; DeepSpeed skips the shm op where it cannot build it
        return ([("deepspeed_shm_comm", "DeepSpeed's CPU shared-memory collectives")]
                if deepspeed.ops.__compatible_ops__.get("deepspeed_shm_comm") else [])
    if spec.offload_optimizer:
        return [("cpu_adam", "DeepSpeedCPUAdam (train.offload_optimizer)")]
    return [("fused_adam", "FusedAdam")]


def _check_deepspeed(spec: Spec, report: NodeReport) -> None:
    try:
        import deepspeed
        from deepspeed.git_version_info import installed_ops
    except Exception as exc:  # noqa: BLE001 - DeepSpeed raises more than ImportError when its accelerator is off
        report.add(FIX, "deepspeed", f"deepspeed does not import ({type(exc).__name__}: {exc})")
        return
    _check_build_locks(report)
    needed = _ops_needed(spec)
    jit = [(op, why) for op, why in needed if not installed_ops.get(op)]
    prebuilt = [op for op, _ in needed if installed_ops.get(op)]
    msg = f"deepspeed {deepspeed.__version__}" + (f", prebuilt: {', '.join(prebuilt)}" if prebuilt else "")
    report.add(OK, "deepspeed", msg + ("" if needed else " (no op to compile)"))
    if not jit:
        return
    tools = [("ninja", _has_ninja()), ("c++", shutil.which("c++") or shutil.which("g++"))]
    if spec.use_gpu:
        tools.append(("nvcc", _nvcc()))
    missing = [tool for tool, found in tools if not found]
    names = ", ".join(f"{op} ({why})" for op, why in jit)
    if missing:
        report.add(FIX, "deepspeed", f"{names} will be JIT-compiled at the first step, but {', '.join(missing)} "
                   "is missing on this node: use an image with DS_BUILD_OPS=1 prebuilt ops (launcher/Dockerfile) "
                   "or install the build tools")
    else:
        report.add(WARN if spec.use_gpu else OK, "deepspeed",
                   f"{names} will be JIT-compiled at the first step (about a minute per op, per node; cached under "
                   "TORCH_EXTENSIONS_DIR); prebuild with DS_BUILD_OPS=1 to skip it")


def _extensions_root() -> Path:
    """Where torch JIT-builds extensions (DeepSpeed's ops among them): ``TORCH_EXTENSIONS_DIR`` or torch's default
    (one sub-folder per Python/CUDA build there)."""
    from torch.utils.cpp_extension import get_default_build_root

    return Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root())


def _check_build_locks(report: NodeReport) -> None:
    """torch's build lock (``<root>/[<build>/]<op>/lock``) outlives a process killed while it builds; every later
    process that loads the op then waits in ``FileBaton.wait`` until the file goes, with no message."""
    root = _extensions_root()
    now = time.time()
    for lock in sorted([*root.glob("*/lock"), *root.glob("*/*/lock")]):
        try:
            age_s = now - lock.stat().st_mtime
        except FileNotFoundError:  # a build finished meanwhile
            continue
        if age_s >= STALE_BUILD_LOCK_S:
            report.add(FIX, "deepspeed", f"stale build lock {lock} ({age_s / 60:.0f} min old, left by a process "
                       f"that died while building the {lock.parent.name} op): every process loading that op waits "
                       f"on it for ever; remove it (rm {lock}) when no build is running on this node")
        else:
            report.add(WARN, "deepspeed", f"{lock.parent.name} is being built on this node ({lock}, "
                       f"{age_s:.0f} s old); if no process is building it, remove the lock")


def _has_ninja() -> bool:
    try:
        import ninja  # noqa: F401

        return True
    except ImportError:
        return shutil.which("ninja") is not None


def _nvcc() -> str | None:
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    candidate = Path(home) / "bin" / "nvcc"
    return str(candidate) if candidate.is_file() else shutil.which("nvcc")


def _check_storage(spec: Spec, report: NodeReport) -> None:
    if "://" in spec.storage:
        report.add(OK, "storage", f"{spec.storage}: an object store (not probed; the first checkpoint is)")
        return
    path = Path(spec.storage).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        report.add(FIX, "storage", f"{path}: cannot create it ({exc.strerror or exc}); checkpoints go there")
        return
    probe = path / f".mim-doctor-{socket.gethostname()}-{uuid.uuid4().hex[:8]}"
    try:
        with open(probe, "wb") as f:
            f.write(b"mim-scale doctor\n")
            f.flush()
            os.fsync(f.fileno())
        probe.unlink()
    except OSError as exc:
        report.add(FIX, "storage", f"{path}: cannot write a file there ({exc.strerror or exc}); checkpoints go there")
        return
    free_gb = shutil.disk_usage(path).free / 2**30
    if free_gb < spec.min_free_gb:
        report.add(FIX, "storage", f"{path}: {free_gb:.1f} GiB free, under the {spec.min_free_gb:g} GiB asked for "
                   "(--min-free-gb): free space or point --storage elsewhere")
    else:
        report.add(OK, "storage", f"{path}: writable, {free_gb:.1f} GiB free")


def _check_shards(spec: Spec, report: NodeReport) -> None:
    from mim_scale.data.stream import load_shard_list
    from mim_scale.errors import UserFacingError

    if not spec.shards:
        report.add(FIX, "shards", "data.shards is not set: pass --set data.shards=MANIFEST")
        return
    try:
        shards = load_shard_list(spec.shards, allow_external=spec.allow_external_shard_urls)
    except (UserFacingError, OSError, ValueError) as exc:
        report.add(FIX, "shards", f"{spec.shards}: the manifest is not readable from this node: {exc}")
        return
    if not shards:
        report.add(FIX, "shards", f"{spec.shards}: the manifest lists no shard")
        return
    first = shards[0].url
    if "://" not in first and not first.startswith("pipe:"):
        try:
            with open(first, "rb") as f:
                head = f.read(512)
            if len(head) < 512:
                raise OSError(f"only {len(head)} bytes")
        except OSError as exc:
            report.add(FIX, "shards", f"{first}: the first shard does not open from this node ({exc})")
            return
    samples = sum(s.samples for s in shards)
    report.add(OK, "shards", f"{spec.shards}: {len(shards)} shard(s), {samples} volume(s); the first one opens")


def check_prometheus(report: NodeReport, url: str | None, explicit: str | None = None) -> None:
    """Head only: a Prometheus that answers at ``url``, else the binary ``mim-scale monitor`` would start."""
    if url:
        import urllib.request

        try:
            with urllib.request.urlopen(url.rstrip("/") + "/-/ready", timeout=5) as resp:
                report.add(OK, "prometheus", f"{url} is ready ({resp.status})")
        except OSError as exc:
            report.add(WARN, "prometheus", f"{url} does not answer /-/ready ({exc}): the run trains, unwatched")
        return
    from mim_scale.errors import UserFacingError
    from mim_scale.monitor import find_prometheus

    try:
        report.add(OK, "prometheus", f"{find_prometheus(explicit)} (what `mim-scale monitor` starts)")
    except UserFacingError as exc:
        report.add(WARN, "prometheus", f"{exc} The run trains without it, unwatched.")


# -- the cluster -------------------------------------------------------------------------------------

def check_cluster(spec: Spec, *, prometheus_url: str | None = None, prometheus: str | None = None,
                  timeout_s: float = NODE_TIMEOUT_S) -> list[NodeReport]:
    """The head's report (this process), then one per live node of the connected Ray cluster (if any)."""
    head = check_here(spec, role="head")
    check_prometheus(head, prometheus_url, prometheus)
    reports = [head]
    import ray

    if not ray.is_initialized():
        return reports
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    remote = ray.remote(num_cpus=0)(_check_on_node)
    pending = {}
    for node in ray.nodes():
        if not node.get("Alive"):
            continue
        gpus = float(node.get("Resources", {}).get("GPU", 0.0))
        ref = remote.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)).remote(
            spec, "node", gpus if spec.use_gpu else None)
        pending[ref] = f"{node.get('NodeManagerAddress', '?')} node {node['NodeID'][:8]}"
    ready, late = ray.wait(list(pending), num_returns=len(pending), timeout=timeout_s)
    for ref in ready:
        try:
            node_report = ray.get(ref)
            node_report.node = f"{node_report.node} ({pending[ref]})"
        except Exception as exc:  # noqa: BLE001 - a node whose task died is reported, not raised
            node_report = NodeReport(node=pending[ref], role="node")
            node_report.add(FIX, "node", f"the check task failed there: {type(exc).__name__}: {exc}")
        reports.append(node_report)
    for ref in late:
        node_report = NodeReport(node=pending[ref], role="node")
        node_report.add(FIX, "node", f"no answer in {timeout_s:g} s (node busy, or its raylet cannot start a worker)")
        reports.append(node_report)
        ray.cancel(ref, force=True)
    return reports


def _check_on_node(spec: Spec, role: str, ray_gpus: float | None) -> NodeReport:
    """:func:`check_here` inside a Ray task, recording which node it really ran on."""
    import ray

    report = check_here(spec, role, ray_gpus)
    report.ray_node_id = ray.get_runtime_context().get_node_id()
    return report


def render(reports: list[NodeReport]) -> str:
    lines = []
    for r in reports:
        lines.append(f"{r.role} {r.node}: {'needs fixing' if r.blocking else 'ready'}")
        for f in r.findings:
            lines.append(f"  {f.level:4s} {f.what:10s} {f.message}")
    blocking = [r for r in reports if r.blocking]
    lines.append(f"{len(blocking)} of {len(reports)} machine(s) need fixing before a run" if blocking
                 else f"all {len(reports)} machine(s) ready")
    return "\n".join(lines)


def _run(args: argparse.Namespace) -> int:
    overrides = list(args.overrides)
    if args.use_gpu:
        overrides.append("launch.use_gpu=true")
    if args.address:
        overrides.append(f"launch.address={args.address}")
    cfg = load_config(args.config, overrides)
    spec = spec_from(cfg, args.storage, args.min_free_gb)
    started = False
    if not args.no_ray:
        from mim_scale.launcher.cluster import ensure_ray

        started = ensure_ray(cfg)
    try:
        reports = check_cluster(spec, prometheus_url=args.prometheus_url, prometheus=args.prometheus)
    finally:
        if started:
            import ray

            ray.shutdown()
    print(json.dumps([asdict(r) | {"blocking": r.blocking} for r in reports], indent=1) if args.json
          else render(reports))
    return 1 if any(r.blocking for r in reports) else 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("doctor", help="check the head and every node before a long run (exit 1 if one blocks it)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="base", metavar="FILE_OR_NAME", help="the run's config (default: base)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override, as for pretrain (e.g. data.shards=...)")
    p.add_argument("--address", default=None,
                   help="Ray cluster to check ('auto', host:6379); default: this machine's own (as pretrain)")
    p.add_argument("--use-gpu", action="store_true", help="the run will use GPUs: check CUDA, GPUs, GPU ops")
    p.add_argument("--storage", default=None, help="where checkpoints go (default: launch.storage)")
    p.add_argument("--min-free-gb", type=float, default=20.0, help="free space the storage needs (GiB, default 20)")
    p.add_argument("--prometheus-url", default=None, help="a running Prometheus to check instead of the binary")
    p.add_argument("--prometheus", default=None, help="the prometheus binary (as for mim-scale monitor)")
    p.add_argument("--no-ray", action="store_true", help="check this machine only")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_run)
