"""BatchNorm where two domains meet: phase 2's --bn modes, BatchNorm over all processes, and AdaBN.

Phase 2 runs one forward pass over cat(source images, target images). Which statistics normalise each
domain is a choice (--bn):

  domain  each domain with its own: in training the source half with the source half's batch statistics and
          the target half with the target half's, each updating its own running statistics; at evaluation
          source images with the source running statistics, target images with the target ones (gathered
          from unlabelled target train images). Affine parameters are shared: one network, two sets of
          statistics (domain-specific BatchNorm, Chang et al. 2019, also splits them). A checkpoint carries
          both sets; every reader takes the set of the dataset it scores (statistics_of).
  frozen  BatchNorm in eval mode: the phase-1 running statistics for both domains, in training and at
          evaluation; the affine parameters still train (the usual fine-tuning practice).
  mixed   the concatenated batch's statistics in training, running statistics that blend both domains at
          evaluation: what this project did before --bn, kept to reproduce its earlier figures.

One pass with a split BatchNorm computes what two passes (one per domain) would, with each convolution run
once over the whole batch, and under DDP one forward per backward (DDP expects no more).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

BN_MODES = ("domain", "frozen", "mixed")
DEFAULT_MODE = "domain"  # chosen with the adaptation benchmark, which reads target labels: see the README


class SumOverRanks(torch.autograd.Function):
    """A tensor summed over all processes; its gradient is summed likewise (every process's loss depends on
    every process's part of the sum)."""

    @staticmethod
    def forward(ctx, t):
        t = t.clone()
        torch.distributed.all_reduce(t)
        return t

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        torch.distributed.all_reduce(grad)
        return grad


def global_batch_norm(bn, x, running_mean, running_var):
    """x normalised with the statistics of the global batch (every process's x), which also update
    running_mean and running_var. The statistics come from all_reduces that autograd differentiates through,
    so input gradients flow between processes as in PyTorch's SyncBatchNorm, which is not used: it refuses the
    CPU (gloo), and on CUDA it filters the statistics with a boolean mask, a wait for the GPU in every layer."""
    dims, shape, c = (0, 2, 3), (1, -1, 1, 1), x.shape[1]
    xf = x.float()
    count = torch.full((1,), x.numel() // c, dtype=torch.float32, device=x.device)
    sums = SumOverRanks.apply(torch.cat([xf.sum(dims), count]))  # one collective for the sums and the count
    n = sums[c]
    mean = sums[:c] / n
    centred = xf - mean.view(shape)
    var = SumOverRanks.apply(centred.pow(2).sum(dims)) / n  # two passes, as BatchNorm itself: no cancellation
    if running_mean is not None:
        with torch.no_grad():
            bn.num_batches_tracked += 1
            m = bn.momentum if bn.momentum is not None else 1 / bn.num_batches_tracked
            running_mean.lerp_(mean, m)
            running_var.lerp_(var * n / (n - 1).clamp_min(1), m)  # unbiased, as BatchNorm keeps it
    y = centred * torch.rsqrt(var + bn.eps).view(shape)
    if bn.affine:
        y = y * bn.weight.view(shape) + bn.bias.view(shape)
    return y.to(x.dtype)


class SyncBatchNorm(nn.BatchNorm2d):
    """BatchNorm2d over the global batch of all processes (global_batch_norm). Parameters, buffers and
    state-dict keys are BatchNorm2d's."""

    def forward(self, x):
        if not (self.training and torch.distributed.is_initialized()):
            return super().forward(x)
        return global_batch_norm(self, x, self.running_mean, self.running_var)


class DomainBatchNorm(nn.BatchNorm2d):
    """--bn domain: running_mean/running_var are the source statistics, target_mean/target_var the target's.

    Training: the first `split` images of a batch are source, the rest target, each half normalised with its
    own batch statistics (over all processes when `sync`), which update that domain's running statistics.
    With split None the whole batch is of one domain, `domain`. Evaluation: `domain`'s running statistics."""
    split = None
    domain = "source"
    sync = False

    def stats(self, domain):
        return (self.running_mean, self.running_var) if domain == "source" else (self.target_mean, self.target_var)

    def forward(self, x):
        if not self.training:
            mean, var = self.stats(self.domain)
            return F.batch_norm(x, mean, var, self.weight, self.bias, False, 0.0, self.eps)
        n = self.split if self.split is not None else (len(x) if self.domain == "source" else 0)
        parts = [(x[:n], "source"), (x[n:], "target")]
        out = [self.normalise(part, *self.stats(domain)) for part, domain in parts if len(part)]
        return out[0] if len(out) == 1 else torch.cat(out)

    def normalise(self, x, mean, var):
        if self.sync and torch.distributed.is_initialized():
            return global_batch_norm(self, x, mean, var)
        self.num_batches_tracked += 1
        return F.batch_norm(x, mean, var, self.weight, self.bias, True, self.momentum, self.eps)


class FrozenBatchNorm(nn.BatchNorm2d):
    """--bn frozen: in eval mode whatever the model's mode, so the running statistics it has (phase 1's) are
    used and kept; the affine parameters still train."""

    def train(self, mode=True):
        return super().train(False)


def sync_batchnorm(module):
    """BatchNorm over the global batch under DDP: each plain BatchNorm2d becomes a SyncBatchNorm with the same
    parameter and buffer tensors (the optimiser and the checkpoints see no change), each DomainBatchNorm
    synchronises each domain's statistics. A FrozenBatchNorm computes no batch statistics."""
    for m in module.modules():
        if type(m) is nn.BatchNorm2d:
            m.__class__ = SyncBatchNorm  # a subclass that only replaces forward: same state, same keys
        elif isinstance(m, DomainBatchNorm):
            m.sync = True
    return module


TARGET_KEYS = ("target_mean", "target_var")


def use_mode(model, mode, state=None):
    """Make model's BatchNorm layers behave as --bn `mode` says (in place). Under 'domain', the target
    statistics come from `state` (a state dict) where it holds them (a checkpoint of a 'domain' run), and
    start as copies of the source statistics otherwise."""
    for name, m in model.named_modules():
        if type(m) is not nn.BatchNorm2d:
            continue
        if mode == "frozen":
            m.__class__ = FrozenBatchNorm
            m.eval()
        elif mode == "domain":
            m.__class__ = DomainBatchNorm
            prefix = name + "." if name else ""
            for key, source in zip(TARGET_KEYS, (m.running_mean, m.running_var)):
                saved = (state or {}).get(prefix + key)
                m.register_buffer(key, (saved if saved is not None else source).clone().to(source.device))
    return model


class split_domains:
    """`with split_domains(model, n):` the first n images of each batch are source, the rest target."""

    def __init__(self, model, n):
        self.layers, self.n = [m for m in model.modules() if isinstance(m, DomainBatchNorm)], n

    def __enter__(self):
        for m in self.layers:
            m.split = self.n

    def __exit__(self, *exc):
        for m in self.layers:
            m.split = None


def set_domain(model, domain):
    """Which domain's statistics model's DomainBatchNorm layers use from now on ('source' or 'target'); no
    effect on the other modes, whose statistics are the same for both."""
    for m in model.modules():
        if isinstance(m, DomainBatchNorm):
            m.domain = domain
    return model


def statistics_of(state, domain):
    """A state dict for a plain model: a 'domain' checkpoint's weights with the statistics of `domain` in
    BatchNorm's own keys; any other state dict as it is."""
    out = {k: v for k, v in state.items() if not k.endswith(TARGET_KEYS)}
    if domain == "target":
        for k, v in state.items():
            for theirs, ours in zip(TARGET_KEYS, ("running_mean", "running_var")):
                if k.endswith(theirs):
                    out[k[:-len(theirs)] + ours] = v
    return out


class _Stop(Exception):
    pass


@torch.no_grad()
def adabn(model, batches):
    """AdaBN (Li et al. 2016): every BatchNorm layer's running statistics become the population mean and
    (unbiased) variance of its input over all the images that batches() yields, without labels.

    Layer by layer in forward order, one pass each (stopped at that layer): a layer's input is computed with
    the earlier layers' new statistics, as the adapted network will compute it. A DomainBatchNorm's statistics
    of its `domain` are the ones set. Not a running average of
    per-batch statistics, which would leave out the spread of the batch means. batches: a callable that
    returns a fresh iterable of normalised input batches on the model's device. Returns the number of layers
    re-estimated (0: the model has no BatchNorm)."""
    layers = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    if not layers:
        return 0
    model.eval()
    order = []
    hooks = [m.register_forward_pre_hook(lambda m, inputs: order.append(m) if m not in order else None)
             for m in layers]
    try:
        model(next(iter(batches())))
    finally:
        for h in hooks:
            h.remove()
    for layer in order:
        device = layer.running_mean.device
        dtype = torch.float32 if device.type == "mps" else torch.float64  # MPS has no float64
        sums = torch.zeros(3, layer.num_features, dtype=dtype, device=device)
        mean_of, var_of = (layer.stats(layer.domain) if isinstance(layer, DomainBatchNorm)
                           else (layer.running_mean, layer.running_var))
        shift = mean_of.to(dtype).view(1, -1, 1, 1)  # the old mean: the sums of squares barely cancel (float32 on MPS)

        def gather(m, inputs):
            x = inputs[0].to(dtype) - shift
            sums[0] += x.sum((0, 2, 3))
            sums[1] += x.pow(2).sum((0, 2, 3))
            sums[2] += x.numel() // x.shape[1]
            raise _Stop

        hook = layer.register_forward_pre_hook(gather)
        try:
            for x in batches():
                try:
                    model(x)
                except _Stop:
                    pass
        finally:
            hook.remove()
        n = sums[2]
        mean = sums[0] / n
        var = (sums[1] / n - mean ** 2).clamp_min(0) * n / (n - 1).clamp_min(1)
        mean_of.copy_(mean + shift.flatten())
        var_of.copy_(var)
    return len(order)
