"""Evaluation of a trained model on a datalist split: tables, threshold sweep and overlays.

`configs/evaluate.yaml` (merged over train.yaml) feeds the cached, preprocessed test
volumes (scripts.data.slices.VolumeDataset) to `scripts.workflows.inference.CAMMapEvaluator`, whose
iteration gives every volume's maps (per modality and fused) with slices put back in
order. `EvaluationReport`, an engine handler, scores each volume as it comes
(scripts.workflows.metrics: DSC, ASSD in mm, r_u / r_o, DSC-versus-threshold) so only small
per-volume numbers are kept, and at the end writes under `output_dir`:

    per_subject.csv, summary.csv, summary.md, threshold_sweep.csv   (scripts.workflows.metrics)
    threshold_sweep.png                 DSC versus threshold (the paper's Fig. 4)
    overlay_<subject>.png               masks over the images (the paper's Fig. 5)
    resolved_config.json                the settings of the run and its command line

and prints the summary table.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from ignite.engine import Engine, Events

from scripts.common import atomic_write_text
from scripts.data.subjects import DataError, load_datalist
from scripts.workflows.metrics import (
    DEFAULT_SWEEP,
    EvaluationResult,
    evaluate_volumes,
    format_table,
    ordered_names,
    summarise_rows,
    write_results,
)
from scripts.workflows.figures import plot_overlays, plot_threshold_sweep
from scripts.workflows.inference import safe_name

logger = logging.getLogger(__name__)


def _numpy(x) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def split_records(datalist, split: str = "testing") -> list[dict]:
    """Records of one datalist split; an empty split is an error (nothing would be evaluated).

    Args:
        datalist: path of the datalist JSON (scripts.data.datalist's format).
        split: the section to read: "training", "validation" or "testing".

    Returns:
        One record per subject of that split, with absolute paths (scripts.data.subjects.load_datalist).

    Raises:
        DataError: when the split holds no subject.
    """
    records = load_datalist(datalist, split)
    if not records:
        raise DataError(f"datalist {datalist} has no subject in its {split!r} split. Fix: choose another "
                        f"--eval_split, or rewrite the datalist with a non-empty {split} share.")
    return records


def overlay_slice(truth: np.ndarray, fused: np.ndarray) -> int:
    """Axial slice to show: the one with the most tumour voxels, else the most activated."""
    area = truth.reshape(-1, truth.shape[-1]).sum(0)
    if area.max() <= 0:
        area = fused.reshape(-1, fused.shape[-1]).sum(0)
    return int(np.argmax(area))


def assemble(rows: list[dict], curves: dict[str, list[np.ndarray]], threshold: float,
             thresholds: np.ndarray) -> EvaluationResult:
    """An EvaluationResult from per-volume rows and DSC curves (same numbers as evaluating
    all volumes at once with scripts.workflows.metrics.evaluate_volumes)."""
    names = ordered_names(r["map"] for r in rows)
    summary = {n: summarise_rows([r for r in rows if r["map"] == n], threshold) for n in names}
    sweep = {}
    for name in names:
        if curves.get(name):
            stacked = np.stack(curves[name])
            sweep[name] = {"thresholds": thresholds, "dsc_mean": stacked.mean(0), "dsc_std": stacked.std(0)}
    return EvaluationResult(threshold=threshold, rows=rows, summary=summary, sweep=sweep)


class EvaluationReport:
    """Engine handler: score each volume on ITERATION_COMPLETED, write and print on COMPLETED.

    Batch items need "mask" (1, H, W, D), "spacing", "subject" and "image" (K, H, W, D, for
    the overlays); outputs "pred" (M+1, H, W, D) and "map_names" (CAMMapEvaluator).
    `overlay_subjects` None = the first `overlay_count` subjects.

    Args:
        output_dir: folder of the tables and figures.
        threshold: binarisation threshold of the reported DSC (the config's `threshold`).
        sweep_thresholds: thresholds of the DSC-versus-threshold curve (None: no sweep).
        overlay_subjects: subjects drawn in overlays (None: the first `overlay_count`).
        overlay_count: overlays when no subjects are named.
        settings: the run's settings, written to resolved_config.json.
        title: title of the tables and plots.
    """

    def __init__(self, output_dir, threshold: float = 0.5, sweep_thresholds: Sequence[float] | None = DEFAULT_SWEEP,
                 overlay_subjects: Sequence[str] | None = None, overlay_count: int = 2, settings: dict | None = None,
                 title: str = "Evaluation"):
        self.output_dir = Path(output_dir)
        self.threshold = float(threshold)
        self.sweep_thresholds = None if sweep_thresholds is None else np.sort(np.asarray(sweep_thresholds, float))
        if isinstance(overlay_subjects, str):  # one name from the command line
            overlay_subjects = [overlay_subjects]
        self.overlay_subjects = None if overlay_subjects is None else [str(s) for s in overlay_subjects]
        self.overlay_count = int(overlay_count)
        self.settings = dict(settings or {})
        self.title = title
        self._reset()

    def _reset(self, engine: Engine | None = None) -> None:
        self.rows: list[dict] = []
        self.curves: dict[str, list[np.ndarray]] = {}
        self.overlays: dict[str, dict] = {}
        self.result: EvaluationResult | None = None

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        engine.add_event_handler(Events.COMPLETED, self.report)

    def _collect(self, engine: Engine) -> None:
        for item, output in zip(engine.state.batch, engine.state.output):
            self.add(item, output)

    def add(self, item: dict, output: dict) -> None:
        """Score one volume and keep its overlay slice when it is one of the chosen subjects."""
        subject = str(item["subject"])
        if not item.get("has_mask", True):
            raise DataError(f"subject {subject}: no segmentation file, so it cannot be evaluated. Fix: add its "
                            f"<id>_seg file, or move it out of the evaluated split of the datalist.")
        maps = {name: _numpy(output["pred"][i]) for i, name in enumerate(output["map_names"])}
        truth = _numpy(item["mask"])[0] > 0.5
        record = {"subject": subject, "spacing": _numpy(item["spacing"]).tolist(), "truth": truth, "maps": maps}
        part = evaluate_volumes([record], self.threshold, self.sweep_thresholds, fuse=None)
        self.rows.extend(part.rows)
        for name, curve in part.sweep.items():
            self.curves.setdefault(name, []).append(curve["dsc_mean"])
        if self._wants_overlay(subject):
            self.overlays[subject] = self._overlay_data(item, maps, truth)

    def _wants_overlay(self, subject: str) -> bool:
        if self.overlay_subjects is not None:
            return subject in self.overlay_subjects
        return len(self.overlays) < self.overlay_count

    def _overlay_data(self, item: dict, maps: dict, truth: np.ndarray) -> dict:
        """The one axial slice an overlay needs (volumes are not kept)."""
        z = overlay_slice(truth, maps["fused"])
        image = _numpy(item["image"])
        channels = [n for n in maps if n != "fused"]
        return {"z": z, "images": {m: image[k, :, :, z] for k, m in enumerate(channels)},
                "masks": {n: m[:, :, z] > self.threshold for n, m in maps.items()}, "truth": truth[:, :, z]}

    def report(self, engine: Engine | None = None) -> EvaluationResult:
        """Write tables, plots and the settings; print the summary table."""
        if not self.rows:
            raise DataError("no volume was evaluated: the evaluated split is empty. Fix: check eval_split and the datalist.")
        self.result = assemble(self.rows, self.curves, self.threshold, self.sweep_thresholds)
        files = write_results(self.result, self.output_dir, self.title)
        if self.result.sweep:
            plot_threshold_sweep(self.result.curves(), self.output_dir / "threshold_sweep.png",
                                 title=f"{self.title}: DSC versus threshold", marked_threshold=self.threshold)
        for subject, data in self.overlays.items():
            plot_overlays(data["images"], data["masks"], data["truth"],
                          self.output_dir / f"overlay_{safe_name(subject)}.png", title=f"{subject}, slice {data['z']}")
        missing = sorted(set(self.overlay_subjects or []) - set(self.overlays))
        if missing:
            logger.warning("overlay subjects not in the evaluated split: %s", missing)
        self.write_settings()
        volumes = len({r["subject"] for r in self.result.rows})
        print(f"\n{self.title} ({volumes} volumes, "
              f"threshold {self.threshold:g}) -> {files['summary_md'].parent}\n{format_table(self.result.summary)}",
              flush=True)
        return self.result

    def write_settings(self) -> Path:
        """resolved_config.json: the run's resolved settings and its command line."""
        target = self.output_dir / "resolved_config.json"
        content = {"settings": self.settings, "command": sys.argv}
        atomic_write_text(target, json.dumps(content, indent=2, default=_json_default) + "\n")
        return target


def _json_default(value):
    if isinstance(value, (np.ndarray, torch.Tensor)):
        return _numpy(value).tolist()
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    return str(value)  # torch.device, paths, ...
