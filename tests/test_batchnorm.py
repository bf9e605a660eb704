"""Phase 2's --bn modes and AdaBN against hand computations in numpy."""
import numpy as np
import pytest
import torch
import torch.nn as nn

import batchnorm

EPS, MOMENTUM = 1e-5, 0.1


def two_layers():
    """Two BatchNorm layers with affine parameters and 'phase-1' running statistics that are neither 0/1 nor
    those of the data below."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.BatchNorm2d(2), nn.BatchNorm2d(2))
    for bn, k in zip(net, (1.0, 2.0)):
        bn.weight.data = torch.tensor([1.5, 0.5]) * k
        bn.bias.data = torch.tensor([0.2, -0.3]) * k
        bn.running_mean.fill_(0.5 * k)
        bn.running_var.fill_(2.0 * k)
    return net


def domains():
    g = torch.Generator().manual_seed(1)
    source = torch.randn(3, 2, 4, 5, generator=g) * 2 + 1
    target = torch.randn(3, 2, 4, 5, generator=g) * 0.5 - 3
    return source, target


def by_hand(x, layers, stats):
    """numpy: each layer normalises x with stats(i, x) -> (mean, var) per channel, then its affine."""
    x = x.double().numpy()
    for i, (w, b) in enumerate(layers):
        mean, var = stats(i, x)
        x = (x - mean[None, :, None, None]) / np.sqrt(var[None, :, None, None] + EPS) * w[None, :, None, None] \
            + b[None, :, None, None]
    return x


def batch(i, x):
    return x.mean((0, 2, 3)), x.var((0, 2, 3))  # biased, as BatchNorm normalises


def running_after(old, x):
    """BatchNorm's update from one batch: (1 - m) old + m batch, the variance unbiased."""
    n = x.size // x.shape[1]
    return ((1 - MOMENTUM) * old[0] + MOMENTUM * x.mean((0, 2, 3)),
            (1 - MOMENTUM) * old[1] + MOMENTUM * x.var((0, 2, 3)) * n / (n - 1))


def params(net):
    return [(bn.weight.detach().double().numpy(), bn.bias.detach().double().numpy()) for bn in net]


def running(net):
    return [(bn.running_mean.double().numpy(), bn.running_var.double().numpy()) for bn in net]


def close(a, b):
    return np.allclose(np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64), atol=1e-5)


def layer_inputs(x, layers, stats):
    """The input each layer sees when normalised as `stats` says."""
    inputs, x = [], x.double().numpy()
    for i, (w, b) in enumerate(layers):
        inputs.append(x)
        mean, var = stats(i, x)
        x = (x - mean[None, :, None, None]) / np.sqrt(var[None, :, None, None] + EPS) * w[None, :, None, None] \
            + b[None, :, None, None]
    return inputs


def test_domain_mode_normalises_each_domain_with_its_own_statistics_in_training_and_evaluation():
    net = two_layers()
    layers, phase1 = params(net), running(net)
    batchnorm.use_mode(net, "domain").train()
    source, target = domains()
    with batchnorm.split_domains(net, len(source)):
        y = net(torch.cat([source, target]))
    # training: each half exactly as if it went through the network alone, in train mode
    assert close(y[:3].detach(), by_hand(source, layers, batch))
    assert close(y[3:].detach(), by_hand(target, layers, batch))
    # running statistics: the source set moved by the source half only, the target set (copies of phase 1's at
    # the start) by the target half only
    for bn, old, xs, xt in zip(net, phase1, layer_inputs(source, layers, batch), layer_inputs(target, layers, batch)):
        assert close(bn.running_mean, running_after(old, xs)[0]) and close(bn.running_var, running_after(old, xs)[1])
        assert close(bn.target_mean, running_after(old, xt)[0]) and close(bn.target_var, running_after(old, xt)[1])
    # evaluation reads the set of the domain it is told
    net.eval()
    kept = {d: [tuple(t.double().numpy() for t in bn.stats(d)) for bn in net] for d in ("source", "target")}
    for domain, x in (("source", source), ("target", target)):
        got = batchnorm.set_domain(net, domain)(x)
        assert close(got.detach(), by_hand(x, layers, lambda i, _: kept[domain][i]))
    # a checkpoint's readers: a plain model given statistics_of(state, domain) computes the same
    state = net.state_dict()
    for domain, x in (("source", source), ("target", target)):
        plain = nn.Sequential(nn.BatchNorm2d(2), nn.BatchNorm2d(2)).eval()
        plain.load_state_dict(batchnorm.statistics_of(state, domain))
        assert torch.equal(plain(x), batchnorm.set_domain(net, domain)(x))
    # and a phase-2 model made from that checkpoint takes both sets back
    again = batchnorm.use_mode(two_layers(), "domain", state)
    assert all(torch.equal(a.target_mean, b.target_mean) and torch.equal(a.target_var, b.target_var)
               for a, b in zip(again, net))


def test_frozen_mode_uses_phase1_statistics_for_both_domains_and_keeps_them():
    net = two_layers()
    layers, phase1 = params(net), running(net)
    batchnorm.use_mode(net, "frozen").train()
    assert not any(bn.training for bn in net)  # model.train() leaves them in eval mode
    source, target = domains()
    x = torch.cat([source, target]).requires_grad_()
    y = net(x)
    assert close(y.detach(), by_hand(x.detach(), layers, lambda i, _: phase1[i]))
    assert all(close(a, b) for a, b in zip(running(net), phase1))
    y.sum().backward()
    assert all(bn.weight.grad is not None and bn.bias.grad is not None for bn in net)  # the affine still trains
    net.eval()
    assert close(net(target).detach(), by_hand(target, layers, lambda i, _: phase1[i]))


def test_mixed_mode_normalises_the_concatenated_batch_and_blends_the_running_statistics():
    net = two_layers()
    layers, phase1 = params(net), running(net)
    batchnorm.use_mode(net, "mixed").train()
    source, target = domains()
    both = torch.cat([source, target])
    with batchnorm.split_domains(net, len(source)):  # no effect on plain BatchNorm
        y = net(both)
    assert close(y.detach(), by_hand(both, layers, batch))
    # neither domain's own: y's source half is not what the source alone would give
    assert not close(y[:3].detach(), by_hand(source, layers, batch))
    for bn, old, x in zip(net, phase1, layer_inputs(both, layers, batch)):
        assert close(bn.running_mean, running_after(old, x)[0]) and close(bn.running_var, running_after(old, x)[1])


def test_adabn_sets_the_population_statistics_of_each_layers_input_in_forward_order():
    """Layer 2's input is computed with layer 1's new statistics. The batches differ in size and in mean, so
    neither the mean of per-batch variances nor statistics gathered in one pass would pass."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1), nn.BatchNorm2d(2))
    for bn in (net[1], net[4]):
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 3)
        bn.weight.data.uniform_(0.5, 2)
        bn.bias.data.uniform_(-1, 1)
    g = torch.Generator().manual_seed(2)
    parts = [torch.randn(n, 3, 6, 7, generator=g) * s + m for n, s, m in ((5, 1, 0), (3, 2, 1), (2, 0.5, -2))]
    before = [net[1].running_mean.clone(), net[4].running_mean.clone()]
    assert batchnorm.adabn(net, lambda: iter(parts)) == 2
    x = torch.cat(parts).double()
    n = lambda a: a.size // a.shape[1]
    with torch.no_grad():
        a1 = net[0].double()(x).numpy()
        mean1, var1 = a1.mean((0, 2, 3)), a1.var((0, 2, 3)) * n(a1) / (n(a1) - 1)
        w, b = net[1].weight.double().numpy(), net[1].bias.double().numpy()
        y1 = np.maximum((a1 - mean1[None, :, None, None]) / np.sqrt(var1[None, :, None, None] + EPS)
                        * w[None, :, None, None] + b[None, :, None, None], 0)
        a2 = net[3].double()(torch.from_numpy(y1)).numpy()
    mean2, var2 = a2.mean((0, 2, 3)), a2.var((0, 2, 3)) * n(a2) / (n(a2) - 1)
    for bn, mean, var in ((net[1], mean1, var1), (net[4], mean2, var2)):
        assert np.allclose(bn.running_mean.double().numpy(), mean, atol=1e-5, rtol=1e-5)
        assert np.allclose(bn.running_var.double().numpy(), var, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(net[1].running_mean, before[0])
    assert not net.training  # evaluation follows
    per_batch = np.mean([net[0].double()(p.double()).detach().numpy().var((0, 2, 3)) for p in parts], 0)
    assert not np.allclose(per_batch, var1, rtol=1e-2)  # what a running average of batches would have kept


def test_adabn_counts_no_layer_in_a_model_without_batchnorm():
    assert batchnorm.adabn(nn.Conv2d(3, 2, 1), lambda: iter([torch.zeros(1, 3, 2, 2)])) == 0


@pytest.mark.parametrize("mode", batchnorm.BN_MODES)
def test_each_mode_keeps_the_state_dict_keys_readers_expect(mode):
    """Plain BatchNorm's keys, plus the target statistics under 'domain' only."""
    net = batchnorm.use_mode(two_layers(), mode)
    extra = set(net.state_dict()) - set(two_layers().state_dict())
    assert extra == ({f"{i}.{k}" for i in range(2) for k in batchnorm.TARGET_KEYS} if mode == "domain" else set())


def test_the_split_reads_nothing_back_from_the_device():
    """As the losses (test_losses): traced by torch.compile, one graph (no read-back) and no size that only
    the data knows, in training (split in two) and at evaluation."""
    from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols
    data_dependent = []

    def inspect(graph_module, example_inputs):
        data_dependent.extend(str(n.target) for n in graph_module.graph.nodes
                              if free_unbacked_symbols(n.meta.get("example_value")))
        return graph_module

    source, target = domains()
    x = torch.cat([source, target])
    for training in (True, False):
        eager, traced = batchnorm.use_mode(two_layers(), "domain"), batchnorm.use_mode(two_layers(), "domain")
        eager.train(training), traced.train(training)
        torch._dynamo.reset()
        compiled = torch.compile(traced, fullgraph=True, backend=inspect)
        with batchnorm.split_domains(eager, 3), batchnorm.split_domains(traced, 3):
            assert torch.equal(compiled(x), eager(x))
        assert data_dependent == []
        assert torch.equal(traced[1].target_mean, eager[1].target_mean)


def test_adabn_sets_the_statistics_a_domain_model_reads():
    net = batchnorm.set_domain(batchnorm.use_mode(two_layers(), "domain"), "target")
    source = [t.clone() for bn in net for t in bn.stats("source")]
    x = domains()[1]
    batchnorm.adabn(net, lambda: iter([x]))
    assert all(torch.equal(a, b) for a, b in zip(source, [t for bn in net for t in bn.stats("source")]))
    assert close(net[0].target_mean, x.double().numpy().mean((0, 2, 3)))
