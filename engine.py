"""Plumbing shared by train.py, finetune.py, segment.py and dvae.py: data loading, distributed setup, lr schedules,
layer decay, stochastic depth and mixed precision, checkpoints, pre-trained weights, logging, distributed evaluation
and kNN, command-line errors.
The method itself lives in cim.py; nothing here is CIM-specific.
"""
import argparse
import copy
import functools
import gzip
import itertools
import json
import math
import os
import random
import sys
import time
import warnings

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
import torchvision
from PIL import Image
from torchvision.ops import StochasticDepth
from tqdm import tqdm

# ----------------------------------------------------------------------------------------------------------------
# Data: image folders (ImageNet layout or flat) and the built-in Fashion-MNIST demo data

IMG_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.ppm', '.bmp', '.pgm', '.tif', '.tiff', '.webp')


def _is_image(name):
    return name.lower().endswith(IMG_EXTENSIONS) and not name.startswith('.')


def list_images(root):
    """Files of an image folder: ImageFolder layout (root/<class>/<img>) or a flat folder (root/<img>).

    Returns (paths, labels, classes); a flat folder has classes = [] and every label 0.
    Raises FileNotFoundError / ValueError with a one-line message for a missing, empty or mixed folder.
    """
    if not os.path.isdir(root):
        raise FileNotFoundError(f"data folder '{root}' does not exist")
    entries = sorted(os.listdir(root))
    classes = [d for d in entries if os.path.isdir(os.path.join(root, d)) and not d.startswith('.')]
    flat = [f for f in entries if os.path.isfile(os.path.join(root, f)) and _is_image(f)]
    if classes and flat:
        raise ValueError(f"data folder '{root}' mixes image files and class folders; use either "
                         f"root/<class>/<image> (ImageNet layout) or root/<image>")
    if flat:
        return [os.path.join(root, f) for f in flat], [0] * len(flat), []
    paths, labels = [], []
    for label, c in enumerate(classes):
        for dirpath, _, files in sorted(os.walk(os.path.join(root, c), followlinks=True)):
            for f in sorted(files):
                if _is_image(f):
                    paths.append(os.path.join(dirpath, f))
                    labels.append(label)
    if not paths:
        raise ValueError(f"no images ({', '.join(IMG_EXTENSIONS)}) found in '{root}' or its class folders "
                         f"(expected root/<class>/<image> or root/<image>)")
    return paths, labels, classes


def _read_rgb(path):
    with Image.open(path) as im:
        return im.convert('RGB')  # decodes fully: a truncated file raises here


def read_skipping_bad(i, n, read, name, max_bad=100):
    """read(j) for j = i, i + 1, ... (mod n) until one works -> (read(j), j, n_bad): a file read() cannot decode
    (OSError, ValueError, DecompressionBombError) is warned about (`name(j)` says which) and the next one stands in,
    so an epoch keeps its length; n_bad counts the skipped ones. ValueError when max_bad in a row fail."""
    for n_bad in range(min(n, max_bad)):
        j = (i + n_bad) % n
        try:
            return read(j), j, n_bad
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            warnings.warn(f'skipping unreadable {name(j)}: {e}')
    raise ValueError(f'none of {min(n, max_bad)} consecutive files from {name(i)} could be read')


class ImageFiles(torch.utils.data.Dataset):
    """An image folder (see list_images) whose unreadable files are skipped, not fatal.

    Item i is (transform(rgb_image), label, n_bad): when file i cannot be decoded (unreadable, truncated,
    not an image) the next readable file stands in, a warning is printed, and n_bad counts the files skipped,
    so the epoch keeps its length and the training loop can sum n_bad into its log.
    """

    def __init__(self, root, transform=None):
        self.paths, self.labels, self.classes = list_images(root)
        self.transform = transform

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        img, j, n_bad = read_skipping_bad(i, len(self.paths), lambda j: _read_rgb(self.paths[j]),
                                          lambda j: f"image '{self.paths[j]}'")
        return (self.transform(img) if self.transform is not None else img), self.labels[j], n_bad


FASHION_MNIST_DIRS = ('/usr/share/datasets/fashion-mnist',)  # Debian's dataset-fashion-mnist package
FASHION_MNIST_CLASSES = ('T-shirt/top', 'Trouser', 'Pullover', 'Dress', 'Coat', 'Sandal', 'Shirt', 'Sneaker',
                         'Bag', 'Ankle boot')


def _read_idx(path):
    """An idx file (the MNIST format, gzipped): big-endian magic (0, 0, dtype=8 for uint8, ndim), dims, data."""
    with gzip.open(path, 'rb') as f:
        data = f.read()
    if data[:3] != b'\x00\x00\x08':
        raise ValueError(f"'{path}' is not a uint8 idx file")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * k: 8 + 4 * k], 'big') for k in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def fashion_mnist(train=True, root=None):
    """Fashion-MNIST as tensors: images uint8 [N, 28, 28], labels int64 [N].

    Looks in `root` (if given), then in Debian's dataset-fashion-mnist files; elsewhere torchvision downloads
    the same idx files into ~/.cache/cim (the only network access in this codebase, and only for the demo).
    """
    split = 'train' if train else 't10k'
    names = (f'{split}-images-idx3-ubyte.gz', f'{split}-labels-idx1-ubyte.gz')
    for d in ([root] if root else []) + list(FASHION_MNIST_DIRS):
        if all(os.path.isfile(os.path.join(d, n)) for n in names):
            images, labels = (_read_idx(os.path.join(d, n)) for n in names)
            return torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64))
    cache = root or os.path.join(os.path.expanduser('~'), '.cache', 'cim')
    print(f"Fashion-MNIST not found in {list(FASHION_MNIST_DIRS)} (Debian: apt-get install dataset-fashion-mnist); "
          f"downloading with torchvision into {cache}", file=sys.stderr)
    try:
        ds = torchvision.datasets.FashionMNIST(cache, train=train, download=True)
    except Exception as e:  # offline machine: one clear line instead of a urllib traceback
        raise FileNotFoundError(f"Fashion-MNIST is not installed and could not be downloaded ({e}); "
                                f"install Debian's dataset-fashion-mnist or pass --data DIR") from None
    return ds.data.clone(), ds.targets.clone().long()


class TensorImages(torch.utils.data.Dataset):
    """In-memory uint8 images as an image dataset with ImageFiles' items: (transform(rgb_image), label, 0).

    images: [N, H, W] (gray) or [N, H, W, 3] uint8, labels: [N]; `pad` black pixels are added on each side
    (Fashion-MNIST: 28 + 2 * 2 = 32 px, a size the patch grids divide, with no interpolation).
    """

    def __init__(self, images, labels, transform=None, pad=0):
        self.images, self.labels, self.transform, self.pad = images, labels, transform, pad

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        img = Image.fromarray(self.images[i].numpy()).convert('RGB')
        if self.pad:
            padded = Image.new('RGB', (img.width + 2 * self.pad, img.height + 2 * self.pad))
            padded.paste(img, (self.pad, self.pad))
            img = padded
        return (self.transform(img) if self.transform is not None else img), int(self.labels[i]), 0


class SeededDataset(torch.utils.data.Dataset):
    """Random transforms as a function of (seed, epoch, index) alone.

    Item i of epoch e is drawn with torch's (CPU), numpy's and Python's global RNGs seeded from (seed, e, i) and
    restored afterwards, so crops and masks do not depend on the number of workers or processes, or on where a
    resumed run starts: what makes resume exact and DDP comparable to one process. Call set_epoch before
    iterating (workers are not persistent, so they see the new epoch).
    """

    def __init__(self, dataset, seed=0):
        self.dataset, self.seed, self.epoch = dataset, seed, 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        seed = int(np.random.SeedSequence([self.seed, self.epoch, i]).generate_state(1, np.uint64)[0])
        py_state, np_state = random.getstate(), np.random.get_state()
        with torch.random.fork_rng(devices=[]):  # CPU generator only: CUDA streams stay untouched
            torch.default_generator.manual_seed(seed)
            random.seed(seed)
            np.random.seed(seed % 2 ** 32)
            try:
                return self.dataset[i]
            finally:
                random.setstate(py_state)
                np.random.set_state(np_state)


class ResumableSampler(torch.utils.data.DistributedSampler):
    """DistributedSampler (shuffled per epoch, drop_last) that can start an epoch at batch `start_batch`.

    Each rank reads every world_size-th index of the epoch's permutation; set_epoch(epoch, start_batch) skips
    the first start_batch * batch_size of them, exactly the batches a resumed run has already consumed.
    One process: pass num_replicas=1, rank=0 (no process group needed).
    """

    def __init__(self, dataset, batch_size, num_replicas=1, rank=0, shuffle=True, seed=0):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=True)
        self.batch_size, self.start_batch = batch_size, 0

    def set_epoch(self, epoch, start_batch=0):
        super().set_epoch(epoch)
        self.start_batch = start_batch

    def __iter__(self):
        return itertools.islice(super().__iter__(), self.start_batch * self.batch_size, None)

    def __len__(self):
        return self.num_samples - self.start_batch * self.batch_size


class ShardSampler(torch.utils.data.Sampler):
    """Evaluation order: rank r reads indices r, r + W, r + 2W, ... of n, so every image is seen exactly once over
    all W ranks (DistributedSampler pads with repeats, which would count some images twice)."""

    def __init__(self, n, num_replicas=1, rank=0):
        if n < num_replicas:
            raise ValueError(f'{n} evaluation images cannot be spread over {num_replicas} processes')
        self.indices = range(rank, n, num_replicas)

    def __iter__(self):
        return iter(self.indices)

    def __len__(self):
        return len(self.indices)


def train_loader(dataset, sampler, batch_size, accum_iter, num_workers, seed, device):
    """The training DataLoader (full batches, pinned memory on CUDA, seeded worker order) -> (loader, optimizer
    steps per epoch). sampler: a ResumableSampler (or one with its num_samples and num_replicas). Raises
    ValueError when the dataset is too small for a single optimizer step."""
    loader = torch.utils.data.DataLoader(dataset, batch_size, sampler=sampler, num_workers=num_workers,
                                         pin_memory=device.type == 'cuda', drop_last=True,
                                         generator=torch.Generator().manual_seed(seed))
    steps_per_epoch = sampler.num_samples // batch_size // accum_iter  # num_samples: per rank, whole epoch
    if steps_per_epoch == 0:
        raise ValueError(f'{len(dataset)} training samples give no optimizer step: one needs batch {batch_size} x '
                         f'{sampler.num_replicas} processes x {accum_iter} accumulation steps')
    return loader, steps_per_epoch


# ----------------------------------------------------------------------------------------------------------------
# Distributed: torchrun environment, one process per GPU (or CPU process with gloo)

def init_distributed():
    """-> (rank, world_size, device). Under torchrun (RANK, WORLD_SIZE, LOCAL_RANK set): one process group,
    nccl on CUDA (device cuda:LOCAL_RANK), gloo on CPU. Plain `python script.py`: one process, no group."""
    cuda = torch.cuda.is_available()
    if 'RANK' not in os.environ or 'WORLD_SIZE' not in os.environ:
        return 0, 1, torch.device('cuda' if cuda else 'cpu')
    rank, world_size = int(os.environ['RANK']), int(os.environ['WORLD_SIZE'])
    local_rank = int(os.environ.get('LOCAL_RANK', 0))
    device = torch.device('cuda', local_rank) if cuda else torch.device('cpu')
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group('nccl' if cuda else 'gloo')
    return rank, world_size, device


def is_main():
    """True on rank 0 (or without a process group): the one process that prints, logs and saves."""
    return not dist.is_initialized() or dist.get_rank() == 0


def all_gather_objects(obj):
    """[obj of rank 0, obj of rank 1, ...]; [obj] without a process group."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def all_gather_rows(x):
    """Rows of every rank, in rank order: x [n_r, ...] (n_r may differ) -> [sum of n_r, ...]; x without a group."""
    if not dist.is_initialized():
        return x
    n = torch.tensor([len(x)], device=x.device)
    sizes = [torch.zeros_like(n) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, n)
    sizes = [int(s) for s in sizes]
    padded = x.new_zeros((max(sizes), *x.shape[1:]))
    padded[:len(x)] = x
    out = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(out, padded)
    return torch.cat([o[:s] for o, s in zip(out, sizes)])


class Metrics:
    """Per-step scalars averaged over a log interval and over all ranks, without a host sync per step.

    update(**values): 0-dim tensors (or numbers), summed on their device; non-finite values are left out of
    the mean (a skipped step; count those yourself). add(**totals): counts summed over steps and ranks.
    reduce() -> {name: float}: ONE all_reduce of one stacked tensor and one host sync; then starts over.
    Every rank must call update/add with the same names and then reduce.
    """

    def __init__(self, device):
        self.device = device
        self.sums, self.counts, self.totals = {}, {}, {}

    def update(self, **values):
        for k, v in values.items():
            v = torch.as_tensor(v).detach().to(self.device, torch.float32)
            finite = torch.isfinite(v)
            self.sums[k] = self.sums.get(k, 0) + torch.where(finite, v, 0.0)
            self.counts[k] = self.counts.get(k, 0) + finite.float()

    def add(self, **totals):
        for k, v in totals.items():
            self.totals[k] = self.totals.get(k, 0) + v

    def reduce(self):
        means, totals = sorted(self.sums), sorted(self.totals)
        stacked = torch.stack([self.sums[k] for k in means] + [self.counts[k] for k in means] +
                              [torch.as_tensor(self.totals[k]).to(self.device, torch.float32) for k in totals]
                              + [torch.zeros((), device=self.device)])
        if dist.is_initialized():
            dist.all_reduce(stacked)
        values = stacked.tolist()
        out = {k: values[i] / values[len(means) + i] if values[len(means) + i] else float('nan')
               for i, k in enumerate(means)}
        out.update({k: values[2 * len(means) + i] for i, k in enumerate(totals)})
        self.sums, self.counts, self.totals = {}, {}, {}
        return out


class SkippedSteps:
    """Optimizer steps skipped for non-finite loss or gradients, counted on device (no host sync per step).

    update(grad_norm) after each engine.optimizer_step; at log time collect(log) (one host sync) adds the count to
    log['skipped_steps'] and returns the current run of consecutive skipped steps; after writing the log line,
    stop_if_stuck(run, ...) raises TrainingError when that run reached max_bad."""

    def __init__(self, device, max_bad):
        self.max_bad = max_bad
        self.skipped, self.run = torch.zeros((), device=device), torch.zeros((), device=device)

    def update(self, grad_norm):
        bad = (~torch.isfinite(grad_norm)).float()
        self.skipped += bad
        self.run = (self.run + 1) * bad

    def collect(self, log):
        n_skipped, n_run = (int(x) for x in torch.stack([self.skipped, self.run]).tolist())
        self.skipped.zero_()
        log['skipped_steps'] += n_skipped
        return n_run

    def stop_if_stuck(self, run, step, where, hint='try a lower learning rate'):
        if run >= self.max_bad:
            raise TrainingError(f'{run} consecutive steps had a non-finite loss or gradients and were skipped; '
                                f'stopped at step {step} (the last good checkpoint is in {where}); {hint}')


class TrainLog:
    """What a training loop reports, with no host sync per step: per-step scalars (Metrics; the step function adds
    its losses to .metrics), optimizer steps skipped for non-finite values (SkippedSteps) and images/s.

    step(grad_norm, lr) after each optimizer step. write(log, pbar, lr, done, hint, **position) every log_every
    steps (done: optimizer steps so far): one host sync, one log.jsonl line (rank 0) with `position` (epoch=,
    step= or iter=), the tqdm postfix, then the stop after max_bad consecutive skipped steps (TrainingError).
    log: the run's dict holding the 'n_bad_images' and 'skipped_steps' totals."""

    def __init__(self, device, path, images_per_step, max_bad):
        self.metrics, self.skipped = Metrics(device), SkippedSteps(device, max_bad)
        self.path, self.images_per_step = path, images_per_step
        self.t, self.n = time.time(), 0

    def step(self, grad_norm, lr):
        self.skipped.update(grad_norm)  # non-finite: the scaler skipped the step
        self.metrics.update(grad_norm=grad_norm, lr=lr)
        self.n += 1

    def write(self, log, pbar, lr, done, hint, **position):
        m = self.metrics.reduce()
        bad_run = self.skipped.collect(log)
        log['n_bad_images'] += int(m.pop('n_bad_images'))
        imgs_s = self.n * self.images_per_step / (time.time() - self.t)
        self.t, self.n = time.time(), 0
        if is_main():
            log_jsonl(self.path, dict(position, **m, imgs_per_s=imgs_s, n_bad_images=log['n_bad_images'],
                                      skipped_steps=log['skipped_steps']))
            pbar.set_postfix(imgs_s=f'{imgs_s:.1f}', loss=f"{m['loss']:.4f}", lr=f'{lr:.2e}')
        self.skipped.stop_if_stuck(bad_run, done, os.path.dirname(self.path), hint)


# ----------------------------------------------------------------------------------------------------------------
# Optimization: AdamW parameter groups, lr schedule, mixed precision, one optimizer step

def param_groups(model, weight_decay, no_decay_keys=(), lr_scale=None):
    """AdamW parameter groups (BEiT/MAE practice): weight decay on weight matrices and kernels; none on 1-D tensors,
    biases, and parameters whose name contains one of no_decay_keys (norms, position/cls/mask embeddings).
    Frozen parameters are left out. lr_scale(name) -> float (optional, e.g. layer-wise decay) is stored as
    group['lr_scale'], which set_lr multiplies in. -> list of dicts for torch.optim.AdamW.
    """
    groups = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = p.ndim <= 1 or name.endswith('.bias') or any(k in name for k in no_decay_keys)
        wd, scale = (0.0 if no_decay else weight_decay), (lr_scale(name) if lr_scale else 1.0)
        groups.setdefault((wd, scale), {'params': [], 'weight_decay': wd, 'lr_scale': scale})['params'].append(p)
    return list(groups.values())


def scaled_lr(lr_at_ref, total_batch, ref_batch):
    """Linear scaling rule (Goyal et al. 2017): the lr for total_batch given the lr at ref_batch."""
    return lr_at_ref * total_batch / ref_batch


def cosine_lr(step, total_steps, warmup_steps, peak_lr, min_lr=0.0):
    """Per optimizer step: linear warmup to peak_lr over warmup_steps (reaching it at the last warmup step),
    then half-cosine decay to min_lr at total_steps."""
    if step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr + (peak_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def poly_lr(step, total_steps, peak_lr, power=0.9, min_lr=0.0, warmup_steps=0):
    """Polynomial decay (mmseg's 'poly'): min_lr + (peak_lr - min_lr) * (1 - step / total_steps) ** power, times a
    linear warmup factor (step + 1) / warmup_steps over the first warmup_steps steps."""
    lr = min_lr + (peak_lr - min_lr) * (1 - min(step, total_steps) / total_steps) ** power
    return lr * (step + 1) / warmup_steps if step < warmup_steps else lr


def vit_layer_id(name, depth, prefix=''):
    """BEiT's layer id of a ViT parameter, for layer-wise lr decay: the patch / position / cls / mask embeddings 0,
    blocks.i -> i + 1, everything else (final norm, classifier, decoder) depth + 1. `prefix`: the ViT's place in
    the model ('backbone.'); parameters outside it count as 'everything else'."""
    if not name.startswith(prefix):
        return depth + 1
    parts = name[len(prefix):].split('.')
    if parts[0] in ('patch_embed', 'pos_embed', 'cls_token', 'mask_token'):
        return 0
    if parts[0] == 'blocks':
        return int(parts[1]) + 1
    return depth + 1


def layer_decay(depth, decay, prefix=''):
    """Layer-wise lr decay (BEiT; Clark et al. 2020) as lr_scale(name) for param_groups():
    decay ** (depth + 1 - layer id), so the classifier gets the full lr and the embeddings decay ** (depth + 1)."""
    return lambda name: decay ** (depth + 1 - vit_layer_id(name, depth, prefix))


def _drop_branch(drop, module, inputs, output):
    return drop(output)


def add_stochastic_depth(model, rate):
    """Stochastic depth (Huang et al. 2016) on the residual branches of every ViT block (attention and MLP) or
    torchvision ResNet block (its last BatchNorm, before the shortcut is added), the drop probability rising
    linearly from 0 at the first block to `rate` at the last (timm / BEiT: linspace(0, rate, depth)).

    Done with forward hooks and a parameter-free torchvision StochasticDepth submodule `block.drop_path`: the state
    dict keeps timm's / torchvision's names, and model.train() / eval() switch it. Whole samples are dropped ('row');
    the kept ones are scaled by 1 / (1 - p). -> model.
    """
    resnet_blocks = (torchvision.models.resnet.Bottleneck, torchvision.models.resnet.BasicBlock)
    blocks = [m for m in model.modules() if all(hasattr(m, a) for a in ('norm1', 'attn', 'norm2', 'mlp'))
              or isinstance(m, resnet_blocks)]
    for i, block in enumerate(blocks):
        p = rate * i / max(1, len(blocks) - 1)
        if p == 0:
            continue
        block.drop_path = StochasticDepth(p, 'row')
        ends = ((block.bn3,) if isinstance(block, torchvision.models.resnet.Bottleneck) else (block.bn2,)) \
            if isinstance(block, resnet_blocks) else (block.attn, block.mlp)
        for m in ends:
            m.register_forward_hook(functools.partial(_drop_branch, block.drop_path))
    return model


def set_lr(optimizer, lr):
    for g in optimizer.param_groups:
        g['lr'] = lr * g.get('lr_scale', 1.0)


def resolve_amp(amp, device):
    """--amp {bf16, fp16, none} -> (amp, autocast dtype or None). bf16 on a GPU without it falls back to fp16."""
    if amp not in ('bf16', 'fp16', 'none'):
        raise ValueError(f"unknown --amp '{amp}' (choose bf16, fp16 or none)")
    if amp == 'bf16' and device.type == 'cuda' and not torch.cuda.is_bf16_supported():
        warnings.warn('this GPU has no bf16: using fp16 autocast with loss scaling instead')
        amp = 'fp16'
    return amp, {'bf16': torch.bfloat16, 'fp16': torch.float16, 'none': None}[amp]


def autocast(device, dtype):
    """Mixed-precision context for the forward pass (dtype None: full precision)."""
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


def grad_scaler(device, amp):
    """fp16: dynamic loss scaling. bf16 / fp32: the scale stays 1 and the scaler only does the other half of its
    job, skipping steps whose gradients are non-finite, on device (no host sync with a fused optimizer)."""
    return torch.amp.GradScaler(device.type, init_scale=2.0 ** 16 if amp == 'fp16' else 1.0)


def grad_norm(parameters):
    """Global L2 norm of the gradients: [0-dim] fp64, finite exactly when every gradient is finite (each
    tensor's norm is taken in fp64, where squares of finite fp32 gradients cannot overflow)."""
    norms = [torch.linalg.vector_norm(p.grad.detach(), dtype=torch.float64) for p in parameters if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.zeros((), dtype=torch.float64)


def optimizer_step(optimizer, scaler, parameters, amp, clip_grad=None):
    """Unscale, clip the global grad norm to clip_grad (None: no clipping), step (skipped when any gradient is
    inf/NaN), zero the gradients.

    -> grad norm before clipping, a 0-dim tensor: non-finite exactly when the step was skipped. Under DDP the
    gradients are already averaged, so every rank takes the same decision. (Not clip_grad_norm_: its fp32 norm
    overflows to inf on large finite gradients, and without clipping its inf / inf turns them into NaN.)
    """
    parameters = list(parameters)
    scaler.unscale_(optimizer)
    norm = grad_norm(parameters)
    if clip_grad:
        coef = (clip_grad / (norm + 1e-6)).clamp(max=1.0).float()
        for p in parameters:
            if p.grad is not None:
                p.grad.detach().mul_(coef)
    scaler.step(optimizer)
    scaler.update(None if amp == 'fp16' else 1.0)
    optimizer.zero_grad(set_to_none=True)
    return norm


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints: atomic, the previous one kept, RNG states included, loadable with weights_only=True

CHECKPOINT, PREVIOUS = 'checkpoint-last.pth', 'checkpoint-prev.pth'


def rng_state():
    """torch (CPU and CUDA), numpy and Python RNG states, as tensors and plain types."""
    np_state = np.random.get_state()
    return {'torch': torch.get_rng_state(),
            'cuda': torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            'numpy': (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *map(float, np_state[2:])),
            'python': random.getstate()}


def set_rng_state(state):
    torch.set_rng_state(state['torch'])
    if state['cuda'] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state['cuda'])
    name, keys, pos, has_gauss, cached = state['numpy']
    np.random.set_state((name, keys.numpy().astype(np.uint32), int(pos), int(has_gauss), cached))
    random.setstate(state['python'])


def all_finite(module):
    """True when every parameter and buffer is finite (one host sync)."""
    tensors = [t.detach() for t in list(module.parameters()) + list(module.buffers()) if t.is_floating_point()]
    return bool(torch.stack([t.isfinite().all() for t in tensors]).all())


def atomic_save(obj, path, previous=None):
    """torch.save to a temp file, fsync, rename: `path` is always either the old or the new complete file.
    previous: where the old file goes (kept as a fallback), else it is replaced."""
    tmp = path + '.tmp'
    with open(tmp, 'wb') as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    if previous and os.path.exists(path):
        os.replace(path, previous)
    os.replace(tmp, path)
    return path


def save_checkpoint(state, output_dir):
    """Atomic save to output_dir/checkpoint-last.pth, the old one kept as checkpoint-prev.pth. A crash at any
    point leaves a complete checkpoint."""
    return atomic_save(state, os.path.join(output_dir, CHECKPOINT), previous=os.path.join(output_dir, PREVIOUS))


def find_checkpoint(output_dir):
    """output_dir/checkpoint-last.pth (or -prev.pth) if there is one, else None."""
    for name in (CHECKPOINT, PREVIOUS):
        if os.path.isfile(os.path.join(output_dir, name)):
            return os.path.join(output_dir, name)
    return None


def _read_checkpoint(path):
    try:
        state = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:  # truncated zip, not a checkpoint at all, a pickle of something else
        raise ValueError(f"checkpoint '{path}' is unreadable (truncated or not a checkpoint: "
                         f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    if not isinstance(state, dict) or 'model' not in state:
        raise ValueError(f"'{path}' is not a training checkpoint (no 'model' entry)")
    return state


def load_checkpoint(path):
    """A checkpoint dict (weights_only=True: tensors and plain types only). When `path` is an unreadable
    checkpoint-last.pth (truncated, corrupt) and checkpoint-prev.pth sits next to it, says so and loads that.
    -> (state, path actually loaded). Raises FileNotFoundError / ValueError with a one-line message."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint '{path}' does not exist")
    try:
        return _read_checkpoint(path), path
    except ValueError as e:
        previous = os.path.join(os.path.dirname(path), PREVIOUS)
        if os.path.basename(path) != CHECKPOINT or not os.path.isfile(previous):
            raise
        print(f"warning: {e}; using the previous one, '{previous}'", file=sys.stderr)
        return _read_checkpoint(previous), previous


def save_training_state(model, optimizer, scaler, args, log, skip_prefix=None, **position):
    """Every rank: checkpoint-last.pth in args.output_dir with model, optimizer, scaler, each rank's RNG state,
    the log dict, args and `position` (epoch, step, ...); rank 0 writes it atomically. A non-finite model raises
    TrainingError instead, keeping the last good checkpoint. skip_prefix: model keys not saved (a frozen part)."""
    where = ', '.join(f'{k} {v}' for k, v in position.items())
    if not all_finite(model):
        raise TrainingError(f'the model became non-finite at {where}; kept the last good checkpoint in '
                            f'{args.output_dir}')
    rng = all_gather_objects(rng_state())
    if is_main():
        state = {k: v for k, v in model.state_dict().items() if not (skip_prefix and k.startswith(skip_prefix))}
        save_checkpoint(dict(model=state, optimizer=optimizer.state_dict(), scaler=scaler.state_dict(), rng=rng,
                             log=dict(log), args=vars(args), **position), args.output_dir)


def load_training_state(path, model, optimizer, scaler, args, rank, log, same_args, skip_prefix=None, **same):
    """Resumes from a save_training_state() checkpoint -> its dict (position entries included).

    Checks first that the run is the same: args named in `same_args` and the `same` entries (name=value now) must
    equal the checkpoint's, else one-line ValueError. Loads model (strict, but for skip_prefix), optimizer, scaler,
    this rank's RNG states, and updates `log`."""
    state, path = load_checkpoint(path)
    if not all(k in state for k in ('args', 'optimizer', 'scaler', 'rng', 'log')):
        raise ValueError(f"'{path}' is not a training checkpoint to resume (no args/optimizer/RNG state)")
    old = state['args']
    diff = [f"--{k.replace('_', '-')} {old.get(k)} (now {getattr(args, k)})" for k in same_args
            if old.get(k) != getattr(args, k)]
    diff += [f'{k} {state.get(k)} (now {v})' for k, v in same.items() if state.get(k) != v]
    if diff:
        raise ValueError(f"checkpoint '{path}' was written with {', '.join(diff)}; use the same settings to resume "
                         f"or another --output-dir")
    missing, unexpected = model.load_state_dict(state['model'], strict=False)
    missing = [k for k in missing if not (skip_prefix and k.startswith(skip_prefix))]
    if missing or unexpected:
        raise ValueError(f"checkpoint '{path}' does not fit the model (missing {missing[:3]}, unexpected "
                         f"{unexpected[:3]})")
    optimizer.load_state_dict(state['optimizer'])
    scaler.load_state_dict(state['scaler'])
    set_rng_state(state['rng'][rank])
    log.update(state['log'])
    return state


# ----------------------------------------------------------------------------------------------------------------
# Pre-trained weights: every layout read, the backbone loaded strictly (finetune.py, segment.py)

def read_weights(path):
    """The state dict in a weights file -> (state dict, args dict or {}), every supported layout unwrapped:
    a train.py checkpoint ({'model': CIM state, 'args'}: its 'enhancer.*' weights, the backbone), a `train.py --export`
    file, a torchvision / timm state dict, the {'model': ...} / {'state_dict': ...} / 'module.' wrappers of MAE, BEiT,
    DeiT and DDP, and 'backbone.*' weights (a linear probe, mmseg). Raises FileNotFoundError / ValueError (one line)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"weights file '{path}' does not exist")
    try:
        obj = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:  # not a torch file, truncated, or a pickle of arbitrary objects
        raise ValueError(f"'{path}' is not a readable weights file ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''})") from None
    meta = {}
    if isinstance(obj, dict):
        for key in ('model', 'state_dict'):
            if isinstance(obj.get(key), dict):
                meta = obj['args'] if isinstance(obj.get('args'), dict) else {}
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"'{path}' holds no state dict (a dict of parameter names to tensors)")
    state = {k.removeprefix('module.'): v for k, v in obj.items()}
    for prefix in ('enhancer.', 'backbone.'):  # CIM checkpoint: the enhancer is the backbone (Sec. 2.3)
        if any(k.startswith(prefix) for k in state):
            return {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}, meta
    return state, meta


def weights_family(state):
    """'vit' (timm names), 'resnet' (torchvision names) or None: which kind of network a state dict belongs to."""
    if 'patch_embed.proj.weight' in state or any(k.startswith('blocks.0.') for k in state):
        return 'vit'
    if 'conv1.weight' in state or any(k.startswith('layer1.0.') for k in state):
        return 'resnet'
    return None


def interpolate_pos_embed(pos_embed, num_patches):
    """ViT position embeddings for another square grid (BEiT / MAE practice: bicubic on the grid, cls kept).
    pos_embed: [1, 1 + n0, D] -> [1, 1 + num_patches, D]."""
    g0, g = math.isqrt(pos_embed.shape[1] - 1), math.isqrt(num_patches)
    if g0 * g0 != pos_embed.shape[1] - 1 or g * g != num_patches:
        raise ValueError(f'cannot resize position embeddings of {pos_embed.shape[1] - 1} patches to {num_patches}: '
                         f'square grids (with a cls token) only')
    grid = pos_embed[:, 1:].reshape(1, g0, g0, -1).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=(g, g), mode='bicubic', align_corners=False)
    return torch.cat([pos_embed[:, :1], grid.permute(0, 2, 3, 1).flatten(1, 2).to(pos_embed.dtype)], dim=1)


def load_pretrained(model, state, source='weights', classifier=('head.', 'fc.'), verbose=True):
    """Copies a backbone state dict into model (cim's ViT or a torchvision ResNet, with or without classifier).

    Every backbone parameter and buffer of the model must be in `state` with its shape: a missing one, another
    network family (ResNet weights into a ViT), another width, depth or patch size raises ValueError, because a
    half-loaded backbone gives silently wrong results. ViT position embeddings of another grid are interpolated.
    The classifier (names starting with `classifier`) loads only if its shape fits. Keys under modules the model
    lacks (MAE's decoder, BEiT's mask token, ...) are ignored. Prints what was left out. -> (missing, ignored).
    """
    own = model.state_dict()
    family, theirs = weights_family(own), weights_family(state)
    if theirs is None:
        raise ValueError(f"{source} holds neither ViT nor ResNet weights (keys such as {', '.join(list(state)[:3])})")
    if theirs != family:
        raise ValueError(f'{source} holds {theirs} weights but the model is a {family}')
    state = dict(state)
    if 'pos_embed' in state and 'pos_embed' in own and state['pos_embed'].shape != own['pos_embed'].shape:
        if state['pos_embed'].shape[-1] == own['pos_embed'].shape[-1]:
            state['pos_embed'] = interpolate_pos_embed(state['pos_embed'], own['pos_embed'].shape[1] - 1)
    is_head = lambda k: k.startswith(classifier)  # noqa: E731
    mismatched = [k for k in state if k in own and state[k].shape != own[k].shape]
    for k in sorted(mismatched, key=lambda k: k != 'patch_embed.proj.weight'):  # that one tells width and patch
        if not is_head(k):
            raise ValueError(f'{source} does not fit the model: {k} is {list(state[k].shape)} there and '
                             f'{list(own[k].shape)} here (another architecture, width or patch size?)')
        del state[k]  # a classifier for another number of classes
    modules = {k.split('.')[0] for k in own}
    structural = [k for k in state if k not in own and k.split('.')[0] in modules and not is_head(k)]
    missing = [k for k in own if k not in state]
    if structural or any(not is_head(k) for k in missing):
        bad = structural or [k for k in missing if not is_head(k)]
        raise ValueError(f"{source} does not fit the model: {'unexpected' if structural else 'missing'} "
                         f"{', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''} ({len(bad)} keys; another "
                         f"architecture or depth?)")
    ignored = [k for k in state if k not in own]
    model.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
    if verbose and is_main():
        print(f'loaded {len(own) - len(missing)} tensors from {source}; missing (trained from scratch): '
              f"{missing or 'none'}; ignored: {ignored or 'none'}")
    return missing, ignored


DEMO_CHECKPOINT = os.path.join('out', 'demo', CHECKPOINT)  # what `python train.py` (the demo) writes


def resolve_init(init, demo):
    """--init of finetune.py / segment.py -> (weights path or 'none', the pre-training run's args or {}).
    Demo (no --data): train.py's demo checkpoint by default. Else --init is required. One-line errors."""
    if demo:
        init = init or DEMO_CHECKPOINT
        if init != 'none' and not os.path.isfile(init):
            raise FileNotFoundError(f"no --data: the demo fine-tunes train.py's demo checkpoint '{init}', which does "
                                    f"not exist; run `python train.py` first or pass --init PATH")
    elif init is None:
        raise ValueError("--init is required with --data: pre-trained weights (train.py checkpoint or --export, "
                         "torchvision / timm state dict) or 'none' to train from scratch")
    return init, (read_weights(init)[1] if init != 'none' else {})


def pretrained_vs_scratch(run, args, rank, device):
    """The demos' comparison: run(args, rank, device, demo=True) from args.init and from random init ('none'), in
    OUTPUT_DIR/pretrained and OUTPUT_DIR/scratch. -> {'pre-trained': result, 'random init': result} (only the
    latter with --init none), or None when a run stopped early (--stop-after-steps)."""
    results = {}
    for name, init, sub in (('pre-trained', args.init, 'pretrained'), ('random init', 'none', 'scratch')):
        if init == 'none' and name == 'pre-trained':
            continue
        a = copy.copy(args)
        a.init, a.output_dir = init, os.path.join(args.output_dir, sub)
        results[name] = run(a, rank, device, demo=True)
        if results[name] is None:
            return None
    return results


# ----------------------------------------------------------------------------------------------------------------
# Logging and evaluation

def log_jsonl(path, record):
    """Appends one JSON line (rank 0 only). Non-finite floats are written as null (strict JSON)."""
    record = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
    with open(path, 'a') as f:
        f.write(json.dumps(record) + '\n')


@torch.no_grad()
def evaluate(fn, loader, device, dtype=None, desc='eval'):
    """Sums of fn(inputs, targets) -> {name: tensor} over every batch of loader and over all ranks.

    fn returns per-batch sums (correct counts, loss sums, confusion matrices) and runs under autocast; inputs and
    targets are the first two items of each batch, on device. Use a ShardSampler so each sample counts once.
    -> {name: float64 tensor}; the caller divides. One all_reduce per name, at the end.
    """
    sums = {}
    for batch in tqdm(loader, desc=desc, disable=not is_main(), leave=False, dynamic_ncols=True):
        inputs, targets = (b.to(device, non_blocking=True) for b in batch[:2])
        with autocast(device, dtype):
            out = fn(inputs, targets)
        for k, v in out.items():
            v = torch.as_tensor(v, device=device).detach().to(torch.float64)
            sums[k] = sums[k] + v if k in sums else v
    for k in sorted(sums):
        if dist.is_initialized():
            dist.all_reduce(sums[k])
    return sums


@torch.no_grad()
def extract_features(fn, loader, device, dtype=None):
    """fn(imgs) -> [B, D] over a loader of (imgs, labels, ...) batches -> (features [N, D] float32, labels [N]), CPU."""
    feats, labels = [], []
    for imgs, y, *_ in loader:
        with autocast(device, dtype):
            feats.append(fn(imgs.to(device, non_blocking=True)).float().cpu())
        labels.append(torch.as_tensor(y))
    return torch.cat(feats), torch.cat(labels)


@torch.no_grad()
def knn_accuracy(train_feats, train_labels, test_feats, test_labels, k=20, T=0.07, chunk=1024):
    """Weighted kNN classifier as in DINO (Wu et al. 2018): cosine similarity to all training features, the k
    nearest vote for their label with weight exp(similarity / T).

    train_feats: [N, D], train_labels: [N] long, test_feats: [M, D], test_labels: [M] -> top-1 accuracy in [0, 1].
    Test features are processed in chunks, so memory is chunk x N.
    """
    train = F.normalize(train_feats.float(), dim=1)
    test = F.normalize(test_feats.float(), dim=1)
    train_labels, test_labels = train_labels.long().to(train.device), test_labels.long().to(train.device)
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    correct = 0
    for i in range(0, len(test), chunk):
        sim, idx = (test[i:i + chunk] @ train.T).topk(min(k, len(train)), dim=1)   # [b, k]
        votes = torch.zeros(len(sim), num_classes, device=train.device)
        votes.scatter_add_(1, train_labels[idx], (sim / T).exp())
        correct += int((votes.argmax(1) == test_labels[i:i + chunk]).sum())
    return correct / len(test)


def linear_probe_accuracy(train_feats, train_labels, test_feats, test_labels, steps=300, lr=1e-2, weight_decay=1e-4):
    """A quick linear probe on frozen features: standardized with the training statistics (MAE's BatchNorm without
    affine), one linear layer from zero init, full-batch Adam on the cross-entropy (convex: deterministic).
    feats: [N, D] / [M, D], labels: [N] / [M] long -> test top-1 accuracy in [0, 1]."""
    mean, std = train_feats.float().mean(0), train_feats.float().std(0) + 1e-6
    x, x_test = (train_feats.float() - mean) / std, (test_feats.float() - mean) / std
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    linear = torch.nn.Linear(x.shape[1], num_classes, device=x.device)
    torch.nn.init.zeros_(linear.weight), torch.nn.init.zeros_(linear.bias)
    opt = torch.optim.Adam(linear.parameters(), lr=lr, weight_decay=weight_decay)
    with torch.enable_grad():
        for _ in range(steps):
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(linear(x), train_labels.long().to(x.device)).backward()
            opt.step()
    with torch.no_grad():
        return (linear(x_test).argmax(1).cpu() == test_labels.long().cpu()).float().mean().item()


# ----------------------------------------------------------------------------------------------------------------
# Command line: the project's one-line errors

class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are the project's: one line 'error: <message>' on stderr, exit status 2."""

    def error(self, message):
        print(f'error: {message}', file=sys.stderr)
        sys.exit(2)


def add_run_args(group, output_dir_help, num_workers, save_every_steps, save_help):
    """The flags every training script has (output, resume, precision, data workers, seed, logging, checkpoints,
    non-finite steps), added to an argparse group."""
    group.add_argument('--output-dir', default=None, help=output_dir_help)
    group.add_argument('--resume', metavar='CKPT', default=None,
                       help='checkpoint to resume; default: OUTPUT_DIR/checkpoint-last.pth when present')
    group.add_argument('--amp', default='bf16', choices=('bf16', 'fp16', 'none'), help='autocast dtype')
    group.add_argument('--num-workers', type=int, default=num_workers, help='data loader processes per GPU')
    group.add_argument('--seed', type=int, default=0, help='model init, data order, augmentations')
    group.add_argument('--log-every', type=int, default=50, help='steps between log.jsonl lines')
    group.add_argument('--save-every-steps', type=int, default=save_every_steps, help=save_help)
    group.add_argument('--max-bad-steps', type=int, default=20,
                       help='stop after this many consecutive non-finite steps (they are skipped)')
    return group


class TrainingError(RuntimeError):
    """The run cannot go on (e.g. the loss stayed non-finite): not a user mistake, but no traceback either."""


def run_cli(main):
    """Runs main(); a user mistake (ValueError, FileNotFoundError) prints 'error: <message>' to stderr and exits
    with status 2, a TrainingError does the same with status 1. Set CIM_TRACEBACK=1 to see the traceback."""
    try:
        main()
    except (ValueError, FileNotFoundError, TrainingError) as e:
        if os.environ.get('CIM_TRACEBACK'):
            raise
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        sys.exit(1 if isinstance(e, TrainingError) else 2)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
