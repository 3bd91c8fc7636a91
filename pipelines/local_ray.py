"""Ray start-up for a run on this machine, or joining the cluster ``RAY_ADDRESS`` names."""

from __future__ import annotations

import logging
import math
import os
import socket
import sys

import ray
from joblib import cpu_count

from pipelines import console

# Ray rewrites 127.0.0.1 to the machine's network address, so a local Ray would listen on the
# network; on Linux all of 127/8 is loopback, and 127.0.0.2 keeps it there. (Elsewhere: Ray's default.)
LOOPBACK_NODE_IP = "127.0.0.2" if sys.platform.startswith("linux") else None


class LocalResourcesError(RuntimeError):
    """The run asks for something this machine's Ray can never give (it would wait forever)."""


def ensure_ray(num_cpus: int | None = None, scaling=None) -> None:
    """Connect to ``RAY_ADDRESS`` when set, else start a local Ray on loopback.

    Locally Ray gets more logical CPUs than the machine has cores: two Train workers of one
    CPU each would otherwise leave nothing for Ray Data's decode tasks and hang. Given the
    run's ``scaling`` (``pipelines.config.ScalingConfig``), a local Ray gets enough logical
    CPUs for its workers plus one for Ray Data, and GPU workers on a machine without a GPU
    are refused at once rather than left waiting. (A cluster may still be scaling up, so
    ``RAY_ADDRESS`` clusters are not second-guessed.)
    """
    quiet_ray_data()
    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=True, logging_level=console.ray_log_level())
        return
    cpus = max(num_cpus or max(4, cpu_count() * 2), local_cpus_for(scaling) if scaling is not None else 0)
    # The dashboard serves Ray's state API, which Ray Train's clean-up actor polls; bound to
    # loopback on a port chosen here, so the actor can be told where it is (left to itself it
    # scans the machine for Ray clusters and fails when it finds more than one).
    dashboard_port = _free_port()
    ray.init(
        address="local", num_cpus=cpus, include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=dashboard_port,
        log_to_driver=True, logging_level=console.ray_log_level(), _node_ip_address=LOOPBACK_NODE_IP,
        runtime_env={"env_vars": {"RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{dashboard_port}"}},
    )


def local_cpus_for(scaling) -> int:
    """Logical CPUs a local Ray needs for the run's workers plus one for Ray Data; refuses GPU
    workers where there is no GPU (the run would wait for them forever)."""
    import torch

    if scaling.use_gpu and not torch.cuda.device_count():
        raise LocalResourcesError(
            "scaling.use_gpu=true but this machine has no GPU; set scaling.use_gpu=false, or run on a GPU cluster (RAY_ADDRESS)"
        )
    return math.ceil(scaling.workers * scaling.cpus_per_worker) + 1


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def quiet_ray_data() -> None:
    """Ray Data's per-operator progress output drowns the epoch lines; keep it off."""
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.enable_operator_progress_bars = False
    context.print_on_execution_start = False  # its plan, per dataset and epoch, in every split coordinator
    logging.getLogger("ray.data").setLevel(logging.WARNING)
