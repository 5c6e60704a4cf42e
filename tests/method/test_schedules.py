"""Learning-rate schedule of the modality optimisers; class-balanced and fixed-length slice sampling."""

from __future__ import annotations

import types

import pytest
import torch
from ignite.engine import Engine

from scripts.data.sampling import slice_sampler
from scripts.method.schedules import ModalityLRSchedule, lr_factor


def test_lr_factor_warmup_then_cosine():
    assert lr_factor(0.0, 0.1, "cosine", 0.0, 0.1) == pytest.approx(0.1)
    assert lr_factor(0.05, 0.1, "cosine", 0.0, 0.1) == pytest.approx(0.55)
    assert lr_factor(0.1, 0.1, "cosine", 0.0) == pytest.approx(1.0)
    assert lr_factor(0.55, 0.1, "cosine", 0.0) == pytest.approx(0.5)
    assert lr_factor(1.0, 0.1, "cosine", 0.2) == pytest.approx(0.2)
    assert lr_factor(0.7, 0.0, "constant") == 1.0  # the paper: constant
    with pytest.raises(ValueError):
        lr_factor(0.5, 0.0, "step")


def test_schedule_drives_every_optimiser_and_follows_iterations():
    nets = [torch.nn.Linear(2, 1) for _ in range(3)]
    optimizers = types.SimpleNamespace(optimizers=[torch.optim.AdamW(n.parameters(), lr=1.0) for n in nets])
    schedule = ModalityLRSchedule(optimizers, lr=0.01, warmup_epochs=1, decay="cosine", min_lr_ratio=0.0)
    seen = []
    engine = Engine(lambda e, b: seen.append([o.param_groups[0]["lr"] for o in optimizers.optimizers]))
    schedule.attach(engine)
    engine.run(range(5), max_epochs=4)  # 20 iterations, warm-up over the first 5
    assert all(len(set(lrs)) == 1 for lrs in seen)  # every network gets the same lr
    first = [lrs[0] for lrs in seen]
    assert first[0] == pytest.approx(0.001)  # warm-up starts at 0.1 * lr
    assert max(first) == pytest.approx(0.01, rel=0.02)
    assert first[-1] == pytest.approx(0.0, abs=1e-9)  # cosine ends at min_lr_ratio * lr
    assert all(a <= b + 1e-12 for a, b in zip(first[:4], first[1:5]))  # rising during the warm-up
    assert all(a >= b - 1e-12 for a, b in zip(first[5:-1], first[6:]))  # falling afterwards
    # The value depends only on the iteration: a resumed run continues on the same curve.
    engine.state.iteration = 11
    assert schedule.current_lr(engine) == pytest.approx(first[10])


def test_balanced_sampler_draws_both_classes_equally():
    dataset = types.SimpleNamespace(labels=torch.tensor([1] * 10 + [0] * 90))
    assert slice_sampler(dataset, balanced=False) is None
    sampler = slice_sampler(dataset, balanced=True, seed=3)
    drawn = torch.tensor(list(sampler))
    assert len(drawn) == 100
    positives = float(dataset.labels[drawn].float().mean())
    assert 0.35 < positives < 0.65  # 10 % of the slices, about half of the draws
    assert torch.equal(drawn, torch.tensor(list(slice_sampler(dataset, balanced=True, seed=3))))


def test_max_slices_per_epoch_draws_a_fresh_subset_without_repeats():
    dataset = types.SimpleNamespace(labels=torch.tensor([1] * 30 + [0] * 70))
    sampler = slice_sampler(dataset, balanced=False, seed=5, max_slices_per_epoch=40)
    epoch_1, epoch_2 = list(sampler), list(sampler)
    assert len(epoch_1) == len(epoch_2) == 40
    assert len(set(epoch_1)) == 40  # no slice twice within an epoch
    assert set(epoch_1) != set(epoch_2)  # every epoch sees another subset
    again = slice_sampler(dataset, balanced=False, seed=5, max_slices_per_epoch=40)
    assert list(again) == epoch_1  # reproducible by seed
    assert len(list(slice_sampler(dataset, balanced=True, seed=5, max_slices_per_epoch=40))) == 40
    assert slice_sampler(dataset, balanced=False, max_slices_per_epoch=400) is None  # a cap: one pass
    assert len(list(slice_sampler(dataset, balanced=True, max_slices_per_epoch=400))) == 100
    with pytest.raises(ValueError, match="max_slices_per_epoch"):
        slice_sampler(dataset, balanced=False, max_slices_per_epoch=0)


def test_train_config_wires_the_epoch_length_into_the_loader():
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config("configs/train.yaml")
    parser["train#dataset"] = torch.utils.data.TensorDataset(torch.arange(100))
    parser["train#dataset"].labels = torch.tensor([0, 1] * 50)
    parser["train#dataset"].heights = torch.linspace(0, 1, 100)
    parser["max_slices_per_epoch"] = 24
    loader = parser.get_parsed_content("train#dataloader")  # the default: height-balanced draws
    assert isinstance(loader.sampler, torch.utils.data.WeightedRandomSampler)
    assert len(list(loader.sampler)) == 24 and len(loader) == 2  # batch 16: 24 slices = 2 steps
    parser["height_bins"] = 0
    parser.parse()
    loader = parser.get_parsed_content("train#dataloader")
    assert isinstance(loader.sampler, torch.utils.data.RandomSampler) and len(loader.sampler) == 24
    parser["max_slices_per_epoch"] = None  # the paper: the DataLoader shuffles every slice
    parser.parse()
    loader = parser.get_parsed_content("train#dataloader")
    assert isinstance(loader.sampler, torch.utils.data.RandomSampler) and len(loader.sampler) == 100


def test_height_balanced_draws_make_the_label_independent_of_the_slice_height():
    heights = torch.linspace(0, 1, 20000)
    labels = ((heights > 0.4) & (heights < 0.75)).long()  # the shortcut: mid-brain = tumour
    labels[::10] = 1 - labels[::10]  # a few exceptions, so most bands hold both classes
    dataset = types.SimpleNamespace(labels=labels, heights=heights)
    sampler = slice_sampler(dataset, balanced=False, seed=1, height_bins=4)
    drawn = torch.tensor(list(sampler))
    band = (heights[drawn] * 4).long().clamp(max=3)
    for b in range(4):
        in_band = band == b
        assert abs(in_band.float().mean().item() - 0.25) < 0.03  # every band keeps its share
        assert abs(labels[drawn][in_band].float().mean().item() - 0.5) < 0.05  # half tumour in each
    with pytest.raises(ValueError, match="height_bins"):
        slice_sampler(dataset, balanced=False, height_bins=1)
