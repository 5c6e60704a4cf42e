"""The method's loss terms (Patel & Dolz, Eqs. 2-8) and the lambda_E(t) schedules.

Notation per modality network k, for one minibatch:
  maps_o[k]  raw output maps of the original view          (B, 2, H, W)
  maps_t[k]  raw output maps of the transformed view pi(x) (B, 2, H', W')
  M_k        max-normalised tumour CAM of the original view
  M~_k       max-normalised tumour CAM of the transformed view
  pi(M_k)    M_k moved by the same transform as the images

Defaults reproduce the paper; where the paper is silent they follow the authors' code
(official-code-facts.md). Every deviation is a named switch in `ObjectiveConfig`.
Everything taken from a partner modality j is detached, so each network's gradient
depends only on its own loss and one backward over the summed losses is exact.

No MONAI loss fits here: the terms compare two networks' CAMs under a spatial transform
and need the per-sample label and partner-prediction masks of the authors' method.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

import torch
import torch.nn.functional as F

from scripts.common import TUMOUR_CHANNEL
from scripts.model.cams import logits_from_maps, max_normalise, parse_pooling
from scripts.runtime import as_flag

REDUCTIONS = ("mean", "per_sample_sum", "balanced")
SCHEDULES = ("paper", "sigmoid", "polynomial", "constant")
CMER_NORMALISE = ("before_transform", "after_transform")
PARTNER_TRUST = ("all", "more_accurate")


_FLAGS = ("use_er", "use_kd", "use_cmer", "er_positive_only", "cmer_partner_mask", "cmer_positive_only",
          "mask_out_of_field", "two_views")


@dataclass
class ObjectiveConfig:
    """Switches and weights of the objective. Defaults = the paper (Eq. 8)."""

    use_er: bool = True  # L_ER, Eq. 2
    use_kd: bool = True  # L_KD, Eq. 3 (needs K >= 2)
    use_cmer: bool = True  # L_CMER, Eq. 4 (needs K >= 2)
    lambda_kd: float = 0.5
    kd_temperature: float = 1.0  # Eq. 3 has none; the authors' code used 10
    # The authors' code reduced the squared maps over N*H*W ("mean"); "per_sample_sum"
    # is the squared L2 norm of Eq. 2/4 per sample, averaged over the samples it applies to;
    # "balanced" reduces each term at the scale of the maps it compares (see `reduce_squared`).
    reduction: str = "mean"
    er_positive_only: bool = True  # code: L_ER only on tumour slices (y = 1)
    cmer_partner_mask: bool = True  # code: only where partner j predicts tumour on that view
    cmer_positive_only: bool = True  # code: mask includes y = 1
    cmer_normalise: str = "before_transform"  # Eq. 4: pi(M / ||M||); code: pi(M) / ||pi(M)||
    mask_out_of_field: bool = False  # improvement: ignore pixels pi brought in from outside
    # Which partners j teach network k through L_KD and L_CMER: "all" (the paper) or
    # "more_accurate" (improvement): only partners that classify this batch's slices (both views)
    # more accurately than k does, so a modality that has not learnt yet cannot pull a better one
    # down (docs/recipe.md). The teachers are chosen per batch from the labels; nothing is kept.
    partner_trust: str = "all"
    # Run the transformed view even without ER/CMER (L_C and L_KD then use both views, as
    # in the siamese ablations of Table III); None = only when ER or CMER needs it.
    two_views: bool | None = None
    eps: float = 1e-8

    def __post_init__(self):
        # `--objective#use_er false` arrives as the string 'false', which is truthy: read every
        # yes/no switch as a flag (None stays None for two_views).
        for name in _FLAGS:
            value = getattr(self, name)
            if value is not None or name != "two_views":
                setattr(self, name, as_flag(value, f"objective#{name}"))
        if self.reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {self.reduction!r}")
        if self.partner_trust not in PARTNER_TRUST:
            raise ValueError(f"partner_trust must be one of {PARTNER_TRUST}, got {self.partner_trust!r}")
        if self.cmer_normalise not in CMER_NORMALISE:
            raise ValueError(f"cmer_normalise must be one of {CMER_NORMALISE}, got {self.cmer_normalise!r}")
        if self.kd_temperature <= 0:
            raise ValueError(f"kd_temperature must be > 0, got {self.kd_temperature}")

    @classmethod
    def from_dict(cls, values: dict | None) -> "ObjectiveConfig":
        values = dict(values or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown objective option(s) {unknown}; known: {sorted(known)}")
        return cls(**values)

    @property
    def needs_transform(self) -> bool:
        if self.two_views is not None:
            return bool(self.two_views)
        return self.use_er or self.use_cmer


# ----------------------------------------------------------------------------- schedules


def lambda_e(epoch: float, schedule: str = "paper", rampup_epochs: float = 15.0, gamma: float = 2.0,
             value: float = 1.0) -> float:
    """Weight of the equivariance terms at (1-based) epoch t.

    paper:      exp(-(t - T)^2) for t < T, 1 after (Section IV-C, T = 15)
    sigmoid:    exp(-5 (1 - t/T)^2) for t < T, 1 after (the usual sigmoid-shaped ramp-up)
    polynomial: min(1, (t / T)^gamma) (the authors' older code, with t = epoch + 1 there)
    constant:   1 (the authors' released code)
    Every form is multiplied by `value` (the plateau).
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"lambda_E schedule must be one of {SCHEDULES}, got {schedule!r}")
    t, big_t = float(epoch), float(rampup_epochs)
    if schedule == "constant" or big_t <= 0 or t >= big_t:
        return float(value)
    if schedule == "paper":
        weight = math.exp(-((t - big_t) ** 2))
    elif schedule == "sigmoid":
        weight = math.exp(-5.0 * (1.0 - max(t, 0.0) / big_t) ** 2)
    else:
        weight = min(1.0, (max(t, 0.0) / big_t) ** gamma)
    return float(value) * weight


# ----------------------------------------------------------------------------- helpers


def tumour_cam(maps: torch.Tensor) -> torch.Tensor:
    """Max-normalised tumour CAM (B, 1, H, W) with the authors' normaliser (differentiable)."""
    return max_normalise(maps[:, TUMOUR_CHANNEL:TUMOUR_CHANNEL + 1])


def l2_normalise(maps: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Divide each sample's map by its L2 norm over (H, W) (Eq. 4)."""
    norm = maps.flatten(1).norm(p=2, dim=1).view(-1, *([1] * (maps.dim() - 1)))
    return maps / (norm + eps)


def reduce_squared(diff_sq: torch.Tensor, sample_weight: torch.Tensor | None, valid: torch.Tensor | None,
                   reduction: str) -> torch.Tensor:
    """Reduce a (B, 1, H, W) squared difference to a scalar.

    sample_weight (B,) selects samples (labels, partner predictions); valid (B, 1, H, W)
    marks in-field pixels. "mean" divides by all N*H*W pixels (in-field ones when valid is
    given) as the authors' code did; "per_sample_sum" sums each sample's pixels and averages
    over the samples with non-zero weight. "per_sample_mean" (what `balanced` uses for L_ER)
    averages each sample's pixels, then averages over the samples with non-zero weight.
    """
    weighted = diff_sq
    if valid is not None:
        weighted = weighted * valid
    if sample_weight is not None:
        weighted = weighted * sample_weight.view(-1, 1, 1, 1)
    # Counts known on the host stay Python numbers: a tensor made on the host and copied to a
    # GPU would wait for the queued forward (a hidden sync) in every loss term.
    if reduction == "mean":
        if valid is not None:
            return weighted.sum() / valid.sum().clamp_min(1.0)
        return weighted.sum() / max(float(diff_sq.numel()), 1.0)
    if reduction == "per_sample_mean":  # each sample's mean over its (in-field) pixels
        pixels = valid.flatten(1).sum(1).clamp_min(1.0) if valid is not None else max(float(diff_sq[0].numel()), 1.0)
        weighted = weighted.flatten(1).sum(1) / pixels
    if sample_weight is not None:
        return weighted.sum() / sample_weight.sum().clamp_min(1.0)
    return weighted.sum() / max(float(diff_sq.shape[0]), 1.0)


def term_reduction(reduction: str, term: str) -> str:
    """The reduction a term uses under the configured `reduction`.

    "balanced" puts each term at the scale of the maps it compares, so that with lambda_E = 1
    neither vanishes nor swamps L_C: L_ER compares max-normalised maps (values in [0, 1]) and
    is averaged over pixels per sample, as L_C's global average pooling averages the maps;
    L_CMER compares unit-L2-norm maps, whose per-sample squared distance (Eq. 4's norm, in
    [0, 4]) is already scale-free, so it is summed per sample. Measured gradient shares:
    docs/recipe.md.
    """
    if reduction != "balanced":
        return reduction
    return "per_sample_mean" if term == "L_ER" else "per_sample_sum"


# ----------------------------------------------------------------------------- terms


def classification_loss(logits_o: torch.Tensor, logits_t: torch.Tensor | None, labels: torch.Tensor) -> torch.Tensor:
    """L_C, Eq. 5: cross-entropy on both views, averaged (original view only if no transform)."""
    loss = F.cross_entropy(logits_o, labels)
    if logits_t is None:
        return loss
    return 0.5 * (loss + F.cross_entropy(logits_t, labels))


def kl_to_teacher(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * KL(softmax(z_teacher/T) || softmax(z_student/T)), batch mean; teacher detached."""
    log_student = F.log_softmax(student_logits / temperature, dim=1)
    log_teacher = F.log_softmax(teacher_logits.detach() / temperature, dim=1)
    kl = F.kl_div(log_student, log_teacher, reduction="batchmean", log_target=True)
    return kl * temperature**2


def kd_loss(logits_o: torch.Tensor, partner_logits_o: torch.Tensor, logits_t: torch.Tensor | None,
            partner_logits_t: torch.Tensor | None, temperature: float = 1.0) -> torch.Tensor:
    """L_KD(k, j), Eq. 3: distil partner j's posteriors into k on both views."""
    loss = kl_to_teacher(logits_o, partner_logits_o, temperature)
    if logits_t is None:
        return loss
    return 0.5 * (loss + kl_to_teacher(logits_t, partner_logits_t, temperature))


def er_loss(pi_cam_o: torch.Tensor, cam_t: torch.Tensor, labels: torch.Tensor, cfg: ObjectiveConfig,
            valid: torch.Tensor | None = None) -> torch.Tensor:
    """L_ER, Eq. 2: || pi(M_k) - M~_k ||^2 (gradients flow through both branches)."""
    weight = labels.to(cam_t.dtype) if cfg.er_positive_only else None
    return reduce_squared((pi_cam_o - cam_t) ** 2, weight, valid if cfg.mask_out_of_field else None,
                          term_reduction(cfg.reduction, "L_ER"))


def cmer_loss(own_pi_o: torch.Tensor, own_t: torch.Tensor, partner_pi_o: torch.Tensor, partner_t: torch.Tensor,
              labels: torch.Tensor, partner_pred_o: torch.Tensor, partner_pred_t: torch.Tensor,
              cfg: ObjectiveConfig, valid: torch.Tensor | None = None) -> torch.Tensor:
    """L_CMER(k, j), Eq. 4, on L2-normalised maps; partner j's maps are detached.

    own_pi_o / partner_pi_o: pi(M) of the original view (already L2-normalised as cfg says),
    own_t / partner_t: M~ of the transformed view (L2-normalised here).
    Term 1 compares k's pi(M_k) with j's M~_j (masked by j's prediction on the transformed
    view); term 2 compares k's M~_k with j's pi(M_j) (masked by j's prediction on the
    original view), as in the authors' code.
    """
    own_t = l2_normalise(own_t, cfg.eps)
    partner_t = l2_normalise(partner_t, cfg.eps).detach()
    partner_pi_o = partner_pi_o.detach()
    base = labels.to(own_t.dtype) if cfg.cmer_positive_only else torch.ones_like(labels, dtype=own_t.dtype)
    weight_1 = base * partner_pred_t.to(own_t.dtype) if cfg.cmer_partner_mask else base
    weight_2 = base * partner_pred_o.to(own_t.dtype) if cfg.cmer_partner_mask else base
    valid = valid if cfg.mask_out_of_field else None
    reduction = term_reduction(cfg.reduction, "L_CMER")
    term_1 = reduce_squared((own_pi_o - partner_t) ** 2, weight_1, valid, reduction)
    term_2 = reduce_squared((own_t - partner_pi_o) ** 2, weight_2, valid, reduction)
    return 0.5 * (term_1 + term_2)


def batch_accuracies(logits_o: list[torch.Tensor], logits_t: list, labels: torch.Tensor) -> list[float]:
    """Each network's slice accuracy (a Python float) on this batch, over both views when there are two."""
    out = []
    for lo, lt in zip(logits_o, logits_t):
        correct = (lo.detach().argmax(dim=1) == labels).float().mean()
        if lt is not None:
            correct = 0.5 * (correct + (lt.detach().argmax(dim=1) == labels).float().mean())
        out.append(float(correct))
    return out


# ----------------------------------------------------------------------------- objective


@dataclass
class ObjectiveOutput:
    total: torch.Tensor  # sum over modalities of L(Theta_k): one backward trains all K nets
    per_modality: dict = field(default_factory=dict)  # modality -> {term: tensor}


class CMERObjective:
    """Eq. 8 for K modality networks: L_C + lambda_KD * mean_j L_KD + lambda_E (L_ER + mean_j L_CMER).

    Args:
        config: the switches and weights (`ObjectiveConfig` or train.yaml's `objective` mapping).
        pooling: slice logits from the maps, "gap" (the paper) or "topk:<fraction>"
            (`scripts.model.cams.pooling_spec`); must be the network's own.
    """

    def __init__(self, config: ObjectiveConfig | dict | None = None, pooling: str | None = None):
        self.config = config if isinstance(config, ObjectiveConfig) else ObjectiveConfig.from_dict(config)
        # (kind, topk_fraction) of the slice logits: the network's own pooling (the trainer checks)
        self.pooling = parse_pooling(pooling)

    @property
    def needs_transform(self) -> bool:
        return self.config.needs_transform

    def __call__(self, modalities, maps_o, maps_t, labels, transform=None, lambda_e_value: float = 1.0,
                 mask=None, only=None) -> ObjectiveOutput:
        """`only` (indices of modalities) limits the losses computed, for a per-network backward."""
        cfg = self.config
        k_count = len(modalities)
        logits_o = [logits_from_maps(m, *self.pooling) for m in maps_o]
        logits_t = [logits_from_maps(m, *self.pooling) for m in maps_t] if maps_t is not None else [None] * k_count
        cross = k_count > 1 and (cfg.use_kd or cfg.use_cmer)

        cams_o = cams_t = pi_cams = pi_cams_l2 = valid = None
        if maps_t is not None and (cfg.use_er or (cfg.use_cmer and k_count > 1)):
            cams_o = [tumour_cam(m) for m in maps_o]
            cams_t = [tumour_cam(m) for m in maps_t]
            pi_cams = [transform.apply(c) for c in cams_o]
            if cfg.use_cmer and k_count > 1:
                if cfg.cmer_normalise == "before_transform":
                    pi_cams_l2 = [transform.apply(l2_normalise(c, cfg.eps)) for c in cams_o]
                else:
                    pi_cams_l2 = [l2_normalise(c, cfg.eps) for c in pi_cams]
            if cfg.mask_out_of_field:
                valid = transform.valid_mask(dtype=cams_t[0].dtype, device=cams_t[0].device)
        preds_o = [lo.argmax(dim=1) == TUMOUR_CHANNEL for lo in logits_o] if cross else None
        preds_t = [lt.argmax(dim=1) == TUMOUR_CHANNEL for lt in logits_t] if cross and maps_t is not None else None

        accuracy = batch_accuracies(logits_o, logits_t, labels) if cross and cfg.partner_trust != "all" else None

        per_modality, total = {}, 0.0
        for k, name in enumerate(modalities):
            if only is not None and k not in only:
                continue
            terms = {"L_C": classification_loss(logits_o[k], logits_t[k], labels)}
            loss = terms["L_C"]
            partners = [j for j in range(k_count) if j != k]
            if accuracy is not None:  # partner_trust "more_accurate"
                partners = [j for j in partners if accuracy[j] > accuracy[k]]
            # With no trusted partner a cross term is an exact zero that keeps k's graph, so it
            # is still logged (and its gradient share measured) every iteration.
            no_partner = logits_o[k].sum() * 0.0
            if cfg.use_kd and k_count > 1:
                terms["L_KD"] = sum(
                    (kd_loss(logits_o[k], logits_o[j], logits_t[k], logits_t[j], cfg.kd_temperature) for j in partners),
                    no_partner) / max(len(partners), 1)
                loss = loss + cfg.lambda_kd * terms["L_KD"]
            equivariance = 0.0
            if cfg.use_er and cams_t is not None:
                terms["L_ER"] = er_loss(pi_cams[k], cams_t[k], labels, cfg, valid)
                equivariance = equivariance + terms["L_ER"]
            if cfg.use_cmer and k_count > 1 and pi_cams_l2 is not None:
                terms["L_CMER"] = sum(
                    (cmer_loss(pi_cams_l2[k], cams_t[k], pi_cams_l2[j], cams_t[j], labels, preds_o[j], preds_t[j],
                               cfg, valid) for j in partners),
                    no_partner) / max(len(partners), 1)
                equivariance = equivariance + terms["L_CMER"]
            if torch.is_tensor(equivariance):
                loss = loss + lambda_e_value * equivariance
            terms["loss"] = loss
            per_modality[name] = terms
            total = total + loss
        return ObjectiveOutput(total=total, per_modality=per_modality)


class FullSupervisionObjective:
    """Upper bound of Table II: the same backbone trained on the masks with Dice + CE.

    MONAI's DiceCELoss on the 2-channel maps (softmax), one per modality network. With
    `augment`, the trainer also draws the transform pi of each batch (the transform sampler
    of the weak method: flips, rotations, scalings, translations) and the loss is the mean
    over the original view and pi(x) against pi(mask): ordinary data augmentation, which the
    paper names as what gives fully supervised networks their equivariance (Section I).

    Args:
        lambda_dice: weight of the Dice term.
        lambda_ce: weight of the cross-entropy term.
        augment: False = the original view only; True = also the transformed view and mask.
    """

    def __init__(self, lambda_dice: float = 1.0, lambda_ce: float = 1.0, augment: bool = False):
        from monai.losses import DiceCELoss

        self.loss = DiceCELoss(to_onehot_y=True, softmax=True, lambda_dice=lambda_dice, lambda_ce=lambda_ce)
        self.augment = bool(augment)

    @property
    def needs_transform(self) -> bool:
        return self.augment

    def __call__(self, modalities, maps_o, maps_t, labels, transform=None, lambda_e_value: float = 1.0,
                 mask=None, only=None) -> ObjectiveOutput:
        if mask is None:
            raise ValueError("full supervision needs the batch's 'mask' (pixel labels)")
        target = (mask > 0.5).long()
        views = maps_t is not None and transform is not None
        # pi(mask) through the same geometry as pi(x); interpolated values re-binarised at 0.5
        target_t = (transform.apply(mask.float()) > 0.5).long() if views else None
        per_modality, total = {}, 0.0
        for k, name in enumerate(modalities):
            if only is not None and k not in only:
                continue
            loss = self.loss(maps_o[k], target)
            if views:
                loss = 0.5 * (loss + self.loss(maps_t[k], target_t))
            per_modality[name] = {"L_DiceCE": loss, "loss": loss}
            total = total + loss
        return ObjectiveOutput(total=total, per_modality=per_modality)
