"""ADE20K semantic segmentation with CIM-pre-trained backbones (Sec. 3.3, Table 3), in torch and torchvision alone
(no mmcv / mmsegmentation): ResNet-50 + FCN (mmseg's fcn_r50-d8 512x512) and ViT + one linear layer (BEiT's protocol).

    # ResNet-50 + FCN, Table 3b, 160k iterations (8 GPUs x 2 images = batch 16); rerunning the same command resumes
    torchrun --nproc_per_node=8 segment.py --arch resnet50 --init out/r50_revdet/enhancer.pth \\
        --data /data/ADEChallengeData2016 --iters 160000 --output-dir out/seg_r50_160k
    # ... and the 80k schedule of Table 3b
    torchrun --nproc_per_node=8 segment.py --arch resnet50 --init out/r50_revdet/enhancer.pth \\
        --data /data/ADEChallengeData2016 --iters 80000 --output-dir out/seg_r50_80k
    # Table 3b's baselines: from scratch, and ImageNet-supervised (a torchvision resnet50 weights file)
    torchrun --nproc_per_node=8 segment.py --arch resnet50 --init none --data /data/ADEChallengeData2016
    torchrun --nproc_per_node=8 segment.py --arch resnet50 --init /path/resnet50-weights.pth --data ...
    # ViT-B/16 + linear decoder, Table 3a: AdamW lr 3e-4, layer decay 0.8, 160k iterations, sliding-window test
    torchrun --nproc_per_node=8 segment.py --arch vit_base --init out/vitb_respix/enhancer.pth \\
        --data /data/ADEChallengeData2016 --output-dir out/seg_vitb
    # the built-in demo: Fashion-MNIST mosaics, train.py's demo checkpoint next to random init (CPU, minutes)
    python train.py && python segment.py

--data is ADEChallengeData2016: images/{training,validation}/*.jpg and annotations/{training,validation}/*.png.
--init reads a train.py checkpoint (its enhancer), a `train.py --export` backbone, or a torchvision / timm state dict.
Outputs in --output-dir: log.jsonl, checkpoint-last.pth (resumable), checkpoint-best.pth, iterNNNNNN.png.
"""
import argparse
import contextlib
import itertools
import os
import random

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
import torchvision.transforms.v2 as v2
import torchvision.transforms.v2.functional as TF
from PIL import Image
from torch.nn.parallel import DistributedDataParallel
from torchvision import tv_tensors
from torchvision.transforms import InterpolationMode
from tqdm import tqdm

import cim
import engine

IGNORE = 255  # mmseg's ignore_index: ADE20K's label 0 after reduce_zero_label, and the crop padding

# ------------------------------------------------------------------------------------------------------------------
# Recipes. ResNet-50: mmseg's fcn_r50-d8_512x512_{80,160}k_ade20k (the paper's footnote 8). ViT: the paper gives lr
# 3e-4 and layer decay 0.8 (Sec. 3.3); the rest is BEiT's ADE20K config (AdamW betas, wd 0.05, 1500 warmup iters,
# poly power 1.0 to 0, drop path 0.1, 512 sliding windows with stride 341). Flags left unset take these.
# The ResNet-50 is torchvision's (CIM's backbone), not mmseg's ResNetV1c (deep stem) of Table 3b's † baseline.

FCN_RECIPE = dict(lr=0.01, min_lr=1e-4, power=0.9, warmup_iters=0, weight_decay=5e-4, drop_path=0.0,
                  eval_mode='whole')
VIT_RECIPE = dict(lr=3e-4, min_lr=0.0, power=1.0, warmup_iters=1500, weight_decay=0.05, drop_path=0.1,
                  eval_mode='slide')


def get_args_parser():
    p = engine.ArgumentParser(description='ADE20K semantic segmentation (Table 3) of CIM-pre-trained backbones. '
                                          'Unset flags: mmseg fcn_r50-d8 (resnet50) or BEiT + the paper (ViT).',
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group('model')
    g.add_argument('--arch', default='resnet50', choices=cim.ARCHS)
    g.add_argument('--init', metavar='PATH', default=None, help="pre-trained weights (train.py checkpoint or --export, "
                   "torchvision / timm state dict) or 'none' (from scratch); demo: out/demo/checkpoint-last.pth")
    g.add_argument('--patch-size', type=int, default=16, help='ViT')
    g.add_argument('--drop-path', type=float, help='stochastic depth at the last block: ViT 0.1 (BEiT), R50 0')
    g.add_argument('--aux-weight', type=float, default=0.4, help='loss weight of the FCN auxiliary head on layer3')
    g = p.add_argument_group('schedule (iterations; unset: the recipe)')
    g.add_argument('--iters', type=int, default=160000, help='80000 or 160000 (Table 3)')
    g.add_argument('--batch-size', type=int, default=2, help='per GPU (process): 2 x 8 GPUs = 16')
    g.add_argument('--accum-iter', type=int, default=1, help='gradient accumulation steps')
    g.add_argument('--lr', type=float, help='peak lr (not rescaled with the batch): R50 0.01 (SGD), ViT 3e-4 (AdamW)')
    g.add_argument('--min-lr', type=float, help='end of the poly decay: R50 1e-4, ViT 0')
    g.add_argument('--power', type=float, help='poly decay power: R50 0.9, ViT 1.0')
    g.add_argument('--warmup-iters', type=int, help='linear warmup: R50 0, ViT 1500')
    g.add_argument('--weight-decay', type=float, help='R50 5e-4 (every parameter, as mmseg), ViT 0.05')
    g.add_argument('--momentum', type=float, default=0.9, help='SGD (R50)')
    g.add_argument('--betas', type=float, nargs=2, default=(0.9, 0.999), help='AdamW (ViT)')
    g.add_argument('--layer-decay', type=float, default=0.8, help='ViT layer-wise lr decay (the paper, CIM ViT-B)')
    g = p.add_argument_group('data and evaluation (mmseg ADE20K pipeline)')
    g.add_argument('--data', metavar='DIR', help='ADEChallengeData2016 folder; none: the Fashion-MNIST demo')
    g.add_argument('--crop-size', type=int, default=512)
    g.add_argument('--scale', type=int, nargs=2, default=(2048, 512), metavar=('LONG', 'SHORT'),
                   help='keep-ratio rescale target (training: times --ratio-range; test: as is)')
    g.add_argument('--ratio-range', type=float, nargs=2, default=(0.5, 2.0))
    g.add_argument('--cat-max-ratio', type=float, default=0.75, help='crops where one class covers more are redrawn')
    g.add_argument('--eval-mode', choices=('whole', 'slide'), help='R50: whole image (mmseg fcn), ViT: slide')
    g.add_argument('--stride', type=int, help='sliding-window stride; default 2/3 of --crop-size (BEiT: 341 at 512)')
    g.add_argument('--eval-every', type=int, default=16000, help='iterations between evaluations (mmseg: 16000)')
    g = p.add_argument_group('system')
    engine.add_run_args(g, 'default: out/seg_<arch>; demo: out/demo_seg', num_workers=4, save_every_steps=2000,
                        save_help='iterations between checkpoint-last.pth saves')
    g.add_argument('--vis-images', type=int, default=4, help='validation images in the PNG written at each eval')
    p.add_argument('--stop-after-steps', type=int, default=0, help=argparse.SUPPRESS)  # tests: a preemption
    p.add_argument('--demo-images', type=int, nargs=2, default=None, help=argparse.SUPPRESS)  # tests: tiny demo
    return p


# ------------------------------------------------------------------------------------------------------------------
# Data: ADEChallengeData2016, image / annotation pairs with the same stem

def reduce_zero_label(mask):
    """mmseg's reduce_zero_label for ADE20K: label 0 ('other') -> 255 (ignored), k -> k - 1, 255 stays 255.
    mask: uint8 array [H, W] -> uint8 array [H, W]."""
    out = mask.astype(np.int16) - 1
    out[(mask == 0) | (mask == IGNORE)] = IGNORE
    return out.astype(np.uint8)


class ADE20K(torch.utils.data.Dataset):
    """root/images/<split>/<stem>.jpg with root/annotations/<split>/<stem>.png (single-channel class indices).

    Item i: (image, mask, n_bad) = (*transform(tv_tensors.Image uint8 [3, H, W], tv_tensors.Mask uint8 [H, W]),
    n_bad); labels 0..149 after reduce_zero_label, 255 ignored. An unreadable pair is skipped like
    engine.ImageFiles does (the next one stands in, a warning, n_bad counts it); a wrong layout is a ValueError.
    """

    def __init__(self, root, split, transform, num_classes=150, reduce_zero=True):
        img_dir, ann_dir = os.path.join(root, 'images', split), os.path.join(root, 'annotations', split)
        for d in (img_dir, ann_dir):
            if not os.path.isdir(d):
                raise FileNotFoundError(f"'{d}' does not exist: --data must be ADEChallengeData2016, with "
                                        f"images/{{training,validation}}/*.jpg and annotations/{{training,validation}}/*.png")
        stems = lambda d, ext: {os.path.splitext(f)[0]: f for f in os.listdir(d)  # noqa: E731
                                if f.lower().endswith(ext) and not f.startswith('.')}
        images, anns = stems(img_dir, engine.IMG_EXTENSIONS), stems(ann_dir, '.png')
        if not images:
            raise ValueError(f"no images ({', '.join(engine.IMG_EXTENSIONS)}) in '{img_dir}'")
        for a, b, what, where in ((images, anns, 'images', ann_dir), (anns, images, 'annotations', img_dir)):
            unpaired = sorted(set(a) - set(b))
            if unpaired:
                raise ValueError(f"{len(unpaired)} of {len(a)} {what} have no partner with the same name in '{where}' "
                                 f"(e.g. '{a[unpaired[0]]}')")
        self.pairs = [(os.path.join(img_dir, images[s]), os.path.join(ann_dir, anns[s])) for s in sorted(images)]
        self.transform, self.num_classes, self.reduce_zero = transform, num_classes, reduce_zero

    def __len__(self):
        return len(self.pairs)

    def __getitem__(self, i):
        (img, mask), j, n_bad = engine.read_skipping_bad(i, len(self.pairs), self._read,
                                                          lambda j: "image or annotation '%s' / '%s'" % self.pairs[j])
        ann_path = self.pairs[j][1]
        if mask.ndim != 2 or mask.dtype != np.uint8 or mask.shape != (img.height, img.width):
            raise ValueError(f"annotation '{ann_path}' is not a single-channel 8-bit PNG of the image's size "
                             f"{img.width}x{img.height} (ADEChallengeData2016 annotations hold class indices)")
        mask = reduce_zero_label(mask) if self.reduce_zero else mask
        if ((mask != IGNORE) & (mask >= self.num_classes)).any():
            raise ValueError(f"annotation '{ann_path}' has label {mask[mask != IGNORE].max() + self.reduce_zero} "
                             f"but the dataset has {self.num_classes} classes")
        img, mask = self.transform(tv_tensors.Image(TF.pil_to_tensor(img)), tv_tensors.Mask(torch.from_numpy(mask)))
        return img, mask, n_bad

    def _read(self, j):
        """Pair j decoded: (RGB PIL image, annotation uint8 array); a truncated file raises here."""
        img_path, ann_path = self.pairs[j]
        with Image.open(img_path) as im, Image.open(ann_path) as an:
            return im.convert('RGB'), np.array(an)

def class_names(root, num_classes):
    """ADE20K's class names from root/objectInfo150.txt (tab-separated, the name last), else '0', '1', ..."""
    path = os.path.join(root, 'objectInfo150.txt')
    names = []
    if os.path.isfile(path):
        with open(path) as f:
            names = [line.rstrip('\n').split('\t')[-1].split(';')[0] for line in f][1:]
    return names if len(names) == num_classes else [str(k) for k in range(num_classes)]


# ------------------------------------------------------------------------------------------------------------------
# Joint transforms (torchvision.transforms.v2: tv_tensors.Mask is resized NEAREST, never interpolated): mmseg's
# ADE20K pipeline = keep-ratio rescale x [0.5, 2] -> 512 crop (cat_max_ratio 0.75) -> flip -> photometric
# distortion -> normalize -> pad to 512 (image 0, mask 255).

def rescale_size(h, w, scale):
    """mmcv's keep-ratio rescale: factor = min(long / max(h, w), short / min(h, w)) for scale = (long, short),
    -> (new h, new w) rounded half up."""
    f = min(max(scale) / max(h, w), min(scale) / min(h, w))
    return int(h * f + 0.5), int(w * f + 0.5)


class RandomRescale(v2.Transform):
    """Keep-ratio rescale to scale x ratio, ratio ~ U(ratio_range) per sample (mmseg Resize with ratio_range;
    ratio_range (1, 1): the test-time resize). Bilinear without antialiasing for images (mmcv's cv2 resize)."""

    def __init__(self, scale, ratio_range=(1.0, 1.0)):
        super().__init__()
        self.scale, self.ratio_range = tuple(scale), tuple(ratio_range)

    def make_params(self, flat_inputs):
        lo, hi = self.ratio_range
        r = lo + (hi - lo) * float(torch.rand(()))
        h, w = TF.get_size(flat_inputs[0])
        return dict(size=list(rescale_size(h, w, (int(self.scale[0] * r), int(self.scale[1] * r)))))

    def transform(self, inpt, params):
        return self._call_kernel(TF.resize, inpt, params['size'], interpolation=InterpolationMode.BILINEAR,
                                 antialias=False)


def crop_is_balanced(mask, cat_max_ratio, ignore_index=IGNORE):
    """mmseg's cat_max_ratio test: the crop has >= 2 classes and none covers cat_max_ratio or more of its
    non-ignored pixels. mask: [h, w] integer."""
    counts = torch.bincount(mask.flatten().long(), minlength=256)
    counts[ignore_index] = 0
    counts = counts[counts > 0]
    return len(counts) > 1 and float(counts.max()) / float(counts.sum()) < cat_max_ratio


class CatMaxRandomCrop(v2.Transform):
    """Random crop of size x size (smaller images: their size), redrawn up to 10 times while the crop fails
    crop_is_balanced (mmseg RandomCrop with cat_max_ratio; after 10 failures the last draw is kept)."""

    def __init__(self, size, cat_max_ratio=0.75, tries=10):
        super().__init__()
        self.size, self.cat_max_ratio, self.tries = size, cat_max_ratio, tries

    def make_params(self, flat_inputs):
        h, w = TF.get_size(flat_inputs[0])
        ch, cw = min(self.size, h), min(self.size, w)
        draw = lambda: (int(torch.randint(h - ch + 1, ())), int(torch.randint(w - cw + 1, ())))  # noqa: E731
        top, left = draw()
        mask = next((x for x in flat_inputs if isinstance(x, tv_tensors.Mask)), None)
        if mask is not None and self.cat_max_ratio < 1:
            for _ in range(self.tries):
                if crop_is_balanced(mask[..., top:top + ch, left:left + cw], self.cat_max_ratio):
                    break
                top, left = draw()
        return dict(top=top, left=left, height=ch, width=cw)

    def transform(self, inpt, params):
        return self._call_kernel(TF.crop, inpt, **params)


def scale_saturation(img, factor):
    """HSV saturation times factor (clipped at 1), hue and value kept: each channel c -> V - (V - c) * k with
    k = min(factor, V / (V - min)) (exact HSV arithmetic, no colour-space round trip). img: [3, H, W] float."""
    v, lo = img.amax(0, keepdim=True), img.amin(0, keepdim=True)
    k = torch.clamp(v / (v - lo).clamp_min(1e-6), max=factor)
    return v - (v - img) * k


class PhotoMetricDistortion(v2.Transform):
    """mmseg's PhotoMetricDistortion, on the image only (masks pass through). Each step with probability 0.5:
    brightness + U(-32, 32), contrast x U(0.5, 1.5) (first or last, a coin decides), HSV saturation x U(0.5, 1.5),
    hue + randint(-18, 18) of OpenCV's 180 units; clipped to [0, 255] after each. uint8 [3, H, W] in and out."""
    _transformed_types = (tv_tensors.Image,)

    def __init__(self, brightness=32, contrast=(0.5, 1.5), saturation=(0.5, 1.5), hue=18):
        super().__init__()
        self.brightness, self.contrast, self.saturation, self.hue = brightness, contrast, saturation, hue

    def make_params(self, flat_inputs):
        coin = lambda: bool(torch.randint(2, ()))  # noqa: E731
        uniform = lambda lo, hi: lo + (hi - lo) * float(torch.rand(()))  # noqa: E731
        return dict(brightness=uniform(-self.brightness, self.brightness) if coin() else 0.0,
                    contrast_first=coin(), contrast=uniform(*self.contrast) if coin() else 1.0,
                    saturation=uniform(*self.saturation) if coin() else 1.0,
                    hue=int(torch.randint(-self.hue, self.hue, ())) if coin() else 0)

    def transform(self, inpt, params):
        x = inpt.as_subclass(torch.Tensor).float()
        contrast = lambda x: (x * params['contrast']).clamp(0, 255)  # noqa: E731
        x = (x + params['brightness']).clamp(0, 255)
        x = contrast(x) if params['contrast_first'] else x
        x = scale_saturation(x, params['saturation']).clamp(0, 255)
        if params['hue']:
            x = TF.adjust_hue(x / 255, params['hue'] / 180) * 255
        x = x if params['contrast_first'] else contrast(x)
        return tv_tensors.wrap(x.round().to(torch.uint8), like=inpt)


class PadTo(v2.Transform):
    """Pad bottom and right to at least size x size: images with 0 (after Normalize: the mean colour), masks with
    255 (ignored), as mmseg's Pad(size=crop_size, pad_val=0, seg_pad_val=255)."""

    def __init__(self, size):
        super().__init__()
        self.size = size

    def make_params(self, flat_inputs):
        h, w = TF.get_size(flat_inputs[0])
        return dict(padding=[0, 0, max(self.size - w, 0), max(self.size - h, 0)])

    def transform(self, inpt, params):
        fill = IGNORE if isinstance(inpt, tv_tensors.Mask) else 0
        return self._call_kernel(TF.pad, inpt, params['padding'], fill=fill)


def train_transform(crop_size=512, scale=(2048, 512), ratio_range=(0.5, 2.0), cat_max_ratio=0.75,
                    photometric=True, mean=cim.IMAGENET_MEAN, std=cim.IMAGENET_STD):
    """(Image uint8 [3, H, W], Mask [H, W]) -> (image float [3, crop, crop] normalized, mask uint8 [crop, crop])."""
    return v2.Compose([RandomRescale(scale, ratio_range), CatMaxRandomCrop(crop_size, cat_max_ratio),
                       v2.RandomHorizontalFlip(0.5)] + ([PhotoMetricDistortion()] if photometric else []) +
                      [v2.ToDtype({tv_tensors.Image: torch.float32, 'others': None}, scale=True),
                       v2.Normalize(list(mean), list(std)), PadTo(crop_size), v2.ToPureTensor()])


class TestTransform:
    """mmseg's single-scale test view: the image rescaled (keep ratio) to `scale` and normalized; the mask stays at
    the annotation's size, where predictions are scored. (Image, Mask) -> (float [3, h, w], uint8 [H, W])."""

    def __init__(self, scale=(2048, 512), mean=cim.IMAGENET_MEAN, std=cim.IMAGENET_STD):
        self.image = v2.Compose([RandomRescale(scale), v2.ToDtype(torch.float32, scale=True),
                                 v2.Normalize(list(mean), list(std)), v2.ToPureTensor()])

    def __call__(self, img, mask):
        return self.image(img), mask.as_subclass(torch.Tensor)


# ------------------------------------------------------------------------------------------------------------------
# Models: backbone -> decode head (-> auxiliary head) -> logits, bilinearly upsampled to the input size

def dilated_resnet50():
    """torchvision's resnet50 with dilation 2 / 4 in layer3 / layer4 instead of stride (output stride 8, mmseg's
    'd8'; the first block of each keeps the previous dilation, mmseg's contract_dilation). Parameter names are
    unchanged, so CIM exports and torchvision weights load; the classifier is removed ('fc.*' is ignored)."""
    net = torchvision.models.resnet50(replace_stride_with_dilation=[False, True, True])
    net.fc = nn.Identity()
    return net


def resnet_stages(net, imgs):
    """imgs: [B, 3, H, W] -> (layer3 [B, 1024, H/8, W/8], layer4 [B, 2048, H/8, W/8]) of a dilated ResNet-50."""
    x = net.maxpool(net.relu(net.bn1(net.conv1(imgs))))
    c3 = net.layer3(net.layer2(net.layer1(x)))
    return c3, net.layer4(c3)


def conv_bn_relu(cin, cout, kernel=3):
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU(inplace=True))


class FCNHead(nn.Module):
    """mmseg's FCNHead of fcn_r50-d8: num_convs 3x3 conv-BN-ReLU, the input concatenated back (concat_input) and
    fused by one more, Dropout2d(0.1), 1x1 classifier. (torchvision's FCNHead is the one-conv variant without the
    concatenation: it serves as the auxiliary head.) x: [B, in_channels, h, w] -> [B, num_classes, h, w]."""

    def __init__(self, in_channels, channels, num_classes, num_convs=2, dropout=0.1):
        super().__init__()
        self.convs = nn.Sequential(*[conv_bn_relu(in_channels if i == 0 else channels, channels)
                                     for i in range(num_convs)])
        self.conv_cat = conv_bn_relu(in_channels + channels, channels)
        self.dropout = nn.Dropout2d(dropout)
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)

    def forward(self, x):
        return self.conv_seg(self.dropout(self.conv_cat(torch.cat([x, self.convs(x)], dim=1))))


def init_head(head):
    """mmseg's decode-head init: convolutions Kaiming normal (fan_out, ReLU), BatchNorm 1 / 0, the classifier
    (the last conv or linear layer) N(0, 0.01) with zero bias."""
    layers = [m for m in head.modules() if isinstance(m, (nn.Conv2d, nn.Linear, nn.BatchNorm2d))]
    for m in layers[:-1]:
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='relu')
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight), nn.init.zeros_(m.bias)
    nn.init.normal_(layers[-1].weight, std=0.01)
    nn.init.zeros_(layers[-1].bias)
    return head


def upsample(logits, size):
    """Bilinear, align_corners=False (mmseg's resize of seg logits). [B, C, h, w] -> [B, C, *size]."""
    return F.interpolate(logits, size=size, mode='bilinear', align_corners=False)


class FCN(nn.Module):
    """Dilated ResNet-50 + FCNHead(2048 -> 512) on layer4 + auxiliary torchvision FCNHead(1024 -> 256) on layer3
    (mmseg's aux: one conv, channels 1024 // 4, dropout 0.1; loss weight 0.4, training only).
    imgs: [B, 3, H, W] -> [logits [B, C, H, W], aux logits (training)]."""

    def __init__(self, num_classes):
        super().__init__()
        self.backbone = dilated_resnet50()
        self.decode_head = init_head(FCNHead(2048, 512, num_classes))
        self.auxiliary_head = torchvision.models.segmentation.fcn.FCNHead(1024, num_classes)
        self.auxiliary_head[3] = nn.Dropout2d(0.1)  # mmseg drops whole channels; torchvision's has nn.Dropout
        init_head(self.auxiliary_head)

    def forward(self, imgs):
        c3, c4 = resnet_stages(self.backbone, imgs)
        outs = [self.decode_head(c4)] + ([self.auxiliary_head(c3)] if self.training else [])
        return [upsample(o, imgs.shape[-2:]) for o in outs]


class LinearViT(nn.Module):
    """The paper's ViT decoder (Sec. 3.3, BEiT's linear protocol): one nn.Linear(D, C) on every patch token,
    reshaped to the patch grid, bilinear upsampling. The tokens are read after the pre-trained final norm (as CIM's
    own heads read them, so every pre-trained weight is used and only the linear layer is new).
    imgs: [B, 3, crop, crop] -> [logits [B, C, crop, crop]]."""

    def __init__(self, backbone, num_classes):
        super().__init__()
        self.backbone = backbone
        self.decode_head = init_head(nn.Linear(backbone.embed_dim, num_classes))

    def forward(self, imgs):
        B, _, H, W = imgs.shape
        p = self.backbone.patch_size
        tokens = self.backbone.forward_tokens(imgs)[:, 1:]                      # [B, N, D], cls token dropped
        logits = self.decode_head(tokens).transpose(1, 2).reshape(B, -1, H // p, W // p)
        return [upsample(logits, (H, W))]


def build_model(args, device):
    """FCN (resnet50) or LinearViT at --crop-size, --init loaded into the backbone (ViT position embeddings
    interpolated by engine.load_pretrained), stochastic depth, SyncBatchNorm under DDP on GPUs."""
    torch.manual_seed(args.seed)
    if args.arch == 'resnet50':
        model = FCN(args.num_classes).to(memory_format=torch.channels_last)
    else:
        model = LinearViT(cim.build_enhancer(args.arch, args.crop_size, args.patch_size), args.num_classes)
    if args.init != 'none':
        engine.load_pretrained(model.backbone, engine.read_weights(args.init)[0], f"'{args.init}'")
    engine.add_stochastic_depth(model.backbone, args.drop_path)
    if args.world_size > 1 and device.type == 'cuda':  # SyncBatchNorm needs GPUs: on CPU / gloo BatchNorm stays
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model.to(device)


# ------------------------------------------------------------------------------------------------------------------
# Loss

def seg_loss(logits, target):
    """Pixel-wise cross-entropy; ignored (255) pixels add 0 but count in the mean (mmseg's CrossEntropyLoss with
    its default avg_non_ignore=False, as in the fcn and BEiT configs). logits: [B, C, H, W], target: [B, H, W]."""
    return F.cross_entropy(logits.float(), target, ignore_index=IGNORE, reduction='sum') / target.numel()


# ------------------------------------------------------------------------------------------------------------------
# Evaluation (single scale, as mmseg): whole image (FCN) or sliding windows (ViT); confusion matrix -> mIoU

def window_starts(length, crop, stride):
    """mmseg's slide grid along one axis: starts every stride, the last window flush with the border."""
    n = max(length - crop + stride - 1, 0) // stride + 1
    return [min(i * stride, max(length - crop, 0)) for i in range(n)]


def slide_inference(model, imgs, crop, stride, chunk=8):
    """imgs: [B, 3, H, W] -> logits [B, C, H, W] averaged over crop x crop windows (mmseg's mode='slide'; BEiT's
    ADE20K: 512, stride 341). Images smaller than a window are padded bottom / right with 0 (the mean colour) and
    the padding cut from the logits. The windows run as batches of `chunk` images."""
    B, _, H, W = imgs.shape
    x = F.pad(imgs, (0, max(crop - W, 0), 0, max(crop - H, 0)))
    boxes = [(y, x0) for y in window_starts(x.shape[2], crop, stride) for x0 in window_starts(x.shape[3], crop, stride)]
    windows = torch.cat([x[:, :, y:y + crop, x0:x0 + crop] for y, x0 in boxes])          # [len(boxes) * B, 3, c, c]
    out = torch.cat([model(w)[0].float() for w in windows.split(chunk * B)])
    logits = out.new_zeros(B, out.shape[1], *x.shape[2:])
    count = out.new_zeros(1, 1, *x.shape[2:])
    for k, (y, x0) in enumerate(boxes):
        logits[:, :, y:y + crop, x0:x0 + crop] += out[k * B:(k + 1) * B]
        count[:, :, y:y + crop, x0:x0 + crop] += 1
    return (logits / count)[:, :, :H, :W]


def infer(model, imgs, args):
    """Logits at the (test-scale) input size, [B, C, h, w], by --eval-mode."""
    if args.arch == 'resnet50':
        imgs = imgs.contiguous(memory_format=torch.channels_last)
    return model(imgs)[0] if args.eval_mode == 'whole' else slide_inference(model, imgs, args.crop_size, args.stride)


def confusion_matrix(pred, target, num_classes):
    """pred, target: integer tensors of one shape -> [C, C] int64 counts (rows: ground truth, columns: prediction).
    Pixels whose target is 255 (or any label outside 0..C-1) are left out. One bincount, no loop over pixels."""
    valid = (target >= 0) & (target < num_classes)
    idx = torch.where(valid, target * num_classes + pred, num_classes * num_classes)
    return torch.bincount(idx.flatten(), minlength=num_classes ** 2 + 1)[:-1].view(num_classes, num_classes)


def segmentation_metrics(hist):
    """mmseg's metrics (%) from a confusion matrix [C, C]: per-class IoU = TP / (GT + pred - TP) and Acc = TP / GT
    (NaN for a class absent from both / from the ground truth), mIoU and mAcc their NaN-means, aAcc = TP / all."""
    hist = hist.double()
    tp, gt, pred = hist.diag(), hist.sum(1), hist.sum(0)
    iou, acc = tp / (gt + pred - tp), tp / gt
    return dict(mIoU=100 * float(iou.nanmean()), mAcc=100 * float(acc.nanmean()),
                aAcc=100 * float(tp.sum() / hist.sum()), IoU=(100 * iou).tolist())


@torch.no_grad()
def validate(model, loader, args, device, dtype):
    """Confusion matrix over the validation set (batch 1, every image once over all ranks via ShardSampler,
    summed by engine.evaluate); logits resized to the annotation's size, then argmax. -> metrics dict."""
    model.eval()

    def sums(img, mask):  # img: [1, 3, h, w] at the test scale, mask: [1, H, W] at the annotation's size
        logits = upsample(infer(model, img, args).float(), mask.shape[-2:])
        return dict(hist=confusion_matrix(logits.argmax(1), mask.long(), args.num_classes), n=len(mask))
    s = engine.evaluate(sums, loader, device, dtype, desc='val')
    return dict(segmentation_metrics(s['hist']), n_val=int(s['n']))


def palette(num_classes, seed=0):
    """A fixed colour per class, [C + 1, 3] in [0, 1], drawn from a seeded generator; the last row (black): ignored."""
    g = torch.Generator().manual_seed(seed)
    return torch.cat([0.2 + 0.8 * torch.rand(num_classes, 3, generator=g), torch.zeros(1, 3)])


@torch.no_grad()
def save_predictions(path, model, dataset, args, device, dtype):
    """PNG, one row per validation image (the first --vis-images): image, ground truth, prediction."""
    model.eval()
    colours, rows = palette(args.num_classes), []
    for i in range(min(args.vis_images, len(dataset))):
        img, mask = dataset[i][:2]
        with engine.autocast(device, dtype):
            logits = infer(model, img[None].to(device), args)
        pred = upsample(logits.float(), mask.shape[-2:]).argmax(1)[0].cpu()
        shown = upsample(cim.unnormalize(img[None]), mask.shape[-2:])[0]
        rows += [shown] + [colours[m.long().clamp(max=args.num_classes)].permute(2, 0, 1) for m in (mask, pred)]
    H, W = max(t.shape[1] for t in rows), max(t.shape[2] for t in rows)
    tiles = torch.stack([F.pad(t, (0, W - t.shape[2], 0, H - t.shape[1]), value=1.0) for t in rows])
    k = max(1, 256 // max(H, W))  # small demo images are enlarged
    torchvision.utils.save_image(F.interpolate(tiles, scale_factor=k, mode='nearest'), path, nrow=3, padding=2,
                                 pad_value=1.0)
    return path


# ------------------------------------------------------------------------------------------------------------------
# Training: an iteration loop over an endless stream of batches

def endless_batches(loader, sampler, dataset, start_step, steps_per_epoch, accum_iter):
    """Micro-batches from optimizer step start_step on. An 'epoch' is one pass of the ResumableSampler; set_epoch
    at each pass, so a resumed run sees exactly the batches (and seeded crops) an uninterrupted one would."""
    epoch, step = divmod(start_step, steps_per_epoch)
    while True:
        sampler.set_epoch(epoch, step * accum_iter)
        dataset.set_epoch(epoch)
        yield from itertools.islice(loader, (steps_per_epoch - step) * accum_iter)
        epoch, step = epoch + 1, 0


def train_step(model, ddp, batches, optimizer, scaler, args, device, dtype, metrics):
    """One optimizer step over args.accum_iter micro-batches (all-reduce on the last only). Loss = CE of the decode
    head + aux_weight x CE of the auxiliary head (FCN). -> grad norm (0-dim, non-finite when the step was skipped)."""
    weights = (1.0, args.aux_weight)
    for micro in range(args.accum_iter):
        imgs, masks, n_bad = next(batches)
        imgs, masks = imgs.to(device, non_blocking=True), masks.to(device, non_blocking=True).long()
        if args.arch == 'resnet50':
            imgs = imgs.contiguous(memory_format=torch.channels_last)
        last = micro == args.accum_iter - 1
        with ddp.no_sync() if ddp is not model and not last else contextlib.nullcontext():
            with engine.autocast(device, dtype):
                outs = ddp(imgs)
            losses = [seg_loss(o, masks) for o in outs]
            loss = sum(w * x for w, x in zip(weights, losses))
            scaler.scale(loss / args.accum_iter).backward()
        metrics.update(loss=loss.detach(), **({'aux_loss': losses[1].detach()} if len(losses) > 1 else {}))
        metrics.add(n_bad_images=n_bad.sum())
    return engine.optimizer_step(optimizer, scaler, [p for p in model.parameters() if p.requires_grad], args.amp)


def build_optimizer(model, args):
    """ViT: AdamW with BEiT's layer-wise lr decay (engine.layer_decay, prefix 'backbone.') and no weight decay on
    norms, biases, position / cls embeddings. ResNet-50: SGD with momentum, weight decay on every parameter (mmseg)."""
    if isinstance(model.backbone, cim.VisionTransformer):
        scale = engine.layer_decay(len(model.backbone.blocks), args.layer_decay, prefix='backbone.')
        groups = engine.param_groups(model, args.weight_decay, cim.NO_WEIGHT_DECAY_KEYS, scale)
        return torch.optim.AdamW(groups, lr=args.lr, betas=tuple(args.betas), fused=True)
    return torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=args.lr, momentum=args.momentum,
                           weight_decay=args.weight_decay, fused=True)


def run(args, rank, device, demo=False):
    """Trains and evaluates with fully resolved args -> final metrics dict (None: stopped by --stop-after-steps)."""
    args.amp, dtype = engine.resolve_amp(args.amp, device)
    os.makedirs(args.output_dir, exist_ok=True)
    train_set, val_set, classes = build_data(args, demo)
    val_loader = torch.utils.data.DataLoader(val_set, 1, sampler=engine.ShardSampler(len(val_set), args.world_size,
                                             rank), num_workers=args.num_workers, pin_memory=device.type == 'cuda')
    dataset = engine.SeededDataset(train_set, args.seed)  # crops as a function of (seed, epoch, index): exact resume
    sampler = engine.ResumableSampler(dataset, args.batch_size, args.world_size, rank, seed=args.seed)
    loader, steps_per_epoch = engine.train_loader(dataset, sampler, args.batch_size, args.accum_iter,
                                                  args.num_workers, args.seed, device)
    model = build_model(args, device)
    optimizer = build_optimizer(model, args)
    scaler = engine.grad_scaler(device, args.amp)

    torch.manual_seed(args.seed + rank)  # from here on, dropout and stochastic depth differ across ranks
    random.seed(args.seed + rank)
    np.random.seed(args.seed + rank)
    start, log = 0, dict(n_bad_images=0, skipped_steps=0, best_mIoU=-1.0, best_iter=0, last={})
    ckpt = args.resume or engine.find_checkpoint(args.output_dir)
    if ckpt:
        start = resume(ckpt, model, optimizer, scaler, args, rank, log)
    ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == 'cuda' else None) \
        if args.world_size > 1 else model
    total_batch = args.batch_size * args.world_size * args.accum_iter
    if engine.is_main():
        print(f'{args.arch} + {"FCN" if args.arch == "resnet50" else "linear"} from {args.init}: {len(train_set)} '
              f'training / {len(val_set)} val images, {args.num_classes} classes, {args.iters} iterations '
              f'({steps_per_epoch} per epoch), total batch {total_batch} ({args.world_size} x {args.batch_size} x '
              f'{args.accum_iter}), peak lr {args.lr:.2e}, amp {args.amp}, eval {args.eval_mode}, output '
              f'{args.output_dir}')
    batches = endless_batches(loader, sampler, dataset, start, steps_per_epoch, args.accum_iter)
    tlog = engine.TrainLog(device, os.path.join(args.output_dir, 'log.jsonl'), total_batch, args.max_bad_steps)
    pbar = tqdm(total=args.iters, initial=start, desc='train', disable=not engine.is_main(), dynamic_ncols=True)
    for it in range(start, args.iters):
        lr = engine.poly_lr(it, args.iters, args.lr, args.power, args.min_lr, args.warmup_iters)
        engine.set_lr(optimizer, lr)
        ddp.train()
        tlog.step(train_step(model, ddp, batches, optimizer, scaler, args, device, dtype, tlog.metrics), lr)
        pbar.update(1)
        done = it + 1
        if done % args.log_every == 0 or done == args.iters:
            tlog.write(log, pbar, lr, done, 'try a lower --lr', iter=done, epoch=it // steps_per_epoch)
        if done % args.eval_every == 0 or done == args.iters:  # before saving: a resumed run skips this evaluation
            evaluate_and_log(model, val_loader, val_set, classes, args, done, log, device, dtype)
        stop = args.stop_after_steps and done >= args.stop_after_steps
        if stop or done == args.iters or (args.save_every_steps and done % args.save_every_steps == 0):
            engine.save_training_state(model, optimizer, scaler, args, log, iteration=done)
        if stop:
            pbar.close()
            if engine.is_main():
                print(f'stopped after step {args.stop_after_steps} (--stop-after-steps)')
            return None
    pbar.close()
    last = log['last']
    if engine.is_main():
        print(f"done: {args.arch} from {args.init}, single-scale val mIoU {last['mIoU']:.2f} aAcc "
              f"{last['aAcc']:.2f} mAcc {last['mAcc']:.2f} at iter {last['iter']} (best mIoU {log['best_mIoU']:.2f} "
              f"at iter {log['best_iter']}); {args.output_dir}/checkpoint-best.pth, {engine.CHECKPOINT}, log.jsonl")
    return dict(last, best_mIoU=log['best_mIoU'], best_iter=log['best_iter'])


def evaluate_and_log(model, val_loader, val_set, classes, args, done, log, device, dtype):
    """Validation metrics into log['last'] (and log['best_*']); rank 0 writes the log line with per-class IoU,
    checkpoint-best.pth when mIoU improved, the PNG, and one summary line."""
    m = validate(model, val_loader, args, device, dtype)
    log['last'] = dict(iter=done, **{k: v for k, v in m.items() if k != 'IoU'})
    best = m['mIoU'] > log['best_mIoU']
    if best:
        log['best_mIoU'], log['best_iter'] = m['mIoU'], done
    if not engine.is_main():
        return
    out = lambda name: os.path.join(args.output_dir, name)  # noqa: E731
    engine.log_jsonl(out('log.jsonl'), dict(log['last'], IoU={c: None if v != v else round(v, 2)  # NaN: absent
                                                              for c, v in zip(classes, m['IoU'])}))
    if best:
        engine.atomic_save(dict(model=model.state_dict(), args=vars(args), **log['last']), out('checkpoint-best.pth'))
    png = save_predictions(out(f'iter{done:06d}.png'), model, val_set, args, device, dtype) if args.vis_images else ''
    tqdm.write(f"iter {done}/{args.iters}: mIoU {m['mIoU']:.2f}  aAcc {m['aAcc']:.2f}  mAcc {m['mAcc']:.2f}  (best "
               f"mIoU {log['best_mIoU']:.2f} at iter {log['best_iter']}) {png}")


# ------------------------------------------------------------------------------------------------------------------
# Checkpoints: model, optimizer, scaler, RNG states, iteration (the sampler position follows from it), log

SAME_ARGS = ('arch', 'patch_size', 'crop_size', 'num_classes', 'batch_size', 'accum_iter', 'world_size')


def resume(path, model, optimizer, scaler, args, rank, log):
    """Loads a checkpoint of the same model and batch layout (else one-line ValueError) -> iterations done."""
    state = engine.load_training_state(path, model, optimizer, scaler, args, rank, log, SAME_ARGS)
    if engine.is_main():
        print(f"resumed from '{path}': iteration {state['iteration']}")
    return state['iteration']


# ------------------------------------------------------------------------------------------------------------------
# Data of one run; the built-in demo: 2x2 mosaics of Fashion-MNIST items, label = background or 1 + item class

DEMO_IMAGES = (1000, 100)  # training / validation mosaics (4 Fashion-MNIST items each)
DEMO_THRESHOLD = 16        # pixels darker than this (of 255) are background
# 32 px crops of the 64 px mosaics (test: 32 px windows, stride 21), as 512 crops of ADE20K images: the demo
# checkpoint's resolution (no position-embedding interpolation) at a quarter of the cost of 64 px crops. Measured
# (frozen patch tokens of the same mosaics, linear probe of the item class, pre-trained vs random): 45.5% vs 41.7%
# as 32 px cells, 27.0% vs 26.2% at 64 px with the 8x8 grid interpolated to 16x16. lr 2e-3 gave both inits their
# best mIoU in 300 steps (of 3e-4, 1e-3, 2e-3).
DEMO = dict(crop_size=32, scale=(256, 64), ratio_range=(0.75, 1.5), iters=300, batch_size=16, warmup_iters=30,
            lr=5e-3, eval_every=300, log_every=20, save_every_steps=0, num_workers=1)
# lr 5e-3: as in finetune.py's demo, a short schedule wants a large lr, which the pre-trained start tolerates and
# random init does not (measured: 21.0 vs 13.3 mIoU; at 2e-3: 19.6 vs 20.8, within run-to-run noise of ~2)


def fashion_mosaics(images, labels, threshold=DEMO_THRESHOLD):
    """images: [4n, 28, 28] uint8, labels: [4n] -> (mosaics [n, 64, 64] uint8, masks [n, 64, 64] uint8).
    Items 4k..4k+3 fill the 2x2 cells of mosaic k (28 px + 2 px black border = 32 px, the pre-training size);
    mask = 0 where the pixel is below threshold, else 1 + the item's class (11 classes)."""
    x = F.pad(images, (2, 2, 2, 2))
    m = torch.where(x >= threshold, labels.view(-1, 1, 1) + 1, 0).to(torch.uint8)
    tile = lambda t: t.view(-1, 2, 2, 32, 32).permute(0, 1, 3, 2, 4).reshape(-1, 64, 64)  # noqa: E731
    return tile(x), tile(m)


class MosaicImages(torch.utils.data.Dataset):
    """In-memory gray images and masks ([N, H, W] uint8) with ADE20K's items: (*transform(Image, Mask), 0)."""

    def __init__(self, images, masks, transform):
        self.images, self.masks, self.transform = images, masks, transform

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        img = tv_tensors.Image(self.images[i].expand(3, -1, -1).clone())
        return *self.transform(img, tv_tensors.Mask(self.masks[i])), 0


def build_data(args, demo):
    """-> (training set, validation set, class names); sets args.num_classes (ADE20K: 150, the demo: 11)."""
    train_tf = train_transform(args.crop_size, args.scale, args.ratio_range, args.cat_max_ratio)
    test_tf = TestTransform(args.scale)
    if not demo:
        args.num_classes = 150
        return (ADE20K(args.data, 'training', train_tf), ADE20K(args.data, 'validation', test_tf),
                class_names(args.data, 150))
    n_train, n_val = args.demo_images or DEMO_IMAGES
    args.num_classes = 1 + len(engine.FASHION_MNIST_CLASSES)
    sets = []
    for train, n, tf in ((True, n_train, train_tf), (False, n_val, test_tf)):
        x, y = engine.fashion_mnist(train=train)
        sets.append(MosaicImages(*fashion_mosaics(x[:4 * n], y[:4 * n]), tf))
    return sets[0], sets[1], ['background'] + list(engine.FASHION_MNIST_CLASSES)


def demo_setup(args, parser, meta):
    """No --data: the demo. Flags left at their defaults get demo-scale values; the architecture and patch size
    are the pre-trained checkpoint's (train.py's demo: vit_tiny, patch 4, 32 px)."""
    changes = {k: v for k, v in DEMO.items() if getattr(args, k) in (None, parser.get_default(k))}
    if args.arch == parser.get_default('arch'):
        changes['arch'] = meta.get('arch', 'vit_tiny')
    if args.patch_size == parser.get_default('patch_size'):
        changes['patch_size'] = meta.get('patch_size', 4)
    changes['output_dir'] = args.output_dir or os.path.join('out', 'demo_seg')
    for k, v in changes.items():
        setattr(args, k, v)
    if 'warmup_iters' in changes:  # 10% of the demo's iterations
        args.warmup_iters = changes['warmup_iters'] = args.iters // 10
    if engine.is_main():
        print('no --data: running the built-in demo on 2x2 mosaics of Fashion-MNIST items (64 px, 11 classes, 32 px '
              'crops). '
              'Demo scale: ' + ', '.join(f"--{k.replace('_', '-')} {v}" for k, v in changes.items()))


# ------------------------------------------------------------------------------------------------------------------
# Command line

def check_args(args, device):
    """User mistakes that would otherwise surface deep inside torch: one clear line each."""
    for k in ('iters', 'batch_size', 'accum_iter', 'crop_size', 'stride', 'eval_every', 'log_every',
              'max_bad_steps'):
        if getattr(args, k) < 1:
            raise ValueError(f"--{k.replace('_', '-')} must be >= 1, got {getattr(args, k)}")
    if not 0 <= args.warmup_iters <= args.iters:
        raise ValueError(f'--warmup-iters {args.warmup_iters} must be between 0 and --iters {args.iters}')
    if min(args.scale) < 1 or not 0 < args.ratio_range[0] <= args.ratio_range[1] or not 0 < args.cat_max_ratio <= 1:
        raise ValueError('--scale must be positive, --ratio-range LOW HIGH with 0 < LOW <= HIGH, --cat-max-ratio in '
                         '(0, 1]')
    if not 0 <= args.drop_path < 1:
        raise ValueError(f'--drop-path must be in [0, 1), got {args.drop_path}')
    if args.arch in cim.VIT_CONFIGS:
        if args.crop_size % args.patch_size:
            raise ValueError(f'--crop-size {args.crop_size} is not divisible by --patch-size {args.patch_size}')
        if args.eval_mode == 'whole':
            raise ValueError(f'a ViT has position embeddings for --crop-size {args.crop_size} only: use --eval-mode '
                             f'slide (test images have other sizes)')
    if args.eval_mode == 'slide' and args.stride > args.crop_size:
        raise ValueError(f'--stride {args.stride} larger than --crop-size {args.crop_size} leaves pixels unseen')
    if args.arch == 'resnet50' and args.batch_size < 2 and not (args.world_size > 1 and device.type == 'cuda'):
        raise ValueError(f'--batch-size {args.batch_size} with resnet50: BatchNorm needs more than one image per '
                         f'process (SyncBatchNorm, multi-GPU only, pools the batch across GPUs); use --batch-size >= 2')


def main(argv=None):
    parser = get_args_parser()
    args = parser.parse_args(argv)
    demo = args.data is None
    rank, args.world_size, device = engine.init_distributed()
    args.init, meta = engine.resolve_init(args.init, demo)
    if demo:
        demo_setup(args, parser, meta)
    recipe = FCN_RECIPE if args.arch == 'resnet50' else VIT_RECIPE
    taken = [k for k in recipe if getattr(args, k) is None]
    for k in taken:
        setattr(args, k, recipe[k])
    args.stride = args.stride or args.crop_size * 2 // 3
    args.output_dir = args.output_dir or os.path.join('out', f'seg_{args.arch}')
    check_args(args, device)
    if engine.is_main():
        print('recipe: ' + ', '.join(f"--{k.replace('_', '-')} {getattr(args, k)}" for k in taken))
    if device.type == 'cuda':
        torch.backends.cudnn.benchmark = True
    if not demo:
        return run(args, rank, device)

    # demo: the same schedule from the pre-trained checkpoint and from random initialization
    results = engine.pretrained_vs_scratch(run, args, rank, device)
    if results is None:  # --stop-after-steps
        return None
    if engine.is_main():
        n_train = (args.demo_images or DEMO_IMAGES)[0]
        print(f'Fashion-MNIST mosaics, val mIoU after {args.iters} iterations on {n_train} training mosaics '
              f'({args.arch}, linear decoder): ' +
              '  vs  '.join(f"{name} {r['mIoU']:.2f}%" for name, r in results.items()))
    return results


if __name__ == '__main__':
    engine.run_cli(main)
