"""engine.py: each piece against a hand-computed or brute-force reference."""
import argparse
import json
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

def test_cosine_schedule_warmup_peak_and_end():
    lrs = engine.cosine_schedule(peak_lr=1.0, min_lr=0.1, total_steps=100, warmup_steps=10)
    assert len(lrs) == 100
    assert lrs[:10] == pytest.approx([(s + 1) / 10 for s in range(10)])    # linear, peak at the last warmup step
    assert lrs[10] == pytest.approx(1.0)
    assert lrs[55] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 45 / 90)))
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))                # cosine decays monotonically
    assert lrs[-1] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 89 / 90)))
    assert engine.cosine_schedule(1.0, 0.0, 5, 0)[0] == pytest.approx(1.0)  # no warmup: starts at the peak
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
    for g in opt.param_groups:                                             # what the training loops do
        g['lr'] = 2e-3 * g['lr_scale']
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
# data: subsets, the endless stream of batches a resumed run re-enters exactly

def test_subset_is_seeded_spread_and_a_noop_when_large():
    data = list(range(100))
    a = engine.subset(data, 10, seed=1)
    assert len(a) == 10 and list(a) == list(engine.subset(data, 10, seed=1)) and list(a) != list(range(10))
    assert list(a) == sorted(a) and len(set(a)) == 10
    assert engine.subset(data, None) is data and engine.subset(data, 100) is data
    with pytest.raises(engine.UserError, match='--subset must be >= 1'):
        engine.subset(data, 0)


def test_endless_batches_resume_where_an_uninterrupted_run_is():
    """Steps 5.. of a fresh stream equal steps 5.. of an uninterrupted one, across epoch boundaries (7 samples,
    batch 2, accumulation 1: 3 steps per epoch)."""
    def stream(start):
        ds = engine.SeededDataset(_RandomItems(), seed=0)
        sampler = engine.ResumableSampler(ds, 2, seed=0)
        loader, steps = engine.train_loader(ds, sampler, 2, 1, 0, 0, CPU)
        assert steps == 4
        return engine.endless_batches(loader, start, steps, 1)
    whole = [next(b)[0] for b in [stream(0)] for _ in range(11)]
    resumed = [next(b)[0] for b in [stream(5)] for _ in range(6)]
    assert all(torch.equal(x, y) for x, y in zip(whole[5:], resumed))
    assert not torch.equal(whole[0], whole[4])                             # epoch 2 is reshuffled and redrawn


# ---------------------------------------------------------------------------------------------------------------
# mixed precision and the pieces of the optimizer step the training loops write out

def test_resolve_amp_on_cpu():
    assert engine.resolve_amp('bf16', CPU) is torch.bfloat16
    assert engine.resolve_amp('fp16', CPU) is torch.float16
    assert engine.resolve_amp('none', CPU) is None
    assert engine.resolve_amp(None, CPU) is None  # unset: full precision on a CPU, bf16 on a GPU


def test_grad_norm_is_fp64_and_finite_for_huge_finite_gradients():
    # squares of 1e25 overflow fp32: clip_grad_norm_'s norm is inf there; ours is the true one
    lin = nn.Linear(4, 1, bias=False)
    lin(torch.full((1, 4), 1e25)).sum().backward()                          # weight.grad = [1e25] * 4
    norm = engine.grad_norm(list(lin.parameters()))
    assert norm.dtype == torch.float64 and norm.item() == pytest.approx(2e25, rel=1e-6)
    torch.nn.utils.clip_grads_with_norm_(list(lin.parameters()), 1.0, norm)
    assert torch.linalg.vector_norm(lin.weight.grad).item() == pytest.approx(1.0, rel=1e-5)
    lin.weight.grad[0, 0] = float('nan')
    assert not torch.isfinite(engine.grad_norm(list(lin.parameters())))


@pytest.mark.parametrize('amp', ['bf16', 'fp16', 'none'])
def test_scaler_skips_non_finite_steps_and_keeps_scale_1_outside_fp16(amp):
    """The loops' step: GradScaler(init 2^16 for fp16, else 1), unscale_, step, update(None if fp16 else 1.0).
    A non-finite gradient skips the step, fused AdamW's state included; only fp16 backs off its scale."""
    torch.manual_seed(0)
    lin = nn.Linear(3, 2)
    opt = torch.optim.AdamW(lin.parameters(), lr=0.1, fused=True)
    scaler = torch.amp.GradScaler('cpu', init_scale=2.0 ** 16 if amp == 'fp16' else 1.0)

    def step(x):
        scaler.scale(lin(x).sum()).backward()
        scaler.unscale_(opt)
        norm = engine.grad_norm(list(lin.parameters()))
        scaler.step(opt)
        scaler.update(None if amp == 'fp16' else 1.0)
        opt.zero_grad(set_to_none=True)
        return norm
    assert torch.isfinite(step(torch.ones(1, 3)))
    w = [p.detach().clone() for p in lin.parameters()]
    state = {k: v.clone() for k, v in opt.state[lin.weight].items()}
    assert not torch.isfinite(step(torch.full((1, 3), float('inf'))))
    assert all(torch.equal(p, q) for p, q in zip(lin.parameters(), w))     # skipped: unchanged
    assert all(torch.equal(state[k], v) for k, v in opt.state[lin.weight].items())
    assert scaler.get_scale() == (2.0 ** 15 if amp == 'fp16' else 1.0)


# ---------------------------------------------------------------------------------------------------------------
# checkpoints and RNG states

def test_rng_state_round_trip_through_a_weights_only_checkpoint(tmp_path):
    torch.manual_seed(1)
    np.random.seed(2)
    random.seed(3)
    engine.atomic_save({'model': {}, 'rng': engine.rng_state()}, str(tmp_path / 'c.pth'))
    expected = torch.rand(3), np.random.rand(3), random.random()
    state = engine.torch_load(str(tmp_path / 'c.pth'), 'checkpoint')       # weights_only=True inside
    engine.set_rng_state(state['rng'])
    got = torch.rand(3), np.random.rand(3), random.random()
    assert torch.equal(expected[0], got[0]) and np.array_equal(expected[1], got[1]) and expected[2] == got[2]


def _state(model, opt, scaler, args):
    return dict(model=model.state_dict(), optimizer=opt.state_dict(), scaler=scaler.state_dict(),
                rng=[engine.rng_state()], log={'n': 1}, args=vars(args))


def test_training_state_keeps_previous_falls_back_and_checks_the_run(tmp_path, capsys):
    d = str(tmp_path)
    lin = nn.Linear(2, 2)
    opt = torch.optim.SGD(lin.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler('cpu')
    args = argparse.Namespace(output_dir=d, arch='a', batch_size=4)
    assert engine.find_checkpoint(d) is None
    for step in (1, 2):
        engine.save_training_state(lin, opt, scaler, args, {'n': step}, step=step)
    assert sorted(os.listdir(d)) == [engine.CHECKPOINT, engine.PREVIOUS]  # no temp file left behind
    assert engine.find_checkpoint(d).endswith(engine.CHECKPOINT)
    log = {}
    state, path = engine.load_training_state(engine.find_checkpoint(d), lin, opt, scaler, args, 0, log, ('arch',))
    assert state['step'] == 2 and log == {'n': 2}
    last = tmp_path / engine.CHECKPOINT
    last.write_bytes(last.read_bytes()[:100])                              # a crash mid-copy, a full disk
    state, path = engine.load_training_state(str(last), lin, opt, scaler, args, 0, log, ('arch',))
    assert state['step'] == 1 and path.endswith(engine.PREVIOUS)
    assert 'truncated' in capsys.readouterr().err
    other = argparse.Namespace(output_dir=d, arch='b', batch_size=4)
    with pytest.raises(engine.UserError, match=r'--arch a \(now b\)'):
        engine.load_training_state(str(tmp_path / engine.PREVIOUS), lin, opt, scaler, other, 0, log, ('arch',))
    torch.save({'weights': 1}, str(tmp_path / 'other.pth'))
    with pytest.raises(engine.UserError, match='not a training checkpoint'):
        engine.load_training_state(str(tmp_path / 'other.pth'), lin, opt, scaler, args, 0, log, ('arch',))
    with torch.no_grad():
        lin.bias[0] = float('nan')
    with pytest.raises(engine.TrainingError, match='non-finite'):          # the last good checkpoint stays
        engine.save_training_state(lin, opt, scaler, args, {}, step=3)


def test_torch_load_says_what_a_bad_file_is_not_in_one_short_line(tmp_path):
    (tmp_path / 'junk.pth').write_text('not a checkpoint at all')
    torch.save({'w': torch.zeros(3)}, tmp_path / 'ok.pth')
    (tmp_path / 'cut.pth').write_bytes((tmp_path / 'ok.pth').read_bytes()[:200])
    torch.save({'o': argparse.Namespace(a=1)}, tmp_path / 'obj.pth')  # not a tensor: refused
    (tmp_path / 'empty.pth').write_bytes(b'')
    for name, expected in (('junk.pth', 'not a file written by torch.save'), ('cut.pth', 'or truncated'),
                           ('empty.pth', 'not a file written by torch.save'), ('obj.pth', 'refused'),
                           ('missing.pth', 'does not exist')):
        path = str(tmp_path / name)
        with pytest.raises(engine.UserError) as e:
            engine.torch_load(path, 'weights file')
        msg = str(e.value)
        assert expected in msg and '\n' not in msg and len(msg) - len(path) < 200, msg
        assert 'weights_only' not in msg                                  # never the unsafe advice
    assert torch.equal(engine.torch_load(str(tmp_path / 'ok.pth'), 'x')['w'], torch.zeros(3))


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
    train_y = torch.randint(0, 4, (60,), generator=g)
    test_y = torch.randint(0, 4, (25,), generator=g)
    train = centers[train_y] + 1.5 * torch.randn(60, 8, generator=g)
    test = centers[test_y] + 1.5 * torch.randn(25, 8, generator=g)
    for k, T in ((5, 0.07), (20, 0.5)):
        want = _knn_reference(train, train_y, test, test_y, k, T)
        assert engine.knn_accuracy(train, train_y, test, test_y, k=k, T=T, chunk=7) == pytest.approx(want)
    assert 0.3 < want < 1.0                                                # a non-trivial case
    assert engine.knn_accuracy(centers.repeat(3, 1), torch.arange(4).repeat(3), centers * 2, torch.arange(4)) == 1.0


def test_recompute_bn_stats_uses_the_given_images_and_leaves_eval_mode():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
    imgs = torch.randn(40, 3, 5, 5) * 3 + 2
    loader = [(imgs[i:i + 8], torch.zeros(8)) for i in range(0, 40, 8)]
    engine.recompute_bn_stats(net, loader, CPU, max_images=24)
    feats = net[0](imgs[:24]).detach()
    assert not net.training and not net[1].training
    assert torch.allclose(net[1].running_mean, feats.mean((0, 2, 3)), atol=1e-5)      # a plain average of 3 batches
    want = torch.stack([net[0](imgs[i:i + 8]).detach().var((0, 2, 3)) for i in (0, 8, 16)]).mean(0)  # unbiased
    assert torch.allclose(net[1].running_var, want, rtol=1e-4)
    assert net[1].momentum == 0.1                                                    # restored
    vit = nn.Sequential(nn.Linear(3, 3), nn.LayerNorm(3)).train()
    assert engine.recompute_bn_stats(vit, loader, CPU) is vit and not vit.training     # no BatchNorm: eval only


# ---------------------------------------------------------------------------------------------------------------
# command line: recipes, the override rule, one-line errors

def test_apply_recipe_fills_only_unset_flags_and_help_prints_recipes(capsys):
    recipe = dict(epochs=300, batch_size=256, betas=(0.9, 0.98))
    parser = engine.ArgumentParser(recipes={'Table 9': recipe, 'demo': dict(epochs=4)})
    parser.add_argument('--epochs', type=engine.POSITIVE, help='epochs')
    parser.add_argument('--batch-size', type=int, help='per GPU')
    parser.add_argument('--betas', type=float, nargs=2, help='AdamW')
    parser.add_argument('--seed', type=int, default=0, help='seed')
    args = parser.parse_args(['--epochs', '300'])                           # explicit, equal to the recipe: kept
    taken = engine.apply_recipe(args, recipe)
    assert taken == {'batch_size': 256, 'betas': (0.9, 0.98)} and args.epochs == 300
    assert engine.flags(taken) == '--batch-size 256 --betas 0.9 0.98'
    with pytest.raises(SystemExit):
        parser.parse_args(['--help'])
    text = ' '.join(capsys.readouterr().out.split())
    assert 'epochs (Table 9: 300; demo: 4)' in text and 'per GPU (Table 9: 256)' in text  # each flag's paper value
    assert 'AdamW (Table 9: 0.9 0.98)' in text
    assert '(default: 0)' in text and '(default: None)' not in text
    with pytest.raises(SystemExit):                                         # the flag's own check: one line
        parser.parse_args(['--epochs', '0'])
    err = capsys.readouterr().err
    assert err == 'error: argument --epochs: must be >= 1, got 0\n'


def test_cli_errors_are_one_line_and_bugs_keep_their_traceback(capsys):
    parser = engine.ArgumentParser()
    parser.add_argument('--n', type=int, choices=[1, 2])

    def main(argv):
        n = parser.parse_args(argv).n
        raise engine.UserError('bad\nvalue') if n == 1 else engine.TrainingError('diverged')
    for argv, message, code in ((['--n', '3'], 'error: argument --n: invalid choice', 2),
                                (['--n', '1'], 'error: bad value', 2), (['--n', '2'], 'error: diverged', 1)):
        with pytest.raises(SystemExit) as e:
            engine.run_cli(lambda: main(argv))
        err = capsys.readouterr().err
        assert e.value.code == code and err.startswith(message) and len(err.splitlines()) == 1, err
    with pytest.raises(ZeroDivisionError):                                 # a bug: not turned into one line
        engine.run_cli(lambda: 1 / 0)
    with pytest.raises(ValueError):                                        # nor a plain ValueError (a bug)
        engine.run_cli(lambda: int('x'))


def test_a_live_run_holds_its_output_folder_until_it_dies(held_dir):
    """engine.lock_output_dir: a folder another live process holds is refused with one line naming that process;
    once the process is gone (killed: its lock dies with it), the folder can be taken."""
    out, p = held_dir
    with pytest.raises(engine.UserError, match=f'in use by a live run \\(process {p.pid}\\)'):
        engine.lock_output_dir(str(out))
    p.kill()
    p.wait()
    engine.lock_output_dir(str(out))
    engine.lock_output_dir(str(out))  # this process holds it: taking it again is fine (a demo's second run)


def test_neighbouring_seeds_do_not_share_rank_streams():
    """engine.seed_rank: rank 1 of seed s draws other masks and samples than rank 0 of seed s + 1 (seed + rank did
    not); rank 0 keeps the seed itself, so a one-process run is unchanged."""
    def draws(seed, rank):
        engine.seed_rank(seed, rank)
        return torch.rand(4).tolist() + [float(np.random.rand()), random.random()]
    assert draws(3, 1) != draws(4, 0) and draws(3, 1) != draws(3, 0) and draws(3, 1) == draws(3, 1)
    torch.manual_seed(3)
    np.random.seed(3)
    random.seed(3)
    plain = torch.rand(4).tolist() + [float(np.random.rand()), random.random()]
    assert draws(3, 0) == plain


def test_truncate_log_drops_records_after_the_checkpoint(tmp_path):
    path = tmp_path / 'log.jsonl'
    path.write_text(''.join(json.dumps(r) + '\n' for r in ({'step': 2}, {'step': 3, 'epoch': 1}, {'step': 5})))
    engine.truncate_log(str(path), 3)
    assert [json.loads(x)['step'] for x in path.read_text().splitlines()] == [2, 3]
