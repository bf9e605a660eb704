import collections

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import models
from losses import (KERNEL_SCALES, SegLoss, coral, dacs_batch, dice_loss, discriminator_losses, ema_decay, ema_update,
                    entropy_loss, fda, make_teacher, mmd, multilevel_mmd, teacher_probs)


def numpy_dice(logits, target, smooth=1.0):
    """Report 2.3.1 written out: 1 - (1/C) Σ_c (2 Σ_i p_ic δ(g_i, c) + ε) / (Σ_i p_ic + Σ_i δ(g_i, c) + ε)."""
    x = logits.double().numpy()
    p = np.exp(x - x.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    g = target.numpy()
    valid = g != 255
    terms = []
    for c in range(x.shape[1]):
        pc = p[:, c][valid]
        dc = (g[valid] == c).astype(float)
        terms.append((2 * (pc * dc).sum() + smooth) / (pc.sum() + dc.sum() + smooth))
    return 1 - np.mean(terms)


def sample(seed=0, n=2, c=5, h=6, w=7):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, c, h, w, generator=g)
    target = torch.randint(0, c, (n, h, w), generator=g)
    target[torch.rand(n, h, w, generator=g) < 0.2] = 255
    return logits, target


def test_dice_matches_numpy():
    logits, target = sample()
    assert dice_loss(logits, target).item() == pytest.approx(numpy_dice(logits, target), abs=1e-6)


def test_dice_is_zero_for_a_perfect_prediction():
    _, target = sample()
    logits = 200.0 * F.one_hot(target.clamp(max=4), 5).permute(0, 3, 1, 2).float()
    assert dice_loss(logits, target).item() == pytest.approx(0.0, abs=1e-6)
    assert dice_loss(-logits, target).item() > 0.5


def test_ignored_pixels_change_nothing():
    logits, target = sample()
    ignored = (target == 255).unsqueeze(1).expand_as(logits)
    other = logits.clone()
    other[ignored] = torch.randn(int(ignored.sum())) * 50
    loss = SegLoss(0.3)
    assert dice_loss(other, target).item() == pytest.approx(dice_loss(logits, target).item(), abs=1e-7)
    assert loss(other, target).item() == pytest.approx(loss(logits, target).item(), abs=1e-6)


def test_segloss_weights_ce_and_dice():
    logits, target = sample(1)
    ce = F.cross_entropy(logits, target, ignore_index=255).item()
    dice = numpy_dice(logits, target)
    for lam in (0.0, 0.3, 1.0):
        assert SegLoss(lam)(logits, target).item() == pytest.approx((1 - lam) * ce + lam * dice, abs=1e-5)


def test_segloss_on_an_all_ignored_batch_is_zero_not_nan():
    logits = torch.randn(1, 19, 4, 4, requires_grad=True)
    loss = SegLoss()(logits, torch.full((1, 4, 4), 255))
    loss.backward()
    assert loss.item() == 0 and torch.isfinite(logits.grad).all()


def numpy_mmd(s, t, sigma):
    s, t = s.reshape(len(s), -1).astype(np.float64), t.reshape(len(t), -1).astype(np.float64)
    k = lambda a, b: np.mean([[np.exp(-np.sum((x - y) ** 2) / (2 * sigma ** 2)) for y in b] for x in a])
    return k(s, s) + k(t, t) - 2 * k(s, t)


def numpy_mmd_default(s, t):
    z = np.concatenate([s.reshape(len(s), -1), t.reshape(len(t), -1)]).astype(np.float64)
    d2 = ((z[:, None] - z[None]) ** 2).sum(-1)
    off = np.sort(d2[~np.eye(len(z), dtype=bool)])
    med = off[(len(off) - 1) // 2]  # the lower middle value, as torch.median takes
    k = sum(np.exp(-d2 / (med * c)) for c in KERNEL_SCALES) / len(KERNEL_SCALES)
    n = len(s)
    return k[:n, :n].mean() + k[n:, n:].mean() - 2 * k[:n, n:].mean()


def test_mmd_matches_numpy_for_fixed_and_default_bandwidth_and_unequal_batches():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(3, 4, 2, 2, generator=g), torch.randn(5, 4, 2, 2, generator=g) + 0.5
    assert mmd(s, t, sigma=2.0).item() == pytest.approx(numpy_mmd(s.numpy(), t.numpy(), 2.0), abs=1e-5)
    assert mmd(s, t).item() == pytest.approx(numpy_mmd_default(s.numpy(), t.numpy()), abs=1e-5)


def test_mmd_basic_properties():
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(4, 16, generator=g), torch.randn(4, 16, generator=g)
    assert abs(mmd(s, s.clone(), 3.0).item()) < 1e-6 and abs(mmd(s, s.clone()).item()) < 1e-6
    assert mmd(s, t, 3.0).item() >= 0 and mmd(s, t).item() >= 0
    assert mmd(s, t, 3.0).item() == pytest.approx(mmd(t, s, 3.0).item(), abs=1e-6)
    shifts = [mmd(s, t + d, 3.0).item() for d in (0.0, 0.5, 1.0, 2.0)]
    assert shifts == sorted(shifts) and shifts[-1] > shifts[0] + 0.1


def test_mmd_gradient_reaches_both_domains():
    g = torch.Generator().manual_seed(2)
    s = torch.randn(4, 32, generator=g).requires_grad_()
    t = (torch.randn(4, 32, generator=g) + 1).requires_grad_()
    mmd(s, t).backward()
    assert s.grad.abs().sum() > 0 and t.grad.abs().sum() > 0


def test_report_sigma_has_no_gradient_on_real_sized_embeddings_but_default_does():
    g = torch.Generator().manual_seed(3)
    s = torch.randn(4, 2048, 32, 60, generator=g).relu().requires_grad_()
    t = (torch.randn(4, 2048, 32, 60, generator=g) + 0.3).relu().requires_grad_()
    fixed = mmd(s, t, sigma=1.0)
    fixed.backward()
    assert fixed.item() == pytest.approx(1 / 4 + 1 / 4)  # only the diagonal k(x, x) = 1 survives
    assert s.grad.abs().max() == 0 and t.grad.abs().max() == 0
    s.grad, t.grad = None, None
    default = mmd(s, t)
    default.backward()
    assert 0 < default.item() < 2
    assert torch.isfinite(s.grad).all() and s.grad.norm() > 0 and t.grad.norm() > 0


def test_mmd_under_autocast_is_fp32_and_close():
    g = torch.Generator().manual_seed(4)
    s, t = torch.randn(4, 64, 8, 8, generator=g), torch.randn(4, 64, 8, 8, generator=g) + 0.2
    want = mmd(s, t).item()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = mmd(s.bfloat16(), t.bfloat16())
    assert got.dtype == torch.float32 and got.item() == pytest.approx(want, rel=0.05)


def test_multilevel_is_the_mean_of_both_levels():
    g = torch.Generator().manual_seed(5)
    a = {"backbone": torch.randn(2, 8, 2, 2, generator=g), "head": torch.randn(2, 4, 2, 2, generator=g)}
    b = {"backbone": torch.randn(2, 8, 2, 2, generator=g) + 1, "head": torch.randn(2, 4, 2, 2, generator=g)}
    want = (mmd(a["backbone"], b["backbone"], 2.0) + mmd(a["head"], b["head"], 2.0)) / 2
    assert multilevel_mmd(a, b, 2.0).item() == pytest.approx(want.item())


def test_coral_matches_numpy_covariances():
    g = torch.Generator().manual_seed(6)
    s, t = torch.randn(2, 5, 3, 4, generator=g), torch.randn(3, 5, 2, 2, generator=g) * 2 + 1
    # every pixel one sample of d = 5 channels; np.cov takes variables in rows
    cs = np.cov(s.permute(1, 0, 2, 3).reshape(5, -1).double().numpy())
    ct = np.cov(t.permute(1, 0, 2, 3).reshape(5, -1).double().numpy())
    want = ((cs - ct) ** 2).sum() / (4 * 5 * 5)
    assert coral(s, t).item() == pytest.approx(want, rel=1e-5)
    flat = torch.randn(6, 5, generator=g)  # N×d works too
    assert coral(flat, flat.clone()).item() == pytest.approx(0, abs=1e-7)
    assert coral(flat, flat * 3).item() > 0


def test_coral_gradient_reaches_both_domains_and_is_fp32_under_autocast():
    g = torch.Generator().manual_seed(7)
    s = torch.randn(2, 8, 4, 4, generator=g).requires_grad_()
    t = (torch.randn(2, 8, 4, 4, generator=g) * 1.5).requires_grad_()
    coral(s, t).backward()
    assert s.grad.abs().sum() > 0 and t.grad.abs().sum() > 0
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert coral(s.bfloat16(), t.bfloat16()).dtype == torch.float32


def test_a_steps_losses_and_metric_read_nothing_back_from_the_device():
    """On a GPU, a read-back (`.item()`, `if tensor:`) or an output whose shape depends on the data (boolean
    indexing, bincount) makes the CPU wait for the GPU at every step. Traced by torch.compile on the CPU, the
    first cannot be put in one graph (fullgraph=True raises) and the second shows up as a size that is known
    only from the data ("unbacked"): the step's losses and metric update must have neither."""
    from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols
    from utils import ConfusionMatrix

    def step_terms(logits, target, s, t, cm):
        loss = SegLoss()(logits, target) + mmd(s, t) + multilevel_mmd({"backbone": s, "head": t},
                                                                       {"backbone": t, "head": s}) + coral(s, t)
        cm.update(target, logits.argmax(1))
        return loss

    data_dependent = []

    def inspect(graph_module, example_inputs):
        data_dependent.extend(str(n.target) for n in graph_module.graph.nodes
                              if free_unbacked_symbols(n.meta.get("example_value")))
        return graph_module

    torch.manual_seed(0)
    logits, target = torch.randn(2, 19, 8, 16), torch.randint(0, 19, (2, 8, 16))
    target[:, :2] = 255
    s, t = torch.randn(2, 6, 4, 4), torch.randn(2, 6, 4, 4) + 0.5
    eager_cm, traced_cm = ConfusionMatrix(), ConfusionMatrix()
    torch._dynamo.reset()
    traced = torch.compile(step_terms, fullgraph=True, backend=inspect)
    assert torch.equal(traced(logits, target, s, t, traced_cm), step_terms(logits, target, s, t, eager_cm))
    assert data_dependent == []
    assert torch.equal(traced_cm.mat, eager_cm.mat) and traced_cm.mat.sum() == 2 * 6 * 16
    assert SegLoss()(logits, torch.full_like(target, 255)).item() == 0  # no labelled pixel: 0, not NaN


def test_seg_loss_summed_over_processes_is_the_whole_batchs_loss_and_gradient():
    """Under DDP each process holds part of the batch; with its sums added over processes (reduce) its loss and
    the gradient on its own images are the whole batch's. Two halves stand in for two processes here."""
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(4, 19, 8, 8, generator=g, requires_grad=True)
    target = torch.randint(0, 19, (4, 8, 8), generator=g)
    target[0, :3] = 255  # the halves hold different numbers of labelled pixels
    whole = SegLoss(0.3)(logits, target)
    (grad_whole,) = torch.autograd.grad(whole, logits)
    other = {}
    SegLoss(0.3, reduce=lambda v: other.setdefault("sums", v.detach()))(logits[2:], target[2:])
    mine = logits[:2].detach().requires_grad_()
    half = SegLoss(0.3, reduce=lambda v: v + other["sums"])(mine, target[:2])
    (grad_half,) = torch.autograd.grad(half, mine)
    assert half.item() == pytest.approx(whole.item(), rel=1e-6)
    assert torch.allclose(grad_half, grad_whole[:2], atol=1e-9)
    mean_of_halves = (SegLoss(0.3)(logits[:2], target[:2]) + SegLoss(0.3)(logits[2:], target[2:])) / 2
    assert abs(mean_of_halves.item() - whole.item()) > 1e-3  # what averaging per-process losses would give


# ----------------------------------------------------------------------------- target-side terms

def numpy_softmax(logits):
    x = logits.double().numpy()
    p = np.exp(x - x.max(1, keepdims=True))
    return p / p.sum(1, keepdims=True)


def test_entropy_loss_is_the_mean_normalised_entropy_and_is_fp32_under_autocast():
    logits, _ = sample(3, c=19)
    p = numpy_softmax(logits)
    want = (-(p * np.log(p)).sum(1) / np.log(19)).mean()
    assert entropy_loss(logits).item() == pytest.approx(want, rel=1e-5)
    sure = torch.zeros(1, 19, 2, 2)
    sure[:, 4] = 50
    assert entropy_loss(sure).item() < 1e-12 and entropy_loss(torch.zeros(1, 19, 2, 2)).item() == pytest.approx(1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert entropy_loss(logits.bfloat16()).dtype == torch.float32
    valid = torch.rand(logits.shape[0], *logits.shape[2:], generator=torch.Generator().manual_seed(4)) < 0.6
    per_pixel = -(p * np.log(p)).sum(1) / np.log(19)
    assert entropy_loss(logits, valid).item() == pytest.approx(per_pixel[valid.numpy()].mean(), rel=1e-5)


def test_the_teacher_follows_dacss_ramp_then_its_decay_and_takes_the_models_statistics():
    """DACS's trainUDA.py: alpha = min(1 - 1 / (iteration + 1), alpha_teacher), iteration counted from 0, after each
    step. Over the first steps the teacher is the plain mean of the model's weights so far; then a moving average
    with the decay; BatchNorm's running statistics are the model's; gradients never reach it."""
    def dacs(iteration, alpha_teacher):  # as written in DACS's code
        return min(1 - 1 / (iteration + 1), alpha_teacher)
    assert [ema_decay(steps, 0.9) for steps in range(1, 30)] == [dacs(i, 0.9) for i in range(29)]
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    teacher = make_teacher(model)
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    thetas = []
    for steps in range(1, 5):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        model(torch.randn(2, 3, 8, 8))  # train mode: the running statistics move
        thetas.append([p.detach().clone() for p in model.parameters()])
        ema_update(teacher, model, ema_decay(steps, 0.7))
        if steps <= 3:  # decays 0, 1/2, 2/3: the mean of θ1..θk
            want = [sum(t[i] for t in thetas) / steps for i in range(2)]
        else:  # 0.7 from here on
            want = [0.7 * w + 0.3 * t for w, t in zip(want, thetas[-1])]
        assert all(torch.allclose(p, w, atol=1e-6) for p, w in zip(teacher.parameters(), want))
        assert all(torch.equal(a, b) for a, b in zip(teacher.buffers(), model.buffers()))
    probs = teacher_probs(teacher, torch.randn(2, 3, 8, 8, dtype=torch.float64).float())
    assert probs.dtype == torch.float32 and torch.allclose(probs.sum(1), torch.ones(2, 6, 6))


def test_dacs_batch_is_classmix_of_the_teachers_labels_with_its_weight():
    """dacs_batch, called on its own: with no augmentation (probabilities 0), the images, labels and weights are
    ClassMix of the source on the target, the teacher's argmax where nothing is pasted, and the batch's share of
    sure target pixels."""
    from losses import class_mix_masks
    g = torch.Generator().manual_seed(2)
    source, target = torch.rand(2, 3, 6, 8, generator=g) * 255, torch.rand(2, 3, 6, 8, generator=g) * 255
    source_labels = torch.randint(0, 5, (2, 6, 8), generator=g)
    probs = torch.softmax(torch.randn(2, 19, 6, 8, generator=g) * 3, 1)
    valid = torch.ones(2, 6, 8, dtype=torch.bool)
    torch.manual_seed(5)
    images, labels, weights, share = dacs_batch(probs, source, source_labels, target, valid, 0.5, (0.0, 0.2), 0.0,
                                                (0.0, 0.0))
    torch.manual_seed(5)
    paste = class_mix_masks(source_labels, 19)
    sure = (probs.max(1).values >= 0.5).float().mean()
    assert share.item() == pytest.approx(sure.item()) and 0 < share < 1
    assert torch.allclose(images, torch.where(paste.unsqueeze(1), source, target))
    assert torch.equal(labels, torch.where(paste, source_labels, probs.argmax(1)))
    assert torch.equal(weights, torch.where(paste, 1.0, share))
    assert paste.any() and not paste.all()
    # the target's padding and the ignored bands: label IGNORE and weight 0 where not pasted; the weight counts the
    # other processes' pixels through reduce; augmentation on (probability 1) changes every image, not the labels
    valid[:, :, -2:] = False  # two padded columns
    torch.manual_seed(5)
    images2, labels2, weights2, share2 = dacs_batch(probs, source, source_labels, target, valid, 0.5, (1.0, 0.2), 1.0,
                                                    (1 / 6, 0.0), reduce=lambda c: c + torch.tensor([0.0, 100.0]))
    kept = valid.clone()
    kept[:, 0] = False  # the top band: one row of six
    sure = ((probs.max(1).values >= 0.5) & valid).sum()
    assert share2.item() == pytest.approx(sure.item() / (valid.sum().item() + 100))
    assert torch.equal(labels2, torch.where(paste, source_labels, torch.where(kept, probs.argmax(1), 255)))
    assert torch.equal(weights2, torch.where(paste, 1.0, share2 * kept))
    assert all(not torch.allclose(images2[i], images[i]) for i in range(2))


def numpy_fda(source, target, beta):
    """FDA_source_to_target_np from the FDA authors' code: per channel, shift the spectra, paste the target's
    amplitude over the centred square [c - b, c + b] with b = floor(beta · min(h, w)), shift back."""
    out = []
    for s, t in zip(source.astype(np.float64), target.astype(np.float64)):
        fs, ft = np.fft.fft2(s, axes=(-2, -1)), np.fft.fft2(t, axes=(-2, -1))
        amp_s, pha_s, amp_t = np.abs(fs), np.angle(fs), np.abs(ft)
        amp_s, amp_t = np.fft.fftshift(amp_s, axes=(-2, -1)), np.fft.fftshift(amp_t, axes=(-2, -1))
        h, w = s.shape[-2:]
        b = int(np.floor(min(h, w) * beta))
        ch, cw = h // 2, w // 2
        amp_s[:, ch - b:ch + b + 1, cw - b:cw + b + 1] = amp_t[:, ch - b:ch + b + 1, cw - b:cw + b + 1]
        amp_s = np.fft.ifftshift(amp_s, axes=(-2, -1))
        out.append(np.clip(np.real(np.fft.ifft2(amp_s * np.exp(1j * pha_s), axes=(-2, -1))), 0, 255))
    return np.stack(out)


@pytest.mark.parametrize("h, w", [(32, 64), (31, 45)])
def test_fda_matches_the_authors_numpy_version(h, w):
    g = torch.Generator().manual_seed(2)
    source = torch.randint(0, 256, (2, 3, h, w), generator=g, dtype=torch.uint8)
    target = (torch.rand(2, 3, h, w, generator=g) * 80 + 150).to(torch.uint8)  # a brighter domain
    for beta in (0.01, 0.05, 0.09, 0.5):
        got = fda(source, target, beta)
        assert got.dtype == torch.float32
        assert np.allclose(got.numpy(), numpy_fda(source.numpy(), target.numpy(), beta), atol=1e-2)
    # the zero frequency is always swapped: a dark image's channel means move to the target's (nothing clips)
    dark = source // 4
    assert torch.allclose(fda(dark, target, 0.01).mean((2, 3)), target.float().mean((2, 3)), atol=1e-2)
    assert torch.allclose(fda(source, source, 0.09), source.float(), atol=1e-2)  # its own spectrum: unchanged


def test_discriminator_is_adaptsegnets():
    d = models.Discriminator(19)
    convs = [m for m in d.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [(m.in_channels, m.out_channels, m.kernel_size, m.stride) for m in convs] == [
        (19, 64, (4, 4), (2, 2)), (64, 128, (4, 4), (2, 2)), (128, 256, (4, 4), (2, 2)), (256, 512, (4, 4), (2, 2)),
        (512, 1, (4, 4), (2, 2))]
    assert [m.negative_slope for m in d.modules() if isinstance(m, torch.nn.LeakyReLU)] == [0.2] * 4
    assert d(torch.rand(2, 19, 64, 128)).shape == (2, 1, 2, 4)


def test_adversarial_terms_train_each_side_only_on_its_own_objective():
    """One backward over net term + discriminator term: the discriminator's gradient is that of its own BCE
    (source 1, target 0), the maps' gradient that of the net's BCE (target called source), each computed here
    on its own with plain autograd."""
    torch.manual_seed(0)
    d = models.Discriminator(5, width=8)
    ps = torch.softmax(torch.randn(2, 5, 32, 32), 1).requires_grad_()
    pt = torch.softmax(torch.randn(2, 5, 32, 32), 1).requires_grad_()
    adv, d_loss = discriminator_losses(d, ps, pt)
    (adv + d_loss).backward()
    got_d, got_pt = [p.grad.clone() for p in d.parameters()], pt.grad.clone()
    assert ps.grad is None  # the source maps train nothing through the discriminator

    bce = F.binary_cross_entropy_with_logits
    d.zero_grad()
    ds, dt = d(ps.detach()), d(pt.detach())
    want_d = (bce(ds, torch.ones_like(ds)) + bce(dt, torch.zeros_like(dt))) / 2
    want_d.backward()
    assert want_d.item() == pytest.approx(d_loss.item())
    assert all(torch.allclose(a, p.grad, atol=1e-7) for a, p in zip(got_d, d.parameters()))
    x = pt.detach().clone().requires_grad_()
    fooled = d(x)
    want_adv = bce(fooled, torch.ones_like(fooled))
    want_adv.backward()
    assert want_adv.item() == pytest.approx(adv.item())
    assert torch.allclose(got_pt, x.grad, atol=1e-9) and got_pt.abs().sum() > 0


# ----------------------------------------------------------------------------- DACS

def test_class_mix_pastes_half_the_source_classes_rounded_up_and_never_the_ignore_label():
    from losses import class_mix_masks
    labels = torch.tensor([[[0, 0, 1, 1], [2, 2, 255, 255]],   # 3 classes (255 is none): 2 pasted
                           [[5, 5, 5, 5], [5, 255, 5, 5]],     # 1 class: pasted
                           [[255] * 4, [255] * 4],              # nothing labelled: nothing pasted
                           [[0, 1, 2, 3], [0, 1, 2, 3]]])       # 4 classes: 2 pasted
    torch.manual_seed(0)
    subsets = collections.Counter()
    for _ in range(600):
        mask = class_mix_masks(labels, 19)
        assert not mask[labels == 255].any()
        for image, m in zip(labels, mask):  # a class is pasted on all of its pixels or on none
            pasted = {c for c in image.unique().tolist() if c != 255 and m[image == c].all()}
            assert pasted == set(image[m].unique().tolist())
        counts = [len(set(image[m].unique().tolist())) for image, m in zip(labels, mask)]
        assert counts == [2, 1, 0, 2]
        subsets[tuple(sorted(set(labels[0][mask[0]].tolist())))] += 1
    # each of the three pairs of {0, 1, 2} about equally often (200 expected; 5 sigma is about 58)
    assert set(subsets) == {(0, 1), (0, 2), (1, 2)} and all(140 < v < 260 for v in subsets.values()), subsets


def test_dacs_weight_is_one_share_for_the_batch_and_the_loss_a_mean_over_every_pixel():
    from losses import confidence_weight, dacs_loss
    probs = torch.zeros(2, 3, 1, 4)
    top = torch.tensor([[0.99, 0.97, 0.5, 0.968], [0.4, 0.99, 0.99, 0.2]])  # 5 of 8 pixels >= 0.968
    probs[:, 0] = top.view(2, 1, 4)
    probs[:, 1] = (1 - top).view(2, 1, 4)
    assert confidence_weight(probs, 0.968).item() == pytest.approx(5 / 8)
    valid = torch.tensor([[True, True, True, True], [False, False, True, True]]).view(2, 1, 4)
    assert confidence_weight(probs, 0.968, valid).item() == pytest.approx(4 / 6)  # padding not counted
    logits = torch.randn(2, 3, 1, 4)
    labels = torch.tensor([[0, 1, 255, 2], [2, 2, 0, 255]]).view(2, 1, 4)
    weights = torch.tensor([[1.0, 0.5, 0.5, 0.5], [1.0, 0.5, 0.0, 0.5]]).view(2, 1, 4)
    log_p = torch.log_softmax(logits, 1).numpy()
    want = np.mean([-log_p[i, labels[i, 0, j], 0, j] * weights[i, 0, j].item() if labels[i, 0, j] != 255 else 0.0
                    for i in range(2) for j in range(4)])
    assert dacs_loss(logits, labels, weights).item() == pytest.approx(want, rel=1e-6)


def test_strong_augmentation_is_drawn_per_image_and_off_at_probability_0():
    from losses import kernel_side, strong_augment
    assert [kernel_side(h) for h in (128, 96, 64, 32, 512)] == [13, 9, 7, 3, 51]  # ceil(0.1 H), odd
    torch.manual_seed(0)
    image = torch.rand(1, 3, 16, 32)
    same = image.repeat(4, 1, 1, 1)
    assert torch.equal(strong_augment(same, 0.0, 0.2, 0.0), same)
    out = strong_augment(same, 1.0, 0.2, 1.0)
    assert all(not torch.allclose(out[i], out[j]) for i in range(4) for j in range(i))
    assert out.min() >= 0 and out.max() <= 1


def test_the_dacs_terms_read_nothing_back_from_the_device():
    """As the step's other losses (above): ClassMix, the weight and the loss trace into one graph with no size
    known only from the data."""
    from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols
    from losses import class_mix_masks, confidence_weight, dacs_loss

    def terms(logits, teacher_logits, source_labels):
        probs = torch.softmax(teacher_logits, 1)
        paste = class_mix_masks(source_labels, 19)
        share = confidence_weight(probs, 0.968)
        labels = torch.where(paste, source_labels, probs.argmax(1))
        return dacs_loss(logits, labels, torch.where(paste, 1.0, share)), paste

    data_dependent = []

    def inspect(graph_module, example_inputs):
        data_dependent.extend(str(n.target) for n in graph_module.graph.nodes
                              if free_unbacked_symbols(n.meta.get("example_value")))
        return graph_module

    logits, teacher_logits = torch.randn(2, 19, 8, 16), torch.randn(2, 19, 8, 16) * 4
    source_labels = torch.randint(0, 19, (2, 8, 16))
    source_labels[:, :2] = 255
    torch._dynamo.reset()
    traced = torch.compile(terms, fullgraph=True, backend=inspect)
    torch.manual_seed(1)
    loss, paste = traced(logits, teacher_logits, source_labels)
    torch.manual_seed(1)
    want_loss, want_paste = terms(logits, teacher_logits, source_labels)
    assert data_dependent == [] and torch.equal(paste, want_paste) and torch.allclose(loss, want_loss)


def test_class_mix_labels_and_weights_by_hand():
    from losses import class_mix, outside_bands
    source = torch.full((1, 3, 2, 3), 200.0)
    target = torch.full((1, 3, 2, 3), 10.0)
    source_labels = torch.tensor([[[1, 1, 255], [2, 2, 2]]])
    pseudo = torch.tensor([[[7, 8, 9], [7, 8, 9]]])
    paste = torch.tensor([[[True, True, False], [False, False, False]]])
    valid = torch.tensor([[[True, True, True], [True, False, True]]])  # one padded pixel
    images, labels, weights = class_mix(source, source_labels, target, pseudo, paste, torch.tensor(0.25), valid)
    assert images[0, :, 0].tolist() == [[200.0, 200.0, 10.0]] * 3 and (images[0, :, 1] == 10).all()
    assert labels.tolist() == [[[1, 1, 9], [7, 255, 9]]]
    assert weights.tolist() == [[[1.0, 1.0, 0.25], [0.25, 0.0, 0.25]]]
    rows = outside_bands(torch.ones(1, 10, 2, dtype=torch.bool), 0.1, 0.3)  # rows 0 and 7-9 out
    assert rows[0, :, 0].tolist() == [False] + [True] * 6 + [False] * 3
    assert outside_bands(valid, 0, 0).equal(valid)


def test_the_dacs_weight_sums_over_processes_and_draws_are_the_global_batchs():
    from losses import class_mix_masks, confidence_weight, strong_augment
    probs = torch.zeros(1, 2, 1, 4)
    probs[0, 0, 0] = torch.tensor([0.99, 0.99, 0.5, 0.5])
    probs[0, 1] = 1 - probs[0, 0]
    other_ranks = torch.tensor([3.0, 10.0])  # 3 sure pixels of 10 elsewhere
    assert confidence_weight(probs, 0.968, reduce=lambda c: c + other_ranks).item() == pytest.approx(5 / 14)
    # under torchrun, rank r's draws are rows r·n.. of the draws one process makes for the global batch
    labels = torch.randint(0, 19, (4, 8, 8))
    torch.manual_seed(3)
    whole = class_mix_masks(labels, 19)
    for rank in (0, 1):
        torch.manual_seed(3)
        assert torch.equal(class_mix_masks(labels[2 * rank:2 * rank + 2], 19, rank, 2), whole[2 * rank:2 * rank + 2])
    images = torch.rand(4, 3, 8, 8)
    torch.manual_seed(4)
    whole = strong_augment(images, 0.5, 0.2, 0.5)
    for rank in (0, 1):
        torch.manual_seed(4)
        part = strong_augment(images[2 * rank:2 * rank + 2], 0.5, 0.2, 0.5, rank=rank, world=2)
        assert torch.equal(part, whole[2 * rank:2 * rank + 2])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch.manual_seed(4)
        assert torch.equal(strong_augment(images, 0.5, 0.2, 0.5), whole)  # fp32 under autocast
