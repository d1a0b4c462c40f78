"""CIM pre-training (Sec. 2.3): the generator and the enhancer trained together, with Table 9's recipe as defaults.

    # ImageNet, 8 GPUs (total batch 8 x 256 = 2048, Table 9); rerunning the same command resumes
    torchrun --nproc_per_node=8 train.py --arch resnet50 --task revdet --data /imagenet/train \\
        --tokenizer /path/to/dalle --output-dir out/r50_revdet
    torchrun --nproc_per_node=8 train.py --arch vit_base --task respix --data /imagenet/train \\
        --tokenizer /path/to/dalle --output-dir out/vitb_respix
    # two nodes x 8 GPUs, same total batch (run on each node with its --node_rank)
    torchrun --nnodes=2 --node_rank=0 --master_addr=node0 --master_port=29500 --nproc_per_node=8 train.py \\
        --batch-size 128 --arch vit_base --data /imagenet/train --tokenizer /path/to/dalle --output-dir out/vitb
    # a bounded run on your own images: 5,000 of them, 2,000 optimizer steps
    python train.py --data ~/my_images --tokenizer tok.pt --img-size 64 --patch-size 8 --subset 5000 --max-steps 2000
    # the built-in demo: Fashion-MNIST, a small tokenizer and enhancer, kNN accuracy; minutes on a laptop CPU
    python train.py
    # the pre-trained backbone for finetune.py / segment.py (torchvision resnet50 / timm ViT names)
    python train.py --export out/r50_revdet/checkpoint-last.pth --to r50_revdet.pth

The tokenizer is OpenAI's DALL-E dVAE (a folder with encoder.pkl and decoder.pkl, as in BEiT) or one trained with
`python dvae.py train`. The method is in cim.py, shared plumbing in engine.py, the time split in bench.py.
"""
import contextlib
import functools
import itertools
import os
import random
import time

import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from torch.nn.parallel import DistributedDataParallel
from torchvision.transforms import InterpolationMode, RandomResizedCrop

import cim
import dvae
import engine

REF_BATCH = 2048  # Table 9: peak lr 1.5e-3 at total batch 2048, scaled linearly for other batch sizes
LOG_KEYS = ('loss', 'gen_loss', 'enh_loss', 'mim_acc', 'replaced_frac')
REVDET_KEYS = ('det_acc', 'majority_acc', 'label_entropy')  # REVDET: accuracy and BCE next to guessing's

# Recipes: literal dicts. A flag left unset takes its value from the run's recipe; an explicit flag always wins.
PAPER = dict(arch='vit_base', img_size=224, patch_size=16, epochs=300, warmup_epochs=10, batch_size=256,
             blr=1.5e-3, min_crop_scale=0.08, num_workers=8, log_every=50, save_every_steps=1000, vis_every=10)
# The demo (no --data): Fashion-MNIST at 32 px (28 px + a 2 px border), 8x8 tokens of a small tokenizer trained
# first. blr 3.2e-2 at 2048 = lr 1e-3 at batch 64: a short schedule needs a larger lr.
DEMO = dict(PAPER, arch='vit_tiny', img_size=32, patch_size=4, subset=3200, epochs=4, warmup_epochs=1,
            batch_size=64, blr=3.2e-2, min_crop_scale=0.35, num_workers=0, log_every=10, save_every_steps=100,
            vis_every=2, output_dir=os.path.join('out', 'demo'))
DEMO_TOKENIZER_STEPS = 300
# what a resumed run must share with its checkpoint (the tokenizer's vocabulary and scale are checked too)
SAME_ARGS = ('arch', 'task', 'img_size', 'patch_size', 'gen_depth', 'gen_width', 'no_share', 'subset', 'batch_size',
             'accum_iter', 'world_size')


def get_args_parser():
    p = engine.ArgumentParser(description='CIM pre-training (Fang et al., ICLR 2023). A flag left unset takes its '
                                          "recipe's value (Table 9 with --data, the demo without); an explicit flag "
                                          'always wins.', recipes={'Table 9': PAPER, 'demo': DEMO})
    g = p.add_argument_group('model (Sec. 2, Table 9)')
    g.add_argument('--arch', choices=cim.ARCHS, help='the enhancer')
    g.add_argument('--task', default='respix', choices=cim.TASKS, help='enhancer objective (Sec. 2.2)')
    g.add_argument('--img-size', type=engine.POSITIVE, help='enhancer input resolution')
    g.add_argument('--patch-size', type=engine.POSITIVE, help='token grid = img-size / patch-size')
    g.add_argument('--tokenizer', metavar='PATH', help='DALL-E folder (encoder.pkl, decoder.pkl) or a dvae.py .pt; '
                                                       'demo: trains OUTPUT_DIR/tokenizer.pt')
    g.add_argument('--gen-depth', type=engine.POSITIVE, default=4, help='small BEiT depth (Table 5: 4-7)')
    g.add_argument('--gen-width', type=int, help='default: the ViT enhancer width, 384 for resnet50 (Table 9)')
    g.add_argument('--no-share', action='store_true', help='ViT: do not share patch embedding + 2 blocks (Table 5)')
    g.add_argument('--mask-ratio', type=float, nargs=2, default=(100 / 196, 120 / 196), metavar=('MIN', 'MAX'),
                   help='masked fraction range, Eq. 1: 100/196 to 120/196 (100-120 of 196 patches)')
    g.add_argument('--mask-type', default='random', choices=cim.MASK_TYPES, help='Table 4')
    g.add_argument('--sampling', default='softmax', choices=cim.SAMPLINGS, help='Table 7')
    g.add_argument('--temperature', type=float, default=1.0, help='softmax sampling temperature (Eq. 2: 1)')
    g.add_argument('--target-norm', default='sliding', choices=cim.TARGET_NORMS, help='RESPIX target, Table 6')
    g.add_argument('--enhancer-weight', type=float, default=None, help='default: 10 (respix), 1 (revdet), Table 9')
    g = p.add_argument_group('optimization (Table 9)')
    g.add_argument('--epochs', type=engine.POSITIVE, help='pre-training epochs')
    g.add_argument('--max-steps', type=engine.POSITIVE, help='this many optimizer steps instead of --epochs (the '
                                                             'warmup keeps its share of the schedule)')
    g.add_argument('--warmup-epochs', type=engine.NON_NEGATIVE, help='linear lr warmup, then cosine decay')
    g.add_argument('--batch-size', type=engine.POSITIVE, help='per GPU (process); 8 x 256 = 2048')
    g.add_argument('--accum-iter', type=engine.POSITIVE, default=1, help='gradient accumulation steps')
    g.add_argument('--blr', type=float, help=f'peak lr at total batch {REF_BATCH}, scaled linearly')
    g.add_argument('--lr', type=float, default=None, help='absolute peak lr; default: from --blr')
    g.add_argument('--min-lr', type=float, default=1e-5, help='end of the cosine decay (BEiT)')
    g.add_argument('--weight-decay', type=float, default=0.05, help='AdamW, Table 9; none on biases, norms, embeddings')
    g.add_argument('--betas', type=float, nargs=2, default=(0.9, 0.98), help='AdamW momentum (beta1, beta2), Table 9')
    g.add_argument('--clip-grad', type=float, default=3.0, help='global grad-norm clip, Table 9 (0: off)')
    g.add_argument('--min-crop-scale', type=engine.FRACTION, help='RandomResizedCrop scale (BEiT: 0.08-1)')
    g = p.add_argument_group('data')
    g.add_argument('--data', metavar='DIR', help='ImageFolder root (ImageNet train) or flat folder; none: the demo')
    g.add_argument('--subset', type=engine.POSITIVE, help='this many training images, drawn at random (seeded) across '
                                                          'the classes; default: all')
    g = engine.add_common_args(p, 'default: out/demo (demo), out/<arch>_<task>')
    g.add_argument('--vis-every', type=engine.NON_NEGATIVE, help='epochs between Fig. 2/3 PNGs (0: off)')
    g.add_argument('--compile', action='store_true', help='torch.compile the tokenizer, generator and enhancer')
    g = p.add_argument_group('export')
    g.add_argument('--export', metavar='CKPT', help='write the enhancer backbone of CKPT to --to, and exit')
    g.add_argument('--to', metavar='PATH', help='output of --export')
    return p


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    if args.export:
        return export(args.export, args.to)
    demo = args.data is None
    rank, args.world_size, device = engine.init_distributed()
    taken = engine.apply_recipe(args, DEMO if demo else PAPER)
    args.output_dir = args.output_dir or os.path.join('out', f'{args.arch}_{args.task}')
    check_args(args)
    dtype = engine.resolve_amp(args.amp, device)
    torch.backends.cudnn.benchmark = True  # fixed input sizes: let cuDNN pick its fastest convolutions
    if engine.is_main() and demo:
        print('no --data: running the built-in demo on Fashion-MNIST (28 px gray -> 32 px RGB), demo scale: '
              + engine.flags({k: v for k, v in taken.items() if PAPER.get(k) != v}))

    # data: one crop at two resolutions; the tokenizer fixes the second. Inputs are checked before anything is written
    if demo and args.tokenizer is None:
        args.tokenizer = demo_tokenizer(os.path.join(args.output_dir, 'tokenizer.pt'), DEMO_TOKENIZER_STEPS,
                                        args.seed, device)
    if args.tokenizer is None:
        raise engine.UserError('--tokenizer is required with --data: a DALL-E folder or a dvae.py .pt (see --help)')
    tokenizer = dvae.load_tokenizer(args.tokenizer)
    grid = args.img_size // args.patch_size
    mask_range = cim.mask_count_range(grid * grid, args.mask_ratio) if args.mask_type == 'block' else None
    transform = TwoViews(args.img_size, grid * tokenizer.downsample, args.min_crop_scale, mask_range, grid)
    base = (engine.TensorImages(*engine.fashion_mnist(train=True), transform, pad=2) if demo
            else engine.ImageFiles(args.data, transform))
    train_set = engine.subset(base, args.subset, args.seed)
    dataset = engine.SeededDataset(train_set, args.seed)
    sampler = engine.ResumableSampler(dataset, args.batch_size, args.world_size, rank, seed=args.seed)
    loader, steps_per_epoch = engine.train_loader(dataset, sampler, args.batch_size, args.accum_iter,
                                                  args.num_workers, args.seed, device)

    # model, optimizer and the lr of every step (Table 9)
    torch.manual_seed(args.seed)
    model = build_model(args, tokenizer).to(device)
    total_batch = args.batch_size * args.world_size * args.accum_iter
    peak_lr = args.lr or engine.scaled_lr(args.blr, total_batch, REF_BATCH)
    total_steps = args.max_steps or args.epochs * steps_per_epoch
    warmup_steps = round(total_steps * args.warmup_epochs / args.epochs)
    lrs = engine.cosine_schedule(peak_lr, args.min_lr, total_steps, warmup_steps)
    optimizer = torch.optim.AdamW(engine.param_groups(model, args.weight_decay, cim.NO_WEIGHT_DECAY_KEYS),
                                  lr=peak_lr, betas=tuple(args.betas), fused=True)
    # fp16: dynamic loss scaling. bf16 / fp32: the scale stays 1 and the scaler does the other half of its job,
    # skipping a step whose gradients are not finite, on the device (no host sync)
    scaler = torch.amp.GradScaler(device.type, init_scale=2.0 ** 16 if dtype == torch.float16 else 1.0)

    # resume (the checkpoint holds every rank's RNG state), then the DDP wrap
    engine.seed_rank(args.seed, rank)  # from here on, masks and samples differ across ranks
    # epoch_totals: the epoch's log totals so far, in the checkpoint so that a resumed epoch's summary is whole
    log = dict(n_bad_images=0, skipped_steps=0, epoch_totals=None)
    # the frozen tokenizer is not saved (it is given by path); its vocabulary and scale are, to check on resume
    frozen = dict(skip_prefix='tokenizer.', tokenizer={k: getattr(tokenizer, k) for k in ('vocab_size', 'downsample')})
    engine.lock_output_dir(args.output_dir)  # one live run per folder
    ckpt = args.resume or engine.find_checkpoint(args.output_dir)
    if ckpt:
        state, _ = engine.load_training_state(ckpt, model, optimizer, scaler, args, rank, log, SAME_ARGS, **frozen)
    start_step = state['step'] if ckpt else 0  # optimizer steps done
    if args.compile:
        model.compile()
    raw_model = model  # the CIM module itself: what is saved, evaluated and drawn
    if args.world_size > 1:
        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == 'cuda' else None)
    if engine.is_main():
        n = sum(p.numel() for p in raw_model.enhancer.parameters()) / 1e6
        print(f'{args.arch} ({n:.1f}M) {args.task}: {len(dataset)} images, {steps_per_epoch} steps/epoch, '
              f'{total_steps} steps, total batch {total_batch} ({args.world_size} x {args.batch_size} x '
              f'{args.accum_iter}), peak lr {peak_lr:.2e}, amp {dtype or "off"}, tokenizer {args.tokenizer} '
              f'({grid * tokenizer.downsample} px view), output {args.output_dir}')
    # the fixed Fig. 2/3/4 batch: epoch 0's views of 8 images that take the classes in turn
    # train_set: a Subset of base, or base itself
    labels = [base.labels[i] if demo else base.samples[i][1] for i in getattr(train_set, 'indices', range(len(base)))]
    vis_batch = torch.utils.data.default_collate([dataset[i][0] for i in spread_over_classes(labels, 8)])

    # ---- the loop: one optimizer step per iteration; logs every --log-every steps; checkpoints ------------------
    params = [p for p in raw_model.parameters() if p.requires_grad]
    keys = LOG_KEYS + (REVDET_KEYS if args.task == 'revdet' else ())
    tally = engine.Tally(keys, total_batch, device)  # the log interval's sums, on the device
    batches = engine.endless_batches(loader, start_step, steps_per_epoch, args.accum_iter)
    pbar = engine.progress(total=total_steps, initial=start_step, desc='train')
    t_epoch = time.time()
    model.train()  # reaches the frozen tokenizer too: harmless, dvae.py's networks have no dropout or BatchNorm
    for step in range(start_step, total_steps):
        # the lr is a list indexed by step, not a scheduler object: a resumed run needs nothing but the step count
        for g in optimizer.param_groups:
            g['lr'] = lrs[step] * g['lr_scale']  # warmup + cosine (Table 9), times a group's scale (1 here)
        batch = [next(batches) for _ in range(args.accum_iter)]  # (views, labels, unreadable files skipped) each
        # views: imgs, tok_imgs (and the block mask made in the loader workers)
        micro_batches = [[v.to(device, non_blocking=True) for v in views] for views, _, _ in batch]
        metrics, norm = train_step(model, micro_batches, optimizer, scaler, params, keys, args.clip_grad, dtype)
        tally.add(metrics, norm, sum(n_bad for _, _, n_bad in batch))  # no host sync: on the device until the log
        pbar.update()

        # bookkeeping: every rank runs it in step (close() all-reduces, the save is collective); rank 0 writes
        done = step + 1
        end_of_epoch = done % steps_per_epoch == 0 or done == total_steps
        saving = end_of_epoch or (args.save_every_steps and done % args.save_every_steps == 0)
        if done % args.log_every == 0 or saving:  # a checkpoint closes the interval, so a resume starts a new one
            # tally.close: the interval's one host sync
            record = dict(step=done, epoch=round(done / steps_per_epoch, 3), lr=lrs[step], **tally.close(log))
            # the epoch's summary adds up its intervals' sums; kept in the checkpoint, so a resumed epoch's is whole
            log['epoch_totals'] = [a + b for a, b in zip(log['epoch_totals'] or [0] * len(tally.totals), tally.totals)]
            if engine.is_main():
                engine.log_jsonl(os.path.join(args.output_dir, 'log.jsonl'), record)
                pbar.write(f'step {done}/{total_steps}: {log_line(record)}')
            tally.check(args.max_bad_steps, done, args.output_dir)  # after the log line
        if saving:
            if end_of_epoch:  # the checkpoint holds the next epoch's (empty) totals
                epoch_totals, log['epoch_totals'] = log['epoch_totals'], None
            engine.save_training_state(raw_model, optimizer, scaler, args, log, step=done, **frozen)
        if end_of_epoch:
            epoch = -(-done // steps_per_epoch)  # ceil: --max-steps may end the run inside an epoch
            if engine.is_main():
                minutes = (time.time() - t_epoch) / 60
                n_steps = done - max(start_step, (epoch - 1) * steps_per_epoch)  # this process's steps of the epoch
                pbar.write(f'epoch {epoch} done ({done}/{total_steps} steps): {log_line(tally.means(epoch_totals))}, '
                           f'{n_steps * total_batch / minutes / 60:.1f} img/s, {minutes:.1f} min')
                if args.vis_every and (epoch % args.vis_every == 0 or done == total_steps):
                    pbar.write(f'figures: {save_figures(raw_model, vis_batch, args, epoch, device, dtype)}')
            t_epoch = time.time()
            tally.t0 = t_epoch  # img/s of the training steps alone, without the figures
    pbar.close()
    if engine.is_main():
        print(f'done: {os.path.join(args.output_dir, engine.CHECKPOINT)} and log.jsonl')
        if demo:
            demo_eval(raw_model, train_set, args, device, dtype)


def train_step(model, micro_batches, optimizer, scaler, params, keys, clip_grad, dtype):
    """One optimizer step (Sec. 2.3; Table 9's AdamW and clipping) -> (the micro-batch mean of out[k] for k in keys
    [K], the global grad norm [0-dim] fp64, inf / NaN when the step was skipped), on the device, no host sync.

    micro_batches: [imgs, tok_imgs] or [imgs, tok_imgs, mask] per micro-batch, on the device; model: the CIM, or
    its DDP wrapper. Gradients are accumulated over the micro-batches and all-reduced on the last one only."""
    ddp = isinstance(model, DistributedDataParallel)
    metrics = 0.0
    for i, views in enumerate(micro_batches):
        with model.no_sync() if ddp and i < len(micro_batches) - 1 else contextlib.nullcontext():
            with torch.autocast(views[0].device.type, dtype=dtype, enabled=dtype is not None):
                out = model(*views)  # generator + enhancer losses, Sec. 2.3
            scaler.scale(out['loss'] / len(micro_batches)).backward()  # fp16: scaled against underflow
        metrics = metrics + torch.stack([out[k].detach().float() for k in keys]) / len(micro_batches)
    scaler.unscale_(optimizer)  # true gradients for the norm and the clip; finds inf / NaN
    norm = engine.grad_norm(params)  # fp64: finite exactly when every gradient is
    if clip_grad:  # in the gradients' dtype: CUDA's multi-tensor multiply needs its scalar to match
        torch.nn.utils.clip_grads_with_norm_(params, clip_grad, norm.to(params[0].dtype))
    scaler.step(optimizer)  # skipped when a gradient is inf / NaN (a device-side check: fused AdamW)
    scaler.update(None if dtype == torch.float16 else 1.0)  # bf16 / fp32: the scale stays 1
    optimizer.zero_grad(set_to_none=True)
    return metrics, norm


def log_line(r):
    """A log record as one line; REVDET's accuracy and BCE next to what guessing gives."""
    text = f"loss {r['loss']:.4f} (gen {r['gen_loss']:.4f}, enh {r['enh_loss']:.4f}), mim_acc {r['mim_acc']:.3f}"
    if 'det_acc' in r:
        text += (f", det_acc {r['det_acc']:.3f} vs majority {r['majority_acc']:.3f}, BCE {r['enh_loss']:.4f} vs "
                 f"label entropy {r['label_entropy']:.4f}")
    if 'lr' in r:
        text += f", lr {r['lr']:.2e}, {r['imgs_per_s']:.1f} img/s"
    return text


# ------------------------------------------------------------------------------------------------------------------
# Data: one crop, two resolutions (BEiT), and the blockwise masks computed in the loader workers

class TwoViews:
    """BEiT's two-resolution crop: a horizontal flip and ONE RandomResizedCrop box give the enhancer view
    (img_size px, bicubic, mean/std-normalized) and the tokenizer view of the same pixels (tok_size px =
    grid * tokenizer downsample, 112 for DALL-E, Lanczos as BEiT's second view, in [0, 1]). The paper uses only
    cropping and flipping (Table 9); BEiT's crop scale (0.08, 1). With mask_range, also a BEiT blockwise mask.
    PIL image -> (imgs [3, S, S], tok_imgs [3, s, s]) or (imgs, tok_imgs, mask [grid * grid] bool).
    """

    def __init__(self, img_size, tok_size, min_scale=0.08, mask_range=None, grid=None):
        self.img_size = img_size
        self.tok_size = tok_size
        self.scale = (min_scale, 1.0)
        self.mask_range = mask_range
        self.grid = grid

    def __call__(self, img):
        if torch.rand(1) < 0.5:
            img = TF.horizontal_flip(img)
        box = RandomResizedCrop.get_params(img, self.scale, (3 / 4, 4 / 3))
        big = TF.resized_crop(img, *box, [self.img_size] * 2, InterpolationMode.BICUBIC)
        small = TF.resized_crop(img, *box, [self.tok_size] * 2, InterpolationMode.LANCZOS)
        views = (eval_transform(big), to_float(small))
        if self.mask_range is None:
            return views
        return views + (cim.blockwise_mask(random.randint(*self.mask_range), self.grid),)


def to_float(img):
    """PIL RGB image -> [3, H, W] float in [0, 1]."""
    return TF.pil_to_tensor(img).float().div_(255)


def eval_transform(img):
    """PIL RGB image -> [3, H, W] float, ImageNet mean/std-normalized: the enhancer's view, as it is."""
    return TF.normalize(to_float(img), list(cim.IMAGENET_MEAN), list(cim.IMAGENET_STD))


def build_model(args, tokenizer):
    """The CIM module of Sec. 2 with the command line's settings (cim.py keeps ResNet-50 in channels_last)."""
    return cim.CIM(tokenizer, args.arch, args.task, args.img_size, args.patch_size, gen_depth=args.gen_depth,
                   gen_width=args.gen_width, mask_ratio=args.mask_ratio, mask_type=args.mask_type,
                   sampling=args.sampling, temperature=args.temperature, target_norm=args.target_norm,
                   share_layers=not args.no_share, enhancer_weight=args.enhancer_weight)


def check_args(args):
    """User mistakes that would otherwise surface deep inside torch: one clear line each."""
    if args.img_size % args.patch_size:
        raise engine.UserError(f'--img-size {args.img_size} is not divisible by --patch-size {args.patch_size}')
    if args.arch == 'resnet50' and (args.img_size % 32 or 32 % args.patch_size):  # its heads read the stride-32 map
        raise engine.UserError(f'resnet50 needs an --img-size divisible by 32 and a --patch-size dividing 32, got '
                               f'{args.img_size} and {args.patch_size}')
    if not 0 <= args.warmup_epochs <= args.epochs:
        raise engine.UserError(f'--warmup-epochs {args.warmup_epochs} must be between 0 and --epochs {args.epochs}')
    width = cim.VIT_CONFIGS.get(args.arch, {}).get('embed_dim')
    if width and not args.no_share and args.gen_width not in (None, width):
        raise engine.UserError(f'--gen-width {args.gen_width} with weight sharing (Table 5): the generator shares '
                               f'layers of width {width} with {args.arch}; use --no-share')
    try:
        cim.mask_count_range((args.img_size // args.patch_size) ** 2, args.mask_ratio)
    except ValueError as e:
        raise engine.UserError(f'--mask-ratio: {e}') from None


# ------------------------------------------------------------------------------------------------------------------
# Figures, checkpoints (the tokenizer is not saved: it is frozen and given by path), export

def spread_over_classes(labels, n):
    """n indices that take the classes in turn: the first image of each class, then the second, ..."""
    by_class = {}
    for i, y in enumerate(labels):
        by_class.setdefault(int(y), []).append(i)
    return [i for row in itertools.zip_longest(*by_class.values()) for i in row if i is not None][:n]


@torch.no_grad()
def save_figures(model, batch, args, epoch, device, dtype):
    """Fig. 2 (corrupted samples), Fig. 3 (enhancer output) and Fig. 4 (normalization templates) PNGs of a fixed
    batch; own RNG, eval mode."""
    model.eval()
    views = [v.to(device) for v in batch]
    mask = views[2] if len(views) > 2 else None
    prefix = os.path.join(args.output_dir, f'epoch{epoch:03d}')
    with torch.random.fork_rng(devices=[device] if device.type == 'cuda' else []):
        torch.manual_seed(args.seed)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            cim.save_fig2(prefix + '_fig2.png', model, views[0], views[1], mask=mask)
            cim.save_fig3(prefix + '_fig3.png', model, model(views[0], views[1], mask, return_vis=True)['vis'])
    cim.save_fig4(prefix + '_fig4.png', views[0], args.patch_size)  # what RESPIX regresses: Table 6's templates
    model.train()
    return prefix + '_fig{2,3,4}.png'


def export(ckpt, out):
    """Writes the enhancer backbone of a train.py checkpoint (CIM.enhancer's state dict): torchvision's
    resnet50 loads it with only fc.* missing, timm's vit_*_patch16_224 with only head.* missing."""
    if not out:
        raise engine.UserError('--export needs --to PATH (where to write the backbone)')
    state, a = engine.read_weights(ckpt)
    if not a.get('arch'):
        raise engine.UserError(f"'{ckpt}' is not a train.py checkpoint (no training arguments in it)")
    cim.build_enhancer(a['arch'], a['img_size'], a['patch_size']).load_state_dict(state)  # strict: all of it, no more
    torch.save(state, out)
    print(f"wrote the {a['arch']} enhancer of '{ckpt}' ({a['task']}) to '{out}'")


# ------------------------------------------------------------------------------------------------------------------
# The built-in demo: a small tokenizer trained first, then kNN / a linear probe against random initialization

def demo_tokenizer(path, steps, seed, device):
    """path (a dvae.py .pt): a small dVAE (dvae.SMALL_CONFIG: 512 codes, 4x downsampling, 8x8 tokens from 32 px)
    trained for `steps` steps on the Fashion-MNIST training images, once; later runs reuse it. -> path."""
    if engine.is_main() and not os.path.isfile(path):
        print(f'training the demo tokenizer {dvae.SMALL_CONFIG} for {steps} steps -> {path}')
        # [N, 3, 32, 32] in [0, 1]: 28 px gray padded as TensorImages pads, as RGB
        x = F.pad(engine.fashion_mnist(train=True)[0][:, None].float() / 255, (2, 2, 2, 2)).expand(-1, 3, -1, -1)
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x), batch_size=64, shuffle=True,
                                             drop_last=True, generator=torch.Generator().manual_seed(seed))
        torch.manual_seed(seed)
        tok = dvae.train_tokenizer(loader, dvae.SMALL_CONFIG, steps, device=device)  # fp32
        dvae.save_tokenizer(tok.cpu(), path)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    return path


def demo_eval(model, train_set, args, device, dtype):
    """kNN top-1 (k = 20, DINO) on the Fashion-MNIST test split: pre-trained enhancer vs. the same network at random
    initialization, the pre-training images as neighbours (`python finetune.py` and its --linear-probe go on from
    the demo's checkpoint). -> {'pre-trained': accuracy, 'random init': accuracy}."""
    train_x, train_y = engine.fashion_mnist(train=True)
    idx = getattr(train_set, 'indices', slice(None))  # the pre-training images
    train = engine.TensorImages(train_x[idx], train_y[idx], eval_transform, pad=2)
    test = engine.TensorImages(*(t[:2000] for t in engine.fashion_mnist(train=False)), eval_transform, pad=2)
    loaders = [torch.utils.data.DataLoader(d, batch_size=250) for d in (train, test)]
    torch.manual_seed(args.seed)
    random_init = cim.build_enhancer(args.arch, args.img_size, args.patch_size).to(device)
    knn = {}
    for name, net in (('pre-trained', model.enhancer), ('random init', random_init)):
        engine.recompute_bn_stats(net, loaders[0], device, dtype)  # ResNet: the same BN protocol for both
        feats = [engine.extract_features(functools.partial(cim.pooled_features, net), loader, device, dtype)
                 for loader in loaders]  # (features, labels) of the neighbours, of the test images
        knn[name] = engine.knn_accuracy(*feats[0], *feats[1], k=20, T=0.07)
    print(f'Fashion-MNIST test split ({len(test)} images), {args.arch} {args.task} features, pre-trained vs random '
          f'init: kNN top-1 (k=20, {len(train)} pre-training images as neighbours) {knn["pre-trained"]:.1%} vs '
          f'{knn["random init"]:.1%}')
    return knn


if __name__ == '__main__':
    engine.run_cli(main)
