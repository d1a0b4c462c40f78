"""Plumbing shared by train.py, finetune.py, segment.py and dvae.py: data loading, distributed setup,
lr schedule and mixed precision, checkpoints, logging, kNN evaluation, command-line errors.
The method itself lives in cim.py; nothing here is CIM-specific.
"""
import argparse
import gzip
import itertools
import json
import math
import os
import random
import sys
import warnings

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image

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
        for n_bad in range(min(len(self.paths), 100)):
            j = (i + n_bad) % len(self.paths)
            try:
                with Image.open(self.paths[j]) as im:
                    img = im.convert('RGB')  # decodes fully: a truncated file raises here
            except (OSError, ValueError, Image.DecompressionBombError) as e:
                warnings.warn(f"skipping unreadable image '{self.paths[j]}': {e}")
                continue
            if self.transform is not None:
                img = self.transform(img)
            return img, self.labels[j], n_bad
        raise ValueError(f"none of {n_bad + 1} consecutive images from '{self.paths[i]}' could be read")


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
    import torchvision
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


def save_checkpoint(state, output_dir):
    """Atomic save to output_dir/checkpoint-last.pth: written to a temp file and fsynced, the old one moved to
    checkpoint-prev.pth, then the temp file renamed. A crash at any point leaves a complete checkpoint."""
    path, tmp = os.path.join(output_dir, CHECKPOINT), os.path.join(output_dir, CHECKPOINT + '.tmp')
    with open(tmp, 'wb') as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    if os.path.exists(path):
        os.replace(path, os.path.join(output_dir, PREVIOUS))
    os.replace(tmp, path)
    return path


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


# ----------------------------------------------------------------------------------------------------------------
# Logging and evaluation

def log_jsonl(path, record):
    """Appends one JSON line (rank 0 only). Non-finite floats are written as null (strict JSON)."""
    record = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
    with open(path, 'a') as f:
        f.write(json.dumps(record) + '\n')


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
