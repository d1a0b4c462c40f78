"""engine.py: each piece against a hand-computed or brute-force reference."""
import math
import os
import random

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import engine

CPU = torch.device('cpu')


# ---------------------------------------------------------------------------------------------------------------
# lr schedule and parameter groups

def test_cosine_lr_warmup_peak_and_end():
    lrs = [engine.cosine_lr(s, total_steps=100, warmup_steps=10, peak_lr=1.0, min_lr=0.1) for s in range(100)]
    assert lrs[:10] == pytest.approx([(s + 1) / 10 for s in range(10)])    # linear, peak at the last warmup step
    assert lrs[10] == pytest.approx(1.0)
    assert lrs[55] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 45 / 90)))
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))                # cosine decays monotonically
    assert engine.cosine_lr(100, 100, 10, 1.0, 0.1) == pytest.approx(0.1)
    assert engine.scaled_lr(1.5e-3, 512, 2048) == pytest.approx(3.75e-4)


def test_param_groups_no_decay_names_and_lr_scale():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.pos_embed, self.cls_token = nn.Parameter(torch.zeros(1, 5, 4)), nn.Parameter(torch.zeros(1, 1, 4))
            self.mask_token = nn.Parameter(torch.zeros(1, 1, 4))
            self.fc, self.norm = nn.Linear(4, 4), nn.LayerNorm(4)
            self.conv, self.bn1 = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)
            self.frozen = nn.Linear(4, 4).requires_grad_(False)
    net = Net()
    groups = engine.param_groups(net, 0.05, ('norm', 'bn', 'pos_embed', 'cls_token', 'mask_token'),
                                 lr_scale=lambda name: 0.5 if name.startswith('conv') else 1.0)
    names = {id(p): n for n, p in net.named_parameters()}
    got = {(g['weight_decay'], g['lr_scale']): sorted(names[id(p)] for p in g['params']) for g in groups}
    no_decay = ['pos_embed', 'cls_token', 'mask_token', 'fc.bias', 'norm.weight', 'norm.bias', 'bn1.weight', 'bn1.bias']
    assert got == {(0.05, 1.0): ['fc.weight'], (0.0, 1.0): sorted(no_decay),
                   (0.05, 0.5): ['conv.weight'], (0.0, 0.5): ['conv.bias']}
    opt = torch.optim.AdamW(groups, lr=1.0)
    engine.set_lr(opt, 2e-3)
    assert sorted(g['lr'] for g in opt.param_groups) == pytest.approx([1e-3, 1e-3, 2e-3, 2e-3])


# ---------------------------------------------------------------------------------------------------------------
# data: sampler, per-sample seeding, in-memory images

def test_resumable_sampler_shards_and_skips_exactly():
    data = list(range(23))
    shards = [list(engine.ResumableSampler(data, batch_size=3, num_replicas=2, rank=r, seed=1)) for r in range(2)]
    assert len(shards[0]) == len(shards[1]) == 11                          # drop_last: 22 of 23, split evenly
    assert not set(shards[0]) & set(shards[1])
    s = engine.ResumableSampler(data, batch_size=3, num_replicas=2, rank=1, seed=1)
    s.set_epoch(0, start_batch=2)
    assert list(s) == shards[1][6:] and len(s) == 5                        # the first 2 batches of 3 skipped
    s.set_epoch(1)
    assert list(s) != shards[1] and len(list(s)) == 11                     # reshuffled every epoch


class _RandomItems(torch.utils.data.Dataset):
    def __len__(self):
        return 8

    def __getitem__(self, i):
        return torch.rand(2), np.random.rand(), random.random()


def test_seeded_dataset_items_depend_only_on_seed_epoch_index():
    ds = engine.SeededDataset(_RandomItems(), seed=3)
    before = torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()
    a = [ds[i] for i in range(8)]
    b = [ds[i] for i in reversed(range(8))][::-1]
    after = torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()
    assert torch.equal(before[0], after[0]) and np.array_equal(before[1], after[1]) and before[2] == after[2]
    for x, y in zip(a, b):
        assert torch.equal(x[0], y[0]) and x[1] == y[1] and x[2] == y[2]
    assert not torch.equal(a[0][0], a[1][0])                              # items differ
    workers = list(torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2))
    assert all(torch.equal(x[0], y[0]) and x[1] == y[1] for x, y in zip(a, workers))
    ds.set_epoch(1)
    assert not torch.equal(ds[0][0], a[0][0])                             # a new epoch, new draws


def test_tensor_images_pads_to_rgb():
    imgs = torch.randint(1, 256, (3, 28, 28), dtype=torch.uint8)
    img, label, n_bad = engine.TensorImages(imgs, torch.tensor([4, 5, 6]), pad=2)[1]
    x = np.asarray(img)
    assert x.shape == (32, 32, 3) and label == 5 and n_bad == 0
    assert (x[:2] == 0).all() and (x[:, -2:] == 0).all()
    assert np.array_equal(x[2:30, 2:30, 0], imgs[1].numpy()) and np.array_equal(x[..., 0], x[..., 2])


# ---------------------------------------------------------------------------------------------------------------
# metrics, mixed precision, the optimizer step

def test_metrics_means_skip_non_finite_and_totals_add():
    m = engine.Metrics(CPU)
    m.update(loss=torch.tensor(1.0), acc=0.5)
    m.update(loss=torch.tensor(float('nan')), acc=0.7)
    m.update(loss=torch.tensor(3.0, dtype=torch.bfloat16), acc=0.9)
    m.add(n_bad=2)
    m.add(n_bad=3)
    assert m.reduce() == pytest.approx({'loss': 2.0, 'acc': 0.7, 'n_bad': 5})
    m.update(loss=float('inf'))
    assert math.isnan(m.reduce()['loss'])                                  # nothing finite: NaN, not 0


def test_autocast_bf16_on_cpu():
    lin = nn.Linear(4, 4)
    with engine.autocast(CPU, engine.resolve_amp('bf16', CPU)[1]):
        assert lin(torch.randn(2, 4)).dtype == torch.bfloat16
    with engine.autocast(CPU, engine.resolve_amp('none', CPU)[1]):
        assert lin(torch.randn(2, 4)).dtype == torch.float32


@pytest.mark.parametrize('amp', ['bf16', 'fp16', 'none'])
def test_optimizer_step_clips_and_skips_non_finite(amp):
    torch.manual_seed(0)
    lin = nn.Linear(5, 3)
    opt = torch.optim.SGD(lin.parameters(), lr=1.0)
    scaler = engine.grad_scaler(CPU, amp)
    w0 = [p.detach().clone() for p in lin.parameters()]
    scaler.scale(lin(torch.randn(4, 5)).pow(2).sum() * 100).backward()
    raw = torch.cat([p.grad.flatten() for p in lin.parameters()]).norm() / scaler.get_scale()
    norm = engine.optimizer_step(opt, scaler, list(lin.parameters()), amp, clip_grad=0.5)
    assert norm.item() == pytest.approx(raw.item(), rel=1e-4)             # reported before clipping
    step = torch.cat([(p - q).flatten() for p, q in zip(lin.parameters(), w0)])
    assert step.norm().item() == pytest.approx(0.5, rel=1e-4)             # SGD lr 1: the update is the clipped grad
    w1 = [p.detach().clone() for p in lin.parameters()]
    scaler.scale(lin(torch.full((4, 5), float('nan'))).sum()).backward()
    assert not torch.isfinite(engine.optimizer_step(opt, scaler, list(lin.parameters()), amp, clip_grad=0.5))
    assert all(torch.equal(p, q) for p, q in zip(lin.parameters(), w1))  # skipped: unchanged
    assert all(p.grad is None for p in lin.parameters())
    assert scaler.get_scale() == (2.0 ** 15 if amp == 'fp16' else 1.0)  # fp16 backs off; bf16/fp32 stays at 1


@pytest.mark.parametrize('clip', [None, 1e30])
def test_optimizer_step_with_huge_finite_gradients_stays_finite(clip):
    # squares of 1e25 overflow fp32: clip_grad_norm_ reports inf and, without clipping (inf / inf), writes NaN
    lin = nn.Linear(4, 1, bias=False)
    opt = torch.optim.SGD(lin.parameters(), lr=1e-30)
    scaler = engine.grad_scaler(CPU, 'bf16')
    scaler.scale(lin(torch.full((1, 4), 1e25)).sum()).backward()        # weight.grad = [1e25] * 4
    norm = engine.optimizer_step(opt, scaler, list(lin.parameters()), 'bf16', clip_grad=clip)
    assert norm.item() == pytest.approx(2e25, rel=1e-6)                    # the true norm, not inf
    assert torch.isfinite(lin.weight).all() and not torch.equal(lin.weight, torch.zeros(1, 4))


def test_fused_adamw_skip_leaves_optimizer_state_alone():
    lin = nn.Linear(3, 2)
    opt = torch.optim.AdamW(lin.parameters(), lr=0.1, fused=True)
    scaler = engine.grad_scaler(CPU, 'bf16')
    scaler.scale(lin(torch.ones(1, 3)).sum()).backward()
    engine.optimizer_step(opt, scaler, list(lin.parameters()), 'bf16')
    state = {k: v.clone() for k, v in opt.state[lin.weight].items()}
    scaler.scale(lin(torch.full((1, 3), float('inf'))).sum()).backward()
    engine.optimizer_step(opt, scaler, list(lin.parameters()), 'bf16')
    assert all(torch.equal(state[k], v) for k, v in opt.state[lin.weight].items())


# ---------------------------------------------------------------------------------------------------------------
# checkpoints and RNG states

def test_rng_state_round_trip_through_a_weights_only_checkpoint(tmp_path):
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    engine.save_checkpoint({'model': {}, 'rng': engine.rng_state()}, str(tmp_path))
    expected = torch.rand(3), np.random.rand(3), random.random()
    state, _ = engine.load_checkpoint(str(tmp_path / engine.CHECKPOINT))   # weights_only=True inside
    engine.set_rng_state(state['rng'])
    got = torch.rand(3), np.random.rand(3), random.random()
    assert torch.equal(expected[0], got[0]) and np.array_equal(expected[1], got[1]) and expected[2] == got[2]


def test_checkpoint_keeps_previous_and_falls_back_when_last_is_truncated(tmp_path, capsys):
    d = str(tmp_path)
    assert engine.find_checkpoint(d) is None
    engine.save_checkpoint({'model': {'w': torch.ones(3)}, 'step': 1}, d)
    engine.save_checkpoint({'model': {'w': torch.ones(3)}, 'step': 2}, d)
    assert sorted(os.listdir(d)) == [engine.CHECKPOINT, engine.PREVIOUS]  # no temp file left behind
    last = tmp_path / engine.CHECKPOINT
    assert engine.load_checkpoint(str(last))[0]['step'] == 2
    last.write_bytes(last.read_bytes()[:100])                              # a crash mid-copy, a full disk
    state, path = engine.load_checkpoint(str(last))
    assert state['step'] == 1 and path.endswith(engine.PREVIOUS)
    assert 'unreadable' in capsys.readouterr().err
    (tmp_path / engine.PREVIOUS).write_bytes(b'garbage')
    with pytest.raises(ValueError, match='unreadable'):
        engine.load_checkpoint(str(last))
    torch.save({'weights': 1}, str(tmp_path / 'other.pth'))
    with pytest.raises(ValueError, match='not a training checkpoint'):
        engine.load_checkpoint(str(tmp_path / 'other.pth'))
    with pytest.raises(FileNotFoundError):
        engine.load_checkpoint(str(tmp_path / 'missing.pth'))


def test_all_finite():
    lin = nn.Linear(2, 2)
    assert engine.all_finite(lin)
    with torch.no_grad():
        lin.bias[0] = float('inf')
    assert not engine.all_finite(lin)


def test_log_jsonl_writes_strict_json(tmp_path):
    import json
    engine.log_jsonl(str(tmp_path / 'log.jsonl'), {'a': 1.5, 'b': float('nan'), 'c': 'x'})
    engine.log_jsonl(str(tmp_path / 'log.jsonl'), {'a': 2})
    lines = (tmp_path / 'log.jsonl').read_text().splitlines()
    assert [json.loads(x, parse_constant=lambda c: pytest.fail(c)) for x in lines] == [
        {'a': 1.5, 'b': None, 'c': 'x'}, {'a': 2}]


# ---------------------------------------------------------------------------------------------------------------
# kNN: against a brute-force per-sample vote

def _knn_reference(train, train_y, test, test_y, k, T):
    correct = 0
    for x, y in zip(test, test_y):
        sims = [float(F.cosine_similarity(x, t, dim=0)) for t in train]
        order = sorted(range(len(train)), key=lambda j: -sims[j])[:k]
        votes = {}
        for j in order:
            votes[int(train_y[j])] = votes.get(int(train_y[j]), 0.0) + math.exp(sims[j] / T)
        correct += max(votes, key=votes.get) == int(y)
    return correct / len(test)


def test_knn_accuracy_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(4, 8, generator=g)
    train_y, test_y = torch.randint(0, 4, (60,), generator=g), torch.randint(0, 4, (25,), generator=g)
    train = centers[train_y] + 1.5 * torch.randn(60, 8, generator=g)
    test = centers[test_y] + 1.5 * torch.randn(25, 8, generator=g)
    for k, T in ((5, 0.07), (20, 0.5)):
        want = _knn_reference(train, train_y, test, test_y, k, T)
        assert engine.knn_accuracy(train, train_y, test, test_y, k=k, T=T, chunk=7) == pytest.approx(want)
    assert 0.3 < want < 1.0                                                # a non-trivial case
    assert engine.knn_accuracy(centers.repeat(3, 1), torch.arange(4).repeat(3), centers * 2, torch.arange(4)) == 1.0


def test_linear_probe_separates_what_is_linearly_separable():
    g = torch.Generator().manual_seed(0)
    x, x_test = torch.randn(200, 5, generator=g) * 3 + 7, torch.randn(100, 5, generator=g) * 3 + 7
    w = torch.randn(5, 3, generator=g)
    y, y_test = (x @ w).argmax(1), (x_test @ w).argmax(1)                   # a linear rule: learnable
    assert engine.linear_probe_accuracy(x, y, x_test, y_test, steps=200, lr=0.1, weight_decay=0) > 0.9
    noise = torch.randint(0, 3, (200,), generator=g)                         # labels unrelated to x
    assert engine.linear_probe_accuracy(x, noise, x_test, y_test, steps=100) < 0.6
    assert engine.linear_probe_accuracy(x, y, x_test, y_test, steps=5) == engine.linear_probe_accuracy(
        x, y, x_test, y_test, steps=5)                                       # zero init, full batch: deterministic


# ---------------------------------------------------------------------------------------------------------------
# command-line errors

def test_cli_errors_are_one_line(capsys):
    """(train.py's bad-input tests run these paths end to end in subprocesses.)"""
    parser = engine.ArgumentParser()
    parser.add_argument('--n', type=int, choices=[1, 2])

    def main(argv):
        raise {1: ValueError('bad value'), 2: FileNotFoundError('no such\nfile')}[parser.parse_args(argv).n]
    for argv, message, code in ((['--n', '3'], 'error: argument --n: invalid choice', 2),
                                (['--n', '1'], 'error: bad value', 2), (['--n', '2'], 'error: no such file', 2)):
        with pytest.raises(SystemExit) as e:
            engine.run_cli(lambda: main(argv))
        err = capsys.readouterr().err
        assert e.value.code == code and err.startswith(message) and len(err.splitlines()) == 1, err
    with pytest.raises(SystemExit) as e:
        engine.run_cli(lambda: (_ for _ in ()).throw(engine.TrainingError('diverged')))
    assert e.value.code == 1 and capsys.readouterr().err == 'error: diverged\n'
