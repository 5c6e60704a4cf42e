"""Experiment tracking: TensorBoard (train.yaml's handlers) and MLflow, both MONAI's stock
`--tracking mlflow` and this bundle's `--tracking configs/mlflow.yaml` (every term, parameters).

Tiny training runs with MLflow tracking into a local SQLite store under tmp; the bundle
settings' run also reads its TensorBoard event files back.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from monai.bundle import ConfigParser, ConfigWorkflow

ROOT = Path(__file__).resolve().parents[2]
TRAIN = ["configs/train.yaml", "configs/presets/phantom_quick.yaml"]
TINY = ["--epochs", "1", "--phantom#subjects", "6", "--phantom#spacing", "6.0", "--split", "[2,2,2]",
        "--spatial_size", "[32,32]", "--base_channels", "4", "--batch_size", "4", "--train#trainer#epoch_length", "2"]
TRACKING = str(ROOT / "configs" / "mlflow.yaml")


def _patched(config_files: list[str]) -> ConfigParser:
    """The config as MONAI's `--tracking configs/mlflow.yaml` leaves it (nothing instantiated)."""
    parser = ConfigParser()
    parser.read_config([str(ROOT / f) for f in config_files])
    settings = ConfigParser.load_config_files(TRACKING)
    settings["configs"]["save_execute_config"] = False  # do not write the resolved config here
    ConfigWorkflow.patch_bundle_tracking(parser, settings)
    return parser


def _mlflow_targets(handlers) -> int:
    return sum(isinstance(h, dict) and h.get("_target_") == "MLFlowHandler" for h in handlers)


def test_tracking_settings_reach_every_engine():
    """Trainer, validator, evaluation and inference engines each get exactly one MLFlowHandler."""
    train = _patched(["configs/train.yaml"])
    assert _mlflow_targets(train["train#handlers"]) == 1 and _mlflow_targets(train["validate#handlers"]) == 1
    assert train["experiment_name"] == "wss_cmer_brats"
    if (ROOT / "configs" / "evaluate.yaml").is_file():
        evaluate = _patched(["configs/train.yaml", "configs/evaluate.yaml"])
        assert _mlflow_targets(evaluate["evaluate#handlers"]) == 1
    if (ROOT / "configs" / "inference.yaml").is_file():
        infer = _patched(["configs/inference.yaml"])
        assert _mlflow_targets(infer["handlers"]) == 1


def _tensorboard_tags(log_dir: Path) -> set[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = set()
    for event_file in log_dir.glob("events.out.tfevents.*"):
        accumulator = EventAccumulator(str(event_file))
        accumulator.Reload()
        tags.update(accumulator.Tags()["scalars"])
    return tags


def _train(tmp_path: Path, tracking: str, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    command = [sys.executable, "-m", "monai.bundle", "run", "training",
               "--config_file", str([str(ROOT / f) for f in TRAIN]), "--bundle_root", str(tmp_path),
               "--tracking", tracking, *TINY, *extra]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    return result


def _one_finished_run(mlflow, run_dir: Path, experiment_name: str):
    from monai.utils import path_to_sqlite_uri

    client = mlflow.MlflowClient(tracking_uri=path_to_sqlite_uri(run_dir / "mlruns.db"))
    experiment = client.get_experiment_by_name(experiment_name)
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1
    assert runs[0].info.status == "FINISHED"
    return client, runs[0]


def test_stock_mlflow_tracking_and_stats_handler(tmp_path):
    """MONAI's own `--tracking mlflow` (no bundle settings): the trainer's decollated output gives
    the loss to its from_engine(['loss'], first=True); so does a stock StatsHandler."""
    mlflow = pytest.importorskip("mlflow")
    pytest.importorskip("sqlalchemy")
    stock_stats = ["--train#report_handlers#0#iteration_log", "true",
                   "--train#report_handlers#0#output_transform", "$monai.handlers.from_engine(['loss'], first=True)"]
    result = _train(tmp_path, "mlflow", *stock_stats)
    logged = [line for line in (result.stdout + result.stderr).splitlines() if "Iter:" in line and "train_loss: " in line]
    assert len(logged) == 2, (result.stdout + result.stderr)[-4000:]  # one line per iteration

    client, run = _one_finished_run(mlflow, tmp_path / "runs" / "train", "monai_experiment")
    for metric in ("train_loss", "val_dsc_fused", "val_acc_flair"):
        assert metric in run.data.metrics, sorted(run.data.metrics)
    assert len(client.get_metric_history(run.info.run_id, "train_loss")) == 2  # one point per iteration


def test_training_run_writes_tensorboard_and_mlflow(tmp_path):
    mlflow = pytest.importorskip("mlflow")
    pytest.importorskip("sqlalchemy")  # MLflow's SQLite store (MONAI's default tracking backend)

    _train(tmp_path, TRACKING)
    run_dir = tmp_path / "runs" / "train"

    # TensorBoard: every loss term of every modality, and the validation metrics
    tags = _tensorboard_tags(run_dir)
    expected = {"loss", "lambda_e", "val_dsc_fused"} | {f"{m}/{term}" for m in ("t1", "t1c", "t2", "flair")
                                                        for term in ("loss", "L_C", "L_ER", "L_KD", "L_CMER")}
    expected |= {f"val_{kind}_{m}" for kind in ("dsc", "acc") for m in ("t1", "t1c", "t2", "flair")}
    assert expected <= tags, sorted(expected - tags)

    # MLflow: one finished run in the local SQLite store with the same terms, parameters, config artifact
    client, run = _one_finished_run(mlflow, run_dir, "wss_cmer_brats")
    for metric in ("loss", "lambda_e", "t1/L_C", "flair/L_CMER", "val_dsc_fused", "val_acc_flair"):
        assert metric in run.data.metrics, sorted(run.data.metrics)
    assert len(client.get_metric_history(run.info.run_id, "loss")) == 2  # one point per iteration
    assert run.data.params["lr"] == "0.001" and run.data.params["base_channels"] == "4"
    artifacts = [a.path for a in client.list_artifacts(run.info.run_id)]
    assert any(a.startswith("config_") and a.endswith(".json") for a in artifacts), artifacts
