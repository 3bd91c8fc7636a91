"""Training: MSMAE stages as Ray Train jobs, and the run that chains them.

    run       ``msmae run`` / ``pretrain`` / ``finetune``: data → stages → finish, resumable
    stages    the two-stage runner (pre-training, then fine-tuning) shared with sweep trials
    launcher  one stage as a ``TorchTrainer`` over the data streams
    worker    what runs inside each Ray Train worker (epochs, map refresh, checkpoints)
    finish    the end of a run: evaluate the chosen model, calibrate, figures, test once, judge, register
    plots     the run's figures (confusion, ROC, training curves, attention overlays, reconstructions, reliability)
    health    warnings from a run's own metrics (classifier at chance, maps on background, calibration, imbalance)
    summary   the block a run prints last (run, URL, model URI, checkpoint, artifacts, promotion, warnings)
    metric_names  class names in metric keys (``val_auc_glioma``), for the workers and the final report

Uses ``data`` and ``serve`` (evaluation, registry); nothing outside ``tuning`` and the CLI imports it.
"""
