"""The segmentation loss (CE + Dice), the domain losses (MMD, the report's, and CORAL), and the target-side
terms of phase 2: entropy minimisation, FDA, the adversarial terms, and self-training (an EMA teacher, DACS's
mixed batch)."""
import copy
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

import batchnorm
from utils import IGNORE

# Multipliers of the data-driven bandwidth: a family of Gaussian kernels around it, averaged (multi-kernel MMD,
# as in Long et al.'s DAN), so that no single guess of the scale decides whether the loss carries gradient.
KERNEL_SCALES = (0.25, 0.5, 1.0, 2.0, 4.0)


def dice_sums(logits, target, ignore_index=IGNORE):
    """Per class: Σ p·g, Σ p and Σ g over the batch's labelled pixels (p: softmax, g: one-hot target)."""
    num_classes = logits.shape[1]
    valid = (target != ignore_index).unsqueeze(1)
    probs = torch.softmax(logits.float(), 1) * valid
    # one_hot by comparison: F.one_hot checks the values' range, a read-back to the host on GPUs
    classes = torch.arange(num_classes, device=target.device).view(1, -1, 1, 1)
    onehot = (target.unsqueeze(1) == classes).long() * valid
    dims = (0, 2, 3)
    return (probs * onehot).sum(dims), probs.sum(dims), onehot.sum(dims).float()


def dice_from_sums(inter, probs, onehot, smooth=1.0):
    return 1 - ((2 * inter + smooth) / (probs + onehot + smooth)).mean()


def dice_loss(logits, target, smooth=1.0, ignore_index=IGNORE):
    """1 - mean over the C classes of (2 Σ p·g + ε) / (Σ p + Σ g + ε), report 2.3.1.

    p: softmax probabilities, g: one-hot target, sums over all pixels of the batch; pixels labelled
    ignore_index count in neither sum.
    """
    return dice_from_sums(*dice_sums(logits, target, ignore_index), smooth)


class SegLoss(nn.Module):
    """(1 - lambda_dice) · CE + lambda_dice · Dice, both ignoring label IGNORE (255).

    Both are ratios of sums over the batch's pixels. reduce (Context.sum_over_ranks in training) sums those
    over all processes first, so that under DDP each process's loss is the global batch's, as one process
    training on the whole batch would compute it (a mean of per-process Dice scores would not be)."""

    def __init__(self, lambda_dice=0.3, smooth=1.0, ignore_index=IGNORE, reduce=None):
        super().__init__()
        self.lambda_dice, self.smooth, self.ignore_index, self.reduce = lambda_dice, smooth, ignore_index, reduce

    def forward(self, logits, target):
        ce = F.cross_entropy(logits.float(), target, ignore_index=self.ignore_index, reduction="sum")
        labelled = (target != self.ignore_index).sum().float()
        sums = [ce.view(1), labelled.view(1)]
        if self.lambda_dice:
            sums += dice_sums(logits, target, self.ignore_index)
        if self.reduce is not None:
            sizes = [len(t) for t in sums]
            sums = self.reduce(torch.cat(sums)).split(sizes)
        # CE's mean over the labelled pixels, as sum / count: a batch without any gives 0, not NaN, with no test
        # that would read a value back from the GPU
        ce = sums[0][0] / sums[1][0].clamp_min(1)
        if self.lambda_dice == 0:
            return ce
        return (1 - self.lambda_dice) * ce + self.lambda_dice * dice_from_sums(*sums[2:], self.smooth)


def mmd(source, target, sigma=None):
    """Biased MMD² between two batches with a Gaussian kernel k(x, y) = exp(-‖x - y‖² / (2σ²)):

        MMD² = mean k(s, s') + mean k(r, r') - 2 mean k(s, r)

    The report prints this without the exp and without the per-term 1/n² normalisation; this is the standard
    estimator it cites. source: N×D or N×C×H×W (each embedding flattened, as the report did), target: M×...,
    N and M may differ.

    sigma: a float fixes the bandwidth (sigma=1 reproduces the report). On flattened layer4 embeddings of
    ~10⁶ dimensions, ‖x - y‖² is ~10⁵ or more, so with σ = 1 every cross term underflows to exactly 0: the
    loss is the constant 1/N + 1/M and its gradient is zero. sigma=None (default) sets σ² from the median
    pairwise squared distance of the batch (detached) and averages kernels at KERNEL_SCALES × that σ², so the
    loss carries gradient at any embedding scale.

    Computed in fp32 whatever autocast is active: exp of large negative numbers and the distance sums are
    not safe in 16-bit floats.
    """
    with torch.autocast(device_type=source.device.type, enabled=False):
        s, t = source.float().flatten(1), target.float().flatten(1)
        if s.shape[1] != t.shape[1]:
            raise ValueError(f"mmd: embeddings differ in size ({s.shape[1]} vs {t.shape[1]})")
        z = torch.cat([s, t])
        z = z - z.mean(0, keepdim=True).detach()  # distances are unchanged; the Gram trick loses less precision
        sq = (z * z).sum(1)
        m = z.shape[0]
        off_diag = ~torch.eye(m, dtype=torch.bool, device=z.device)
        # the diagonal is exactly 0; computed, it would be rounding noise of the size of ‖z‖² × 1e-7
        d2 = ((sq[:, None] + sq[None, :] - 2 * z @ z.T) * off_diag).clamp_min(0)
        if sigma is None:
            # the m(m-1) entries off the diagonal by their flat index (row r, column c, skipping c = r): a fixed
            # shape, where a boolean mask would wait for the GPU to know how many it selects
            k = torch.arange(m * (m - 1), device=z.device)
            row, col = k // (m - 1), k % (m - 1)
            off = d2.detach().flatten()[row * m + col + (col >= row).long()]
            base = off.median().clamp_min(1e-12)  # 2σ² = the (lower) median of ‖x - y‖² over pairs x ≠ y
            kernel = sum(torch.exp(-d2 / (base * c)) for c in KERNEL_SCALES) / len(KERNEL_SCALES)
        else:
            kernel = torch.exp(-d2 / (2 * float(sigma) ** 2))
        n = s.shape[0]
        return kernel[:n, :n].mean() + kernel[n:, n:].mean() - 2 * kernel[:n, n:].mean()


def multilevel_mmd(source_taps, target_taps, sigma=None):
    """Mean of the backbone MMD and the head (ASPP) MMD, report 2.3.2."""
    return (mmd(source_taps["backbone"], target_taps["backbone"], sigma)
            + mmd(source_taps["head"], target_taps["head"], sigma)) / 2


def coral(source, target):
    """Deep CORAL (Sun & Saenko, 2016): ‖C_s - C_t‖²_F / (4 d²), C the covariance of d-channel features.

    source, target: N×d or N×d×H×W; every pixel of a feature map is one sample of its domain (covariances
    of flattened images would be 10⁶ × 10⁶). Computed in fp32, as MMD is.
    """
    with torch.autocast(device_type=source.device.type, enabled=False):
        def covariance(x):
            x = x.float().movedim(1, -1).reshape(-1, x.shape[1])
            x = x - x.mean(0, keepdim=True)
            return x.T @ x / (len(x) - 1)
        d = source.shape[1]
        return (covariance(source) - covariance(target)).pow(2).sum() / (4 * d * d)


# ----------------------------------------------------------------------------- target-side terms (DESIGN.md §8)

def normalised_entropy(probs):
    """Per pixel -Σ p log p / log C of N×C×H×W probabilities: 0 = certain, 1 = uniform over the C classes."""
    return -(probs * torch.log(probs.clamp_min(1e-12))).sum(1) / math.log(probs.shape[1])


def uncertainty_mask(probs, entropy_threshold, confidence_threshold):
    """True where a pixel is too uncertain to trust (report 4.1, sign fixed): normalised entropy above
    entropy_threshold, or top probability below confidence_threshold. visualize.py masks these pixels."""
    return (normalised_entropy(probs) > entropy_threshold) | (probs.max(1).values < confidence_threshold)


def entropy_loss(logits, valid=None):
    """ADVENT's MinEnt (Vu et al., 2019): the mean over pixels (those where valid is True: not padding) of the
    softmax's entropy divided by log C."""
    with torch.autocast(device_type=logits.device.type, enabled=False):
        log_p = torch.log_softmax(logits.float(), 1)
        entropy = -(log_p.exp() * log_p).sum(1) / math.log(logits.shape[1])
        if valid is None:
            return entropy.mean()
        return (entropy * valid).sum() / valid.sum().clamp_min(1)


def fda(source, target, beta):
    """Fourier domain adaptation (Yang & Soatto, 2020): each source image with the amplitude spectrum of its
    target image in the centred low-frequency square of half-side b = floor(beta · min(H, W)) (FDA's own
    code: 2b + 1 frequencies a side), the source's phase everywhere, per channel, clipped to 0..255.
    source, target: N×3×H×W, 0..255 (uint8 or float), on the same device; returns float32."""
    with torch.autocast(device_type=source.device.type, enabled=False):
        h, w = source.shape[-2:]
        b = int(math.floor(beta * min(h, w)))
        rows = torch.arange(h, device=source.device) - h // 2
        cols = torch.arange(w, device=source.device) - w // 2
        low = (rows.abs()[:, None] <= b) & (cols.abs()[None, :] <= b)  # in fftshift's layout: centre = (h//2, w//2)
        low = torch.fft.ifftshift(low)  # back to fft2's layout, frequency 0 at (0, 0)
        fs, ft = torch.fft.fft2(source.float()), torch.fft.fft2(target.float())
        amplitude = torch.where(low, ft.abs(), fs.abs())
        mixed = torch.fft.ifft2(torch.polar(amplitude, fs.angle())).real
        return mixed.clamp(0, 255)


def discriminator_losses(discriminator, source_probs, target_probs):
    """Output-space adversarial training (AdaptSegNet, Tsai et al., 2018), as two terms of one backward:

    - the discriminator's: BCE on detached softmax maps, source labelled 1, target 0 (mean of the two);
    - the segmentation net's: BCE of the discriminator's view of the target map against the source label,
      through detached discriminator weights, so that only the segmentation net learns from it.
    Returns (adversarial term for the net, the discriminator's loss)."""
    bce = F.binary_cross_entropy_with_logits
    d_source, d_target = discriminator(source_probs.detach()), discriminator(target_probs.detach())
    d_loss = (bce(d_source, torch.ones_like(d_source)) + bce(d_target, torch.zeros_like(d_target))) / 2
    frozen = {k: v.detach() for k, v in discriminator.named_parameters()}
    fooled = torch.func.functional_call(discriminator, frozen, (target_probs,))
    return bce(fooled, torch.ones_like(fooled)), d_loss


# ----------------------------------------------------------------------------- self-training: the teacher

def make_teacher(model):
    """A copy of the model that gradients never reach, only ema_update: it predicts in eval mode, on target
    images with the target statistics (--bn domain)."""
    return batchnorm.set_domain(copy.deepcopy(model).eval().requires_grad_(False), "target")


def ema_decay(steps, alpha):
    """DACS's ramp: after `steps` optimiser steps the teacher keeps min(1 - 1/steps, alpha) of itself, so that at
    first it follows the student closely (the plain mean of its weights so far), later with decay alpha."""
    return min(1 - 1 / steps, alpha)


@torch.no_grad()
def ema_update(teacher, model, decay):
    """teacher <- decay · teacher + (1 - decay) · model, parameter by parameter; BatchNorm's running statistics
    are copied."""
    torch._foreach_lerp_(list(teacher.parameters()), list(model.parameters()), 1 - decay)
    for mine, theirs in zip(teacher.buffers(), model.buffers()):
        mine.copy_(theirs)


@torch.no_grad()
def teacher_probs(teacher, images):
    """The teacher's softmax on normalised images, in fp32: its argmax is the pseudo-label, its top probability
    the confidence."""
    return torch.softmax(teacher(images).float(), 1)


# ----------------------------------------------------------------------------- DACS self-training (Tranheden et al.)

def dacs_batch(probs, source, source_labels, target, valid, threshold, jitter, blur, ignore, rank=0, world=1,
               reduce=None):
    """DACS's mixed batch from the teacher's probs on the clean target images: ClassMix images (0..255, float,
    strongly augmented), their labels and pixel weights, and the pseudo-label weight (one number; the global
    batch's with reduce). source, target: N×3×H×W 0..255 on the device; valid: the target's own pixels."""
    share = confidence_weight(probs, threshold, valid, reduce)
    paste = class_mix_masks(source_labels, probs.shape[1], rank, world)
    images, labels, weights = class_mix(source.float(), source_labels, target.float(), probs.argmax(1), paste, share,
                                        outside_bands(valid, *ignore))
    images = strong_augment(images / 255, *jitter, blur, rank=rank, world=world)
    return images * 255, labels, weights, share


def class_mix_masks(labels, num_classes, rank=0, world=1):
    """ClassMix masks, N×H×W bool: in each source label map, ceil(n/2) of its n classes drawn at random (every
    subset of that size equally likely), True on their pixels. IGNORE is not a class here (the references count
    it): unlabelled source pixels are never pasted, so the target pixels under them keep their pseudo-labels.
    All on the device, without torch.unique or a boolean index (each would wait for the GPU). Under torchrun
    every process draws the global batch's numbers (same seed) and takes its own rank's rows."""
    n = labels.shape[0]
    index = torch.where(labels == IGNORE, num_classes, labels).flatten(1)  # IGNORE -> an extra column
    present = torch.zeros(n, num_classes + 1, dtype=torch.bool, device=labels.device)
    present.scatter_(1, index, True)
    present[:, num_classes] = False
    # a random rank for each class, present ones first: the ceil(n/2) lowest ranks are a uniform random subset
    draws = torch.rand(world * n, num_classes + 1, device=labels.device)[rank * n:(rank + 1) * n]
    scores = torch.where(present, draws, 2.0)
    ranks = scores.argsort(1).argsort(1)
    chosen = present & (ranks < (present.sum(1, keepdim=True) + 1) // 2)
    return chosen.gather(1, index).view_as(labels)


def confidence_weight(teacher_probs, threshold, valid=None, reduce=None):
    """DACS's pseudo-label weight: ONE number for the batch, the share of target pixels (where valid) whose
    teacher top probability is >= threshold. reduce (Context.sum_over_ranks) makes it the global batch's."""
    sure = teacher_probs.max(1).values >= threshold
    valid = torch.ones_like(sure) if valid is None else valid
    counts = torch.stack([(sure & valid).sum(), valid.sum()]).float()
    counts = counts if reduce is None else reduce(counts)
    return counts[0] / counts[1].clamp_min(1)


def class_mix(source, source_labels, target, pseudo, paste, weight, valid):
    """One batch of ClassMix: images paste·source + (1 − paste)·target (N×3×H×W), labels the source's where
    pasted and the pseudo-labels elsewhere, pixel weights 1 where pasted, else the batch's `weight` where
    valid and 0 where not (padding, ignored bands: their label is IGNORE too)."""
    images = torch.where(paste.unsqueeze(1), source, target)
    labels = torch.where(paste, source_labels, torch.where(valid, pseudo, IGNORE))
    return images, labels, torch.where(paste, 1.0, weight * valid)


def outside_bands(valid, top, bottom):
    """valid (N×H×W bool) with the top and bottom bands, shares of the height (DAFormer's ignored rows:
    rectification border and ego vehicle), set False."""
    h = valid.shape[1]
    rows = torch.arange(h, device=valid.device).view(1, -1, 1)
    return valid & (rows >= round(top * h)) & (rows < h - round(bottom * h))


def dacs_loss(logits, labels, weights):
    """The mixed images' loss: the mean over ALL their pixels of CE · weight (CE 0 where labels is IGNORE),
    as both references compute it."""
    with torch.autocast(device_type=logits.device.type, enabled=False):
        ce = F.cross_entropy(logits.float(), labels, ignore_index=IGNORE, reduction="none")
        return (ce * weights).mean()


def kernel_side(height):
    """The blur kernel's side: about a tenth of the image height, odd (ceil(0.1 H), minus 1 if even), as the
    references compute their kernel's height (their width follows the image's width; ours is square)."""
    k = math.ceil(0.1 * height)
    return k if k % 2 else k - 1


def strong_augment(images, jitter_p, jitter, blur_p, sigma=(0.15, 1.15), rank=0, world=1):
    """DACS's strong augmentation of the mixed images, drawn per image: with probability jitter_p colour jitter
    (brightness, contrast and saturation factors in 1 ± jitter, hue shift in ± jitter, in that order), then with
    probability blur_p a Gaussian blur of sigma ~ U(sigma) and kernel_side(H). images: N×3×H×W in 0..1 on the
    device. The draws come from the CPU generator as Python numbers, so the GPU is never waited for; under
    torchrun each process takes its rank's rows of the global batch's draws. In fp32 whatever autocast is on."""
    import torchvision.transforms.v2.functional as TF
    n, out = len(images), []
    draws = torch.rand(world * n, 7)[rank * n:(rank + 1) * n].tolist()
    with torch.autocast(device_type=images.device.type, enabled=False):
        for x, r in zip(images.float(), draws):
            if r[0] < jitter_p:
                x = TF.adjust_brightness(x, 1 + jitter * (2 * r[1] - 1))
                x = TF.adjust_contrast(x, 1 + jitter * (2 * r[2] - 1))
                x = TF.adjust_saturation(x, 1 + jitter * (2 * r[3] - 1))
                x = TF.adjust_hue(x, jitter * (2 * r[4] - 1))
            if r[5] < blur_p:
                s = sigma[0] + (sigma[1] - sigma[0]) * r[6]
                x = TF.gaussian_blur(x, [kernel_side(x.shape[-2])] * 2, [s, s])
            out.append(x)
        return torch.stack(out)
