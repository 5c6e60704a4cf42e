"""Tests of the data layer (scripts/data/: subjects, datalist, volumes, slices) on tiny volumes written by the tests themselves.

Volumes are 16 x 16 x 8 (x, y, z): brain in a box on slices 1..6, a small tumour cube on
slices 3..4, so slice labels, brain slices and orientation are known exactly.
"""

from __future__ import annotations

import gzip
import json
import os
import sys
import types
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from scripts.data import datalist as datalists, subjects, volumes
from scripts.common import MODALITIES
from scripts.data.subjects import DataError
from scripts.data.slices import SliceDataset, VolumeDataset
from scripts.data.volumes import VolumeCache

SHAPE = (16, 16, 8)
BRAIN_SLICES = [1, 2, 3, 4, 5, 6]
TUMOUR_SLICES = [3, 4]
RAS = np.eye(4)
# Raw file tokens per layout, in MODALITIES order (t1, t1c, t2, flair).
TOKENS_2019 = ("t1", "t1ce", "t2", "flair")
TOKENS_2023 = ("t1n", "t1c", "t2w", "t2f")


# --------------------------------------------------------------------------- helpers


def phantom_arrays(seed: int = 0, tumour: bool = True, tumour_labels=(1, 2, 4)):
    """Four modality volumes (distinct intensities) and a label map with labels 1, 2, 4 (or 3)."""
    rng = np.random.default_rng(seed)
    brain = np.zeros(SHAPE, bool)
    brain[3:13, 2:14, BRAIN_SLICES[0]:BRAIN_SLICES[-1] + 1] = True
    seg = np.zeros(SHAPE, np.uint8)
    if tumour:
        seg[6:9, 6:9, 3] = tumour_labels[0]
        seg[6:8, 6:8, 4] = tumour_labels[1]
        seg[7, 7, 4] = tumour_labels[2]
    images = []
    for index in range(4):
        volume = (100.0 * (index + 1) + 10 * rng.standard_normal(SHAPE)) * brain
        volume[seg > 0] += 50.0 * (index + 1)
        images.append(volume.astype(np.float32))
    return images, seg


def save_nifti(path: Path, array: np.ndarray, affine=RAS) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, affine), str(path))
    return path


def save_itk(path: Path, array: np.ndarray, affine=RAS) -> Path:
    from monai.data import ITKWriter

    path.parent.mkdir(parents=True, exist_ok=True)
    writer = ITKWriter(output_dtype=array.dtype)
    writer.set_data_array(array, channel_dim=None)
    writer.set_metadata({"affine": affine, "original_affine": affine}, resample=False)
    writer.write(str(path))
    return path


def write_subject(folder: Path, tokens=TOKENS_2019, sep="_", ext=".nii.gz", seed=0, affine=RAS, seg=True,
                  skip=(), tumour=True, transform=lambda a: a) -> Path:
    """One subject folder <id>/<id><sep><token><ext>; `transform` reorders voxels (orientation tests)."""
    images, label = phantom_arrays(seed, tumour, (1, 2, 3) if tokens == TOKENS_2023 else (1, 2, 4))
    save = save_nifti if ext.startswith(".nii") else save_itk
    subject = folder.name
    for token, image in zip(tokens, images):
        if token not in skip:
            save(folder / f"{subject}{sep}{token}{ext}", np.ascontiguousarray(transform(image)), affine)
    if seg:
        save(folder / f"{subject}{sep}seg{ext}", np.ascontiguousarray(transform(label)), affine)
    return folder


def write_brats2019(root: Path, n_hgg: int, n_lgg: int, tumour=True) -> Path:
    index = 0
    for grade, count in (("HGG", n_hgg), ("LGG", n_lgg)):
        for _ in range(count):
            write_subject(root / grade / f"Case_{grade}_{index:03d}", seed=index, tumour=tumour)
            index += 1
    return root


def write_msd(root: Path, n: int, channels: int = 4) -> Path:
    for index in range(n):
        images, seg = phantom_arrays(index, tumour_labels=(1, 2, 3))
        order = [3, 0, 1, 2]  # MSD channel order: FLAIR, T1w, t1gd, T2w
        stacked = np.stack([images[i] for i in order][:channels], axis=-1)
        save_nifti(root / "imagesTr" / f"BRATS_{index:03d}.nii.gz", stacked)
        save_nifti(root / "labelsTr" / f"BRATS_{index:03d}.nii.gz", seg)
    (root / "imagesTr" / "._BRATS_000.nii.gz").write_bytes(b"macOS resource fork")  # as in the real tarball
    meta = {"name": "BRATS", "modality": {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"},
            "training": [{"image": f"./imagesTr/BRATS_{i:03d}.nii.gz", "label": f"./labelsTr/BRATS_{i:03d}.nii.gz"}
                         for i in range(n)], "test": []}
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


def expected_image(seed: int = 0) -> np.ndarray:
    """Unnormalised cache content of a RAS subject: (4, X, Y, Z) in MODALITIES order."""
    return np.stack(phantom_arrays(seed)[0])


@pytest.fixture
def brats(tmp_path):
    return write_brats2019(tmp_path / "brats", 4, 2)


# --------------------------------------------------------------------------- discovery


def test_discover_brats2019_grades_and_modalities(brats):
    records = subjects.discover_subjects(brats)
    assert [r["subject"] for r in records] == [f"Case_HGG_{i:03d}" for i in range(4)] + ["Case_LGG_004", "Case_LGG_005"]
    assert [r["grade"] for r in records] == ["HGG"] * 4 + ["LGG"] * 2
    first = records[0]
    assert list(first["images"]) == list(MODALITIES)
    assert first["images"]["t1c"].endswith("Case_HGG_000_t1ce.nii.gz")
    assert first["seg"].endswith("Case_HGG_000_seg.nii.gz")
    assert first["layout"] == "brats2018-2021"


def test_discover_brats2020_flat_and_2023(tmp_path):
    write_subject(tmp_path / "flat" / "BraTS20_Training_001")
    write_subject(tmp_path / "new" / "BraTS-GLI-00000-000", tokens=TOKENS_2023, sep="-")
    (flat,) = subjects.discover_subjects(tmp_path / "flat")
    (new,) = subjects.discover_subjects(tmp_path / "new")
    assert flat["grade"] is None and new["grade"] is None
    assert new["subject"] == "BraTS-GLI-00000-000" and new["layout"] == "brats2023"
    assert new["images"]["flair"].endswith("-t2f.nii.gz") and new["images"]["t1"].endswith("-t1n.nii.gz")
    written = datalists.write_datalist(tmp_path / "new", tmp_path / "new.json", split=(1, 0, 0))
    assert written["enhancing_label"] == 3
    # Whole tumour = label > 0 whatever the enhancing label is (here 3).
    cached = VolumeCache(tmp_path / "cache").get(new)
    assert cached["mask"].sum() == (phantom_arrays(0)[1] > 0).sum()


def test_discover_single_subject_folder_without_seg(tmp_path):
    folder = write_subject(tmp_path / "HGG" / "Solo", seg=False)
    (record,) = subjects.discover_subjects(folder)
    assert record["subject"] == "Solo" and record["seg"] is None and record["grade"] == "HGG"
    cached = VolumeCache(tmp_path / "cache").get(record)
    assert not cached["has_mask"] and cached["mask"].sum() == 0
    with pytest.raises(DataError, match="Solo"):
        SliceDataset([record], VolumeCache(tmp_path / "cache"))


def test_discover_msd_task01(tmp_path):
    root = write_msd(tmp_path / "Task01_BrainTumour", 3)
    records = subjects.discover_subjects(root)
    assert [r["subject"] for r in records] == ["BRATS_000", "BRATS_001", "BRATS_002"]  # '._' file skipped
    assert records[0]["channels"] == ["flair", "t1", "t1c", "t2"] and records[0]["layout"] == "msd"
    cached = VolumeCache(tmp_path / "cache", normalization="none").get(records[0])
    np.testing.assert_allclose(cached["image"].numpy(), expected_image(0))  # channels back in MODALITIES order
    # MSD's own dataset.json is a decathlon datalist and is read too.
    from_json = subjects.discover_subjects(root / "dataset.json")
    assert [r["image4d"] for r in from_json] == [r["image4d"] for r in records]
    assert from_json[0]["channels"] == ["flair", "t1", "t1c", "t2"]


def test_itk_formats_match_nifti(tmp_path):
    nifti = write_subject(tmp_path / "a" / "Nii")
    nrrd = write_subject(tmp_path / "b" / "Nrrd", ext=".nrrd")
    mha = write_subject(tmp_path / "c" / "Mha", ext=".mha")
    cache = VolumeCache(tmp_path / "cache", normalization="none")
    reference = cache.get(subjects.discover_subjects(nifti)[0])
    for folder in (nrrd, mha):
        (record,) = subjects.discover_subjects(folder)
        cached = cache.get(record)
        torch.testing.assert_close(cached["image"], reference["image"])
        torch.testing.assert_close(cached["mask"], reference["mask"])


def test_modality_names_are_canonical(tmp_path):
    folder = tmp_path / "Odd"
    images, seg = phantom_arrays()
    for token, image in zip(("T1w", "T1Gd", "T2W", "FLAIR"), images):
        save_nifti(folder / f"Odd_{token}.nii.gz", image)
    (record,) = subjects.discover_subjects(folder)
    assert sorted(record["images"]) == sorted(MODALITIES)
    assert record["images"]["t1c"].endswith("Odd_T1Gd.nii.gz")


# --------------------------------------------------------------------------- datalists


@pytest.mark.parametrize("n, split, expected", [
    (335, subjects.PAPER_SPLIT, (271, 32, 32)),
    (10, subjects.PAPER_SPLIT, (8, 1, 1)),
    (3, subjects.PAPER_SPLIT, (1, 1, 1)),
    (20, (0.5, 0.25, 0.25), (10, 5, 5)),
    (20, (12, 4, 4), (12, 4, 4)),
    (5, (1, 0, 0), (5, 0, 0)),
])
def test_split_counts(n, split, expected):
    assert datalists.split_counts(n, split) == expected


def test_write_datalist_stratified_deterministic_and_readable(tmp_path):
    root = tmp_path / "data"
    records = [{"subject": f"S{i:02d}", "grade": "HGG" if i < 20 else "LGG", "images": {m: str(root / f"S{i:02d}_{m}.nii.gz")
                for m in MODALITIES}, "seg": str(root / f"S{i:02d}_seg.nii.gz"), "layout": "brats2018-2021"} for i in range(30)]
    out = tmp_path / "lists" / "datalist.json"
    first = datalists.write_datalist(records, out, split=(0.8, 0.1, 0.1), seed=3)
    assert [len(first[s]) for s in subjects.SECTIONS] == [24, 3, 3]
    for section in subjects.SECTIONS:  # grade mix kept: 2/3 HGG in every section
        grades = [e["grade"] for e in first[section]]
        assert grades.count("HGG") == 2 * len(grades) // 3
    assert sorted(e["subject"] for s in subjects.SECTIONS for e in first[s]) == [r["subject"] for r in records]
    again = datalists.write_datalist(records, tmp_path / "lists" / "again.json", split=(0.8, 0.1, 0.1), seed=3)
    assert all(again[s] == first[s] for s in subjects.SECTIONS)
    other = datalists.write_datalist(records, tmp_path / "lists" / "other.json", split=(0.8, 0.1, 0.1), seed=4)
    assert other["validation"] != first["validation"]
    entry = json.loads(out.read_text())["training"][0]
    assert entry["t1c"] == f"../data/{entry['subject']}_t1c.nii.gz" and entry["seg"].startswith("../data/")
    loaded = subjects.load_datalist(out, "training")
    assert loaded[0]["images"]["t1c"] == str(root / f"{entry['subject']}_t1c.nii.gz")


def test_datalist_round_trip_through_monai_loader(brats, tmp_path):
    from monai.data import load_decathlon_datalist

    out = brats / "datalist.json"
    datalists.write_datalist(brats, out)
    monai_entries = load_decathlon_datalist(str(out), data_list_key="training")
    assert monai_entries and all(os.path.isfile(e[m]) for e in monai_entries for m in (*MODALITIES, "seg"))
    ours = subjects.discover_subjects(out)  # a datalist JSON is itself a source
    direct = subjects.discover_subjects(brats)
    assert [(r["subject"], r["grade"], r["images"], r["seg"]) for r in ours] == \
           [(r["subject"], r["grade"], r["images"], r["seg"]) for r in direct]
    # A plain decathlon list of per-modality files with channel names works too.
    plain = tmp_path / "plain.json"
    plain.write_text(json.dumps({"channels": ["t1", "t1ce", "t2", "flair"], "training": [
        {"image": [direct[0]["images"][m] for m in MODALITIES], "label": direct[0]["seg"]}]}))
    (record,) = subjects.load_datalist(plain, "training")
    assert record["images"] == direct[0]["images"] and record["subject"] == direct[0]["subject"]


def test_cli_datalist_and_summary(brats, tmp_path, capsys):
    out = tmp_path / "cli.json"
    assert datalists.main(["datalist", "--data", str(brats), "--out", str(out), "--seed", "1", "--split", "4", "1", "1"]) == 0
    assert [len(json.loads(out.read_text())[s]) for s in subjects.SECTIONS] == [4, 1, 1]
    capsys.readouterr()
    assert datalists.main(["summary", "--datalist", str(out), "--cache-dir", str(tmp_path / "cache")]) == 0
    printed = capsys.readouterr().out
    assert "training" in printed and "testing" in printed
    summary = datalists.summarize_datalist(out, VolumeCache(tmp_path / "cache"))
    assert summary["training"]["slices"] == 4 * len(BRAIN_SLICES)
    assert summary["training"]["positive_fraction"] == pytest.approx(len(TUMOUR_SLICES) / len(BRAIN_SLICES))
    assert datalists.main(["datalist", "--data", str(tmp_path / "nowhere"), "--out", str(out)]) == 2


def test_ensure_dataset_generates_phantom_once(tmp_path, monkeypatch):
    calls = []

    def fake_generate(out_dir, subjects, seed, spacing=1.0, hgg_fraction=0.5, misregistration_mm=0.0,
                      misregistration_deg=0.0, **texture):
        calls.append((subjects, seed, spacing, hgg_fraction, misregistration_mm, misregistration_deg, texture))
        n_hgg = round(subjects * hgg_fraction)
        write_brats2019(Path(out_dir), n_hgg, subjects - n_hgg)
        return []

    monkeypatch.setitem(sys.modules, "scripts.data.phantom", types.SimpleNamespace(generate_dataset=fake_generate))
    target = tmp_path / "phantom"
    path = datalists.ensure_dataset(target, phantom={"subjects": 4, "seed": 7}, split=(2, 1, 1))
    assert path == str(target / "datalist.json") and calls == [(4, 7, 1.0, 0.5, 0.0, 0.0, {})]
    assert [len(json.loads(Path(path).read_text())[s]) for s in subjects.SECTIONS] == [2, 1, 1]
    assert datalists.ensure_dataset(target, phantom={"subjects": 4}) == path and len(calls) == 1
    coarse = {"tumour_texture_mm": [10.0, 20.0], "tumour_texture_weights": [0.5, 1.0]}  # the phantom option, passed on
    datalists.ensure_dataset(tmp_path / "coarse", phantom={"subjects": 4, **coarse}, split=(2, 1, 1))
    assert calls[-1] == (4, 0, 1.0, 0.5, 0.0, 0.0, coarse)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["coarse", "phantom"]  # no staging folder left behind


def test_ensure_dataset_on_real_data_and_failed_generation(brats, tmp_path, monkeypatch):
    def failing_generate(*args, **kwargs):
        Path(args[0], "half_written.nii.gz").write_bytes(b"x")
        raise RuntimeError("disk full")

    monkeypatch.setitem(sys.modules, "scripts.data.phantom", types.SimpleNamespace(generate_dataset=failing_generate))
    listing = tmp_path / "lists" / "brats.json"
    assert datalists.ensure_dataset(brats, datalist=listing) == str(listing)  # real data: no phantom call
    assert listing.is_file()
    with pytest.raises(RuntimeError, match="disk full"):
        datalists.ensure_dataset(tmp_path / "empty")
    assert not (tmp_path / "empty").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".empty")]


# --------------------------------------------------------------------------- cache


def test_cache_content_and_normalisation(brats, tmp_path):
    record = subjects.discover_subjects(brats)[0]
    cached = VolumeCache(tmp_path / "cache", spatial_size=(20, 12)).get(record)
    image, mask = cached["image"], cached["mask"]
    assert image.shape == (4, 20, 12, 8) and image.dtype == torch.float32
    assert mask.shape == (1, 20, 12, 8) and mask.dtype == torch.uint8
    assert cached["brain"].tolist() == [z in BRAIN_SLICES for z in range(8)]
    assert cached["spacing"].tolist() == [1.0, 1.0, 1.0] and cached["subject"] == record["subject"]
    brain = image[0] != 0
    for channel in image:  # z-score over brain voxels, background stays 0
        assert float(channel[brain].mean()) == pytest.approx(0.0, abs=1e-4)
        assert float(channel[brain].std(unbiased=False)) == pytest.approx(1.0, abs=1e-3)
        assert float(channel[~brain].abs().max()) == 0.0
    assert [int(mask[..., z].sum() > 0) for z in range(8)] == [int(z in TUMOUR_SLICES) for z in range(8)]
    # 16 -> 20 pads 2 on each side, 16 -> 12 crops 2 on each side: the tumour moves accordingly.
    assert mask[0, 8:11, 4:7, 3].all() and mask.sum() == (phantom_arrays(0)[1] > 0).sum()


def test_robust_normalisation_clips_brain_outliers_before_the_zscore():
    """normalization "robust": a few extreme brain voxels (a vessel, skull residue) no longer
    compress everyone else's z-score; the background stays 0; a brain without outliers is
    normalised almost exactly as "volume" does."""
    from monai.data import MetaTensor

    from scripts.data.preprocessing import ClipBrainPercentilesd, volume_preprocessing

    generator = torch.Generator().manual_seed(0)
    brain = torch.zeros(1, 40, 40, 20, dtype=torch.bool)
    brain[:, 5:35, 5:35, 2:18] = True
    clean = torch.where(brain, 100 + 10 * torch.randn(brain.shape, generator=generator), torch.zeros(()))
    spiked = clean.clone()
    spiked[0, 10, 10, 5:10] = 1e5  # 5 of 14,400 brain voxels
    normalised = {}
    for kind in ("volume", "robust"):
        prep = volume_preprocessing(None, None, kind)
        for name, image in (("clean", clean), ("spiked", spiked)):
            normalised[kind, name] = prep({"image": MetaTensor(image.clone())})["image"]
    inner = brain.clone()
    inner[0, 10, 10, 5:10] = False
    # "volume": the spikes inflate the brain's std ~40x, so the bulk collapses towards 0.
    assert float(normalised["volume", "spiked"][inner].std()) < 0.1
    # "robust": the bulk keeps its z-scores (the spikes are clipped to the 99.5th percentile).
    torch.testing.assert_close(normalised["robust", "spiked"][inner], normalised["robust", "clean"][inner],
                               atol=0.05, rtol=0)
    assert float(normalised["robust", "spiked"].max()) < 4.0
    assert float(normalised["robust", "clean"][~brain].abs().max()) == 0.0
    bulk = brain & (normalised["volume", "clean"].abs() < 2.3)  # inside the clipped range (+-2.58 sd)
    torch.testing.assert_close(normalised["robust", "clean"][bulk], normalised["volume", "clean"][bulk],
                               atol=0.05, rtol=0)
    # an empty (missing) channel is left alone; the percentiles are checked
    empty = ClipBrainPercentilesd(keys="image")({"image": torch.zeros(2, 4, 4, 4)})["image"]
    assert float(empty.abs().max()) == 0.0
    with pytest.raises(ValueError, match="percentiles"):
        ClipBrainPercentilesd(keys="image", lower=99, upper=1)


def test_cache_reused_from_disk_and_invalidated_on_change(brats, tmp_path, monkeypatch):
    record = subjects.discover_subjects(brats)[0]
    cache = VolumeCache(tmp_path / "cache", normalization="none")
    first = cache.get(record)["image"].clone()
    cache.get(record)
    assert (cache.builds, cache.disk_loads) == (1, 1)  # second get served from memory
    files = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert len(files) == 3 and not [f for f in files if ".tmp" in f]

    def no_reading(*args, **kwargs):
        raise AssertionError("source re-read although cached")

    monkeypatch.setattr(volumes, "preprocess_subject", no_reading)
    fresh = VolumeCache(tmp_path / "cache", normalization="none")
    torch.testing.assert_close(fresh.get(record)["image"], first)
    assert (fresh.builds, fresh.disk_loads) == (0, 1)
    monkeypatch.undo()

    changed = expected_image(0)[0] * 2  # edit the t1 file: new size/mtime -> new key -> rebuilt
    save_nifti(Path(record["images"]["t1"]), changed)
    os.utime(record["images"]["t1"], ns=(0, 10**9))
    rebuilt = VolumeCache(tmp_path / "cache", normalization="none")
    np.testing.assert_allclose(rebuilt.get(record)["image"][0].numpy(), changed)
    assert rebuilt.builds == 1


def test_orientation_non_ras_matches_ras(tmp_path):
    ras = write_subject(tmp_path / "ras" / "Ras")
    # Same world content stored flipped in x and y (LPS) and with axes reversed (z, y, x).
    lps_affine = np.array([[-1, 0, 0, 15], [0, -1, 0, 15], [0, 0, 1, 0], [0, 0, 0, 1.0]])
    lps = write_subject(tmp_path / "lps" / "Lps", affine=lps_affine, transform=lambda a: a[::-1, ::-1, :])
    zyx_affine = np.array([[0, 0, 1, 0], [0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1.0]])
    zyx = write_subject(tmp_path / "zyx" / "Zyx", affine=zyx_affine, transform=lambda a: a.transpose(2, 1, 0))
    cache = VolumeCache(tmp_path / "cache", spatial_size=(16, 16), normalization="none")
    reference = cache.get(subjects.discover_subjects(ras)[0])
    np.testing.assert_allclose(reference["image"].numpy(), expected_image(0))
    for folder in (lps, zyx):
        other = cache.get(subjects.discover_subjects(folder)[0])
        torch.testing.assert_close(other["image"], reference["image"])
        torch.testing.assert_close(other["mask"], reference["mask"])


# --------------------------------------------------------------------------- datasets


def test_slice_dataset_labels_subset_and_order(brats, tmp_path):
    records = subjects.discover_subjects(brats)[:2]
    cache = VolumeCache(tmp_path / "cache", spatial_size=(16, 16))
    slices = SliceDataset(records, cache, modalities=["flair", "T1ce"])
    assert len(slices) == 2 * len(BRAIN_SLICES)
    assert [z for _, z in slices.index] == BRAIN_SLICES * 2
    assert slices.labels.tolist() == [int(z in TUMOUR_SLICES) for z in BRAIN_SLICES] * 2
    assert slices.positive_fraction == pytest.approx(2 / 6)
    low, high = BRAIN_SLICES[0], BRAIN_SLICES[-1]  # height within the brain's axial extent
    assert slices.heights.tolist() == pytest.approx([(z - low) / (high - low) for z in BRAIN_SLICES] * 2)
    item = slices[2]  # third brain slice: z = 3, the 3 x 3 tumour slice
    assert item["image"].shape == (2, 16, 16) and item["image"].dtype == torch.float32
    assert item["label"].dtype == torch.int64 and item["label"].ndim == 0 and int(item["label"]) == 1
    assert item["mask"].shape == (1, 16, 16) and item["mask"].dtype == torch.float32 and item["mask"].sum() == 9
    assert item["subject"] == records[0]["subject"] and item["z"] == 3
    volume = cache.get(records[0])["image"]
    torch.testing.assert_close(item["image"], volume[[3, 1], :, :, item["z"]])  # flair, t1c order
    batch = next(iter(torch.utils.data.DataLoader(slices, batch_size=4)))
    assert batch["image"].shape == (4, 2, 16, 16) and batch["label"].shape == (4,)
    # A threshold above the brain fraction of every slice keeps none.
    with pytest.raises(DataError, match="brain_threshold"):
        SliceDataset(records, cache, brain_threshold=0.99)


def test_slice_zscore_switch(brats, tmp_path):
    records = subjects.discover_subjects(brats)[:1]
    cache = VolumeCache(tmp_path / "cache")
    plain = SliceDataset(records, cache, slice_normalization="none")[2]["image"]
    scored = SliceDataset(records, cache, slice_normalization="zscore")[2]["image"]
    assert not torch.allclose(plain, scored)
    for channel in scored:  # whole slice, background included
        assert float(channel.mean()) == pytest.approx(0.0, abs=1e-5)
        assert float(channel.std(unbiased=False)) == pytest.approx(1.0, abs=1e-4)
    expected = (plain - plain.mean(dim=(1, 2), keepdim=True)) / plain.std(dim=(1, 2), unbiased=False, keepdim=True)
    torch.testing.assert_close(scored, expected, atol=1e-5, rtol=1e-4)


def test_volume_dataset(brats, tmp_path):
    records = subjects.discover_subjects(brats)[:2]
    volumes = VolumeDataset(records, VolumeCache(tmp_path / "cache"), modalities=["t2"])
    item = volumes[1]
    assert len(volumes) == 2 and item["image"].shape == (1, 16, 16, 8) and item["mask"].shape == (1, 16, 16, 8)
    assert item["subject"] == records[1]["subject"] and item["spacing"].shape == (3,)
    assert item["mask"].dtype == torch.float32 and item["brain"].sum() == len(BRAIN_SLICES)


def test_allow_missing_zero_fills(tmp_path):
    folder = write_subject(tmp_path / "Partial", skip=("t2",))
    (record,) = subjects.discover_subjects(folder, allow_missing=True)
    cached = VolumeCache(tmp_path / "cache", allow_missing=True).get(record)
    assert cached["present"] == ["t1", "t1c", "flair"] and float(cached["image"][2].abs().max()) == 0.0
    for strict in (VolumeCache(tmp_path / "strict"), VolumeCache(tmp_path / "cache")):  # fresh or zero-filled cache
        with pytest.raises(DataError, match="Partial"):
            strict.get(record)


# --------------------------------------------------------------------------- bad input


def assert_names(error: pytest.ExceptionInfo, *parts: str) -> None:
    message = str(error.value)
    for part in parts:
        assert str(part) in message, f"{part!r} not in: {message}"
    assert "Fix" in message


def test_missing_modality_file(tmp_path):
    folder = write_subject(tmp_path / "data" / "Gap", skip=("t1ce",))
    with pytest.raises(DataError) as error:
        subjects.discover_subjects(tmp_path / "data")
    assert_names(error, "Gap", folder / "Gap_t1ce.nii.gz")
    # A file that vanished after the datalist was written.
    write_subject(tmp_path / "ok" / "Gone")
    (record,) = subjects.discover_subjects(tmp_path / "ok")
    os.remove(record["images"]["t2"])
    with pytest.raises(DataError) as error:
        VolumeCache(tmp_path / "cache").get(record)
    assert_names(error, "Gone", record["images"]["t2"], "does not exist")


def test_shape_mismatch(tmp_path):
    folder = write_subject(tmp_path / "Wide")
    save_nifti(folder / "Wide_t2.nii.gz", np.ones((16, 16, 9), np.float32))
    (record,) = subjects.discover_subjects(folder)
    with pytest.raises(DataError) as error:
        VolumeCache(tmp_path / "cache").get(record)
    assert_names(error, "Wide", folder / "Wide_t2.nii.gz", "(16, 16, 9)")


def test_affine_mismatch_and_tolerance(tmp_path):
    folder = write_subject(tmp_path / "Shifted")
    images, _ = phantom_arrays()
    nearly = RAS.copy()
    nearly[0, 3] = 5e-4  # within tolerance: accepted
    save_nifti(folder / "Shifted_flair.nii.gz", images[3], nearly)
    (record,) = subjects.discover_subjects(folder)
    VolumeCache(tmp_path / "cache").get(record)
    shifted = RAS.copy()
    shifted[0, 3] = 2.0
    save_nifti(folder / "Shifted_seg.nii.gz", phantom_arrays()[1], shifted)
    with pytest.raises(DataError) as error:
        VolumeCache(tmp_path / "cache").get(record)
    assert_names(error, "Shifted", folder / "Shifted_seg.nii.gz", "affine")


def test_truncated_file_leaves_cache_clean(tmp_path):
    folder = write_subject(tmp_path / "Cut")
    target = folder / "Cut_flair.nii.gz"
    raw = target.read_bytes()
    target.write_bytes(raw[: len(raw) // 2])
    (record,) = subjects.discover_subjects(folder)
    cache_dir = tmp_path / "cache"
    with pytest.raises(DataError) as error:
        VolumeCache(cache_dir).get(record)
    assert_names(error, "Cut", target, "truncated")
    assert not cache_dir.exists() or not list(cache_dir.iterdir())
    target.write_bytes(b"not an image at all")  # unreadable from the first byte
    with pytest.raises(DataError) as error:
        VolumeCache(cache_dir).get(record)
    assert_names(error, "Cut", target)


def test_truncated_itk_file(tmp_path):
    folder = write_subject(tmp_path / "CutMha", ext=".mha")
    target = folder / "CutMha_t1.mha"
    target.write_bytes(target.read_bytes()[:600])
    (record,) = subjects.discover_subjects(folder)
    with pytest.raises(DataError) as error:
        VolumeCache(tmp_path / "cache").get(record)
    assert_names(error, "CutMha", target)


def test_non_finite_voxels(tmp_path):
    folder = write_subject(tmp_path / "Nan")
    images, _ = phantom_arrays()
    images[1][5, 5, 5] = np.nan
    images[1][6, 5, 5] = np.inf
    save_nifti(folder / "Nan_t1ce.nii.gz", images[1])
    (record,) = subjects.discover_subjects(folder)
    with pytest.raises(DataError) as error:
        VolumeCache(tmp_path / "cache").get(record)
    assert_names(error, "Nan", folder / "Nan_t1ce.nii.gz", "2 NaN/inf")


def test_4d_with_wrong_channel_count(tmp_path):
    root = write_msd(tmp_path / "Task01", 1, channels=3)
    (record,) = subjects.discover_subjects(root)
    with pytest.raises(DataError) as error:
        VolumeCache(tmp_path / "cache").get(record)
    assert_names(error, "BRATS_000", record["image4d"], "3 channels")


def test_empty_dataset_lists_layouts(tmp_path):
    (tmp_path / "empty" / "HGG").mkdir(parents=True)
    (tmp_path / "empty" / "notes.txt").write_text("nothing here")
    with pytest.raises(DataError) as error:
        subjects.discover_subjects(tmp_path / "empty")
    message = str(error.value)
    assert str(tmp_path / "empty") in message and "BraTS 2023" in message and "MSD" in message and ".json" in message


def test_split_without_positive_slices(tmp_path):
    root = write_brats2019(tmp_path / "healthy", 2, 0, tumour=False)
    records = subjects.discover_subjects(root)
    with pytest.raises(DataError) as error:
        SliceDataset(records, VolumeCache(tmp_path / "cache"))
    assert_names(error, records[0]["subject"], records[0]["seg"], "positive")
    assert len(SliceDataset(records, VolumeCache(tmp_path / "cache"), require_positive=False)) == 2 * len(BRAIN_SLICES)


def test_failed_rewrite_keeps_existing_datalist(brats, tmp_path):
    out = tmp_path / "keep.json"
    datalists.write_datalist(brats, out)
    before = out.read_bytes()
    os.remove(brats / "HGG" / "Case_HGG_001" / "Case_HGG_001_t2.nii.gz")
    with pytest.raises(DataError, match="Case_HGG_001"):
        datalists.write_datalist(brats, out)
    assert out.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".keep")) == []


def test_corrupt_cache_file_is_rebuilt(brats, tmp_path):
    record = subjects.discover_subjects(brats)[0]
    cache = VolumeCache(tmp_path / "cache")
    good = cache.get(record)["image"].clone()
    image_file = next((tmp_path / "cache").glob("*.image.npy"))
    image_file.write_bytes(gzip.compress(b"garbage"))
    again = VolumeCache(tmp_path / "cache")
    torch.testing.assert_close(again.get(record)["image"], good)
    assert again.builds == 1
