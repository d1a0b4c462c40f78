"""Shared test helpers: tiny models and data built in the test, never downloaded."""
import gzip
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import dvae
import engine


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


# ---------------------------------------------------------------------------------------------------------------
# A run 'killed' inside the test process, for the resume tests

class Preempted(Exception):
    """What the patched save or log raises: the job killed right after a checkpoint (or a log record)."""


def release_output_locks():
    """What a process's death does to its output-folder locks (engine.lock_output_dir): a run 'killed' inside the
    test process lets go of its folder, so that the rerun (often a subprocess) may take it."""
    for f in engine._held.values():
        f.close()
    engine._held.clear()


@pytest.fixture(autouse=True)
def _release_output_locks():
    yield
    release_output_locks()


def preempt_after(monkeypatch, n, name='save_training_state', when=lambda kwargs, record: True):
    """engine.save_training_state (or engine.log_jsonl) as it is, but the process 'dies' (Preempted, locks released)
    right after its n-th call for which when(kwargs, record) holds. -> the list of those calls' steps."""
    real = getattr(engine, name)
    steps = []

    def patched(*args, **kwargs):
        real(*args, **kwargs)
        record = args[1] if name == 'log_jsonl' else None
        if when(kwargs, record):
            steps.append(record['step'] if record else kwargs['step'])
            if len(steps) == n:
                release_output_locks()
                raise Preempted(f'killed after step {steps[-1]}')
    monkeypatch.setattr(engine, name, patched)
    return steps


@pytest.fixture
def held_dir(tmp_path):
    """An output folder that another live process holds (engine.lock_output_dir), as the workers of a torchrun that
    was killed without them would. -> (its path, the process)."""
    out = tmp_path / 'held'
    code = f"import engine, time; engine.lock_output_dir({str(out)!r}); print('locked', flush=True); time.sleep(120)"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    p = subprocess.Popen([sys.executable, '-c', code], cwd=root, stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == 'locked'
    yield out, p
    p.kill()
    p.wait()
