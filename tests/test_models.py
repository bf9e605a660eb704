import copy
import urllib.error

import pytest
import torch
import torchvision

import models
from utils import UserError


def ceil_halvings(n, times):
    for _ in range(times):
        n = (n + 1) // 2
    return n


@pytest.fixture(scope="module")
def nets():
    torch.manual_seed(0)
    return {name: models.build_model(name, "resnet18") for name in models.MODELS}


@pytest.mark.parametrize("name", models.MODELS)
@pytest.mark.parametrize("size", [(466, 256), (480, 256), (97, 45)])
@pytest.mark.parametrize("train", [True, False])
def test_logits_and_taps_shapes(nets, name, size, train):
    net = nets[name].train(train)
    w, h = size
    with torch.no_grad():
        logits, taps = net(torch.randn(2, 3, h, w), taps=True)
    assert logits.shape == (2, 19, h, w)
    halvings = 5 if name == "unet" else 3  # U-Net keeps ResNet's stride 32; DeepLabV3 dilates down to stride 8
    assert taps["backbone"].shape == (2, 512, ceil_halvings(h, halvings), ceil_halvings(w, halvings))
    head_halvings = 4 if name == "unet" else 3
    assert taps["head"].shape == (2, 256, ceil_halvings(h, head_halvings), ceil_halvings(w, head_halvings))
    if name == "unet":
        assert net.padded == (w % 32 != 0 or h % 32 != 0)


@pytest.mark.parametrize("name", models.MODELS)
def test_taps_come_from_the_one_forward_pass(nets, name):
    net = nets[name].eval()
    layer4 = {"unet": lambda: net.encoder[3], "deeplab": lambda: net.net.backbone.layer4,
              "deeplabv3plus": lambda: net.layers[3]}[name]()
    seen = []
    hook = layer4.register_forward_hook(lambda m, i, o: seen.append(o))
    try:
        with torch.no_grad():
            x = torch.randn(2, 3, 64, 96)
            logits, taps = net(x, taps=True)
            plain = net(x)
    finally:
        hook.remove()
    assert len(seen) == 2  # one layer4 call per forward: the taps cost no second pass
    assert torch.equal(taps["backbone"], seen[0]) and torch.equal(logits, plain)


def test_gradient_reaches_the_backbone_through_a_tap(nets):
    net = nets["deeplab"].train()
    net.zero_grad()
    _, taps = net(torch.randn(2, 3, 64, 64), taps=True)
    taps["backbone"].pow(2).mean().backward()
    assert net.net.backbone.conv1.weight.grad.abs().sum() > 0


def test_coco_is_refused_for_unet_deeplabv3plus_and_small_backbones():
    with pytest.raises(UserError, match="DeepLabV3 only"):
        models.build_model("unet", "resnet18", weights="coco")
    with pytest.raises(UserError, match="torchvision has none for deeplabv3plus"):
        models.build_model("deeplabv3plus", "resnet50", weights="coco")
    with pytest.raises(UserError, match="resnet50 and resnet101"):
        models.build_model("deeplab", "resnet18", weights="coco")
    with pytest.raises(UserError, match="backbone"):
        models.build_model("unet", "vgg16")


def test_offline_weights_name_the_file_and_where_it_goes(monkeypatch, tmp_path):
    def offline(url, dst, *a, **k):
        raise urllib.error.URLError("no network")
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(UserError) as err:
        models.build_model("unet", "resnet18", weights="imagenet")
    msg = str(err.value)
    assert "resnet18-f37072fd.pth" in msg and str(tmp_path / "hub" / "checkpoints") in msg and "\n" not in msg


def test_weights_none_never_downloads(monkeypatch):
    def forbidden(*a, **k):
        raise AssertionError("weights none must not touch the network")
    monkeypatch.setattr(torch.hub, "download_url_to_file", forbidden)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", forbidden)
    models.build_model("deeplab", "resnet18", weights="none")


def test_weights_from_our_checkpoint(tmp_path):
    src = models.build_model("unet", "resnet18")
    path = tmp_path / "best.pt"
    torch.save({"model": src.state_dict(), "config": models.model_config("unet", "resnet18", 19)}, path)
    loaded = models.build_model("unet", "resnet18", weights=str(path))
    assert all(torch.equal(a, b) for a, b in zip(src.state_dict().values(), loaded.state_dict().values()))
    with pytest.raises(UserError, match="backbone=resnet18.*backbone=resnet34"):
        models.build_model("unet", "resnet34", weights=str(path))
    with pytest.raises(UserError, match="no such file"):
        models.build_model("unet", "resnet18", weights=str(tmp_path / "missing.pt"))


def test_checkpoint_with_pickled_code_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"model": {}, "payload": UserError("code")}, path)
    with pytest.raises(UserError, match="pickled code"):
        models.build_model("unet", "resnet18", weights=str(path))


def test_deeplab_layout_is_torchvisions():
    """Strides, dilations and paddings of every convolution as in torchvision's deeplabv3_resnet50."""
    ours = models.build_model("deeplab", "resnet50").net
    ref = torchvision.models.segmentation.deeplabv3_resnet50(weights=None, weights_backbone=None, num_classes=19,
                                                              aux_loss=False)
    layout = lambda net: [(n, m.stride, m.dilation, m.padding) for n, m in net.named_modules()
                          if isinstance(m, torch.nn.Conv2d)]
    assert layout(ours) == layout(ref)
    assert ours.state_dict().keys() == ref.state_dict().keys()
    small = models.build_model("deeplab", "resnet18").net.backbone  # by hand, with the same rule
    assert small.layer3[0].conv1.dilation == (1, 1) and small.layer3[1].conv1.dilation == (2, 2)
    assert small.layer4[0].conv2.dilation == (2, 2) and small.layer4[1].conv2.dilation == (4, 4)


def test_deeplab_is_torchvisions_deeplabv3_on_the_same_weights():
    """Same weights, same input: our logits are torchvision's, and the taps are its backbone output and its
    ASPP output (in eval mode ASPP's dropout is the identity, so ASPP's output is the tap)."""
    torch.manual_seed(0)
    ref = torchvision.models.segmentation.deeplabv3_resnet50(weights=None, weights_backbone=None, num_classes=19,
                                                              aux_loss=False).eval()
    ours = models.build_model("deeplab", "resnet50").eval()
    ours.net.load_state_dict(ref.state_dict())
    x = torch.randn(2, 3, 48, 80)
    with torch.no_grad():
        want = ref(x)["out"]
        features = ref.backbone(x)["out"]
        aspp = ref.classifier[0](features)
        logits, taps = ours(x, taps=True)
    assert torch.equal(logits, want)
    assert torch.equal(taps["backbone"], features) and torch.equal(taps["head"], aspp)


@pytest.mark.parametrize("name", ["deeplab", "deeplabv3plus"])
def test_a_deep_copy_taps_its_own_forward(nets, name):
    """A teacher made by copy.deepcopy must report its own features, not the original's."""
    net = nets[name].eval()
    teacher = copy.deepcopy(net)
    with torch.no_grad():
        for p in teacher.parameters():
            p.mul_(0.5)
        x = torch.randn(2, 3, 64, 64)
        _, mine = net(x, taps=True)
        _, theirs = teacher(x, taps=True)
        _, again = net(x, taps=True)
    assert not torch.equal(mine["backbone"], theirs["backbone"]) and not torch.equal(mine["head"], theirs["head"])
    assert torch.equal(mine["head"], again["head"])


@pytest.mark.parametrize("backbone", ["resnet18", "resnet50"])
def test_deeplabv3plus_is_deeplabv3s_encoder_with_the_v3plus_decoder(backbone):
    """Given DeepLabV3's backbone and ASPP weights, V3+ taps exactly DeepLabV3's features (the same taps for
    MMD); its decoder joins 48 channels from layer1 and gives logits at stride 4 before the last upsampling."""
    torch.manual_seed(0)
    v3 = models.build_model("deeplab", backbone).eval()
    plus = models.build_model("deeplabv3plus", backbone).eval()
    body = v3.net.backbone
    for mine, theirs in [(plus.stem[0], body.conv1), (plus.stem[1], body.bn1), (plus.aspp, v3.net.classifier[0]),
                         *zip(plus.layers, (body.layer1, body.layer2, body.layer3, body.layer4))]:
        mine.load_state_dict(theirs.state_dict())
    low_channels = 64 if backbone == "resnet18" else 256
    assert plus.low[0].in_channels == low_channels and plus.low[0].out_channels == 48
    convs = [m for m in plus.decoder if isinstance(m, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size) for c in convs] == [
        (304, 256, (3, 3)), (256, 256, (3, 3)), (256, 19, (1, 1))]
    seen = []
    hook = plus.decoder.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    x = torch.randn(2, 3, 45, 97)
    try:
        with torch.no_grad():
            _, want = v3(x, taps=True)
            logits, got = plus(x, taps=True)
    finally:
        hook.remove()
    assert torch.equal(got["backbone"], want["backbone"]) and torch.equal(got["head"], want["head"])
    assert seen == [(2, 19, ceil_halvings(45, 2), ceil_halvings(97, 2))] and logits.shape == (2, 19, 45, 97)
