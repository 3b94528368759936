"""What a stage asks of the Ray cluster against what it has: "auto" settings, a request that cannot fit
(one line with the numbers and the `--set` that fits), a growing cluster waited for within a bound.
No Ray here: the cluster is a `ClusterView` and time is a fake clock."""
from __future__ import annotations

import logging
from pathlib import Path

import pytest

import trainer.resources
from trainer.config import Config, ConfigError, load_config
from trainer.resources import ClusterView, Node, bundles_that_fit, ensure_fits, resolve_auto

CONFIGS = Path(__file__).resolve().parents[1] / "trainer" / "configs"
LAPTOP = ClusterView((Node(cpus=2, gpus=0),))


def config(name: str = "food101", *overrides: str) -> Config:
    return load_config(CONFIGS / f"{name}.toml", list(overrides))


def test_bundles_fit_node_by_node() -> None:
    two_small = (Node(4, 0), Node(4, 0))
    assert bundles_that_fit(two_small, 6, 0) == 0  # 8 CPUs in all, but no node holds 6
    assert bundles_that_fit(two_small, 2, 0) == 4
    assert bundles_that_fit((Node(16, 2), Node(8, 0)), 4, 1) == 2  # GPUs bound it; the CPU-only node holds none
    assert bundles_that_fit((Node(2, 0),), 0.5, 0) == 4


def test_auto_settings_fit_the_cluster_and_say_what_they_chose(caplog: pytest.LogCaptureFixture) -> None:
    shipped = config("food101")  # ray.use_gpu, ray.cpus_per_worker and data.num_workers are "auto"
    assert (shipped.ray.use_gpu, shipped.ray.cpus_per_worker, shipped.data.num_workers) == ("auto",) * 3
    with caplog.at_level(logging.INFO, logger="trainer.resources"):
        laptop = resolve_auto(shipped, LAPTOP)
    assert (laptop.ray.use_gpu, laptop.ray.cpus_per_worker, laptop.data.num_workers) == (False, 2.0, 2)
    assert "ray.use_gpu=false, ray.cpus_per_worker=2, data.num_workers=2" in caplog.text
    gpu_node = resolve_auto(config("food101", "ray.num_workers=2"), ClusterView((Node(32, 2),)))
    assert (gpu_node.ray.use_gpu, gpu_node.ray.cpus_per_worker, gpu_node.data.num_workers) == (True, 8.0, 8)
    big_cpu = resolve_auto(shipped, ClusterView((Node(64, 0),)))
    assert (big_cpu.ray.use_gpu, big_cpu.ray.cpus_per_worker) == (False, 8.0)  # capped at the reference 8
    shared = resolve_auto(config("food101", "ray.num_workers=3"), ClusterView((Node(4, 0), Node(3, 0))))
    assert shared.ray.cpus_per_worker == 2.0  # 2 + 1 workers of 2 CPUs fit, 3 CPUs each would not
    fixed = resolve_auto(config("av_digits"), LAPTOP)  # nothing "auto": unchanged
    assert fixed == config("av_digits")


@pytest.mark.parametrize(("overrides", "view", "fits"), [
    (["ray.cpus_per_worker=8", "ray.use_gpu=false"], LAPTOP, "--set ray.cpus_per_worker=2 (or auto)"),
    (["ray.cpus_per_worker=8", "ray.use_gpu=true"], LAPTOP, "--set ray.use_gpu=false"),
    (["ray.cpus_per_worker=4", "ray.use_gpu=true", "ray.num_workers=2"], ClusterView((Node(16, 1),)),
     "--set ray.num_workers=1"),
    (["ray.cpus_per_worker=6", "ray.use_gpu=false"], ClusterView((Node(4, 0), Node(4, 0))),
     "--set ray.cpus_per_worker=4 (or auto)"),
])
def test_a_request_a_fixed_cluster_cannot_hold_is_one_line_with_the_numbers_and_the_set_that_fits(
        overrides: list[str], view: ClusterView, fits: str) -> None:
    cfg = config("food101", *overrides)
    with pytest.raises(ConfigError) as err:
        ensure_fits(cfg, "stage unimodal", cfg.ray.num_workers, probe=lambda: view,
                    sleep=pytest.fail)  # a fixed cluster is never waited for
    message = str(err.value)
    assert "\n" not in message and message.startswith("stage unimodal needs ")
    assert f"x ({cfg.ray.cpus_per_worker:g} CPUs" in message and f"has {view.cpus:g} CPUs" in message
    assert fits in message


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        assert seconds > 0
        self.now += seconds


def test_a_growing_cluster_gets_a_bounded_wait_with_progress_lines(monkeypatch: pytest.MonkeyPatch,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    requests: list[list[dict]] = []
    monkeypatch.setattr(trainer.resources, "_request", requests.append)
    cfg = config("food101", "ray.cpus_per_worker=8", "ray.use_gpu=false", "ray.resource_timeout_s=120")
    growing = ClusterView((Node(2, 0),), can_grow=True)
    clock = FakeClock()
    with caplog.at_level(logging.INFO, logger="trainer.resources"), pytest.raises(ConfigError) as err:
        ensure_fits(cfg, "stage unimodal", 1, probe=lambda: growing, sleep=clock.sleep, clock=clock)
    assert clock.now == pytest.approx(120)
    assert "waited 120 s for the autoscaler; ray.resource_timeout_s=120" in str(err.value)
    assert "--set ray.cpus_per_worker=2" in str(err.value)
    assert "waiting up to 120 s" in caplog.text and caplog.text.count("still waiting") >= 3
    assert requests == [[{"CPU": 8.0}], []]  # asked the autoscaler, then withdrew the request

    # the same wait ends as soon as a node that holds the worker joins
    requests.clear()
    clock = FakeClock()
    views = iter([growing, growing, ClusterView((Node(2, 0), Node(8, 0)), can_grow=True)])
    ensure_fits(cfg, "stage unimodal", 1, probe=lambda: next(views), sleep=clock.sleep, clock=clock)
    assert clock.now == pytest.approx(2 * trainer.resources.POLL_S)
    assert requests == [[{"CPU": 8.0}], []]

    # beyond what the autoscaler's cluster config could ever reach, or with no timeout: refused at once
    for view, timeout in ((ClusterView((Node(2, 0),), can_grow=True, ceiling={"CPU": 4.0}), 120),
                          (growing, 0)):
        with pytest.raises(ConfigError, match="needs 1 x"):
            ensure_fits(config("food101", "ray.cpus_per_worker=8", "ray.use_gpu=false",
                               f"ray.resource_timeout_s={timeout}"), "stage unimodal", 1,
                        probe=lambda view=view: view, sleep=pytest.fail)
