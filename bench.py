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
import warnings

import numpy as np
import torch
from PIL import Image
from torch.utils.benchmark import Timer, timer  # timer(): perf_counter after synchronizing the accelerator, if any

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
    p.add_argument('--tokenizer', metavar='PATH', help='default: full-size DALL-E dVAE, random weights (same compute)')
    p.add_argument('--mask-type', default='random', choices=cim.MASK_TYPES)
    p.add_argument('--amp', choices=('bf16', 'fp16', 'none'), help='default: bf16 on a GPU, none on a CPU')
    p.add_argument('--compile', action='store_true', help='torch.compile the tokenizer, generator and enhancer')
    p.add_argument('--steps', type=engine.POSITIVE, help='timed steps per measurement; default: 20 on a GPU, 3 on CPU')
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
    # default: DALL-E's configuration with random weights
    tokenizer = dvae.load_tokenizer(args.tokenizer) if args.tokenizer else dvae.Tokenizer()
    tok_size = args.img_size // args.patch_size * tokenizer.downsample
    print(f'benchmark: {args.arch} {args.task}, {args.img_size} px (tokenizer view {tok_size} px), batch '
          f'{args.batch_size}, amp {dtype or "off"}{", compiled" if args.compile else ""}, {where}, '
          f'torch {torch.__version__}')
    print(f'tokenizer: {args.tokenizer or "a full-size DALL-E dVAE with random weights (the same compute)"}')
    step_imgs_per_s = None if args.loader_only else benchmark_step(args, tokenizer, tok_size, device, dtype)
    if not args.no_loader:
        benchmark_loader(args, tok_size, step_imgs_per_s)


# ------------------------------------------------------------------------------------------------------------------
# The device's peak, FLOPs and seconds

def matmul_peak(device, dtype, seconds=1.0):
    """Dense matmul FLOP/s of this device: a large square matmul (8192 on a GPU, 1024 on the CPU), timed in blocks
    for about `seconds` after torch's warm-up (kernel selection, allocation), on all of torch's threads. The
    reference for 'share of peak' (2 n^3 FLOPs per matmul)."""
    n = 8192 if device.type == 'cuda' else 1024
    a, b = torch.randn(2, n, n, device=device, dtype=dtype)
    matmul = Timer('a @ b', globals=dict(a=a, b=b), num_threads=torch.get_num_threads())
    return 2 * n ** 3 / matmul.blocked_autorange(min_run_time=seconds).median


def count_flops(fn):
    """Analytical FLOPs (matmuls, convolutions, attention; forward and backward) of fn() by op shapes."""
    from torch.utils import flop_counter
    cpu_sdpa = {  # torch counts the CUDA attention kernels but not the CPU one; same formulas (shapes in)
        torch.ops.aten._scaled_dot_product_flash_attention_for_cpu:
            lambda q, k, v, *_, **__: flop_counter.sdpa_flop_count(q, k, v),
        torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward:
            lambda grad, q, k, v, *_, **__: flop_counter.sdpa_backward_flop_count(grad, q, k, v)}
    with flop_counter.FlopCounterMode(display=False, custom_mapping=cpu_sdpa) as counter:
        fn()
    return counter.get_total_flops()


def seconds_per_call(fn, calls):
    """Mean seconds of fn() over `calls` back-to-back calls, synchronized only before and after, as in training."""
    t0 = timer()
    for _ in range(calls):
        fn()
    return (timer() - t0) / calls


# ------------------------------------------------------------------------------------------------------------------
# One CIM step, timed whole (throughput) and stage by stage (the split), against the enhancer alone

def benchmark_step(args, tokenizer, tok_size, device, dtype):
    """Prints the device's matmul peak, then throughput, TFLOP/s, share of that peak, time split and memory of a CIM
    step and of an enhancer-only step -> CIM images/s."""
    cuda = device.type == 'cuda'
    # the share of peak is taken against the peak of the dtype the step runs in, printed after bf16's
    for peak_dtype in dict.fromkeys([torch.bfloat16, dtype or torch.float32]):
        peak = matmul_peak(device, peak_dtype)
        name, note = ('bf16', '') if peak_dtype == torch.bfloat16 else (str(peak_dtype)[6:], " (this run's reference)")
        print(f'dense {name} matmul peak, measured: {peak / 1e12:.2f} TFLOP/s{note}')
    model = cim.CIM(tokenizer, args.arch, args.task, args.img_size, args.patch_size, mask_type=args.mask_type)
    model.to(device)
    B = args.batch_size
    imgs = torch.randn(B, 3, args.img_size, args.img_size, device=device)
    tok_imgs = torch.rand(B, 3, tok_size, tok_size, device=device)
    # train.py's own step. Block masks are made beforehand, as train.py's loader workers do; random ones on the device
    views = [imgs, tok_imgs] + ([model.make_mask(B, device)] if args.mask_type == 'block' else [])
    scaler = torch.amp.GradScaler(device.type, init_scale=2.0 ** 16 if dtype == torch.float16 else 1.0)
    cim_params = [p for p in model.parameters() if p.requires_grad]
    enh_params = list(model.enhancer.parameters()) + list(model.head.parameters())
    cim_opt = torch.optim.AdamW(engine.param_groups(model, 0.05, cim.NO_WEIGHT_DECAY_KEYS), lr=1e-4, fused=True)
    enh_opt = torch.optim.AdamW(enh_params, lr=1e-4, fused=True)

    def enhancer_only(imgs):  # the enhancer and head on the clean image, a stand-in loss (feature_map: compiled too)
        return {'loss': model.head(model.feature_map(model.enhancer, imgs)).float().square().mean()}

    def enhancer_step():
        train.train_step(enhancer_only, [[imgs]], enh_opt, scaler, enh_params, ('loss',), 3.0, dtype)

    def cim_step():
        train.train_step(model, [views], cim_opt, scaler, cim_params, ('loss',), 3.0, dtype)

    steps = {'enhancer only': enhancer_step, 'CIM': cim_step}
    flops = {name: count_flops(step) for name, step in steps.items()}  # eager: by op shapes
    if args.compile:
        model.compile()
    seconds = {}
    for name, step in steps.items():
        for _ in range(3 if cuda or args.compile else 1):  # warm-up: allocator, cuDNN autotuning, compilation
            step()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        seconds[name] = s = seconds_per_call(step, args.steps)
        # on the CPU, the process's peak RSS (bytes)
        mem = torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        print(f"{name:>13}: {s * 1e3:9.1f} ms/step {B / s:9.1f} img/s {flops[name] / B / 1e9:7.1f} GFLOP/img "
              f"{flops[name] / s / 1e12:8.3f} TFLOP/s {100 * flops[name] / s / peak:5.1f}% of peak, peak "
              f"{'GPU memory' if cuda else 'process RSS'} {mem / 2 ** 30:.2f} GiB")
    time_split(model, views, cim_opt, scaler, cim_params, dtype, args.steps)
    t_ratio = seconds['CIM'] / seconds['enhancer only']
    f_ratio = flops['CIM'] / flops['enhancer only']
    print(f'CIM / enhancer-only: time ratio {t_ratio:.2f}x, FLOP ratio {f_ratio:.2f}x (time/FLOP ratio '
          f'{t_ratio / f_ratio:.2f}; 1.0 = the extra work runs as fast as the enhancer)')
    if cuda:  # a host sync inside the step stalls the GPU's queue
        where = host_syncs(cim_step)
        print(f"host syncs in one CIM step: {len(where)}{' at ' + ', '.join(sorted(set(where))) if where else ''}")
    all_positions_cost(model, B, device, dtype, seconds['CIM'], args.steps)
    return B / seconds['CIM']


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


def time_split(model, views, optimizer, scaler, params, dtype, steps):
    """Prints the share of each stage in `steps` train.train_step calls whose model runs CIM's own stage methods
    one by one, synchronized after each; train_step's autocast, backward and optimizer tail are its own. The
    generator's and the enhancer's graphs are disjoint, so a backward after each half gives the gradients of
    train.py's one backward of their sum."""
    marks = []

    def backward(loss):  # outside autocast, as train_step's own backward
        with torch.autocast(loss.device.type, enabled=False):
            scaler.scale(loss).backward()

    def staged(imgs, tok_imgs, mask=None):
        mask = model.make_mask(imgs.shape[0], imgs.device) if mask is None else mask
        marks.append(timer())
        golden = model.tokenize(tok_imgs)
        marks.append(timer())
        logits, gen_loss, _ = model.generate(imgs, mask, golden)
        backward(gen_loss)
        marks.append(timer())
        _, replaced, corrupted_imgs = model.corrupt(golden, mask, logits)
        marks.append(timer())
        backward(model.enhancer_weight * model.enhance(corrupted_imgs, imgs, replaced)[2])
        marks.append(timer())
        # both backward passes are done: a leaf leaves train_step's own backward nothing to do
        return {'loss': torch.zeros((), device=imgs.device, requires_grad=True)}

    for _ in range(steps):
        train.train_step(staged, [views], optimizer, scaler, params, ('loss',), 3.0, dtype)
        marks.append(timer())
    stages = np.diff(np.reshape(marks, (steps, 6)), axis=1).sum(0)  # [5] seconds
    names = ('tokenizer encode', 'generator fwd+bwd', 'sample + decode', 'enhancer fwd+bwd', 'optimizer')
    print('CIM step time split (synchronized stages): ' +
          ', '.join(f'{k} {100 * v / stages.sum():.1f}%' for k, v in zip(names, stages)))


def all_positions_cost(model, B, device, dtype, step_seconds, steps):
    """The generator head, MIM loss and softmax sampling on all N positions (what cim.py does) against the k_max
    masked ones only (the gather it saves), on the same random features. Prints the difference as a share of the
    CIM step."""
    gen = model.generator
    seconds = []
    for n in (model.num_patches, model.k_max):
        x = torch.randn(B, n, gen.head.in_features, device=device, requires_grad=True)
        golden = torch.randint(gen.head.out_features, (B, n), device=device)
        mask = torch.ones(B, n, dtype=torch.bool, device=device)

        def head_loss_sample():
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                logits = gen.head(gen.norm(x))
                loss = cim.mim_loss(logits, golden, mask)[0]
            loss.backward()
            cim.sample_tokens(logits.detach())
        head_loss_sample()  # warm-up
        seconds.append(seconds_per_call(head_loss_sample, steps))
    full, masked = seconds
    print(f'generator head + MIM loss + sampling on all {model.num_patches} positions: {full * 1e3:.1f} ms, on the '
          f'{model.k_max} masked at most: {masked * 1e3:.1f} ms; predicting all positions costs '
          f'{100 * (full - masked) / step_seconds:.1f}% of the CIM step')


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
            y, x = np.mgrid[0:int(rng.integers(300, 450)), 0:w]
            base = np.dstack([np.sin(x / rng.uniform(20, 80) + c) * np.cos(y / rng.uniform(20, 80)) for c in range(3)])
            px = np.clip(127 + 100 * base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
            Image.fromarray(px).save(os.path.join(d, f'{i:04d}.jpg'), quality=90)
        dataset = engine.SeededDataset(engine.ImageFiles(d, train.TwoViews(args.img_size, tok_size, 0.08)))
        dataset[0]  # warm-up
        items = iter(range(len(dataset)))
        per_worker = 1 / seconds_per_call(lambda: dataset[next(items)], len(dataset))
    grid = args.img_size // args.patch_size
    print(f'data loader: {per_worker:.1f} img/s per worker process (JPEG decode + flip + RandomResizedCrop to '
          f'{args.img_size} px bicubic and {tok_size} px Lanczos; {grid}x{grid} tokens)')
    if step_imgs_per_s:
        need = math.ceil(step_imgs_per_s / per_worker)
        print(f'at {step_imgs_per_s:.1f} img/s per device the loader needs >= {need} workers per device '
              f'(--num-workers {args.num_workers}: {"enough" if args.num_workers >= need else "too few"})')


if __name__ == '__main__':
    engine.run_cli(main)
