"""The per-epoch line of a training run ends in the stage's ETA, mm:ss, from the mean epoch time so far."""

from __future__ import annotations


def test_the_epoch_line_carries_epoch_k_of_n_and_an_eta_from_the_mean_epoch_time(capfd):
    from pipelines.train.worker import _print_progress

    metrics = {"train_loss": 0.7, "val_accuracy": 0.45, "val_macro_f1": 0.39, "images_per_s": 68.0, "data_wait_fraction": 0.08,
               "epoch_seconds": 20.0}
    _print_progress("pretrain", 15, 30, metrics, mean_epoch_s=8.5)  # epoch 16 of 30: 14 left at 8.5 s, not at this epoch's 20 s
    line = capfd.readouterr().out.strip()
    assert line == "[pretrain] epoch 16/30  loss 0.7000  val acc 0.450 f1 0.390  68 img/s  data wait 8%  ETA 01:59"
