"""Evaluation of a trained model on a datalist split: tables, threshold sweep and overlays.

`configs/evaluate.yaml` (merged over train.yaml) feeds the cached, preprocessed test
volumes (scripts.data.slices.VolumeDataset) to `scripts.workflows.inference.CAMMapEvaluator`, whose
iteration gives every volume's maps (per modality and fused) with slices put back in
order. `EvaluationReport`, an engine handler, scores each volume as it comes
(scripts.workflows.metrics: DSC, ASSD in mm, r_u / r_o, DSC-versus-threshold) so only small
per-volume numbers are kept, and at the end writes under `output_dir`:

    per_subject.csv, summary.csv, summary.md, threshold_sweep.csv   (scripts.workflows.metrics)
    threshold_sweep.png                 DSC versus threshold (the paper's Fig. 4)
    operating_point.json                the best threshold per map and per fusion on this split, the area
                                        under each DSC curve, and this split's DSC at the model's recorded
                                        operating point (scripts.workflows.operating_point)
    overlay_<subject>.png               masks over the images (the paper's Fig. 5)
    resolved_config.json                the settings of the run and its command line

and prints the summary table. The fused map is swept at the evaluator's fusion ('fused') and at
the other fusions of `fusions` ('fused_max', 'fused_mean': the same gated per-modality maps fused
otherwise). Evaluating the validation split with `record_operating_point` writes the chosen
operating point beside the checkpoint, where inference reads it.
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

from scripts.common import atomic_write_json, atomic_write_text
from scripts.data.subjects import DataError, load_datalist
from scripts.model.cams import fuse_maps
from scripts.workflows import operating_point as op
from scripts.workflows.metrics import (
    DEFAULT_SWEEP,
    EvaluationResult,
    dice_curve,
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
    for name in names + [n for n in curves if n not in names]:  # then the other fusions' curves
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
        fusion: the evaluator's fusion (the 'fused' map's); None: no other fusion is swept.
        fusions: fusions whose fused map is also swept ('fused_<fusion>'), for the operating point.
        ckpt_path: the evaluated checkpoint (its recorded operating point is read, or written).
        split: the evaluated datalist split (recorded with the operating point).
        record_operating_point: write the operating point chosen on this split beside the checkpoint
            (configs/evaluate.yaml: when the split is the validation split).
        choose_fusion: the operating point also chooses the fusion (mean | max), not only the threshold.
        gate_source: the evaluator's gate source ("own" | "mean"), recorded with the operating point (a
            threshold chosen under one gate does not carry over to the other).
    """

    def __init__(self, output_dir, threshold: float = 0.5, sweep_thresholds: Sequence[float] | None = DEFAULT_SWEEP,
                 overlay_subjects: Sequence[str] | None = None, overlay_count: int = 2, settings: dict | None = None,
                 title: str = "Evaluation", fusion: str | None = None, fusions: Sequence[str] = (),
                 ckpt_path=None, split: str = "testing", record_operating_point: bool = False,
                 choose_fusion: bool = False, gate_source: str = "own"):
        self.output_dir = Path(output_dir)
        self.gate_source = str(gate_source)
        self.fusion = fusion
        self.fusions = [f for f in (fusions or ()) if fusion is not None and f != fusion]
        self.ckpt_path = ckpt_path
        self.split = str(split)
        self.record_operating_point = _flag(record_operating_point)
        self.choose_fusion = _flag(choose_fusion)
        self.operating_point: dict | None = None
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
        self.operating_point = None

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
        self._other_fusions(maps, truth)
        if self._wants_overlay(subject):
            self.overlays[subject] = self._overlay_data(item, maps, truth)

    def _other_fusions(self, maps: dict, truth: np.ndarray) -> None:
        """DSC curves of the fused map under the other fusions of the same gated per-modality maps."""
        sources = [m for n, m in maps.items() if n != "fused"]
        if self.sweep_thresholds is None or len(sources) < 2:
            return
        stacked = np.stack(sources)[None]
        for how in self.fusions:
            fused = fuse_maps(stacked, how)[0]
            self.curves.setdefault(op.fused_sweep_name(how, self.fusion), []).append(
                dice_curve(fused, truth, self.sweep_thresholds))

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
        if self.result.sweep:
            self.write_operating_point()
        volumes = len({r["subject"] for r in self.result.rows})
        print(f"\n{self.title} ({volumes} volumes, "
              f"threshold {self.threshold:g}) -> {files['summary_md'].parent}\n{format_table(self.result.summary)}",
              flush=True)
        return self.result

    def write_operating_point(self) -> dict:
        """operating_point.json: this split's best thresholds and curve areas, the model's recorded operating
        point and this split's DSC at it; with `record_operating_point`, this split's choice is recorded
        beside the checkpoint (scripts.workflows.operating_point)."""
        fusion = self.fusion or "mean"
        chosen = {**op.choose_operating_point(self.result.sweep, fusion, self.choose_fusion, self.split),
                  "gate_source": self.gate_source}
        recorded = op.read_operating_point(self.ckpt_path)
        if self.record_operating_point:
            if self.ckpt_path is None:
                logger.warning("no ckpt_path: the operating point chosen on %s is not recorded", self.split)
            else:
                try:
                    path = op.write_operating_point(self.ckpt_path, chosen)
                    recorded = op.read_operating_point(self.ckpt_path)
                    logger.info("operating point (fusion %s, threshold %g) recorded in %s", chosen["fusion"],
                                chosen["threshold"], path)
                except OSError as err:
                    logger.warning("the operating point could not be written beside %s (%s): inference keeps its "
                                   "configured threshold", self.ckpt_path, err)
        at_recorded = op.evaluate_at(self.result.sweep, recorded, fusion) if recorded else None
        self.operating_point = {"split": self.split, "this_split": chosen, "recorded": recorded,
                                "at_recorded": at_recorded}
        atomic_write_json(self.output_dir / "operating_point.json", json.loads(json.dumps(
            self.operating_point, default=_json_default, allow_nan=True)))
        line = (f"best on {self.split}: fused ({chosen['fusion']}) {100 * chosen['dsc']:.1f} % at threshold "
                f"{chosen['threshold']:g} (area under the DSC curve {chosen['auc']:.3f})")
        if at_recorded is not None:
            line += (f"; at the recorded operating point ({recorded['fusion']}, {recorded['threshold']:g}, chosen on "
                     f"{recorded.get('split')}): {100 * at_recorded['chosen']:.1f} %")
        print(line, flush=True)
        return self.operating_point

    def write_settings(self) -> Path:
        """resolved_config.json: the run's resolved settings and its command line."""
        target = self.output_dir / "resolved_config.json"
        content = {"settings": self.settings, "command": sys.argv}
        atomic_write_text(target, json.dumps(content, indent=2, default=_json_default) + "\n")
        return target


def _flag(value) -> bool:
    """A config flag: `--record_operating_point false` arrives as the string 'false'."""
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "on")
    return bool(value)


def _json_default(value):
    if isinstance(value, (np.ndarray, torch.Tensor)):
        return _numpy(value).tolist()
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    return str(value)  # torch.device, paths, ...
