"""The K-network trainer and validator on tiny in-memory data (no files)."""

import pytest
import torch
from ignite.engine import Events
from monai.data import DataLoader
from monai.engines.utils import IterationEvents
from monai.handlers import StatsHandler, ValidationHandler, from_engine
from monai.utils import CommonKeys as Keys

from scripts.workflows.checkpoints import AtomicCheckpointSaver, ResumeFromCheckpoint
from scripts.method.schedules import LambdaEScheduler
from scripts.workflows.reports import ValidationReport
from scripts.model.networks import MultiModalCAM
from scripts.workflows.validation import CAMValidator
from scripts.method.trainer import CMERTrainer, ModalityOptimizers, TransformSampler, build_objective, loss_scalars

torch.set_num_threads(1)
SIZE = 16


def _slices(n=8, k=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    items = []
    for i in range(n):
        image = torch.randn(k, SIZE, SIZE, generator=g) * 0.1
        mask = torch.zeros(1, SIZE, SIZE)
        if i % 2:
            mask[:, 4:9, 5:10] = 1
            image[:, 4:9, 5:10] += 2.0
        items.append({"image": image, "label": torch.tensor(int(i % 2)), "mask": mask})
    return items


def _volumes(k=2):
    vol = torch.randn(k, SIZE, SIZE, 4) * 0.1
    mask = torch.zeros(1, SIZE, SIZE, 4)
    mask[:, 4:9, 5:10, 1:3] = 1
    vol[:, 4:9, 5:10, 1:3] += 2.0
    return [{"image": vol, "mask": mask, "brain": torch.tensor([True, True, True, False]), "subject": "v0"}]


def _build(objective_cfg=None, kinds=("flip", "rotation", "scale", "translation"), seed=0, epochs=1,
           handlers=(), kind="weak", **kwargs):
    torch.manual_seed(seed)
    network = MultiModalCAM(["t1", "t2"], base_channels=4)
    optimizers = ModalityOptimizers(network, lr=1e-3)
    loader = DataLoader(_slices(), batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(seed))
    trainer = CMERTrainer(
        device=torch.device("cpu"), max_epochs=epochs, train_data_loader=loader, network=network,
        optimizers=optimizers, objective=build_objective(kind, objective_cfg),
        transform_sampler=TransformSampler(kinds, seed=seed), train_handlers=list(handlers), **kwargs,
    )
    return trainer, network, optimizers


def test_one_iteration_logs_every_term_per_modality():
    trainer, _, _ = _build()
    trainer.run()
    out = loss_scalars(trainer.state.output)
    for name in ("t1", "t2"):
        for term in ("L_C", "L_KD", "L_ER", "L_CMER", "loss"):
            assert f"{name}/{term}" in out
    assert set(out) == {"loss", "lambda_e"} | {f"{m}/{t}" for m in ("t1", "t2")
                                               for t in ("L_C", "L_KD", "L_ER", "L_CMER", "loss")}
    assert trainer.transform_kind in {"flip", "rotation", "scale", "translation"}


def test_output_follows_monai_keys_and_is_decollated_like_supervised_trainer():
    """One dict per slice with IMAGE, LABEL, PRED and LOSS (MONAI's Workflow decollates it), no
    autograd graph kept; decollate=False leaves the one dict, which loss_scalars reads the same."""
    trainer, _, _ = _build()
    trainer.run()
    out = trainer.state.output
    assert isinstance(out, list) and len(out) == 4  # batch_size 4
    assert isinstance(trainer.state.batch, list) and len(trainer.state.batch) == 4
    for item, batch_item in zip(out, trainer.state.batch):
        assert item[Keys.IMAGE].shape == (2, SIZE, SIZE) and torch.equal(item[Keys.IMAGE], batch_item["image"])
        assert item[Keys.LABEL] == int(batch_item["label"])
        assert item[Keys.PRED].shape == (2, 2) and item[Keys.PRED].dtype == torch.float32
        assert not item[Keys.PRED].requires_grad and item[Keys.PRED].grad_fn is None
        assert isinstance(item[Keys.LOSS], float) and item[Keys.LOSS] == out[0][Keys.LOSS]
        assert isinstance(item["t1/L_CMER"], float) and item["lambda_e"] == 1.0
    assert from_engine([Keys.LOSS], first=True)(out) == out[0][Keys.LOSS]  # MONAI's stock reading

    raw, _, _ = _build(decollate=False)
    raw.run()
    one = raw.state.output
    assert isinstance(one, dict) and one[Keys.IMAGE].shape == (4, 2, SIZE, SIZE) and one[Keys.LABEL].shape == (4,)
    assert one[Keys.PRED].shape == (4, 2, 2) and one[Keys.PRED].grad_fn is None
    assert one[Keys.LOSS].ndim == 0 and one[Keys.LOSS].grad_fn is None
    assert all(v.grad_fn is None for k, v in one.items() if "/" in k)
    assert set(loss_scalars(one)) == set(loss_scalars(out))


def test_stock_stats_handler_logs_the_loss(capsys):
    """MONAI's StatsHandler as bundles configure it (from_engine(['loss'], first=True)) logs every iteration."""
    handler = StatsHandler(name="test_trainer_stats", tag_name="train_loss", epoch_log=False,
                           output_transform=from_engine(["loss"], first=True))
    trainer, _, _ = _build(handlers=[handler])
    trainer.run()
    lines = [line for line in capsys.readouterr().out.splitlines() if "Iter:" in line]
    assert len(lines) == 2 and all("train_loss: " in line for line in lines), lines  # 8 slices / batch 4
    assert lines[-1].rstrip().endswith(f"train_loss: {trainer.state.output[0][Keys.LOSS]:.4f}")


def test_training_changes_every_network():
    trainer, network, _ = _build()
    before = [p.detach().clone() for p in network.parameters()]
    trainer.run()
    changed = [not torch.equal(b, p) for b, p in zip(before, network.parameters())]
    assert sum(changed) > 0.9 * len(changed)


def test_two_cpu_runs_with_a_seed_give_identical_losses():
    losses = []
    for _ in range(2):
        trainer, _, _ = _build(seed=3, epochs=2)
        history = []
        trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: history.append(e.state.output[0]["loss"]))
        trainer.run()
        losses.append(history)
    assert losses[0] == losses[1]
    assert len(losses[0]) == 4


def test_cam_baseline_runs_without_transform():
    trainer, _, _ = _build({"use_er": False, "use_kd": False, "use_cmer": False}, kinds=())
    trainer.run()
    assert set(k.split("/")[1] for k in loss_scalars(trainer.state.output) if "/" in k) == {"L_C", "loss"}
    assert trainer.transform_kind is None


def test_full_supervision_trains_on_masks():
    trainer, _, _ = _build(kinds=(), kind="full_supervision")
    trainer.run()
    assert "t1/L_DiceCE" in loss_scalars(trainer.state.output)
    assert trainer.transform_kind is None
    augmented, _, _ = _build(kinds=("rotation",), kind="full_supervision", objective_cfg={"augment": True})
    augmented.run()
    assert augmented.transform_kind == "rotation"  # pi drawn for the augmented view


def test_lambda_e_scheduler_sets_the_weight_each_epoch():
    seen = []
    trainer, _, _ = _build(epochs=3, handlers=[LambdaEScheduler("polynomial", rampup_epochs=3, gamma=1.0)])
    trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda e: seen.append(e.lambda_e))
    trainer.run()
    assert seen == pytest.approx([1 / 3, 2 / 3, 1.0])


def test_validator_scores_a_perfect_and_an_empty_prediction():
    network = MultiModalCAM(["t1", "t2"], base_channels=4)
    validator = CAMValidator(torch.device("cpu"), DataLoader(_volumes(), batch_size=1), network)
    validator.run()
    metrics = validator.state.metrics
    assert set(metrics) >= {"val_dsc_fused", "val_dsc_t1", "val_dsc_t2", "val_acc_t1", "val_acc_t2"}
    assert all(0.0 <= v <= 1.0 for v in metrics.values())


def test_validator_maps_are_zero_on_slices_without_brain():
    network = MultiModalCAM(["t1", "t2"], base_channels=4, gate=False)
    validator = CAMValidator(torch.device("cpu"), DataLoader(_volumes(), batch_size=1), network, gate=False)
    volume = _volumes()[0]
    cams = validator.engine(network, volume["image"], brain=volume["brain"]).maps
    assert cams.shape == (2, SIZE, SIZE, 4)
    assert cams[..., 3].abs().sum() == 0
    assert cams[..., :3].abs().sum() > 0


def test_resume_after_an_interrupted_run_finishes_the_same_epochs(tmp_path):
    def objects(trainer, network, optimizers):
        return {"network": network, "optimizers": optimizers, "transform_sampler": trainer.transform_sampler,
                "trainer": trainer}

    # a run of 3 epochs that dies after epoch 2 (checkpoint written at each epoch end)
    trainer, network, optimizers = _build(epochs=3)
    saver = AtomicCheckpointSaver(str(tmp_path), objects(trainer, network, optimizers), save_interval=1,
                                  interval_filename="last.pt")
    saver.attach(trainer)

    @trainer.on(Events.EPOCH_COMPLETED)
    def die(engine):
        if engine.state.epoch == 2:
            engine.terminate()

    trainer.run()
    assert (tmp_path / "last.pt").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]  # no temp files left

    # a fresh process: new objects, resumed from last.pt
    trainer2, network2, optimizers2 = _build(epochs=3, seed=99)
    ResumeFromCheckpoint(str(tmp_path / "last.pt"), objects(trainer2, network2, optimizers2)).attach(trainer2)
    epochs_run = []
    trainer2.add_event_handler(Events.EPOCH_STARTED, lambda e: epochs_run.append(e.state.epoch))
    trainer2.run()
    assert epochs_run == [3]
    assert trainer2.state.epoch == 3


def test_resume_skips_when_no_checkpoint(tmp_path):
    trainer, network, optimizers = _build(epochs=1)
    ResumeFromCheckpoint(str(tmp_path / "missing.pt"), {"network": network}).attach(trainer)
    trainer.run()
    assert trainer.state.epoch == 1


def test_best_model_saved_by_validation_metric(tmp_path):
    trainer, network, _ = _build(epochs=2)
    validator = CAMValidator(torch.device("cpu"), DataLoader(_volumes(), batch_size=1), network,
                             val_handlers=[AtomicCheckpointSaver(str(tmp_path), {"model": network},
                                                                 save_key_metric=True, key_metric_filename="model.pt")])
    ValidationHandler(validator=validator, interval=1, epoch_level=True).attach(trainer)
    report = ValidationReport(validator, output_path=str(tmp_path / "validation.md"))
    report.attach(trainer)
    trainer.run()
    state = torch.load(tmp_path / "model.pt", weights_only=True)
    assert set(state) == set(network.state_dict())  # a bare state dict, loadable by inference
    assert "| fused |" in (tmp_path / "validation.md").read_text()


def test_validation_report_keeps_the_learning_curve(tmp_path):
    """Every validated epoch's metrics land in validation_history.json, and survive a resume
    through the report's state dict."""
    import json

    trainer, network, _ = _build(epochs=2)
    validator = CAMValidator(torch.device("cpu"), DataLoader(_volumes(), batch_size=1), network)
    ValidationHandler(validator=validator, interval=1, epoch_level=True).attach(trainer)
    report = ValidationReport(validator, history_path=str(tmp_path / "history.json"))
    report.attach(trainer)
    trainer.run()
    curve = json.loads((tmp_path / "history.json").read_text())
    assert [row["epoch"] for row in curve["epochs"]] == [1, 2]
    assert {"val_dsc_t1", "val_dsc_t2", "val_dsc_fused", "val_acc_t1"} <= set(curve["epochs"][0])
    restored = ValidationReport(validator)
    restored.load_state_dict(report.state_dict())
    assert restored.history == curve["epochs"] and restored.best == report.best


def test_grad_shares_are_the_weighted_terms_gradient_norms_over_l_c():
    """grad_share_interval: each network reports ||grad(lambda * term)|| / ||grad(L_C)|| of its
    own weights, computed by hand here from a fresh forward of the same batch."""
    trainer, network, _ = _build(grad_share_interval=1, objective_cfg={"reduction": "balanced"})
    trainer.lambda_e = 0.5
    batch = next(iter(trainer.data_loader))
    sampler_state = trainer.transform_sampler.state_dict()
    state = {k: v.clone() for k, v in network.state_dict().items()}
    trainer.state.iteration = 1
    out = loss_scalars(trainer._iteration(trainer, batch))
    for name in ("t1", "t2"):
        assert {f"{name}/grad_share_{t}" for t in ("L_KD", "L_ER", "L_CMER")} <= set(out)
    # by hand: same weights, same transform, same batch
    network.load_state_dict(state)
    trainer.transform_sampler.load_state_dict(sampler_state)
    images = batch["image"].float()
    transform = trainer.transform_sampler.draw(images.shape[0], images.shape[-2], images.shape[-1])
    maps_o, maps_t = trainer.forward_views(images, transform.apply(images))
    result = trainer.objective(["t1", "t2"], maps_o, maps_t, batch["label"].long(), transform, 0.5)
    params = list(network.nets[1].parameters())

    def norm(value):
        grads = torch.autograd.grad(value, params, retain_graph=True, allow_unused=True)
        return torch.sqrt(sum((g ** 2).sum() for g in grads if g is not None))

    terms = result.per_modality["t2"]
    assert out["t2/grad_share_L_ER"] == pytest.approx((norm(0.5 * terms["L_ER"]) / norm(terms["L_C"])).item(), rel=1e-3)
    assert out["t2/grad_share_L_KD"] == pytest.approx((norm(0.5 * terms["L_KD"]) / norm(terms["L_C"])).item(), rel=1e-3)


def test_grad_shares_off_by_default_and_between_intervals():
    trainer, _, _ = _build()
    trainer.run()
    assert not any("grad_share" in key for key in loss_scalars(trainer.state.output))
    trainer, _, _ = _build(grad_share_interval=100)
    trainer.run()
    assert not any("grad_share" in key for key in loss_scalars(trainer.state.output))


def test_cam_image_writer_logs_both_views_per_modality(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from scripts.workflows.writers import CAMImageWriter

    network = MultiModalCAM(["t1", "t2"], base_channels=4)
    slices = _slices()
    dataset = type("Slices", (), {"__len__": lambda self: len(slices), "__getitem__": lambda self, i: slices[i],
                                  "labels": torch.tensor([int(s["label"]) for s in slices])})()
    writer = CAMImageWriter(network, dataset, str(tmp_path), num_slices=2)
    validator = CAMValidator(torch.device("cpu"), DataLoader(_volumes(), batch_size=1), network, val_handlers=[writer])
    validator.run()
    network.train()
    writer(validator)
    assert network.training  # the writer restores the mode it found
    events = EventAccumulator(str(tmp_path), size_guidance={"images": 0})
    events.Reload()
    tags = events.Tags()["images"]
    assert len(tags) == 2 and all("pi(x)" in t for t in tags)
    image = events.Images(tags[0])[0]
    assert image.height == 2 * SIZE + 3 * 2 and image.width == 2 * SIZE + 3 * 2  # 2 slices x (x, pi(x))


@pytest.mark.parametrize("kinds, objective_cfg", [(("rotation",), None), (("scale",), None),
                                                   ((), {"use_er": False, "use_kd": False, "use_cmer": False})])
def test_low_memory_step_gives_the_default_steps_gradients(kinds, objective_cfg):
    """One network's graph at a time (partners' maps computed without a graph first) gives the
    same gradients, losses and BatchNorm running statistics as all K graphs with one backward."""
    results = []
    for low_memory in (False, True):
        torch.manual_seed(0)
        network = MultiModalCAM(["t1", "t2", "flair"], base_channels=4)
        loader = [{"image": torch.randn(4, 3, SIZE, SIZE), "label": torch.tensor([0, 1, 1, 0])}]
        trainer = CMERTrainer(torch.device("cpu"), 1, loader, network, ModalityOptimizers(network, lr=1e-3),
                              build_objective("weak", objective_cfg), TransformSampler(kinds, seed=0),
                              precision="fp32", low_memory=low_memory)
        grads = []
        trainer.add_event_handler(IterationEvents.BACKWARD_COMPLETED,
                                  lambda e: grads.extend(p.grad.clone() for p in network.parameters()))
        trainer.run()
        results.append((trainer.state.output, grads, [b.clone() for b in network.buffers()]))
    (outputs, _, _), (outputs_lm, _, _) = results
    for item, item_lm in zip(outputs, outputs_lm):  # the same slice logits (graph-free maps in low_memory)
        torch.testing.assert_close(item_lm[Keys.PRED], item[Keys.PRED], rtol=1e-5, atol=1e-6)
    results = [(loss_scalars(o), g, b) for o, g, b in results]
    (out, grads, buffers), (out_lm, grads_lm, buffers_lm) = results
    assert set(out) == set(out_lm)
    for key, value in out.items():
        assert out_lm[key] == (pytest.approx(value, rel=1e-6) if isinstance(value, float) else value), key
    assert len(grads) == len(grads_lm) > 0
    for a, b in zip(grads, grads_lm):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)
    for a, b in zip(buffers, buffers_lm):  # the graph-free pass leaves no trace in BatchNorm
        torch.testing.assert_close(b, a, rtol=1e-6, atol=0)
