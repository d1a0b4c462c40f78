"""ImageNet-1K evaluation of CIM-pre-trained backbones (Sec. 3.2): end-to-end fine-tuning (Tables 1-2 with the
recipes of Tables 10-11), linear probing (MAE's protocol) and kNN (DINO's), the recipes as defaults.

    # ViT-B/16, Table 10 (8 GPUs x 128 = batch 1024); rerunning the same command resumes
    torchrun --nproc_per_node=8 finetune.py --arch vit_base --init out/vitb_respix/checkpoint-last.pth \\
        --data /imagenet --output-dir out/ft_vitb
    # ResNet-50, Table 11: --recipe 100 | 300 | 600 (8 x 256 = batch 2048, binary cross-entropy)
    torchrun --nproc_per_node=8 finetune.py --arch resnet50 --recipe 300 --init r50_revdet.pth \\
        --data /imagenet --output-dir out/ft_r50_300
    # the from-scratch baselines of Tables 1-2
    torchrun --nproc_per_node=8 finetune.py --arch resnet50 --recipe 100 --init none --data /imagenet
    # linear probe (frozen backbone, BatchNorm + linear, 90 epochs) and kNN (k = 20) of the pooled features;
    # --init none gives either one's random-init baseline
    torchrun --nproc_per_node=8 finetune.py --linear-probe --arch vit_base --init vitb_respix.pth --data /imagenet
    torchrun --nproc_per_node=8 finetune.py --knn --arch resnet50 --init none --data /imagenet
    # a bounded run on your own data: 5,000 training images, 2,000 optimizer steps
    python finetune.py --arch vit_small --init vits.pth --data ~/my_data --subset 5000 --max-steps 2000
    # the built-in demo: fine-tunes train.py's demo checkpoint on Fashion-MNIST, next to random init
    python train.py && python finetune.py

--data holds train/<class>/<image> and val/<class>/<image> (ImageNet layout). --init reads a train.py checkpoint (its
enhancer; its --arch becomes the default), a `train.py --export` backbone, or a torchvision / timm state dict;
`--init none` starts from random initialization.

Frozen features of a BatchNorm network (ResNet-50 under --knn and --linear-probe): the BN statistics are
re-estimated on clean training images (the evaluation view) before kNN's features are extracted and before the
probe trains, for pre-trained and random-init networks alike (engine.recompute_bn_stats): the pre-trained
statistics were gathered on corrupted images, a random network's never.
"""
import argparse
import contextlib
import copy
import functools
import os
import time

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision.transforms.v2 as v2
from torch.nn.parallel import DistributedDataParallel
from torchvision.transforms import InterpolationMode

import cim
import engine

# Recipes: literal dicts. A flag left unset takes its value from the run's recipe; an explicit flag always wins.
# blr is the peak lr at total batch ref_batch, scaled linearly to the run's total batch.
# Table 10, ViT-B/16 pre-trained with RESPIX: 100 epochs, 5 warmup, batch 1024 (8 x 128), peak lr 3e-3, layer decay
# 0.8, wd 0.05, betas (0.9, 0.999), no clipping, drop path 0.1, smoothing 0.1, mixup 0.8, cutmix 1.0, RandAugment
# 9 / 0.5, 224 px, crop ratio 0.95, cross-entropy. (BEiT/MAE/timm, the paper is silent): min lr 1e-6, 2 RandAugment
# ops, random erasing 0.25, crop scale (0.08, 1). Workers, logging and checkpoints are ours.
VIT_B = dict(epochs=100, warmup_epochs=5, batch_size=128, ref_batch=1024, blr=3e-3, min_lr=1e-6, weight_decay=0.05,
             layer_decay=0.8, betas=(0.9, 0.999), clip_grad=0.0, drop_path=0.1, smoothing=0.1, mixup=0.8, cutmix=1.0,
             randaug=9, randaug_ops=2, randaug_mstd=0.5, reprob=0.25, repeated_aug=1, loss='ce', img_size=224,
             test_img_size=224, crop_ratio=0.95, min_crop_scale=0.08, patch_size=16, num_workers=10, log_every=50,
             save_every_steps=1000)
VIT_B_REVDET = dict(VIT_B, blr=5e-3)  # Table 10: 5e-3 for ViT-B/16 REVDET
VIT_S = dict(VIT_B, epochs=200)  # Table 10: ViT-S/16 200 epochs at 3e-3 (or 4e-3); ViT-Ti (the paper is silent) too
# Table 11, ResNet-50 (RSB A3 / A2 / A1 with AdamW): columns 100 / 300 / 600 epochs; 5 warmup, batch 2048 (8 x 256),
# peak lr 12e-3, no layer decay, binary cross-entropy, cutmix 1.0, RandAugment M / 0.5, test 224 px at crop ratio
# 0.95. (BEiT/MAE/timm/RSB, the paper is silent): min lr 1e-6, betas, no clipping, 2 RandAugment ops, crop scale.
R50_100 = dict(epochs=100, warmup_epochs=5, batch_size=256, ref_batch=2048, blr=12e-3, min_lr=1e-6, weight_decay=0.02,
               layer_decay=1.0, betas=(0.9, 0.999), clip_grad=0.0, drop_path=0.0, smoothing=0.1, mixup=0.1, cutmix=1.0,
               randaug=6, randaug_ops=2, randaug_mstd=0.5, reprob=0.0, repeated_aug=1, loss='bce', img_size=160,
               test_img_size=224, crop_ratio=0.95, min_crop_scale=0.08, num_workers=10, log_every=50,
               save_every_steps=1000)
R50_300 = dict(R50_100, epochs=300, img_size=224, randaug=7, smoothing=0.0, repeated_aug=3)  # Table 11, column 300
R50_600 = dict(R50_300, epochs=600, weight_decay=0.01, smoothing=0.1, mixup=0.2, drop_path=0.05)  # Table 11, column 600
RESNET = {100: R50_100, 300: R50_300, 600: R50_600}
# --linear-probe (MAE's; the paper is silent): 90 epochs, 10 warmup, batch 16384, base lr 0.1 per 256 images (6.4 at
# 16384) down to 0, no weight decay, crop + flip only, test crop ratio 0.875. SGD + momentum stands in for LARS.
PROBE = dict(epochs=90, warmup_epochs=10, batch_size=2048, ref_batch=16384, blr=6.4, min_lr=0.0, weight_decay=0.0,
             clip_grad=0.0, smoothing=0.0, mixup=0.0, cutmix=0.0, randaug=0, randaug_ops=2, randaug_mstd=0.5,
             reprob=0.0, repeated_aug=1, loss='ce', img_size=224, test_img_size=224, crop_ratio=0.875,
             min_crop_scale=0.08, patch_size=16, num_workers=10, log_every=50, save_every_steps=1000)
# --knn (DINO's; the paper is silent): k = 20, T = 0.07, 224 px center crops of 256 px (crop ratio 0.875)
KNN = dict(knn_k=20, knn_t=0.07, test_img_size=224, crop_ratio=0.875, patch_size=16, batch_size=128, num_workers=10)
KNN_SETTINGS = ('arch', 'subset') + tuple(KNN)  # all that --knn reads
# The demo (no --data), applied before the mode's recipe: Fashion-MNIST (28 px + 2 px border = 32 px), 4000 training
# images, 3 epochs at batch 64, no mixing or RandAugment. lr 3e-3 (16x the recipe's 3e-3 x 64 / 1024): the short
# schedule needs a large lr, which the pre-trained start tolerates and random init does not (measured, 4000 / 1000
# images: 42.1% vs 24.2%; at lr 1e-3: 39.0% vs 40.2%). The arch, img size and patch size are the checkpoint's.
DEMO = dict(subset=4000, epochs=3, warmup_epochs=0, batch_size=64, lr=3e-3, mixup=0.0, cutmix=0.0, randaug=0,
            reprob=0.0, min_crop_scale=0.35, num_workers=1, log_every=20, save_every_steps=0)
DEMO_PROBE = dict(DEMO, lr=0.025)  # the probe's SGD: MAE's 0.1 per 256 images at batch 64
DEMO_TEST_IMAGES = 2000  # of Fashion-MNIST's test split


def get_args_parser():
    r50 = {k: '/'.join(dict.fromkeys(engine.show(r[k]) for r in RESNET.values())) for k in R50_100}  # the 3 columns
    recipes = {'Table 10 ViT-B': VIT_B, 'ViT-B from REVDET': dict(blr=VIT_B_REVDET['blr']),
               'ViT-S/Ti': dict(epochs=VIT_S['epochs']), 'Table 11 R50 100/300/600': r50, 'probe (MAE)': PROBE,
               'kNN (DINO)': KNN, 'demo': dict(DEMO, lr=f"{DEMO['lr']}, probe {DEMO_PROBE['lr']}")}
    p = engine.ArgumentParser(recipes=recipes, description="Fine-tuning, linear probing and kNN of CIM backbones. An "
                              "unset flag takes the demo's value, else its recipe's; an explicit flag always wins.")
    g = p.add_argument_group('data, model and mode')
    g.add_argument('--data', metavar='DIR', help='train/<class>/* and val/<class>/*; none: the Fashion-MNIST demo')
    g.add_argument('--subset', type=engine.POSITIVE, help='this many training images, drawn at random (seeded)')
    g.add_argument('--arch', choices=cim.ARCHS, help="default: the --init train.py checkpoint's, else vit_base")
    g.add_argument('--init', metavar='PATH', help="pre-trained weights (train.py checkpoint or --export, torchvision / "
                   "timm state dict) or 'none' (random init); required with --data; demo: " + engine.DEMO_CHECKPOINT)
    g.add_argument('--recipe', type=int, choices=sorted(RESNET), help='resnet50: Table 11 column (epochs); default 300')
    g.add_argument('--patch-size', type=engine.POSITIVE, help='ViT patch size')
    g.add_argument('--linear-probe', action='store_true', help='frozen backbone, BatchNorm1d + linear (MAE)')
    g.add_argument('--knn', action='store_true', help='evaluation only: kNN top-1 of the pooled features')
    g.add_argument('--knn-k', type=engine.POSITIVE, help='kNN: neighbours that vote')
    g.add_argument('--knn-t', type=float, help='kNN: vote temperature')
    g = p.add_argument_group('optimization')
    g.add_argument('--epochs', type=engine.POSITIVE, help='fine-tuning epochs')
    g.add_argument('--max-steps', type=engine.POSITIVE, help='optimizer steps, not --epochs (warmup: its share)')
    g.add_argument('--warmup-epochs', type=engine.NON_NEGATIVE, help='linear lr warmup, then cosine decay')
    g.add_argument('--batch-size', type=engine.POSITIVE, help='per GPU (process)')
    g.add_argument('--accum-iter', type=engine.POSITIVE, default=1, help='gradient accumulation steps')
    g.add_argument('--blr', type=float, help='peak lr at total batch --ref-batch, scaled linearly')
    g.add_argument('--ref-batch', type=engine.POSITIVE, help='the total batch --blr refers to')
    g.add_argument('--lr', type=float, help='absolute peak lr; default: from --blr')
    g.add_argument('--min-lr', type=float, help='end of the cosine decay')
    g.add_argument('--weight-decay', type=float, help='AdamW; none on biases, norms, embeddings')
    g.add_argument('--layer-decay', type=float, help='ViT layer-wise lr decay (BEiT layer ids); 1: off')
    g.add_argument('--betas', type=float, nargs=2, help='AdamW momentum (beta1, beta2)')
    g.add_argument('--clip-grad', type=float, help='global grad-norm clip (0: off)')
    g.add_argument('--drop-path', type=engine.PROBABILITY, help='stochastic depth at the last block')
    g.add_argument('--smoothing', type=engine.PROBABILITY, help='label smoothing')
    g.add_argument('--loss', choices=tuple(LOSSES), help='soft-target cross-entropy or binary cross-entropy (RSB)')
    g = p.add_argument_group('augmentation and resolution')
    g.add_argument('--mixup', type=engine.NON_NEGATIVE_FLOAT, help='mixup alpha (0: off)')
    g.add_argument('--cutmix', type=engine.NON_NEGATIVE_FLOAT, help='cutmix alpha (0: off)')
    g.add_argument('--randaug', type=engine.checked(int, lambda v: 0 <= v <= 10, 'in 0..10'),
                   help="RandAugment magnitude, 0-10 on timm's scale (0: off)")
    g.add_argument('--randaug-ops', type=engine.POSITIVE, help='RandAugment ops per image')
    g.add_argument('--randaug-mstd', type=float, help='RandAugment magnitude std')
    g.add_argument('--reprob', type=engine.PROBABILITY, help='random erasing probability')
    g.add_argument('--repeated-aug', type=engine.POSITIVE, help='copies per image (Berman et al. 2019); 1: off')
    g.add_argument('--img-size', type=engine.POSITIVE, help='training resolution')
    g.add_argument('--test-img-size', type=engine.POSITIVE, help='evaluation resolution (a ViT: equal to --img-size)')
    g.add_argument('--crop-ratio', type=engine.FRACTION, help='evaluation: resize to test-img-size / ratio, crop')
    g.add_argument('--min-crop-scale', type=engine.FRACTION, help='RandomResizedCrop scale (min, 1)')
    engine.add_common_args(p, 'default: out/ft_<arch>, out/probe_<arch>, out/knn_<arch>; demo: out/demo_ft')
    return p


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    demo = args.data is None
    rank, args.world_size, device = engine.init_distributed()
    args.init, meta = engine.resolve_init(args.init, demo)  # reads the weights file: a bad one is one line here
    taken = settle_args(args, demo, meta)
    mode = 'knn' if args.knn else 'probe' if args.linear_probe else 'ft'
    args.output_dir = args.output_dir or os.path.join('out', 'demo_ft' if demo else f'{mode}_{args.arch}')
    check_args(args)
    if engine.is_main():
        if demo:
            print(f'no --data: the built-in Fashion-MNIST demo (28 px gray -> 32 px RGB), {args.init} vs random init')
        print(f'recipe: {engine.flags(taken)}')
    if not demo:
        return run(args, rank, device)
    # the demo: the pre-trained checkpoint, then random init on the same schedule, side by side (--init none: one)
    results = {}
    for name, init, sub in (('pre-trained', args.init, 'pretrained'), ('random init', 'none', 'scratch')):
        if init != 'none' or name == 'random init':
            run_args = argparse.Namespace(**dict(vars(args), init=init, output_dir=os.path.join(args.output_dir, sub)))
            results[name] = run(run_args, rank, device)
    if engine.is_main():
        key, how = ('knn_acc1', 'kNN') if args.knn else ('acc1', f'{args.epochs} epochs')
        print(f"Fashion-MNIST test top-1, {args.arch}, {how} on {results['random init']['n_train']} training images: "
              + '  vs  '.join(f'{name} {r[key]:.2f}%' for name, r in results.items()))
    return results


def run(args, rank, device):
    """One fine-tuning, linear-probe or kNN run with the settled args -> its metrics."""
    dtype = engine.resolve_amp(args.amp, device)
    torch.backends.cudnn.benchmark = True  # fixed input sizes: let cuDNN pick its fastest convolutions

    # data: the folders are checked before anything is written
    train_set, clean_train_set, val_set, classes = build_data(args, args.data is None)
    args.num_classes = len(classes)
    val_loader = torch.utils.data.DataLoader(val_set, args.batch_size, num_workers=args.num_workers,
                                             sampler=engine.ShardSampler(len(val_set), args.world_size, rank),
                                             pin_memory=device.type == 'cuda')
    # clean training images in one seeded order on every rank: the BN statistics of frozen features (docstring)
    bn_loader = torch.utils.data.DataLoader(clean_train_set, args.batch_size, num_workers=args.num_workers,
                                            shuffle=True, generator=torch.Generator().manual_seed(args.seed))
    torch.manual_seed(args.seed)
    model = build_model(args, device)  # --init loaded: weights that do not fit fail here, before any folder exists
    if args.knn:
        return knn(model, clean_train_set, val_loader, bn_loader, args, rank, device, dtype)

    # training data: a seeded view per (epoch, index) for exact resume. Item r * N + i is copy r of image i, with a
    # seed of its own (repeated augmentation: R50 300 / 600; one copy: a plain shuffled epoch)
    dataset = engine.SeededDataset(torch.utils.data.ConcatDataset([train_set] * args.repeated_aug), args.seed)
    sampler = RepeatAugSampler(len(train_set), args.batch_size, args.world_size, rank, args.repeated_aug, args.seed)
    loader, steps_per_epoch = engine.train_loader(dataset, sampler, args.batch_size, args.accum_iter,
                                                  args.num_workers, args.seed, device)

    # the lr of every step: linear scaling from the recipe's batch, warmup, cosine decay (Tables 10-11)
    total_batch = args.batch_size * args.world_size * args.accum_iter
    peak_lr = args.lr or engine.scaled_lr(args.blr, total_batch, args.ref_batch)
    total_steps = args.max_steps or args.epochs * steps_per_epoch
    warmup_steps = round(total_steps * args.warmup_epochs / args.epochs)
    lrs = engine.cosine_schedule(peak_lr, args.min_lr, total_steps, warmup_steps)
    n_epochs = -(-total_steps // steps_per_epoch)
    mixer = make_mixer(args.mixup, args.cutmix, args.num_classes)
    resnet = args.arch == 'resnet50'
    if args.linear_probe:
        engine.recompute_bn_stats(model.backbone, bn_loader, device, dtype)  # the BN protocol (docstring)
    optimizer = build_optimizer(model, args, peak_lr)
    # fp16: dynamic loss scaling. bf16 / fp32: the scale stays 1 and the scaler does the other half of its job,
    # skipping a step whose gradients are not finite, on the device (no host sync)
    scaler = torch.amp.GradScaler(device.type, init_scale=2.0 ** 16 if dtype == torch.float16 else 1.0)

    # resume (the checkpoint holds every rank's RNG state), then the DDP wrap
    engine.seed_rank(args.seed, rank)  # from here on, mixing and stochastic depth differ across ranks
    log = dict(n_bad_images=0, skipped_steps=0, best_acc1=-1.0, best_epoch=0, last={})
    start_step = 0
    engine.lock_output_dir(args.output_dir)  # one live run per folder
    ckpt = args.resume or engine.find_checkpoint(args.output_dir)
    if ckpt:
        start_step = engine.load_training_state(ckpt, model, optimizer, scaler, args, rank, log, SAME_ARGS)[0]['step']
    raw_model = model  # the network itself: what is saved and evaluated
    if args.world_size > 1:
        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == 'cuda' else None)
    what = 'linear probe' if args.linear_probe else 'fine-tuning'
    if engine.is_main():
        bn = ', BN statistics of the frozen backbone re-estimated' if args.linear_probe and resnet else ''
        print(f'{what} {args.arch} from {args.init}: {len(train_set)} training / {len(val_set)} val images, '
              f'{args.num_classes} classes, {total_steps} steps ({steps_per_epoch} per epoch), batch {total_batch} = '
              f'{args.world_size} x {args.batch_size} x {args.accum_iter}, lr {peak_lr:.2e}, amp {dtype or "off"}{bn}')

    # ---- the loop: one optimizer step per iteration; logs every --log-every steps; validation each epoch ---------
    params = [p for p in raw_model.parameters() if p.requires_grad]
    tally = engine.Tally(('loss',), total_batch, device)  # the log interval's sums, on the device
    batches = engine.endless_batches(loader, start_step, steps_per_epoch, args.accum_iter)
    pbar = engine.progress(total=total_steps, initial=start_step, desc=what)
    model.train()
    for step in range(start_step, total_steps):
        # the lr is a list indexed by step, not a scheduler object: a resumed run needs nothing but the step count
        for g in optimizer.param_groups:
            g['lr'] = lrs[step] * g['lr_scale']  # warmup + cosine, times the group's layer decay (Table 10)
        host = [next(batches) for _ in range(args.accum_iter)]  # (imgs, labels, n_bad) per micro-batch
        micro_batches = [(x.to(device, non_blocking=True), y.to(device, non_blocking=True)) for x, y, _ in host]
        loss, norm = finetune_step(model, micro_batches, optimizer, scaler, params, LOSSES[args.loss], mixer, args,
                                   dtype)
        tally.add(loss.view(1), norm, sum(n_bad for _, _, n_bad in host))  # no host sync: on the device until the log
        pbar.update()

        # bookkeeping: every rank runs it in step (close() all-reduces, validation is sharded); rank 0 writes
        done = step + 1
        end_of_epoch = done % steps_per_epoch == 0 or done == total_steps
        saving = end_of_epoch or (args.save_every_steps and done % args.save_every_steps == 0)
        if done % args.log_every == 0 or saving:  # a checkpoint closes the interval, so a resume starts a new one
            # tally.close: the interval's one host sync
            record = dict(step=done, epoch=round(done / steps_per_epoch, 3), lr=lrs[step], **tally.close(log))
            if engine.is_main():
                engine.log_jsonl(os.path.join(args.output_dir, 'log.jsonl'), record)
                pbar.write(f"step {done}/{total_steps}: loss {record['loss']:.4f}, grad norm "
                           f"{record['grad_norm']:.3f}, lr {record['lr']:.2e}, {record['imgs_per_s']:.1f} img/s")
            tally.check(args.max_bad_steps, done, args.output_dir)  # after the log line
        if end_of_epoch:  # validate before the save: a resumed run does not redo it
            epoch = -(-done // steps_per_epoch)
            m = validate(raw_model, val_loader, device, dtype)
            log['last'] = dict(epoch=epoch, step=done, **m)
            if m['acc1'] > log['best_acc1']:
                log.update(best_acc1=m['acc1'], best_epoch=epoch)
                # the weights alone, no optimizer: what a user evaluates or transfers
                if engine.is_main():
                    engine.atomic_save(dict(model=raw_model.state_dict(), args=vars(args), **log['last']),
                                       os.path.join(args.output_dir, 'checkpoint-best.pth'))
            if engine.is_main():
                engine.log_jsonl(os.path.join(args.output_dir, 'log.jsonl'), log['last'])
                pbar.write(f"epoch {epoch}/{n_epochs}: val top-1 {m['acc1']:.2f}%  top-5 {m['acc5']:.2f}%  loss "
                           f"{m['val_loss']:.4f}  (best top-1 {log['best_acc1']:.2f}% at epoch {log['best_epoch']})")
            model.train()  # validate() left the network in eval mode (BatchNorm statistics, no drop path)
            tally.t0 = time.time()  # img/s of the training steps alone, without the validation
        if saving:
            engine.save_training_state(raw_model, optimizer, scaler, args, log, step=done)
    pbar.close()  # the last epoch's line has the last and the best accuracy
    return dict(log['last'], best_acc1=log['best_acc1'], best_epoch=log['best_epoch'], n_train=len(train_set))


def finetune_step(model, micro_batches, optimizer, scaler, params, criterion, mixer, args, dtype):
    """One optimizer step of fine-tuning or the linear probe (Tables 10-11) -> (the micro-batch mean loss [0-dim],
    the global grad norm [0-dim] fp64, inf / NaN when the step was skipped), on the device, no host sync.

    micro_batches: (imgs [B, 3, S, S], labels [B]) per micro-batch, on the device; model: the network or its DDP
    wrapper; criterion: a LOSSES entry. Mixup / CutMix and label smoothing make the targets; gradients are
    all-reduced on the last micro-batch only."""
    ddp = isinstance(model, DistributedDataParallel)
    step_loss = 0.0
    # ResNet-50: no input conversion to channels_last here: ATen's convolution computes in channels_last whenever its
    # weight is (cim.build_enhancer's), copying an NCHW input with .contiguous(channels_last) itself: the same kernel
    for i, (imgs, labels) in enumerate(micro_batches):
        imgs, targets = mix_targets(imgs, labels, mixer, args.num_classes, args.smoothing)
        with model.no_sync() if ddp and i < len(micro_batches) - 1 else contextlib.nullcontext():
            with torch.autocast(imgs.device.type, dtype=dtype, enabled=dtype is not None):
                logits = model(imgs)
            loss = criterion(logits.float(), targets)  # in fp32, outside autocast
            scaler.scale(loss / len(micro_batches)).backward()  # fp16: scaled against underflow
        step_loss = step_loss + loss.detach() / len(micro_batches)
    scaler.unscale_(optimizer)  # true gradients for the norm and the clip; finds inf / NaN
    norm = engine.grad_norm(params)  # fp64: finite exactly when every gradient is
    if args.clip_grad:  # in the gradients' dtype: CUDA's multi-tensor multiply needs its scalar to match
        torch.nn.utils.clip_grads_with_norm_(params, args.clip_grad, norm.to(params[0].dtype))
    scaler.step(optimizer)  # skipped when a gradient is inf / NaN (a device-side check: fused optimizers)
    scaler.update(None if dtype == torch.float16 else 1.0)  # bf16 / fp32: the scale stays 1
    optimizer.zero_grad(set_to_none=True)
    return step_loss, norm


# ------------------------------------------------------------------------------------------------------------------
# Settings: the one override rule, and the user mistakes that would otherwise surface deep inside torch

def settle_args(args, demo, meta):
    """Fills the flags left unset (None), in order: the model (the --init checkpoint's arch, else vit_base; the demo:
    the checkpoint's arch, img size and patch size), the demo's scale, then the recipe of the mode and arch. An
    explicit flag always wins. meta: the pre-training run's args ({} unless --init is a train.py checkpoint).
    -> {name: value} taken, to print (--knn: only what kNN reads)."""
    taken = {}

    def apply(values):
        taken.update(engine.apply_recipe(args, {k: v for k, v in values.items() if not args.knn or k in KNN_SETTINGS}))
    size = meta.get('img_size', 32)  # train.py's demo: vit_tiny, 32 px, patch 4
    apply(dict(arch=meta.get('arch', 'vit_tiny'), img_size=size, test_img_size=size,
               patch_size=meta.get('patch_size', 4)) if demo else dict(arch=meta.get('arch', 'vit_base')))
    if demo:
        apply(DEMO_PROBE if args.linear_probe else DEMO)
    if args.knn or args.linear_probe:
        apply(KNN if args.knn else PROBE)
    elif args.arch == 'resnet50':
        apply(RESNET[args.recipe or 300])
    else:  # Table 10: ViT-B's lr depends on the pre-training task; ViT-S (and Ti) train longer
        apply(VIT_S if args.arch != 'vit_base' else VIT_B_REVDET if meta.get('task') == 'revdet' else VIT_B)
    return taken


def check_args(args):
    """User mistakes the flags' own types cannot see (they involve two flags): one clear line each."""
    if args.knn and args.linear_probe:
        raise engine.UserError('--knn and --linear-probe are separate modes; pick one')
    if args.recipe is not None and (args.arch != 'resnet50' or args.knn or args.linear_probe):
        raise engine.UserError('--recipe selects a Table 11 column: resnet50 fine-tuning only (a ViT uses Table 10)')
    if args.arch in cim.VIT_CONFIGS and args.test_img_size % args.patch_size:
        raise engine.UserError(f'--patch-size {args.patch_size} must divide --test-img-size {args.test_img_size}')
    if not args.knn and not args.warmup_epochs <= args.epochs:
        raise engine.UserError(f'--warmup-epochs {args.warmup_epochs} must be between 0 and --epochs {args.epochs}')
    if not args.knn and args.arch in cim.VIT_CONFIGS and args.test_img_size != args.img_size:
        raise engine.UserError(f'--test-img-size must equal --img-size {args.img_size} (a ViT: position embeddings)')


# ------------------------------------------------------------------------------------------------------------------
# Data: the training and evaluation views, repeated augmentation; the demo's Fashion-MNIST

class RandAugment(v2.RandAugment):
    """timm's 'rand-m{M}-mstd{S}' with torchvision's operations: 2 ops per image at magnitude M on timm's 0-10 scale
    (torchvision bins of 0.1 up to 10, so M = 10 is each op's maximum), M drawn per image from N(M, S) clipped to
    [0, 10] (timm draws per op). Severity increases with M for every op, as timm's 'inc1'."""

    def __init__(self, num_ops, magnitude, mstd, fill):
        super().__init__(num_ops=num_ops, num_magnitude_bins=101, fill=fill, interpolation=InterpolationMode.BICUBIC)
        self.mean_magnitude = magnitude
        self.mstd = mstd

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
    """Tables 10-11's test view: PIL image -> [3, size, size] normalized; the short side resized to
    size / crop_ratio (bicubic), then a center crop of size."""
    return v2.Compose([v2.Resize(int(size / crop_ratio), interpolation=InterpolationMode.BICUBIC),
                       v2.CenterCrop(size), v2.ToImage(), v2.ToDtype(torch.float32, scale=True),
                       v2.Normalize(list(mean), list(std)), v2.ToPureTensor()])


def build_data(args, demo):
    """-> (training set with the training view, the same images with the evaluation view, val set, class names);
    items (image [3, S, S], label, n_bad). --subset draws the training images (engine.subset: seeded, so both views
    hold the same ones). --knn: the training set has the evaluation view too. Demo: Fashion-MNIST (28 px + 2 px
    black border = 32 px), its first DEMO_TEST_IMAGES test images."""
    val_tf = eval_transform(args.test_img_size, args.crop_ratio)
    train_tf = val_tf if args.knn else train_transform(args.img_size, args.min_crop_scale, args.randaug,
                                                       args.randaug_ops, args.randaug_mstd, args.reprob)
    if demo:
        train = engine.TensorImages(*engine.fashion_mnist(train=True), train_tf, pad=2)
        val = engine.TensorImages(*(t[:DEMO_TEST_IMAGES] for t in engine.fashion_mnist(train=False)), val_tf, pad=2)
        classes = engine.FASHION_MNIST_CLASSES
    else:
        train, val, classes = image_folders(args.data, train_tf, val_tf)
    clean = copy.copy(train)  # the same files, the evaluation view
    clean.transform = val_tf
    return engine.subset(train, args.subset, args.seed), engine.subset(clean, args.subset, args.seed), val, classes


def image_folders(root, train_tf, val_tf):
    """root/train and root/val ImageFolders with the same classes -> (train, val, class names). Both folders are
    checked before either is listed (listing ImageNet's train/ takes a while)."""
    paths = [os.path.join(root, split) for split in ('train', 'val')]
    for path in paths:
        if not os.path.isdir(path):
            raise engine.UserError(f"'{path}' does not exist: --data must hold train/<class>/* and val/<class>/*")
    train = engine.ImageFiles(paths[0], train_tf)
    val = engine.ImageFiles(paths[1], val_tf)
    for path, ds in zip(paths, (train, val)):
        if not ds.classes:
            raise engine.UserError(f"'{path}' holds images but no class folders (ImageNet val: see valprep.sh)")
    if train.classes != val.classes:
        raise engine.UserError(f"train/ and val/ under '{root}' have different class folders")
    return train, val, train.classes


class RepeatAugSampler(engine.ResumableSampler):
    """Repeated augmentation (Hoffer et al. 2020; Berman et al. 2019; DeiT's RASampler), resumable.

    Each epoch draws num_images // repeats images (rounded down to a multiple of the number of ranks), so an epoch
    keeps about the dataset's length, as in DeiT / timm. Each image appears `repeats` times, as indices into
    `repeats` concatenated copies of the dataset (copy r of image i is r * N + i); consecutive copies go to
    consecutive ranks, so the copies land on different ranks in the same step (when repeats <= ranks) and every rank
    gets the same count. repeats = 1 is engine.ResumableSampler's order exactly (the same seeded permutation, cut
    to a multiple of the ranks, rank r taking every W-th index). set_epoch(epoch, start_batch), len(): inherited.
    """

    def __init__(self, num_images, batch_size, num_replicas=1, rank=0, repeats=3, seed=0):
        super().__init__(range(num_images * repeats), batch_size, num_replicas, rank, seed=seed)
        self.repeats = repeats
        self.num_unique = num_images // repeats // num_replicas * num_replicas
        self.num_samples = self.num_unique * repeats // num_replicas  # per rank (engine.train_loader: too few)

    def __iter__(self):
        n = len(self.dataset) // self.repeats
        images = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed + self.epoch))[:self.num_unique]
        copies = images.repeat_interleave(self.repeats) + torch.arange(self.repeats).repeat(self.num_unique) * n
        return iter(copies[self.rank::self.num_replicas][self.start_batch * self.batch_size:].tolist())


# ------------------------------------------------------------------------------------------------------------------
# Models: the classifier on the backbone, and the linear probe

def build_model(args, device):
    """The network of this mode, with --init loaded: a classifier (fine-tuning), a LinearProbe, or the bare backbone
    (kNN). Weights that do not fit raise a one-line UserError. The frozen backbone is built at the evaluation
    resolution (a probe's ViT: equal to the training one, check_args)."""
    if args.knn or args.linear_probe:
        model = cim.build_enhancer(args.arch, args.test_img_size, args.patch_size)
    else:
        model = build_classifier(args.arch, args.num_classes, args.img_size, args.patch_size, args.drop_path)
    if args.init != 'none':
        engine.load_pretrained(model, engine.read_weights(args.init)[0], f"'{args.init}'")
    if args.linear_probe:
        model = LinearProbe(model, args.num_classes)
    return model.to(device)


def build_optimizer(model, args, lr):
    """Fine-tuning: AdamW with BEiT's layer-wise lr decay for a ViT (Table 10), no weight decay on norms, biases and
    embeddings. The probe: LARS (MAE's) is not in torch; for one linear layer, SGD + momentum (MoCo v3, DINO).
    Both fused: GradScaler then skips a non-finite step on the device (unfused, it reads found_inf on the host)."""
    if args.linear_probe:
        return torch.optim.SGD(engine.param_groups(model, args.weight_decay), lr=lr, momentum=0.9, fused=True)
    decay = engine.layer_decay(len(model.blocks), args.layer_decay) if cim.is_vit(model) else None
    groups = engine.param_groups(model, args.weight_decay, cim.NO_WEIGHT_DECAY_KEYS, decay)
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(args.betas), fused=True)


def build_classifier(arch, num_classes, img_size=224, patch_size=16, drop_path=0.0):
    """The backbone (cim.build_enhancer) with a fresh num_classes classifier and stochastic depth (ViT: cim.Block's;
    ResNet-50: engine.add_stochastic_depth's hooks). imgs [B, 3, img_size, img_size] -> logits [B, num_classes].

    ViT: logits = head(mean of the patch tokens after the final norm) (cim.VisionTransformer.forward; timm's
    global_pool='avg', fc_norm=False, so the names are timm's). Why not the cls token: CIM's losses read only the
    patch tokens (Sec. 2.2), so the cls token is never trained to summarize the image, and BEiT / MAE fine-tune with
    mean pooling too. Unlike BEiT's fc_norm (a fresh LayerNorm after pooling), the pre-trained final norm is kept:
    every pre-trained weight is used and only the head is new. The head starts near zero (std 2e-5, MAE / BEiT).
    ResNet-50: torchvision's, `fc` (default init) on the global average pool.
    """
    model = cim.build_enhancer(arch, img_size, patch_size, drop_path=drop_path)
    if cim.is_vit(model):
        model.head = nn.Linear(model.embed_dim, num_classes)
        nn.init.trunc_normal_(model.head.weight, std=2e-5)
        nn.init.zeros_(model.head.bias)
        return model
    model.fc = nn.Linear(2048, num_classes)
    return engine.add_stochastic_depth(model, drop_path)


class LinearProbe(nn.Module):
    """MAE's linear probe: the frozen backbone's pooled features (cim.pooled_features, [B, D]) -> BatchNorm1d without
    affine parameters (it only standardizes the features) -> Linear -> [B, num_classes]. The backbone runs in eval
    mode (set at each call, so that model.train() never reaches its BatchNorm), without gradients."""

    def __init__(self, backbone, num_classes):
        super().__init__()
        dim = backbone.embed_dim if cim.is_vit(backbone) else 2048
        self.backbone = backbone.requires_grad_(False).eval()
        self.head = nn.Sequential(nn.BatchNorm1d(dim, affine=False, eps=1e-6), nn.Linear(dim, num_classes))
        nn.init.trunc_normal_(self.head[1].weight, std=0.01)
        nn.init.zeros_(self.head[1].bias)

    def forward(self, imgs):
        """imgs: [B, 3, H, W] -> [B, num_classes]."""
        with torch.no_grad():
            feats = cim.pooled_features(self.backbone.eval(), imgs)
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


# (logits [B, C] fp32, targets [B, C] rows of class weights) -> mean loss []. 'ce': cross-entropy against the soft
# (mixed, smoothed) targets, mean over the batch (Table 10; torch's F.cross_entropy takes class probabilities).
# 'bce': RSB's (Table 11), every class an independent sigmoid against its target weight, mean over the B x C entries
# (timm's BinaryCrossEntropy).
LOSSES = {'ce': F.cross_entropy, 'bce': F.binary_cross_entropy_with_logits}


# ------------------------------------------------------------------------------------------------------------------
# Evaluation: top-1 / top-5 on the validation set, kNN

def validate(model, loader, device, dtype):
    """Top-1 / top-5 accuracy (%) and CE loss on the whole validation set (all ranks) -> dict; leaves eval mode."""
    def sums(imgs, labels):  # per batch: top-1 / top-5 hits, images, CE loss sum (engine.evaluate adds them up)
        logits = model(imgs).float()
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices == labels[:, None]
        return dict(n=len(labels), top1=top[:, 0].sum(), top5=top.any(1).sum(),
                    loss=F.cross_entropy(logits, labels, reduction='sum'))
    model.eval()
    s = engine.evaluate(sums, loader, device, dtype, desc='val')
    n = float(s['n'])
    return dict(acc1=100 * float(s['top1']) / n, acc5=100 * float(s['top5']) / n, val_loss=float(s['loss']) / n,
                n_val=int(n))


def knn(backbone, train_set, val_loader, bn_loader, args, rank, device, dtype):
    """--knn: kNN top-1 (%) of the pooled features (cosine, DINO's weighted vote) on the validation set, the clean
    training images as neighbours, BN statistics re-estimated on bn_loader first (docstring). Every rank embeds its
    shard of both sets, gathers all training features and classifies its validation shard; the counts are summed
    over ranks. -> dict(knn_acc1, n_train); logged to OUTPUT_DIR/log.jsonl."""
    train_loader = torch.utils.data.DataLoader(train_set, args.batch_size, num_workers=args.num_workers,
                                               sampler=engine.ShardSampler(len(train_set), args.world_size, rank))
    engine.recompute_bn_stats(backbone, bn_loader, device, dtype)
    feats = functools.partial(cim.pooled_features, backbone)
    train_feats, train_labels = engine.extract_features(feats, train_loader, device, dtype)
    val_feats, val_labels = engine.extract_features(feats, val_loader, device, dtype)
    if dist.is_initialized():  # every rank's training features: the shards padded to the largest, gathered, trimmed
        rows = -(-len(train_set) // args.world_size)  # engine.ShardSampler's shards differ by one image at most
        gathered = torch.empty(args.world_size * rows, train_feats.shape[1], device=device)
        labels = torch.empty(args.world_size * rows, dtype=torch.long, device=device)
        dist.all_gather_into_tensor(gathered, F.pad(train_feats, (0, 0, 0, rows - len(train_feats))).to(device))
        dist.all_gather_into_tensor(labels, F.pad(train_labels, (0, rows - len(train_labels)), value=-1).to(device))
        train_feats = gathered[labels >= 0]  # padding rows: label -1
        train_labels = labels[labels >= 0]
    acc = engine.knn_accuracy(train_feats.to(device), train_labels, val_feats.to(device), val_labels, k=args.knn_k,
                              T=args.knn_t)
    # [correct, images] of this rank's validation shard, summed over ranks
    counts = engine.sum_over_ranks(torch.tensor([acc, 1.0], dtype=torch.float64, device=device) * len(val_feats))
    acc = 100 * float(counts[0] / counts[1])
    os.makedirs(args.output_dir, exist_ok=True)
    if engine.is_main():
        bn = '; BN statistics re-estimated on clean training images first' if args.arch == 'resnet50' else ''
        print(f'kNN (k={args.knn_k}, T={args.knn_t}) top-1 of {args.arch} from {args.init}: {acc:.2f}% '
              f'({len(train_set)} training images as neighbours, {int(counts[1])} val images{bn})')
        engine.log_jsonl(os.path.join(args.output_dir, 'log.jsonl'), dict(knn_acc1=acc, init=args.init))
    return dict(knn_acc1=acc, n_train=len(train_set))


SAME_ARGS = ('arch', 'linear_probe', 'num_classes', 'img_size', 'patch_size', 'subset', 'batch_size', 'accum_iter',
             'world_size', 'repeated_aug')  # what a resumed run must share with its checkpoint


if __name__ == '__main__':
    engine.run_cli(main)
