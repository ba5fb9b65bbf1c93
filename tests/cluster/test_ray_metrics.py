"""Job metrics reach Ray's metrics export (what the dashboard's Grafana views and Prometheus read)."""

from __future__ import annotations

import socket
import time
import urllib.request

import pytest

from cluster.metrics import metric_name, publish
from cluster.runtime import init_ray, shutdown_ray

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_metric_name():
    assert metric_name("val/loss") == "raygpt_val_loss"
    assert metric_name("kl") == "raygpt_kl"


def test_publish_without_ray_is_a_no_op():
    import ray

    assert not ray.is_initialized()
    assert publish("r", {"loss": 1.0}) == 0


def test_published_rows_are_exported():
    port = _free_port()
    init_ray(num_cpus=1, _metrics_export_port=port, _system_config={"metrics_report_interval_ms": 1000})
    try:
        assert publish("demo-run", {"step": 3, "loss": 2.5, "note": "x", "flag": True, "bad": float("nan")}) == 2
        deadline, lines = time.time() + 60, []
        while time.time() < deadline:
            text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
            lines = [ln for ln in text.splitlines() if ln.startswith("ray_raygpt_loss{")]
            if lines:
                break
            time.sleep(1)
        assert lines and 'run="demo-run"' in lines[0] and lines[0].endswith(" 2.5")
        assert not any(ln.startswith("ray_raygpt_note") or ln.startswith("ray_raygpt_flag") for ln in text.splitlines())
    finally:
        shutdown_ray()
