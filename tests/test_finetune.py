"""finetune.py: recipes' pieces against hand-written references, weight loading, and tiny end-to-end runs."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image

import cim
import engine
import finetune as ft
from conftest import Preempted, preempt_after

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_vit(depth=3, embed_dim=8, img_size=8, patch_size=4, num_classes=5):
    torch.manual_seed(0)
    return cim.VisionTransformer(img_size, patch_size, embed_dim=embed_dim, depth=depth, num_heads=2,
                                 num_classes=num_classes)


# -- layer-wise lr decay -----------------------------------------------------------------------------------------------

def test_layer_decay_lr_scale_and_weight_decay_per_parameter():
    model = tiny_vit(depth=3)
    groups = engine.param_groups(model, 0.05, cim.NO_WEIGHT_DECAY_KEYS, engine.layer_decay(3, 0.8))
    got = {id(p): (g['lr_scale'], g['weight_decay']) for g in groups for p in g['params']}
    # BEiT: embeddings id 0 -> 0.8^4, block i -> 0.8^(3 - i), final norm and head -> 1 (depth 3)
    exponent = {'patch_embed.': 4, 'cls_token': 4, 'pos_embed': 4, 'blocks.0.': 3, 'blocks.1.': 2, 'blocks.2.': 1,
                'norm.': 0, 'head.': 0}
    decayed = {'patch_embed.proj.weight', 'head.weight'} | {f'blocks.{i}.{m}.weight' for i in range(3)
                                                            for m in ('attn.qkv', 'attn.proj', 'mlp.fc1', 'mlp.fc2')}
    names = dict(model.named_parameters())
    assert len(got) == len(names)
    for name, p in names.items():
        e = [v for k, v in exponent.items() if name.startswith(k)]
        assert len(e) == 1, name
        scale, wd = got[id(p)]
        assert scale == pytest.approx(0.8 ** e[0], rel=1e-12), name
        assert wd == (0.05 if name in decayed else 0.0), name
    opt = torch.optim.AdamW(groups, lr=1.0)
    for g in opt.param_groups:                                            # as finetune.main sets each step's lr
        g['lr'] = 2e-3 * g['lr_scale']
    lr_of = {id(p): g['lr'] for g in opt.param_groups for p in g['params']}
    assert lr_of[id(model.cls_token)] == pytest.approx(2e-3 * 0.8 ** 4)
    assert lr_of[id(model.blocks[1].mlp.fc1.weight)] == pytest.approx(2e-3 * 0.8 ** 2)
    assert lr_of[id(model.head.weight)] == pytest.approx(2e-3)
    # inside a bigger model (segment.py: 'backbone.'), and two-digit block indices
    assert engine.vit_layer_id('backbone.blocks.10.mlp.fc1.weight', 12, 'backbone.') == 11
    assert engine.vit_layer_id('backbone.pos_embed', 12, 'backbone.') == 0
    assert engine.vit_layer_id('decode_head.conv.weight', 12, 'backbone.') == 13


# -- targets and losses ------------------------------------------------------------------------------------------------

def test_mixup_cutmix_targets_sum_to_one_and_weigh_labels_by_lambda_and_area():
    """Image k is the constant k + 1, so a mixed image reveals its mix: its mean must equal the target-weighted
    class values (MixUp: lambda, per pixel; CutMix: the pasted area), and CutMix pixels come from the two sources."""
    torch.manual_seed(0)
    C, B, s = 8, 8, 0.1
    mixer = ft.make_mixer(0.8, 1.0, C)
    labels = torch.arange(B)
    imgs = (labels.float() + 1).view(B, 1, 1, 1).expand(B, 3, 16, 16).contiguous()
    seen = {'mixup': 0, 'cutmix': 0}
    for _ in range(40):
        out, t = ft.mix_targets(imgs, labels, mixer, C, smoothing=s)
        assert t.shape == (B, C) and torch.allclose(t.sum(1), torch.ones(B))
        assert (t >= s / C - 1e-6).all()
        w = (t - s / C) / (1 - s)                                          # the mix before smoothing
        values = torch.arange(1, C + 1).float()
        assert torch.allclose(out.mean(dim=(1, 2, 3)), w @ values, atol=1e-4)
        for i in range(B):
            src = w[i].nonzero().flatten()
            assert 1 <= len(src) <= 2
            px = out[i, 0]
            if torch.isclose(px, px.round()).all() and len(px.unique()) > 1:  # CutMix: a box of the partner
                seen['cutmix'] += 1
                for c in src:
                    assert (px == c + 1).float().mean() == pytest.approx(float(w[i, c]), abs=1e-5)
            elif len(src) == 2:                                              # MixUp: lambda everywhere
                seen['mixup'] += 1
                assert torch.allclose(px, px[0, 0].expand_as(px))
    assert seen['mixup'] > 0 and seen['cutmix'] > 0


def test_no_mixing_gives_smoothed_one_hot_and_soft_ce_equals_torch_label_smoothing():
    torch.manual_seed(0)
    labels = torch.tensor([3, 0, 9, 3])
    imgs = torch.randn(4, 3, 8, 8)
    out, t = ft.mix_targets(imgs, labels, None, 10, smoothing=0.1)
    assert torch.equal(out, imgs)
    expected = torch.full((4, 10), 0.01)
    expected[torch.arange(4), labels] = 0.91
    assert torch.allclose(t, expected)
    logits = torch.randn(4, 10)
    assert torch.allclose(ft.LOSSES['ce'](logits, t), F.cross_entropy(logits, labels, label_smoothing=0.1))


def test_bce_targets_with_mixing_and_smoothing():
    """RSB's loss: every class an independent sigmoid against its mixed, smoothed weight; mean over B x C."""
    torch.manual_seed(1)
    C, B, s = 10, 6, 0.1
    labels = torch.randint(C, (B,))
    imgs = torch.randn(B, 3, 16, 16)
    _, t = ft.mix_targets(imgs, labels, ft.make_mixer(0.0, 1.0, C), C, smoothing=s)  # CutMix only
    assert torch.allclose(t.sum(1), torch.ones(B))
    assert (t >= s / C - 1e-6).all() and (t <= 1 - s + s / C + 1e-6).all()
    assert ((t > s / C + 1e-6).sum(1) <= 2).all()
    logits = torch.randn(B, C, requires_grad=True)
    loss = ft.LOSSES['bce'](logits, t)
    p = torch.sigmoid(logits.detach().double())
    manual = -(t * p.log() + (1 - t) * (1 - p).log()).mean()
    assert loss.item() == pytest.approx(manual.item(), rel=1e-5)
    loss.backward()
    assert torch.allclose(logits.grad, (torch.sigmoid(logits.detach()) - t) / (B * C), atol=1e-7)


# -- repeated augmentation ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize('world', [1, 4])
def test_repeat_aug_sampler_repeats_spreads_and_balances(world):
    N, k, batch = 50, 3, 2
    samplers = [ft.RepeatAugSampler(N, batch, world, r, repeats=k, seed=0) for r in range(world)]
    epochs = []
    for epoch in range(2):
        per_rank = []
        for s in samplers:
            s.set_epoch(epoch)
            per_rank.append(list(s))
        assert len({len(x) for x in per_rank}) == 1 and len(per_rank[0]) == samplers[0].num_samples
        flat = [j for x in per_rank for j in x]
        assert all(0 <= j < k * N for j in flat)
        images = {}
        for rank, x in enumerate(per_rank):
            for j in x:
                images.setdefault(j % N, []).append((j // N, rank))
        assert len(images) == N // k // world * world                     # about N samples per epoch
        for copies in images.values():
            assert sorted(c for c, _ in copies) == list(range(k))          # each image exactly k times, all copies
            if world >= k:
                assert len({r for _, r in copies}) == k                   # ... on k different ranks
        epochs.append(set(images))
        samplers[0].set_epoch(epoch, start_batch=2)                        # resume: skips the consumed batches
        assert list(samplers[0]) == per_rank[0][2 * batch:] and len(samplers[0]) == len(per_rank[0]) - 2 * batch
    assert epochs[0] != epochs[1]
    # one copy (no repeated augmentation): engine.ResumableSampler's order exactly, also when resumed mid-epoch
    for rank in range(world):
        one = ft.RepeatAugSampler(N, batch, world, rank, repeats=1, seed=3)
        plain = engine.ResumableSampler(range(N), batch, world, rank, seed=3)
        for epoch, start in ((0, 0), (1, 0), (1, 2)):
            one.set_epoch(epoch, start)
            plain.set_epoch(epoch, start)
            assert list(one) == list(plain) and len(one) == len(plain) == len(list(plain))


def test_repeated_copies_get_their_own_augmentation():
    """finetune.run's training set: SeededDataset over concatenated copies (copy r of image i at r * N + i)."""
    class Noise(torch.utils.data.Dataset):
        def __len__(self):
            return 5

        def __getitem__(self, i):
            return torch.rand(1).item(), i

    ds = engine.SeededDataset(torch.utils.data.ConcatDataset([Noise()] * 3), seed=0)
    assert len(ds) == 15 and ds[7][1] == 2 and ds[12][1] == 2
    assert ds[2][0] != ds[7][0] != ds[12][0] and ds[7] == ds[7]


def test_shard_sampler_and_evaluate_count_every_image_once():
    n, world = 11, 4
    shards = [list(engine.ShardSampler(n, world, r)) for r in range(world)]
    assert sorted(i for s in shards for i in s) == list(range(n))
    data = torch.utils.data.TensorDataset(torch.arange(n).float().view(n, 1), torch.arange(n) % 3)
    loader = torch.utils.data.DataLoader(data, batch_size=4, sampler=engine.ShardSampler(n))
    s = engine.evaluate(lambda x, y: dict(n=torch.tensor(len(y)), sum=x.sum(), hist=torch.bincount(y, minlength=3)),
                    loader, torch.device('cpu'))
    assert s['n'] == n and s['sum'] == sum(range(n)) and s['hist'].tolist() == [4, 4, 3]
    with pytest.raises(ValueError):
        engine.ShardSampler(2, 4, 0)


# -- stochastic depth ------------------------------------------------------------------------------------------------

def test_stochastic_depth_drops_residual_branches_and_keeps_names(micro):
    """ViT: cim.Block's drop_path from build_classifier(drop_path); ResNet: engine.add_stochastic_depth's hooks."""
    torch.manual_seed(0)
    model = ft.build_classifier('vit_tiny', 5, 8, 4, drop_path=1.0)   # block 0: p = 0, block 1: p = 1 (dropped)
    plain = ft.build_classifier('vit_tiny', 5, 8, 4)
    assert list(model.state_dict()) == list(plain.state_dict())            # parameter-free: timm's names kept
    plain.load_state_dict(model.state_dict())
    x = torch.randn(3, 3, 8, 8)
    model.train()
    b0 = model.blocks[0]
    t = model.patch_embed(x)
    t = torch.cat([model.cls_token.expand(3, -1, -1), t], 1) + model.pos_embed
    t = t + b0.attn(b0.norm1(t))
    t = t + b0.mlp(b0.norm2(t))                                            # block 1 is the identity
    assert torch.allclose(model(x), model.head(model.norm(t)[:, 1:].mean(1)), atol=1e-6)
    model.eval()
    assert torch.allclose(model(x), plain.eval()(x))                      # eval: nothing dropped

    net = torchvision.models.resnet18()                                    # BasicBlocks; resnet50 uses bn3
    names = list(net.state_dict())
    engine.add_stochastic_depth(net, 1.0)
    assert list(net.state_dict()) == names
    seen = {}
    net.layer4[-1].register_forward_hook(lambda m, i, o: seen.update(x=i[0], y=o))
    net.train()(torch.randn(2, 3, 64, 64))
    assert torch.allclose(seen['y'], F.relu(seen['x']))                    # last block: shortcut only
    assert not hasattr(net.layer1[0], 'drop_path')                         # first block: p = 0
    r50 = ft.build_classifier('resnet50', 5, drop_path=0.05)               # finetune's ResNet gets the hooks
    assert r50.layer4[-1].drop_path.p == pytest.approx(0.05) and not hasattr(r50.layer1[0], 'drop_path')


# -- loading pre-trained weights ------------------------------------------------------------------------------------

def test_load_vit_from_train_checkpoint_export_and_wrappers(tmp_path):
    torch.manual_seed(0)
    enh = cim.build_enhancer('vit_tiny', 16, 4)
    export = {k: v.clone() for k, v in enh.state_dict().items()}
    ckpt = dict(model={**{'enhancer.' + k: v for k, v in export.items()}, 'generator.blocks.0.norm1.weight':
                       torch.ones(192), 'head.proj.weight': torch.zeros(48, 192)},
                args=dict(arch='vit_tiny', img_size=16, patch_size=4, task='revdet'), epoch=3)
    paths = {'train.py checkpoint': ckpt, 'export': export,
             'ddp': {'state_dict': {'module.' + k: v for k, v in export.items()}},
             'linear probe': {'model': {**{'backbone.' + k: v for k, v in export.items()},
                                        'head.1.weight': torch.zeros(2, 192)}}}
    for name, obj in paths.items():
        torch.save(obj, tmp_path / 'w.pth')
        state, meta = engine.read_weights(str(tmp_path / 'w.pth'))
        assert set(state) == set(export), name
        assert meta == (ckpt['args'] if name == 'train.py checkpoint' else {})
        model = ft.build_classifier('vit_tiny', 7, 16, 4, drop_path=0.1)
        missing, ignored = engine.load_pretrained(model, state, name, verbose=False)
        assert missing == ['head.weight', 'head.bias'] and ignored == []
        for k, v in export.items():
            assert torch.equal(model.state_dict()[k], v), k
    # another resolution: the position embeddings are resized, the cls embedding kept
    model = ft.build_classifier('vit_tiny', 7, 32, 4)
    engine.load_pretrained(model, export, 'export', verbose=False)
    assert torch.equal(model.pos_embed[:, 0], export['pos_embed'][:, 0])
    flat = torch.ones(1, 17, 5)
    assert torch.allclose(engine.interpolate_pos_embed(flat, 64), torch.ones(1, 65, 5))
    assert torch.allclose(engine.interpolate_pos_embed(export['pos_embed'], 16), export['pos_embed'])


def test_load_resnet_torchvision_and_export_layouts(tmp_path):
    torch.manual_seed(0)
    tv = torchvision.models.resnet50().state_dict()                          # full torchvision file, 1000-class fc
    export = {k: v for k, v in tv.items() if not k.startswith('fc.')}          # train.py --export layout
    for state, n_classes, missing_fc in ((tv, 10, True), (tv, 1000, False), (export, 10, True)):
        model = ft.build_classifier('resnet50', n_classes)
        missing, _ = engine.load_pretrained(model, state, 'resnet', verbose=False)
        assert missing == (['fc.weight', 'fc.bias'] if missing_fc else [])
        assert torch.equal(model.layer3[2].conv2.weight, tv['layer3.2.conv2.weight'])
        assert torch.equal(model.bn1.running_var, tv['bn1.running_var'])
    probe = ft.LinearProbe(cim.build_enhancer('resnet50'), 10)               # fc of the file ignored, not an error
    engine.load_pretrained(probe.backbone, tv, 'resnet', verbose=False)


def test_load_mismatches_are_clear_errors(tmp_path):
    resnet = {k: v for k, v in torchvision.models.resnet50().state_dict().items()}
    vit = cim.build_enhancer('vit_tiny', 16, 4).state_dict()
    with pytest.raises(ValueError, match='resnet weights but the model is a vit'):
        engine.load_pretrained(ft.build_classifier('vit_tiny', 5, 16, 4), resnet, 'x')
    with pytest.raises(ValueError, match='vit weights but the model is a resnet'):
        engine.load_pretrained(ft.build_classifier('resnet50', 5), vit, 'x')
    with pytest.raises(ValueError, match=r'patch_embed.proj.weight is \[192, 3, 4, 4\] there and \[384'):
        engine.load_pretrained(ft.build_classifier('vit_small', 5, 16, 4), vit, 'x')        # another width
    with pytest.raises(ValueError, match='unexpected blocks.2'):
        engine.load_pretrained(tiny_vit(depth=2), tiny_vit(depth=3).state_dict(), 'x')    # another depth
    with pytest.raises(ValueError, match='missing blocks.2'):
        engine.load_pretrained(tiny_vit(depth=3), tiny_vit(depth=2).state_dict(), 'x')
    torch.save([1, 2, 3], tmp_path / 'list.pth')
    (tmp_path / 'junk.pth').write_bytes(b'not a checkpoint')
    for name in ('list.pth', 'junk.pth'):
        with pytest.raises(ValueError):
            engine.read_weights(str(tmp_path / name))
    with pytest.raises(engine.UserError, match='does not exist'):
        engine.read_weights(str(tmp_path / 'missing.pth'))


# -- end to end on a separable toy set -------------------------------------------------------------------------------

def make_toy_data(root, n_train=24, n_val=8, size=16, flat_val=False):
    """Two classes of noisy images: reddish and bluish."""
    rng = np.random.default_rng(0)
    for split, n in (('train', n_train), ('val', n_val)):
        for c, color in (('blue', (40, 60, 200)), ('red', (200, 50, 40))):
            d = os.path.join(root, split) if split == 'val' and flat_val else os.path.join(root, split, c)
            os.makedirs(d, exist_ok=True)
            for i in range(n):
                px = np.clip(np.array(color) + rng.normal(0, 40, (size, size, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(px).save(os.path.join(d, f'{c}{i}.png'))
    return str(root)


@pytest.fixture(scope='module')
def toy(tmp_path_factory):
    return make_toy_data(tmp_path_factory.mktemp('toy') / 'data')


@pytest.fixture
def micro(monkeypatch, tmp_path):
    """Small stand-ins under the real names, so end-to-end runs take seconds: 'vit_tiny' with 2 blocks of width
    32, 'resnet50' with one Bottleneck per stage (same key names and 2048-d features). -> saves init weights."""
    monkeypatch.setitem(cim.VIT_CONFIGS, 'vit_tiny', dict(embed_dim=32, depth=2, num_heads=2))
    monkeypatch.setattr(torchvision.models, 'resnet50', lambda **kw: torchvision.models.resnet.ResNet(
        torchvision.models.resnet.Bottleneck, [1, 1, 1, 1], **kw))

    def save(arch, size=16):
        torch.manual_seed(1)
        path = str(tmp_path / f'{arch}.pth')
        torch.save(cim.build_enhancer(arch, size, 4).state_dict(), path)
        return path
    return save


TOY = ['--img-size', '16', '--test-img-size', '16', '--patch-size', '4', '--batch-size', '8', '--warmup-epochs', '1',
       '--num-workers', '0', '--log-every', '2']


def read_log(out):
    return [json.loads(x) for x in open(os.path.join(out, 'log.jsonl'))]


def test_finetune_end_to_end_learns_toy_set_and_resumes_exactly(toy, micro, tmp_path, monkeypatch, capsys):
    init = micro('vit_tiny')
    argv = ['--data', toy, '--arch', 'vit_tiny', '--init', init, '--epochs', '3', '--lr', '2e-3',
            '--save-every-steps', '2'] + TOY
    res = ft.main(argv + ['--output-dir', str(tmp_path / 'a')])  # default recipe: mixup, cutmix, RandAugment, ...
    assert res['acc1'] >= 90 and res['n_val'] == 16
    lines = read_log(tmp_path / 'a')
    assert [x['epoch'] for x in lines if 'acc1' in x] == [1, 2, 3]
    assert [x['step'] for x in lines if 'loss' in x] == list(range(2, 19, 2))  # 6 steps per epoch, logged every 2
    best = torch.load(tmp_path / 'a' / 'checkpoint-best.pth', weights_only=True)
    assert best['acc1'] == res['best_acc1'] and best['epoch'] == res['best_epoch']
    out = capsys.readouterr().out
    assert 'epoch 2/3: val top-1' in out and 'img/s' in out and '\r' not in out  # per-epoch summary, no bar
    # exact resume: killed after logging step 6, past the save at step 4 (6 steps per epoch), rerun: the same
    # parameters, and log.jsonl record for record (timings aside; the step-6 record not twice)
    with monkeypatch.context() as m:
        preempt_after(m, 1, 'log_jsonl', when=lambda kwargs, record: record.get('step') == 6)
        with pytest.raises(Preempted):
            ft.main(argv + ['--output-dir', str(tmp_path / 'b')])
    assert torch.load(tmp_path / 'b' / engine.CHECKPOINT, weights_only=True)['step'] == 4
    assert [x['step'] for x in read_log(tmp_path / 'b')][-1] == 6
    res2 = ft.main(argv + ['--output-dir', str(tmp_path / 'b')])
    assert "at step 4" in capsys.readouterr().out
    timeless = [[{k: v for k, v in x.items() if k != 'imgs_per_s'} for x in read_log(tmp_path / d)] for d in 'ab']
    assert timeless[0] == timeless[1]
    a, b = (torch.load(tmp_path / d / engine.CHECKPOINT, weights_only=True)['model'] for d in 'ab')
    assert all(torch.equal(a[k], b[k]) for k in a) and res2['acc1'] == res['acc1']
    assert not torch.equal(a['blocks.0.mlp.fc1.weight'], torch.load(init, weights_only=True)['blocks.0.mlp.fc1.weight'])


def test_subset_and_max_steps(toy, micro, tmp_path, capsys):
    """--subset 24 of the 48 training images at batch 8: 3 steps per epoch; --max-steps 5 ends mid-epoch 2, with a
    validation there; the warmup keeps its share (1 of 3 epochs: round(5 / 3) = 2 steps)."""
    res = ft.main(['--data', toy, '--arch', 'vit_tiny', '--init', micro('vit_tiny'), '--epochs', '3', '--subset', '24',
                   '--max-steps', '5', '--lr', '1e-3', '--output-dir', str(tmp_path)] + TOY)
    assert '24 training / 16 val images' in capsys.readouterr().out
    log = read_log(tmp_path)
    assert [x['step'] for x in log if 'loss' in x] == [2, 3, 4, 5]
    assert [(x['epoch'], x['step']) for x in log if 'acc1' in x] == [(1, 3), (2, 5)]
    assert [x['lr'] for x in log if 'loss' in x][0] == pytest.approx(1e-3)  # step 2: the last warmup step
    ckpt = torch.load(tmp_path / engine.CHECKPOINT, weights_only=True)
    assert ckpt['step'] == 5 and ckpt['args']['subset'] == 24 and res['epoch'] == 2


def test_override_rule_unset_takes_recipe_explicit_always_wins():
    parse = ft.get_args_parser().parse_args
    # with --data: unset flags take the recipe (ViT-B REVDET: Table 10's 5e-3), explicit ones win, even when equal
    args = parse(['--data', 'd', '--blr', '3e-3', '--epochs', '100'])
    taken = ft.settle_args(args, False, dict(arch='vit_base', task='revdet'))
    assert (args.arch, args.blr, args.epochs, args.weight_decay, args.img_size) == ('vit_base', 3e-3, 100, 0.05, 224)
    assert 'blr' not in taken and 'epochs' not in taken and taken['arch'] == 'vit_base' and taken['layer_decay'] == 0.8
    args = parse(['--data', 'd', '--arch', 'resnet50', '--recipe', '100', '--test-img-size', '160'])
    ft.settle_args(args, False, {})
    assert (args.img_size, args.test_img_size, args.loss, args.repeated_aug) == (160, 160, 'bce', 1)
    # the demo: the checkpoint's model, then the demo's values, then the recipe; explicit flags equal to the
    # recipe's (patch 16, 100 epochs, batch 128) still beat the checkpoint's and the demo's
    meta = dict(arch='vit_small', img_size=32, patch_size=4, task='respix')
    args = parse(['--patch-size', '16', '--epochs', '100', '--batch-size', '128'])
    taken = ft.settle_args(args, True, meta)
    assert (args.patch_size, args.epochs, args.batch_size) == (16, 100, 128)
    assert (args.arch, args.img_size, args.test_img_size) == ('vit_small', 32, 32)               # checkpoint
    assert (args.lr, args.subset, args.mixup, args.randaug, args.warmup_epochs) == (3e-3, 4000, 0.0, 0, 0)  # demo
    assert (args.blr, args.weight_decay, args.smoothing, args.drop_path) == (3e-3, 0.05, 0.1, 0.1)  # Table 10
    assert not {'patch_size', 'epochs', 'batch_size'} & set(taken) and taken['lr'] == 3e-3
    args = parse(['--linear-probe'])
    ft.settle_args(args, True, meta)
    assert (args.lr, args.epochs, args.loss) == (ft.DEMO_PROBE['lr'], 3, 'ce')
    # --knn: only what kNN reads is set (and shown)
    args = parse(['--knn'])
    taken = ft.settle_args(args, True, meta)
    assert set(taken) <= set(ft.KNN_SETTINGS) and taken['subset'] == 4000 and taken['test_img_size'] == 32
    assert args.epochs is None and args.lr is None and args.knn_k == 20


def test_resnet_recipe_bce_repeated_aug_stochastic_depth_runs(toy, micro, tmp_path):
    # --clip-grad 5 also covers the clipped path (the recipe itself has no clipping)
    res = ft.main(['--data', toy, '--arch', 'resnet50', '--recipe', '600', '--init', micro('resnet50'),
                   '--epochs', '2', '--clip-grad', '5', '--lr', '1e-3', '--amp', 'none', '--output-dir',
                   str(tmp_path)] + TOY[4:] + ['--img-size', '32', '--test-img-size', '32'])
    assert res['n_val'] == 16 and res['acc1'] >= 50
    args = torch.load(tmp_path / engine.CHECKPOINT, weights_only=True)['args']
    assert (args['loss'], args['repeated_aug'], args['drop_path'], args['mixup']) == ('bce', 3, 0.05, 0.2)


def test_linear_probe_keeps_backbone_frozen_and_knn_mode(toy, micro, tmp_path):
    init = micro('vit_tiny')
    probe = ft.main(['--data', toy, '--arch', 'vit_tiny', '--init', init, '--linear-probe', '--epochs', '2', '--lr',
                     '0.1', '--output-dir', str(tmp_path / 'probe')] + TOY)
    assert probe['acc1'] >= 90
    state = torch.load(tmp_path / 'probe' / engine.CHECKPOINT, weights_only=True)['model']
    backbone = torch.load(init, weights_only=True)
    assert all(torch.equal(state['backbone.' + k], v) for k, v in backbone.items())   # frozen (a ViT: no BN)
    assert 'head.0.weight' not in state and 'head.0.running_mean' in state            # BatchNorm without affine
    knn = ft.main(['--data', toy, '--arch', 'vit_tiny', '--init', init, '--knn', '--output-dir',
                   str(tmp_path / 'knn')] + TOY)
    assert knn['knn_acc1'] >= 90


def test_random_init_knn_and_probe(toy, micro, tmp_path, capsys):
    """--init none: the random-init baselines of kNN and the linear probe run and report an accuracy; ResNet-50's
    frozen features get BN statistics of the clean training images first (the probe: saved with the backbone)."""
    knn = ft.main(['--data', toy, '--arch', 'vit_tiny', '--init', 'none', '--knn', '--output-dir',
                   str(tmp_path / 'knn')] + TOY)
    assert 0 <= knn['knn_acc1'] <= 100
    recipe = [x for x in capsys.readouterr().out.splitlines() if x.startswith('recipe:')]
    assert recipe == ['recipe: --knn-k 20 --knn-t 0.07 --crop-ratio 0.875']              # kNN's settings only
    probe = ft.main(['--data', toy, '--arch', 'resnet50', '--init', 'none', '--linear-probe', '--epochs', '1',
                     '--lr', '0.1', '--output-dir', str(tmp_path / 'probe')] + TOY[4:] +
                    ['--img-size', '16', '--test-img-size', '16'])
    assert 0 <= probe['acc1'] <= 100 and probe['epoch'] == 1
    assert 'BN statistics of the frozen backbone re-estimated' in capsys.readouterr().out
    state = torch.load(tmp_path / 'probe' / engine.CHECKPOINT, weights_only=True)['model']
    torch.manual_seed(0)                                                                # --seed 0: the same init
    fresh = cim.build_enhancer('resnet50').state_dict()
    assert torch.equal(state['backbone.layer1.0.conv1.weight'], fresh['layer1.0.conv1.weight'])   # frozen
    assert not torch.equal(state['backbone.bn1.running_mean'], fresh['bn1.running_mean'])        # re-estimated


def test_knn_reestimates_resnet_bn_statistics_on_clean_training_images(toy, micro, tmp_path, monkeypatch):
    """The BN protocol: before kNN's features, bn1's running mean becomes conv1's mean response over the clean
    (evaluation-view) training images, replacing the stored one."""
    init = micro('resnet50')
    nets = []
    real = engine.recompute_bn_stats

    def spy(model, *args, **kwargs):
        nets.append(model)
        return real(model, *args, **kwargs)
    monkeypatch.setattr(engine, 'recompute_bn_stats', spy)
    res = ft.main(['--data', toy, '--arch', 'resnet50', '--init', init, '--knn', '--amp', 'none', '--crop-ratio', '1',
                   '--output-dir', str(tmp_path)] + TOY)
    assert 0 <= res['knn_acc1'] <= 100 and len(nets) == 1
    stored = torch.load(init, weights_only=True)
    tf = ft.eval_transform(16, 1.0)
    train = [os.path.join(d, f) for d, _, files in os.walk(os.path.join(toy, 'train')) for f in files]
    imgs = torch.stack([tf(Image.open(p).convert('RGB')) for p in train])                 # [48, 3, 16, 16]
    want = F.conv2d(imgs, stored['conv1.weight'], stride=2, padding=3).mean((0, 2, 3))   # 6 equal batches of 8
    assert not torch.allclose(stored['bn1.running_mean'], want, atol=1e-3)
    assert torch.allclose(nets[0].bn1.running_mean, want, atol=1e-5)


def test_demo_finetunes_the_pretrained_checkpoint_and_random_init(micro, tmp_path, monkeypatch, capsys):
    """`python train.py && python finetune.py` with a stand-in for train.py's demo checkpoint (the tiny ViT, 32 px,
    patch 4) and the fake Fashion-MNIST of conftest.py (400 / 200 images): both runs, the demo's settings."""
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(1)
    enhancer = cim.build_enhancer('vit_tiny', 32, 4).state_dict()
    os.makedirs(os.path.join('out', 'demo'))
    torch.save(dict(model={'enhancer.' + k: v for k, v in enhancer.items()},
                    args=dict(arch='vit_tiny', img_size=32, patch_size=4, task='respix')), engine.DEMO_CHECKPOINT)
    res = ft.main(['--subset', '128', '--amp', 'none'])  # CPU bf16 is slow
    assert set(res) == {'pre-trained', 'random init'}
    out = capsys.readouterr().out
    assert 'no --data' in out and 'Fashion-MNIST test top-1, vit_tiny, 3 epochs on 128 training images' in out
    for name, sub in (('pre-trained', 'pretrained'), ('random init', 'scratch')):
        assert res[name]['n_val'] == 200 and res[name]['epoch'] == 3
        assert f"{name} {res[name]['acc1']:.2f}%" in out
        ckpt = torch.load(os.path.join('out', 'demo_ft', sub, engine.CHECKPOINT), weights_only=True)
        a = ckpt['args']
        assert (a['arch'], a['img_size'], a['patch_size'], a['epochs'], a['batch_size'], a['lr']) == \
            ('vit_tiny', 32, 4, 3, 64, 3e-3)
        assert (a['mixup'], a['cutmix'], a['randaug'], a['subset'], ckpt['step']) == (0.0, 0.0, 0, 128, 6)


def test_junk_init_file_gives_a_short_line_and_writes_nothing(toy, tmp_path):
    junk = tmp_path / 'junk.pth'
    junk.write_bytes(b'not a checkpoint at all')
    out = tmp_path / 'out'
    with pytest.raises(engine.UserError) as e:
        ft.main(['--data', toy, '--init', str(junk), '--output-dir', str(out)] + TOY)
    msg = str(e.value)
    assert str(junk) in msg and len(msg) < 200 + len(str(junk)) and '\n' not in msg and 'weights_only' not in msg
    assert not out.exists()


# -- bad input: one line, exit status 2, no traceback; nothing written ------------------------------------------------

def test_bad_inputs_give_one_line_errors(toy, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = toy
    flat_val = make_toy_data(tmp_path / 'flat', n_train=2, n_val=2, flat_val=True)
    torch.save({'conv1.weight': torch.zeros(64, 3, 7, 7), 'layer1.0.conv1.weight': torch.zeros(64, 64, 1, 1)},
               tmp_path / 'r.pth')
    cases = {
        'does not exist: --data must hold train/': ['--data', str(tmp_path), '--init', 'none'],
        "weights file '/nonexistent.pth' does not exist": ['--data', data, '--init', '/nonexistent.pth'],
        'holds resnet weights but the model is a vit': ['--data', data, '--init', str(tmp_path / 'r.pth'),
                                                        '--arch', 'vit_tiny'],
        '--recipe selects a Table 11 column': ['--data', data, '--init', 'none', '--recipe', '100'],
        'holds images but no class folders': ['--data', flat_val, '--init', 'none'],
        '--knn and --linear-probe are separate modes': ['--data', data, '--init', 'none', '--knn', '--linear-probe'],
        '--warmup-epochs 5 must be between 0 and --epochs 2': ['--data', data, '--init', 'none', '--epochs', '2',
                                                               '--warmup-epochs', '5'],
    }
    for msg, argv in cases.items():
        with pytest.raises(engine.UserError) as e:
            ft.main(TOY + argv)
        assert msg in str(e.value) and '\n' not in str(e.value), (msg, str(e.value))
    assert not (tmp_path / 'out').exists()                               # inputs are checked before any folder
    # as the command line shows them (engine.run_cli): one line on stderr, exit status 2, no traceback
    argv = TOY + cases['holds images but no class folders']
    p = subprocess.run([sys.executable, os.path.join(ROOT, 'finetune.py')] + argv, cwd=tmp_path, capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 2 and p.stderr.startswith('error: ') and len(p.stderr.strip().splitlines()) == 1, p.stderr


def test_a_second_run_in_a_live_runs_folder_is_refused(toy, micro, held_dir):
    out, p = held_dir
    with pytest.raises(engine.UserError, match=f'in use by a live run \\(process {p.pid}\\)'):
        ft.main(['--data', toy, '--arch', 'vit_tiny', '--init', micro('vit_tiny'), '--epochs', '1',
                 '--output-dir', str(out)] + TOY)
    assert not (out / engine.CHECKPOINT).exists()
