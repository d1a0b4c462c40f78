"""ADE20K semantic segmentation with CIM-pre-trained backbones (Sec. 3.3, Table 3), in torch and torchvision alone
(no mmcv / mmsegmentation): ResNet-50 + FCN (mmseg's fcn_r50-d8 512x512) and ViT + one linear layer (BEiT's protocol).

    # ResNet-50 + FCN, Table 3b, 160k iterations (8 GPUs x 2 images = batch 16); rerunning the same command resumes
    torchrun --nproc_per_node=8 segment.py --arch resnet50 --init r50_revdet.pth \\
        --data /data/ADEChallengeData2016 --output-dir out/seg_r50_160k
    # ... and the 80k schedule of Table 3b
    torchrun --nproc_per_node=8 segment.py --arch resnet50 --init r50_revdet.pth \\
        --data /data/ADEChallengeData2016 --max-steps 80000 --output-dir out/seg_r50_80k
    # Table 3b's baselines: from scratch, and ImageNet-supervised (a torchvision resnet50 weights file)
    torchrun --nproc_per_node=8 segment.py --arch resnet50 --init none --data /data/ADEChallengeData2016
    torchrun --nproc_per_node=8 segment.py --arch resnet50 --init /path/resnet50-weights.pth --data ...
    # ViT-B/16 + linear decoder, Table 3a: AdamW lr 3e-4, layer decay 0.8, 160k iterations, sliding-window test
    torchrun --nproc_per_node=8 segment.py --arch vit_base --init vitb_respix.pth \\
        --data /data/ADEChallengeData2016 --output-dir out/seg_vitb
    # a bounded run on one GPU: 2,000 training images drawn at random, 4,000 steps of 256 px crops
    python segment.py --arch resnet50 --init r50_revdet.pth --data /data/ADEChallengeData2016 --subset 2000 \\
        --max-steps 4000 --img-size 256 --eval-every 1000
    # the built-in demo: Fashion-MNIST mosaics, train.py's demo checkpoint next to random init (CPU, minutes)
    python train.py && python segment.py

--data is ADEChallengeData2016: images/{training,validation}/*.jpg and annotations/{training,validation}/*.png.
--init reads a train.py checkpoint (its enhancer), a `train.py --export` backbone (r50_revdet.pth above), or a
torchvision / timm state dict. Outputs in --output-dir: log.jsonl, checkpoint-last.pth (resumable),
checkpoint-best.pth, stepNNNNNN.png (image / ground truth / prediction at each evaluation).
"""
import argparse
import contextlib
import functools
import math
import os
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
import torchvision.transforms.v2.functional as TF
from PIL import Image
from torch.nn.parallel import DistributedDataParallel
from torchvision import tv_tensors

import cim
import engine

IGNORE = 255  # mmseg's ignore_index: ADE20K's label 0 after reduce_zero_label, and the crop padding
ADE20K_CLASSES = 150

# Recipes: literal dicts. A flag left unset takes its value from the run's recipe; an explicit flag always wins.
# Both recipes share ADE20K's data pipeline and 160k schedule (mmseg's and BEiT's 512x512 configs), batch 8 x 2.
ADE20K_SCHEDULE = dict(img_size=512, scale=(2048, 512), ratio_range=(0.5, 2.0), max_steps=160000, batch_size=2,
                       eval_every=16000, log_every=50, save_every_steps=2000, num_workers=4)
# ResNet-50: mmseg's fcn_r50-d8_512x512_160k_ade20k (the paper's footnote 8; 80k: --max-steps 80000).
# Its ResNet-50 is torchvision's (CIM's backbone), not mmseg's ResNetV1c (deep stem) of Table 3b's dagger baseline.
FCN_R50 = dict(ADE20K_SCHEDULE, arch='resnet50', lr=0.01, min_lr=1e-4, power=0.9, warmup_steps=0, weight_decay=5e-4,
               momentum=0.9, aux_weight=0.4, drop_path=0.0, eval_mode='whole')
# ViT: lr 3e-4 and layer decay 0.8 are the paper's (Sec. 3.3); the rest is BEiT's ADE20K config (AdamW betas,
# wd 0.05, 1500 warmup steps, poly power 1.0 to 0, drop path 0.1, 512 windows with stride 341 = 2/3 of 512).
VIT_LINEAR = dict(ADE20K_SCHEDULE, patch_size=16, lr=3e-4, min_lr=0.0, power=1.0, warmup_steps=1500,
                  weight_decay=0.05, betas=(0.9, 0.999), layer_decay=0.8, drop_path=0.1, eval_mode='slide')
# The demo (no --data), applied before the arch's recipe: 1,000 2x2 mosaics of Fashion-MNIST items (64 px), 32 px
# crops as 512 crops of ADE20K images: the demo checkpoint's resolution (no position-embedding interpolation) at a
# quarter of the cost of 64 px crops; test: 32 px windows, stride 21. --arch and --patch-size are the checkpoint's,
# the warmup 10% of the steps. lr 5e-3: as in finetune.py's demo, a short schedule wants a large lr, which the
# pre-trained start tolerates and random init does not (measured: 21.0 vs 13.3 mIoU; at 2e-3: 19.6 vs 20.8, within
# run-to-run noise of ~2).
DEMO = dict(img_size=32, scale=(256, 64), ratio_range=(0.75, 1.5), subset=1000, max_steps=300, batch_size=16, lr=5e-3,
            eval_every=300, log_every=20, save_every_steps=0, num_workers=1, output_dir=os.path.join('out', 'demo_seg'))


def get_args_parser():
    recipes = {'resnet50 (mmseg fcn_r50-d8)': FCN_R50, 'vit_* (Table 3a + BEiT)': VIT_LINEAR,
               'demo': dict(DEMO, warmup_steps='10% of --max-steps')}
    p = engine.ArgumentParser(description="ADE20K semantic segmentation (Table 3) of CIM-pre-trained backbones. An "
                              "unset flag takes its recipe's value (the demo's, then the arch's); explicit ones win.",
                              recipes=recipes)
    g = p.add_argument_group('model')
    g.add_argument('--arch', choices=cim.ARCHS, help="backbone; default: resnet50, demo: the checkpoint's")
    g.add_argument('--init', metavar='PATH', help="pre-trained weights (train.py checkpoint or --export, torchvision "
                   "/ timm state dict) or 'none' (from scratch); demo: out/demo/checkpoint-last.pth")
    g.add_argument('--patch-size', type=engine.POSITIVE, help='ViT')
    g.add_argument('--drop-path', type=engine.PROBABILITY, help='stochastic depth at the last block')
    g.add_argument('--aux-weight', type=float, help='loss weight of the FCN auxiliary head on layer3')
    g = p.add_argument_group('optimization (steps = iterations)')
    g.add_argument('--max-steps', type=engine.POSITIVE, help='optimizer steps (Table 3: 80000 or 160000)')
    g.add_argument('--batch-size', type=engine.POSITIVE, help='per GPU (process); total = x GPUs x --accum-iter')
    g.add_argument('--accum-iter', type=engine.POSITIVE, default=1, help='gradient accumulation steps')
    g.add_argument('--lr', type=float, help='peak lr (not rescaled with the batch): SGD (resnet50), AdamW (ViT)')
    g.add_argument('--min-lr', type=float, help='end of the poly decay')
    g.add_argument('--power', type=float, help='poly decay power')
    g.add_argument('--warmup-steps', type=engine.NON_NEGATIVE, help='linear lr warmup')
    g.add_argument('--weight-decay', type=float, help='resnet50: on every parameter (mmseg); ViT: not on norms, '
                                                      'biases, embeddings')
    g.add_argument('--momentum', type=float, help='SGD (resnet50)')
    g.add_argument('--betas', type=float, nargs=2, help='AdamW (ViT)')
    g.add_argument('--layer-decay', type=float, help='ViT layer-wise lr decay')
    g = p.add_argument_group('data and evaluation (mmseg ADE20K pipeline)')
    g.add_argument('--data', metavar='DIR', help='ADEChallengeData2016 folder; none: the Fashion-MNIST demo')
    g.add_argument('--subset', type=engine.POSITIVE, help='use this many training images, drawn at random (seeded)')
    g.add_argument('--img-size', type=engine.POSITIVE, help='training crop, and the sliding window')
    g.add_argument('--scale', type=engine.POSITIVE, nargs=2, metavar=('LONG', 'SHORT'),
                   help='keep-ratio rescale target (training: times --ratio-range; test: as is)')
    g.add_argument('--ratio-range', type=float, nargs=2, metavar=('LOW', 'HIGH'))
    g.add_argument('--cat-max-ratio', type=engine.FRACTION, default=0.75, help='redraw crops one class covers more of')
    g.add_argument('--eval-mode', choices=('whole', 'slide'), help='whole image or sliding windows')
    g.add_argument('--stride', type=engine.POSITIVE, help='sliding-window stride; default: 2/3 of --img-size')
    g.add_argument('--eval-every', type=engine.POSITIVE, help='optimizer steps between evaluations')
    g.add_argument('--vis-images', type=engine.NON_NEGATIVE, default=4, help="val images in each evaluation's PNG")
    engine.add_common_args(p, 'default: out/seg_<arch>')
    return p


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    demo = args.data is None
    rank, args.world_size, device = engine.init_distributed()
    args.init, meta = engine.resolve_init(args.init, demo)  # meta: the pre-training run's args ({} if none)
    taken = {}
    if demo:  # the demo's scale, then the checkpoint's network
        taken.update(engine.apply_recipe(args, DEMO))
        network = dict(arch=meta.get('arch', 'vit_tiny'), patch_size=meta.get('patch_size', 4))
        taken.update(engine.apply_recipe(args, dict(network, warmup_steps=args.max_steps // 10)))
    taken.update(engine.apply_recipe(args, FCN_R50 if args.arch in (None, 'resnet50') else VIT_LINEAR))
    args.stride = args.stride or args.img_size * 2 // 3  # BEiT: 341 for 512 windows
    args.output_dir = args.output_dir or os.path.join('out', f'seg_{args.arch}')
    check_args(args, device)
    if engine.is_main():
        intro = 'no --data: the built-in demo, 2x2 mosaics of Fashion-MNIST items (64 px, 11 classes); ' if demo else ''
        print(f'{intro}unset flags take: {engine.flags(taken)}')
    if not demo:
        return run(args, rank, device)
    # the demo: the pre-trained checkpoint, then random init on the same schedule, side by side
    results = {}
    for name, init, sub in (('pre-trained', args.init, 'pretrained'), ('random init', 'none', 'scratch')):
        if args.init != 'none' or init == 'none':
            results[name] = run(argparse.Namespace(**dict(vars(args), init=init, output_dir=os.path.join(
                args.output_dir, sub))), rank, device)
    if engine.is_main():
        comparison = '  vs  '.join(f"{name} {r['mIoU']:.2f}%" for name, r in results.items())
        print(f"Fashion-MNIST mosaics, val mIoU after {args.max_steps} steps on {results['random init']['n_train']} "
              f"training mosaics ({args.arch}, linear decoder): {comparison}")
    return results


def run(args, rank, device):
    """One segmentation run with the settled args -> its metrics."""
    dtype = engine.resolve_amp(args.amp, device)
    torch.backends.cudnn.benchmark = True  # fixed training crops: let cuDNN pick its fastest convolutions

    # data: read and checked before anything is written
    train_tf = functools.partial(train_pipeline, crop_size=args.img_size, scale=args.scale,
                                 ratio_range=args.ratio_range, cat_max_ratio=args.cat_max_ratio)
    test_tf = functools.partial(test_pipeline, scale=args.scale)
    if args.data is None:
        train_set, val_set, classes = demo_mosaics(train_tf, test_tf)
    else:
        train_set = ADE20K(args.data, 'training', train_tf)
        val_set = ADE20K(args.data, 'validation', test_tf)
        classes = class_names(args.data, ADE20K_CLASSES)
    args.num_classes = len(classes)
    train_set = engine.subset(train_set, args.subset, args.seed)
    dataset = engine.SeededDataset(train_set, args.seed)  # crops as a function of (seed, epoch, index): exact resume
    sampler = engine.ResumableSampler(dataset, args.batch_size, args.world_size, rank, seed=args.seed)
    loader, steps_per_epoch = engine.train_loader(dataset, sampler, args.batch_size, args.accum_iter,
                                                  args.num_workers, args.seed, device)
    # batch 1 (DataLoader's default): whole test images come in many sizes
    val_loader = torch.utils.data.DataLoader(val_set, sampler=engine.ShardSampler(len(val_set), args.world_size, rank),
                                             num_workers=args.num_workers, pin_memory=device.type == 'cuda')
    total_batch = args.batch_size * args.world_size * args.accum_iter
    lrs = poly_schedule(args.lr, args.min_lr, args.max_steps, args.warmup_steps, args.power)

    # model (the weights are checked as they load), optimizer, resume, then the DDP wrap
    torch.manual_seed(args.seed)
    model = build_model(args, sync_bn=args.world_size > 1 and device.type == 'cuda').to(device)
    optimizer = build_optimizer(model, args)
    # fp16: dynamic loss scaling. bf16 / fp32: the scale stays 1 and the scaler does the other half of its job,
    # skipping a step whose gradients are not finite, on the device (no host sync)
    scaler = torch.amp.GradScaler(device.type, init_scale=2.0 ** 16 if dtype == torch.float16 else 1.0)
    engine.seed_rank(args.seed, rank)  # from here on, dropout and stochastic depth differ across ranks
    log = dict(n_bad_images=0, skipped_steps=0, best_mIoU=-1.0, best_step=0, last={})
    start_step = 0
    engine.lock_output_dir(args.output_dir)  # one live run per folder
    ckpt = args.resume or engine.find_checkpoint(args.output_dir)
    if ckpt:
        start_step = engine.load_training_state(ckpt, model, optimizer, scaler, args, rank, log, SAME_ARGS)[0]['step']
    raw_model = model  # the network itself: what is saved, evaluated and drawn
    if args.world_size > 1:
        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == 'cuda' else None)
    if engine.is_main():
        print(f"{args.arch} + {'FCN' if args.arch == 'resnet50' else 'linear'} from {args.init}: {len(train_set)} "
              f"training / {len(val_set)} val images, {args.num_classes} classes, {args.max_steps} steps "
              f"({steps_per_epoch} per epoch), total batch {total_batch} ({args.world_size} x {args.batch_size} "
              f"x {args.accum_iter}), lr {args.lr:.2e}, amp {dtype or 'off'}, eval {args.eval_mode}, {args.output_dir}")

    # ---- the loop: one optimizer step per iteration; logs every --log-every, evaluates every --eval-every --------
    params = [p for p in raw_model.parameters() if p.requires_grad]
    tally = engine.Tally(('loss', 'aux_loss') if args.arch == 'resnet50' else ('loss',), total_batch, device)
    batches = engine.endless_batches(loader, start_step, steps_per_epoch, args.accum_iter)
    pbar = engine.progress(total=args.max_steps, initial=start_step, desc='train')
    model.train()
    for step in range(start_step, args.max_steps):
        # the lr is a list indexed by step, not a scheduler object: a resumed run needs nothing but the step count
        for g in optimizer.param_groups:
            g['lr'] = lrs[step] * g['lr_scale']  # poly decay (mmseg), times the group's layer decay (ViT)
        host = [next(batches) for _ in range(args.accum_iter)]  # (imgs, masks, n_bad) per micro-batch
        micro_batches = [(x.to(device, non_blocking=True), y.to(device, non_blocking=True)) for x, y, _ in host]
        metrics, norm = segment_step(model, micro_batches, optimizer, scaler, params, args, dtype)
        tally.add(metrics, norm, sum(n_bad for _, _, n_bad in host))  # no host sync: on the device until the log
        pbar.update()

        # bookkeeping: every rank runs it in step (close() all-reduces, evaluation is sharded); rank 0 writes.
        # Segmentation counts steps, not epochs (BEiT / mmseg's 160k iterations): no epoch boundary here
        done = step + 1
        saving = done == args.max_steps or (args.save_every_steps and done % args.save_every_steps == 0)
        if done % args.log_every == 0 or saving:  # a checkpoint closes the interval, so a resume starts a new one
            # tally.close: the interval's one host sync
            record = dict(step=done, epoch=round(done / steps_per_epoch, 3), lr=lrs[step], **tally.close(log))
            if engine.is_main():
                engine.log_jsonl(os.path.join(args.output_dir, 'log.jsonl'), record)
                aux = f" (aux {record['aux_loss']:.4f})" if 'aux_loss' in record else ''
                pbar.write(f"step {done}/{args.max_steps}: loss {record['loss']:.4f}{aux}, grad norm "
                           f"{record['grad_norm']:.3f}, lr {record['lr']:.2e}, {record['imgs_per_s']:.1f} img/s")
            tally.check(args.max_bad_steps, done, args.output_dir)  # after the log line
        if done % args.eval_every == 0 or done == args.max_steps:  # before the save: a resume does not redo it
            m = validate(raw_model, val_loader, args, device, dtype)
            log['last'] = dict(step=done, mIoU=m['mIoU'], aAcc=m['aAcc'], mAcc=m['mAcc'], n_val=m['n_val'])
            if m['mIoU'] > log['best_mIoU']:
                log.update(best_mIoU=m['mIoU'], best_step=done)
                # the weights alone, no optimizer: what a user evaluates or transfers
                if engine.is_main():
                    engine.atomic_save(dict(model=raw_model.state_dict(), args=vars(args), **log['last']),
                                       os.path.join(args.output_dir, 'checkpoint-best.pth'))
            if engine.is_main():
                iou = {c: None if math.isnan(v) else round(v, 2) for c, v in zip(classes, m['IoU'])}
                engine.log_jsonl(os.path.join(args.output_dir, 'log.jsonl'), dict(log['last'], IoU=iou))
                png = os.path.join(args.output_dir, f'step{done:06d}.png') if args.vis_images else ''
                if png:
                    save_predictions(png, raw_model, val_set, args, device, dtype)
                pbar.write(f"step {done}/{args.max_steps}: val mIoU {m['mIoU']:.2f}, aAcc {m['aAcc']:.2f}, mAcc "
                           f"{m['mAcc']:.2f} (best mIoU {log['best_mIoU']:.2f} at step {log['best_step']}) {png}")
            model.train()  # validate() left the network in eval mode (BatchNorm statistics, no dropout)
            tally.t0 = time.time()  # img/s of the training steps alone, without the evaluation
        if saving:
            engine.save_training_state(raw_model, optimizer, scaler, args, log, step=done)
    pbar.close()
    last = log['last']
    if engine.is_main():
        print(f"done: {args.arch} from {args.init}, single-scale val mIoU {last['mIoU']:.2f} aAcc {last['aAcc']:.2f} "
              f"mAcc {last['mAcc']:.2f} at step {last['step']} (best mIoU {log['best_mIoU']:.2f} at step "
              f"{log['best_step']}); {args.output_dir}/checkpoint-best.pth, {engine.CHECKPOINT}, log.jsonl")
    return dict(last, best_mIoU=log['best_mIoU'], best_step=log['best_step'], n_train=len(train_set))


def check_args(args, device):
    """User mistakes the flags' own types cannot see (they involve two flags): one clear line each."""
    if not 0 <= args.warmup_steps <= args.max_steps:
        raise engine.UserError(f'--warmup-steps {args.warmup_steps} must be between 0 and --max-steps {args.max_steps}')
    if not 0 < args.ratio_range[0] <= args.ratio_range[1]:
        raise engine.UserError('--ratio-range LOW HIGH needs 0 < LOW <= HIGH')
    if args.arch in cim.VIT_CONFIGS and args.img_size % args.patch_size:
        raise engine.UserError(f'--img-size {args.img_size} is not divisible by --patch-size {args.patch_size}')
    if args.arch in cim.VIT_CONFIGS and args.eval_mode == 'whole':
        raise engine.UserError(f'a ViT has position embeddings for --img-size {args.img_size} only (test images have '
                               f'other sizes): use --eval-mode slide')
    if args.eval_mode == 'slide' and args.stride > args.img_size:
        raise engine.UserError(f'--stride {args.stride} larger than --img-size {args.img_size} leaves pixels unseen')
    if args.arch == 'resnet50' and args.batch_size < 2 and not (args.world_size > 1 and device.type == 'cuda'):
        raise engine.UserError(f'--batch-size {args.batch_size} with resnet50: BatchNorm needs more than one image '
                               f'per process (SyncBatchNorm, multi-GPU only, pools the GPUs); use --batch-size >= 2')


def poly_schedule(peak_lr, min_lr, total_steps, warmup_steps=0, power=0.9):
    """The lr of every optimizer step, mmseg's 'poly' policy: min_lr + (peak_lr - min_lr) * (1 - step / total_steps)
    ** power, times a linear warmup factor (step + 1) / warmup_steps over the first warmup_steps steps (BEiT's
    ADE20K: 1500 steps). -> list of total_steps floats."""
    return [(min_lr + (peak_lr - min_lr) * (1 - s / total_steps) ** power) * min(1.0, (s + 1) / max(warmup_steps, 1))
            for s in range(total_steps)]


# ------------------------------------------------------------------------------------------------------------------
# Data: ADEChallengeData2016, image / annotation pairs with the same stem

def reduce_zero_label(mask):
    """mmseg's reduce_zero_label for ADE20K: label 0 ('other') -> 255 (ignored), k -> k - 1, 255 stays 255.
    mask: uint8 array [H, W] -> uint8 array [H, W]."""
    return np.where(mask == IGNORE, IGNORE, mask - 1).astype(np.uint8)  # uint8 arithmetic: 0 - 1 wraps to 255


def files_by_stem(folder, extensions):
    """{file name without extension: file name} of the non-hidden files in folder ending in one of extensions;
    a missing folder is a UserError."""
    if not os.path.isdir(folder):
        raise engine.UserError(f"'{folder}' does not exist: --data must be ADEChallengeData2016, with images/"
                               f"{{training,validation}}/*.jpg and annotations/{{training,validation}}/*.png")
    return {os.path.splitext(f)[0]: f for f in os.listdir(folder)
            if f.lower().endswith(extensions) and not f.startswith('.')}


class ADE20K(torch.utils.data.Dataset):
    """root/images/<split>/<stem>.jpg with root/annotations/<split>/<stem>.png (single-channel class indices).

    Item i: (image, mask, n_bad) = (*transform(tv_tensors.Image uint8 [3, H, W], tv_tensors.Mask uint8 [H, W]),
    n_bad); labels 0..149 after reduce_zero_label, 255 ignored. An unreadable pair is skipped like
    engine.ImageFiles does (the next one stands in, a warning, n_bad counts it); a wrong layout is a UserError
    (an empty one: engine.train_loader's, or engine.ShardSampler's for the validation split).
    """

    def __init__(self, root, split, transform):
        img_dir = os.path.join(root, 'images', split)
        ann_dir = os.path.join(root, 'annotations', split)
        images = files_by_stem(img_dir, engine.IMG_EXTENSIONS)
        anns = files_by_stem(ann_dir, '.png')
        for a, b, what, where in ((images, anns, 'images', ann_dir), (anns, images, 'annotations', img_dir)):
            unpaired = sorted(set(a) - set(b))
            if unpaired:
                raise engine.UserError(f"{len(unpaired)} of {len(a)} {what} have no partner with the same name in "
                                       f"'{where}' (e.g. '{a[unpaired[0]]}')")
        self.pairs = [(os.path.join(img_dir, images[s]), os.path.join(ann_dir, anns[s])) for s in sorted(images)]
        self.transform = transform

    def __len__(self):
        return len(self.pairs)

    def __getitem__(self, i):
        (img, mask), j, n_bad = engine.read_skipping_bad(i, len(self.pairs), self._read,
                                                         lambda j: "image or annotation '%s' / '%s'" % self.pairs[j])
        ann_path = self.pairs[j][1]
        if mask.ndim != 2 or mask.dtype != np.uint8 or mask.shape != (img.height, img.width):
            raise engine.UserError(f"annotation '{ann_path}' is not a single-channel 8-bit PNG of the image's size "
                                   f"{img.width}x{img.height} (ADEChallengeData2016 annotations hold class indices)")
        mask = reduce_zero_label(mask)
        if ((mask != IGNORE) & (mask >= ADE20K_CLASSES)).any():
            raise engine.UserError(f"annotation '{ann_path}' has label {mask[mask != IGNORE].max() + 1} but the "
                                   f"dataset has {ADE20K_CLASSES} classes")
        return *self.transform(tv_tensors.Image(TF.pil_to_tensor(img)), tv_tensors.Mask(torch.from_numpy(mask))), n_bad

    def _read(self, j):
        """Pair j decoded: (RGB PIL image, annotation uint8 array); a truncated file raises here."""
        with Image.open(self.pairs[j][0]) as im, Image.open(self.pairs[j][1]) as an:
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
# The built-in demo's data: 2x2 mosaics of Fashion-MNIST items, label = background or 1 + the item's class

def fashion_mosaics(images, labels, threshold=16):
    """images: [N, 28, 28] uint8, labels: [N] -> (mosaics [n, 64, 64] uint8, masks [n, 64, 64] uint8), n = N // 4
    (the items after the last whole mosaic are left out). Items 4k..4k+3 fill the 2x2 cells of mosaic k row by row
    (28 px + 2 px black border = 32 px, the pre-training size); mask = 0 where the pixel is darker than threshold
    (of 255: background), else 1 + the item's class (11 classes)."""
    x = F.pad(images[:len(images) // 4 * 4], (2, 2, 2, 2))  # [4n, 32, 32]
    m = torch.where(x >= threshold, (labels[:len(x)] + 1).to(torch.uint8).view(-1, 1, 1), 0).to(torch.uint8)
    # [4n, 32, 32] -> [n, 64, 64]: cells 4k..4k+3 at top left, top right, bottom left, bottom right
    return tuple(cells.view(-1, 2, 2, 32, 32).permute(0, 1, 3, 2, 4).reshape(-1, 64, 64) for cells in (x, m))


class MosaicImages(torch.utils.data.TensorDataset):
    """In-memory gray images and masks ([N, H, W] uint8) with ADE20K's items: (*transform(Image, Mask), 0)."""

    def __init__(self, images, masks, transform):
        super().__init__(images, masks)
        self.transform = transform

    def __getitem__(self, i):
        img, mask = super().__getitem__(i)
        return *self.transform(tv_tensors.Image(img.expand(3, -1, -1).clone()), tv_tensors.Mask(mask)), 0


def demo_mosaics(train_tf, test_tf, n_val=100):
    """The demo's data -> (training mosaics: all of the training split's, validation mosaics: n_val from the test
    split's first 4 x n_val items (fewer when the split is smaller), class names: background + Fashion-MNIST's 10)."""
    train_set = MosaicImages(*fashion_mosaics(*engine.fashion_mnist(train=True)), train_tf)
    x, y = engine.fashion_mnist(train=False)
    val_set = MosaicImages(*fashion_mosaics(x[:4 * n_val], y[:4 * n_val]), test_tf)
    return train_set, val_set, ['background'] + list(engine.FASHION_MNIST_CLASSES)


# ------------------------------------------------------------------------------------------------------------------
# Joint transforms: mmseg's ADE20K pipeline = keep-ratio rescale x [0.5, 2] -> 512 crop (cat_max_ratio 0.75) ->
# flip -> photometric distortion -> normalize -> pad to 512 (image 0, mask 255). Hand-written: torchvision v2's
# ScaleJitter / RandomResize, RandomCrop and RandomPhotometricDistort differ from mmseg's (the keep-ratio rule,
# no cat_max_ratio, another distortion). The kernels are torchvision.transforms.v2.functional's, which dispatch on
# tv_tensors: a tv_tensors.Mask is resized NEAREST, never interpolated.

def rescale_size(h, w, scale):
    """mmcv's keep-ratio rescale: factor = min(long / max(h, w), short / min(h, w)) for scale = (long, short),
    -> (new h, new w) rounded half up."""
    f = min(max(scale) / max(h, w), min(scale) / min(h, w))
    return int(h * f + 0.5), int(w * f + 0.5)


def crop_is_balanced(mask, cat_max_ratio, ignore_index=IGNORE):
    """mmseg's cat_max_ratio test: the crop has >= 2 classes and none covers cat_max_ratio or more of its
    non-ignored pixels. mask: [h, w] integer."""
    counts = torch.bincount(mask[mask != ignore_index].long())
    counts = counts[counts > 0]
    return len(counts) > 1 and float(counts.max()) / float(counts.sum()) < cat_max_ratio


def random_crop_box(mask, size, cat_max_ratio=0.75, tries=10):
    """mmseg's RandomCrop with cat_max_ratio: a random size x size box (smaller images: their size), redrawn up to
    `tries` times while its crop of mask fails crop_is_balanced (then the last draw is kept).
    mask: [H, W] -> (top, left, height, width)."""
    h, w = mask.shape[-2:]
    ch, cw = min(size, h), min(size, w)
    for _ in range(1 + tries):  # the first draw, then the redraws
        top = int(torch.randint(h - ch + 1, ()))
        left = int(torch.randint(w - cw + 1, ()))
        if cat_max_ratio >= 1 or crop_is_balanced(mask[top:top + ch, left:left + cw], cat_max_ratio):
            break
    return top, left, ch, cw


def scale_saturation(img, factor):
    """HSV saturation times factor (clipped at 1), hue and value kept: each channel c -> V - (V - c) * k with
    k = min(factor, V / (V - min)) (exact HSV arithmetic, no colour-space round trip). img: [3, H, W] float."""
    v = img.amax(0, keepdim=True)
    lo = img.amin(0, keepdim=True)
    k = torch.clamp(v / (v - lo).clamp_min(1e-6), max=factor)
    return v - (v - img) * k


def coin():
    """True with probability 0.5 (torch's global RNG, seeded per item by engine.SeededDataset)."""
    return bool(torch.randint(2, ()))


def uniform(lo, hi):
    """A float drawn from U(lo, hi) with torch's global RNG."""
    return lo + (hi - lo) * float(torch.rand(()))


def photometric_distortion(img, brightness=32, contrast=(0.5, 1.5), saturation=(0.5, 1.5), hue=18):
    """mmseg's PhotoMetricDistortion. Each step with probability 0.5: brightness + U(-32, 32), contrast x
    U(0.5, 1.5) (first or last, a coin decides), HSV saturation x U(0.5, 1.5), hue + randint(-18, 18) of OpenCV's
    180 units; clipped to [0, 255] after each. img: uint8 [3, H, W] -> uint8 [3, H, W] (a plain tensor)."""
    # every draw first, in a fixed order (each step's coin, then its value); a skipped step is the identity
    shift = uniform(-brightness, brightness) if coin() else 0.0
    contrast_first = coin()
    gain = uniform(*contrast) if coin() else 1.0
    sat = uniform(*saturation) if coin() else 1.0
    rotation = int(torch.randint(-hue, hue, ())) if coin() else 0
    x = (img.as_subclass(torch.Tensor).float() + shift).clamp(0, 255)
    if contrast_first:
        x = (x * gain).clamp(0, 255)
    x = scale_saturation(x, sat).clamp(0, 255)
    if rotation:
        x = TF.adjust_hue(x / 255, rotation / 180) * 255
    if not contrast_first:
        x = (x * gain).clamp(0, 255)
    return x.round().to(torch.uint8)


def train_pipeline(img, mask, crop_size=512, scale=(2048, 512), ratio_range=(0.5, 2.0), cat_max_ratio=0.75):
    """mmseg's ADE20K training view. (tv_tensors.Image uint8 [3, H, W], tv_tensors.Mask uint8 [H, W]) ->
    (image float [3, crop, crop] normalized, mask uint8 [crop, crop]), plain tensors."""
    r = uniform(*ratio_range)  # mmseg's Resize with ratio_range: scale x r, then the keep-ratio rule
    size = list(rescale_size(*img.shape[-2:], (int(scale[0] * r), int(scale[1] * r))))
    # the image bilinear without antialiasing (mmcv's cv2 resize), the Mask NEAREST
    img, mask = TF.resize(img, size, antialias=False), TF.resize(mask, size)
    box = random_crop_box(mask, crop_size, cat_max_ratio)
    img, mask = TF.crop(img, *box), TF.crop(mask, *box)
    if torch.rand(1) < 0.5:  # the draw of v2.RandomHorizontalFlip(0.5)
        img, mask = TF.horizontal_flip(img), TF.horizontal_flip(mask)
    img = photometric_distortion(img)
    img = TF.normalize(TF.to_dtype(img, torch.float32, scale=True), list(cim.IMAGENET_MEAN), list(cim.IMAGENET_STD))
    pad = (0, crop_size - img.shape[-1], 0, crop_size - img.shape[-2])  # bottom / right: mmseg's Pad(size=crop)
    return F.pad(img, pad), F.pad(mask.as_subclass(torch.Tensor), pad, value=IGNORE)  # 0: the mean colour


def test_pipeline(img, mask, scale=(2048, 512)):
    """mmseg's single-scale test view: the image rescaled (keep ratio) to `scale` and normalized; the mask stays at
    the annotation's size, where predictions are scored. (Image, Mask) -> (float [3, h, w], uint8 [H, W])."""
    img = TF.resize(img.as_subclass(torch.Tensor), list(rescale_size(*img.shape[-2:], scale)), antialias=False)
    img = TF.normalize(TF.to_dtype(img, torch.float32, scale=True), list(cim.IMAGENET_MEAN), list(cim.IMAGENET_STD))
    return img, mask.as_subclass(torch.Tensor)


# ------------------------------------------------------------------------------------------------------------------
# Models: backbone -> decode head (-> auxiliary head) -> logits, bilinearly upsampled to the input size

def resnet_stages(net, imgs):
    """imgs: [B, 3, H, W] -> (layer3 [B, 1024, H/8, W/8], layer4 [B, 2048, H/8, W/8]) of a dilated ResNet-50."""
    x = net.maxpool(net.relu(net.bn1(net.conv1(imgs))))
    c3 = net.layer3(net.layer2(net.layer1(x)))
    return c3, net.layer4(c3)


class FCNHead(nn.Module):
    """mmseg's FCNHead of fcn_r50-d8: two 3x3 conv-BN-ReLU, the input concatenated back (concat_input) and fused by
    one more, Dropout2d(0.1), 1x1 classifier. (torchvision's FCNHead is the one-conv variant without the
    concatenation: it serves as the auxiliary head.) x: [B, in_channels, h, w] -> [B, num_classes, h, w]."""

    def __init__(self, in_channels, channels, num_classes, dropout=0.1):
        super().__init__()
        # torchvision's Conv2dNormActivation is mmseg's ConvModule: conv (same padding, no bias), BatchNorm, ReLU
        self.convs = nn.Sequential(torchvision.ops.Conv2dNormActivation(in_channels, channels),
                                   torchvision.ops.Conv2dNormActivation(channels, channels))
        self.conv_cat = torchvision.ops.Conv2dNormActivation(in_channels + channels, channels)
        self.dropout = nn.Dropout2d(dropout)
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)

    def forward(self, x):
        return self.conv_seg(self.dropout(self.conv_cat(torch.cat([x, self.convs(x)], dim=1))))


def init_head(head):
    """mmseg's decode-head init: convolutions Kaiming normal (fan_out, ReLU), the classifier (the last conv or
    linear layer) N(0, 0.01) with zero bias; BatchNorm keeps torch's init, 1 / 0 (mmseg's too). -> head."""
    *convs, classifier = [m for m in head.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    for m in convs:
        nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='relu')
    nn.init.normal_(classifier.weight, std=0.01)
    nn.init.zeros_(classifier.bias)
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
        # torchvision's resnet50 with dilation 2 / 4 in layer3 / layer4 instead of stride (output stride 8, mmseg's
        # 'd8'; the first block of each keeps the previous dilation, mmseg's contract_dilation). Parameter names are
        # unchanged, so CIM exports and torchvision weights load; the classifier is removed ('fc.*' is ignored).
        self.backbone = torchvision.models.resnet50(replace_stride_with_dilation=[False, True, True])
        self.backbone.fc = nn.Identity()
        self.decode_head = init_head(FCNHead(2048, 512, num_classes))
        self.auxiliary_head = init_head(torchvision.models.segmentation.fcn.FCNHead(1024, num_classes))
        self.auxiliary_head[3] = nn.Dropout2d(0.1)  # mmseg drops whole channels; torchvision's has nn.Dropout

    def forward(self, imgs):
        c3, c4 = resnet_stages(self.backbone, imgs.contiguous(memory_format=torch.channels_last))  # cuDNN's fastest
        outs = [self.decode_head(c4)]
        if self.training:
            outs.append(self.auxiliary_head(c3))
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
        p = self.backbone.patch_embed.proj.stride[0]  # the patch size
        logits = self.decode_head(self.backbone.forward_features(imgs)[:, 1:])  # [B, N, C], the cls token dropped
        return [upsample(logits.transpose(1, 2).reshape(B, -1, H // p, W // p), (H, W))]


def build_model(args, sync_bn=False):
    """FCN (resnet50) or LinearViT at --img-size, --init loaded into the backbone (ViT position embeddings
    interpolated by engine.load_pretrained; a file that does not fit is a UserError), SyncBatchNorm if sync_bn
    (DDP on GPUs), stochastic depth (ViT: in its blocks; ResNet: engine's hooks, added after the SyncBatchNorm
    conversion, which makes new modules without them). On the CPU."""
    if args.arch == 'resnet50':
        model = FCN(args.num_classes).to(memory_format=torch.channels_last)
    else:
        backbone = cim.build_enhancer(args.arch, args.img_size, args.patch_size, drop_path=args.drop_path)
        model = LinearViT(backbone, args.num_classes)
    if args.init != 'none':
        engine.load_pretrained(model.backbone, engine.read_weights(args.init)[0], f"'{args.init}'")
    if sync_bn:  # SyncBatchNorm needs GPUs: on CPU / gloo BatchNorm stays
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if args.arch == 'resnet50':
        engine.add_stochastic_depth(model.backbone, args.drop_path)
    return model


def build_optimizer(model, args):
    """ViT: AdamW with BEiT's layer-wise lr decay (engine.layer_decay, prefix 'backbone.') and no weight decay on
    norms, biases, position / cls embeddings. ResNet-50: SGD with momentum, weight decay on every parameter (mmseg).
    Every group has an 'lr_scale' (1 but for the layer decay): the loop sets its lr to lrs[step] * lr_scale."""
    if isinstance(model.backbone, cim.VisionTransformer):
        scale = engine.layer_decay(len(model.backbone.blocks), args.layer_decay, prefix='backbone.')
        groups = engine.param_groups(model, args.weight_decay, cim.NO_WEIGHT_DECAY_KEYS, scale)
        return torch.optim.AdamW(groups, lr=args.lr, betas=tuple(args.betas), fused=True)
    group = dict(params=[p for p in model.parameters() if p.requires_grad], lr_scale=1.0)
    return torch.optim.SGD([group], lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay, fused=True)


def segment_step(model, micro_batches, optimizer, scaler, params, args, dtype):
    """One optimizer step (mmseg's / BEiT's schedules: no clipping) -> (the micro-batch means [loss(, aux loss)],
    the global grad norm [0-dim] fp64, inf / NaN when the step was skipped), on the device, no host sync.

    micro_batches: (imgs [B, 3, S, S], masks [B, S, S]) per micro-batch, on the device; model: FCN / LinearViT or
    its DDP wrapper. The FCN's auxiliary head adds aux_weight x its loss; gradients are all-reduced on the last."""
    ddp = isinstance(model, DistributedDataParallel)
    metrics = 0.0
    for i, (imgs, masks) in enumerate(micro_batches):
        with model.no_sync() if ddp and i < len(micro_batches) - 1 else contextlib.nullcontext():
            with torch.autocast(imgs.device.type, dtype=dtype, enabled=dtype is not None):
                outs = model(imgs)  # [decode head logits, auxiliary head logits (FCN)], [B, C, H, W] each
            losses = [seg_loss(o, masks.long()) for o in outs]  # fp32
            loss = losses[0] + sum(args.aux_weight * aux for aux in losses[1:])  # mmseg: aux weight 0.4
            scaler.scale(loss / len(micro_batches)).backward()  # fp16: scaled against underflow
        metrics = metrics + torch.stack([loss.detach()] + [aux.detach() for aux in losses[1:]]) / len(micro_batches)
    scaler.unscale_(optimizer)  # true gradients for the norm; finds inf / NaN
    norm = engine.grad_norm(params)  # fp64: finite exactly when every gradient is (no clipping: mmseg, BEiT)
    scaler.step(optimizer)  # skipped when a gradient is inf / NaN (a device-side check: fused optimizers)
    scaler.update(None if dtype == torch.float16 else 1.0)  # bf16 / fp32: the scale stays 1
    optimizer.zero_grad(set_to_none=True)
    return metrics, norm


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
    """imgs: [B, 3, h, w] at the test scale -> logits [B, C, h, w], by --eval-mode (windows of --img-size)."""
    return model(imgs)[0] if args.eval_mode == 'whole' else slide_inference(model, imgs, args.img_size, args.stride)


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
    tp = hist.diag()
    iou = tp / (hist.sum(1) + hist.sum(0) - tp)  # ground truth + prediction - true positives
    acc = tp / hist.sum(1)
    return dict(mIoU=100 * float(iou.nanmean()), mAcc=100 * float(acc.nanmean()),
                aAcc=100 * float(tp.sum() / hist.sum()), IoU=(100 * iou).tolist())


@torch.no_grad()
def validate(model, loader, args, device, dtype):
    """Confusion matrix over the validation set (batch 1, every image once over all ranks via ShardSampler,
    summed by engine.evaluate); logits resized to the annotation's size, then argmax. -> metrics dict (mIoU, mAcc,
    aAcc, IoU per class, n_val). Leaves the model in eval mode."""
    model.eval()

    def sums(img, mask):  # img: [1, 3, h, w] at the test scale, mask: [1, H, W] at the annotation's size
        logits = upsample(infer(model, img, args).float(), mask.shape[-2:])
        return dict(hist=confusion_matrix(logits.argmax(1), mask.long(), args.num_classes), n=len(mask))
    # whole images come in many sizes: cuDNN's autotuning would time every conv anew at each new one
    benchmark = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = benchmark and args.eval_mode != 'whole'
    try:
        s = engine.evaluate(sums, loader, device, dtype, desc='val')
    finally:
        torch.backends.cudnn.benchmark = benchmark
    return dict(segmentation_metrics(s['hist']), n_val=int(s['n']))


@torch.no_grad()
def save_predictions(path, model, dataset, args, device, dtype):
    """PNG, one row per validation image (the first --vis-images): image, ground truth, prediction. A fixed colour
    per class, from a seeded generator; ignored pixels black."""
    model.eval()
    colours = torch.cat([0.2 + 0.8 * torch.rand(args.num_classes, 3, generator=torch.Generator().manual_seed(0)),
                         torch.zeros(1, 3)])  # [C + 1, 3] in [0, 1]
    tiles = []  # [3, H_i, W_i] each, in [0, 1]
    for i in range(min(args.vis_images, len(dataset))):
        img, mask = dataset[i][:2]
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            logits = infer(model, img[None].to(device), args)
        pred = upsample(logits.float(), mask.shape[-2:]).argmax(1)[0].cpu()
        tiles.append(upsample(cim.unnormalize(img[None]), mask.shape[-2:])[0])
        tiles += [colours[m.long().clamp(max=args.num_classes)].permute(2, 0, 1) for m in (mask, pred)]
    H, W = max(t.shape[1] for t in tiles), max(t.shape[2] for t in tiles)
    grid = torch.stack([F.pad(t, (0, W - t.shape[2], 0, H - t.shape[1]), value=1.0) for t in tiles])
    k = max(1, 256 // max(H, W))  # small demo images are enlarged
    torchvision.utils.save_image(F.interpolate(grid, scale_factor=k, mode='nearest'), path, nrow=3, padding=2,
                                 pad_value=1.0)


# ------------------------------------------------------------------------------------------------------------------
# Checkpoints: model, optimizer, scaler, RNG states, step (the sampler position follows from it), log

# what a resumed run must share with its checkpoint
SAME_ARGS = ('arch', 'patch_size', 'img_size', 'num_classes', 'subset', 'batch_size', 'accum_iter', 'world_size')


if __name__ == '__main__':
    engine.run_cli(main)
