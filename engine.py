"""Plumbing shared by train.py, finetune.py, segment.py and dvae.py: data loading, distributed setup,
checkpoints, lr schedule, logging. The method itself lives in cim.py; nothing here is CIM-specific.
"""
import gzip
import os
import sys
import warnings

import numpy as np
import torch
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
