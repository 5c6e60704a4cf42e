"""Equal tuning effort (issue 34): one small grid for every method, each point judged on validation at the
method's own operating point.

    python -m tools.tuning_grid --methods cam seam_scale seam_all cmer cam_two_view cmer_identity \
        --axis lr=3e-4,1e-3,3e-3 --axis epochs=10,20 --seed 1337 --dataset-dir data/phantom \
        --out runs/grid --records results/grid
    python -m tools.tuning_grid --records results/grid --report [--write results/grid/grid.md]

A grid point is one combination of the axes' values (`--axis KEY=V1,V2,...`: any config id, as
`tools.experiments --set` takes it; values parsed as JSON when they can be). Each point is one call of
`tools.experiments --main-only --seeds SEED --runs METHODS --set KEY=VALUE ...` (the bundle's own training
and evaluation) with its own folders, <out>/<point> and <records>/<point> (`lr=3e-4, epochs=20` ->
`lr=3e-4_epochs=20`): the runner keeps one recipe per records folder. A run whose record exists is skipped,
so a grid spans sessions (commit the records as they land).

The report reads the records alone: per method, one row per point with the validation DSC of the fused map at
the method's own operating point (fusion and threshold chosen on the validation split: what a point is
judged by), at the default read-out (mean fusion, 0.5) and at the paper's (max, 0.5), the threshold-free area
under the validation DSC curve of the mean fusion, the same judge for models/model_per_modality.pt (each network
at its own best validation epoch), and the chosen point per method (the highest DSC at its own
operating point; ties: the earlier point). Test numbers stay out of it: they are for the main rows at the
chosen points, not for choosing.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

from scripts.common import atomic_write_text
from scripts.workflows.operating_point import value_at
from tools.experiment_records import load_records

PAPER_READOUT = ("max", 0.5)
DEFAULT_READOUT = ("mean", 0.5)


def parse_axis(text: str) -> tuple[str, list]:
    """`KEY=V1,V2,...` -> (KEY, [values]); a value is parsed as JSON when it can be (numbers, true, lists)."""
    key, sep, values = text.partition("=")
    if not sep or not key or not values:
        raise ValueError(f"--axis {text!r}: expected KEY=V1,V2,... (e.g. lr=3e-4,1e-3)")
    parsed = []
    for value in values.split(","):
        try:
            parsed.append(json.loads(value))
        except json.JSONDecodeError:
            parsed.append(value)
    return key, parsed


def grid_points(axes: list[tuple[str, list]]) -> list[dict]:
    """Every combination of the axes' values, in the order of the axes (the first varies slowest)."""
    keys = [key for key, _ in axes]
    return [dict(zip(keys, combo)) for combo in itertools.product(*(values for _, values in axes))]


def point_name(point: dict) -> str:
    """A folder name for a point: `key=value` pairs joined by `_` (config ids' `#` becomes `.`)."""
    return "_".join(f"{key.replace('#', '.')}={json.dumps(value) if not isinstance(value, str) else value}"
                    for key, value in point.items()).replace("/", "-").replace(" ", "")


def _fused_curve(sweep: dict, fusion: str, configured: str) -> dict | None:
    return sweep.get("fused" if fusion == configured else f"fused_{fusion}")


def point_scores(record: dict) -> dict | None:
    """What a grid point is judged by, from one run record's validation operating point; None without one."""
    point = (record.get("operating_point") or {})
    chosen, sweep = point.get("validation"), point.get("validation_sweep") or {}
    if not chosen:
        return None
    configured = chosen.get("configured_fusion", "mean")
    out = {"own": chosen["dsc"], "fusion": chosen["fusion"], "threshold": chosen["threshold"],
           "auc": (chosen.get("fusions") or {}).get("mean", {}).get("auc")}
    for name, (fusion, threshold) in (("default", DEFAULT_READOUT), ("paper", PAPER_READOUT)):
        curve = _fused_curve(sweep, fusion, configured)
        out[name] = value_at(curve["thresholds"], curve["dsc_mean"], threshold) if curve else None
    per_modality = ((record.get("operating_point_per_modality") or {}).get("validation") or {})
    out["per_modality"] = per_modality.get("dsc")  # model_per_modality.pt at its own operating point
    return out


def collect(records_root: Path, seed: int | None = None) -> dict:
    """{method: [(point name, scores)]} over the points under `records_root`, in folder order."""
    table: dict = {}
    for folder in sorted(p for p in Path(records_root).iterdir() if p.is_dir()):
        for (run_seed, run), record in load_records(folder).items():
            if seed is not None and run_seed != seed:
                continue
            scores = point_scores(record)
            if scores is not None:
                table.setdefault(run, []).append((folder.name, scores))
    return table


def report(table: dict) -> str:
    """Markdown: per method and point, validation DSC (%) at its own operating point and the fixed read-outs."""
    pct = lambda v: "-" if v is None else f"{100 * v:.1f}"  # noqa: E731
    lines = ["Validation fused DSC (%) per grid point; the chosen point per method in bold (highest at its own "
             "operating point).", "",
             "| method | point | own operating point (fusion, threshold) | mean, 0.5 | max, 0.5 (paper) | "
             "area under the mean-fusion curve | each network at its own best epoch, own operating point |",
             "|---|---|---|---|---|---|---|"]
    for method, rows in table.items():
        best = max(range(len(rows)), key=lambda i: (rows[i][1]["own"], -i))
        for i, (name, s) in enumerate(rows):
            own = f"{pct(s['own'])} ({s['fusion']}, {s['threshold']:g})"
            cells = [method, name, f"**{own}**" if i == best else own, pct(s["default"]), pct(s["paper"]), pct(s["auc"]),
                     pct(s.get("per_modality"))]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.tuning_grid", description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="*", default=["cam", "seam_scale", "seam_all", "cmer"],
                        help="runs of tools.experiments' plan (method presets and controls)")
    parser.add_argument("--axis", action="append", default=[], metavar="KEY=V1,V2",
                        help="one grid axis (repeat the flag for more axes)")
    parser.add_argument("--seed", type=int, default=1337, help="the one training seed of the grid")
    parser.add_argument("--dataset-dir", help="fixed data (default: the seed's own phantom under each point's --out)")
    parser.add_argument("--set", nargs="*", default=[], metavar="ID=VALUE", help="more overrides for every point")
    parser.add_argument("--out", default="runs/grid", help="working folders (weights), one per point")
    parser.add_argument("--records", default="results/grid", help="run records, one folder per point")
    parser.add_argument("--report", action="store_true", help="only print the table of the records")
    parser.add_argument("--write", help="also write the table here (markdown)")
    args = parser.parse_args(argv)
    records = Path(args.records)
    if not args.report:
        from tools import experiments

        try:
            axes = [parse_axis(a) for a in args.axis]
        except ValueError as err:
            parser.error(str(err))
        points = grid_points(axes) if axes else [{}]
        for i, point in enumerate(points, 1):
            name = point_name(point) or "default"
            print(f"\n##### grid point {i}/{len(points)}: {name}", flush=True)
            call = ["--out", str(Path(args.out) / name), "--records", str(records / name), "--main-only",
                    "--seeds", str(args.seed), "--runs", *args.methods, "--no-report",
                    "--set", *args.set, *(f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in point.items())]
            if args.dataset_dir:
                call += ["--dataset-dir", args.dataset_dir]
            if experiments.main(call) != 0:
                print(f"grid point {name}: a run failed (see above); the next points still run", file=sys.stderr)
    table = report(collect(records, args.seed)) if records.is_dir() else "no records yet"
    print(table)
    if args.write:
        atomic_write_text(args.write, table + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
