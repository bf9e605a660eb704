"""U-Net, DeepLabV3 and DeepLabV3+ on torchvision ResNets, with the embedding taps the MMD loss reads.

Taps, in one place: `model(x)` returns logits N×classes×H×W; `model(x, taps=True)` returns
`(logits, {"backbone": ..., "head": ...})` from that same forward pass:
  backbone  ResNet layer4 output (every model): what the MMD loss aligns (report 2.3.2)
  head      DeepLabV3 and V3+: the ASPP output (256 channels, stride 8, before ASPP's dropout), the second
            level of --multilevel.
            U-Net: the first decoder block's output (256 channels, stride 16), which fuses layer4 with
            the layer3 skip: the U-Net's counterpart of ASPP, so --multilevel means the same thing for both.
"""
import os
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torchvision.models.segmentation.deeplabv3 import ASPP, DeepLabHead, DeepLabV3
from torchvision.models._utils import IntermediateLayerGetter

from batchnorm import statistics_of
from datasets import DEFAULT_SIZE
from files import read_checkpoint
from utils import NUM_CLASSES, UserError

MODELS = ("unet", "deeplab", "deeplabv3plus")
BACKBONES = ("resnet18", "resnet34", "resnet50", "resnet101")
DECODER_CHANNELS = (256, 128, 64, 32, 16)


def fetch_weights(weights_enum):
    """Make sure torchvision's file is in the torch hub cache; offline, say which file and where it goes."""
    url = weights_enum.url
    path = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)
    if not path.exists():
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.hub.download_url_to_file(url, str(path), progress=False)
        except Exception as e:  # offline, proxy, disk: all end the same way for the user
            raise UserError(f"could not download {os.path.basename(url)} ({type(e).__name__}); fetch {url} "
                            f"by hand and put it at {path}, or use --weights none") from None
    return weights_enum


def resnet(backbone, pretrained, dilate=False):
    """torchvision's ResNet; dilate: DeepLabV3's output stride 8 (layer3/layer4 trade stride for dilation)."""
    weights = fetch_weights(torchvision.models.get_model_weights(backbone).IMAGENET1K_V1) if pretrained else None
    bottleneck = backbone in ("resnet50", "resnet101")
    extra = {"replace_stride_with_dilation": [False, True, True]} if dilate and bottleneck else {}
    net = getattr(torchvision.models, backbone)(weights=weights, **extra)
    if dilate and not bottleneck:
        # torchvision refuses dilation in BasicBlock (resnet18/34): the same layout by hand, where the first
        # block of a stage keeps the previous stage's dilation, as torchvision does for Bottleneck
        for layer, previous, dilation in ((net.layer3, 1, 2), (net.layer4, 2, 4)):
            for i, block in enumerate(layer):
                d = previous if i == 0 else dilation
                for conv in block.modules():
                    if isinstance(conv, nn.Conv2d):
                        conv.stride = (1, 1)
                        if conv.kernel_size == (3, 3):
                            conv.dilation, conv.padding = (d, d), (d, d)
    return net


def pad_to(x, size):
    """Pad (or crop, where negative) x to H×W = size, split evenly: the report's padded U-Net."""
    dh, dw = size[0] - x.shape[-2], size[1] - x.shape[-1]
    if dh == 0 and dw == 0:
        return x, False
    return F.pad(x, (dw // 2, dw - dw // 2, dh // 2, dh - dh // 2)), True


class DecoderBlock(nn.Module):
    def __init__(self, cin, cskip, cout):
        super().__init__()
        self.convs = nn.Sequential(
            nn.Conv2d(cin + cskip, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
            nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))

    def forward(self, x, skip):
        return self.convs(x if skip is None else torch.cat([x, skip], 1))


class UNet(nn.Module):
    """ResNet encoder, five decoder blocks (six depth levels), skips by concatenation.

    Each decoder block doubles the resolution, then pads its input to the skip's exact size, so any H×W
    works (466 is not a multiple of 32) and the logits are always H×W.
    """

    def __init__(self, backbone="resnet50", num_classes=NUM_CLASSES, pretrained=False):
        super().__init__()
        r = resnet(backbone, pretrained)
        self.stem = nn.Sequential(r.conv1, r.bn1, r.relu)
        self.pool = r.maxpool
        self.encoder = nn.ModuleList([r.layer1, r.layer2, r.layer3, r.layer4])
        enc = [64] + [_out_channels(layer) for layer in self.encoder]
        skips = [enc[3], enc[2], enc[1], enc[0], 0]  # layer3, layer2, layer1, stem, none at full resolution
        cin = [enc[4]] + list(DECODER_CHANNELS[:-1])
        self.decoder = nn.ModuleList([DecoderBlock(i, s, o) for i, s, o in zip(cin, skips, DECODER_CHANNELS)])
        self.classifier = nn.Conv2d(DECODER_CHANNELS[-1], num_classes, 3, padding=1)
        self.padded = False  # whether the last forward had to pad: true for sizes not divisible by 32

    def forward(self, x, taps=False):
        s1 = self.stem(x)
        s2 = self.encoder[0](self.pool(s1))
        s3 = self.encoder[1](s2)
        s4 = self.encoder[2](s3)
        y = bottom = self.encoder[3](s4)
        head, padded = None, False
        for block, skip in zip(self.decoder, (s4, s3, s2, s1, None)):
            y = F.interpolate(y, scale_factor=2, mode="nearest")
            y, p = pad_to(y, (skip if skip is not None else x).shape[-2:])
            padded |= p
            y = block(y, skip)
            head = y if head is None else head
        self.padded = padded
        logits = self.classifier(y)
        return (logits, {"backbone": bottom, "head": head}) if taps else logits


def _out_channels(layer):
    last = layer[-1]
    return (last.bn3 if hasattr(last, "bn3") else last.bn2).num_features


class DeepLab(nn.Module):
    """torchvision's DeepLabV3 (dilated layer3/layer4, ASPP, logits upsampled to H×W), run by its own forward;
    its dict output unwrapped, and the taps read by forward hooks."""

    def __init__(self, backbone="resnet50", num_classes=NUM_CLASSES, weights="none"):
        super().__init__()
        if weights == "coco":
            build = getattr(torchvision.models.segmentation, f"deeplabv3_{backbone}")
            coco = torchvision.models.get_model_weights(build).COCO_WITH_VOC_LABELS_V1
            self.net = build(weights=fetch_weights(coco), weights_backbone=None)
            self.net.aux_classifier = None
            self.net.classifier[4] = nn.Conv2d(256, num_classes, 1)  # COCO's 21 VOC classes -> ours
        else:
            r = resnet(backbone, weights == "imagenet", dilate=True)
            body = IntermediateLayerGetter(r, return_layers={"layer4": "out"})
            self.net = DeepLabV3(body, DeepLabHead(_out_channels(r.layer4), num_classes), None)
        # the taps, from torchvision's own forward: bound methods, so that a deep copy (a teacher) taps itself
        self._taps = {}
        self.net.backbone.register_forward_hook(self._keep_backbone)
        self.net.classifier[0].project[2].register_forward_hook(self._keep_head)  # ASPP: conv, BN, ReLU, Dropout

    def _keep_backbone(self, module, inputs, output):
        self._taps["backbone"] = output["out"]

    def _keep_head(self, module, inputs, output):
        self._taps["head"] = output  # before ASPP's dropout, so MMD sees the features, not their masks

    def forward(self, x, taps=False):
        try:
            logits = self.net(x)["out"]
        finally:  # also after a failed forward (out of memory): the tapped tensors and their graph are let go
            found, self._taps = self._taps, {}
        return (logits, found) if taps else logits


class DeepLabV3Plus(nn.Module):
    """DeepLabV3 (the same dilated ResNet and ASPP as DeepLab) with the DeepLabV3+ decoder (Chen et al. 2018):
    layer1's features (stride 4) reduced to 48 channels join the upsampled ASPP output, two 3x3 convolutions
    refine them, and a 1x1 convolution gives the logits, upsampled x4 to H×W: sharper outlines than the
    logits at stride 8. Taps as DeepLab: layer4 ('backbone'), the ASPP output before its dropout ('head')."""

    def __init__(self, backbone="resnet50", num_classes=NUM_CLASSES, pretrained=False):
        super().__init__()
        r = resnet(backbone, pretrained, dilate=True)
        self.stem = nn.Sequential(r.conv1, r.bn1, r.relu, r.maxpool)
        self.layers = nn.ModuleList([r.layer1, r.layer2, r.layer3, r.layer4])
        self.aspp = ASPP(_out_channels(r.layer4), [12, 24, 36])
        self.low = nn.Sequential(nn.Conv2d(_out_channels(r.layer1), 48, 1, bias=False), nn.BatchNorm2d(48),
                                 nn.ReLU(inplace=True))
        self.decoder = nn.Sequential(
            nn.Conv2d(256 + 48, 256, 3, padding=1, bias=False), nn.BatchNorm2d(256), nn.ReLU(inplace=True),
            nn.Conv2d(256, 256, 3, padding=1, bias=False), nn.BatchNorm2d(256), nn.ReLU(inplace=True),
            nn.Conv2d(256, num_classes, 1))

    def forward(self, x, taps=False):
        low = self.layers[0](self.stem(x))
        deep = self.layers[3](self.layers[2](self.layers[1](low)))
        # ASPP's branches, then its projection (conv, BN, ReLU) apart from its dropout: the 'head' tap
        branches = torch.cat([conv(deep) for conv in self.aspp.convs], 1)
        head = self.aspp.project[:3](branches)
        y = F.interpolate(self.aspp.project[3](head), size=low.shape[-2:], mode="bilinear", align_corners=False)
        logits = self.decoder(torch.cat([y, self.low(low)], 1))
        logits = F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return (logits, {"backbone": deep, "head": head}) if taps else logits


class Discriminator(nn.Module):
    """AdaptSegNet's output-space discriminator: on C×H×W softmax maps, five 4x4 convolutions of stride 2
    (64, 128, 256, 512 channels with LeakyReLU 0.2, then 1), one source-vs-target logit per patch."""

    def __init__(self, num_classes=NUM_CLASSES, width=64):
        super().__init__()
        layers, c = [], num_classes
        for out in (width, width * 2, width * 4, width * 8):
            layers += [nn.Conv2d(c, out, 4, stride=2, padding=1), nn.LeakyReLU(0.2, inplace=True)]
            c = out
        self.net = nn.Sequential(*layers, nn.Conv2d(c, 1, 4, stride=2, padding=1))

    def forward(self, probs):
        return self.net(probs)


def check_model_args(name, backbone, weights):
    """Refuse impossible combinations before anything is built or downloaded."""
    if name not in MODELS:
        raise UserError(f"model {name!r}: expected one of {', '.join(MODELS)}")
    if backbone not in BACKBONES:
        raise UserError(f"backbone {backbone!r}: expected one of {', '.join(BACKBONES)}")
    if weights == "coco" and name != "deeplab":
        raise UserError(f"--weights coco exists for DeepLabV3 only (torchvision has none for {name}); use "
                        "--weights imagenet or none")
    if weights == "coco" and backbone not in ("resnet50", "resnet101"):
        raise UserError(f"--weights coco: torchvision has COCO DeepLabV3 weights for resnet50 and resnet101 only, "
                        f"not {backbone}")
    if weights not in ("none", "imagenet", "coco") and not Path(weights).is_file():
        raise UserError(f"--weights {weights}: no such file; expected none, imagenet, coco or a checkpoint path")


def build_model(name, backbone="resnet50", weights="none", num_classes=NUM_CLASSES, domain="source"):
    """name: unet | deeplab | deeplabv3plus; weights: none | imagenet (backbone) | coco (DeepLabV3) | path to a
    checkpoint of ours (with the BatchNorm statistics of `domain` where it holds a set per domain)."""
    check_model_args(name, backbone, weights)
    named = weights in ("none", "imagenet", "coco")
    if name == "unet":
        model = UNet(backbone, num_classes, pretrained=weights == "imagenet")
    elif name == "deeplabv3plus":
        model = DeepLabV3Plus(backbone, num_classes, pretrained=weights == "imagenet")
    else:
        model = DeepLab(backbone, num_classes, weights if named else "none")
    if not named:
        load_weights(model, weights, name, backbone, num_classes, domain)
    return model


def model_config(name, backbone, num_classes):
    return {"model": name, "backbone": backbone, "num_classes": num_classes}


def load_weights(model, path, name, backbone, num_classes, domain="source"):
    """Load a checkpoint of ours (a file written by train_seg.py or train_mmd.py) into a model built to match,
    with the BatchNorm statistics of `domain` ('source' or 'target') where it holds a set per domain."""
    ckpt = read_checkpoint(path)
    want = model_config(name, backbone, num_classes)
    got = ckpt.get("config", {})
    differ = {k: (got.get(k), v) for k, v in want.items() if got.get(k) != v}
    if differ:
        raise UserError(f"{path}: checkpoint is for " + ", ".join(f"{k}={a}" for k, (a, _) in differ.items())
                        + ", not " + ", ".join(f"{k}={b}" for k, (_, b) in differ.items()))
    try:
        model.load_state_dict(statistics_of(ckpt["model"], domain))
    except RuntimeError as e:
        raise UserError(f"{path}: weights do not fit a {name}/{backbone} model ({str(e).splitlines()[0][:100]})") from None
    return model


def trained_size(ckpt, path):
    """The W×H a checkpoint of ours was trained at (the default size when it does not say)."""
    size = ckpt.get("args", {}).get("size")
    if not size:
        return DEFAULT_SIZE
    if not (isinstance(size, (list, tuple)) and len(size) == 2 and all(type(v) is int and v >= 32 for v in size)):
        raise UserError(f"{path}: records a training size of {str(size)[:40]}, not [W, H]: damaged; pass --size")
    return tuple(size)


def from_checkpoint(path, domain="source"):
    """(model, checkpoint) rebuilt from the configuration a checkpoint of ours carries: a plain model, with the
    BatchNorm statistics of `domain` ('source' or 'target': the dataset it will score) where the checkpoint
    holds a set per domain (train_mmd.py --bn domain)."""
    ckpt = read_checkpoint(path)
    config = ckpt.get("config")
    if not isinstance(config, dict) or not {"model", "backbone", "num_classes"} <= config.keys():
        raise UserError(f"{path}: checkpoint carries no model configuration; was it written by train_seg.py "
                        "or train_mmd.py?")
    if (config["model"] not in MODELS or config["backbone"] not in BACKBONES
            or type(config["num_classes"]) is not int or not 1 <= config["num_classes"] <= 1000):
        raise UserError(f"{path}: its model configuration {str(config)[:80]} is not one this project builds: "
                        "damaged; use another checkpoint")
    model = build_model(config["model"], config["backbone"], "none", config["num_classes"])
    try:
        model.load_state_dict(statistics_of(ckpt["model"], domain))
    except RuntimeError as e:
        raise UserError(f"{path}: weights do not fit a {config['model']}/{config['backbone']} model "
                        f"({str(e).splitlines()[0][:100]})") from None
    return model, ckpt
