"""Plumbing that train.py, finetune.py, segment.py (and dvae.py) share: data loading, distributed setup, lr schedules,
layer decay, checkpoints, pre-trained weights, evaluation and kNN, and the command line's one-line errors.
The method itself lives in cim.py; nothing here is CIM-specific. Each training loop is written out in its script.
"""
import argparse
import fcntl
import functools
import gzip
import itertools
import json
import math
import os
import pickle
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
from torchvision.datasets.folder import make_dataset, pil_loader
from tqdm import tqdm

# ----------------------------------------------------------------------------------------------------------------
# Data: image folders (ImageNet layout or flat) and the built-in Fashion-MNIST demo data

IMG_EXTENSIONS = torchvision.datasets.folder.IMG_EXTENSIONS  # ImageFolder's: .jpg .jpeg .png .ppm .bmp .pgm ...


def _is_image(path):
    return path.lower().endswith(IMG_EXTENSIONS) and not os.path.basename(path).startswith('.')


def read_skipping_bad(i, n, read, name, max_bad=100):
    """read(j) for j = i, i + 1, ... (mod n) until one works -> (read(j), j, n_bad): a file read() cannot decode
    (OSError, ValueError, DecompressionBombError) is warned about (`name(j)` says which) and the next one stands in,
    so an epoch keeps its length; n_bad counts the skipped ones. UserError when max_bad in a row fail.
    Used by ImageFiles and segment.py's ADE20K pairs."""
    for n_bad in range(min(n, max_bad)):
        j = (i + n_bad) % n
        try:
            return read(j), j, n_bad
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            warnings.warn(f'skipping unreadable {name(j)}: {e}')
    raise UserError(f'none of {min(n, max_bad)} consecutive files from {name(i)} could be read')


class ImageFiles(torch.utils.data.Dataset):
    """An image folder, ImageFolder layout (root/<class>/<img>) or flat (root/<img>: classes = [], every label 0),
    whose unreadable files are skipped, not fatal. A missing, empty or mixed folder is a one-line UserError.

    Item i is (transform(rgb_image), label, n_bad): when file i cannot be decoded (unreadable, truncated,
    not an image) the next readable file stands in, a warning is printed, and n_bad counts the files skipped,
    so the epoch keeps its length and the training loop can sum n_bad into its log.
    """

    def __init__(self, root, transform=None):
        if not os.path.isdir(root):
            raise UserError(f"data folder '{root}' does not exist")
        entries = [os.path.join(root, e) for e in sorted(os.listdir(root)) if not e.startswith('.')]
        self.classes = [os.path.basename(e) for e in entries if os.path.isdir(e)]
        self.samples = [(e, 0) for e in entries if os.path.isfile(e) and _is_image(e)]  # [(path, label)]: ImageFolder's
        if self.classes and self.samples:
            raise UserError(f"'{root}' mixes image files and class folders: use root/<class>/<image> or root/<image>")
        if self.classes:  # ImageFolder's walk (sorted, symlinks followed); a class folder may be empty
            self.samples = make_dataset(root, {c: i for i, c in enumerate(self.classes)}, is_valid_file=_is_image,
                                        allow_empty=True)
        if not self.samples:
            raise UserError(f"no images ({' '.join(IMG_EXTENSIONS)}) in '{root}' or its class folders")
        self.transform = transform

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        # pil_loader decodes fully (convert('RGB')): a truncated file raises here, not in a transform
        img, j, n_bad = read_skipping_bad(i, len(self.samples), lambda j: pil_loader(self.samples[j][0]),
                                          lambda j: f"image '{self.samples[j][0]}'")
        return (self.transform(img) if self.transform is not None else img), self.samples[j][1], n_bad


FASHION_MNIST_DIRS = ('/usr/share/datasets/fashion-mnist',)  # Debian's dataset-fashion-mnist package
FASHION_MNIST_CLASSES = tuple(torchvision.datasets.FashionMNIST.classes)  # 'T-shirt/top', 'Trouser', ...


def _read_idx(path):
    """An idx file (the MNIST format, gzipped): big-endian magic (0, 0, dtype=8 for uint8, ndim), dims, data."""
    with gzip.open(path, 'rb') as f:
        data = f.read()
    if data[:3] != b'\x00\x00\x08':
        raise UserError(f"'{path}' is not a uint8 idx file")
    shape = np.frombuffer(data, '>u4', count=data[3], offset=4).tolist()
    return torch.from_numpy(np.frombuffer(data, np.uint8, offset=4 + 4 * len(shape)).reshape(shape).copy())


def fashion_mnist(train=True):
    """Fashion-MNIST as tensors: images uint8 [N, 28, 28], labels int64 [N].

    Reads the idx files from $CIM_FASHION_MNIST (a folder), else from Debian's dataset-fashion-mnist package; else
    torchvision downloads the same files into ~/.cache/cim (the only network access in this codebase: the demo's).
    """
    split = 'train' if train else 't10k'
    names = (f'{split}-images-idx3-ubyte.gz', f'{split}-labels-idx1-ubyte.gz')
    for d in filter(None, (os.environ.get('CIM_FASHION_MNIST'),) + FASHION_MNIST_DIRS):
        if all(os.path.isfile(os.path.join(d, n)) for n in names):
            return _read_idx(os.path.join(d, names[0])), _read_idx(os.path.join(d, names[1])).long()
    cache = os.path.join(os.path.expanduser('~'), '.cache', 'cim')
    print(f'Fashion-MNIST is not installed (Debian: dataset-fashion-mnist); downloading it to {cache}', file=sys.stderr)
    try:
        ds = torchvision.datasets.FashionMNIST(cache, train=train, download=True)
    except Exception:  # an offline machine: one line instead of a urllib traceback
        raise UserError('Fashion-MNIST is not installed and could not be downloaded: apt-get install dataset-fashion-'
                        'mnist, set CIM_FASHION_MNIST=DIR (its idx files), or pass --data DIR') from None
    return ds.data.clone(), ds.targets.clone().long()


class TensorImages(torch.utils.data.Dataset):
    """In-memory gray uint8 images as an image dataset with ImageFiles' items: (transform(rgb_image), label, 0).

    images: [N, H, W] uint8, labels: [N]; `pad` black pixels are added on each side (Fashion-MNIST: 28 + 2 * 2 =
    32 px, a size the patch grids divide, with no interpolation).
    """

    def __init__(self, images, labels, transform=None, pad=0):
        self.images = F.pad(images, (pad,) * 4)  # [N, H + 2 pad, W + 2 pad]
        self.labels = labels
        self.transform = transform

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        img = Image.fromarray(self.images[i].numpy()).convert('RGB')
        return (self.transform(img) if self.transform is not None else img), int(self.labels[i]), 0


def subset(dataset, n, seed=0):
    """--subset: n items of a dataset drawn at random (seeded, so the same n images every run and on every rank),
    across classes rather than the first class's n. -> torch.utils.data.Subset (the dataset itself when n is None
    or covers it)."""
    if n is None or n >= len(dataset):
        return dataset
    if n < 1:
        raise UserError(f'--subset must be >= 1, got {n}')
    idx = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:n]
    return torch.utils.data.Subset(dataset, idx.sort().values.tolist())


class SeededDataset(torch.utils.data.Dataset):
    """Random transforms as a function of (seed, epoch, index) alone.

    Item i of epoch e is drawn with torch's (CPU), numpy's and Python's global RNGs seeded from (seed, e, i) and
    restored afterwards, so crops and masks do not depend on the number of workers or processes, or on where a
    resumed run starts: what makes resume exact and DDP comparable to one process. Call set_epoch before
    iterating (workers are not persistent, so they see the new epoch).
    """

    def __init__(self, dataset, seed=0):
        self.dataset = dataset
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        seed = int(np.random.SeedSequence([self.seed, self.epoch, i]).generate_state(1, np.uint64)[0])
        outer = (random.getstate(), np.random.get_state())  # the caller's streams, restored afterwards
        with torch.random.fork_rng(devices=[]):  # CPU generator only: CUDA streams stay untouched
            torch.default_generator.manual_seed(seed)
            random.seed(seed)
            np.random.seed(seed % 2 ** 32)
            try:
                return self.dataset[i]
            finally:
                random.setstate(outer[0])
                np.random.set_state(outer[1])


class ResumableSampler(torch.utils.data.DistributedSampler):
    """DistributedSampler (shuffled per epoch, drop_last) that can start an epoch at batch `start_batch`.

    Each rank reads every world_size-th index of the epoch's permutation; set_epoch(epoch, start_batch) skips
    the first start_batch * batch_size of them, exactly the batches a resumed run has already consumed.
    One process: pass num_replicas=1, rank=0 (no process group needed).
    """

    def __init__(self, dataset, batch_size, num_replicas=1, rank=0, shuffle=True, seed=0):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=True)
        self.batch_size = batch_size
        self.start_batch = 0

    def set_epoch(self, epoch, start_batch=0):
        super().set_epoch(epoch)
        self.start_batch = start_batch

    def __iter__(self):
        return itertools.islice(super().__iter__(), self.start_batch * self.batch_size, None)

    def __len__(self):
        return self.num_samples - self.start_batch * self.batch_size


def ShardSampler(n, num_replicas=1, rank=0):
    """Evaluation order: rank r reads indices r, r + W, r + 2W, ... of n, so every image is seen exactly once over
    all W ranks (DistributedSampler pads with repeats, which would count some images twice). -> a range, which
    DataLoader takes as a sampler."""
    if n < num_replicas:
        raise UserError(f'{n} evaluation images cannot be spread over {num_replicas} processes')
    return range(rank, n, num_replicas)


def train_loader(dataset, sampler, batch_size, accum_iter, num_workers, seed, device):
    """The training DataLoader (full batches, pinned memory on CUDA, seeded worker order) -> (loader, optimizer
    steps per epoch). dataset: a SeededDataset; sampler: a ResumableSampler (or one with its num_samples,
    num_replicas and set_epoch). UserError when the dataset is too small for a single optimizer step."""
    loader = torch.utils.data.DataLoader(dataset, batch_size, sampler=sampler, num_workers=num_workers,
                                         drop_last=True, pin_memory=device.type == 'cuda',
                                         generator=torch.Generator().manual_seed(seed))
    steps_per_epoch = sampler.num_samples // batch_size // accum_iter  # num_samples: per rank, whole epoch
    if steps_per_epoch == 0:
        raise UserError(f'{len(dataset)} training samples give no optimizer step: one needs batch {batch_size} x '
                        f'{sampler.num_replicas} processes x {accum_iter} accumulation steps')
    return loader, steps_per_epoch


def endless_batches(loader, start_step, steps_per_epoch, accum_iter):
    """The training loader's micro-batches from optimizer step start_step on, epoch after epoch. Each epoch sets
    the sampler's and the dataset's epoch, so a resumed run sees exactly the batches (and the seeded crops) that an
    uninterrupted one would."""
    first_epoch, first_step = divmod(start_step, steps_per_epoch)
    for epoch in itertools.count(first_epoch):
        done = first_step * accum_iter if epoch == first_epoch else 0  # micro-batches the resumed epoch already had
        loader.sampler.set_epoch(epoch, done)
        loader.dataset.set_epoch(epoch)
        yield from itertools.islice(loader, steps_per_epoch * accum_iter - done)


# ----------------------------------------------------------------------------------------------------------------
# Distributed: torchrun environment, one process per GPU (or CPU process with gloo)

def init_distributed():
    """-> (rank, world_size, device). Under torchrun (RANK, WORLD_SIZE, LOCAL_RANK set): one process group,
    nccl on CUDA (device cuda:LOCAL_RANK), gloo on CPU. Plain `python script.py`: one process, no group."""
    cuda = torch.cuda.is_available()
    if 'RANK' not in os.environ or 'WORLD_SIZE' not in os.environ:
        return 0, 1, torch.device('cuda' if cuda else 'cpu')
    device = torch.device('cuda', int(os.environ.get('LOCAL_RANK', 0))) if cuda else torch.device('cpu')
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group('nccl' if cuda else 'gloo')  # env:// reads RANK and WORLD_SIZE
    return dist.get_rank(), dist.get_world_size(), device


def is_main():
    """True on rank 0 (or without a process group): the one process that prints, logs and saves."""
    return not dist.is_initialized() or dist.get_rank() == 0


def sum_over_ranks(x):
    """x: a tensor, summed in place over all ranks (as is without a process group) -> x."""
    if dist.is_initialized():
        dist.all_reduce(x)
    return x


def seed_rank(seed, rank):
    """Seeds torch, numpy and Python for one rank's own random stream (masks, samples, mixing, stochastic depth).
    Rank 0 takes `seed` itself (a one-process run is unchanged); rank r > 0 a number derived from the pair
    (seed, r) by numpy's SeedSequence, so rank 1 of seed s never repeats rank 0 of seed s + 1 (as seed + rank did)."""
    if rank:
        seed = int(np.random.SeedSequence([seed, rank]).generate_state(1)[0])
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


# ----------------------------------------------------------------------------------------------------------------
# Optimization: AdamW parameter groups, lr schedule, layer decay, stochastic depth (ResNet), precision, grad norm

def param_groups(model, weight_decay, no_decay_keys=(), lr_scale=None):
    """AdamW parameter groups (BEiT/MAE practice): weight decay on weight matrices and kernels; none on 1-D tensors,
    biases, and parameters whose name contains one of no_decay_keys (norms, position/cls/mask embeddings).
    Frozen parameters are left out. lr_scale(name) -> float (optional, e.g. layer-wise decay) is stored as
    group['lr_scale']; the training loops set group['lr'] = lr * group['lr_scale']. -> list of dicts.
    """
    groups = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        wd = 0.0 if p.ndim <= 1 or name.endswith('.bias') or any(k in name for k in no_decay_keys) else weight_decay
        scale = lr_scale(name) if lr_scale else 1.0
        groups.setdefault((wd, scale), {'params': [], 'weight_decay': wd, 'lr_scale': scale})['params'].append(p)
    return list(groups.values())


def scaled_lr(lr_at_ref, total_batch, ref_batch):
    """Linear scaling rule (Goyal et al. 2017): the lr for total_batch given the lr at ref_batch."""
    return lr_at_ref * total_batch / ref_batch


def cosine_schedule(peak_lr, min_lr, total_steps, warmup_steps):
    """The lr of every optimizer step: linear warmup to peak_lr (reached at the last warmup step), then half-cosine
    decay to min_lr at total_steps. -> list of total_steps floats."""
    warmup = [peak_lr * (step + 1) / warmup_steps for step in range(warmup_steps)]
    decay = max(1, total_steps - warmup_steps)
    cosine = [min_lr + (peak_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * (step / decay)))
              for step in range(total_steps - warmup_steps)]
    return (warmup + cosine)[:total_steps]  # a warmup longer than the run is cut too


def vit_layer_id(name, depth, prefix=''):
    """BEiT's layer id of a ViT parameter, for layer-wise lr decay: the patch / position / cls / mask embeddings 0,
    blocks.i -> i + 1, everything else (final norm, classifier, decoder) depth + 1. `prefix`: the ViT's place in
    the model ('backbone.'); parameters outside it count as 'everything else'."""
    if not name.startswith(prefix):
        return depth + 1
    parts = name[len(prefix):].split('.')
    if parts[0] in ('patch_embed', 'pos_embed', 'cls_token', 'mask_token'):
        return 0
    return int(parts[1]) + 1 if parts[0] == 'blocks' else depth + 1


def layer_decay(depth, decay, prefix=''):
    """Layer-wise lr decay (BEiT; Clark et al. 2020) as lr_scale(name) for param_groups():
    decay ** (depth + 1 - layer id), so the classifier gets the full lr and the embeddings decay ** (depth + 1)."""
    return lambda name: decay ** (depth + 1 - vit_layer_id(name, depth, prefix))


def _drop_branch(drop, module, inputs, output):
    return drop(output)


def add_stochastic_depth(resnet, rate):
    """Stochastic depth (Huang et al. 2016) for a torchvision ResNet, whose blocks we keep unchanged: the residual
    branch of block i (its last BatchNorm's output, before the shortcut is added) is dropped for whole samples with
    probability rate * i / (blocks - 1) (timm / BEiT: linspace(0, rate, depth)), the kept ones scaled by 1 / (1 - p).
    A forward hook and a parameter-free `block.drop_path` submodule, so the state dict keeps torchvision's names.
    (cim.VisionTransformer has it in Block.forward.) -> resnet."""
    kinds = (torchvision.models.resnet.Bottleneck, torchvision.models.resnet.BasicBlock)
    blocks = [m for m in resnet.modules() if isinstance(m, kinds)]
    for i, block in enumerate(blocks):
        p = rate * i / max(1, len(blocks) - 1)
        if p == 0:
            continue
        block.drop_path = torchvision.ops.StochasticDepth(p, 'row')
        # on the last BatchNorm (a Bottleneck's bn3, a BasicBlock's bn2); a partial, not a lambda: it pickles, and a
        # deepcopy's hook drops with the copy's drop_path
        getattr(block, 'bn3', block.bn2).register_forward_hook(functools.partial(_drop_branch, block.drop_path))
    return resnet


def resolve_amp(amp, device):
    """--amp {bf16, fp16, none} or None -> the autocast dtype (None: full precision). Unset: bf16 on a GPU, none on a
    CPU (most CPUs lack bf16 instructions: a first vit_tiny step took 80 s, 10 s in fp32). A GPU without bf16: fp16."""
    if amp is None:
        amp = 'bf16' if device.type == 'cuda' else 'none'
    if amp == 'bf16' and device.type == 'cuda' and not torch.cuda.is_bf16_supported():
        warnings.warn('this GPU has no bf16: using fp16 autocast with loss scaling instead')
        amp = 'fp16'
    return {'bf16': torch.bfloat16, 'fp16': torch.float16, 'none': None}[amp]


def grad_norm(parameters):
    """Global L2 norm of the gradients: [0-dim] fp64, finite exactly when every gradient is finite (each tensor's
    norm is accumulated in fp64, where squares of finite fp32 gradients cannot overflow; clip_grad_norm_'s fp32 norm
    turns large finite gradients into inf). One multi-tensor kernel on CUDA (_foreach_norm), not one per tensor."""
    grads = [p.grad.detach() for p in parameters if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads, 2.0, dtype=torch.float64)))


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints: atomic, the previous one kept, RNG states included, loadable with weights_only=True

CHECKPOINT = 'checkpoint-last.pth'
PREVIOUS = 'checkpoint-prev.pth'


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


_held = {}  # output folders this process has locked: their open lock files


def lock_output_dir(output_dir):
    """Creates output_dir and takes its lock (rank 0; flock on output_dir/.lock, released when the process ends,
    however it ends). A folder that another live process holds (say, the workers of a torchrun that was killed
    without them) is refused with a UserError, instead of two runs racing on one checkpoint and log."""
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.realpath(os.path.join(output_dir, '.lock'))
    if not is_main() or path in _held:
        return
    f = open(path, 'a+')
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        with f:
            f.seek(0)
            raise UserError(f"'{output_dir}' is in use by a live run (process {f.read().strip() or '?'}); stop it "
                            f"(its torchrun workers too) or pass another --output-dir") from None
    f.truncate(0)
    print(os.getpid(), file=f, flush=True)  # for the message of a refused run
    _held[path] = f


def truncate_log(path, step):
    """Drops the records of log.jsonl after optimizer step `step` (logged by a run that was killed after its last
    checkpoint): the resumed run logs them again, so the file stays one record per interval (rank 0)."""
    if not is_main() or not os.path.isfile(path):
        return
    with open(path) as f:
        kept = [line for line in f if json.loads(line).get('step', 0) <= step]
    with open(path, 'w') as f:
        f.writelines(kept)


def find_checkpoint(output_dir):
    """output_dir/checkpoint-last.pth (or -prev.pth) if there is one, else None."""
    paths = [os.path.join(output_dir, name) for name in (CHECKPOINT, PREVIOUS)]
    return next((path for path in paths if os.path.isfile(path)), None)


def torch_load(path, what):
    """torch.load(weights_only=True) on the CPU, with a one-line UserError (under 200 characters plus the path) for
    a missing file, a file torch.save did not write (or a truncated one), and a pickle of other Python objects,
    which is refused: unpickling those can run code. `what` names the file in the message ('checkpoint', ...)."""
    if not os.path.isfile(path):
        raise UserError(f"{what} '{path}' does not exist")
    try:
        with warnings.catch_warnings(action='ignore'):  # torch warns about pickle protocols on some non-checkpoints
            return torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:  # zip, EOF, key and unpickling errors
        if isinstance(e, pickle.UnpicklingError) and 'unsupported global' in str(e).lower():
            raise UserError(f"'{path}' is not a {what}: it holds pickled Python objects other than tensors "
                            f"(refused: unpickling them can run code)") from None
        raise UserError(f"'{path}' is not a {what}: not a file written by torch.save, or truncated") from None


def save_training_state(model, optimizer, scaler, args, log, skip_prefix=None, **position):
    """Every rank: checkpoint-last.pth in args.output_dir (the previous one kept as checkpoint-prev.pth) with
    model, optimizer, scaler, each rank's RNG state, the log dict, args and `position` (step=N, required; other
    entries are for load_training_state to check); rank 0 writes it atomically, so a crash at any point leaves a
    complete checkpoint. A non-finite model raises TrainingError instead, keeping the last good checkpoint.
    skip_prefix: model keys not saved (a frozen part)."""
    if not all_finite(model):
        raise TrainingError(f"the model became non-finite at step {position['step']}; the last good checkpoint is "
                            f"in {args.output_dir}")
    rng = [rng_state()]  # every rank's: a resumed rank r goes on with rank r's stream
    if dist.is_initialized():
        rng = [None] * dist.get_world_size()
        dist.all_gather_object(rng, rng_state())
    if is_main():
        state = {k: v for k, v in model.state_dict().items() if not (skip_prefix and k.startswith(skip_prefix))}
        atomic_save(dict(model=state, optimizer=optimizer.state_dict(), scaler=scaler.state_dict(), rng=rng,
                         log=dict(log), args=vars(args), **position), os.path.join(args.output_dir, CHECKPOINT),
                    previous=os.path.join(args.output_dir, PREVIOUS))


def load_training_state(path, model, optimizer, scaler, args, rank, log, same_args, skip_prefix=None, **same):
    """Resumes from a save_training_state() checkpoint -> (its dict, the path actually read).

    An unreadable checkpoint-last.pth (truncated by a crash) with checkpoint-prev.pth beside it: says so and reads
    that one. Then checks that the run is the same: args named in `same_args` and the `same` entries (name=value
    now) must equal the checkpoint's, else a one-line UserError. Loads model (strict, but for skip_prefix),
    optimizer, scaler, this rank's RNG states, updates `log`, drops log.jsonl's records after the checkpoint's step
    (truncate_log), and says where it resumed."""
    try:
        state = torch_load(path, 'checkpoint')
    except UserError as e:
        previous = os.path.join(os.path.dirname(path), PREVIOUS)
        if os.path.basename(path) != CHECKPOINT or not os.path.isfile(previous):
            raise
        print(f"warning: {e}; using the previous one, '{previous}'", file=sys.stderr)
        path = previous
        state = torch_load(path, 'checkpoint')
    if not isinstance(state, dict) or not all(k in state for k in ('model', 'args', 'optimizer', 'scaler', 'rng')):
        raise UserError(f"'{path}' is not a training checkpoint to resume (no model/args/optimizer/RNG state)")
    pairs = [(f"--{k.replace('_', '-')}", state['args'].get(k), getattr(args, k)) for k in same_args]
    pairs += [(k, state.get(k), v) for k, v in same.items()]  # (name, the checkpoint's value, this run's)
    diff = [f'{name} {then} (now {now})' for name, then, now in pairs if then != now]
    if diff:
        raise UserError(f"'{path}' was written with {', '.join(diff)}; resume with those or use another --output-dir")
    missing, unexpected = model.load_state_dict(state['model'], strict=False)
    missing = [k for k in missing if not (skip_prefix and k.startswith(skip_prefix))]
    if missing or unexpected:
        raise UserError(f"'{path}' does not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    optimizer.load_state_dict(state['optimizer'])
    scaler.load_state_dict(state['scaler'])
    set_rng_state(state['rng'][rank])
    log.update(state['log'])
    truncate_log(os.path.join(args.output_dir, 'log.jsonl'), state['step'])
    if is_main():
        print(f"resumed from '{path}' at step {state['step']}")
    return state, path


# ----------------------------------------------------------------------------------------------------------------
# Pre-trained weights: every layout read, the backbone loaded strictly (finetune.py, segment.py)

def read_weights(path):
    """The state dict in a weights file -> (state dict, args dict or {}), every supported layout unwrapped:
    a train.py checkpoint ({'model': CIM state, 'args'}: its 'enhancer.*' weights, the backbone), a `train.py --export`
    file, a torchvision / timm state dict, the {'model': ...} / {'state_dict': ...} / 'module.' wrappers of MAE, BEiT,
    DeiT and DDP, and 'backbone.*' weights (a linear probe, mmseg). Raises UserError (one line)."""
    obj = torch_load(path, 'weights file')
    wrapped = [obj[key] for key in ('model', 'state_dict') if isinstance(obj, dict) and isinstance(obj.get(key), dict)]
    meta = obj['args'] if wrapped and isinstance(obj.get('args'), dict) else {}
    obj = wrapped[0] if wrapped else obj
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UserError(f"'{path}' holds no state dict (a dict of parameter names to tensors)")
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


def interpolate_pos_embed(pos_embed, num_patches):
    """ViT position embeddings for another square grid (BEiT / MAE practice: bicubic on the grid, cls kept).
    pos_embed: [1, 1 + n0, D] -> [1, 1 + num_patches, D]."""
    g0 = math.isqrt(pos_embed.shape[1] - 1)
    g = math.isqrt(num_patches)
    if g0 * g0 != pos_embed.shape[1] - 1 or g * g != num_patches:
        raise UserError(f'cannot resize position embeddings of {pos_embed.shape[1] - 1} patches to {num_patches}: '
                        f'square grids (with a cls token) only')
    grid = pos_embed[:, 1:].reshape(1, g0, g0, -1).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=(g, g), mode='bicubic', align_corners=False)
    return torch.cat([pos_embed[:, :1], grid.permute(0, 2, 3, 1).flatten(1, 2).to(pos_embed.dtype)], dim=1)


def load_pretrained(model, state, source='weights', classifier=('head.', 'fc.'), verbose=True):
    """Copies a backbone state dict into model (cim's ViT or a torchvision ResNet, with or without classifier).

    Every backbone parameter and buffer of the model must be in `state` with its shape: a missing one, another
    network family (ResNet weights into a ViT), another width, depth or patch size raises UserError, because a
    half-loaded backbone gives silently wrong results. ViT position embeddings of another grid are interpolated.
    The classifier (names starting with `classifier`) loads only if its shape fits. Keys under modules the model
    lacks (MAE's decoder, BEiT's mask token, ...) are ignored. Prints what was left out. -> (missing, ignored).
    """
    own = model.state_dict()
    family = weights_family(own)
    theirs = weights_family(state) or f"neither ViT nor ResNet ({', '.join(list(state)[:3])}, ...)"
    if theirs != family:
        raise UserError(f'{source} holds {theirs} weights but the model is a {family}')
    state = dict(state)
    if 'pos_embed' in state and 'pos_embed' in own and state['pos_embed'].shape != own['pos_embed'].shape:
        if state['pos_embed'].shape[-1] == own['pos_embed'].shape[-1]:
            state['pos_embed'] = interpolate_pos_embed(state['pos_embed'], own['pos_embed'].shape[1] - 1)
    mismatched = [k for k in state if k in own and state[k].shape != own[k].shape]
    for k in sorted(mismatched, key=lambda k: k != 'patch_embed.proj.weight'):  # that one tells width and patch
        if not k.startswith(classifier):
            raise UserError(f'{source} does not fit the model: {k} is {list(state[k].shape)} there and '
                            f'{list(own[k].shape)} here (another architecture, width or patch size?)')
        del state[k]  # a classifier for another number of classes
    modules = {k.split('.')[0] for k in own}
    structural = [k for k in state if k not in own and k.split('.')[0] in modules and not k.startswith(classifier)]
    missing = [k for k in own if k not in state]
    bad = structural or [k for k in missing if not k.startswith(classifier)]
    if bad:
        raise UserError(f"{source} does not fit the model: {'unexpected' if structural else 'missing'} "
                        f"{', '.join(bad[:3])} ({len(bad)} keys; another architecture or depth?)")
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
            raise UserError(f"no --data: '{init}', the demo's checkpoint, does not exist; run `python train.py` first")
    elif init is None:
        raise UserError("--init is required with --data: pre-trained weights (see --help) or 'none' for random init")
    return init, (read_weights(init)[1] if init != 'none' else {})


# ----------------------------------------------------------------------------------------------------------------
# Logging and evaluation

def log_jsonl(path, record):
    """Appends one JSON line (rank 0 only). Non-finite floats are written as null (strict JSON)."""
    record = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
    with open(path, 'a') as f:
        f.write(json.dumps(record) + '\n')


class Tally:
    """A log interval's sums, kept on the device so that the training step never waits for the host: the sum of
    each metric and of the grad norm over the good steps, the good and skipped (non-finite) steps, the skipped steps
    in a row, and the unreadable files the loader skipped. close() reads them once (the interval's one host sync).

        tally = engine.Tally(('loss',), total_batch, device)
        tally.add(metrics, norm, skipped_files)               # each step, no host sync
        record = tally.close(log)                              # each log interval: means, img/s, counts
        tally.check(args.max_bad_steps, done, args.output_dir)  # after logging it: stop if the run diverged
    """

    def __init__(self, keys, total_batch, device):
        self.keys = tuple(keys) + ('grad_norm',)
        self.total_batch = total_batch
        self.world = dist.get_world_size() if dist.is_initialized() else 1
        self.sums = torch.zeros(len(self.keys) + 2, device=device)  # [each key, grad norm, good steps, skipped]
        self.bad_run = torch.zeros((), device=device)  # skipped steps in a row (not reset at a log)
        self.n_bad = torch.zeros((), dtype=torch.long)  # on the CPU, where the loader's counts arrive
        self.t0 = time.time()
        self.totals = [0.0] * (len(self.sums) + 2)  # the last close()'s, summed over ranks (see there)

    def means(self, totals):
        """{key: its sum / the good steps (NaN when none)} from totals laid out as self.totals (an interval's, or
        several intervals' added up)."""
        *sums, good = totals[:len(self.keys) + 1]
        return {k: v / good if good else float('nan') for k, v in zip(self.keys, sums)}

    def add(self, metrics, norm, skipped_files):
        """metrics: [K] (the keys' micro-batch means), norm: [0-dim] grad norm, inf / NaN when the step was
        skipped; skipped_files: the loader's per-image counts of unreadable files."""
        good = norm.isfinite()  # a skipped step adds to the counts only: its metrics may be inf / NaN
        self.sums[:-2] += torch.where(good, torch.cat([metrics.float(), norm.float().view(1)]), 0.0)
        self.sums[-2:] += torch.stack([good, ~good]).float()
        self.bad_run = torch.where(good, 0.0, self.bad_run + 1)
        self.n_bad += skipped_files.sum()

    def close(self, log):
        """Ends the interval -> {key: mean over its good steps (NaN when none), imgs_per_s, n_bad_images,
        skipped_steps}; the last two are run totals, kept in `log` (and so in the checkpoint). self.totals: the
        interval's sums over ranks, [K + 1 means' sums, good steps, skipped steps, bad run, files]."""
        # the host sync of the interval: everything summed over ranks in one all_reduce, read once
        counts = torch.stack([self.bad_run, self.n_bad.to(self.sums.device)])  # [bad run, files]
        self.totals = sum_over_ranks(torch.cat([self.sums, counts])).tolist()
        *_, good, skipped, _, n_bad = self.totals
        steps = (good + skipped) / self.world  # every rank counts the same steps
        log['skipped_steps'] += round(skipped / self.world)
        log['n_bad_images'] += round(n_bad)
        now = time.time()
        record = dict(self.means(self.totals), imgs_per_s=steps * self.total_batch / (now - self.t0),
                      n_bad_images=log['n_bad_images'], skipped_steps=log['skipped_steps'])
        self.sums.zero_()
        self.n_bad.zero_()
        self.t0 = now
        return record

    def check(self, max_bad_steps, step, output_dir):
        """After the log line: TrainingError once max_bad_steps steps in a row were skipped (as of the last close)."""
        if self.totals[-2] / self.world >= max_bad_steps:  # the bad run, as every rank counts it
            raise TrainingError(f'{max_bad_steps} consecutive steps had a non-finite loss or gradients and were '
                                f'skipped; stopped at step {step} (last good checkpoint in {output_dir}); lower the lr')


def progress(enabled=True, **kwargs):
    """A tqdm bar on rank 0 in a terminal only: logs redirected to a file get the printed log lines, not a stream of
    carriage-return updates."""
    return tqdm(disable=not (enabled and is_main() and sys.stderr.isatty()), dynamic_ncols=True, **kwargs)


@torch.no_grad()
def evaluate(fn, loader, device, dtype=None, desc='eval'):
    """Sums of fn(inputs, targets) -> {name: tensor} over every batch of loader and over all ranks.

    fn returns per-batch sums (correct counts, loss sums, confusion matrices) and runs under autocast; inputs and
    targets are the first two items of each batch, on device. Use a ShardSampler so each sample counts once.
    -> {name: float64 tensor}; the caller divides. One all_reduce per name, at the end.
    """
    sums = {}
    for inputs, targets, *_ in progress(iterable=loader, desc=desc, leave=False):
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            out = fn(inputs.to(device, non_blocking=True), targets.to(device, non_blocking=True))
        for k, v in out.items():
            sums[k] = sums.get(k, 0) + torch.as_tensor(v, device=device).detach().to(torch.float64)
    for k in sorted(sums):
        sum_over_ranks(sums[k])
    return sums


@torch.no_grad()
def extract_features(fn, loader, device, dtype=None):
    """fn(imgs) -> [B, D] over a loader of (imgs, labels, ...) batches -> (features [N, D] float32, labels [N]), CPU."""
    feats = []
    labels = []
    for imgs, y, *_ in loader:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            feats.append(fn(imgs.to(device, non_blocking=True)).float().cpu())
        labels.append(torch.as_tensor(y))
    return torch.cat(feats), torch.cat(labels)


@torch.no_grad()
def recompute_bn_stats(model, loader, device, dtype=None, max_images=2048):
    """Re-estimate every BatchNorm's running mean and variance on the first max_images images of loader (batches
    of (imgs, ...)), as a plain average over batches (torch's swa_utils.update_bn); the model is left in eval mode.
    The evaluation protocol for frozen features of a BN network (kNN, linear probe), applied alike to pre-trained
    and random-init networks: the pre-trained statistics were gathered on corrupted images, a random network's were
    never gathered at all, so both get those of the images being evaluated. No BatchNorm (a ViT): nothing happens.
    update_bn runs the whole model in train mode: the backbones given here have no dropout or drop path. -> model."""
    def first_images():
        seen = 0
        for imgs, *_ in loader:
            if seen >= max_images:
                return
            yield imgs[:max_images - seen]
            seen += len(imgs)
    with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
        torch.optim.swa_utils.update_bn(first_images(), model, device)
    return model.eval()


@torch.no_grad()
def knn_accuracy(train_feats, train_labels, test_feats, test_labels, k=20, T=0.07, chunk=1024):
    """Weighted kNN classifier as in DINO (Wu et al. 2018): cosine similarity to all training features, the k
    nearest vote for their label with weight exp(similarity / T).

    train_feats: [N, D], train_labels: [N] long, test_feats: [M, D], test_labels: [M] -> top-1 accuracy in [0, 1].
    Test features are processed in chunks, so memory is chunk x N.
    """
    train = F.normalize(train_feats.float(), dim=1)
    test = F.normalize(test_feats.float(), dim=1)
    train_labels = train_labels.long().to(train.device)
    num_classes = int(train_labels.max()) + 1  # a test label beyond them gets no vote and counts as wrong
    correct = 0
    for i in range(0, len(test), chunk):
        sim, idx = (test[i:i + chunk] @ train.T).topk(min(k, len(train)), dim=1)   # [b, k]
        votes = sim.new_zeros(len(sim), num_classes).scatter_add_(1, train_labels[idx], (sim / T).exp())
        correct += int((votes.argmax(1) == test_labels[i:i + chunk].to(train.device)).sum())
    return correct / len(test)


# ----------------------------------------------------------------------------------------------------------------
# Command line: recipes, the project's one-line errors

class UserError(ValueError):
    """A user mistake (a missing file, a wrong folder layout, a bad flag value): printed as one line 'error: ...'
    by run_cli, no traceback. Every other exception is a bug and keeps its traceback."""


class TrainingError(UserError):
    """The run cannot go on (the loss stayed non-finite): one line too, exit status 1."""


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """--help: the description as written; after each flag, its value in each recipe ('(Table 9: 300; demo: 4)'),
    else '(default: X)' when its default is not None."""

    def __init__(self, prog, recipes=None):
        super().__init__(prog)
        self.recipes = recipes or {}

    def _get_help_string(self, action):
        values = [f'{name}: {show(r[action.dest])}' for name, r in self.recipes.items() if action.dest in r]
        if values:
            return f"{action.help or ''} ({'; '.join(values).replace('%', '%%')})"
        return action.help if action.default is None else super()._get_help_string(action)


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are the project's: one line 'error: <message>' on stderr, exit status 2. recipes:
    {name: recipe}, the literal dicts whose values --help shows at each flag (a flag left unset takes its recipe's
    value: apply_recipe)."""

    def __init__(self, recipes=None, **kwargs):
        super().__init__(formatter_class=functools.partial(HelpFormatter, recipes=recipes), **kwargs)

    def error(self, message):
        self.exit(2, f'error: {message}\n')  # on stderr


def checked(cast, ok, what):
    """An argparse type: cast(text), refused with one line ('argument --epochs: must be >= 1, got 0') unless
    ok(value). The flags' own checks; what a recipe sets is trusted."""
    def parse(text):
        value = cast(text)
        if not ok(value):
            raise argparse.ArgumentTypeError(f'must be {what}, got {text}')
        return value
    parse.__name__ = cast.__name__  # argparse's 'invalid int value' for text that is not a number
    return parse


POSITIVE = checked(int, lambda v: v >= 1, '>= 1')
NON_NEGATIVE = checked(int, lambda v: v >= 0, '>= 0')
NON_NEGATIVE_FLOAT = checked(float, lambda v: v >= 0, '>= 0')
FRACTION = checked(float, lambda v: 0 < v <= 1, 'in (0, 1]')
PROBABILITY = checked(float, lambda v: 0 <= v < 1, 'in [0, 1)')


def show(value):
    """A flag's value as typed: (0.9, 0.98) -> '0.9 0.98'."""
    return ' '.join(map(str, value)) if isinstance(value, (tuple, list)) else str(value)


def flags(values):
    """{'batch_size': 64, ...} -> '--batch-size 64 ...' (how the values taken from a recipe are printed)."""
    return ' '.join(f"--{k.replace('_', '-')} {show(v)}" for k, v in values.items())


def apply_recipe(args, recipe):
    """The one override rule of all three scripts: a flag left unset (None) takes the recipe's value; an explicit
    flag always wins. -> {name: value} of the values taken (to print)."""
    taken = {k: v for k, v in recipe.items() if getattr(args, k, None) is None}
    vars(args).update(taken)
    return taken


def add_common_args(parser, output_dir_help):
    """The flags every training script has, under one name each: output, resume, precision, workers, seed,
    logging, checkpoints and the non-finite stop. --num-workers, --log-every and --save-every-steps are None here:
    the script's recipe gives them."""
    g = parser.add_argument_group('system')
    g.add_argument('--output-dir', help=output_dir_help)
    g.add_argument('--resume', metavar='CKPT', help='checkpoint to resume; default: OUTPUT_DIR/checkpoint-last.pth')
    g.add_argument('--amp', choices=('bf16', 'fp16', 'none'), help='autocast dtype; default: bf16 on a GPU, else none')
    g.add_argument('--num-workers', type=NON_NEGATIVE, help='data loader processes per GPU')
    g.add_argument('--seed', type=int, default=0, help='model init, data order, augmentations')
    g.add_argument('--log-every', type=POSITIVE, help='optimizer steps between log lines (log.jsonl and printed)')
    g.add_argument('--save-every-steps', type=NON_NEGATIVE, help='optimizer steps between checkpoint saves (0: off)')
    g.add_argument('--max-bad-steps', type=POSITIVE, default=20, help='stop after this many non-finite steps in a row')
    return g


def run_cli(main):
    """Runs main(): a UserError prints 'error: <message>' (one line) to
    stderr and exits with status 2 (a TrainingError: 1). Any other exception is a bug: its traceback is printed."""
    try:
        main()
    except UserError as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        sys.exit(1 if isinstance(e, TrainingError) else 2)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
