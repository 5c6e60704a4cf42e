"""Multi-process training: scripts/method/distributed.py and configs/multi_gpu_train.yaml.

Fast tests check the DDP wrapping in a one-process gloo group and which handlers each rank
keeps; one end-to-end test launches two CPU processes with torchrun (gloo) on a tiny phantom.
"""

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from monai.bundle import ConfigParser
from monai.data import DataLoader

from scripts.method import distributed
from scripts.model.networks import MultiModalCAM
from scripts.method.trainer import CMERTrainer, ModalityOptimizers, TransformSampler, build_objective

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[2]
MULTI_GPU = ["configs/train.yaml", "configs/presets/phantom_quick.yaml", "configs/multi_gpu_train.yaml"]
# A tiny phantom (6 subjects at 6 mm, 32x32 slices) and 2 iterations per process.
TINY = ["--epochs", "1", "--phantom#subjects", "6", "--phantom#spacing", "6.0", "--split", "[2,2,2]",
        "--spatial_size", "[32,32]", "--base_channels", "4", "--batch_size", "4", "--train#trainer#epoch_length", "2"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def single_process_group():
    """A one-process gloo group (world size 1), torn down afterwards."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_rank_queries_read_torchrun_environment(monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert distributed.rank() == 1 and distributed.local_rank() == 1 and distributed.world_size() == 2
    assert not distributed.is_main_process()
    monkeypatch.setenv("RANK", "0")
    assert distributed.is_main_process()
    if not torch.cuda.is_available():
        assert distributed.device() == torch.device("cpu")
    distributed.main_process_first_begin()  # no process group: no barrier, returns at once
    distributed.main_process_first_end()


def test_ddp_nets_need_a_process_group():
    with pytest.raises(RuntimeError, match="init_process_group"):
        distributed.ddp_training_nets(MultiModalCAM(["t1"], base_channels=4), "cpu")


def _batches(k=2, size=16, n=8):
    g = torch.Generator().manual_seed(0)
    items = []
    for i in range(n):
        image = torch.randn(k, size, size, generator=g) * 0.1
        if i % 2:
            image[:, 4:9, 5:10] += 2.0
        items.append({"image": image, "label": torch.tensor(i % 2)})
    return items


def _train(network, training_nets=None, kinds=("flip", "rotation", "scale", "translation")):
    trainer = CMERTrainer(
        device=torch.device("cpu"), max_epochs=1, network=network, optimizers=ModalityOptimizers(network, lr=1e-3),
        train_data_loader=DataLoader(_batches(), batch_size=4, shuffle=False), objective=build_objective("weak"),
        transform_sampler=TransformSampler(kinds, seed=0), training_nets=training_nets,
    )
    trainer.run()
    return trainer


def test_ddp_wrapped_training_matches_plain_training(single_process_group):
    """With one process DDP averages over one replica: the same steps as without DDP."""
    torch.manual_seed(0)
    plain = MultiModalCAM(["t1", "t2"], base_channels=4)
    wrapped = MultiModalCAM(["t1", "t2"], base_channels=4)
    wrapped.load_state_dict(plain.state_dict())
    nets = distributed.ddp_training_nets(wrapped, "cpu")
    assert all(isinstance(n, torch.nn.parallel.DistributedDataParallel) for n in nets)
    assert all(n.module.net is net for n, net in zip(nets, wrapped.nets))  # shared, not copied
    trainer = _train(wrapped, nets)
    assert trainer.training_nets == nets
    _train(plain)
    for (name, a), b in zip(plain.state_dict().items(), wrapped.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), atol=1e-6), name
    assert set(wrapped.state_dict()) == set(plain.state_dict())  # checkpoints stay plain state dicts


def _multi_gpu_parser(rank: int, monkeypatch) -> ConfigParser:
    monkeypatch.setenv("RANK", str(rank))  # no process group: the helpers read torchrun's variables
    parser = ConfigParser()
    parser.read_config([str(ROOT / f) for f in MULTI_GPU])
    parser.parse()
    return parser


def _enabled_targets(parser: ConfigParser, list_id: str) -> list[str]:
    """What of the list `list_id` gets built: targets whose own `_disabled_` is not true, and references."""
    enabled = []
    for index, item in enumerate(parser[list_id]):
        if isinstance(item, str):  # a reference such as "@validate#best_model_saver"
            enabled.append(item.replace("::", "#"))
            continue
        flag = f"{list_id}#{index}#_disabled_"
        if not (flag in parser and parser.get_parsed_content(flag)):
            enabled.append(item["_target_"].rsplit(".", 1)[-1])
    return enabled


@pytest.mark.parametrize("rank", [0, 1])
def test_only_rank_zero_reports_and_saves(rank, monkeypatch):
    parser = _multi_gpu_parser(rank, monkeypatch)
    train = _enabled_targets(parser, "train#handlers")
    reports = _enabled_targets(parser, "train#report_handlers")
    validate = _enabled_targets(parser, "validate#handlers")
    # the lambda_E and lr schedules change the step; validation is sharded, its metrics all-reduced
    assert train == ["LambdaEScheduler", "ValidationHandler", "ModalityLRSchedule"]
    assert parser["train#trainer#train_handlers"].replace("::", "#") == "$@train#handlers + @train#report_handlers"
    assert parser.get_parsed_content("is_main_process") is (rank == 0)
    if rank == 0:
        assert reports == ["StatsHandler", "TensorBoardStatsHandler", "ProgressBar"]
        assert validate == ["StatsHandler", "TensorBoardStatsHandler", "@validate#best_model_saver",
                            "@validate#per_modality_saver", "CAMImageWriter"]
    else:  # nothing that reports is built, so no TensorBoard writer is opened
        assert reports == []
        # checkpoint objects (the per-modality saver writes on rank 0 only); not attached here
        assert validate == ["@validate#best_model_saver", "@validate#per_modality_saver"]


def test_single_process_training_builds_every_handler():
    """train.yaml alone: both lists, in the order the trainer attaches them."""
    parser = ConfigParser()
    parser.read_config(str(ROOT / "configs/train.yaml"))
    assert parser.get_parsed_content("train#report") is True
    assert (_enabled_targets(parser, "train#handlers") + _enabled_targets(parser, "train#report_handlers")
            == ["LambdaEScheduler", "ValidationHandler", "ModalityLRSchedule", "StatsHandler",
                "TensorBoardStatsHandler", "ProgressBar"])
    assert _enabled_targets(parser, "validate#handlers") == ["StatsHandler", "TensorBoardStatsHandler",
                                                             "@validate#best_model_saver",
                                                             "@validate#per_modality_saver", "CAMImageWriter"]
    assert parser["validate#evaluator#val_handlers"].replace("::", "#") == "@validate#handlers"


def test_multi_gpu_config_selects_handlers_without_positions():
    """No `...#handlers#<index>#...` key: adding or reordering a handler cannot switch off the wrong one."""
    raw = ConfigParser.load_config_file(str(ROOT / "configs/multi_gpu_train.yaml"))
    assert not [key for key in raw if re.search(r"handlers#\d", key)]


def test_multi_gpu_training_steps_follow_train_yaml():
    """Every step of train.yaml's `training` list is kept, as is or guarded to rank 0."""
    single = ConfigParser.load_config_file(str(ROOT / "configs/train.yaml"))["training"]
    multi = ConfigParser.load_config_file(str(ROOT / "configs/multi_gpu_train.yaml"))["training"]
    assert len(multi) == len(single)
    for step, ddp_step in zip(single, multi):
        assert ddp_step in (step, step.replace("$", "$@is_main_process and ", 1)), (step, ddp_step)
    merged = ConfigParser()
    merged.read_config([str(ROOT / f) for f in MULTI_GPU])
    assert merged["train#dataloader#shuffle"] is False and merged["train#dataloader#sampler"] == "@train#sampler"
    assert merged["train#sampler#even_divisible"] is True and merged["train#sampler#shuffle"] is True
    assert merged["validate#dataloader#sampler"] == "@validate#sampler"
    assert any("destroy_process_group" in step for step in merged["finalize"])
    assert any("init_process_group" in step and "gloo" in step and "nccl" in step for step in merged["initialize"])


def test_torchrun_two_processes_train_with_one_writer(tmp_path):
    """torchrun, 2 CPU processes (gloo): both finish, rank 0 alone writes checkpoints and logs."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1", "--nproc_per_node=2",
               "-m", "monai.bundle", "run", "training", "--config_file", str([str(ROOT / f) for f in MULTI_GPU]),
               "--bundle_root", str(tmp_path), *TINY]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    log = result.stdout + result.stderr
    if result.returncode != 0 and "terminate called without an active exception" in log \
            and len(re.findall(r"CMERTrainer - INFO - Engine run finished", log)) == 2:
        # An open flake (2026-12-07, in the full suite only, never alone): a rank aborts in process
        # teardown after both ranks finished training. One retry, in a fresh folder; any other failure,
        # or the same one twice, fails the test.
        retry = tmp_path / "retry"
        command[command.index("--bundle_root") + 1] = str(retry)
        result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
        log = result.stdout + result.stderr
        tmp_path = retry
    assert result.returncode == 0, log[-4000:]
    # both processes trained and validated their shard (torchrun prefixes nothing: count engine ends)
    assert len(re.findall(r"CMERTrainer - INFO - Engine run finished", log)) == 2, log[-4000:]
    assert len(re.findall(r"CAMValidator - INFO - Engine run finished", log)) == 2, log[-4000:]
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == [
        "last.pt", "model.pt", "model_per_modality.pt", "model_per_modality.selection.json"]
    events = sorted((tmp_path / "runs" / "train").glob("events.out.tfevents.*"))
    assert events, "rank 0 wrote no TensorBoard events"
    assert len({e.name.rsplit(".", 2)[-2] for e in events}) == 1, events  # one writing process (pid in the name)
    assert (tmp_path / "runs" / "train" / "validation.md").is_file()
    state = torch.load(tmp_path / "models" / "model.pt", weights_only=True)
    assert not any(key.startswith("module.") for key in state)  # plain MultiModalCAM state dict
    per_modality = torch.load(tmp_path / "models" / "model_per_modality.pt", weights_only=True)
    assert set(per_modality) == set(state)  # the same plain state dict, written by rank 0
