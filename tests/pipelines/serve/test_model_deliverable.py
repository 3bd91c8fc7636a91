"""Issue 17: the registered model as a deliverable, checked with real MLflow (SQLite store, a real
``mlflow models serve``), real Ray (Ray Data evaluation and ``msmae predict``) and a really trained model.

The module trains one small ViT of the demo's shape (64 px, 8 px patches, mean-pool head; 3 blocks
of width 128 so it trains in seconds) in-process on the bundled sample's train split, logging each
epoch's validation accuracy through the run's own ``EpochLogger``, keeps the best epoch's
checkpoint, and hands it to ``pipelines.train.finish.evaluate_and_register`` (what ``msmae run`` calls
at its end): calibration, the model card, the dataset input, registration as a pyfunc.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[3]
MODEL = "msmae-deliverable"
CLASSES = ["glioma", "meningioma", "notumor", "pituitary"]
EPOCHS = 10


@dataclass
class Registered:
    uri: str
    run_id: str
    checkpoint: Path
    final: object  # pipelines.train.finish.FinalReport
    log: list[str]
    val_pixels: torch.Tensor
    val_labels: torch.Tensor
    best_epoch: int
    dataset_path: str = ""


def _split_pixels(dataset, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A split's images as the evaluation stream makes them (transforms.resize_batch on the stored bytes)."""
    import pyarrow.parquet as pq

    from pipelines.data.transforms import resize_batch

    table = pq.read_table(dataset.shard_files(split), columns=["image", "label", "index"]).to_pydict()
    batch = {k: np.asarray(v, dtype=object if k == "image" else np.int64) for k, v in table.items()}
    out = resize_batch(batch, 64)
    return torch.from_numpy(out["image"]), torch.from_numpy(out["label"])


@pytest.fixture(scope="module")
def deliverable_registered(data_sample_ingested, ray_local, tmp_path_factory) -> Registered:
    import msmae
    from pipelines import checkpoint
    from pipelines import tracking
    from pipelines.config import load_config
    from pipelines.data.dataset import IngestedDataset
    from pipelines.train.finish import evaluate_and_register

    tmp = tmp_path_factory.mktemp("deliverable")
    dataset = IngestedDataset.load(data_sample_ingested)
    x_train, y_train = _split_pixels(dataset, "train")
    x_val, y_val = _split_pixels(dataset, "val")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    tracking.set_experiment(uri, MODEL, tmp)
    preset = msmae.ViTPreset(64, 8, 128, 3, 4, decoder_dim=64, decoder_depth=1, decoder_heads=4)
    torch.manual_seed(0)
    model = msmae.build_classifier(preset, len(CLASSES), drop_path_rate=0.0)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.05)
    steps = EPOCHS * ((len(x_train) + 63) // 64)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps, pct_start=0.15)
    g = torch.Generator().manual_seed(0)
    cfg = load_config("demo", values={"tracking.model_name": MODEL, "tracking.experiment": MODEL, "finetune.epochs": EPOCHS})
    with tracking.active_run(None, "deliverable") as run:
        logger = tracking.EpochLogger(uri, run.info.run_id, "finetune")
        best, best_dir = -1.0, None
        for epoch in range(EPOCHS):
            model.train()
            perm = torch.randperm(len(x_train), generator=g)
            for i in range(0, len(x_train), 64):
                idx = perm[i:i + 64]
                flip = torch.rand(len(idx), generator=g) < 0.5
                x = torch.where(flip[:, None, None, None], x_train[idx].flip(-1), x_train[idx])
                loss = torch.nn.functional.cross_entropy(model(x), y_train[idx], label_smoothing=0.1)
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
            model.eval()
            with torch.no_grad():
                acc = float((model(x_val).argmax(-1) == y_val).float().mean())
            metrics = {"epoch": epoch, "val_accuracy": acc, "train_loss": float(loss)}
            logger.log(metrics, epoch)
            if acc > best:
                best, best_dir = acc, tmp / f"checkpoint_{epoch}"
                checkpoint.write_checkpoint(
                    best_dir, stage="finetune", model_state=model.state_dict(), optimizer_state={},
                    table=msmae.AttentionTable(len(x_train), preset.grid), epoch=epoch, best=best, preset=preset,
                    class_names=CLASSES, metrics=metrics, config=cfg.model_dump(mode="json"),
                )
        lines: list[str] = []
        final = evaluate_and_register(str(best_dir), None, dataset, cfg, lines.append)
    best_epoch = int(best_dir.name.split("_")[1])
    return Registered(uri, run.info.run_id, best_dir, final, lines, x_val, y_val, best_epoch, str(data_sample_ingested))


@pytest.fixture
def deliverable_uri(deliverable_registered):
    import mlflow

    mlflow.set_tracking_uri(deliverable_registered.uri)
    yield deliverable_registered.uri


# --- the registry entry --------------------------------------------------------------------------------


@pytest.mark.slow
def test_registry_has_a_model_card_lineage_and_metrics_at_the_selected_epoch(deliverable_registered, deliverable_uri):
    from mlflow.tracking import MlflowClient

    reg = deliverable_registered
    client = MlflowClient(deliverable_uri)
    version = client.get_model_version_by_alias(MODEL, "champion")
    card = version.description
    assert "Not for diagnostic use" in card and "Intended use" in card
    for name in CLASSES:
        assert name in card
    val = reg.final.val
    assert f"{val.accuracy:.3f}" in card and f"{val.macro_f1:.3f}" in card  # validation metrics
    assert "| test |" in card and f"{reg.final.test.accuracy:.3f}" in card  # the sample has a test split
    assert re.search(r"ROC AUC: glioma 0\.\d{3}, meningioma", card)  # per class, by name
    run = client.get_run(reg.run_id)
    fingerprint = version.tags["dataset_fingerprint"]
    assert fingerprint and fingerprint in card
    assert "Not for diagnostic use" in client.get_registered_model(MODEL).description
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert version.tags["git_commit"].split("+")[0] == head and head in card
    assert float(version.tags["temperature"]) == pytest.approx(reg.final.temperature, rel=1e-5)
    assert version.tags["selected_epoch"] == str(reg.best_epoch)
    # The dataset is the run's MLflow input, its digest from ingest's fingerprint.
    inputs = run.inputs.dataset_inputs
    assert len(inputs) == 1 and inputs[0].dataset.digest == fingerprint[:32]
    assert json.loads(inputs[0].dataset.profile)["num_rows"] == 600
    # Final metrics carry class names, not indices.
    metrics = run.data.metrics
    assert "final_val/auc_glioma" in metrics and "final_val/auc_0" not in metrics
    assert "final_test/ece" in metrics and "final_val/ece_uncalibrated" in metrics
    # The logged model's metrics are the selected epoch's, not epoch 0's.
    model_id = version.source.removeprefix("models:/")
    linked = {(m.key, m.step): m.value for m in client.get_logged_model(model_id).metrics}
    assert {s for _, s in linked} == {reg.best_epoch}, linked
    best_acc = max(v for k, v in linked.items() if k[0] == "finetune/val_accuracy")
    assert ("finetune/val_accuracy", reg.best_epoch) in linked and ("final_val/accuracy", reg.best_epoch) in linked
    assert best_acc == pytest.approx(max(m.value for m in client.get_metric_history(reg.run_id, "finetune/val_accuracy")))
    artifacts = {a.path for a in client.list_artifacts(reg.run_id, "plots")}
    assert "plots/reliability.png" in artifacts
    # LICENSE matches pyproject's license field.
    assert 'license = "Apache-2.0"' in (REPO / "pyproject.toml").read_text()
    assert "Apache License" in (REPO / "LICENSE").read_text() and "Version 2.0" in (REPO / "LICENSE").read_text()


# --- calibration ---------------------------------------------------------------------------------------


def test_temperature_scaling_recovers_a_known_temperature_and_removes_the_calibration_error():
    from pipelines.serve import calibration

    rng = np.random.default_rng(0)
    logits = rng.normal(0, 2.0, size=(4000, 4))
    true_probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    labels = np.array([rng.choice(4, p=p) for p in true_probs])
    overconfident = calibration.apply_temperature(true_probs, 1 / 2.5)  # logits x 2.5
    t = calibration.fit_temperature(overconfident, labels)
    assert t == pytest.approx(2.5, rel=0.08)
    before = calibration.expected_calibration_error(overconfident, labels)
    after = calibration.expected_calibration_error(calibration.apply_temperature(overconfident, t), labels)
    assert before > 0.1 and after < 0.03, (before, after)
    # ECE by hand: 10 predictions at 0.8 confidence of which 8 are right -> 0; all right at 0.6 -> 0.4.
    p = np.tile([[0.8, 0.2]], (10, 1))
    assert calibration.expected_calibration_error(p, np.array([0] * 8 + [1] * 2)) == pytest.approx(0.0)
    assert calibration.expected_calibration_error(np.tile([[0.6, 0.4]], (5, 1)), np.zeros(5, int)) == pytest.approx(0.4)


@pytest.mark.slow
def test_the_temperature_is_fitted_on_validation_stored_with_the_model_and_reported(deliverable_registered, deliverable_uri):
    import mlflow

    from pipelines.serve import calibration

    from pipelines import checkpoint
    from pipelines.serve.loading import load

    reg = deliverable_registered
    t, choice = reg.final.temperature, reg.final.calibration
    line = next(x for x in reg.log if x.startswith("calibration: "))
    print(line)  # the closing note quotes it
    assert f"{choice.fitted:.3f}" in line and "test" in line
    assert t == (choice.fitted if choice.applied else 1.0)  # kept only when it lowered validation ECE (issue 27)
    assert choice.applied == (choice.ece_fitted < choice.ece_before)
    val = reg.final.val
    assert val.extra["temperature"] == t and "ECE" in next(x for x in reg.log if x.startswith("validation"))
    # Fitted on validation: no other temperature gives a lower validation NLL.
    loaded = load(f"models:/{MODEL}@champion")
    with torch.no_grad():
        raw = loaded.model(reg.val_pixels).softmax(-1).numpy()
    labels = reg.val_labels.numpy()
    best = calibration.nll(calibration.apply_temperature(raw, choice.fitted), labels)
    for other in (choice.fitted * 0.8, choice.fitted * 1.25, 1.0):
        assert best <= calibration.nll(calibration.apply_temperature(raw, other), labels) + 1e-9
    # Stored with the checkpoint and the registered model, and applied by the pyfunc.
    assert checkpoint.read_inference(reg.checkpoint)["temperature"] == pytest.approx(t)
    assert loaded.temperature == pytest.approx(t)
    assert mlflow.models.get_model_info(f"models:/{MODEL}@champion").metadata["temperature"] == pytest.approx(t)
    assert load(str(reg.checkpoint)).temperature == pytest.approx(t)


class _Trapped:
    """Unpickling this runs code: it creates the file it names (what a hostile registry entry's ``python_model`` could do)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.slow
def test_msmae_reads_a_registered_model_from_its_weights_file_and_never_unpickles_its_python_model(
        deliverable_registered, deliverable_uri, tmp_path):
    """A version whose pickled ``python_model`` runs code on load: ``msmae evaluate``/``predict``'s loader reads
    the weights file alone (``weights_only``), so nothing runs; MLflow's own loader, the control, does run it."""
    import cloudpickle
    import mlflow

    from pipelines.serve import pyfunc, registry
    from pipelines.serve.loading import load

    champion = f"models:/{MODEL}@champion"
    info = mlflow.models.get_model_info(champion)
    trapped_dir = tmp_path / "trapped"
    mlflow.artifacts.download_artifacts(artifact_uri=champion, dst_path=str(trapped_dir))
    marker = tmp_path / "code-ran"
    (trapped_dir / info.flavors["python_function"]["python_model"]).write_bytes(cloudpickle.dumps(_Trapped(marker)))
    with mlflow.start_run(run_name="trapped") as run:
        mlflow.log_artifacts(str(trapped_dir), "trapped")
    uri = f"runs:/{run.info.run_id}/trapped"

    loaded = load(uri)
    assert not marker.exists()
    assert loaded.class_names == CLASSES
    assert loaded.temperature == pytest.approx(deliverable_registered.final.temperature)
    reference = load(champion)
    with torch.no_grad():
        assert torch.equal(loaded.model(deliverable_registered.val_pixels[:4]), reference.model(deliverable_registered.val_pixels[:4]))
    with pytest.raises(ValueError, match="no 'nothing' weights artifact"):
        registry.registered_weights(uri, "nothing")
    assert pyfunc.WEIGHTS_ARTIFACT in info.flavors["python_function"]["artifacts"]

    try:  # the control: MLflow's loader unpickles python_model, and the trap springs
        mlflow.pyfunc.load_model(uri)
    except Exception:  # noqa: BLE001 - the trap is no PythonModel: MLflow fails after unpickling it
        pass
    assert marker.exists()


# --- one decode path -----------------------------------------------------------------------------------


def _awkward_files(folder: Path, seed: int = 1) -> dict[str, Path]:
    """One file per decode trap: 12-bit data in a 16-bit PNG, RGBA, CMYK, palette (with and without
    transparency), grey JPEG, DICOM (CT, a windowed 16-bit scan), an ordinary RGB JPEG."""
    from pydicom.data import get_testdata_file

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    base = Image.fromarray(rng.integers(0, 255, (90, 110, 3), dtype=np.uint8)).filter(__import__("PIL.ImageFilter").ImageFilter.GaussianBlur(3))
    files = {}

    def save(name: str, img: Image.Image, **kw) -> None:
        files[name] = folder / name
        img.save(files[name], **kw)

    save("scan16.png", Image.fromarray((rng.random((80, 96)) * 4095).astype(np.uint16)))
    rgba = base.convert("RGBA")
    rgba.putalpha(Image.fromarray(rng.integers(0, 255, (90, 110), dtype=np.uint8)))
    save("rgba.png", rgba)
    save("cmyk.jpg", base.convert("CMYK"), quality=90)
    save("palette.png", base.convert("P"))
    pal = base.convert("P")
    pal.info["transparency"] = 0
    save("palette_t.png", pal, transparency=0)
    save("grey.jpg", base.convert("L"), quality=90)
    save("rgb.jpg", base, quality=90)
    files["ct.dcm"] = folder / "ct.dcm"
    files["ct.dcm"].write_bytes(Path(get_testdata_file("CT_small.dcm" if seed == 1 else "MR_small.dcm")).read_bytes())
    return files


@pytest.mark.parametrize("mode,max_side", [("RGB", None), ("L", None), ("RGB", 64)])
def test_ingest_predict_and_the_served_model_see_the_same_pixels(tmp_path, mode, max_side):
    """Ingest's stored pixels as training decodes them == Preprocessing on the file path == on its bytes."""
    import pyarrow.parquet as pq

    from pipelines.data.ingest import IngestOptions, ingest
    from pipelines.data.preprocessing import Preprocessing
    from pipelines.data.transforms import resize_batch

    files = _awkward_files(tmp_path / "src" / "a")
    _awkward_files(tmp_path / "src" / "b", seed=2)  # a second class, the same traps in other pixels
    out = tmp_path / "data"
    ingest(tmp_path / "src", out, IngestOptions(mode=mode, max_side=max_side, val=0.0, workers=1), progress=False, log=lambda _: None)
    summary = json.loads((out / "dataset.json").read_text())
    assert summary["quarantined"] == 0, summary
    table = pq.read_table(sorted((out / "shards").glob("*.parquet"))).to_pydict()
    prep = Preprocessing(img_size=64, mode=mode, max_side=max_side)
    seen = set()
    for k, source in enumerate(table["source"]):
        if not source.startswith("a/"):
            continue
        path = files[source.removeprefix("a/")]
        trained = resize_batch({"image": np.array([table["image"][k]], dtype=object), "label": np.array([0]), "index": np.array([0])}, 64)["image"][0]
        from_path, from_bytes = prep(str(path)), prep(path.read_bytes())
        np.testing.assert_array_equal(from_path, trained, err_msg=f"{source}: predict/pyfunc path vs ingest")
        np.testing.assert_array_equal(from_bytes, trained, err_msg=f"{source}: pyfunc bytes vs ingest")
        seen.add(path.name)
    assert seen == set(files), seen  # every trap was ingested (DICOM included: pydicom is a dependency)


def test_arrays_of_any_size_and_unusable_inputs():
    from pipelines.data import images
    from pipelines.data.preprocessing import Preprocessing

    prep = Preprocessing(img_size=64)
    for shape, dtype in [((96, 120), np.uint8), ((50, 70, 3), np.uint8), ((40, 30, 4), np.uint8), ((300, 200), np.uint16), ((33, 33, 3), np.float32)]:
        arr = (np.random.default_rng(0).random(shape) * (4000 if dtype == np.uint16 else 255)).astype(dtype)
        assert prep(arr).shape == (3, 64, 64)
    assert isinstance(prep(np.zeros((5, 5, 2))), images.Rejected)
    assert prep(b"not an image").reason == images.NOT_AN_IMAGE
    assert prep("/nonexistent/scan.png").reason == images.MISSING_FILE


# --- the pyfunc: fresh process, serving, predict agreement ---------------------------------------------

_FRESH = r"""
import importlib.util, json, sys
sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in str(getattr(f, "__module__", ""))]  # msmae-ray's editable install hidden
assert importlib.util.find_spec("msmae") is None and importlib.util.find_spec("pipelines") is None, "the project is importable"
import mlflow, pandas as pd
mlflow.set_tracking_uri(sys.argv[1])
model = mlflow.pyfunc.load_model(sys.argv[2])
out = model.predict(pd.DataFrame({"path": sys.argv[3:]}))
import msmae
print(json.dumps({"msmae": msmae.__file__, "rows": out.to_dict(orient="records")}))
"""


@pytest.mark.slow
def test_the_champion_loads_in_a_fresh_python_without_the_project_and_predicts_a_path(deliverable_registered, tmp_path, data_sample_btmd):
    image = sorted((data_sample_btmd / "glioma").iterdir())[0]
    script = tmp_path / "fresh.py"
    script.write_text(_FRESH)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["MSMAE_SERVE_PATH_ROOT"] = str(data_sample_btmd)  # paths are read only under a folder the operator names
    done = subprocess.run([sys.executable, "-I", str(script), deliverable_registered.uri, f"models:/{MODEL}@champion", str(image),
                           str(data_sample_btmd / "nope.png")], capture_output=True, text=True, cwd=tmp_path, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert "/code/msmae/" in result["msmae"] and not result["msmae"].startswith(str(REPO))  # the model's own copy
    row, missing = result["rows"]
    assert row["ok"] and row["predicted_class"] in CLASSES
    assert sum(row[f"prob_{c}"] for c in CLASSES) == pytest.approx(1.0, abs=1e-5)
    assert not missing["ok"] and missing["reason"] == "path_refused" and missing["predicted_class"] is None
    assert all(pd.isna(missing[f"prob_{c}"]) for c in CLASSES)  # no plausible-looking row for a file that is not there


def _invoke_raw(url: str, body: dict) -> tuple[int, bytes]:
    req = urllib.request.Request(f"{url}/invocations", json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def _no_nan(constant: str):
    raise AssertionError(f"the response holds {constant}, which strict JSON does not allow")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve_command() -> str:
    """The serve command exactly as the README gives it (and docs/model.md repeats it)."""
    blocks = [re.search(r"```bash\n(MLFLOW_TRACKING_URI=.*?mlflow models serve.*?)\n```", (REPO / doc).read_text(), re.S).group(1)
              for doc in ("README.md", "docs/model.md")]
    assert blocks[0] == blocks[1], blocks
    return blocks[0]


@pytest.mark.slow
def test_mlflow_models_serve_from_the_documented_command_answers_with_labelled_probabilities(deliverable_registered, data_sample_btmd, tmp_path):
    reg = deliverable_registered
    port = _free_port()
    command = (_serve_command().replace("sqlite:///$PWD/msmae-work/mlflow.db", reg.uri)
               .replace("msmae-btmd", MODEL).replace("--port 5001", f"--port {port}"))
    assert "--host 127.0.0.1" in command and "--env-manager local" in command
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "MLFLOW_TRACKING_URI")}
    env["PATH"] = "/usr/bin:/bin"  # no venv on PATH: the documented command must bring it
    env["MSMAE_SERVE_PATH_ROOT"] = str(data_sample_btmd)  # the operator allows paths under the sample only
    log = open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen(["bash", "-c", command], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 180
        while True:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            try:
                if urllib.request.urlopen(f"{url}/ping", timeout=2).status == 200:
                    break
            except OSError:
                pass
            assert time.time() < deadline, "the server did not answer /ping in 180 s: " + (tmp_path / "serve.log").read_text()[-3000:]
            time.sleep(1)
        image = sorted((data_sample_btmd / "meningioma").iterdir())[0]
        rows = []
        for column, value in (("image", base64.b64encode(image.read_bytes()).decode()), ("path", str(image))):
            body = {"dataframe_split": {"columns": [column], "data": [[value]]}}
            req = urllib.request.Request(f"{url}/invocations", json.dumps(body).encode(), {"Content-Type": "application/json"})
            try:
                rows += json.loads(urllib.request.urlopen(req, timeout=120).read())["predictions"]
            except urllib.error.HTTPError as e:
                raise AssertionError(f"{column}: {e} {e.read()[:2000]!r}") from None
        assert len(rows) == 2 and all(r["ok"] and r["predicted_class"] in CLASSES for r in rows), rows
        for c in CLASSES:  # bytes and path of the same file: the same numbers
            assert rows[0][f"prob_{c}"] == pytest.approx(rows[1][f"prob_{c}"], abs=1e-6)
        assert sum(rows[0][f"prob_{c}"] for c in CLASSES) == pytest.approx(1.0, abs=1e-5)
        # a path outside the allowed folder: the same refusal whether the file exists or not, and strict JSON (null, not NaN)
        secret = tmp_path / "secret.png"
        secret.write_bytes(image.read_bytes())
        answers = [_invoke_raw(url, {"dataframe_split": {"columns": ["path"], "data": [[p]]}})
                   for p in (str(secret), str(tmp_path / "no-such.png"), "/dev/urandom", str(data_sample_btmd / "no-such.png"))]
        assert all(status == 200 for status, _ in answers), answers
        refused = [json.loads(body, parse_constant=_no_nan)["predictions"][0] for _, body in answers]
        assert all(r == refused[0] for r in refused), refused  # nothing tells an existing file from a missing one
        assert refused[0]["ok"] is False and refused[0]["reason"] == "path_refused" and refused[0][f"prob_{CLASSES[0]}"] is None
        # a malformed request: 400 with the message only, no server-side stack trace or path
        status, body = _invoke_raw(url, {"dataframe_split": {"columns": ["img"], "data": [["x"]]}})
        assert status == 400 and b"'image'" in body and b"Traceback" not in body and b"stack_trace" not in body, body[:2000]
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=20)
        log.close()


@pytest.mark.slow
def test_msmae_predict_and_the_pyfunc_agree_on_16_bit_png_and_dicom_and_predict_writes_heatmaps(
    deliverable_registered, deliverable_uri, data_sample_btmd, tmp_path, monkeypatch,
):
    import mlflow
    import pyarrow.dataset as pads
    from typer.testing import CliRunner

    from msmae_cli import app
    from pipelines.data import images
    from pipelines.serve import heatmap_figures

    folder = tmp_path / "incoming"
    files = _awkward_files(folder / "traps")
    for c in CLASSES:
        src = sorted((data_sample_btmd / c).iterdir())[0]
        (folder / src.name).write_bytes(src.read_bytes())
    (folder / "broken.jpg").write_bytes(b"not a jpeg")
    out, maps = tmp_path / "preds", tmp_path / "maps"
    result = CliRunner().invoke(app, ["predict", "--model", f"models:/{MODEL}@champion", "--input", str(folder), "--out", str(out),
                                      "--tracking-uri", deliverable_uri, "--heatmaps", str(maps)])
    assert result.exit_code == 0, result.output
    table = pads.dataset(str(out), format="parquet").to_table().to_pandas().set_index("path")
    assert len(table) == len(files) + len(CLASSES) + 1
    assert not table.loc[str(folder / "broken.jpg"), "ok"] and pd.isna(table.loc[str(folder / "broken.jpg"), "prob_glioma"])
    paths = [p for p in table.index if table.loc[p, "ok"]]
    assert {Path(p).name for p in paths} >= {"scan16.png", "ct.dcm"}  # predict accepts 16-bit PNG and DICOM
    monkeypatch.setenv("MSMAE_SERVE_PATH_ROOT", str(folder))  # the pyfunc reads paths only under an allowed folder
    served = mlflow.pyfunc.load_model(f"models:/{MODEL}@champion").predict(pd.DataFrame({"path": paths}))
    for c in CLASSES:
        np.testing.assert_allclose(table.loc[paths, f"prob_{c}"].to_numpy(), served[f"prob_{c}"].to_numpy(), atol=1e-5)
    assert list(table.loc[paths, "predicted_class"]) == list(served["predicted_class"])
    for p in paths:
        rel = Path(p).relative_to(folder)
        assert np.load(maps / f"{rel}.npy").shape == (8, 8)
        # the figure is drawn over the original at its own size (not the 64 px input), the band below it
        original = images.load_image(p, "RGB")  # decoded as ingest does (DICOM, 16-bit PNG included)
        figure = Image.open(maps / f"{rel}.png")
        assert figure.width == max(original.width, heatmap_figures.MIN_WIDTH) and figure.height > original.height
    # progress while it ran (captured: plain lines, no terminal codes), then the figures on one colour scale
    total = len(table)
    assert re.search(rf"^predict with heatmaps: {total} files in \d\d:\d\d \(\d+\.\d files/s\)$", result.output, re.M), result.output
    assert re.search(rf"^heatmap figures: {len(paths)} images in \d\d:\d\d", result.output, re.M), result.output
    assert re.search(rf"^heatmaps: {len(paths)} figures \(<path>.png over the original, one colour scale: ", result.output, re.M)
    assert "\r" not in result.output and "\x1b" not in result.output


# --- per-prediction explanation ------------------------------------------------------------------------


@pytest.mark.slow
def test_hiding_the_maps_top_patches_costs_the_prediction_more_than_hiding_random_ones(deliverable_registered, deliverable_uri):
    import mlflow

    from pipelines.serve import explain
    from pipelines.serve.loading import load

    loaded = load(f"models:/{MODEL}@champion")
    model, t = loaded.model, loaded.temperature
    pixels = deliverable_registered.val_pixels
    drops, target = explain.occlusion_maps(model, pixels, t)
    base = explain.class_probability(model, pixels, t).gather(1, target[:, None])[:, 0]
    k = round(0.2 * model.preset.num_patches)
    top = drops.topk(k, dim=1).indices
    top_drop = (base - explain.probability_without(model, pixels, top, target, t)).mean().item()
    g = torch.Generator().manual_seed(0)
    random_drops = []
    for _ in range(5):
        rand = torch.stack([torch.randperm(model.preset.num_patches, generator=g)[:k] for _ in range(len(pixels))])
        random_drops.append((base - explain.probability_without(model, pixels, rand, target, t)).mean().item())
    random_drop = float(np.mean(random_drops))
    print(f"faithfulness over {len(pixels)} validation images: hiding the top 20 % of patches drops the predicted class's "
          f"probability by {top_drop:.4f} on average, a random 20 % by {random_drop:.4f}")
    assert top_drop > random_drop + 0.02, (top_drop, random_drop)
    # The pyfunc's heatmaps parameter returns the same map for one image.
    one = pixels[:1]
    image = ((one[0].permute(1, 2, 0).numpy() * np.array([0.229, 0.224, 0.225]) + np.array([0.485, 0.456, 0.406])) * 255).round().clip(0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    served = mlflow.pyfunc.load_model(f"models:/{MODEL}@champion").predict(pd.DataFrame({"image": [buf.getvalue()]}), params={"heatmaps": True})
    grid = np.asarray(served["heatmap"][0])
    assert grid.shape == model.preset.grid
    expected, _ = explain.occlusion_maps(model, torch.from_numpy(loaded.preprocessing(buf.getvalue())[None]), t)
    np.testing.assert_allclose(grid.ravel(), expected[0].numpy(), atol=1e-6)
    # on this trained model too, the maps of several images per forward batch are those of one image at a time
    alone = torch.cat([explain.occlusion_maps(model, pixels[k:k + 1], t)[0] for k in range(3)])
    assert (drops[:3] - alone).abs().max().item() < 1e-5


# --- the contamination check: which evaluated images the model has seen ---------------------------------

@pytest.mark.slow
def test_evaluate_reports_which_images_the_model_was_trained_on_and_metrics_on_the_rest(
    deliverable_registered, deliverable_uri, data_sample_ingested, data_sample_btmd, tmp_path,
):
    """A folder of 20 of the model's training images and 20 it never saw (the sample's test split): evaluate
    says 20 were seen and gives the metrics of the 20 unseen; predict flags the same 20 row by row."""
    import pyarrow.dataset as pads
    from typer.testing import CliRunner

    from msmae_cli import app
    from pipelines.data.dataset import IngestedDataset

    dataset = IngestedDataset.load(data_sample_ingested)
    train = sorted(r["source"] for r in dataset.rows("train"))[::20][:20]
    unseen = sorted(r["source"] for r in dataset.rows("test"))[::3][:20]
    assert len(train) == len(unseen) == 20
    folder = tmp_path / "outside"
    for source in train + unseen:
        (folder / source).parent.mkdir(parents=True, exist_ok=True)
        (folder / source).write_bytes((data_sample_btmd / source).read_bytes())
    out = tmp_path / "eval.json"
    result = CliRunner().invoke(app, ["evaluate", "--model", f"models:/{MODEL}@champion", "--data", str(folder),
                                      "--tracking-uri", deliverable_uri, "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "contamination check: 20 of 40 images are near-copies of images the model was trained or selected on" in result.output
    assert re.search(r"^evaluate train: 40 images in \d\d:\d\d \(\d+\.\d images/s\)$", result.output, re.M), result.output
    report = json.loads(out.read_text())["train"]  # a raw folder is evaluated whole, as one split
    assert report["num_samples"] == 40 and report["seen_in_training"] == 20 and report["unseen_images"] == 20
    assert report["unseen"]["num_samples"] == 20

    preds = tmp_path / "preds"
    result = CliRunner().invoke(app, ["predict", "--model", f"models:/{MODEL}@champion", "--input", str(folder), "--out", str(preds),
                                      "--tracking-uri", deliverable_uri])
    assert result.exit_code == 0, result.output
    table = pads.dataset(str(preds), format="parquet").to_table().to_pandas()
    flagged = {str(Path(p).relative_to(folder)) for p in table.loc[table["seen_in_training"] == True, "path"]}  # noqa: E712
    assert flagged == set(train)


# --- promotion (issue 27): the same rules against the real registry ----------------------------------------


def _champion_val_probs(reg: Registered):
    """The champion's calibrated probabilities on the sample's validation split, as ``finish`` computes a new model's."""
    from pipelines.data.dataset import IngestedDataset
    from pipelines.serve.calibration import apply_temperature
    from pipelines.serve.evaluate import split_probabilities
    from pipelines.serve.loading import load

    loaded = load(f"models:/{MODEL}@champion")
    dataset = IngestedDataset.load(reg.dataset_path)
    raw, labels, index = split_probabilities(loaded.model, dataset, "val")
    return dataset, loaded, apply_temperature(raw.numpy(), loaded.temperature), labels.numpy(), index


def _register_again(loaded, dataset, decision, run_name: str) -> str:
    """The champion's own weights registered as a new version through the code path ``finish`` uses, with ``decision``'s alias."""
    from pipelines import tracking
    from pipelines.serve import registry
    from pipelines.serve.contamination import SeenImages

    with tracking.active_run(None, run_name):
        return registry.register_model(registry.ModelToRegister(
            model=loaded.model, class_names=loaded.class_names, temperature=loaded.temperature, preprocessing=loaded.preprocessing,
            selection_metric="val_macro_f1", selection_value=0.0, dataset_fingerprint=dataset.fingerprint, step=0,
            version_description=decision.reason, model_description="test", tags={"promotion": decision.reason},
            seen=SeenImages.from_dataset(dataset),
        ), MODEL, decision.alias)


@pytest.mark.slow
def test_the_first_version_that_passes_the_gate_becomes_champion_and_its_card_says_what_was_evaluated(deliverable_registered, deliverable_uri):
    from mlflow.tracking import MlflowClient

    reg = deliverable_registered
    decision = reg.final.decision
    assert decision.gate.passed and decision.alias == "champion" and decision.champion_version is None, decision.reason
    card = MlflowClient(deliverable_uri).get_model_version(MODEL, reg.final.version).description
    assert "## Promotion" in card and "quality gate on 120 val images" in card and "majority-class baseline" in card
    assert "Evaluated on validation (120 images) and on the test split (60 images), the test split once" in card
    assert "test evaluated once" not in card
    run = MlflowClient(deliverable_uri).get_run(reg.run_id)
    assert run.data.tags["msmae.promotion"] == decision.reason


@pytest.mark.slow
def test_a_model_of_another_dataset_or_other_classes_under_the_same_name_leaves_the_champion_in_place(deliverable_registered, deliverable_uri):
    """The issue's case: a second dataset's model registered as msmae-demo took the first's @champion. Now it is
    registered (a version) but the champion stays, and the reason says to use --model-name."""
    from mlflow.tracking import MlflowClient

    from pipelines.serve import promotion

    reg = deliverable_registered
    dataset, loaded, probs, labels, index = _champion_val_probs(reg)
    other_data = promotion.judge(MODEL, probs, labels, index, CLASSES, "f" * 64, "val_macro_f1", dataset, log=lambda _: None)
    assert other_data.gate.passed and other_data.alias is None and other_data.comparison is None
    assert f"{MODEL}@champion (version {reg.final.version}) stays" in other_data.reason and "another dataset" in other_data.reason
    assert "--model-name" in other_data.reason
    three = ["benign", "malignant", "normal"]
    other_classes = promotion.judge(MODEL, probs[:, :3], labels % 3, index, three, dataset.fingerprint, "val_macro_f1", dataset,
                                    log=lambda _: None)
    assert other_classes.alias is None and "benign,malignant,normal" in other_classes.reason
    client = MlflowClient(deliverable_uri)
    version = _register_again(loaded, dataset, other_data, "another-dataset")
    assert version != reg.final.version
    assert str(client.get_model_version_by_alias(MODEL, "champion").version) == reg.final.version
    assert not client.get_model_version(MODEL, version).aliases


@pytest.mark.slow
def test_the_champion_is_loaded_from_the_registry_and_scored_on_the_same_split_as_the_challenger(deliverable_registered, deliverable_uri):
    """Same weights: the same score to the last digit (the same images, in the same order), margin 0, not promoted
    (@challenger). A challenger that gets more of those images right wins, with the margin's CI in its reason."""
    from mlflow.tracking import MlflowClient

    from pipelines.serve import promotion

    reg = deliverable_registered
    dataset, loaded, probs, labels, index = _champion_val_probs(reg)
    lines: list[str] = []
    same = promotion.judge(MODEL, probs, labels, index, CLASSES, dataset.fingerprint, "val_macro_f1", dataset, log=lines.append)
    c = same.comparison
    assert c is not None and c.images == 120 and c.champion_version == reg.final.version
    assert c.champion == c.challenger == pytest.approx(reg.final.val.macro_f1) and c.margin == 0 and c.ci_low == c.ci_high == 0
    assert same.alias == "challenger" and f"champion version {reg.final.version} kept" in same.reason
    assert lines and lines[0].startswith("champion comparison: val_macro_f1")
    better = probs.copy()
    wrong = np.flatnonzero(probs.argmax(1) != labels)[:15]
    better[wrong] = np.eye(len(CLASSES))[labels[wrong]]
    won = promotion.judge(MODEL, better, labels, index, CLASSES, dataset.fingerprint, "val_macro_f1", dataset, log=lambda _: None)
    assert won.alias == "champion" and won.comparison.margin > 0 and won.comparison.ci_high >= won.comparison.margin
    assert f"replaces version {reg.final.version}" in won.reason and "95% CI" in won.reason
    version = _register_again(loaded, dataset, same, "same-weights")
    client = MlflowClient(deliverable_uri)
    assert str(client.get_model_version_by_alias(MODEL, "challenger").version) == version
    assert str(client.get_model_version_by_alias(MODEL, "champion").version) == reg.final.version


@pytest.mark.slow
def test_a_majority_class_model_judged_against_the_registry_is_not_promoted(deliverable_registered, deliverable_uri):
    from pipelines.data.dataset import IngestedDataset
    from pipelines.serve import promotion

    dataset = IngestedDataset.load(deliverable_registered.dataset_path)
    labels = deliverable_registered.val_labels.numpy()
    everything_one = np.tile(np.eye(len(CLASSES))[0], (len(labels), 1))
    decision = promotion.judge(MODEL, everything_one, labels, np.arange(len(labels)), CLASSES, dataset.fingerprint,
                               "val_macro_f1", dataset, dataset.class_counts("train"), log=lambda _: None)
    assert decision.alias is None and decision.comparison is None  # the gate comes first: the champion is not even scored
    assert decision.reason.startswith("not promoted: quality gate failed on 120 val images")
