"""python -m tools.benchmark: run the parts, print (and write) the one table.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Callable

import torch

from scripts import precision as P
import tools.benchmark
from tools.benchmark.core import (CLOCKS, EXTRA_PARTS, PARTS, Row, Settings, failed_row, load_line, machine_lines, markdown_table,
                                  set_clock, settings_from_args)
from tools.benchmark.data import data_rows
from tools.benchmark.gpu import gpu_path_rows
from tools.benchmark.inference import inference_rows
from tools.benchmark.maps import map_rows
from tools.benchmark.memory import memory_child, memory_rows
from tools.benchmark.profile import write_profile
from tools.benchmark.training import training_rows


def guarded(area: str, make_rows: Callable[[], list[Row]]) -> list[Row]:
    try:
        return make_rows()
    except Exception as err:  # noqa: BLE001 - a crashed part is reported in the table
        return [failed_row(area, area, err)]


class PartLog(dict):
    """Rows per part; each part's rows also go to the progress stream as soon as they exist,
    so a run that is cut short still leaves its figures behind."""

    def __init__(self, progress: Callable[[str], None]):
        super().__init__()
        self.progress = progress

    def __setitem__(self, part: str, rows: list[Row]) -> None:
        super().__setitem__(part, rows)
        for row in rows:
            self.progress(f"  {row.area} | {row.case} | {row.measured} | {row.compared} | {row.ratio} | {row.verdict}")


def run_benchmark(s: Settings, progress: Callable[[str], None], epoch_args=None) -> list[Row]:
    """Every part in turn; memory runs first, in children, while this process is still small."""
    parts = PartLog(progress)
    consumed: dict = {}
    if "memory" in s.parts:
        progress("memory (subprocesses)")
        parts["memory"] = guarded("memory", lambda: memory_rows(s))
    if s.device.type == "cpu":
        from scripts.method.trainer import keep_cpu_tensors_on_heap

        keep_cpu_tensors_on_heap()  # what CMERTrainer does on a CPU: every part runs under the same allocator
    with tempfile.TemporaryDirectory(prefix="cmer-benchmark-") as tmp:
        work = Path(tmp)
        if "training" in s.parts:
            progress("training (ours, bare, reference)")
            parts["training"], consumed = training_rows(s, progress)
        record = None
        if "precision" in s.parts:
            from tools.benchmark.precision import precision_rows

            progress("precision (matmul peak, bare step's share)")
            parts["precision"] = guarded("precision", lambda: precision_rows(s, progress))
        if "data" in s.parts or "inference" in s.parts:
            progress("data")
            try:
                data, record = data_rows(s, work, consumed)
                parts["data"] = data if "data" in s.parts else []
            except Exception as err:  # noqa: BLE001 - reported in the table
                parts["data"] = [failed_row("data", "loader / cache", err)]
        if "inference" in s.parts and record is not None:
            progress("inference")
            parts["inference"] = guarded("inference", lambda: inference_rows(s, work, record))
        if "maps" in s.parts:
            progress("maps")
            parts["maps"] = guarded("maps", lambda: map_rows(s))
        if "gpu" in s.parts:
            progress("gpu path")
            parts["gpu"] = guarded("gpu path", lambda: gpu_path_rows(s))
    if "layers" in s.parts:
        from tools.benchmark.layers import layer_rows

        progress("layers (each convolution of one network, NHWC vs NCHW)")
        parts["layers"] = guarded("layers", lambda: layer_rows(s, progress))
    if "epoch" in s.parts:
        from tools.benchmark.epoch import epoch_rows

        progress("epoch (configs/train.yaml, one epoch per variant and precision)")
        variants, dataset_dir, cache_dir = epoch_args or ([""], None, None)
        parts["epoch"] = guarded("epoch", lambda: epoch_rows(s, variants, dataset_dir, cache_dir, progress))
    return [row for part in PARTS + EXTRA_PARTS for row in parts.get(part, [])]


def report(s: Settings, rows: list[Row], load_before: str, command: str) -> str:
    lines = [f"## Benchmark ({'quick' if s.quick else 'full'}, {s.device}{', AMP' if s.amp else ''})", "",
             f"Command: `{command}`", ""]
    lines += machine_lines(s) + [load_before, load_line("after"), "", markdown_table(rows), ""]
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tools.benchmark", description=tools.benchmark.__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes: checks that it runs (CI)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--amp", action="store_true", help="precision auto only (bf16 on a bf16 CPU; fp16 + "
                        "GradScaler on cuda)")
    parser.add_argument("--precisions", nargs="+", choices=P.PRECISIONS,
                        help="training precisions side by side (default: fp32, plus bf16 on a CPU with native bf16)")
    parser.add_argument("--no-channels-last", action="store_true", help="NCHW networks (default NHWC, as configured)")
    parser.add_argument("--low-memory", action="store_true", help="the trainer's low_memory step (memory part too)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the trainer's networks")
    parser.add_argument("--out", help="also write the report (markdown) to this file")
    parser.add_argument("--base-channels", type=int, help="UNetCAM width (default 64, the paper's; quick 4)")
    parser.add_argument("--sizes", type=int, nargs="+", help="slice sizes (default 128 240; quick 32)")
    parser.add_argument("--batch-size", type=int, help="training batch (default 16)")
    parser.add_argument("--ks", type=int, nargs="+", help="numbers of modality networks (default 1 2 4)")
    parser.add_argument("--repeats", type=int, help="timed steps (default 4 = one per transform kind; quick 1)")
    parser.add_argument("--warmup", type=int, help="untimed warm-up steps (default 2 on a CPU; on cuda one "
                        "pass over the transform cycle)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default torch's; quick 1: a shared "
                        "CPU makes multi-threaded tiny ops stall at every barrier)")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                        help="wall (default) or process: CPU seconds of this process (1 thread, shared CPU)")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}, "
                        f"or the opt-in {','.join(EXTRA_PARTS)} (epoch: one real epoch of configs/train.yaml, timed by phase; layers: each convolution, NHWC vs NCHW)")
    parser.add_argument("--epoch-variants", nargs="+", default=[""], metavar="KEY=VALUE;...",
                        help="epoch part: configs/train.yaml overrides per variant, side by side "
                        "(e.g. '' 'base_channels=8'); '' = as configured")
    parser.add_argument("--dataset-dir", help="epoch part: the dataset (default data/phantom, made if absent)")
    parser.add_argument("--cache-dir", help="epoch part: the volume cache (default data/cache)")
    parser.add_argument("--profile", help="also write a profile of ours' step (phases + top operators) here")
    parser.add_argument("--memory-child", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.memory_child:
        if args.threads:
            torch.set_num_threads(args.threads)
        print(json.dumps(memory_child(json.loads(args.memory_child))), flush=True)
        return 0
    threads = args.threads or (1 if args.quick else None)
    if threads:
        torch.set_num_threads(threads)
    s = settings_from_args(args)
    set_clock(s.clock)
    command = "python -m tools.benchmark " + " ".join(sys.argv[1:] if argv is None else argv)
    load_before = load_line("before")

    def progress(message: str) -> None:
        print(message if message.startswith("  ") else f"[benchmark] {message} ...", file=sys.stderr, flush=True)

    rows = run_benchmark(s, progress, (args.epoch_variants, args.dataset_dir, args.cache_dir))
    text = report(s, rows, load_before, command.strip())
    print(text, flush=True)
    if args.out:
        from scripts.common import atomic_write_text

        atomic_write_text(args.out, text)
    if args.profile:
        progress("profile")
        write_profile(s, args.profile)
    return 0


if __name__ == "__main__":
    sys.exit(main())
