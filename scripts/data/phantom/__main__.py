"""Command line of the phantom.

    python -m scripts.data.phantom --out DIR --subjects N --seed S [--spacing MM] [--figure PNG]
    python -m scripts.data.phantom report --data DIR [--out report.md] [--json report.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from scripts.common import atomic_path


def _generate_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m scripts.data.phantom",
                                     description="Write a synthetic multi-modal brain-tumour dataset "
                                                 "(BraTS 2019 layout). `report --data DIR` measures realism.")
    parser.add_argument("--out", required=True, help="output folder (BraTS 2019 layout: HGG/, LGG/)")
    parser.add_argument("--subjects", type=int, required=True, help="number of subjects")
    parser.add_argument("--seed", type=int, required=True, help="random seed (>= 0)")
    parser.add_argument("--spacing", type=float, default=1.0, help="voxel size in mm (default 1)")
    parser.add_argument("--hgg-fraction", type=float, default=0.5, help="fraction of HGG subjects")
    parser.add_argument("--misregistration-mm", type=float, default=0.0,
                        help="per-modality rigid misregistration: largest shift per axis (mm; default 0)")
    parser.add_argument("--misregistration-deg", type=float, default=0.0,
                        help="per-modality rigid misregistration: largest rotation per axis (degrees; default 0)")
    parser.add_argument("--tumour-texture-mm", type=float, nargs="+", default=None,
                        help="correlation lengths (mm) of the tumour compartments' texture (default 1.5 4 10)")
    parser.add_argument("--tumour-texture-weights", type=float, nargs="+", default=None,
                        help="one weight per --tumour-texture-mm scale (default 0.25 0.5 1)")
    parser.add_argument("--cisterns-and-sinuses", action="store_true",
                        help="fill the basal cisterns with CSF, with enhancing arteries, and add enhancing dural "
                             "sinuses (docs/phantom.md)")
    parser.add_argument("--figure", help="also write a PNG with the first HGG and LGG subject")
    parser.add_argument("--overwrite", action="store_true", help="replace existing subjects")
    return parser


def _report_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m scripts.data.phantom report",
                                     description="Tumour-compartment contrasts and textures of a dataset with "
                                                 "segmentations, against the target bands of real BraTS-space MRI.")
    parser.add_argument("--data", required=True, help="dataset folder (any supported layout) or datalist .json")
    parser.add_argument("--out", help="also write the markdown table here")
    parser.add_argument("--json", help="also write per-subject statistics here")
    parser.add_argument("--limit", type=int, help="only the first N subjects")
    parser.add_argument("--title", default="", help="heading of the table")
    return parser


def generate(argv) -> int:
    from scripts.data.phantom.figure import plot_subjects
    from scripts.data.phantom.generate import GRADES, generate_dataset, load_subject
    from scripts.data.phantom.render import TUMOUR_TEXTURE_MM, TUMOUR_TEXTURE_WEIGHTS

    args = _generate_parser().parse_args(argv)
    start = time.perf_counter()
    try:
        records = generate_dataset(args.out, args.subjects, args.seed, args.spacing, args.hgg_fraction,
                                   overwrite=args.overwrite, log=lambda line: print(line, flush=True),
                                   misregistration_mm=args.misregistration_mm,
                                   misregistration_deg=args.misregistration_deg,
                                   tumour_texture_mm=args.tumour_texture_mm or TUMOUR_TEXTURE_MM,
                                   tumour_texture_weights=args.tumour_texture_weights or TUMOUR_TEXTURE_WEIGHTS,
                                   cisterns_and_sinuses=args.cisterns_and_sinuses)
    except (FileExistsError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    n_hgg = sum(r["grade"] == "HGG" for r in records)
    if args.figure:
        shown = [next(r for r in records if r["grade"] == g) for g in GRADES if any(r["grade"] == g for r in records)]
        plot_subjects([load_subject(r) for r in shown], args.figure, names=[r["subject"] for r in shown])
        print(f"figure: {args.figure}")
    print(f"wrote {len(records)} subjects ({n_hgg} HGG, {len(records) - n_hgg} LGG) at {args.spacing:g} mm "
          f"to {args.out} in {time.perf_counter() - start:.1f} s")
    return 0


def report(argv) -> int:
    from scripts.data.subjects import DataError
    from scripts.data.phantom.report import dataset_statistics, evaluate_bands, format_report, rows_to_json

    args = _report_parser().parse_args(argv)
    try:
        rows = dataset_statistics(args.data, args.limit, log=lambda line: print(line, file=sys.stderr, flush=True))
    except DataError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    table = format_report(rows, args.title)
    print(table)
    if args.out:
        with atomic_path(args.out) as tmp:
            tmp.write_text(table + "\n")
    if args.json:
        with atomic_path(args.json) as tmp:
            tmp.write_text(json.dumps({"subjects": rows_to_json(rows), "bands": [
                {**{k: v for k, v in b.items() if k != "grades"}, "grades": list(b["grades"])}
                for b in evaluate_bands(rows)]}, indent=1))
    return 0


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "report":
        return report(argv[1:])
    if argv and argv[0] == "generate":
        argv = argv[1:]
    return generate(argv)


if __name__ == "__main__":
    sys.exit(main())
