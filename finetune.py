"""ImageNet-1K evaluation of CIM-pre-trained backbones (Sec. 3.2): end-to-end fine-tuning (Tables 1-2 with the
recipes of Tables 10-11), linear probing (MAE's protocol) and kNN, with the paper's settings as defaults.

    # ViT-B/16, Table 10 (8 GPUs x 128 = batch 1024); rerunning the same command resumes
    torchrun --nproc_per_node=8 finetune.py --arch vit_base --init out/vitb_respix/enhancer.pth \\
        --data /imagenet --output-dir out/ft_vitb
    # ResNet-50, Table 11: --recipe 100 | 300 | 600 (8 x 256 = batch 2048, binary cross-entropy)
    torchrun --nproc_per_node=8 finetune.py --arch resnet50 --recipe 300 --init out/r50_revdet/enhancer.pth \\
        --data /imagenet --output-dir out/ft_r50_300
    # the from-scratch baselines of Tables 1-2
    torchrun --nproc_per_node=8 finetune.py --arch resnet50 --recipe 100 --init none --data /imagenet
    # linear probe (frozen backbone, BatchNorm + linear, 90 epochs) and kNN (k = 20) of the pooled features
    torchrun --nproc_per_node=8 finetune.py --linear-probe --arch vit_base --init enhancer.pth --data /imagenet
    torchrun --nproc_per_node=8 finetune.py --knn --arch vit_base --init enhancer.pth --data /imagenet
    # the built-in demo: fine-tunes train.py's demo checkpoint on Fashion-MNIST, next to random init
    python train.py && python finetune.py

--data holds train/<class>/<image> and val/<class>/<image> (ImageNet layout). --init reads a train.py checkpoint (its
enhancer), a `train.py --export` backbone, or a torchvision / timm state dict; `--init none` starts from scratch.
"""
import argparse
import contextlib
import functools
import os
import random

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision.transforms.v2 as v2
from torch.nn.parallel import DistributedDataParallel
from torchvision.transforms import InterpolationMode
from tqdm import tqdm

import cim
import engine


# ------------------------------------------------------------------------------------------------------------------
# Recipes: Table 10 (ViT), Table 11 (ResNet-50, three columns), MAE's linear probe. Flags left unset take these.

COMMON = dict(warmup_epochs=5, betas=(0.9, 0.999), clip_grad=0.0, min_lr=1e-6, min_crop_scale=0.08,
              randaug_ops=2, randaug_mstd=0.5, crop_ratio=0.95, layer_decay=1.0, repeated_aug=1, reprob=0.0)
VIT_RECIPE = dict(COMMON, epochs=100, ref_batch=1024, batch_size=128, weight_decay=0.05, layer_decay=0.8,
                  drop_path=0.1, smoothing=0.1, mixup=0.8, cutmix=1.0, randaug=9, loss='ce',
                  reprob=0.25)  # random erasing: Table 10 is silent, BEiT's (and MAE's) default
VIT_LR = {('vit_base', 'respix'): 3e-3, ('vit_base', 'revdet'): 5e-3}  # Table 10; ViT-S/Ti: 3e-3 (or 4e-3)
RESNET_RECIPES = {  # Table 11: 100 / 300 / 600 epochs (RSB A3 / A2 / A1 with AdamW); ref batch 8 x 256 = 2048
    r: dict(COMMON, epochs=r, ref_batch=2048, batch_size=256, blr=12e-3, loss='bce', cutmix=1.0, drop_path=dp,
            weight_decay=wd, input_size=size, randaug=m, mixup=mix, smoothing=ls, repeated_aug=ra)
    for r, wd, size, m, mix, ls, ra, dp in ((100, 0.02, 160, 6, 0.1, 0.1, 1, 0.0), (300, 0.02, 224, 7, 0.1, 0.0, 3, 0.0),
                                            (600, 0.01, 224, 7, 0.2, 0.1, 3, 0.05))}
PROBE_RECIPE = dict(COMMON, epochs=90, warmup_epochs=10, ref_batch=16384, batch_size=2048, blr=6.4, weight_decay=0.0,
                    min_lr=0.0, drop_path=0.0, smoothing=0.0, mixup=0.0, cutmix=0.0, randaug=0, loss='ce',
                    crop_ratio=0.875)  # MAE linear probe: base lr 0.1 per 256 images, batch 16384, RRC + flip only


def get_args_parser():
    p = engine.ArgumentParser(description='Fine-tuning, linear probing and kNN of CIM-pre-trained backbones (Fang et '
                                          'al., ICLR 2023). Unset flags: the recipe (Table 10 ViT, Table 11 ResNet-50, '
                                          'MAE linear probe).', formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group('model')
    g.add_argument('--arch', default='vit_base', choices=cim.ARCHS)
    g.add_argument('--init', metavar='PATH', default=None, help="pre-trained weights (train.py checkpoint or --export, "
                   "torchvision / timm state dict) or 'none' (from scratch); demo: out/demo/checkpoint-last.pth")
    g.add_argument('--patch-size', type=int, default=16)
    g.add_argument('--linear-probe', action='store_true', help='frozen backbone, BatchNorm1d + linear (MAE)')
    g.add_argument('--knn', action='store_true', help='evaluation only: kNN top-1 of the pooled features')
    g.add_argument('--knn-k', type=int, default=20)
    g.add_argument('--knn-t', type=float, default=0.07, help='kNN vote temperature')
    g = p.add_argument_group('recipe (unset: Table 10 / Table 11 column / MAE linear probe)')
    g.add_argument('--recipe', type=int, default=None, choices=sorted(RESNET_RECIPES),
                   help='resnet50: Table 11 column (fine-tuning epochs); default 300')
    g.add_argument('--epochs', type=int, help='ViT-B 100, ViT-S 200; R50 = --recipe; probe 90')
    g.add_argument('--warmup-epochs', type=int, help='5; probe 10')
    g.add_argument('--batch-size', type=int, help='per GPU (process): ViT 128, R50 256, probe 2048 (x 8 GPUs)')
    g.add_argument('--accum-iter', type=int, default=1, help='gradient accumulation steps')
    g.add_argument('--blr', type=float, help='peak lr at the reference batch, scaled linearly: ViT-B 3e-3 (RESPIX) / '
                                             '5e-3 (REVDET) at 1024, ViT-S 3e-3; R50 12e-3 at 2048; probe 6.4 at 16384')
    g.add_argument('--ref-batch', type=int, help='the total batch --blr refers to: ViT 1024, R50 2048, probe 16384')
    g.add_argument('--lr', type=float, help='absolute peak lr (overrides --blr)')
    g.add_argument('--min-lr', type=float, help='end of the cosine decay (BEiT: 1e-6; probe 0)')
    g.add_argument('--weight-decay', type=float, help='ViT 0.05; R50 0.02 / 0.02 / 0.01; probe 0')
    g.add_argument('--layer-decay', type=float, help='ViT 0.8 (BEiT layer ids); 1 = off (R50, probe)')
    g.add_argument('--betas', type=float, nargs=2, help='AdamW (0.9, 0.999)')
    g.add_argument('--clip-grad', type=float, help='global grad-norm clip; 0 = off (Tables 10-11)')
    g.add_argument('--drop-path', type=float, help='stochastic depth at the last block: ViT 0.1; R50 0 / 0 / 0.05')
    g.add_argument('--smoothing', type=float, help='label smoothing: ViT 0.1; R50 0.1 / 0 / 0.1')
    g.add_argument('--mixup', type=float, help='mixup alpha: ViT 0.8; R50 0.1 / 0.1 / 0.2 (0 = off)')
    g.add_argument('--cutmix', type=float, help='cutmix alpha: 1.0 (0 = off)')
    g.add_argument('--randaug', type=int, help='RandAugment magnitude (0-10, timm scale; 0 = off): ViT 9; R50 6 / 7 / 7')
    g.add_argument('--randaug-ops', type=int, help='RandAugment ops per image (2)')
    g.add_argument('--randaug-mstd', type=float, help='RandAugment magnitude std (0.5)')
    g.add_argument('--reprob', type=float, help='random erasing probability: ViT 0.25 (BEiT); R50 0')
    g.add_argument('--repeated-aug', type=int, help='copies per image (Berman et al. 2019): R50 1 / 3 / 3; 1 = off')
    g.add_argument('--loss', choices=('ce', 'bce'), help='ViT: soft-target cross-entropy; R50: binary CE (RSB)')
    g.add_argument('--input-size', type=int, help='training resolution: 224; R50 160 / 224 / 224')
    g.add_argument('--test-size', type=int, help='evaluation resolution (224)')
    g.add_argument('--crop-ratio', type=float, help='evaluation: resize to test-size / ratio, center crop (0.95; '
                                                    'probe 0.875)')
    g.add_argument('--min-crop-scale', type=float, help='RandomResizedCrop scale (0.08, 1)')
    g = p.add_argument_group('system')
    g.add_argument('--data', metavar='DIR', help='folder with train/<class>/* and val/<class>/*; none: the demo')
    engine.add_run_args(g, 'default: out/ft_<arch>, out/probe_<arch>, out/demo_ft', num_workers=10,
                        save_every_steps=1000, save_help='steps between checkpoint-last.pth saves; also every epoch')
    p.add_argument('--stop-after-steps', type=int, default=0, help=argparse.SUPPRESS)  # tests: a preemption
    p.add_argument('--demo-images', type=int, nargs=2, default=None, help=argparse.SUPPRESS)  # tests: tiny demo
    return p


def recipe_for(args):
    """The recipe dict for these flags (arch, --recipe, --linear-probe), before flags override it."""
    if args.linear_probe or args.knn:
        return dict(PROBE_RECIPE)
    if args.arch == 'resnet50':
        return dict(RESNET_RECIPES[args.recipe or 300])
    r = dict(VIT_RECIPE, epochs=100 if args.arch == 'vit_base' else 200)
    r['blr'] = VIT_LR.get((args.arch, args.task), 3e-3)
    return r


def apply_recipe(args, recipe):
    """Unset (None) flags take the recipe's value. -> the names taken, for the run's header line."""
    taken = []
    for k, v in recipe.items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
            taken.append(k)
    args.test_size = args.test_size or 224
    args.input_size = args.input_size or 224
    return taken


# ------------------------------------------------------------------------------------------------------------------
# Data: the training and evaluation views, repeated augmentation

class RandAugment(v2.RandAugment):
    """timm's 'rand-m{M}-mstd{S}' with torchvision's operations: 2 ops per image at magnitude M on timm's 0-10 scale
    (torchvision bins of 0.1 up to 10, so M = 10 is each op's maximum), M drawn per image from N(M, S) clipped to
    [0, 10] (timm draws per op). Severity increases with M for every op, as timm's 'inc1'."""

    def __init__(self, num_ops, magnitude, mstd, fill):
        super().__init__(num_ops=num_ops, magnitude=0, num_magnitude_bins=101, fill=fill,
                         interpolation=InterpolationMode.BICUBIC)
        self.mean_magnitude, self.mstd = magnitude, mstd

    def forward(self, *inputs):
        m = self.mean_magnitude + self.mstd * float(torch.randn(()))
        self.magnitude = int(round(min(max(m, 0.0), 10.0) * 10))
        return super().forward(*inputs)


def train_transform(size, min_scale=0.08, randaug=0, randaug_ops=2, randaug_mstd=0.5, reprob=0.0,
                    mean=cim.IMAGENET_MEAN, std=cim.IMAGENET_STD):
    """PIL image -> [3, size, size] normalized: RandomResizedCrop (bicubic) + flip, RandAugment, random erasing
    (timm's 'pixel' mode: Gaussian noise). The BEiT / RSB pipelines with torchvision.transforms.v2."""
    ops = [v2.RandomResizedCrop(size, scale=(min_scale, 1.0), interpolation=InterpolationMode.BICUBIC),
           v2.RandomHorizontalFlip()]
    if randaug > 0:
        ops.append(RandAugment(randaug_ops, randaug, randaug_mstd, fill=[round(255 * m) for m in mean]))
    ops += [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]
    if reprob > 0:
        ops.append(v2.RandomErasing(reprob, value='random'))
    return v2.Compose(ops + [v2.ToPureTensor()])


def eval_transform(size, crop_ratio=0.95, mean=cim.IMAGENET_MEAN, std=cim.IMAGENET_STD):
    """Tables 10-11's test view: resize the short side to size / crop_ratio (bicubic), center crop size."""
    return v2.Compose([v2.Resize(int(size / crop_ratio), interpolation=InterpolationMode.BICUBIC),
                       v2.CenterCrop(size), v2.ToImage(), v2.ToDtype(torch.float32, scale=True),
                       v2.Normalize(list(mean), list(std)), v2.ToPureTensor()])


def image_folders(root, train_tf, val_tf):
    """root/train and root/val ImageFolders with the same classes -> (train, val, class names)."""
    for split in ('train', 'val'):
        if not os.path.isdir(os.path.join(root, split)):
            raise FileNotFoundError(f"'{os.path.join(root, split)}' does not exist: --data must hold train/<class>/"
                                    f"<image> and val/<class>/<image> (the ImageNet layout)")
    train, val = engine.ImageFiles(os.path.join(root, 'train'), train_tf), engine.ImageFiles(os.path.join(root, 'val'),
                                                                                             val_tf)
    for split, ds in (('train', train), ('val', val)):
        if not ds.classes:
            raise ValueError(f"'{os.path.join(root, split)}' holds images but no class folders: sort them into "
                             f"{split}/<class>/ (for ImageNet val, e.g. with the usual valprep.sh)")
    if train.classes != val.classes:
        extra = sorted(set(train.classes) ^ set(val.classes))
        raise ValueError(f"train/ and val/ under '{root}' have different class folders ({len(train.classes)} vs "
                         f"{len(val.classes)}; e.g. {', '.join(extra[:3])})")
    return train, val, train.classes


class Repeated(torch.utils.data.Dataset):
    """`repeats` copies of a dataset: item r * N + i is item i (so each copy gets its own SeededDataset seed)."""

    def __init__(self, dataset, repeats):
        self.dataset, self.repeats = dataset, repeats

    def __len__(self):
        return len(self.dataset) * self.repeats

    def __getitem__(self, j):
        return self.dataset[j % len(self.dataset)]


class RepeatAugSampler(torch.utils.data.Sampler):
    """Repeated augmentation (Hoffer et al. 2020; Berman et al. 2019; DeiT's RASampler), resumable.

    Each epoch draws num_images // repeats images (rounded down to a multiple of the number of ranks), so an epoch
    keeps about the dataset's length, as in DeiT / timm. Each image appears `repeats` times, as indices into
    Repeated(dataset, repeats) (copy r of image i is r * N + i); consecutive copies go to consecutive ranks, so the
    copies land on different ranks in the same step (when repeats <= ranks) and every rank gets the same count.
    set_epoch(epoch, start_batch) as engine.ResumableSampler.
    """

    def __init__(self, num_images, batch_size, num_replicas=1, rank=0, repeats=3, seed=0):
        self.n, self.batch_size, self.num_replicas, self.rank = num_images, batch_size, num_replicas, rank
        self.repeats, self.seed, self.epoch, self.start_batch = repeats, seed, 0, 0
        self.num_unique = num_images // repeats // num_replicas * num_replicas
        self.num_samples = self.num_unique * repeats // num_replicas  # per rank
        if self.num_samples == 0:
            raise ValueError(f'{num_images} images are too few for repeated augmentation x{repeats} on '
                             f'{num_replicas} processes')

    def set_epoch(self, epoch, start_batch=0):
        self.epoch, self.start_batch = epoch, start_batch

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        images = torch.randperm(self.n, generator=g)[:self.num_unique]
        copies = images.repeat_interleave(self.repeats) + torch.arange(self.repeats).repeat(self.num_unique) * self.n
        return iter(copies[self.rank::self.num_replicas][self.start_batch * self.batch_size:].tolist())

    def __len__(self):
        return self.num_samples - self.start_batch * self.batch_size


# ------------------------------------------------------------------------------------------------------------------
# Models: the classifier on the backbone, and the linear probe

def build_classifier(arch, num_classes, img_size=224, patch_size=16, drop_path=0.0):
    """The backbone (cim.build_enhancer) with a fresh num_classes classifier and stochastic depth.

    ViT: logits = head(mean of the patch tokens after the final norm) (cim.VisionTransformer.forward; timm's
    global_pool='avg', fc_norm=False, so the names are timm's). Why not the cls token: CIM's losses read only the
    patch tokens (Sec. 2.2), so the cls token is never trained to summarize the image, and BEiT / MAE fine-tune with
    mean pooling too. Unlike BEiT's fc_norm (a fresh LayerNorm after pooling), the pre-trained final norm is kept:
    every pre-trained weight is used and only the head is new. The head starts near zero (std 2e-5, MAE / BEiT).
    ResNet-50: torchvision's, `fc` (default init) on the global average pool.
    """
    model = cim.build_enhancer(arch, img_size, patch_size)
    if isinstance(model, cim.VisionTransformer):
        model.head = nn.Linear(model.embed_dim, num_classes)
        nn.init.trunc_normal_(model.head.weight, std=2e-5)
        nn.init.zeros_(model.head.bias)
    else:
        model.fc = nn.Linear(2048, num_classes)
    return engine.add_stochastic_depth(model, drop_path)


class LinearProbe(nn.Module):
    """MAE's linear probe: the frozen backbone's pooled features (cim.pooled_features) -> BatchNorm1d without affine
    parameters (it only standardizes the features) -> Linear. The backbone stays in eval mode, without gradients."""

    def __init__(self, backbone, num_classes):
        super().__init__()
        dim = backbone.embed_dim if isinstance(backbone, cim.VisionTransformer) else 2048
        self.backbone = backbone.requires_grad_(False).eval()
        self.head = nn.Sequential(nn.BatchNorm1d(dim, affine=False, eps=1e-6), nn.Linear(dim, num_classes))
        nn.init.trunc_normal_(self.head[1].weight, std=0.01)
        nn.init.zeros_(self.head[1].bias)

    def train(self, mode=True):
        super().train(mode)
        self.backbone.eval()
        return self

    def forward(self, imgs):  # imgs: [B, 3, H, W] -> [B, num_classes]
        with torch.no_grad():
            feats = cim.pooled_features(self.backbone, imgs)
        return self.head(feats)


# ------------------------------------------------------------------------------------------------------------------
# Targets and losses: mixup / cutmix (torchvision v2), label smoothing, soft-target CE or binary CE (RSB)

def make_mixer(mixup, cutmix, num_classes):
    """Batch mixing as timm's Mixup(mixup_alpha, cutmix_alpha, switch_prob=0.5, mode='batch'): each batch one of
    torchvision's MixUp / CutMix, chosen with equal probability (alpha 0 leaves one out). None when both are off."""
    mixers = [m(alpha=a, num_classes=num_classes) for m, a in ((v2.MixUp, mixup), (v2.CutMix, cutmix)) if a > 0]
    return v2.RandomChoice(mixers) if mixers else None


def mix_targets(imgs, labels, mixer, num_classes, smoothing=0.0):
    """imgs: [B, 3, H, W], labels: [B] long -> (imgs, targets [B, num_classes] float32, rows summing to 1).

    The batch is shuffled first (torchvision pairs each image with its neighbour; with repeated augmentation the
    neighbour would often be a copy of the same image). CutMix weights each label by its pasted area, MixUp by
    lambda. Label smoothing: targets * (1 - smoothing) + smoothing / num_classes, equal to timm's smoothing before
    mixing (the map is linear)."""
    if mixer is not None:
        perm = torch.randperm(len(labels)).to(labels.device, non_blocking=True)
        imgs, targets = mixer(imgs[perm], labels[perm])
    else:
        targets = F.one_hot(labels, num_classes)
    return imgs, targets.float() * (1 - smoothing) + smoothing / num_classes


def soft_cross_entropy(logits, targets):
    """Cross-entropy with soft targets (Table 10), mean over the batch. logits, targets: [B, C]."""
    return -(targets * F.log_softmax(logits.float(), dim=-1)).sum(-1).mean()


def binary_cross_entropy(logits, targets):
    """RSB's loss (Table 11): every class an independent sigmoid against its (mixed, smoothed) target weight, mean
    over the B x C entries (timm's BinaryCrossEntropy). logits, targets: [B, C]."""
    return F.binary_cross_entropy_with_logits(logits.float(), targets)


LOSSES = {'ce': soft_cross_entropy, 'bce': binary_cross_entropy}


def classification_sums(model):
    """fn(imgs, labels) for engine.evaluate(): per-batch counts of top-1 / top-5 hits, images, and the CE loss sum."""
    def fn(imgs, labels):
        logits = model(imgs).float()
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices == labels[:, None]
        return dict(n=torch.ones_like(labels).sum(), top1=top[:, 0].sum(), top5=top.any(1).sum(),
                    loss=F.cross_entropy(logits, labels, reduction='sum'))
    return fn


# ------------------------------------------------------------------------------------------------------------------
# Checkpoints: everything needed to continue exactly; checkpoint-best.pth holds the best model by val top-1

SAME_ARGS = ('arch', 'linear_probe', 'num_classes', 'input_size', 'patch_size', 'batch_size', 'accum_iter',
             'world_size', 'repeated_aug')


def save(model, optimizer, scaler, args, epoch, step_in_epoch, log):
    engine.save_training_state(model, optimizer, scaler, args, log, epoch=epoch, step_in_epoch=step_in_epoch)


def resume(path, model, optimizer, scaler, args, rank, log):
    """Loads a checkpoint of the same model and batch layout -> (epoch, step_in_epoch); restores RNG states."""
    state = engine.load_training_state(path, model, optimizer, scaler, args, rank, log, SAME_ARGS)
    if engine.is_main():
        print(f"resumed from '{path}': epoch {state['epoch']}, step {state['step_in_epoch']}")
    return state['epoch'], state['step_in_epoch']


# ------------------------------------------------------------------------------------------------------------------
# One epoch: micro-batches with gradient accumulation (no_sync until the last), one optimizer step

def train_one_epoch(model, ddp, loader, optimizer, scaler, mixer, sched, epoch, start_step, args, device, dtype, log):
    """Optimizer steps start_step .. sched['steps_per_epoch'] of one epoch. -> False when told to stop early."""
    ddp.train()
    params = [p for p in model.parameters() if p.requires_grad]
    criterion, channels_last = LOSSES[args.loss], args.arch == 'resnet50'
    it = iter(loader)
    tlog = engine.TrainLog(device, os.path.join(args.output_dir, 'log.jsonl'),
                           args.accum_iter * args.batch_size * args.world_size, args.max_bad_steps)
    steps = sched['steps_per_epoch']
    pbar = tqdm(total=steps, initial=start_step, desc=f'epoch {epoch + 1}/{args.epochs}',
                disable=not engine.is_main(), dynamic_ncols=True)
    for step in range(start_step, steps):
        gstep = epoch * steps + step
        lr = engine.cosine_lr(gstep, sched['total_steps'], sched['warmup_steps'], sched['lr'], args.min_lr)
        engine.set_lr(optimizer, lr)
        for micro in range(args.accum_iter):
            imgs, labels, n_bad = next(it)
            imgs, labels = imgs.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            if channels_last:
                imgs = imgs.contiguous(memory_format=torch.channels_last)
            imgs, targets = mix_targets(imgs, labels, mixer, args.num_classes, args.smoothing)
            last = micro == args.accum_iter - 1
            with (ddp.no_sync() if ddp is not model and not last else contextlib.nullcontext()):
                with engine.autocast(device, dtype):
                    logits = ddp(imgs)
                loss = criterion(logits, targets)
                scaler.scale(loss / args.accum_iter).backward()
            tlog.metrics.update(loss=loss.detach())
            tlog.metrics.add(n_bad_images=n_bad.sum())
        grad_norm = engine.optimizer_step(optimizer, scaler, params, args.amp, args.clip_grad or None)
        tlog.step(grad_norm, lr)
        pbar.update(1)
        if (step + 1) % args.log_every == 0 or step + 1 == steps:
            tlog.write(log, pbar, lr, gstep + 1, 'try a lower --blr or --lr', epoch=epoch, step=gstep + 1)
        stop = args.stop_after_steps and gstep + 1 >= args.stop_after_steps
        if stop or (args.save_every_steps and (gstep + 1) % args.save_every_steps == 0 and step + 1 < steps):
            save(model, optimizer, scaler, args, epoch, step + 1, log)
        if stop:
            pbar.close()
            return False
    pbar.close()
    return True


def validate(model, loader, device, dtype, channels_last=False):
    """Top-1 / top-5 accuracy (%) and CE loss on the whole validation set (all ranks) -> dict."""
    model.eval()
    net = (lambda x: model(x.contiguous(memory_format=torch.channels_last))) if channels_last else model
    s = engine.evaluate(classification_sums(net), loader, device, dtype, desc='val')
    n = float(s['n'])
    return dict(acc1=100 * float(s['top1']) / n, acc5=100 * float(s['top5']) / n, val_loss=float(s['loss']) / n,
                n_val=int(n))


def knn_eval(backbone, train_loader, val_loader, args, device, dtype):
    """kNN top-1 (%) of the pooled features (cosine, k = 20, T = 0.07, DINO's weighted vote): every rank embeds its
    shard of both sets, gathers all training features and classifies its validation shard; counts are summed."""
    backbone.eval()
    feats = functools.partial(cim.pooled_features, backbone)
    (a, ya), (b, yb) = (engine.extract_features(feats, loader, device, dtype) for loader in (train_loader, val_loader))
    a, ya = engine.all_gather_rows(a.to(device)), engine.all_gather_rows(ya.to(device))
    acc = engine.knn_accuracy(a, ya, b.to(device), yb.to(device), k=args.knn_k, T=args.knn_t)
    counts = torch.tensor([acc * len(b), len(b)], device=device, dtype=torch.float64)
    if dist.is_initialized():
        dist.all_reduce(counts)
    return 100 * float(counts[0] / counts[1])


# ------------------------------------------------------------------------------------------------------------------
# One run: data, model, optimizer, the epoch loop with evaluation; the demo runs it twice

def build_data(args, demo):
    """-> (train dataset, val dataset, class names). Demo: Fashion-MNIST (28 px + 2 px black border = 32 px)."""
    plain = args.knn  # kNN embeds the training images with the evaluation view
    train_tf = eval_transform(args.test_size, args.crop_ratio) if plain else train_transform(
        args.input_size, args.min_crop_scale, args.randaug, args.randaug_ops, args.randaug_mstd, args.reprob)
    val_tf = eval_transform(args.test_size, args.crop_ratio)
    if not demo:
        return image_folders(args.data, train_tf, val_tf)
    n_train, n_test = args.demo_images or DEMO_IMAGES
    (x, y), (xt, yt) = engine.fashion_mnist(train=True), engine.fashion_mnist(train=False)
    return (engine.TensorImages(x[:n_train], y[:n_train], train_tf, pad=2),
            engine.TensorImages(xt[:n_test], yt[:n_test], val_tf, pad=2), list(engine.FASHION_MNIST_CLASSES))


def build_model(args, device):
    """The network for this mode, with --init loaded: classifier (fine-tuning), LinearProbe, or a bare backbone."""
    torch.manual_seed(args.seed)
    if args.knn or args.linear_probe:
        model = cim.build_enhancer(args.arch, args.input_size, args.patch_size)
    else:
        model = build_classifier(args.arch, args.num_classes, args.input_size, args.patch_size, args.drop_path)
    if args.init != 'none':
        engine.load_pretrained(model, engine.read_weights(args.init)[0], f"'{args.init}'")
    return (LinearProbe(model, args.num_classes) if args.linear_probe else model).to(device)


def run(args, rank, device, demo=False):
    """Fine-tunes (or probes, or kNN-evaluates) with fully resolved args -> final metrics dict (None: stopped)."""
    args.amp, dtype = engine.resolve_amp(args.amp, device)
    os.makedirs(args.output_dir, exist_ok=True)
    train_set, val_set, classes = build_data(args, demo)
    args.num_classes = len(classes)
    val_loader = torch.utils.data.DataLoader(val_set, args.batch_size, sampler=engine.ShardSampler(len(val_set),
                                             args.world_size, rank), num_workers=args.num_workers,
                                             pin_memory=device.type == 'cuda')
    model = build_model(args, device)
    if args.knn:
        train_loader = torch.utils.data.DataLoader(train_set, args.batch_size, num_workers=args.num_workers,
                                                   sampler=engine.ShardSampler(len(train_set), args.world_size, rank))
        acc = knn_eval(model, train_loader, val_loader, args, device, dtype)
        if engine.is_main():
            print(f'kNN top-1 (k={args.knn_k}, T={args.knn_t}) of {args.arch} ({args.init}): {acc:.2f}% on '
                  f'{len(val_set)} images, {len(train_set)} training images as neighbours')
            engine.log_jsonl(os.path.join(args.output_dir, 'log.jsonl'), dict(knn_acc1=acc, init=args.init))
        return dict(knn_acc1=acc)

    # training data: a seeded view per (epoch, index) for exact resume; repeated augmentation for R50 300 / 600
    if args.repeated_aug > 1:
        dataset = engine.SeededDataset(Repeated(train_set, args.repeated_aug), args.seed)
        sampler = RepeatAugSampler(len(train_set), args.batch_size, args.world_size, rank, args.repeated_aug,
                                   args.seed)
    else:
        dataset = engine.SeededDataset(train_set, args.seed)
        sampler = engine.ResumableSampler(dataset, args.batch_size, args.world_size, rank, seed=args.seed)
    loader, steps_per_epoch = engine.train_loader(dataset, sampler, args.batch_size, args.accum_iter,
                                                  args.num_workers, args.seed, device)

    # optimizer: AdamW with layer-wise lr decay (ViT) or SGD for the probe; lr scaled linearly from the recipe's batch
    total_batch = args.batch_size * args.world_size * args.accum_iter
    peak_lr = args.lr or engine.scaled_lr(args.blr, total_batch, args.ref_batch)
    vit = isinstance(model.backbone if args.linear_probe else model, cim.VisionTransformer)
    lr_scale = engine.layer_decay(len(model.blocks), args.layer_decay) \
        if vit and not args.linear_probe and args.layer_decay != 1 else None
    groups = engine.param_groups(model, args.weight_decay, cim.NO_WEIGHT_DECAY_KEYS, lr_scale)
    if args.linear_probe:  # LARS (MAE's) is not in torch; a single linear layer: SGD + momentum (MoCo v3, DINO)
        optimizer = torch.optim.SGD(groups, lr=peak_lr, momentum=0.9)
    else:
        optimizer = torch.optim.AdamW(groups, lr=peak_lr, betas=tuple(args.betas), fused=True)
    scaler = engine.grad_scaler(device, args.amp)
    mixer = make_mixer(args.mixup, args.cutmix, args.num_classes)
    sched = dict(steps_per_epoch=steps_per_epoch, total_steps=args.epochs * steps_per_epoch,
                 warmup_steps=args.warmup_epochs * steps_per_epoch, lr=peak_lr)

    torch.manual_seed(args.seed + rank)  # from here on, mixing and stochastic depth differ across ranks
    random.seed(args.seed + rank)
    np.random.seed(args.seed + rank)
    start_epoch, start_step = 0, 0
    log = dict(n_bad_images=0, skipped_steps=0, best_acc1=-1.0, best_epoch=0, last={})
    ckpt = args.resume or engine.find_checkpoint(args.output_dir)
    if ckpt:
        start_epoch, start_step = resume(ckpt, model, optimizer, scaler, args, rank, log)
    ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == 'cuda' else None) \
        if args.world_size > 1 else model
    if engine.is_main():
        mode = 'linear probe' if args.linear_probe else 'fine-tuning'
        print(f"{mode} {args.arch} from {args.init}: {len(train_set)} training / {len(val_set)} val images, "
              f"{args.num_classes} classes, {steps_per_epoch} steps/epoch x {args.epochs} epochs, total batch "
              f"{total_batch} ({args.world_size} x {args.batch_size} x {args.accum_iter}), peak lr {peak_lr:.2e}, amp "
              f"{args.amp}, output {args.output_dir}")
    channels_last = args.arch == 'resnet50'
    for epoch in range(start_epoch, args.epochs):
        sampler.set_epoch(epoch, start_step * args.accum_iter)
        dataset.set_epoch(epoch)
        if not train_one_epoch(model, ddp, loader, optimizer, scaler, mixer, sched, epoch, start_step, args, device,
                               dtype, log):
            if engine.is_main():
                print(f'stopped after step {args.stop_after_steps} (--stop-after-steps)')
            return None
        start_step = 0
        m = validate(model, val_loader, device, dtype, channels_last)
        log['last'] = dict(epoch=epoch + 1, **m)
        best = m['acc1'] > log['best_acc1']
        if best:
            log['best_acc1'], log['best_epoch'] = m['acc1'], epoch + 1
        save(model, optimizer, scaler, args, epoch + 1, 0, log)
        if engine.is_main():
            if best:
                engine.atomic_save(dict(model=model.state_dict(), args=vars(args), epoch=epoch + 1, **m),
                            os.path.join(args.output_dir, 'checkpoint-best.pth'))
            engine.log_jsonl(os.path.join(args.output_dir, 'log.jsonl'), dict(epoch=epoch + 1, **m))
            print(f"epoch {epoch + 1}/{args.epochs}: val top-1 {m['acc1']:.2f}%  top-5 {m['acc5']:.2f}%  loss "
                  f"{m['val_loss']:.4f}  (best top-1 {log['best_acc1']:.2f}% at epoch {log['best_epoch']})")
    last = log['last']
    if engine.is_main():
        print(f"done: {args.arch} {'linear probe' if args.linear_probe else 'fine-tuned'} from {args.init}, last "
              f"top-1 {last['acc1']:.2f}% top-5 {last['acc5']:.2f}% (epoch {last['epoch']}), best top-1 "
              f"{log['best_acc1']:.2f}% (epoch {log['best_epoch']}); {args.output_dir}/checkpoint-best.pth, "
              f"{engine.CHECKPOINT}, log.jsonl")
    return dict(last, best_acc1=log['best_acc1'], best_epoch=log['best_epoch'])


# ------------------------------------------------------------------------------------------------------------------
# The built-in demo: Fashion-MNIST, train.py's demo checkpoint vs. random init, the same schedule

DEMO_IMAGES = (4000, 2000)  # Fashion-MNIST training / test images used
DEMO = dict(epochs=3, warmup_epochs=0, batch_size=64, lr=3e-3, mixup=0.0, cutmix=0.0, randaug=0,
            reprob=0.0, min_crop_scale=0.35, num_workers=1, log_every=20, save_every_steps=0)
# lr 3e-3 (16x the recipe's 3e-3 x 64 / 1024): the short schedule needs a large lr, which the pre-trained start
# tolerates and random init does not (measured, 4000 / 1000 images: 42.1% vs 24.2%; at lr 1e-3: 39.0% vs 40.2%)


def demo_setup(args, parser, meta):
    """No --data: the demo. Flags left at their defaults get demo-scale values; the architecture and resolution are
    the pre-trained checkpoint's (`meta`: its train.py args; train.py's demo: vit_tiny, 32 px, patch 4)."""
    changes = {k: v for k, v in DEMO.items() if getattr(args, k) in (None, parser.get_default(k))}
    if args.linear_probe:
        changes.pop('lr', None)  # the probe's SGD keeps its own lr
    if args.arch == parser.get_default('arch'):
        changes['arch'] = meta.get('arch', 'vit_tiny')
    if args.input_size is None:
        changes['input_size'] = changes['test_size'] = meta.get('img_size', 32)
    if args.patch_size == parser.get_default('patch_size'):
        changes['patch_size'] = meta.get('patch_size', 4)
    changes['output_dir'] = args.output_dir or os.path.join('out', 'demo_ft')
    for k, v in changes.items():
        setattr(args, k, v)
    if engine.is_main():
        print('no --data: running the built-in demo on Fashion-MNIST (28 px gray -> 32 px RGB). Demo scale: ' +
              ', '.join(f"--{k.replace('_', '-')} {v}" for k, v in changes.items()))


# ------------------------------------------------------------------------------------------------------------------

def check_args(args):
    """User mistakes that would otherwise surface deep inside torch: one clear line each."""
    if args.recipe is not None and args.arch != 'resnet50':
        raise ValueError(f'--recipe selects a Table 11 column for resnet50; {args.arch} uses Table 10')
    if args.knn and args.linear_probe:
        raise ValueError('--knn and --linear-probe are separate modes; pick one')
    if (args.knn or args.linear_probe) and args.init == 'none':
        raise ValueError('--knn / --linear-probe evaluate pre-trained weights: pass --init PATH')
    for k in ('batch_size', 'accum_iter', 'epochs', 'log_every', 'max_bad_steps', 'repeated_aug', 'input_size',
              'test_size', 'knn_k'):
        if getattr(args, k) < 1:
            raise ValueError(f"--{k.replace('_', '-')} must be >= 1, got {getattr(args, k)}")
    if not 0 <= args.warmup_epochs <= args.epochs:
        raise ValueError(f'--warmup-epochs {args.warmup_epochs} must be between 0 and --epochs {args.epochs}')
    if not 0 < args.crop_ratio <= 1 or not 0 < args.min_crop_scale <= 1:
        raise ValueError('--crop-ratio and --min-crop-scale must be in (0, 1]')
    if not 0 <= args.drop_path < 1 or not 0 <= args.smoothing < 1 or not 0 <= args.reprob <= 1:
        raise ValueError('--drop-path and --smoothing must be in [0, 1), --reprob in [0, 1]')
    if args.mixup < 0 or args.cutmix < 0 or not 0 <= args.randaug <= 10:
        raise ValueError('--mixup / --cutmix must be >= 0 and --randaug in 0..10')
    if args.arch in cim.VIT_CONFIGS:
        if args.input_size % args.patch_size:
            raise ValueError(f'--input-size {args.input_size} is not divisible by --patch-size {args.patch_size}')
        if args.test_size != args.input_size:
            raise ValueError(f'a ViT has position embeddings for one resolution: --test-size {args.test_size} must '
                             f'equal --input-size {args.input_size}')


def main(argv=None):
    parser = get_args_parser()
    args = parser.parse_args(argv)
    demo = args.data is None
    rank, args.world_size, device = engine.init_distributed()
    args.init, meta = engine.resolve_init(args.init, demo)
    if demo:
        demo_setup(args, parser, meta)
    args.task = meta.get('task', 'respix')  # Table 10's ViT-B lr depends on the pre-training task
    taken = apply_recipe(args, recipe_for(args))
    mode = 'knn' if args.knn else 'probe' if args.linear_probe else 'ft'
    args.output_dir = args.output_dir or os.path.join('out', f'{mode}_{args.arch}')
    check_args(args)
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
        key = 'knn_acc1' if args.knn else 'acc1'
        n_train = (args.demo_images or DEMO_IMAGES)[0]
        how = 'kNN' if args.knn else f'{args.epochs} epochs on {n_train} training images'
        print(f'Fashion-MNIST test top-1, {args.arch}, {how}: ' +
              '  vs  '.join(f'{name} {r[key]:.2f}%' for name, r in results.items()))
    return results


if __name__ == '__main__':
    engine.run_cli(main)
