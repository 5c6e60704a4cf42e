"""The K-network MONAI trainer of the method.

`CMERTrainer` subclasses MONAI's `Trainer` (the engine, events, handlers, AMP scaler and
metrics stay MONAI's) and overrides one iteration: draw one transform pi for the batch,
run each modality network once over the original and transformed views together, compute
Eq. 8 for every network and step K optimisers. Because everything taken from a partner
network is detached, one backward over the sum of the K losses gives every network
exactly the gradient of its own loss (tests check this), which is cheaper than K
backwards in turn. Its per-volume validator is `scripts.workflows.validation.CAMValidator`.

Its output follows MONAI's `SupervisedTrainer` (Keys.IMAGE, Keys.LABEL, Keys.PRED, Keys.LOSS,
decollated by MONAI's `Workflow`), so MONAI's stock handlers and `--tracking mlflow` read it
with `from_engine([Keys.LOSS], first=True)`; `loss_scalars` gives every loss term.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys

import torch
from ignite.engine import Events
from monai.engines import Trainer
from monai.engines.utils import IterationEvents
from monai.utils import CommonKeys as Keys

from scripts.method.losses import CMERObjective, FullSupervisionObjective
from scripts.model.cams import logits_from_maps
from scripts.precision import autocast, cpu_kind, resolve_precision, to_memory_format, uses_grad_scaler


class TransformSampler:
    """Draws one equivariance transform per minibatch from its own seeded generator.

    Its generator state is checkpointed (state_dict) so a resumed run continues the
    same stream of transforms.

    Args:
        kinds: transform kinds to draw from (flip, rotation, scale, translation; identity, a control), one per batch.
        config: options of the transforms (scripts.method.equivariance.draw_transform).
        seed: seed of the sampler's own generator.
    """

    def __init__(self, kinds=("flip", "rotation", "scale", "translation"), config: dict | None = None, seed: int = 0):
        from scripts.method import equivariance

        self.kinds = list(kinds or [])
        self.config = dict(config or {})
        self.generator = torch.Generator().manual_seed(int(seed))
        self._draw_from = equivariance.draw_from

    def draw(self, batch_size: int, height: int, width: int):
        if not self.kinds:
            raise ValueError("the objective needs a transform but no transform kinds are configured")
        return self._draw_from(self.kinds, batch_size, height, width, self.generator, self.config)

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])


class ModalityOptimizers:
    """One AdamW per modality network (Algorithm 1), checkpointable as one object.

    Args:
        network: the MultiModalCAM whose `nets` get one optimiser each.
        lr: learning rate.
        weight_decay: AdamW weight decay.
        betas: AdamW betas.
    """

    def __init__(self, network, lr: float = 5e-5, weight_decay: float = 0.1, betas=(0.9, 0.999)):
        self.optimizers = [
            torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=weight_decay, betas=tuple(betas))
            for net in network.nets
        ]

    def zero_grad(self) -> None:
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=True)

    def step(self, scaler=None) -> None:
        for optimizer in self.optimizers:
            if scaler is None:
                optimizer.step()
            else:
                scaler.step(optimizer)
        if scaler is not None:
            scaler.update()

    def state_dict(self) -> dict:
        return {f"optimizer_{k}": opt.state_dict() for k, opt in enumerate(self.optimizers)}

    def load_state_dict(self, state: dict) -> None:
        for k, optimizer in enumerate(self.optimizers):
            optimizer.load_state_dict(state[f"optimizer_{k}"])


def build_objective(kind: str = "weak", config: dict | None = None, pooling: str | None = None):
    """The training objective.

    Args:
        kind: `weak` = Eq. 8 (`CMERObjective`); `full_supervision` = the Dice + CE upper bound
            (`FullSupervisionObjective`).
        config: the kind's settings (train.yaml's `objective` or `full_supervision` section);
            None = defaults.
        pooling: the weak objective's slice logits from the maps (`scripts.model.cams.pooling_spec`:
            "gap" or "topk:<fraction>"; None = "gap"); must be the network's own.
    """
    if kind == "weak":
        return CMERObjective(config, pooling=pooling)
    if kind == "full_supervision":
        return FullSupervisionObjective(**(config or {}))
    raise ValueError(f"objective kind must be 'weak' or 'full_supervision', got {kind!r}")


class TwoViewForward(torch.nn.Module):
    """One call = one network over [x ; pi(x)]: a single forward when the canvases match.

    Being one module call per iteration is also what DistributedDataParallel needs (a
    second forward of the same DDP module before backward is an error).
    """

    def __init__(self, net: torch.nn.Module, concat_views: bool = True):
        super().__init__()
        self.net = net
        self.concat_views = concat_views

    def forward(self, view: torch.Tensor, view_t: torch.Tensor | None = None):
        if view_t is None:
            return self.net(view), None
        if self.concat_views and view_t.shape[-2:] == view.shape[-2:]:
            both = self.net(torch.cat([view, view_t], dim=0))
            return both[: view.shape[0]], both[view.shape[0]:]
        # the scale transform changes the canvas size: two passes
        return self.net(view), self.net(view_t)


_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc mallopt parameters
_NEVER_TRIM = -1  # mallopt(M_TRIM_THRESHOLD, -1): never give the heap's top back to the OS


def keep_cpu_tensors_on_heap() -> bool:
    """Make glibc serve large CPU tensors from its heap instead of fresh mmaps; True if applied.

    glibc maps every allocation above 32 MB (e.g. one activation of a 2B x 64 x 128 x 128 batch)
    afresh and unmaps it on free, so each training step page-faults and zeroes its whole
    working set again: about a quarter of a CPU step (docs/performance.md). Served from the
    heap, without trimming (a trimmed top would be faulted in again by the next step), freed
    blocks are reused by the next step. Numerics are unchanged; the process keeps its peak
    heap instead of returning it between steps.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, _NEVER_TRIM))
    except (OSError, AttributeError):  # not glibc (e.g. musl): nothing to tune
        return False


class CMERTrainer(Trainer):
    """Trains the K modality networks of a `MultiModalCAM` with Eq. 8.

    On a CPU device, `heap_allocations` (default on) applies `keep_cpu_tensors_on_heap`.

    Args:
        device: where the networks and batches live.
        max_epochs: epochs to run.
        train_data_loader: batches {"image": (B, K, H, W), "label": (B,), optional "mask"}.
        network: the `MultiModalCAM` whose `nets` are trained.
        optimizers: `ModalityOptimizers` over `network`.
        objective: `CMERObjective` or `FullSupervisionObjective` (see `build_objective`).
        transform_sampler: draws the transform pi of each batch (needed by ER / CMER).
        train_handlers: MONAI / ignite handlers to attach.
        amp: legacy switch, used only when `precision` is None: True = "auto", False = "fp32".
        epoch_length: iterations per epoch (default: the loader's length).
        non_blocking: non-blocking host-to-device copies.
        concat_views: one forward over [x ; pi(x)] per network when the canvases match.
        training_nets: modules that run the training forward (e.g. DDP-wrapped); default
            `TwoViewForward` around each of `network.nets`.
        heap_allocations: keep large CPU tensors on the heap (see `keep_cpu_tensors_on_heap`).
        precision: auto | bf16 | fp16 | fp32 (`scripts.precision`): autocast of the networks'
            forward; the objective always runs in float32; GradScaler only for CUDA fp16.
        channels_last: store the networks' weights (hence activations) NHWC.
        low_memory: keep one network's graph at a time: every network's maps are computed
            first without a graph (the partners' maps the objective detaches anyway), then each
            network runs forward + backward of its own loss in turn. Same gradients, one extra
            forward per network, peak memory of one network's graph.
        compile: wrap the training forward of every network in `torch.compile`.
        decollate: as MONAI's `SupervisedTrainer`: after the optimiser steps MONAI's `Workflow`
            decollates `engine.state.batch` and `engine.state.output` into one dict per slice
            (tensors detached, 0-d tensors turned into Python numbers). See `_iteration`.
        grad_share_interval: every this many iterations (0 = never), measure how much each
            weighted term of a network's loss pulls on its weights: the gradient norm of
            lambda * term over the gradient norm of L_C, per network, reported in the output as
            "<modality>/grad_share_<term>" (e.g. t2/grad_share_L_CMER). One extra partial
            backward per term and network on those iterations; the update is unchanged. Not
            measured under `low_memory` (its graphs are freed network by network).
    """

    def __init__(self, device, max_epochs: int, train_data_loader, network, optimizers: ModalityOptimizers,
                 objective, transform_sampler: TransformSampler | None = None, train_handlers=None,
                 amp: bool = False, epoch_length: int | None = None, non_blocking: bool = False,
                 concat_views: bool = True, training_nets=None, heap_allocations: bool = True,
                 precision: str | None = None, channels_last: bool = False, low_memory: bool = False,
                 compile: bool = False, decollate: bool = True, grad_share_interval: int = 0):
        device = torch.device(device)
        requested = precision if precision is not None else ("auto" if amp else "fp32")
        self.precision = resolve_precision(requested, device)
        # `auto` resolves per machine: say what it chose, so a log tells which precision trained the model.
        where = f"CPU kind {cpu_kind()}" if device.type == "cpu" else str(device)
        logging.getLogger(__name__).info("training precision: %s (asked: %s; %s)", self.precision, requested, where)
        # MONAI's Trainer makes a GradScaler when amp is on: only CUDA float16 needs one.
        super().__init__(
            device=device, max_epochs=max_epochs, data_loader=train_data_loader, epoch_length=epoch_length,
            non_blocking=non_blocking, handlers=train_handlers, amp=uses_grad_scaler(device, self.precision),
            decollate=decollate,
        )
        if heap_allocations and device.type == "cpu":
            keep_cpu_tensors_on_heap()
        self.network = to_memory_format(network, channels_last)
        self.channels_last = bool(channels_last)
        self.low_memory = bool(low_memory)
        self.grad_share_interval = max(int(grad_share_interval or 0), 0)
        self.modalities = list(network.modalities)
        self.optimizers = optimizers
        self.objective = objective
        self.pooling = (getattr(network, "pool_kind", "gap"), float(getattr(network, "pool_fraction", 1.0)))
        objective_pooling = getattr(objective, "pooling", None)
        if objective_pooling is not None and tuple(objective_pooling) != self.pooling:
            raise ValueError(f"the objective pools the maps as {objective_pooling} but the network as {self.pooling}: "
                             f"build both from one `pooling` setting")
        self.transform_sampler = transform_sampler
        self.lambda_e = 1.0  # set each epoch by LambdaEScheduler when configured
        self.transform_kind: str | None = None  # the kind of the last batch's pi (None: no transform)
        # The modules that run the training forward: TwoViewForward around the network's own
        # nets, or DistributedDataParallel around those; they share the nets' parameters, so
        # checkpoints of `network` stay plain state dicts.
        self.training_nets = (list(training_nets) if training_nets is not None
                              else [TwoViewForward(net, concat_views) for net in network.nets])
        if compile:
            self.training_nets = [torch.compile(net) for net in self.training_nets]
        if len(self.training_nets) != len(self.modalities):
            raise ValueError(f"{len(self.training_nets)} training nets for {len(self.modalities)} modalities")
        # Registered here, so it runs before any checkpoint saver attached later (exact resume).
        self.add_event_handler(Events.EPOCH_COMPLETED, finish_epoch_data)

    def forward_views(self, images: torch.Tensor, images_t: torch.Tensor | None):
        """Run every modality network over its original and transformed views."""
        maps_o, maps_t = [], [] if images_t is not None else None
        for k, net in enumerate(self.training_nets):
            view_t = images_t[:, k:k + 1] if images_t is not None else None
            out_o, out_t = net(images[:, k:k + 1], view_t)
            maps_o.append(out_o)
            if maps_t is not None:
                maps_t.append(out_t)
        return maps_o, maps_t

    def _objective(self, maps_o, maps_t, labels, transform, mask, only=None):
        # float32 maps, outside autocast: normalisers, softmax / KL and reductions stay float32
        extra = {"only": only} if only is not None else {}
        return self.objective(self.modalities, [m.float() for m in maps_o],
                              [m.float() for m in maps_t] if maps_t is not None else None,
                              labels, transform, float(self.lambda_e), mask, **extra)

    @staticmethod
    def _backward(loss: torch.Tensor, scaler) -> None:
        (scaler.scale(loss) if scaler is not None else loss).backward()

    def _one_graph_step(self, engine, images, images_t, labels, transform, mask, scaler):
        """All K graphs alive, one backward over the summed losses (exact: partners detached)."""
        with autocast(engine.state.device, self.precision):
            maps_o, maps_t = self.forward_views(images, images_t)
        engine.fire_event(IterationEvents.FORWARD_COMPLETED)
        result = self._objective(maps_o, maps_t, labels, transform, mask)
        engine.fire_event(IterationEvents.LOSS_COMPLETED)
        if self.grad_share_interval and engine.state.iteration % self.grad_share_interval == 0:
            self._record_grad_shares(result)
        self._backward(result.total, scaler)
        engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
        return result, slice_logits(maps_o, *self.pooling)

    def term_weights(self) -> dict:
        """The weight each term of Eq. 8 enters a network's loss with, this epoch."""
        config = getattr(self.objective, "config", None)
        lambda_kd = float(getattr(config, "lambda_kd", 1.0))
        return {"L_C": 1.0, "L_KD": lambda_kd, "L_ER": float(self.lambda_e), "L_CMER": float(self.lambda_e)}

    def _record_grad_shares(self, result) -> None:
        """||grad(lambda * term)|| / ||grad(L_C)|| per network and term (graphs kept for the step)."""
        weights = self.term_weights()
        shares = {}
        for k, name in enumerate(self.modalities):
            terms = result.per_modality.get(name, {})
            if "L_C" not in terms:
                return  # not the weak objective (full supervision): nothing to compare with
            params = [p for p in self.network.nets[k].parameters() if p.requires_grad]
            norms = {}
            for term, value in terms.items():
                if term not in weights or not (torch.is_tensor(value) and value.requires_grad):
                    continue
                grads = torch.autograd.grad(weights[term] * value, params, retain_graph=True, allow_unused=True)
                norms[term] = torch.sqrt(sum((g.float() ** 2).sum() for g in grads if g is not None))
            base = norms.get("L_C")
            for term, norm in norms.items():
                if term != "L_C" and base is not None:
                    shares[(name, f"grad_share_{term}")] = norm / base.clamp_min(1e-12)
        for (name, key), share in shares.items():
            result.per_modality[name][key] = share.detach()

    def _low_memory_step(self, engine, images, images_t, labels, transform, mask, scaler):
        """One network's graph at a time (`low_memory`); the same gradients as `_one_graph_step`."""
        device = engine.state.device
        # BatchNorm running statistics must see each batch once: undo the graph-free pass's update.
        buffers = [b.detach().clone() for b in self.network.buffers()]
        with torch.no_grad(), autocast(device, self.precision):
            maps_o, maps_t = self.forward_views(images, images_t)
        with torch.no_grad():
            for saved, buffer in zip(buffers, self.network.buffers()):
                buffer.copy_(saved)
        engine.fire_event(IterationEvents.FORWARD_COMPLETED)
        total, per_modality = 0.0, {}
        for k, net in enumerate(self.training_nets):
            view_t = images_t[:, k:k + 1] if images_t is not None else None
            with autocast(device, self.precision):
                own_o, own_t = net(images[:, k:k + 1], view_t)
            own_maps_o = maps_o[:k] + [own_o] + maps_o[k + 1:]
            own_maps_t = maps_t[:k] + [own_t] + maps_t[k + 1:] if maps_t is not None else None
            result = self._objective(own_maps_o, own_maps_t, labels, transform, mask, only=[k])
            self._backward(result.total, scaler)
            total = total + result.total.detach()
            per_modality.update(result.per_modality)
        engine.fire_event(IterationEvents.LOSS_COMPLETED)
        engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
        return type(result)(total=total, per_modality=per_modality), slice_logits(maps_o, *self.pooling)

    def _iteration(self, engine, batchdata: dict) -> dict | list[dict]:
        """One minibatch: draw pi, one forward per network over [x ; pi(x)], Eq. 8, K optimiser steps.

        Args:
            engine: this trainer (ignite passes it).
            batchdata: {Keys.IMAGE "image": (B, K, H, W), Keys.LABEL "label": (B,) slice labels,
                optional "mask": (B, 1, H, W) (full supervision only)}.

        Returns:
            `engine.state.output`, following MONAI's `SupervisedTrainer`: a dict with

            - Keys.IMAGE ("image"): the batch's images (B, K, H, W) as the loader gave them (the
              host tensor: the device copy is not kept alive).
            - Keys.LABEL ("label"): the slice labels (B,) int64 (1 = tumour in the slice), as given.
            - Keys.PRED ("pred"): the networks' slice-level class logits (B, K, C) float32 on the
              device, detached: for each of the K modality networks the spatial mean of its C class
              activation maps over the original view x (the logits L_C scores; softmax / argmax
              over C, channel 1 = tumour). The maps themselves are not kept.
            - Keys.LOSS ("loss"): the summed objective of the K networks (Eq. 8), a detached 0-d tensor.
            - "<modality>/<term>": each term (L_C, L_ER, L_KD, L_CMER or L_DiceCE, and "loss") of
              each modality, detached 0-d tensors.
            - "lambda_e": the weight lambda_E(t) of this epoch, a float.

            With `decollate=True` (the default) MONAI's `Workflow` turns it into a list of B such
            dicts, one per slice, when IterationEvents.MODEL_COMPLETED fires: per-slice views of
            IMAGE and PRED, LABEL as an int, and the scalars (LOSS, the terms, "lambda_e") as
            Python floats repeated in every item. Handlers read it as MONAI's do:
            `from_engine([Keys.LOSS], first=True)` (the total; MONAI's StatsHandler / MLflow
            settings) or `scripts.method.trainer.loss_scalars` (every term, either form).
            The kind of pi is kept in `self.transform_kind`.
        """
        device, non_blocking = engine.state.device, engine.non_blocking
        batch_images = batchdata[Keys.IMAGE]
        batch_labels = batchdata[Keys.LABEL].long().reshape(-1)
        # as SupervisedTrainer: the inputs first (this also drops the last batch's output)
        engine.state.output = {Keys.IMAGE: batch_images, Keys.LABEL: batch_labels}
        images = batch_images.to(device, non_blocking=non_blocking).float()
        labels = batch_labels.to(device, non_blocking=non_blocking)
        mask = batchdata.get("mask")
        mask = mask.to(device, non_blocking=non_blocking) if mask is not None else None
        if images.shape[1] != len(self.modalities):
            raise ValueError(
                f"batch has {images.shape[1]} modality channels but the network has {len(self.modalities)} "
                f"({self.modalities}): set the dataset's modalities to the network's"
            )

        transform = images_t = None
        if getattr(self.objective, "needs_transform", False):
            transform = self.transform_sampler.draw(images.shape[0], images.shape[-2], images.shape[-1])
            images_t = transform.apply(images)
        self.transform_kind = transform.kind if transform is not None else None
        self.network.train()
        self.optimizers.zero_grad()
        scaler = self.scaler if self.amp else None
        step = self._low_memory_step if self.low_memory else self._one_graph_step
        result, pred = step(engine, images, images_t, labels, transform, mask, scaler)
        self.optimizers.step(scaler)

        output = engine.state.output
        output[Keys.PRED] = pred
        output[Keys.LOSS] = _detached(result.total)
        output["lambda_e"] = float(self.lambda_e)
        for name, terms in result.per_modality.items():
            for term, value in terms.items():
                output[f"{name}/{term}"] = _detached(value)
        engine.fire_event(IterationEvents.MODEL_COMPLETED)  # MONAI's Workflow decollates here
        return engine.state.output


def finish_epoch_data(engine) -> None:
    """Run a fully consumed data iterator to its end when the epoch completes.

    Ignite keeps the epoch's data iterator and asks it for one more item only at the start of
    the next epoch; torch's `RandomSampler` (the data loader's plain shuffling) draws one more
    permutation from its generator right then, after the epoch's checkpoint was written. A run
    resumed from that checkpoint would start the next epoch without that draw and shuffle
    differently. Finishing the iterator at EPOCH_COMPLETED makes the draw part of the epoch
    (the uninterrupted run sees the same stream: ignite then opens the next epoch's iterator
    as before). An iterator with batches left (`epoch_length` < the loader's length) is kept.

    Args:
        engine: the trainer (ignite passes it).
    """
    iterator = getattr(engine, "_dataloader_iter", None)
    loader = engine.state.dataloader
    try:
        consumed = iterator is not None and engine.state.epoch_length == len(loader)
    except TypeError:  # a loader without a length
        consumed = False
    if consumed and next(iterator, None) is not None:
        raise RuntimeError("the training data loader gave more batches than its length")


def slice_logits(maps: list[torch.Tensor], pooling: str = "gap", topk_fraction: float = 1.0) -> torch.Tensor:
    """(B, K, C) float32, detached: each network's (B, C, H, W) maps pooled as in training (no graph kept)."""
    return torch.stack([logits_from_maps(m.detach().float(), pooling, topk_fraction) for m in maps], dim=1)


def _detached(value):
    return value.detach() if isinstance(value, torch.Tensor) else torch.as_tensor(float(value))


_NOT_SCALARS = (Keys.IMAGE, Keys.LABEL, Keys.PRED)


def loss_scalars(output: dict | list[dict]) -> dict:
    """StatsHandler / TensorBoardStatsHandler / MLFlowHandler output_transform: every scalar.

    Args:
        output: `CMERTrainer`'s `engine.state.output`, decollated (a list of per-slice dicts,
            whose scalars repeat in each: the first is read) or not (one dict).

    Returns:
        {name: float} for Keys.LOSS, "lambda_e" and every "<modality>/<term>" (no image, label or pred).
    """
    if isinstance(output, (list, tuple)):
        if not output:
            return {}
        output = output[0]
    scalars = {}
    for key, value in output.items():
        if key in _NOT_SCALARS or isinstance(value, (bool, str)):
            continue
        if isinstance(value, torch.Tensor) and value.ndim == 0:
            value = value.item()
        if isinstance(value, (int, float)):
            scalars[str(key)] = float(value)
    return scalars
