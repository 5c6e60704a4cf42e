"""TensorBoard writers of the validation: CAM overlays of the original and transformed views.

MONAI's TensorBoardImageHandler shows one batch item of one output; the method's check is
the CAM of two views (x and pi(x)) per modality, side by side, epoch after epoch.
"""

from __future__ import annotations

from ignite.engine import Engine, Events


class CAMImageWriter:
    """At every validation, write CAM overlays to TensorBoard: per modality, the original
    view and the transformed view of a few fixed tumour slices (the equivariance the
    method trains for, visible epoch by epoch).

    `dataset` is a SliceDataset (items with "image" (K, H, W), "label", "mask"); the
    transform is drawn once, from its own seed, so every epoch shows the same views.

    Args:
        network: the MultiModalCAM being trained.
        dataset: the SliceDataset the example slices come from.
        log_dir: TensorBoard folder.
        transform_kind: kind of the transform pi shown.
        num_slices: tumour slices shown.
        seed: seed of the drawn transform.
        tag: TensorBoard tag prefix.
    """

    def __init__(self, network, dataset, log_dir: str, transform_kind: str = "rotation", num_slices: int = 4,
                 seed: int = 0, tag: str = "cams"):
        self.network, self.dataset, self.log_dir = network, dataset, log_dir
        self.transform_kind, self.num_slices, self.seed, self.tag = transform_kind, num_slices, seed, tag
        self.writer = None

    def attach(self, validator: Engine) -> None:
        validator.add_event_handler(Events.EPOCH_COMPLETED, self)

    def _examples(self):
        import torch

        labels = getattr(self.dataset, "labels", None)
        indices = [i for i in range(len(self.dataset)) if labels is None or int(labels[i]) == 1]
        step = max(1, len(indices) // self.num_slices)
        items = [self.dataset[i] for i in indices[::step][: self.num_slices]]
        return torch.stack([torch.as_tensor(i["image"]) for i in items]), torch.stack([torch.as_tensor(i["mask"]) for i in items])

    def __call__(self, validator: Engine) -> None:
        import torch
        from torch.utils.tensorboard import SummaryWriter

        from scripts.method.equivariance import draw_transform
        from scripts.workflows.figures import cam_overlay_grid
        from scripts.method.losses import tumour_cam

        if len(self.dataset) == 0:
            return
        if self.writer is None:
            self.writer = SummaryWriter(log_dir=self.log_dir)
        images, masks = self._examples()
        device = next(self.network.parameters()).device
        transform = draw_transform(self.transform_kind, images.shape[0], images.shape[-2], images.shape[-1],
                                   torch.Generator().manual_seed(self.seed))
        images_t, masks_t = transform.apply(images), transform.apply(masks)
        was_training = self.network.training
        self.network.eval()
        with torch.no_grad():
            for k, (name, net) in enumerate(zip(self.network.modalities, self.network.nets)):
                cam = tumour_cam(net(images[:, k:k + 1].to(device))).cpu()[:, 0]
                cam_t = tumour_cam(net(images_t[:, k:k + 1].to(device))).cpu()[:, 0]
                grid = cam_overlay_grid(list(images[:, k]) + list(images_t[:, k]), list(cam) + list(cam_t),
                                        list(masks[:, 0] > 0.5) + list(masks_t[:, 0] > 0.5), ncols=images.shape[0])
                self.writer.add_image(f"{self.tag}/{name} (top: x, bottom: pi(x))", grid, validator.state.epoch,
                                      dataformats="HWC")
        self.writer.flush()
        self.network.train(was_training)
