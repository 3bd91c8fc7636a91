"""The container image, built and run for real: ``cluster/build_local.sh`` (podman, no registry).

Marked ``image`` and deselected by default (tests/conftest.py): a cold build needs root, podman,
~25 GB of disk and 20-30 minutes on 2 cores. Run it with ``pytest -m image``. It skips where
there is no podman or no root (the default CI has neither).

What the script checks (see its header): the GPU image builds; ``msmae --help``; a demo-sized
``msmae run`` as uid 10001 with a read-only root and no capabilities; a Ray head and a worker
container joined as one cluster with token auth, ``msmae run`` submitted with ``ray job submit``
as the RayJob does, and the model registered in an MLflow server in a third container.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.image


@pytest.mark.timeout(3 * 3600)
def test_build_local_builds_the_image_and_runs_the_job_on_a_two_container_ray_cluster(tmp_path):
    if shutil.which("podman") is None:
        pytest.skip("podman not installed (apt-get install podman runc debootstrap)")
    if os.geteuid() != 0:
        pytest.skip("cluster/build_local.sh needs root (rootful podman, debootstrap)")
    log = tmp_path / "build_local.log"
    with open(log, "w") as out:
        done = subprocess.run(["bash", str(REPO / "cluster" / "build_local.sh")], cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                              env={**os.environ, "MSMAE_BUILD_WORK": str(tmp_path / "work")}, timeout=3 * 3600 - 60)
    text = log.read_text()
    print(text[-3000:])
    assert done.returncode == 0, f"build_local.sh failed ({done.returncode}); its log ends:\n{text[-6000:]}"
    assert "== build_local.sh: OK" in text
    assert "registered msmae-local-cluster version 1" in text
    assert "MLflow registry: msmae-local-cluster version 1 READY" in text
