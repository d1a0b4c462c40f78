"""CIM pre-training (Sec. 2.3): the generator and the enhancer trained together, with Table 9's recipe as defaults.

    # ImageNet, 8 GPUs (total batch 8 x 256 = 2048, Table 9); rerunning the same command resumes
    torchrun --nproc_per_node=8 train.py --arch resnet50 --task revdet --data /imagenet/train \\
        --tokenizer /path/to/dalle --output-dir out/r50_revdet
    torchrun --nproc_per_node=8 train.py --arch vit_base --task respix --data /imagenet/train \\
        --tokenizer /path/to/dalle --output-dir out/vitb_respix
    # two nodes x 8 GPUs, same total batch (run on each node with its --node_rank)
    torchrun --nnodes=2 --node_rank=0 --master_addr=node0 --master_port=29500 --nproc_per_node=8 train.py \\
        --batch-size 128 --arch vit_base --data /imagenet/train --tokenizer /path/to/dalle --output-dir out/vitb
    # the built-in demo: Fashion-MNIST, a small tokenizer and enhancer, kNN accuracy; minutes on a laptop CPU
    python train.py
    # the pre-trained backbone for finetune.py / segment.py (torchvision resnet50 / timm ViT names)
    python train.py --export out/r50_revdet/checkpoint-last.pth --to r50_revdet.pth
    # throughput, time split and TFLOP/s of one step on synthetic data
    python train.py --benchmark --arch vit_base --batch-size 8

The tokenizer is OpenAI's DALL-E dVAE (a folder with encoder.pkl and decoder.pkl, as in BEiT) or a tokenizer
trained with `python dvae.py train`. The method is in cim.py, the plumbing (DDP, checkpoints, lr, logs) in engine.py.
"""
import argparse
import collections
import contextlib
import os
import random
import resource
import time
import warnings

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from torch.nn.parallel import DistributedDataParallel
from torchvision.transforms import InterpolationMode, RandomResizedCrop
from tqdm import tqdm

import cim
import dvae
import engine

REF_BATCH = 2048  # Table 9: peak lr 1.5e-3 at total batch 2048, scaled linearly for other batch sizes
LOG_KEYS = ('loss', 'gen_loss', 'mim_acc', 'enh_loss', 'det_acc', 'replaced_frac')


def get_args_parser():
    p = engine.ArgumentParser(description='CIM pre-training (Fang et al., ICLR 2023). Defaults: Table 9.',
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group('model (Sec. 2, Table 9)')
    g.add_argument('--arch', default='vit_base', choices=cim.ARCHS, help='the enhancer')
    g.add_argument('--task', default='respix', choices=cim.TASKS, help='enhancer objective (Sec. 2.2)')
    g.add_argument('--img-size', type=int, default=224, help='enhancer input resolution')
    g.add_argument('--patch-size', type=int, default=16, help='token grid = img-size / patch-size')
    g.add_argument('--tokenizer', metavar='PATH', help='DALL-E folder (encoder.pkl, decoder.pkl) or a dvae.py .pt')
    g.add_argument('--gen-depth', type=int, default=4, help='small BEiT depth (Table 5: 4-7)')
    g.add_argument('--gen-width', type=int, default=None, help='None: enhancer width (ViT), 384 (resnet50)')
    g.add_argument('--no-share', action='store_true', help='ViT: do not share patch embedding + 2 blocks (Table 5)')
    g.add_argument('--mask-ratio', type=float, nargs=2, default=(100 / 196, 120 / 196), metavar=('MIN', 'MAX'),
                   help='masked fraction range: 100/196 to 120/196 (100-120 of 196 patches)')
    g.add_argument('--mask-type', default='random', choices=('random', 'block'), help='Table 4')
    g.add_argument('--sampling', default='softmax', choices=('softmax', 'argmax', 'uniform'), help='Table 7')
    g.add_argument('--temperature', type=float, default=1.0, help='softmax sampling temperature')
    g.add_argument('--target-norm', default='sliding', choices=('sliding', 'patch', 'none'), help='RESPIX, Table 6')
    g.add_argument('--enhancer-weight', type=float, default=None, help='None: 10 (respix), 1 (revdet)')
    g = p.add_argument_group('optimization (Table 9)')
    g.add_argument('--epochs', type=int, default=300, help='pre-training epochs')
    g.add_argument('--warmup-epochs', type=int, default=10, help='linear lr warmup, then cosine decay')
    g.add_argument('--batch-size', type=int, default=256, help='per GPU (process); 8 x 256 = 2048')
    g.add_argument('--accum-iter', type=int, default=1, help='gradient accumulation steps')
    g.add_argument('--blr', type=float, default=1.5e-3, help=f'peak lr at total batch {REF_BATCH}, scaled linearly')
    g.add_argument('--lr', type=float, default=None, help='absolute peak lr; None: from --blr')
    g.add_argument('--min-lr', type=float, default=1e-5, help='end of the cosine decay (BEiT)')
    g.add_argument('--weight-decay', type=float, default=0.05, help='AdamW; none on biases, norms, embeddings')
    g.add_argument('--betas', type=float, nargs=2, default=(0.9, 0.98), help='AdamW momentum (beta1, beta2)')
    g.add_argument('--clip-grad', type=float, default=3.0, help='global grad-norm clip (0: off)')
    g.add_argument('--min-crop-scale', type=float, default=0.08, help='RandomResizedCrop scale (BEiT: 0.08-1)')
    g = p.add_argument_group('system')
    g.add_argument('--data', metavar='DIR', help='ImageFolder root (ImageNet train) or flat image folder; '
                                                 'none: the built-in Fashion-MNIST demo')
    engine.add_run_args(g, 'default: out/demo (demo), out/<arch>_<task>', num_workers=8, save_every_steps=1000,
                        save_help='steps between checkpoint-last.pth saves; also saved at every epoch end')
    g.add_argument('--vis-every', type=int, default=10, help='epochs between Fig. 2/3 PNGs (0: off)')
    g = p.add_argument_group('other modes')
    g.add_argument('--export', metavar='CKPT', help='write the enhancer backbone of CKPT to --to')
    g.add_argument('--to', metavar='PATH', help='output of --export')
    g.add_argument('--benchmark', action='store_true', help='time synthetic steps and exit')
    g.add_argument('--benchmark-steps', type=int, default=3, help='timed steps per benchmark')
    p.add_argument('--stop-after-steps', type=int, default=0, help=argparse.SUPPRESS)  # tests: a preemption
    p.add_argument('--demo-images', type=int, default=0, help=argparse.SUPPRESS)  # demo size (tests: tiny)
    p.add_argument('--demo-tokenizer-steps', type=int, default=0, help=argparse.SUPPRESS)
    return p


# ------------------------------------------------------------------------------------------------------------------
# Data: one crop, two resolutions (BEiT), and the blockwise masks computed in the loader workers

class TwoViews:
    """BEiT's two-resolution crop: a horizontal flip and ONE RandomResizedCrop box give the enhancer view
    (img_size px, bicubic, mean/std-normalized) and the tokenizer view of the same pixels (tok_size px =
    grid * tokenizer downsample, 112 for DALL-E, Lanczos as BEiT's second view, in [0, 1]). The paper uses only
    cropping and flipping (Table 9); BEiT's crop scale (0.08, 1). With mask_range, also a BEiT blockwise mask.
    PIL image -> (imgs [3, S, S], tok_imgs [3, s, s]) or (imgs, tok_imgs, mask [grid * grid] bool).
    """

    def __init__(self, img_size, tok_size, min_scale=0.08, mask_range=None, grid=None,
                 mean=cim.IMAGENET_MEAN, std=cim.IMAGENET_STD):
        self.img_size, self.tok_size, self.scale = img_size, tok_size, (min_scale, 1.0)
        self.mask_range, self.grid, self.mean, self.std = mask_range, grid, list(mean), list(std)

    def __call__(self, img):
        if torch.rand(1) < 0.5:
            img = TF.horizontal_flip(img)
        box = RandomResizedCrop.get_params(img, self.scale, (3 / 4, 4 / 3))
        big = TF.resized_crop(img, *box, [self.img_size] * 2, InterpolationMode.BICUBIC)
        small = TF.resized_crop(img, *box, [self.tok_size] * 2, InterpolationMode.LANCZOS)
        views = (TF.normalize(to_float(big), self.mean, self.std), to_float(small))
        if self.mask_range is None:
            return views
        return views + (cim.blockwise_mask(random.randint(*self.mask_range), self.grid),)


def to_float(img):
    """PIL RGB image -> [3, H, W] float in [0, 1]."""
    return TF.pil_to_tensor(img).float().div_(255)


def eval_transform(img):
    """Evaluation view of an image already at the model's size: [3, H, W] mean/std-normalized."""
    return TF.normalize(to_float(img), list(cim.IMAGENET_MEAN), list(cim.IMAGENET_STD))


# ------------------------------------------------------------------------------------------------------------------
# One epoch: micro-batches with gradient accumulation (no_sync until the last), one optimizer step

def train_step(model, ddp, batches, optimizer, scaler, args, device, dtype, metrics):
    """One optimizer step over args.accum_iter micro-batches; gradients are all-reduced on the last one only
    (no_sync before). -> grad norm, 0-dim tensor on device, non-finite when the step was skipped."""
    for micro in range(args.accum_iter):
        views, _, n_bad = next(batches)
        imgs, tok_imgs = (v.to(device, non_blocking=True) for v in views[:2])
        mask = views[2].to(device, non_blocking=True) if len(views) > 2 else None  # --mask-type block
        last = micro == args.accum_iter - 1
        with ddp.no_sync() if ddp is not model and not last else contextlib.nullcontext():
            with engine.autocast(device, dtype):
                out = ddp(imgs, tok_imgs, mask)
            scaler.scale(out['loss'] / args.accum_iter).backward()
        metrics.update(**{k: out[k] for k in LOG_KEYS if k in out})
        metrics.add(n_bad_images=int(n_bad.sum()))
    params = [p for p in model.parameters() if p.requires_grad]
    return engine.optimizer_step(optimizer, scaler, params, args.amp, args.clip_grad)


def train_one_epoch(model, ddp, loader, optimizer, scaler, sched, epoch, start_step, args, device, dtype, log):
    """Optimizer steps start_step .. sched['steps_per_epoch'] of one epoch; logs every args.log_every steps
    (the only host syncs), saves every args.save_every_steps. -> False when --stop-after-steps stopped it."""
    ddp.train()
    steps, batches = sched['steps_per_epoch'], iter(loader)
    tlog = engine.TrainLog(device, os.path.join(args.output_dir, 'log.jsonl'),
                           args.accum_iter * args.batch_size * args.world_size, args.max_bad_steps)
    with tqdm(total=steps, initial=start_step, desc=f'epoch {epoch + 1}/{args.epochs}', dynamic_ncols=True,
              disable=not engine.is_main()) as pbar:
        for step in range(start_step, steps):
            gstep = epoch * steps + step
            lr = engine.cosine_lr(gstep, sched['total_steps'], sched['warmup_steps'], sched['lr'], args.min_lr)
            engine.set_lr(optimizer, lr)
            tlog.step(train_step(model, ddp, batches, optimizer, scaler, args, device, dtype, tlog.metrics), lr)
            pbar.update(1)
            if (step + 1) % args.log_every == 0 or step + 1 == steps:
                tlog.write(log, pbar, lr, gstep + 1, 'try a lower --blr or --lr', epoch=epoch, step=gstep + 1)
            stop = args.stop_after_steps and gstep + 1 >= args.stop_after_steps
            if stop or (args.save_every_steps and (gstep + 1) % args.save_every_steps == 0 and step + 1 < steps):
                save(model, optimizer, scaler, args, epoch, step + 1, steps, log)
            if stop:
                return False
    return True


@torch.no_grad()
def save_figures(model, batch, args, epoch, device, dtype):
    """Fig. 2 (corrupted samples) and Fig. 3 (enhancer output) PNGs of a fixed batch; own RNG, eval mode."""
    model.eval()
    views = [v.to(device) for v in batch]
    mask = views[2] if len(views) > 2 else None
    with torch.random.fork_rng(devices=[device] if device.type == 'cuda' else []), engine.autocast(device, dtype):
        torch.manual_seed(args.seed)
        prefix = os.path.join(args.output_dir, f'epoch{epoch:03d}')
        cim.save_fig2(prefix + '_fig2.png', model, views[0], views[1], mask=mask)
        cim.save_fig3(prefix + '_fig3.png', model, model(views[0], views[1], mask, return_vis=True)['vis'])
    model.train()
    return prefix


# ------------------------------------------------------------------------------------------------------------------
# Checkpoints: everything needed to continue exactly (the tokenizer is not saved: it is frozen and given by path)

SAME_MODEL_ARGS = ('arch', 'task', 'img_size', 'patch_size', 'gen_depth', 'gen_width', 'no_share')
SAME_LAYOUT_ARGS = ('batch_size', 'accum_iter', 'world_size')


def save(model, optimizer, scaler, args, epoch, step_in_epoch, steps_per_epoch, log):
    """checkpoint-last.pth without the frozen tokenizer (its vocabulary and scale recorded to check on resume)."""
    tok = dict(vocab_size=model.tokenizer.vocab_size, downsample=model.tokenizer.downsample)
    engine.save_training_state(model, optimizer, scaler, args, log, skip_prefix='tokenizer.', tokenizer=tok,
                               epoch=epoch, step_in_epoch=step_in_epoch,
                               global_step=epoch * steps_per_epoch + step_in_epoch)


def resume(path, model, optimizer, scaler, args, rank, log):
    """Loads a checkpoint of the same model, tokenizer and batch layout -> (epoch, step_in_epoch)."""
    tok = dict(vocab_size=model.tokenizer.vocab_size, downsample=model.tokenizer.downsample)
    state = engine.load_training_state(path, model, optimizer, scaler, args, rank, log,
                                       SAME_MODEL_ARGS + SAME_LAYOUT_ARGS, skip_prefix='tokenizer.', tokenizer=tok)
    if engine.is_main():
        print(f"resumed from '{path}': epoch {state['epoch']}, step {state['step_in_epoch']} "
              f"(global step {state['global_step']})")
    return state['epoch'], state['step_in_epoch']


# ------------------------------------------------------------------------------------------------------------------
# Main: data, model, optimizer, resume, the epoch loop

def check_args(args):
    """User mistakes that would otherwise surface deep inside torch: one clear line each."""
    if args.img_size % args.patch_size:
        raise ValueError(f'--img-size {args.img_size} is not divisible by --patch-size {args.patch_size}')
    for k in ('batch_size', 'accum_iter', 'epochs', 'log_every', 'max_bad_steps'):
        if getattr(args, k) < 1:
            raise ValueError(f"--{k.replace('_', '-')} must be >= 1, got {getattr(args, k)}")
    if not 0 <= args.warmup_epochs <= args.epochs:
        raise ValueError(f'--warmup-epochs {args.warmup_epochs} must be between 0 and --epochs {args.epochs}')
    cim.mask_count_range((args.img_size // args.patch_size) ** 2, args.mask_ratio)


def build_model(args, tokenizer, device):
    """The CIM module of Sec. 2 with the command line's settings (cim.py keeps ResNet-50 in channels_last)."""
    return cim.CIM(tokenizer, args.arch, args.task, args.img_size, args.patch_size, gen_depth=args.gen_depth,
                   gen_width=args.gen_width, mask_ratio=args.mask_ratio, mask_type=args.mask_type,
                   sampling=args.sampling, temperature=args.temperature, target_norm=args.target_norm,
                   share_layers=not args.no_share, enhancer_weight=args.enhancer_weight).to(device)


def main(argv=None):
    parser = get_args_parser()
    args = parser.parse_args(argv)
    if args.export:
        return export(args.export, args.to)
    if args.benchmark:
        return benchmark(args)
    demo = args.data is None
    rank, args.world_size, device = engine.init_distributed()
    if demo:
        apply_demo_scale(args, parser)
    args.output_dir = args.output_dir or os.path.join('out', f'{args.arch}_{args.task}')
    check_args(args)
    args.amp, dtype = engine.resolve_amp(args.amp, device)
    if device.type == 'cuda':
        torch.backends.cudnn.benchmark = True
    os.makedirs(args.output_dir, exist_ok=True)

    # data: ImageNet-style folder or Fashion-MNIST; the tokenizer fixes the second view's resolution
    if demo:
        images, labels = (x[:args.demo_images] for x in engine.fashion_mnist(train=True))
        args.tokenizer = args.tokenizer or demo_tokenizer(args, device)
    if not args.tokenizer:
        raise ValueError('--tokenizer is required with --data: the DALL-E folder (encoder.pkl, decoder.pkl) or a '
                         'dvae.py tokenizer .pt')
    tokenizer = dvae.load_tokenizer(args.tokenizer)
    grid = args.img_size // args.patch_size
    mask_range = cim.mask_count_range(grid * grid, args.mask_ratio) if args.mask_type == 'block' else None
    transform = TwoViews(args.img_size, grid * tokenizer.downsample, args.min_crop_scale, mask_range, grid)
    dataset = (engine.TensorImages(images, labels, transform, pad=2) if demo
               else engine.ImageFiles(args.data, transform))
    dataset = engine.SeededDataset(dataset, args.seed)
    sampler = engine.ResumableSampler(dataset, args.batch_size, args.world_size, rank, seed=args.seed)
    loader, steps_per_epoch = engine.train_loader(dataset, sampler, args.batch_size, args.accum_iter,
                                                  args.num_workers, args.seed, device)

    # model and optimizer (Table 9)
    torch.manual_seed(args.seed)
    model = build_model(args, tokenizer, device)
    total_batch = args.batch_size * args.world_size * args.accum_iter
    peak_lr = args.lr or engine.scaled_lr(args.blr, total_batch, REF_BATCH)
    optimizer = torch.optim.AdamW(engine.param_groups(model, args.weight_decay, cim.NO_WEIGHT_DECAY_KEYS),
                                  lr=peak_lr, betas=tuple(args.betas), fused=True)
    scaler = engine.grad_scaler(device, args.amp)
    sched = dict(steps_per_epoch=steps_per_epoch, total_steps=args.epochs * steps_per_epoch,
                 warmup_steps=args.warmup_epochs * steps_per_epoch, lr=peak_lr)

    torch.manual_seed(args.seed + rank)  # from here on, masks and samples differ across ranks
    random.seed(args.seed + rank)
    np.random.seed(args.seed + rank)
    start_epoch, start_step, log = 0, 0, dict(n_bad_images=0, skipped_steps=0)
    ckpt = args.resume or engine.find_checkpoint(args.output_dir)
    if ckpt:
        start_epoch, start_step = resume(ckpt, model, optimizer, scaler, args, rank, log)
    ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == 'cuda' else None) \
        if args.world_size > 1 else model
    if engine.is_main():
        n = sum(p.numel() for p in model.enhancer.parameters()) / 1e6
        print(f'{args.arch} ({n:.1f}M) {args.task}: {len(dataset)} images, {steps_per_epoch} steps/epoch, total batch '
              f'{total_batch} ({args.world_size} x {args.batch_size} x {args.accum_iter}), peak lr {peak_lr:.2e}, '
              f'amp {args.amp}, tokenizer {args.tokenizer} ({grid * tokenizer.downsample} px view), '
              f'output {args.output_dir}')
    if engine.is_main() and args.vis_every:  # a fixed batch for the figures
        vis_batch = torch.utils.data.default_collate([dataset[i][0] for i in range(min(8, len(dataset)))])
    for epoch in range(start_epoch, args.epochs):
        sampler.set_epoch(epoch, start_step * args.accum_iter)
        dataset.set_epoch(epoch)
        if not train_one_epoch(model, ddp, loader, optimizer, scaler, sched, epoch, start_step, args, device,
                               dtype, log):
            if engine.is_main():
                print(f'stopped after step {args.stop_after_steps} (--stop-after-steps)')
            return
        start_step = 0
        save(model, optimizer, scaler, args, epoch + 1, 0, steps_per_epoch, log)
        if engine.is_main() and args.vis_every and ((epoch + 1) % args.vis_every == 0 or epoch + 1 == args.epochs):
            print(f'figures: {save_figures(model, vis_batch, args, epoch + 1, device, dtype)}_fig{{2,3}}.png')
    if engine.is_main():
        print(f'done: {os.path.join(args.output_dir, engine.CHECKPOINT)} and log.jsonl')
        if demo:
            demo_eval(model, args, device, dtype)


# ------------------------------------------------------------------------------------------------------------------
# The built-in demo: Fashion-MNIST at 32 px, a small trained tokenizer, kNN / linear probe vs. random init

DEMO = dict(img_size=32, patch_size=4, demo_images=3200, demo_tokenizer_steps=300, epochs=4, warmup_epochs=1,
            batch_size=64, blr=3.2e-2, min_crop_scale=0.35, num_workers=0, log_every=10, save_every_steps=100,
            vis_every=2)  # blr 3.2e-2 at 2048 = lr 1e-3 at batch 64: a short schedule needs a larger lr


def apply_demo_scale(args, parser):
    """No --data: Fashion-MNIST demo. Flags left at their defaults get demo-scale values; prints them."""
    changes = {k: v for k, v in DEMO.items() if getattr(args, k) == parser.get_default(k)}
    if args.arch in ('vit_small', 'vit_base'):
        changes['arch'] = 'vit_tiny'
    if args.output_dir is None:
        changes['output_dir'] = os.path.join('out', 'demo')
    for k, v in changes.items():
        setattr(args, k, v)
    if engine.is_main():
        print('no --data: running the built-in demo on Fashion-MNIST (28 px gray -> 32 px RGB). Demo scale: ' +
              ', '.join(f'--{k.replace("_", "-")} {v}' for k, v in changes.items()))


def demo_tokenizer(args, device):
    """OUTPUT_DIR/tokenizer.pt: a small dVAE (dvae.SMALL_CONFIG: 512 codes, 4x downsampling, 8x8 tokens from 32 px)
    trained once on the Fashion-MNIST training images, then reused."""
    path = os.path.join(args.output_dir, 'tokenizer.pt')
    if engine.is_main() and not os.path.isfile(path):
        print(f'training the demo tokenizer {dvae.SMALL_CONFIG} for {args.demo_tokenizer_steps} steps -> {path}')
        images = engine.fashion_mnist(train=True)[0]
        x = F.pad(images[:, None].float() / 255, (2, 2, 2, 2)).expand(-1, 3, -1, -1)  # [N, 3, 32, 32] in [0, 1]
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x), batch_size=64, shuffle=True,
                                             drop_last=True, generator=torch.Generator().manual_seed(args.seed))
        torch.manual_seed(args.seed)
        tok = dvae.train_tokenizer(loader, dvae.SMALL_CONFIG, args.demo_tokenizer_steps, device=device)  # fp32
        dvae.save_tokenizer(tok.cpu(), path)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    return path


def demo_eval(model, args, device, dtype):
    """kNN top-1 (k = 20, DINO) and a quick linear probe on the Fashion-MNIST test split: pre-trained enhancer
    vs. the same network at random initialization."""
    n_train, n_test = args.demo_images, min(2000, args.demo_images)  # neighbours: the pre-training images
    train_x, train_y = engine.fashion_mnist(train=True)
    test_x, test_y = engine.fashion_mnist(train=False)
    train = engine.TensorImages(train_x[:n_train], train_y[:n_train], eval_transform, pad=2)
    test = engine.TensorImages(test_x[:n_test], test_y[:n_test], eval_transform, pad=2)
    loaders = [torch.utils.data.DataLoader(d, batch_size=250) for d in (train, test)]
    torch.manual_seed(args.seed)
    random_init = cim.build_enhancer(args.arch, args.img_size, args.patch_size).to(device).eval()
    model.eval()
    knn, probe = {}, {}
    for name, features in (('pre-trained', model.features),
                           ('random init', lambda x: cim.pooled_features(random_init, x))):
        (a, ya), (b, yb) = (engine.extract_features(features, loader, device, dtype) for loader in loaders)
        knn[name] = engine.knn_accuracy(a, ya, b, yb, k=20, T=0.07)
        probe[name] = engine.linear_probe_accuracy(a, ya, b, yb)
    print(f'Fashion-MNIST test split ({len(test)} images), {args.arch} {args.task} features, pre-trained vs random '
          f'init: kNN top-1 (k=20, {len(train)} pre-training images as neighbours) {knn["pre-trained"]:.1%} vs '
          f'{knn["random init"]:.1%}; linear probe {probe["pre-trained"]:.1%} vs {probe["random init"]:.1%}')
    return knn, probe


# ------------------------------------------------------------------------------------------------------------------
# Export: the pre-trained backbone alone, for finetune.py and segment.py

def export(ckpt, out):
    """Writes the enhancer backbone of a train.py checkpoint (= CIM.enhancer_state_dict()): torchvision's
    resnet50 loads it with only fc.* missing, timm's vit_*_patch16_224 with only head.* missing."""
    if not out:
        raise ValueError('--export needs --to PATH (where to write the backbone)')
    state, ckpt = engine.load_checkpoint(ckpt)
    a = state['args']
    enhancer = cim.build_enhancer(a['arch'], a['img_size'], a['patch_size'])
    enhancer.load_state_dict({k[len('enhancer.'):]: v for k, v in state['model'].items()
                              if k.startswith('enhancer.')})  # strict: the whole backbone is there
    torch.save(enhancer.state_dict(), out)
    print(f"wrote the {a['arch']} enhancer of '{ckpt}' ({a['task']}, epoch {state['epoch']}) to '{out}'")


# ------------------------------------------------------------------------------------------------------------------
# Benchmark (synthetic data): where the time of a CIM step goes, and the cost over training the enhancer alone

class PhaseTimer:
    """mark(name) books the time since the previous mark to `name`, after a device synchronize. Benchmark only:
    the synchronizes stall the GPU pipeline (on the CPU they are free, so one pass gives throughput and split)."""

    def __init__(self, device, enabled=True):
        self.device, self.enabled, self.times, self.last = device, enabled, collections.defaultdict(float), None

    def mark(self, name=None):
        if not self.enabled:
            return
        if self.device.type == 'cuda':
            torch.cuda.synchronize()
        now = time.perf_counter()
        if name is not None and self.last is not None:
            self.times[name] += now - self.last
        self.last = now


def instrument(model, timer):
    """Marks the phases of CIM.forward/backward: tokenizer encode, generator fwd+bwd, sample + decode, enhancer
    fwd+bwd (through the loss). Wraps model.tokenizer.encode, model.generate and model.corrupt, and hooks the
    generator's backward (autograd runs the enhancer's backward first: its ops are the most recent)."""
    def wrap(fn, before, after):
        def wrapped(*a, **kw):
            timer.mark(before)
            out = fn(*a, **kw)
            timer.mark(after)
            return out
        return wrapped
    model.tokenizer.encode = wrap(model.tokenizer.encode, 'generator fwd+bwd', 'tokenizer encode')
    model.generate = wrap(model.generate, 'generator fwd+bwd', 'generator fwd+bwd')  # before: masking
    model.corrupt = wrap(model.corrupt, 'generator fwd+bwd', 'sample + decode')
    warnings.filterwarnings('ignore', 'Full backward hook is firing')  # the generator's input needs no grad
    model.generator.register_full_backward_pre_hook(lambda m, g: timer.mark('enhancer fwd+bwd'))


def count_flops(fn):
    """Analytical FLOPs (matmuls, convolutions, attention; forward and backward) of fn() by op shapes."""
    from torch.utils import flop_counter
    ops = torch.ops.aten
    cpu_sdpa = {  # torch counts the CUDA attention kernels but not the CPU one; same formulas (shapes in)
        ops._scaled_dot_product_flash_attention_for_cpu:
            lambda q, k, v, *_, **__: flop_counter.sdpa_flop_count(q, k, v),
        ops._scaled_dot_product_flash_attention_for_cpu_backward:
            lambda grad, q, k, v, *_, **__: flop_counter.sdpa_backward_flop_count(grad, q, k, v)}
    with flop_counter.FlopCounterMode(display=False, custom_mapping=cpu_sdpa) as counter:
        fn()
    return counter.get_total_flops()


def benchmark(args):
    device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    check_args(args)
    args.amp, dtype = engine.resolve_amp(args.amp, device)
    torch.backends.cudnn.benchmark = True  # as in training
    torch.manual_seed(args.seed)
    if args.tokenizer:
        tokenizer, tok_name = dvae.load_tokenizer(args.tokenizer), args.tokenizer
    else:
        tokenizer = dvae.Tokenizer()  # DALL-E's configuration
        tok_name = 'no --tokenizer: a randomly initialised full-size DALL-E dVAE (same compute as the real one)'
    model = build_model(args, tokenizer, device)
    B, grid = args.batch_size, args.img_size // args.patch_size
    imgs = torch.randn(B, 3, args.img_size, args.img_size, device=device)
    tok_imgs = torch.rand(B, 3, grid * tokenizer.downsample, grid * tokenizer.downsample, device=device)
    mask = None
    if args.mask_type == 'block':
        k = cim.mask_count_range(grid * grid, args.mask_ratio)
        mask = torch.stack([cim.blockwise_mask(random.randint(*k), grid) for _ in range(B)]).to(device)
    enh_params = list(model.enhancer.parameters()) + list(model.head.parameters())
    runs = {}
    for name in ('enhancer only', 'CIM'):
        params = enh_params if name == 'enhancer only' else [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-4, betas=tuple(args.betas), fused=True)
        scaler = engine.grad_scaler(device, args.amp)
        timer = PhaseTimer(device)

        def fwd_bwd():
            with engine.autocast(device, dtype):
                if name == 'CIM':
                    loss = model(imgs, tok_imgs, mask)['loss']
                else:  # the same backbone and head on the clean image, a stand-in loss
                    loss = model.head(cim.enhancer_feature_map(model.enhancer, imgs)).float().square().mean()
            timer.mark('enhancer fwd+bwd' if name == 'CIM' else 'fwd+bwd')
            scaler.scale(loss).backward()
            timer.mark('generator fwd+bwd' if name == 'CIM' else 'fwd+bwd')

        def step():
            timer.mark()
            fwd_bwd()
            engine.optimizer_step(optimizer, scaler, params, args.amp, args.clip_grad)
            timer.mark('optimizer')

        flops = count_flops(fwd_bwd)
        optimizer.zero_grad(set_to_none=True)
        step()  # warm-up (allocator, cuDNN autotuning)
        if device.type == 'cuda':
            torch.cuda.reset_peak_memory_stats()
        if name == 'CIM':
            instrument(model, timer)
        timer.times.clear()
        timer.enabled = device.type == 'cpu'  # CUDA: unsynchronized steps for the throughput ...
        t0 = time.perf_counter()
        for _ in range(args.benchmark_steps):
            step()
        if device.type == 'cuda':
            torch.cuda.synchronize()
        seconds = (time.perf_counter() - t0) / args.benchmark_steps
        timer.enabled = True
        for _ in range(args.benchmark_steps if device.type == 'cuda' else 0):  # ... then synchronized ones
            step()
        peak = (torch.cuda.max_memory_allocated() if device.type == 'cuda'
                else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
        runs[name] = dict(seconds=seconds, flops=flops, peak=peak,
                          split={k: v / args.benchmark_steps for k, v in timer.times.items()})
        del optimizer, scaler

    where = torch.cuda.get_device_name() if device.type == 'cuda' else f'CPU, {torch.get_num_threads()} threads'
    print(f'benchmark: {args.arch} {args.task}, {args.img_size} px, batch {B}, amp {args.amp}, {where}\n'
          f'tokenizer: {tok_name}')
    for name, r in runs.items():
        print(f"{name:>13}: {r['seconds'] * 1e3:9.1f} ms/step {B / r['seconds']:8.2f} imgs/s "
              f"{r['flops'] / B / 1e9:7.1f} GFLOP/img {r['flops'] / r['seconds'] / 1e12:7.3f} TFLOP/s  "
              f"peak {'GPU memory' if device.type == 'cuda' else 'process RSS'} {r['peak'] / 2 ** 30:.2f} GiB")
    split, total = runs['CIM']['split'], sum(runs['CIM']['split'].values())
    print('CIM step time split: ' + ', '.join(f'{k} {100 * split.get(k, 0) / total:.1f}%' for k in
          ('tokenizer encode', 'generator fwd+bwd', 'sample + decode', 'enhancer fwd+bwd', 'optimizer')))
    t_ratio = runs['CIM']['seconds'] / runs['enhancer only']['seconds']
    f_ratio = runs['CIM']['flops'] / runs['enhancer only']['flops']
    print(f'CIM / enhancer-only: time ratio {t_ratio:.2f}x, FLOP ratio {f_ratio:.2f}x '
          f'(time/FLOP ratio {t_ratio / f_ratio:.2f}; 1.0 = the extra work runs as fast as the enhancer)')
    return runs


if __name__ == '__main__':
    engine.run_cli(main)
