"""Where the time of one CIM step goes, and how close it comes to the device's peak (synthetic data).

    python bench.py --arch vit_base --task respix                  # GPU: batch 128, a random full-size DALL-E dVAE
    python bench.py --arch resnet50 --task revdet --compile        # torch.compile'd networks, the step eager
    python bench.py --arch vit_base --batch-size 8 --amp none      # CPU: the CIM / enhancer-only time vs FLOP check
    python bench.py --loader-only --num-workers 8                  # the data loader alone

Prints the device's dense matmul peak (bf16, measured here with a large matmul), then for one CIM training step:
img/s, TFLOP/s, share of that peak, the time split (tokenizer encode, generator fwd+bwd, sample + decode, enhancer
fwd+bwd, optimizer), peak memory, and the same for the enhancer alone on clean images (what CIM costs on top); on a
GPU, the host syncs inside one step (torch.cuda.set_sync_debug_mode).
The step is train.py's: autocast forward, backward, unscale, fp64 grad norm, clip, fused AdamW step. Then the cost
of predicting all N tokens in the generator instead of the masked ones only, and the data loader: training images
decoded and transformed per second by one worker on ImageNet-sized JPEGs, and the workers one GPU needs.
"""
import math
import os
import resource
import tempfile
import time
import warnings

import numpy as np
import torch
from PIL import Image

import cim
import dvae
import engine
import train


def get_args_parser():
    p = engine.ArgumentParser(description=__doc__)
    p.add_argument('--arch', default='vit_base', choices=cim.ARCHS)
    p.add_argument('--task', default='respix', choices=cim.TASKS)
    p.add_argument('--img-size', type=engine.POSITIVE, default=224)
    p.add_argument('--patch-size', type=engine.POSITIVE, default=16)
    p.add_argument('--batch-size', type=engine.POSITIVE, help='default: 128 on a GPU, 8 on the CPU')
    p.add_argument('--tokenizer', metavar='PATH', help='default: a randomly initialized full-size DALL-E dVAE (the '
                                                       'same compute as the real one)')
    p.add_argument('--mask-type', default='random', choices=cim.MASK_TYPES)
    p.add_argument('--amp', choices=('bf16', 'fp16', 'none'), help='default: bf16 on a GPU, none on a CPU')
    p.add_argument('--compile', action='store_true', help='torch.compile the tokenizer, generator and enhancer')
    p.add_argument('--steps', type=engine.POSITIVE, help='timed steps per measurement; default: 20 on a GPU, 3 on '
                                                         'the CPU')
    p.add_argument('--num-workers', type=int, default=8, help='data loader processes per GPU (train.py: 8)')
    p.add_argument('--loader-images', type=engine.POSITIVE, default=64, help='JPEGs generated for the loader')
    p.add_argument('--no-loader', action='store_true', help='skip the data loader measurement')
    p.add_argument('--loader-only', action='store_true', help='only the data loader measurement')
    p.add_argument('--seed', type=int, default=0)
    return p


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    cuda = device.type == 'cuda'
    args.batch_size = args.batch_size or (128 if cuda else 8)
    args.steps = args.steps or (20 if cuda else 3)
    if args.img_size % args.patch_size:
        raise engine.UserError(f'--img-size {args.img_size} is not divisible by --patch-size {args.patch_size}')
    dtype = engine.resolve_amp(args.amp, device)
    torch.backends.cudnn.benchmark = True  # as in training (and, as there, torch's default TF32 settings)
    where = torch.cuda.get_device_name() if cuda else f'CPU, {torch.get_num_threads()} threads'
    torch.manual_seed(args.seed)
    if args.tokenizer:
        tokenizer = dvae.load_tokenizer(args.tokenizer)
    else:
        tokenizer = dvae.Tokenizer()  # DALL-E's configuration, random weights
    tok_size = args.img_size // args.patch_size * tokenizer.downsample
    compiled = ', compiled' if args.compile else ''
    print(f'benchmark: {args.arch} {args.task}, {args.img_size} px (tokenizer view {tok_size} px), batch '
          f'{args.batch_size}, amp {dtype or "off"}{compiled}, {where}, torch {torch.__version__}')
    print(f'tokenizer: {args.tokenizer or "a full-size DALL-E dVAE with random weights (the same compute)"}')
    step_imgs_per_s = None
    if not args.loader_only:
        peak = matmul_peak(device, torch.bfloat16)
        print(f'dense bf16 matmul peak, measured: {peak / 1e12:.2f} TFLOP/s')
        if dtype != torch.bfloat16:  # the share of peak is taken against the peak of the dtype the step runs in
            run_dtype = dtype or torch.float32
            peak = matmul_peak(device, run_dtype)
            print(f'dense {str(run_dtype)[6:]} matmul peak, measured: {peak / 1e12:.2f} TFLOP/s (this run\'s '
                  f'reference)')
        step_imgs_per_s = benchmark_step(args, tokenizer, device, dtype, peak)
    if not args.no_loader:
        benchmark_loader(args, tok_size, step_imgs_per_s)


# ------------------------------------------------------------------------------------------------------------------
# The device's peak

@torch.no_grad()
def matmul_peak(device, dtype, n=None, seconds=1.0):
    """Dense matmul FLOP/s of this device: a large square matmul (8192 on a GPU, 1024 on the CPU) repeated for about
    `seconds` after a warm-up. The reference for 'share of peak' (2 n^3 FLOPs per matmul)."""
    cuda = device.type == 'cuda'
    n = n or (8192 if cuda else 1024)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b  # warm-up: kernel selection, allocation
    sync(device)
    t0 = time.perf_counter()
    reps = 0
    while reps == 0 or time.perf_counter() - t0 < seconds:
        for _ in range(10 if cuda else 1):  # a GPU runs them queued; a CPU without bf16 takes seconds for one
            a @ b
            reps += 1
        sync(device)
    return 2 * n ** 3 * reps / (time.perf_counter() - t0)


def sync(device):
    if device.type == 'cuda':
        torch.cuda.synchronize()


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


# ------------------------------------------------------------------------------------------------------------------
# One CIM step, timed whole (throughput) and stage by stage (the split), against the enhancer alone

def benchmark_step(args, tokenizer, device, dtype, peak):
    """Prints throughput, TFLOP/s, share of peak, time split and memory of a CIM step and of an enhancer-only step
    -> CIM images/s."""
    cuda = device.type == 'cuda'
    model = cim.CIM(tokenizer, args.arch, args.task, args.img_size, args.patch_size,
                    mask_type=args.mask_type).to(device)
    B = args.batch_size
    imgs = torch.randn(B, 3, args.img_size, args.img_size, device=device)
    tok_size = model.grid * tokenizer.downsample
    tok_imgs = torch.rand(B, 3, tok_size, tok_size, device=device)
    scaler = torch.amp.GradScaler(device.type, init_scale=2.0 ** 16 if dtype == torch.float16 else 1.0)

    def autocast():
        return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)

    # train.py's own step. Block masks are made beforehand, as train.py's loader workers do; random ones on the device
    views = [imgs, tok_imgs] + ([model.make_mask(B, device)] if args.mask_type == 'block' else [])
    enhancer_only = EnhancerOnly(model)

    def cim_step():
        train.train_step(model, [views], cim_opt, scaler, cim_params, ('loss',), 3.0, dtype)

    def enhancer_step():
        train.train_step(enhancer_only, [[imgs]], enh_opt, scaler, enh_params, ('loss',), 3.0, dtype)

    cim_params = [p for p in model.parameters() if p.requires_grad]
    enh_params = list(model.enhancer.parameters()) + list(model.head.parameters())
    cim_opt = torch.optim.AdamW(engine.param_groups(model, 0.05, cim.NO_WEIGHT_DECAY_KEYS), lr=1e-4, fused=True)
    enh_opt = torch.optim.AdamW(enh_params, lr=1e-4, fused=True)
    flops = {'enhancer only': count_flops(enhancer_step), 'CIM': count_flops(cim_step)}  # eager: by op shapes
    if args.compile:
        model.compile()
    runs = {}
    for name, step in (('enhancer only', enhancer_step), ('CIM', cim_step)):
        for _ in range(3 if cuda or args.compile else 1):  # warm-up: allocator, cuDNN autotuning, compilation
            step()
        sync(device)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        for _ in range(args.steps):  # not synchronized in between, as in training
            step()
        sync(device)
        seconds = (time.perf_counter() - t0) / args.steps
        if cuda:
            memory = torch.cuda.max_memory_allocated()
        else:
            memory = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # the process's peak, in bytes
        runs[name] = dict(seconds=seconds, flops=flops[name], memory=memory)
    split = time_split(model, views, scaler, autocast, cim_opt, cim_params, dtype, device, args.steps)

    for name, r in runs.items():
        print(f"{name:>13}: {r['seconds'] * 1e3:9.1f} ms/step {B / r['seconds']:9.1f} img/s "
              f"{r['flops'] / B / 1e9:7.1f} GFLOP/img {r['flops'] / r['seconds'] / 1e12:8.3f} TFLOP/s "
              f"{100 * r['flops'] / r['seconds'] / peak:5.1f}% of peak, peak "
              f"{'GPU memory' if cuda else 'process RSS'} {r['memory'] / 2 ** 30:.2f} GiB")
    total = sum(split.values())
    print('CIM step time split (synchronized stages): ' +
          ', '.join(f'{k} {100 * v / total:.1f}%' for k, v in split.items()))
    t_ratio = runs['CIM']['seconds'] / runs['enhancer only']['seconds']
    f_ratio = runs['CIM']['flops'] / runs['enhancer only']['flops']
    print(f'CIM / enhancer-only: time ratio {t_ratio:.2f}x, FLOP ratio {f_ratio:.2f}x (time/FLOP ratio '
          f'{t_ratio / f_ratio:.2f}; 1.0 = the extra work runs as fast as the enhancer)')
    if cuda:  # a host sync inside the step stalls the GPU's queue
        where = host_syncs(cim_step)
        print(f"host syncs in one CIM step: {len(where)}{' at ' + ', '.join(sorted(set(where))) if where else ''}")
    all_positions_cost(model, B, device, autocast, runs['CIM']['seconds'], args.steps)
    return B / runs['CIM']['seconds']


class EnhancerOnly(torch.nn.Module):
    """The CIM's enhancer and head on the clean image with a stand-in loss: what the enhancer costs alone."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, imgs):
        feats = self.model.feature_map(self.model.enhancer, imgs)  # compiled with the CIM under --compile
        return {'loss': self.model.head(feats).float().square().mean()}


def host_syncs(step):
    """Runs step() in CUDA's sync debug mode, which warns at each host sync -> ['file.py:line', ...], one per sync
    (the step's other warnings are not syncs, and are not counted)."""
    torch.cuda.set_sync_debug_mode('warn')
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter('always')
            step()
    finally:
        torch.cuda.set_sync_debug_mode('default')
    return [f'{os.path.basename(w.filename)}:{w.lineno}' for w in caught if 'synchronizing' in str(w.message)]


def time_split(model, views, scaler, autocast, optimizer, params, dtype, device, steps):
    """Seconds per step of each stage, called one by one through CIM's own stage methods and synchronized after
    each: the generator's and the enhancer's graphs are disjoint, so two backward calls give the gradients of one
    backward of their sum. The optimizer stage is train.train_step's tail. -> {stage: seconds}."""
    names = ('tokenizer encode', 'generator fwd+bwd', 'sample + decode', 'enhancer fwd+bwd', 'optimizer')
    times = dict.fromkeys(names, 0.0)
    imgs, tok_imgs = views[:2]
    for _ in range(steps):
        mask = views[2] if len(views) > 2 else model.make_mask(imgs.shape[0], imgs.device)
        marks = [time.perf_counter()]
        with autocast():
            golden = model.tokenize(tok_imgs)
        sync(device)
        marks.append(time.perf_counter())
        with autocast():
            logits, gen_loss, _ = model.generate(imgs, mask, golden)
        scaler.scale(gen_loss).backward()
        sync(device)
        marks.append(time.perf_counter())
        with autocast():
            _, replaced, corrupted_imgs = model.corrupt(golden, mask, logits)
        sync(device)
        marks.append(time.perf_counter())
        with autocast():
            enh_loss = model.enhance(corrupted_imgs, imgs, replaced)[2]
        scaler.scale(model.enhancer_weight * enh_loss).backward()
        sync(device)
        marks.append(time.perf_counter())
        scaler.unscale_(optimizer)  # train.train_step's tail, as there
        torch.nn.utils.clip_grads_with_norm_(params, 3.0, engine.grad_norm(params).to(params[0].dtype))
        scaler.step(optimizer)
        scaler.update(None if dtype == torch.float16 else 1.0)
        optimizer.zero_grad(set_to_none=True)
        sync(device)
        marks.append(time.perf_counter())
        for name, a, b in zip(names, marks, marks[1:]):
            times[name] += (b - a) / steps
    return times


def all_positions_cost(model, B, device, autocast, step_seconds, steps):
    """The generator head, MIM loss and softmax sampling on all N positions (what cim.py does) against the k_max
    masked ones only (the gather it saves), on the same random features. Prints the difference as a share of the
    CIM step."""
    gen = model.generator
    V = gen.head.out_features
    seconds = {}
    for n in (model.num_patches, model.k_max):
        x = torch.randn(B, n, gen.head.in_features, device=device, requires_grad=True)
        golden = torch.randint(V, (B, n), device=device)
        mask = torch.ones(B, n, dtype=torch.bool, device=device)
        for i in range(steps + 1):  # the first is a warm-up
            sync(device)
            t0 = time.perf_counter()
            with autocast():
                logits = gen.head(gen.norm(x))
                loss = cim.mim_loss(logits, golden, mask)[0]
            loss.backward()
            cim.sample_tokens(logits.detach())
            sync(device)
            if i:
                seconds[n] = seconds.get(n, 0.0) + (time.perf_counter() - t0) / steps
        gen.zero_grad(set_to_none=True)
    extra = seconds[model.num_patches] - seconds[model.k_max]
    print(f'generator head + MIM loss + sampling on all {model.num_patches} positions: '
          f'{seconds[model.num_patches] * 1e3:.1f} ms, on the {model.k_max} masked at most: '
          f'{seconds[model.k_max] * 1e3:.1f} ms; predicting all positions costs {100 * extra / step_seconds:.1f}% '
          f'of the CIM step')


# ------------------------------------------------------------------------------------------------------------------
# The data loader: decode + train.py's two-view transform, per worker

def benchmark_loader(args, tok_size, step_imgs_per_s):
    """Times train.py's training transform (JPEG decode, flip, one RandomResizedCrop at two resolutions) in one
    process on generated ImageNet-sized JPEGs (about 500 x 375, smooth content plus noise); prints images/s per
    worker and, given the measured step rate, the workers one GPU needs."""
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as d:
        for i in range(args.loader_images):
            w = int(rng.integers(400, 600))
            h = int(rng.integers(300, 450))
            yy, xx = np.mgrid[0:h, 0:w]
            base = np.stack([np.sin(xx / rng.uniform(20, 80) + c) * np.cos(yy / rng.uniform(20, 80)) for c in range(3)],
                            axis=-1)
            px = np.clip(127 + 100 * base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
            Image.fromarray(px).save(os.path.join(d, f'{i:04d}.jpg'), quality=90)
        grid = args.img_size // args.patch_size
        transform = train.TwoViews(args.img_size, tok_size, 0.08)
        dataset = engine.SeededDataset(engine.ImageFiles(d, transform))
        dataset[0]  # warm-up
        t0 = time.perf_counter()
        for i in range(len(dataset)):
            dataset[i]
        per_worker = len(dataset) / (time.perf_counter() - t0)
    print(f'data loader: {per_worker:.1f} img/s per worker process (JPEG decode + flip + RandomResizedCrop to '
          f'{args.img_size} px bicubic and {tok_size} px Lanczos; {grid}x{grid} tokens)')
    if step_imgs_per_s:
        need = math.ceil(step_imgs_per_s / per_worker)
        print(f'at {step_imgs_per_s:.1f} img/s per device the loader needs >= {need} workers per device '
              f'(--num-workers {args.num_workers}: {"enough" if args.num_workers >= need else "too few"})')


if __name__ == '__main__':
    engine.run_cli(main)
