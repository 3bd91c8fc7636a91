"""Hyper-parameter sweeps over the training pipeline: Ray Tune + Optuna (TPE) + ASHA, results in MLflow."""
