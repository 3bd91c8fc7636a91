"""Issue 27: health warnings from made-up per-epoch histories, the end-of-run summary block, run and model names."""

from __future__ import annotations

from pathlib import Path

from pipelines.train import health, summary

NAMES = ["glioma", "meningioma", "notumor", "pituitary"]


def test_a_pretraining_classifier_at_chance_for_many_epochs_is_flagged_with_the_epochs():
    # 30 epochs, 4 classes: learning until epoch 16, then at chance (0.25 +- 0.03) from epoch 17 to 30 (1-based)
    history = [(e, 0.30 + 0.01 * e) for e in range(16)] + [(e, 0.25 + (0.03 if e % 2 else -0.02)) for e in range(16, 30)]
    warning = health.classifier_at_chance(history, 4)
    assert warning and warning.code == "classifier_at_chance"
    assert "for 14 consecutive epochs (17-30)" in warning.message and "1/4 = 0.25" in warning.message


def test_a_short_dip_to_chance_or_a_learning_classifier_is_not_flagged():
    assert health.classifier_at_chance([(e, 0.25) for e in range(4)] + [(4, 0.6)], 4) is None  # 4 < 5 epochs
    assert health.classifier_at_chance([(e, 0.3 + 0.02 * e) for e in range(30)], 4) is None
    gaps = [(0, 0.25), (1, 0.25), (3, 0.25), (4, 0.25), (6, 0.25)]  # not consecutive epochs
    assert health.classifier_at_chance(gaps, 4) is None
    assert health.classifier_at_chance([], 4) is None


def test_map_lift_below_one_at_the_last_refresh_is_flagged():
    low = health.low_map_lift([(7, 0.9), (13, 0.5), (19, 0.22)])
    assert low and "lift on tissue 0.22 at the last refresh (epoch 20" in low.message
    assert health.low_map_lift([(7, 0.5), (13, 1.4)]) is None  # recovered by the last refresh
    assert health.low_map_lift([(7, float("nan"))]) is None and health.low_map_lift([]) is None


def test_calibration_that_did_not_help_is_flagged():
    assert health.calibration_not_applied(True, 0.10, 0.05, 1.4) is None
    w = health.calibration_not_applied(False, 0.1020, 0.1121, 1.3)
    assert w and "0.1020 -> 0.1121" in w.message and "T = 1" in w.message


def test_heavy_imbalance_suggests_balanced_class_weights_only_where_they_are_off():
    w = health.class_imbalance([600, 100, 90, 80], NAMES, {"pretrain": "none", "finetune": "balanced"})
    assert w and "glioma 600 vs pituitary 80, 7.5x" in w.message
    assert "--set pretrain.class_weights=balanced" in w.message and "finetune.class_weights" not in w.message
    on = health.class_imbalance([600, 100, 90, 80], NAMES, {"finetune": "balanced"})
    assert on and "already on" in on.message
    assert health.class_imbalance([120, 100, 90, 80], NAMES, {"finetune": "none"}) is None


def test_run_health_collects_every_check_and_a_healthy_run_has_none():
    sick = health.run_health(
        {"pretrain/val_balanced_accuracy": [(e, 0.25) for e in range(10)], "pretrain/map_foreground_lift": [(5, 0.22)]},
        4, [600, 100, 90, 80], NAMES, {"pretrain": "none", "finetune": "none"}, (False, 0.10, 0.11, 1.3),
    )
    assert [w.code for w in sick] == ["classifier_at_chance", "low_map_lift", "calibration_not_applied", "class_imbalance"]
    well = health.run_health(
        {"pretrain/val_balanced_accuracy": [(e, 0.3 + 0.03 * e) for e in range(10)], "pretrain/map_foreground_lift": [(5, 1.6)]},
        4, [150, 140, 160, 150], NAMES, {"pretrain": "none", "finetune": "none"}, (True, 0.10, 0.04, 1.3),
    )
    assert well == []


def test_the_summary_block_has_what_a_user_copies_and_masks_the_password():
    s = summary.RunSummary(
        run_name="btmd-demo-pretrain-finetune-20261202-160000", run_id="abc123", experiment="msmae-btmd", experiment_id="4",
        tracking_uri="https://bob:s3cret@mlflow.example.org", artifacts="s3://bucket/4/abc123/artifacts",
        pretrain_checkpoint="/w/storage/p/checkpoint_000029", checkpoint="/w/storage/f/checkpoint_000039",
        model_name="msmae-btmd", version="3", alias="challenger", decision="@challenger, champion version 2 kept: ...",
        warnings=["heavy class imbalance ..."],
    )
    lines = summary.summary_lines(s)
    assert lines[0] == "== summary ==" and len(lines) <= 12
    text = "\n".join(lines)
    assert "s3cret" not in text and "https://bob:***@mlflow.example.org/#/experiments/4/runs/abc123" in text
    assert "models:/msmae-btmd/3" in text and "models:/msmae-btmd@challenger" in text
    assert "/w/storage/f/checkpoint_000039" in text and "s3://bucket/4/abc123/artifacts" in text
    assert "@challenger, champion version 2 kept" in text and "warning     heavy class imbalance" in text
    local = summary.summary_lines(summary.RunSummary("r", "id1", "e", "1", "sqlite:////w/mlflow.db", "file:///w/mlartifacts/1/id1/artifacts",
                                                     "/w/p", None))
    assert "mlflow ui --backend-store-uri sqlite:////w/mlflow.db" in "\n".join(local) and "health      no warnings" in local
    assert not any(line.startswith("model URI") for line in local)  # pre-training only: nothing registered


def test_model_and_run_names_come_from_the_dataset_and_the_config():
    from pipelines.config import load_config
    from pipelines.serve.registry import default_name, with_default_names

    folder = {"source": {"kind": "imagefolder", "root": "/data/BUSI Ultrasound (2020)"}}
    assert default_name(folder, "/w/data") == "msmae-busi-ultrasound-2020"
    manifest = {"source": {"kind": "manifest", "manifest": "/d/HAM10000_metadata.csv", "image_root": "/d/images"}}
    assert default_name(manifest, "/w/data") == "msmae-ham10000_metadata"
    assert default_name({}, "/x/btmd-ingested") == "msmae-btmd-ingested"
    cfg = with_default_names(load_config("demo"), folder, "/w/data")
    assert (cfg.tracking.model_name, cfg.tracking.experiment) == ("msmae-busi-ultrasound-2020",) * 2
    named = with_default_names(load_config("demo", values={"tracking.model_name": "mine"}), folder, "/w/data")
    assert named.tracking.model_name == "mine" and named.tracking.experiment == "msmae-busi-ultrasound-2020"


def test_run_names_say_dataset_config_and_stages(data_sample_ingested: Path):
    from pipelines.data.dataset import IngestedDataset
    from pipelines.train.run import run_prefix

    dataset = IngestedDataset.load(data_sample_ingested)
    assert run_prefix(dataset, "demo", ("pretrain", "finetune")) == "btmd-demo-pretrain-finetune"
    assert run_prefix(dataset, "/home/me/configs/my run.yaml", ("finetune",)) == "btmd-my-run-finetune"


def test_training_curves_show_each_stage_that_logged_and_result_figures_carry_split_count_and_epoch():
    from pipelines.train import plots

    history = {"pretrain/train_loss": [(e, 1.0 - 0.02 * e) for e in range(30)], "pretrain/val_macro_f1": [(e, 0.3) for e in range(30)],
               "finetune/train_loss": [(e, 1.0) for e in range(40)], "finetune/val_macro_f1": [(e, 0.5) for e in range(40)]}
    fig = plots.training_curves_figure(history, "val_macro_f1")
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert titles == ["pretrain: 30 epochs", "finetune: 40 epochs"]
    only_ft = plots.training_curves_figure({k: v for k, v in history.items() if k.startswith("finetune")}, "val_macro_f1")
    assert [ax.get_title() for ax in only_ft.axes if ax.get_title()] == ["finetune: 40 epochs"]
    title = "validation, 120 images, fine-tuning epoch 7 (selected)"
    cm = plots.confusion_figure([[3, 1], [0, 4]], ["a", "b"], f"confusion matrix: {title}")
    assert cm.axes[0].get_title() == f"confusion matrix: {title}"
