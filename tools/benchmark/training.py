"""The benchmark's `training` part: ours (the real CMERTrainer), the bare networks and the
reference step written the way the authors' code works, side by side.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from typing import Callable

import torch
import torch.nn.functional as F

from scripts import precision as P
from scripts.common import TUMOUR_CHANNEL
from scripts.method.losses import (
    ObjectiveConfig,
    classification_loss,
    cmer_loss,
    er_loss,
    kd_loss,
    l2_normalise,
    tumour_cam,
)
from tools.benchmark.core import CYCLED_KINDS, MAX_OVERHEAD, MAX_OVERHEAD_BF16, Row, Settings, autocast, build_network, failed_row, median, now, synchronize, synthetic_batch, timed, verdict


def cycling_sampler(repeats: int, kinds=CYCLED_KINDS):
    """A TransformSampler that replays a fixed cycle of transforms instead of drawing them.

    Step i uses kinds[i % n], n = min(repeats, 4), with that kind's parameters drawn once
    (the same for every method), and the scale at the top of its range (the largest canvas,
    two passes): every method sees the same shapes, and a warm-up of n steps has met them all
    (on a GPU a new shape costs kernel and cuDNN plan selection once).
    """
    from scripts.method import equivariance
    from scripts.method.trainer import TransformSampler

    cycle = list(kinds)[:max(1, min(repeats, len(kinds)))]

    class CyclingSampler(TransformSampler):
        draws = 0

        def draw(self, batch_size, height, width):
            index = self.draws % len(cycle)
            self.draws += 1
            config = dict(self.config)
            if cycle[index] == "scale":
                high = float(equivariance.resolve_config(config)["scale_range"][1])
                config["scale_range"] = (high, high)
            generator = torch.Generator().manual_seed(1000 + index)  # fixed parameters per kind
            return equivariance.draw_transform(cycle[index], batch_size, height, width, generator, config)

    return CyclingSampler(cycle, seed=0)


def quiet_stats_handler():
    """The real StatsHandler (every loss scalar, every iteration) writing to a NullHandler."""
    from monai.handlers import StatsHandler

    from scripts.method.trainer import loss_scalars

    logger = logging.getLogger("tools.benchmark.train")
    logger.handlers = [logging.NullHandler()]
    logger.propagate = False
    logger.setLevel(logging.INFO)
    return StatsHandler(name=logger.name, tag_name="train_loss", iteration_log=True, epoch_log=False,
                        output_transform=loss_scalars)


def make_trainer(network, batch: dict, steps: int, s: Settings, concat_views: bool = True):
    """The bundle's CMERTrainer over `steps` copies of one CPU batch (moved to the device by _iteration)."""
    from scripts.method.trainer import CMERTrainer, ModalityOptimizers, build_objective

    return CMERTrainer(
        device=s.device, max_epochs=1, train_data_loader=[batch] * steps, epoch_length=steps, network=network,
        optimizers=ModalityOptimizers(network), objective=build_objective("weak", None),
        transform_sampler=cycling_sampler(s.repeats), train_handlers=[quiet_stats_handler()],
        precision=s.precision, channels_last=s.channels_last, low_memory=s.low_memory, compile=s.compile,
        concat_views=concat_views,
    )


# --------------------------------------------------------------------------- training: reference


def reference_loss(k: int, maps_o: list, maps_t: list, labels: torch.Tensor, transform, cfg: ObjectiveConfig,
                   lambda_e: float) -> torch.Tensor:
    """Eq. 8 of network k alone, recomputed from scratch; every partner map is detached first.

    As the authors' code does: each network's loss rebuilds the partners' CAMs, their
    L2-normalised transformed maps and predictions, instead of sharing them across networks.
    Covers the paper's configuration (all terms, normalisation before the transform).
    """
    own_o, own_t = maps_o[k].float(), maps_t[k].float()
    partners = [j for j in range(len(maps_o)) if j != k]
    logits_o, logits_t = own_o.mean(dim=(2, 3)), own_t.mean(dim=(2, 3))
    loss = classification_loss(logits_o, logits_t, labels)
    cam_o, cam_t = tumour_cam(own_o), tumour_cam(own_t)
    equivariance = er_loss(transform.apply(cam_o), cam_t, labels, cfg)
    if partners:
        kd, cmer = 0.0, 0.0
        own_pi_l2 = transform.apply(l2_normalise(cam_o, cfg.eps))
        for j in partners:
            partner_o, partner_t = maps_o[j].detach().float(), maps_t[j].detach().float()
            partner_logits_o, partner_logits_t = partner_o.mean(dim=(2, 3)), partner_t.mean(dim=(2, 3))
            kd = kd + kd_loss(logits_o, partner_logits_o, logits_t, partner_logits_t, cfg.kd_temperature)
            partner_pi_l2 = transform.apply(l2_normalise(tumour_cam(partner_o), cfg.eps))
            cmer = cmer + cmer_loss(own_pi_l2, cam_t, partner_pi_l2, tumour_cam(partner_t), labels,
                                    partner_logits_o.argmax(dim=1) == TUMOUR_CHANNEL,
                                    partner_logits_t.argmax(dim=1) == TUMOUR_CHANNEL, cfg)
        loss = loss + cfg.lambda_kd * kd / len(partners)
        equivariance = equivariance + cmer / len(partners)
    return loss + lambda_e * equivariance


def cuda_grad_scaler():
    """torch.amp.GradScaler('cuda') (torch >= 2.3), else the older torch.cuda.amp one."""
    scaler_class = getattr(torch.amp, "GradScaler", None)
    return scaler_class("cuda") if scaler_class is not None else torch.cuda.amp.GradScaler()


class ReferenceStep:
    """One training step the straightforward way, on its own networks and optimisers.

    Per batch: one transform; every network runs the original view, then separately the
    transformed view; then, network by network, its loss is recomputed, backpropagated and
    its optimiser stepped; every loss is logged with `.item()`.
    """

    def __init__(self, network, s: Settings, lr: float = 5e-5, weight_decay: float = 0.1):
        self.network = network
        self.s = s
        self.cfg = ObjectiveConfig()
        self.sampler = cycling_sampler(s.repeats)
        self.optimizers = [torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=weight_decay)
                           for net in network.nets]
        use_scaler = P.uses_grad_scaler(s.device, s.precision)
        self.scalers = [cuda_grad_scaler() if use_scaler else None for _ in network.nets]

    def __call__(self, batch: dict, lambda_e: float = 1.0) -> dict:
        device = self.s.device
        images = batch["image"].to(device).float()
        labels = batch["label"].to(device).long().view(-1)
        transform = self.sampler.draw(images.shape[0], images.shape[-2], images.shape[-1])
        images_t = transform.apply(images)
        nets = list(self.network.nets)
        self.network.train()
        with autocast(self.s):
            maps_o = [net(images[:, k:k + 1]) for k, net in enumerate(nets)]
            maps_t = [net(images_t[:, k:k + 1]) for k, net in enumerate(nets)]
        logged = {}
        for k, (optimizer, scaler) in enumerate(zip(self.optimizers, self.scalers)):
            with autocast(self.s):
                loss = reference_loss(k, maps_o, maps_t, labels, transform, self.cfg, lambda_e)
            optimizer.zero_grad(set_to_none=True)
            if scaler is None:
                loss.backward()
                optimizer.step()
            else:
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
            logged[self.network.modalities[k]] = loss.item()
        return logged


# --------------------------------------------------------------------------- training: bare networks


class BareStep:
    """The K networks' forward + backward over 2B slices with a plain loss (CE of the GAP logits)."""

    def __init__(self, network, batch: dict, s: Settings):
        self.network = network
        self.s = s
        image = batch["image"].to(s.device)
        self.views = torch.cat([image, torch.flip(image, dims=[-1])], dim=0)  # [x ; pi(x)]: 2B slices
        self.labels = batch["label"].to(s.device).repeat(2)

    def __call__(self) -> None:
        self.network.train()
        self.network.zero_grad(set_to_none=True)
        total = 0.0
        with autocast(self.s):
            for k, net in enumerate(self.network.nets):
                maps = net(self.views[:, k:k + 1])
                total = total + F.cross_entropy(maps.float().mean(dim=(2, 3)), self.labels)
        total.backward()


# --------------------------------------------------------------------------- training: measurement


@dataclass
class StepTimes:
    ours: list[float] = field(default_factory=list)
    bare: list[float] = field(default_factory=list)
    reference: list[float] = field(default_factory=list)


def measure_training(k: int, size: int, s: Settings) -> StepTimes:
    """Ours (the real trainer over warm-up + repeats steps), then bare, then reference, each in
    a block on its own fresh networks: each reaches its steady state (allocator included)
    after its own warm-up, which interleaving does not give on a CPU heap."""
    from ignite.engine import Events

    batch = synthetic_batch(s.batch_size, k, size)
    trainer = make_trainer(build_network(k, s), batch, s.warmup + s.repeats, s)
    times, started = StepTimes(), [0.0]

    def start(engine) -> None:
        synchronize(s.device)
        started[0] = now()

    def stop(engine) -> None:
        synchronize(s.device)
        if engine.state.iteration > s.warmup:
            times.ours.append(now() - started[0])

    trainer.add_event_handler(Events.ITERATION_STARTED, start)
    trainer.add_event_handler(Events.ITERATION_COMPLETED, stop)  # after the StatsHandler: logging counts
    trainer.run()
    del trainer
    bare = BareStep(build_network(k, s), batch, s)
    times.bare = [timed(bare, s.device) for _ in range(s.warmup + s.repeats)][s.warmup:]
    del bare
    reference = ReferenceStep(build_network(k, s), s)
    times.reference = [timed(lambda: reference(batch), s.device) for _ in range(s.warmup + s.repeats)][s.warmup:]
    return times


def training_rows(s: Settings, progress: Callable[[str], None] = lambda message: None) -> tuple[list[Row], dict]:
    """Ours, bare and reference per size, K and precision (precisions side by side in one run)."""
    rows, consumed = [], {}
    for size in s.sizes:
        for k in s.ks:
            for precision in s.precisions:
                p_rows, speed = _training_case(replace(s, precision=precision, amp=precision != "fp32"), k, size,
                                               progress)
                rows += p_rows
                consumed[(k, size)] = max(consumed.get((k, size), 0.0), speed)
    return rows, consumed


def _training_case(s: Settings, k: int, size: int, progress) -> tuple[list[Row], float]:
    rows = []
    case = f"K={k}, {size}x{size}, B={s.batch_size}, {s.precision}"
    try:
        times = measure_training(k, size, s)
    except Exception as err:  # noqa: BLE001 - reported in the table
        return [failed_row("training", case, err)], 0.0
    ours, bare, reference = median(times.ours), median(times.bare), median(times.reference)
    overhead = ours / bare
    on_cpu = s.device.type == "cpu"
    limit = MAX_OVERHEAD_BF16 if s.precision == "bf16" else MAX_OVERHEAD
    rows.append(Row("training", f"{case}: ours (CMERTrainer)", f"{s.batch_size / ours:.2f} slices/s",
                    f"bare nets fwd+bwd on 2B: {s.batch_size / bare:.2f} slices/s",
                    f"overhead {overhead:.2f}", f"<= {limit}" + ("" if on_cpu else " (CPU target)"),
                    verdict(overhead <= limit)))
    rows.append(Row("training", f"{case}: reference (authors' way)", f"{s.batch_size / reference:.2f} slices/s",
                    f"ours {s.batch_size / ours:.2f} slices/s", f"reference/ours {reference / ours:.2f}",
                    "> 1 (ours faster)", verdict(reference > ours)))
    progress(f"  {case}: ours {s.batch_size / ours:.2f}, bare {s.batch_size / bare:.2f}, "
             f"reference {s.batch_size / reference:.2f} slices/s")
    return rows, s.batch_size / ours
