"""Domain randomisation of training batches (scripts/data/randomisation.py)."""

from pathlib import Path

import pytest
import torch
from monai.bundle import ConfigParser
from torch.utils.data import default_collate

from scripts.data.randomisation import BatchRandomiser

ROOT = Path(__file__).resolve().parents[2]


def _items(count=8, tumour_at=(35, 45), radius=30):
    yy, xx = torch.meshgrid(torch.arange(80), torch.arange(80), indexing="ij")
    brain = ((yy - 40) ** 2 + (xx - 40) ** 2) < radius ** 2
    generator = torch.Generator().manual_seed(0)
    items = []
    for i in range(count):
        image = torch.zeros(4, 80, 80)
        image[:, brain] = torch.randn((4, int(brain.sum())), generator=generator) + torch.arange(4.0)[:, None]
        mask = torch.zeros(1, 80, 80)
        if i % 2:
            mask[0, tumour_at[0]:tumour_at[1], tumour_at[0]:tumour_at[1]] = 1
        items.append({"image": image, "mask": mask, "label": torch.tensor(i % 2), "subject": f"s{i}", "z": i})
    return items, brain


def _brain_moments(image, brain):
    values = image[:, :, brain]
    return values.mean(-1), values.std(-1, unbiased=False)


def test_disabled_is_plain_collation():
    items, _ = _items()
    batch, plain = BatchRandomiser(enabled=False)(items), default_collate(items)
    assert torch.equal(batch["image"], plain["image"]) and torch.equal(batch["label"], plain["label"])


def test_intensities_change_but_brain_moments_and_background_stay():
    items, brain = _items()
    before = default_collate(items)
    after = BatchRandomiser(anatomy_prob=0.0, contrast_prob=1.0, bias_prob=1.0, noise_prob=1.0).randomise(before, 3)
    assert torch.isfinite(after["image"]).all()
    assert (after["image"][:, :, ~brain] == 0).all(), "the background stays exactly 0 (what 'brain' means)"
    mean0, std0 = _brain_moments(before["image"], brain)
    mean1, std1 = _brain_moments(after["image"], brain)
    assert torch.allclose(mean0, mean1, atol=1e-4) and torch.allclose(std0, std1, atol=1e-4)
    assert (after["image"] - before["image"]).abs().amax() > 0.1, "the intensities were not randomised"
    assert torch.equal(after["label"], before["label"]), "no movement: the labels stand"


def test_label_is_recomputed_from_the_moved_mask():
    # a tumour in a corner of a brain that fills the slice: a zoom in pushes it out of view
    items, _ = _items(count=16, tumour_at=(0, 3), radius=200)
    randomiser = BatchRandomiser(anatomy_prob=1.0, scale=0.4, rotate_deg=30.0)
    dropped = 0
    for seed in range(4):
        batch = randomiser.randomise(default_collate(items), seed)
        assert torch.equal(batch["label"], batch["mask"].flatten(1).any(1).long())
        dropped += int((default_collate(items)["label"] - batch["label"]).sum())
    assert dropped > 0, "some tumour should have left the field and its slice become healthy"


def test_tumour_only_inside_the_brain_and_draws_repeat_with_the_seed():
    items, _ = _items()
    randomiser = BatchRandomiser(anatomy_prob=1.0)
    first, again = randomiser.randomise(default_collate(items), 7), randomiser.randomise(default_collate(items), 7)
    other = randomiser.randomise(default_collate(items), 8)
    assert torch.equal(first["image"], again["image"]) and not torch.equal(first["image"], other["image"])
    brain = (first["image"] != 0).any(1, keepdim=True)
    assert (first["mask"][~brain] == 0).all()


@pytest.mark.parametrize("bad", [{"noise_prob": 1.5}, {"anatomy_prob": -0.1}, {"lowres_zoom": [0.0, 1.0]}])
def test_bad_settings_are_refused(bad):
    with pytest.raises(ValueError, match="domain_randomisation#"):
        BatchRandomiser(**bad)


def test_train_yaml_wires_it_as_the_training_collate_and_the_preset_turns_it_off():
    parser = ConfigParser()
    parser.read_config(str(ROOT / "configs/train.yaml"))
    collate = parser.get_parsed_content("train#dataloader#collate_fn")
    assert isinstance(collate, BatchRandomiser)
    assert collate.enabled == parser["domain_randomisation"]["enabled"]
    assert "domain_randomisation" in parser["train"]["checkpoint_objects"]["run_settings"]
    paper = ConfigParser()
    paper.read_config([str(ROOT / "configs/train.yaml"), str(ROOT / "configs/presets/brats2019.yaml")])
    assert paper["domain_randomisation"]["enabled"] is False


def _textured_tumour_batch():
    items, brain = _items(count=4, tumour_at=(30, 50))
    for item in items[1::2]:  # tumour slices: a bright, speckled tumour in every modality
        tumour = item["mask"][0] > 0
        item["image"][:, tumour] += 3.0 + 2.0 * torch.randn((4, int(tumour.sum())), generator=torch.Generator().manual_seed(1))
    return default_collate(items), brain


def _residual_std(image, region):
    import torch.nn.functional as F

    local = F.avg_pool2d(image, 3, stride=1, padding=1)
    return (image - local)[:, :, region].std(-1)


def test_lesion_step_redraws_only_the_tumour_and_can_smooth_its_texture():
    before, brain = _textured_tumour_batch()
    only_lesion = dict(anatomy_prob=0.0, contrast_prob=0.0, bias_prob=0.0, lowres_prob=0.0, blur_prob=0.0,
                       noise_prob=0.0, lesion_prob=1.0, lesion_contrast_log_std=0.0, lesion_texture=(0.0, 0.0))
    after = BatchRandomiser(**only_lesion).randomise(before, 5)
    tumour = before["mask"][1, 0] > 0
    core = torch.zeros_like(tumour)
    core[33:47, 33:47] = True  # away from the rim, where the feathering blends
    healthy_change = (after["image"][0::2] - before["image"][0::2]).abs().amax()
    outside = brain & ~tumour
    assert healthy_change < 1e-3, "healthy slices carry no tumour: only the brain-moment restore may touch them"
    assert torch.equal(after["label"], before["label"]) and torch.equal(after["mask"], before["mask"])
    rough, smooth = _residual_std(before["image"][1::2], core), _residual_std(after["image"][1::2], core)
    assert (smooth < 0.5 * rough).all(), f"texture factor 0 should smooth the tumour: {rough} -> {smooth}"
    # the tissue outside the tumour moves only by the brain-moment restore (a shift and scale per slice)
    diff = (after["image"][1::2] - before["image"][1::2])[:, :, outside]
    assert diff.std(-1).amax() < 0.1 * before["image"][1::2][:, :, outside].std(-1).amin()


def test_lesion_step_off_keeps_the_earlier_random_stream():
    before, _ = _textured_tumour_batch()
    plain = BatchRandomiser(lesion_prob=0.0).randomise(before, 9)
    again = BatchRandomiser().randomise(before, 9)
    assert torch.equal(plain["image"], again["image"])
    changed = BatchRandomiser(lesion_prob=1.0).randomise(before, 9)
    assert not torch.equal(plain["image"], changed["image"])


@pytest.mark.parametrize("bad", [{"lesion_prob": 2.0}, {"lesion_texture": [1.0, 0.5]},
                                 {"lesion_contrast_log_std": -1.0}])
def test_bad_lesion_settings_are_refused(bad):
    with pytest.raises(ValueError, match="domain_randomisation#"):
        BatchRandomiser(**bad)
