"""The segmenter's serving path without Ray or MLflow: masks at the input's size, PNG bytes, weights format, path guard."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from msmae.segmentation import build_segmenter
from pipelines import checkpoint
from pipelines.data.preprocessing import Preprocessing
from pipelines.serve.path_guard import PATH_REFUSED
from pipelines.serve.segment_evaluate import dice_iou_np
from pipelines.serve.segment_pyfunc import MaskPredictor, weights_file


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def predictor() -> MaskPredictor:
    torch.manual_seed(0)
    model = build_segmenter("tiny", img_size=32, patch_size=8)
    return MaskPredictor(model, Preprocessing(img_size=32), threshold=0.5)


def test_masks_come_back_at_the_inputs_size_for_bytes_arrays_and_odd_sizes(predictor: MaskPredictor) -> None:
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 255, (77, 101, 3), dtype=np.uint8)
    grey = rng.integers(0, 255, (33, 19), dtype=np.uint8)
    result = predictor.predict([_png(rgb), grey, b"not an image", None])
    table = predictor.table(result)
    assert table["ok"].tolist() == [True, True, False, False]
    assert table["mask"][0].shape == (77, 101) and table["mask"][1].shape == (33, 19)
    assert (table["height"][0], table["width"][0]) == (77, 101)
    assert set(np.unique(table["mask"][0])) <= {0, 1}
    with Image.open(io.BytesIO(table["mask_png"][0])) as png:
        assert png.size == (101, 77)
        assert np.array_equal(np.asarray(png.convert("L")) > 0, table["mask"][0].astype(bool))
    assert table["mask"][2] is None and table["reason"][2] is not None and table["reason"][3] == "no_input"
    assert table["lesion_fraction"][0] == pytest.approx(float(table["mask"][0].mean()))


def test_a_lower_threshold_marks_at_least_as_many_pixels(predictor: MaskPredictor) -> None:
    image = np.random.default_rng(1).integers(0, 255, (40, 50, 3), dtype=np.uint8)
    loose = MaskPredictor(predictor.model, predictor.preprocessing, threshold=0.05).predict([image]).masks[0]
    strict = MaskPredictor(predictor.model, predictor.preprocessing, threshold=0.95).predict([image]).masks[0]
    assert loose.sum() >= strict.sum() and loose.shape == strict.shape == (40, 50)


def test_the_weights_file_rebuilds_the_same_segmenter_and_refuses_a_classifiers(predictor: MaskPredictor, tmp_path) -> None:
    path = tmp_path / "segmenter.pt"
    weights_file(path, predictor.model, predictor.preprocessing, 0.5)
    state = checkpoint.read_weights(path)
    rebuilt = checkpoint.segmenter_from(state)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(rebuilt(x), predictor.model(x))
    assert Preprocessing.from_dict(state["preprocessing"]) == predictor.preprocessing
    import msmae

    checkpoint.save_classifier(tmp_path / "classifier.pt", msmae.build_classifier(predictor.model.preset, 2), ["a", "b"])
    with pytest.raises(checkpoint.CheckpointError, match="segment"):
        checkpoint.segmenter_from(checkpoint.read_weights(tmp_path / "classifier.pt"))


def test_pyfunc_refuses_paths_unless_the_operator_allows_a_folder(predictor: MaskPredictor, tmp_path, monkeypatch) -> None:
    from pipelines.serve.segment_pyfunc import MSMAESegmentPyfunc

    image = tmp_path / "lesion.png"
    image.write_bytes(_png(np.zeros((21, 23, 3), np.uint8)))
    pyfunc = MSMAESegmentPyfunc()
    pyfunc.predictor = predictor
    monkeypatch.delenv("MSMAE_SERVE_PATH_ROOT", raising=False)
    refused = pyfunc.predict(None, {"path": [str(image)]})
    assert not refused["ok"][0] and refused["reason"][0] == PATH_REFUSED
    monkeypatch.setenv("MSMAE_SERVE_PATH_ROOT", str(tmp_path))
    allowed = pyfunc.predict(None, {"path": [str(image)]})
    assert allowed["ok"][0] and allowed["mask"][0].shape == (21, 23)


def test_dice_and_iou_of_known_masks() -> None:
    a = np.zeros((4, 4), bool)
    a[:2] = True  # 8 pixels
    b = np.zeros((4, 4), bool)
    b[1:3] = True  # 8 pixels, 4 shared
    assert dice_iou_np(a, b) == (pytest.approx(0.5), pytest.approx(4 / 12))
    assert dice_iou_np(a, a) == (1.0, 1.0)
    assert dice_iou_np(np.zeros((3, 3)), np.zeros((3, 3))) == (1.0, 1.0)
    assert dice_iou_np(a, ~a) == (0.0, 0.0)
