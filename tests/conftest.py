"""Shared test helpers: tiny models and data built in the test, never downloaded."""
import gzip
import os

import numpy as np
import pytest
import torch

import dvae


def tiny_tokenizer(vocab_size=512, n_hid=8, group_count=3, seed=0):
    """A randomly initialised small dVAE tokenizer (downsample 2 ** (group_count - 1)), frozen like the real one."""
    torch.manual_seed(seed)
    return dvae.Tokenizer(vocab_size=vocab_size, n_hid=n_hid, n_blk_per_group=1, group_count=group_count)


def write_idx(path, array):
    """A gzipped idx file (the MNIST format) of a uint8 array: magic (0, 0, 8, ndim), big-endian dims, data."""
    header = bytes([0, 0, 8, array.ndim]) + b''.join(int(d).to_bytes(4, 'big') for d in array.shape)
    with gzip.open(path, 'wb') as f:
        f.write(header + array.astype(np.uint8).tobytes())


def fake_fashion_mnist(root, n_train=400, n_test=200, seed=0):
    """Fashion-MNIST's four idx files with n_train / n_test 28x28 images in 10 classes that a network can tell
    apart: class k is a bright bar at row 2 + 2k on a noisy dark background. -> root."""
    rng = np.random.default_rng(seed)
    os.makedirs(root, exist_ok=True)
    for split, n in (('train', n_train), ('t10k', n_test)):
        labels = np.arange(n) % 10
        rng.shuffle(labels)
        images = rng.integers(0, 40, (n, 28, 28))
        for i, k in enumerate(labels):
            images[i, 2 + 2 * k: 5 + 2 * k, 4:24] = 200 + rng.integers(0, 55)
        write_idx(os.path.join(root, f'{split}-images-idx3-ubyte.gz'), images)
        write_idx(os.path.join(root, f'{split}-labels-idx1-ubyte.gz'), labels)
    return root


@pytest.fixture(scope='session', autouse=True)
def fashion_mnist_dir(tmp_path_factory):
    """Every test (and every subprocess it starts) reads a small generated Fashion-MNIST through
    $CIM_FASHION_MNIST, never the real files or the network: CI machines have neither."""
    root = fake_fashion_mnist(str(tmp_path_factory.mktemp('fashion_mnist')))
    old = os.environ.get('CIM_FASHION_MNIST')
    os.environ['CIM_FASHION_MNIST'] = root
    yield root
    if old is None:
        del os.environ['CIM_FASHION_MNIST']
    else:
        os.environ['CIM_FASHION_MNIST'] = old
