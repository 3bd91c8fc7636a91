"""The registered model reads a client's path only where the operator allowed, and refuses alike otherwise.

``MSMAEPyfunc.predict`` itself (its scorer built from a random-weight classifier, no registry
needed): the refusal row for a missing file equals the one for an existing file outside the
allowed folder, a device or a FIFO never blocks a request, and a file over the size cap is refused.
"""

from __future__ import annotations

import os
import time

import pandas as pd
import pytest
from bad_inputs import fifo, write_image

CLASSES = ["a", "b"]


@pytest.fixture()
def pyfunc():
    import msmae
    from pipelines.data.preprocessing import Preprocessing
    from pipelines.serve.pyfunc import ImageScorer, MSMAEPyfunc

    model = msmae.build_classifier(msmae.get_preset("tiny", 32), len(CLASSES), drop_path_rate=0.0)
    served = MSMAEPyfunc()
    served.scorer = ImageScorer(model, CLASSES, 1.0, Preprocessing(img_size=32))
    return served


def _rows(pyfunc, paths: list[str]) -> list[dict]:
    return pyfunc.predict(None, pd.DataFrame({"path": paths})).to_dict(orient="records")


def test_paths_are_refused_by_default_whether_the_file_exists_or_not(pyfunc, tmp_path, monkeypatch):
    monkeypatch.delenv("MSMAE_SERVE_PATH_ROOT", raising=False)
    image = write_image(tmp_path / "scan.png")
    rows = _rows(pyfunc, [str(image), str(tmp_path / "missing.png"), "/etc/hostname"])
    assert all(r == rows[0] for r in rows), rows
    assert rows[0]["ok"] is False and rows[0]["reason"] == "path_refused" and rows[0]["prob_a"] is None
    assert "MSMAE_SERVE_PATH_ROOT" in rows[0]["detail"]
    with open(image, "rb") as f:  # the same image as bytes is scored
        (scored,) = pyfunc.predict(None, pd.DataFrame({"image": [f.read()]})).to_dict(orient="records")
    assert scored["ok"] and scored["predicted_class"] in CLASSES


def test_under_an_allowed_folder_only_regular_files_within_the_cap_are_read(pyfunc, tmp_path, monkeypatch):
    allowed = tmp_path / "allowed"
    inside = write_image(allowed / "scan.png")
    outside = write_image(tmp_path / "outside.png", seed=3)
    (allowed / "link.png").symlink_to(outside)  # a link out of the folder is outside it
    big = write_image(allowed / "big.png", size=(400, 400))
    pipe = fifo(allowed / "pipe.png")
    monkeypatch.setenv("MSMAE_SERVE_PATH_ROOT", str(allowed))
    monkeypatch.setenv("MSMAE_SERVE_MAX_BYTES", str(big.stat().st_size - 1))
    start = time.monotonic()
    ok, *refused = _rows(pyfunc, [str(inside), str(outside), str(allowed / "link.png"), str(allowed / "missing.png"),
                                  str(pipe), "/dev/urandom", str(big), str(allowed / ".." / "outside.png")])
    assert time.monotonic() - start < 30, "a FIFO or a device must not block the request"
    assert ok["ok"] and ok["predicted_class"] in CLASSES
    assert len(refused) == 7 and all(r == refused[0] for r in refused), refused
    assert refused[0]["reason"] == "path_refused" and str(allowed) not in refused[0]["detail"]


def test_a_request_without_an_image_or_path_column_is_a_clean_bad_request(pyfunc):
    from mlflow.exceptions import MlflowException

    with pytest.raises(MlflowException) as raised:
        pyfunc.predict(None, pd.DataFrame({"img": ["x"]}))
    assert raised.value.error_code == "INVALID_PARAMETER_VALUE" and "'image'" in raised.value.message
    assert os.sep + "work" + os.sep not in raised.value.message  # no server paths in what a client sees
