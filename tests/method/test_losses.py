import math

import pytest
import torch
import torch.nn.functional as F

from scripts.method.losses import (
    CMERObjective,
    FullSupervisionObjective,
    ObjectiveConfig,
    classification_loss,
    cmer_loss,
    er_loss,
    kd_loss,
    l2_normalise,
    lambda_e,
    reduce_squared,
    tumour_cam,
)


class HorizontalFlip:
    """A minimal stand-in for a drawn equivariance transform (exact, all pixels valid)."""

    def apply(self, x):
        return torch.flip(x, dims=(-1,))

    def inverse(self, y):
        return torch.flip(y, dims=(-1,))

    def valid_mask(self, dtype=torch.float32, device="cpu"):
        return None


class HalfValidShift:
    """Shift right by 1 with zero fill: the first column comes from outside the field."""

    def apply(self, x):
        return F.pad(x, (1, 0))[..., :-1]

    def valid_mask(self, dtype=torch.float32, device="cpu"):
        mask = torch.ones(2, 1, 2, 3, dtype=dtype)
        mask[..., 0] = 0
        return mask


# ----------------------------------------------------------------------------- schedules


def test_lambda_e_paper_schedule_matches_the_formula():
    assert lambda_e(15, "paper", 15) == 1.0
    assert lambda_e(20, "paper", 15) == 1.0
    assert lambda_e(14, "paper", 15) == pytest.approx(math.exp(-1))
    assert lambda_e(13, "paper", 15) == pytest.approx(math.exp(-4))
    assert lambda_e(1, "paper", 15) == pytest.approx(math.exp(-196))


def test_lambda_e_alternatives():
    assert lambda_e(3, "constant", 15) == 1.0
    assert lambda_e(5, "polynomial", 10, gamma=2) == pytest.approx(0.25)
    assert lambda_e(5, "sigmoid", 10) == pytest.approx(math.exp(-5 * 0.25))
    assert lambda_e(12, "sigmoid", 10) == 1.0
    assert lambda_e(5, "polynomial", 10, gamma=2, value=2.0) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="schedule"):
        lambda_e(1, "cosine")


def test_lambda_e_is_monotone_for_every_schedule():
    for schedule in ("paper", "sigmoid", "polynomial"):
        values = [lambda_e(t, schedule, 10) for t in range(1, 15)]
        assert values == sorted(values), schedule


# ----------------------------------------------------------------------------- helpers


def test_tumour_cam_uses_the_authors_max_normaliser():
    maps = torch.zeros(1, 2, 1, 3)
    maps[0, 1, 0] = torch.tensor([-1.0, 1.0, 3.0])
    cam = tumour_cam(maps)
    # relu -> [0, 1, 3]; min 0, max 3 -> [0, 1/3, 1]
    assert torch.allclose(cam[0, 0, 0], torch.tensor([0.0, 1 / 3, 1.0]), atol=1e-6)


def test_l2_normalise_per_sample():
    x = torch.tensor([[[[3.0, 4.0]]], [[[0.0, 2.0]]]])
    y = l2_normalise(x, eps=0.0)
    assert torch.allclose(y.flatten(1).norm(dim=1), torch.ones(2))
    assert torch.allclose(y[0, 0, 0], torch.tensor([0.6, 0.8]))


def test_reduce_squared_mean_and_per_sample_sum():
    sq = torch.tensor([[[[1.0, 3.0]]], [[[5.0, 7.0]]]])  # B=2, 1x2 pixels
    w = torch.tensor([1.0, 0.0])
    assert reduce_squared(sq, None, None, "mean").item() == pytest.approx(4.0)
    assert reduce_squared(sq, w, None, "mean").item() == pytest.approx(1.0)  # (1+3)/4
    assert reduce_squared(sq, w, None, "per_sample_sum").item() == pytest.approx(4.0)  # (1+3)/1
    valid = torch.tensor([[[[1.0, 0.0]]], [[[1.0, 0.0]]]])
    assert reduce_squared(sq, None, valid, "mean").item() == pytest.approx(3.0)  # (1+5)/2


def test_reduce_squared_per_sample_mean():
    sq = torch.tensor([[[[1.0, 3.0]]], [[[5.0, 7.0]]]])
    w = torch.tensor([1.0, 0.0])
    assert reduce_squared(sq, w, None, "per_sample_mean").item() == pytest.approx(2.0)  # (1+3)/2, 1 sample
    assert reduce_squared(sq, None, None, "per_sample_mean").item() == pytest.approx(4.0)
    valid = torch.tensor([[[[1.0, 0.0]]], [[[1.0, 1.0]]]])
    assert reduce_squared(sq, None, valid, "per_sample_mean").item() == pytest.approx((1.0 + 6.0) / 2)


def test_switches_from_the_command_line_are_read_as_flags():
    """`--objective#use_er false` arrives as the string 'false': it must switch the term off."""
    cfg = ObjectiveConfig.from_dict({"use_er": "false", "use_kd": "False", "use_cmer": "true", "two_views": None})
    assert cfg.use_er is False and cfg.use_kd is False and cfg.use_cmer is True and cfg.two_views is None
    assert ObjectiveConfig.from_dict({"two_views": "true"}).two_views is True
    with pytest.raises(Exception, match="objective#use_er"):
        ObjectiveConfig.from_dict({"use_er": "maybe"})


def test_balanced_reduction_puts_each_term_at_its_maps_scale():
    """balanced: L_ER = per-pixel mean per sample (max-normalised maps), L_CMER = per-sample sum
    (unit-norm maps), each averaged over the samples it applies to."""
    torch.manual_seed(0)
    a, b = torch.rand(4, 1, 6, 5), torch.rand(4, 1, 6, 5)
    labels = torch.tensor([1, 0, 1, 1])
    balanced = ObjectiveConfig(reduction="balanced")
    per_sample = ObjectiveConfig(reduction="per_sample_sum")
    assert er_loss(a, b, labels, balanced).item() == pytest.approx(er_loss(a, b, labels, per_sample).item() / 30)
    pred = torch.tensor([True, True, False, True])
    args = (l2_normalise(a), b, l2_normalise(b), a, labels, pred, pred)
    assert cmer_loss(*args, balanced).item() == pytest.approx(cmer_loss(*args, per_sample).item())
    with pytest.raises(ValueError, match="reduction"):
        ObjectiveConfig(reduction="sum")


# ----------------------------------------------------------------------------- terms


def test_classification_loss_is_the_mean_of_both_views():
    labels = torch.tensor([1, 0])
    lo = torch.tensor([[0.0, 2.0], [1.0, 0.0]])
    lt = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    expected = 0.5 * (F.cross_entropy(lo, labels) + F.cross_entropy(lt, labels))
    assert torch.allclose(classification_loss(lo, lt, labels), expected)
    # hand value of one sample: CE([0, 2], 1) = log(1 + e^-2)
    assert F.cross_entropy(lo[:1], labels[:1]).item() == pytest.approx(math.log(1 + math.exp(-2)))


def test_kd_loss_hand_value_and_temperature():
    student = torch.tensor([[0.0, 0.0]])
    teacher = torch.tensor([[0.0, math.log(3.0)]])  # softmax = [0.25, 0.75]
    p = torch.tensor([0.25, 0.75])
    expected = (p * (p / 0.5).log()).sum().item()
    assert kd_loss(student, teacher, None, None, 1.0).item() == pytest.approx(expected, rel=1e-5)
    # both views averaged
    both = kd_loss(student, teacher, student, student, 1.0).item()
    assert both == pytest.approx(0.5 * expected, rel=1e-5)
    # temperature T: T^2 * KL of the softened distributions
    t = 10.0
    pt = torch.softmax(teacher / t, dim=1)[0]
    expected_t = t**2 * (pt * (pt / 0.5).log()).sum().item()
    assert kd_loss(student, teacher, None, None, t).item() == pytest.approx(expected_t, rel=1e-4)


def test_er_loss_hand_value_on_positive_slices_only():
    cfg = ObjectiveConfig()
    pi_m = torch.tensor([[[[1.0, 0.0]]], [[[1.0, 1.0]]]])
    m_t = torch.tensor([[[[0.0, 0.0]]], [[[0.0, 0.0]]]])
    labels = torch.tensor([1, 0])
    # only sample 0 counts: squared diff sum 1, divided by N*H*W = 4
    assert er_loss(pi_m, m_t, labels, cfg).item() == pytest.approx(0.25)
    cfg_all = ObjectiveConfig(er_positive_only=False)
    assert er_loss(pi_m, m_t, labels, cfg_all).item() == pytest.approx(0.75)
    cfg_sum = ObjectiveConfig(reduction="per_sample_sum")
    assert er_loss(pi_m, m_t, labels, cfg_sum).item() == pytest.approx(1.0)


def test_er_loss_out_of_field_mask_switch():
    transform = HalfValidShift()
    valid = transform.valid_mask()
    pi_m = torch.ones(2, 1, 2, 3)
    m_t = torch.zeros(2, 1, 2, 3)
    m_t[..., 0] = 1.0  # differs only on the valid pixels -> 1 everywhere valid
    labels = torch.ones(2, dtype=torch.long)
    plain = er_loss(pi_m, m_t, labels, ObjectiveConfig(), valid).item()
    masked = er_loss(pi_m, m_t, labels, ObjectiveConfig(mask_out_of_field=True), valid).item()
    assert plain == pytest.approx(8 / 12)
    assert masked == pytest.approx(1.0)


def test_cmer_loss_hand_value_and_partner_mask():
    cfg = ObjectiveConfig()
    a = torch.tensor([[[[1.0, 0.0]]]])
    b = torch.tensor([[[[0.0, 1.0]]]])
    labels = torch.tensor([1])
    yes, no = torch.tensor([True]), torch.tensor([False])
    # own pi(M) = a, own M~ = a, partner pi(M) = b, partner M~ = b: each term ||a-b||^2 = 2, mean over 2 pixels
    value = cmer_loss(a, a, b, b, labels, yes, yes, cfg).item()
    assert value == pytest.approx(0.5 * (1.0 + 1.0))
    # partner predicts healthy on the transformed view: term 1 is masked out
    assert cmer_loss(a, a, b, b, labels, yes, no, cfg).item() == pytest.approx(0.5)
    cfg_nomask = ObjectiveConfig(cmer_partner_mask=False)
    assert cmer_loss(a, a, b, b, labels, no, no, cfg_nomask).item() == pytest.approx(1.0)
    assert cmer_loss(a, a, b, b, torch.tensor([0]), yes, yes, cfg).item() == 0.0


def test_cmer_normalises_the_transformed_view_maps():
    cfg = ObjectiveConfig(cmer_partner_mask=False)
    a = torch.tensor([[[[1.0, 0.0]]]])
    labels = torch.tensor([1])
    t = torch.tensor([True])
    # M~ scaled by 5 must give the same value after L2 normalisation
    assert cmer_loss(a, 5 * a, a, 5 * a, labels, t, t, cfg).item() == pytest.approx(0.0, abs=1e-6)


def test_config_rejects_unknown_options():
    with pytest.raises(ValueError, match="unknown objective option"):
        ObjectiveConfig.from_dict({"use_rer": True})
    with pytest.raises(ValueError, match="reduction"):
        ObjectiveConfig(reduction="sum")


# ----------------------------------------------------------------------------- objective


def _two_nets(seed=0):
    torch.manual_seed(seed)
    return [torch.nn.Conv2d(1, 2, 3, padding=1, bias=False) for _ in range(2)]


def _run_objective(nets, cfg, x, labels, transform):
    maps_o = [net(x[:, k:k + 1]) for k, net in enumerate(nets)]
    maps_t = [net(transform.apply(x[:, k:k + 1])) for k, net in enumerate(nets)]
    return CMERObjective(cfg)(["t1", "t2"], maps_o, maps_t, labels, transform, lambda_e_value=1.0)


def test_objective_terms_present_and_switchable():
    x = torch.randn(4, 2, 8, 8)
    labels = torch.tensor([1, 0, 1, 1])
    out = _run_objective(_two_nets(), ObjectiveConfig(), x, labels, HorizontalFlip())
    assert set(out.per_modality["t1"]) == {"L_C", "L_KD", "L_ER", "L_CMER", "loss"}
    cfg = ObjectiveConfig(use_kd=False, use_cmer=False, use_er=False)
    out = _run_objective(_two_nets(), cfg, x, labels, HorizontalFlip())
    assert set(out.per_modality["t1"]) == {"L_C", "loss"}
    assert torch.allclose(out.per_modality["t1"]["loss"], out.per_modality["t1"]["L_C"])


def test_objective_total_is_equation_8():
    x = torch.randn(4, 2, 8, 8)
    labels = torch.tensor([1, 0, 1, 1])
    cfg = ObjectiveConfig()
    nets = _two_nets()
    maps_o = [net(x[:, k:k + 1]) for k, net in enumerate(nets)]
    maps_t = [net(torch.flip(x[:, k:k + 1], dims=(-1,))) for k, net in enumerate(nets)]
    out = CMERObjective(cfg)(["t1", "t2"], maps_o, maps_t, labels, HorizontalFlip(), lambda_e_value=0.3)
    for name in ("t1", "t2"):
        t = out.per_modality[name]
        expected = t["L_C"] + 0.5 * t["L_KD"] + 0.3 * (t["L_ER"] + t["L_CMER"])
        assert torch.allclose(t["loss"], expected)
    assert torch.allclose(out.total, out.per_modality["t1"]["loss"] + out.per_modality["t2"]["loss"])


def test_flip_equivariant_network_has_zero_er():
    # A conv whose kernel is symmetric left-right commutes with the horizontal flip.
    net = torch.nn.Conv2d(1, 2, 3, padding=1, bias=False)
    with torch.no_grad():
        net.weight.copy_((net.weight + torch.flip(net.weight, dims=(-1,))) / 2)
    x = torch.randn(3, 1, 8, 8)
    out = CMERObjective(ObjectiveConfig(use_kd=False, use_cmer=False))(
        ["t1"], [net(x)], [net(torch.flip(x, dims=(-1,)))], torch.ones(3, dtype=torch.long), HorizontalFlip()
    )
    assert out.per_modality["t1"]["L_ER"].item() == pytest.approx(0.0, abs=1e-10)


def test_each_network_gradient_depends_only_on_its_own_loss():
    x = torch.randn(4, 2, 8, 8)
    labels = torch.tensor([1, 0, 1, 1])
    nets = _two_nets()
    out = _run_objective(nets, ObjectiveConfig(), x, labels, HorizontalFlip())
    out.total.backward()
    grads_total = [n.weight.grad.clone() for n in nets]

    nets_again = _two_nets()
    out = _run_objective(nets_again, ObjectiveConfig(), x, labels, HorizontalFlip())
    out.per_modality["t1"]["loss"].backward()
    assert torch.allclose(nets_again[0].weight.grad, grads_total[0], atol=1e-7)
    assert nets_again[1].weight.grad is None  # the detached partner receives no gradient


def test_partner_terms_send_no_gradient_to_the_partner():
    x = torch.randn(4, 2, 8, 8)
    labels = torch.ones(4, dtype=torch.long)
    nets = _two_nets()
    out = _run_objective(nets, ObjectiveConfig(), x, labels, HorizontalFlip())
    (out.per_modality["t1"]["L_KD"] + out.per_modality["t1"]["L_CMER"]).backward()
    assert nets[1].weight.grad is None
    assert nets[0].weight.grad is not None and nets[0].weight.grad.abs().sum() > 0


def test_single_modality_skips_cross_terms():
    x = torch.randn(2, 1, 8, 8)
    net = _two_nets()[0]
    out = CMERObjective(ObjectiveConfig())(
        ["flair"], [net(x)], [net(torch.flip(x, dims=(-1,)))], torch.tensor([1, 0]), HorizontalFlip()
    )
    assert set(out.per_modality["flair"]) == {"L_C", "L_ER", "loss"}


def _rigged_maps(tumour_logit: list[float], size: int = 4) -> torch.Tensor:
    """(B, 2, H, W) maps whose GAP logits are (0, l) per sample, with some spatial structure."""
    maps = torch.zeros(len(tumour_logit), 2, size, size)
    for n, value in enumerate(tumour_logit):
        maps[n, 1] = value
        maps[n, 1, 0, 0] += 1.0  # a peak, so the normalised CAM is not all zero
        maps[n, 1, 0, 1] -= 1.0
    return maps.requires_grad_(True)


def test_partner_trust_more_accurate_lets_only_better_partners_teach():
    labels = torch.tensor([1, 1, 0, 0])
    good = _rigged_maps([3.0, 3.0, -3.0, -3.0])  # right on all four slices
    poor = _rigged_maps([3.0, -3.0, 3.0, -3.0])  # right on two
    for maps in (good, poor):
        maps.retain_grad()
    maps_o = [good, poor]
    maps_t = [torch.flip(good, dims=(-1,)), torch.flip(poor, dims=(-1,))]
    paper = CMERObjective(ObjectiveConfig())(["flair", "t2"], maps_o, maps_t, labels, HorizontalFlip())
    trusted = CMERObjective(ObjectiveConfig(partner_trust="more_accurate"))(
        ["flair", "t2"], maps_o, maps_t, labels, HorizontalFlip())
    # The better network learns from no one: its cross terms are exact zeros (still logged) ...
    assert trusted.per_modality["flair"]["L_KD"].item() == 0.0
    assert trusted.per_modality["flair"]["L_CMER"].item() == 0.0
    assert paper.per_modality["flair"]["L_KD"].item() > 0.1
    # ... while the poorer one is taught by the better exactly as under the paper's "all" (one partner).
    for term in ("L_KD", "L_CMER"):
        assert torch.allclose(trusted.per_modality["t2"][term], paper.per_modality["t2"][term])
    trusted.per_modality["flair"]["loss"].backward()
    assert good.grad is not None and poor.grad is None  # zeros keep the graph, send nothing to the partner
    with pytest.raises(ValueError, match="partner_trust"):
        ObjectiveConfig(partner_trust="best")


def test_full_supervision_objective_uses_monai_dice_ce():
    maps = torch.zeros(1, 2, 4, 4)
    mask = torch.zeros(1, 1, 4, 4)
    mask[..., :2, :2] = 1
    maps[:, 1] = 10 * (mask[:, 0] * 2 - 1)  # confident and correct
    good = FullSupervisionObjective()(["t1"], [maps], None, None, mask=mask).total.item()
    bad = FullSupervisionObjective()(["t1"], [-maps], None, None, mask=mask).total.item()
    assert good < 0.05 < bad
    with pytest.raises(ValueError, match="mask"):
        FullSupervisionObjective()(["t1"], [maps], None, None)


def test_full_supervision_augmentation_scores_the_transformed_view_against_the_transformed_mask():
    from scripts.method.trainer import TransformSampler

    mask = torch.zeros(2, 1, 8, 8)
    mask[..., :3, :5] = 1  # not symmetric: a rotation moves it
    maps = torch.zeros(2, 2, 8, 8)
    maps[:, 1] = 10 * (mask[:, 0] * 2 - 1)
    transform = TransformSampler(["rotation"], {"rotation_ks": [1]}, seed=0).draw(2, 8, 8)
    objective = FullSupervisionObjective(augment=True)
    assert objective.needs_transform and not FullSupervisionObjective().needs_transform
    right = objective(["t1"], [maps], [transform.apply(maps)], None, transform, mask=mask).total.item()
    wrong = objective(["t1"], [maps], [maps], None, transform, mask=mask).total.item()  # pi(x) mapped like x
    assert right < 0.05 < wrong
    plain = FullSupervisionObjective()(["t1"], [maps], None, None, mask=mask).total.item()
    assert right == pytest.approx(plain, abs=1e-4)  # both views correct = the plain loss
