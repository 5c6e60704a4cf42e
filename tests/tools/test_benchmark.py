"""The benchmark runs and reports every row; its reference step is the same objective.

Speeds are never asserted: these check that `--quick` works and that the table is complete.
"""

import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from tools.benchmark.core import Row, Settings, build_network, markdown_table, synthetic_batch
from tools.benchmark.gpu import DeviceAudit
from tools.benchmark.training import ReferenceStep, make_trainer

ROOT = Path(__file__).resolve().parents[2]

# (area, a piece of the case) of every row a CPU --quick run must print.
EXPECTED_ROWS = [
    *[("training", f"K={k}, 32x32, B=16, fp32: {who}") for k in (1, 2, 4) for who in ("ours", "reference")],
    ("precision", "matmul 2048x2048, fp32"),
    ("precision", "matmul 2048x2048, bf16"),
    ("precision", "FLOPs of a training step, K=4, 32x32"),
    ("precision", "bare UNetCAM step, K=1, 32x32, 2B=32 slices, base 4, fp32"),
    ("data", "decode + cache one subject"),
    ("data", "loader from cache"),
    ("inference", "end to end"),
    ("maps", "GradCAM++"),
    ("maps", "max abs difference"),
    ("maps", "pytorch-grad-cam"),
    ("memory", "peak RSS"),
    ("gpu path", "host syncs"),
]


@pytest.fixture(scope="module")
def quick_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "perf.md"
    result = subprocess.run([sys.executable, "-m", "tools.benchmark", "--quick", "--out", str(out)],
                            cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout, out.read_text()


def _table_rows(text):
    return [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| Area")]


def test_quick_run_prints_one_table_with_every_row(quick_report):
    stdout, written = quick_report
    assert written.strip() == stdout.strip()
    rows = _table_rows(stdout)
    for area, case in EXPECTED_ROWS:
        assert any(r.startswith(f"| {area} |") and case in r for r in rows), f"no row {area}: {case}\n{stdout}"
    assert not [r for r in rows if "failed:" in r], stdout
    assert stdout.count("| Area |") == 1


def test_quick_report_states_the_machine(quick_report):
    stdout, _ = quick_report
    for fact in ("CPU:", "torch threads", "GPU:", "torch ", "monai ", "load average before"):
        assert fact in stdout


def test_every_training_row_has_a_ratio_and_verdict(quick_report):
    stdout, _ = quick_report
    for row in _table_rows(stdout):
        if row.startswith("| training |"):
            cells = [c.strip() for c in row.strip("|").split("|")]
            assert cells[4] and cells[6] in ("met", "**missed**"), row


def test_markdown_table_escapes_pipes():
    table = markdown_table([Row("a", "x | y", "1")])
    assert table.splitlines()[2] == "| a | x / y | 1 |  |  |  |  |"


def test_reference_step_gives_the_trainers_gradients():
    """With two separate view passes (as the reference does), the trainer's one backward over
    the summed losses and the reference's per-network backwards give the same gradients."""
    torch.set_num_threads(1)
    s = Settings(device=torch.device("cpu"), amp=False, quick=True, base_channels=4, sizes=(16,), batch_size=6,
                 repeats=1, warmup=0)
    batch = synthetic_batch(6, 2, 16, seed=1)
    ours_net, reference_net = build_network(2, s), build_network(2, s)
    make_trainer(ours_net, batch, 1, s, concat_views=False).run()
    ReferenceStep(reference_net, s)(batch)
    for (name, ours), reference in zip(ours_net.named_parameters(), reference_net.parameters()):
        torch.testing.assert_close(ours.grad, reference.grad, rtol=1e-4, atol=1e-7, msg=name)
        torch.testing.assert_close(ours, reference, msg=name)


def test_device_audit_sees_every_op_and_names_callers():
    """On a CPU step every data-sized op produces a CPU tensor, so the fallback detector must
    fire (on a GPU run the same detector must stay silent); nothing there is a host sync."""
    torch.set_num_threads(1)
    s = Settings(device=torch.device("cpu"), amp=False, quick=True, base_channels=4, sizes=(16,), batch_size=4,
                 repeats=1, warmup=0)
    trainer = make_trainer(build_network(2, s), synthetic_batch(4, 2, 16), 1, s)
    audit = DeviceAudit(16 * 16)
    with audit:
        trainer.run()
    assert audit.ops > 100
    assert not audit.syncs
    assert any("convolution" in what for what in audit.fallbacks)
    assert all(" from " in what for what in audit.fallbacks)


def test_quick_run_puts_precisions_side_by_side(quick_report):
    """Where the CPU has native bf16, every training case is measured in fp32 and bf16 in one run."""
    from scripts.precision import cpu_supports_bf16

    stdout, _ = quick_report
    rows = _table_rows(stdout)
    bf16_rows = [r for r in rows if r.startswith("| training |") and ", bf16:" in r]
    assert len(bf16_rows) == (6 if cpu_supports_bf16() else 0), stdout
    share = [r for r in rows if "bare UNetCAM step" in r]
    assert share and all(r.split("|")[5].strip().endswith("%") for r in share), share


def test_flop_count_of_a_bare_step_counts_forward_and_backward():
    from tools.benchmark.training import BareStep
    from tools.benchmark.precision import step_flops

    s = Settings(device=torch.device("cpu"), amp=False, quick=True, base_channels=4, sizes=(16,), batch_size=2,
                 repeats=1, warmup=0)
    net = build_network(1, s)
    batch = synthetic_batch(2, 1, 16)
    first_conv = 2 * (2 * 2) * 16 * 16 * 4 * 1 * 9  # FLOPs of the first 3x3 conv (1 -> 4) over 2B slices, forward
    flops = step_flops(BareStep(net, batch, s))
    assert flops > 3 * first_conv  # forward + backward of many layers
    assert step_flops(BareStep(build_network(1, replace(s, base_channels=8)), batch, s)) > 3 * flops  # ~width^2


TINY_EPOCH = "base_channels=4;spatial_size=[16,16];batch_size=4;split=[2,1,1];modalities=[t1,flair]"


def test_epoch_part_splits_one_real_epoch_into_phases(tmp_path):
    """`--parts epoch` trains configs/train.yaml for one epoch and accounts for its whole wall time."""
    import re

    from tools.benchmark.epoch import PHASES, epoch_rows

    from tests.safety_data import write_dataset

    s = Settings(device=torch.device("cpu"), amp=False, quick=True, base_channels=4, sizes=(16,), batch_size=4,
                 repeats=1, warmup=0, precisions=("fp32",))
    data = write_dataset(tmp_path / "data", subjects=4)  # 16 x 16 x 8 volumes, written in a second
    (row,) = epoch_rows(s, [TINY_EPOCH], str(data), str(tmp_path / "cache"))
    assert row.area == "epoch" and "base 4, 16x16, B=4, K=2" in row.case
    total = float(re.match(r"([0-9.]+) s:", row.measured).group(1))
    phases = {name.strip(): float(sec) for name, sec in re.findall(r"([a-z ]+?) ([0-9.]+) s \(", row.measured.split(": ", 1)[1])}
    assert set(phases) == {p.strip() for p in PHASES}
    # the row rounds to 0.1 s; the phase clock itself must see every phase of a step
    from tools.benchmark.epoch import parse_variant, run_epoch

    seconds, total_s, facts = run_epoch(parse_variant(TINY_EPOCH), "fp32", str(data), str(tmp_path / "cache"),
                                        tmp_path / "second")
    assert seconds["forward"] > 0 and seconds["backward"] > 0 and seconds["validation"] > 0
    assert sum(seconds.values()) == pytest.approx(total_s, rel=1e-6) and facts["steps"] > 0
    assert sum(phases.values()) == pytest.approx(total, abs=0.1 + 0.01 * total)  # nothing unaccounted
    steps = int(re.search(r"(\d+) steps", row.case).group(1))
    assert steps > 0 and "bare nets fwd+bwd x" in row.compared


def test_epoch_variants_parse_as_yaml_overrides():
    from tools.benchmark.epoch import parse_variant

    assert parse_variant("base_channels=8; spatial_size=[64,64];precision=bf16") == {
        "base_channels": 8, "spatial_size": [64, 64], "precision": "bf16"}
    assert parse_variant("") == {}
    with pytest.raises(SystemExit):
        parse_variant("base_channels")


def test_layers_part_times_every_convolution_of_one_network_in_both_formats():
    """`--parts layers`: one row per Conv2d of a UNetCAM (the shapes the bare step feeds it), then
    the totals; the first layer, whose input needs no gradient, is timed like the others."""
    from tools.benchmark.layers import conv_shapes, layer_rows

    torch.set_num_threads(1)
    s = Settings(device=torch.device("cpu"), amp=False, quick=True, base_channels=4, sizes=(16,), batch_size=2,
                 repeats=1, warmup=0)
    shapes = conv_shapes(s)
    convs = [m for m in build_network(1, s).modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(shapes) == len(convs) > 10
    assert shapes[0][2] == (4, 1, 16, 16)  # 2B slices of one channel at the largest size
    rows = layer_rows(s)
    assert len(rows) == len(convs) + 2
    assert all(r.area == "layers" and "NHWC fwd" in r.measured and "NCHW fwd" in r.compared for r in rows[:-2])
    assert rows[-1].ratio.endswith("x NHWC's time") and float(rows[-1].ratio.split("x")[0]) <= 1.0
