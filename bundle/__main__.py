"""Command line: `python -m bundle verify | export | package` (run from the bundle root).

    python -m bundle verify                       # metadata, network in/out, train + infer properties
    python -m bundle verify --only metadata       # any of: metadata, net, properties
    python -m bundle verify --train-config configs/train.yaml configs/presets/phantom_quick.yaml \
        --set dataset_dir=/data/brats                    # KEY=VALUE overrides (YAML values)
    python -m bundle export [--ckpt models/model.pt] [--out models/model.ts] [--set gate=false]
    python -m bundle package [--model models/model.pt] [--out-dir dist]
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import yaml

from . import BUNDLE_NAME, INFER_CONFIG, ROOT, TRAIN_CONFIG

CHECKS = ("metadata", "net", "properties")


def _overrides(pairs: list[str] | None) -> dict:
    """["a#b=1", "c=[1, 2]"] -> {"a#b": 1, "c": [1, 2]} (values parsed as YAML)."""
    result = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"--set expects KEY=VALUE, got {pair!r}")
        result[key] = yaml.safe_load(value)
    return result


def _verify(args) -> int:
    from . import verify

    checks = args.only or list(CHECKS)
    failures = 0
    if "metadata" in checks:
        meta = verify.verify_metadata(args.root)
        print(f"metadata: valid (version {meta['version']}, schema {verify.SCHEMA_PATH.name})")
        for line in verify.version_differences(meta):
            print(f"  note: {line}")
    if "net" in checks:
        verify.verify_net(args.root, args.infer_config, **_overrides(args.set))
        print("network in/out: matches network_data_format")
    if "properties" in checks:
        for workflow_type, config in (("train", args.train_config), ("infer", args.infer_config)):
            missing = verify.missing_properties(workflow_type, config, args.root, **_overrides(args.set))
            print(f"{workflow_type} properties ({', '.join(config)}): " + (f"MISSING {missing}" if missing else "complete"))
            failures += bool(missing)
    return 1 if failures else 0


def _export(args) -> int:
    from . import export

    ts_file = export.export_torchscript(args.root, args.ckpt, args.out, args.infer_config, **_overrides(args.set))
    difference = export.check_export(args.root, args.ckpt, ts_file, args.infer_config, **_overrides(args.set))
    print(f"wrote {ts_file} (inference.json and metadata.json embedded); torch.jit.load reproduces the eager network "
          f"(max |difference| {difference:.2e})")
    return 0


def _package(args) -> int:
    from . import package

    archive = package.build_archive(args.root, args.out_dir, args.model)
    print(f"wrote {archive}")
    print(f"  install: python -m monai.bundle download --name {BUNDLE_NAME} --url {archive.resolve().as_uri()} "
          f"--bundle_dir BUNDLES")
    return 0


def parser() -> argparse.ArgumentParser:
    main = argparse.ArgumentParser(prog="python -m bundle", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    main.add_argument("--root", type=Path, default=ROOT, help="bundle root (default: this repository)")
    verbs = main.add_subparsers(dest="verb", required=True)

    verify = verbs.add_parser("verify", help="MONAI's metadata, network and property checks")
    verify.add_argument("--only", nargs="+", choices=CHECKS, help="run only these checks")
    verify.add_argument("--train-config", nargs="+", default=[TRAIN_CONFIG], help="train workflow config file(s)")
    verify.add_argument("--infer-config", nargs="+", default=[INFER_CONFIG], help="inference config file(s)")
    verify.add_argument("--set", nargs="*", metavar="KEY=VALUE", help="config overrides for the checks")
    verify.set_defaults(run=_verify)

    export = verbs.add_parser("export", help="models/model.pt -> self-contained models/model.ts (TorchScript, consumer config embedded), then check it")
    export.add_argument("--ckpt", type=Path, help="weights (default models/model.pt)")
    export.add_argument("--out", type=Path, help="TorchScript file (default models/model.ts)")
    export.add_argument("--infer-config", nargs="+", default=[INFER_CONFIG], help="config holding network_def")
    export.add_argument("--set", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. base_channels=64")
    export.set_defaults(run=_export)

    package = verbs.add_parser("package", help=f"dist/{BUNDLE_NAME}_v<version>.zip")
    package.add_argument("--model", type=Path, help="weights to ship (default models/model.pt)")
    package.add_argument("--out-dir", type=Path, help="output folder (default dist/)")
    package.set_defaults(run=_package)
    return main


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = parser().parse_args(argv)
    try:
        return args.run(args)
    except (FileNotFoundError, ValueError, KeyError) as err:
        print(f"{args.verb} failed: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
