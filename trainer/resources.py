"""What a stage asks of the Ray cluster, what the cluster has, and the "auto" settings chosen to fit it.

A training stage asks for `ray.num_workers` bundles of `ray.cpus_per_worker` CPUs (plus one GPU each when
`ray.use_gpu`); the eval task for one such bundle. Ray Train's controller actor asks for no CPU (Ray 2.60,
V2 API), so the workers may take every CPU of the cluster. A bundle must fit on one node, so the check
counts, node by node, how many bundles each can hold.

Ray Train itself would retry starting a worker group that can never be placed every 60 s, forever; so
before each stage `ensure_fits` refuses a request the cluster cannot hold, in one line with the numbers
and the `--set` that fits. A cluster that can grow (an autoscaler whose cluster config lets a node type
scale up) is asked for the bundles and given `ray.resource_timeout_s` to provide them first.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from trainer.config import AUTO, Config, ConfigError

log = logging.getLogger(__name__)
AUTO_MAX_CPUS_PER_WORKER = 8  # the reference configs' share: 8 loader threads and BLAS threads per GPU
POLL_S = 5.0  # how often a growing cluster is asked again
LOG_EVERY_S = 30.0  # progress line while waiting


@dataclass(frozen=True)
class Node:
    """One alive node's total logical resources."""

    cpus: float
    gpus: float


@dataclass(frozen=True)
class ClusterView:
    """The alive nodes and whether an autoscaler may add more (with the most it could reach, if known)."""

    nodes: tuple[Node, ...]
    can_grow: bool = False
    ceiling: dict[str, float] | None = None  # the cluster config's maximum of each resource

    @property
    def cpus(self) -> float:
        return sum(n.cpus for n in self.nodes)

    @property
    def gpus(self) -> float:
        return sum(n.gpus for n in self.nodes)

    def describe(self) -> str:
        return (f"{self.cpus:g} CPUs and {self.gpus:g} GPUs on {len(self.nodes)} node(s), "
                f"largest {max((n.cpus for n in self.nodes), default=0):g} CPUs")


def cluster_view() -> ClusterView:
    """The connected Ray cluster as it is now (ray must be initialised)."""
    import ray

    nodes = tuple(Node(n["Resources"].get("CPU", 0.0), n["Resources"].get("GPU", 0.0))
                  for n in ray.nodes() if n.get("Alive"))
    can_grow, ceiling = _autoscaling()
    return ClusterView(nodes, can_grow, ceiling)


def _autoscaling() -> tuple[bool, dict[str, float] | None]:
    """Whether the cluster config an autoscaler reported lets any node type scale up (what Ray Data and
    Ray Train themselves read; a cluster started with `ray start`/`ray.init` has none)."""
    try:
        import ray._private.state

        config = ray._private.state.state.get_cluster_config()
        if not config or not config.node_group_configs:
            return False, None
        grows = any(g.max_count == -1 or g.max_count > g.min_count
                    for g in config.node_group_configs if g.resources and g.max_count != 0)
        return grows, ray._private.state.state.get_max_resources_from_cluster_config()
    except Exception:  # a Ray without this (private) state API: treat the cluster as fixed
        log.debug("no autoscaler cluster config readable", exc_info=True)
        return False, None


def bundles_that_fit(nodes: tuple[Node, ...], cpus: float, gpus: float) -> int:
    """How many identical bundles of `cpus` CPUs and `gpus` GPUs the nodes hold (each within one node)."""
    def per_node(node: Node) -> int:
        fits = [math.floor(node.cpus / cpus + 1e-9)] if cpus > 0 else []
        fits += [math.floor(node.gpus / gpus + 1e-9)] if gpus > 0 else []
        return min(fits) if fits else 0
    return sum(per_node(n) for n in nodes)


def has_auto(config: Config) -> bool:
    """Whether any setting still says "auto" (resolve_auto has not run on this config)."""
    return AUTO in (config.ray.use_gpu, config.ray.cpus_per_worker, config.data.num_workers)


def resolve_auto(config: Config, view: ClusterView) -> Config:
    """Replace "auto" in ray.use_gpu, ray.cpus_per_worker and data.num_workers by values that fit `view`:
    a GPU per worker iff the cluster has GPUs; the most whole CPUs per worker (1..8) that let every worker
    be placed; one loader worker per CPU of the worker. Logs one line naming the values chosen."""
    ray_cfg, data = config.ray, config.data
    chosen = []
    use_gpu = ray_cfg.use_gpu
    if use_gpu == AUTO:
        use_gpu = view.gpus >= 1
        chosen.append(f"ray.use_gpu={str(use_gpu).lower()}")
    cpus = ray_cfg.cpus_per_worker
    if cpus == AUTO:
        gpus = 1 if use_gpu else 0
        cpus = next((float(c) for c in range(AUTO_MAX_CPUS_PER_WORKER, 0, -1)
                     if bundles_that_fit(view.nodes, c, gpus) >= ray_cfg.min_workers), 1.0)
        chosen.append(f"ray.cpus_per_worker={cpus:g}")
    loaders = data.num_workers
    if loaders == AUTO:
        loaders = max(1, int(cpus))
        chosen.append(f"data.num_workers={loaders}")
    if chosen:
        log.info("auto settings for %s worker(s) on %s: %s", ray_cfg.num_workers, view.describe(), ", ".join(chosen))
    return dataclasses.replace(config, ray=dataclasses.replace(ray_cfg, use_gpu=use_gpu, cpus_per_worker=cpus),
                               data=dataclasses.replace(data, num_workers=loaders))


def shortfall(config: Config, view: ClusterView, what: str, workers: int) -> str | None:
    """Why `workers` bundles of this config do not fit `view` (with the `--set` that fits), or None."""
    cpus, gpus = config.ray.cpus_per_worker, (1 if config.ray.use_gpu else 0)
    if bundles_that_fit(view.nodes, cpus, gpus) >= workers:
        return None
    bundle = f"{cpus:g} CPUs" + (" + 1 GPU" if gpus else "")
    need = f"{workers} x ({bundle}) = {workers * cpus:g} CPUs" + (f", {workers} GPUs" if gpus else "")
    return f"{what} needs {need} but the Ray cluster has {view.describe()}; {_what_fits(config, view, workers)}"


def _what_fits(config: Config, view: ClusterView, workers: int) -> str:
    """The override that makes the request fit this cluster, most like the config first."""
    cpus, gpus = config.ray.cpus_per_worker, (1 if config.ray.use_gpu else 0)
    if gpus and view.gpus < 1:
        return "this cluster has no GPU: pass --set ray.use_gpu=false (or auto), and --set train.amp=none on " \
               "CPUs without bfloat16, or run on GPU nodes"
    largest = max((n.cpus for n in view.nodes), default=0)
    fewer_cpus = next((c for c in range(math.floor(largest), 0, -1) if bundles_that_fit(view.nodes, c, gpus) >= workers
                       and c < cpus), None)
    if fewer_cpus is not None:
        return f"pass --set ray.cpus_per_worker={fewer_cpus} (or auto)"
    fewer_workers = bundles_that_fit(view.nodes, cpus, gpus)
    if 1 <= fewer_workers < workers:
        return f"pass --set ray.num_workers={fewer_workers}"
    one_cpu = bundles_that_fit(view.nodes, 1, gpus)
    if one_cpu >= 1:
        return f"pass --set ray.num_workers={min(one_cpu, workers)} --set ray.cpus_per_worker=1"
    return "add nodes to the cluster"


def ensure_fits(config: Config, what: str, workers: int, *, probe: Callable[[], ClusterView] = cluster_view,
                sleep: Callable[[float], None] = time.sleep, clock: Callable[[], float] = time.monotonic) -> None:
    """Return when `workers` bundles fit the cluster; ConfigError (one line, what fits) when they do not and
    the cluster cannot grow, or did not grow within `ray.resource_timeout_s`."""
    view = probe()
    problem = shortfall(config, view, what, workers)
    if problem is None:
        return
    timeout = config.ray.resource_timeout_s
    if not view.can_grow or timeout <= 0 or _beyond_ceiling(config, view, workers):
        raise ConfigError(problem)
    cpus, gpus = config.ray.cpus_per_worker, (1 if config.ray.use_gpu else 0)
    bundle = {"CPU": cpus, **({"GPU": gpus} if gpus else {})}
    _request([bundle] * workers)
    started = last_log = clock()
    log.info("%s: the cluster can grow; asked the autoscaler for %d x %s, waiting up to %g s "
             "(ray.resource_timeout_s)", what, workers, bundle, timeout)
    try:
        while problem is not None:
            now = clock()
            if now - started >= timeout:
                raise ConfigError(f"{problem} (waited {now - started:.0f} s for the autoscaler; "
                                  f"ray.resource_timeout_s={timeout:g})")
            if now - last_log >= LOG_EVERY_S:
                log.info("%s: still waiting for the autoscaler (%.0f of %g s): cluster has %s", what, now - started,
                         timeout, view.describe())
                last_log = now
            sleep(min(POLL_S, max(0.0, timeout - (now - started))))
            view = probe()
            problem = shortfall(config, view, what, workers)
    finally:
        _request([])
    log.info("%s: the cluster now has %s", what, view.describe())


def _beyond_ceiling(config: Config, view: ClusterView, workers: int) -> bool:
    """True when the autoscaler's cluster config says the cluster can never reach the request."""
    if not view.ceiling:
        return False
    need = {"CPU": workers * config.ray.cpus_per_worker, "GPU": workers if config.ray.use_gpu else 0}
    return any(amount > view.ceiling.get(name, 0) for name, amount in need.items() if amount)


def _request(bundles: list[dict]) -> None:
    """Ask the autoscaler to make room for `bundles` (an empty list withdraws the request)."""
    try:
        from ray.autoscaler.sdk import request_resources

        request_resources(bundles=bundles)
    except Exception:  # no autoscaler to ask: waiting still sees nodes added by hand
        log.debug("request_resources failed", exc_info=True)
