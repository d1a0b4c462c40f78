"""segment.py: metrics against hand-computed counts, the joint transforms, the models' shapes and weight loading,
sliding windows, and tiny end-to-end runs (train, evaluate, checkpoint, resume) on generated ADE20K-format data."""
import colorsys
import functools
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from torchvision import tv_tensors

import cim
import engine
import segment as seg
from conftest import Preempted, preempt_after

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRIMARIES = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255]], np.uint8)  # label k -> a pure colour


def make_ade(root, n_train=6, n_val=3, seed=0):
    """ADEChallengeData2016 layout: random rectangles of labels 1..150 on label 0, images of H x W in 36..55 whose
    colour is a function of the label."""
    rng = np.random.default_rng(seed)
    for split, n in (('training', n_train), ('validation', n_val)):
        for d in ('images', 'annotations'):
            os.makedirs(os.path.join(root, d, split), exist_ok=True)
        for i in range(n):
            h, w = rng.integers(36, 56, 2)
            lab = np.zeros((h, w), np.uint8)
            for _ in range(4):
                y = rng.integers(0, h - 8)
                x = rng.integers(0, w - 8)
                lab[y:y + rng.integers(8, 20), x:x + rng.integers(8, 20)] = rng.integers(1, 151)
            img = np.stack([lab, 255 - lab, (lab.astype(np.int64) * 7) % 256], -1).astype(np.uint8)
            Image.fromarray(img).save(os.path.join(root, 'images', split, f'ADE_{split}_{i:08d}.jpg'))
            Image.fromarray(lab).save(os.path.join(root, 'annotations', split, f'ADE_{split}_{i:08d}.png'))
    return str(root)


def as_is(img, mask):
    """A joint transform that returns the pair unchanged."""
    return img, mask


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run on one thread: two threads on two shared cores can spin against each other (10x slower)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope='module')
def ade(tmp_path_factory):
    return make_ade(tmp_path_factory.mktemp('ade') / 'ADEChallengeData2016')


@pytest.fixture
def micro(monkeypatch, tmp_path):
    """Small stand-ins under the real names (as in test_finetune): 'vit_tiny' with 2 blocks of width 32, 'resnet50'
    with one Bottleneck per stage (same key names, 1024 / 2048 channels). -> save(arch, size, patch): weights file."""
    monkeypatch.setitem(cim.VIT_CONFIGS, 'vit_tiny', dict(embed_dim=32, depth=2, num_heads=2))

    def resnet50(**kwargs):
        return torchvision.models.resnet.ResNet(torchvision.models.resnet.Bottleneck, [1, 1, 1, 1], **kwargs)
    monkeypatch.setattr(torchvision.models, 'resnet50', resnet50)

    def save(arch, size=16, patch=8):
        torch.manual_seed(1)
        path = str(tmp_path / f'{arch}_init.pth')
        torch.save(cim.build_enhancer(arch, size, patch).state_dict(), path)
        return path
    return save


# -- metrics ---------------------------------------------------------------------------------------------------------

def test_confusion_matrix_and_metrics_by_hand():
    """3 classes; class 2 is predicted but never in the ground truth (IoU 0, counted), 255 pixels left out."""
    target = torch.tensor([[0, 0, 1, 1], [0, 255, 1, 255]])
    pred = torch.tensor([[0, 1, 1, 2], [0, 2, 1, 0]])
    hist = seg.confusion_matrix(pred, target, 3)
    # gt 0: predicted 0, 1, 0; gt 1: predicted 1, 2, 1; the two 255 pixels (predicted 2 and 0) are ignored
    assert hist.tolist() == [[2, 1, 0], [0, 2, 1], [0, 0, 0]]
    m = seg.segmentation_metrics(hist)
    iou = [2 / (3 + 2 - 2), 2 / (3 + 3 - 2), 0 / (0 + 1 - 0)]
    assert m['IoU'] == pytest.approx([100 * v for v in iou])
    assert m['mIoU'] == pytest.approx(100 * sum(iou) / 3)
    assert m['aAcc'] == pytest.approx(100 * 4 / 6)
    assert m['mAcc'] == pytest.approx(100 * (2 / 3 + 2 / 3) / 2)       # class 2 has no ground truth: left out
    # a class absent from both ground truth and prediction is left out of the mean, not counted as 0
    m4 = seg.segmentation_metrics(seg.confusion_matrix(pred, target, 4))
    assert np.isnan(m4['IoU'][3]) and m4['mIoU'] == pytest.approx(m['mIoU'])
    # brute force on random data with ignored pixels
    g = torch.Generator().manual_seed(0)
    t = torch.randint(0, 6, (3, 17, 19), generator=g)
    p = torch.randint(0, 5, (3, 17, 19), generator=g)
    t[t == 5] = 255
    ref = np.zeros((5, 5), np.int64)
    for a, b in zip(t.flatten().tolist(), p.flatten().tolist()):
        if a != 255:
            ref[a, b] += 1
    assert seg.confusion_matrix(p, t, 5).tolist() == ref.tolist()


def test_poly_lr_matches_mmseg_formula():
    lrs = seg.poly_schedule(0.01, 1e-4, 100, power=0.9)
    assert len(lrs) == 100 and lrs[0] == pytest.approx(0.01)
    assert lrs[50] == pytest.approx(1e-4 + (0.01 - 1e-4) * 0.5 ** 0.9)
    assert lrs[99] == pytest.approx(1e-4 + (0.01 - 1e-4) * 0.01 ** 0.9) and min(lrs) > 1e-4   # 1e-4 at step 100
    assert seg.poly_schedule(0.01, 0.0, 100, 10, 0.9)[4] == pytest.approx(0.01 * 0.96 ** 0.9 * 0.5)
    warm = seg.poly_schedule(3e-4, 0.0, 20, 5, 1.0)                          # BEiT: linear warmup, then linear decay
    assert warm[4] == pytest.approx(3e-4 * 0.8) and warm[:5] == sorted(warm[:5]) and warm[5:] == sorted(warm[5:])[::-1]


def test_seg_loss_averages_over_all_pixels_as_mmseg():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 3, 5)
    target = torch.randint(0, 4, (2, 3, 5))
    target[0, 0] = 255
    per_pixel = torch.nn.functional.cross_entropy(logits, target.clamp(max=3), reduction='none')
    expected = (per_pixel * (target != 255)).sum() / target.numel()
    assert seg.seg_loss(logits, target).item() == pytest.approx(expected.item(), rel=1e-6)


# -- data -------------------------------------------------------------------------------------------------------------

def test_reduce_zero_label_and_png_annotations_round_trip(tmp_path):
    m = np.array([[0, 1, 2, 150, 255]], np.uint8)
    assert seg.reduce_zero_label(m).tolist() == [[255, 0, 1, 149, 255]]
    labels = (np.arange(37 * 41) % 151).astype(np.uint8).reshape(37, 41)
    root = make_ade(tmp_path / 'ade', n_train=1, n_val=1)
    name = os.listdir(os.path.join(root, 'annotations', 'training'))[0]
    Image.fromarray(labels).save(os.path.join(root, 'annotations', 'training', name))
    Image.new('RGB', (41, 37)).save(os.path.join(root, 'images', 'training', name.replace('.png', '.jpg')))
    img, mask, n_bad = seg.ADE20K(root, 'training', as_is)[0]
    assert isinstance(mask, tv_tensors.Mask) and mask.dtype == torch.uint8 and n_bad == 0
    assert mask.tolist() == seg.reduce_zero_label(labels).tolist() and img.shape == (3, 37, 41)
    raw = seg.ADE20K(root, 'training', as_is)._read(0)[1]                       # the PNG as read, before reduction
    assert np.array_equal(raw, labels)
    assert seg.class_names(root, 150)[:2] == ['0', '1']
    with open(os.path.join(root, 'objectInfo150.txt'), 'w') as f:  # ADEChallengeData2016's class list
        f.write('Idx\tRatio\tTrain\tVal\tName\n' + ''.join(f'{k + 1}\t0.1\t1\t1\tname{k};alias\n' for k in range(150)))
    assert seg.class_names(root, 150)[:2] == ['name0', 'name1']


def test_ade20k_layout_errors_and_unreadable_images(tmp_path):
    root = make_ade(tmp_path / 'ade', n_train=3, n_val=1)
    with pytest.raises(engine.UserError, match=r"annotations/validation' does not exist: --data must be ADEChallen"):
        os.rename(os.path.join(root, 'annotations', 'validation'), os.path.join(root, 'ann_val'))
        seg.ADE20K(root, 'validation', as_is)
    os.remove(os.path.join(root, 'annotations', 'training', 'ADE_training_00000001.png'))
    with pytest.raises(engine.UserError, match=r"1 of 3 images have no partner .* \(e.g. 'ADE_training_00000001.jpg"):
        seg.ADE20K(root, 'training', as_is)
    os.remove(os.path.join(root, 'images', 'training', 'ADE_training_00000001.jpg'))
    (tmp_path / 'ade' / 'images' / 'training' / 'ADE_training_00000000.jpg').write_bytes(b'\xff\xd8\xff truncated')
    ds = seg.ADE20K(root, 'training', as_is)
    with pytest.warns(UserWarning, match='skipping unreadable image'):
        img, mask, n_bad = ds[0]
    assert n_bad == 1 and mask.shape == img.shape[1:]                       # the next pair stands in
    ann = os.path.join(root, 'annotations', 'training', 'ADE_training_00000002.png')
    Image.fromarray(np.full((40, 40), 200, np.uint8)).save(ann)
    Image.new('RGB', (40, 40)).save(ann.replace('annotations', 'images').replace('.png', '.jpg'))
    with pytest.raises(engine.UserError, match='has label 200 but the dataset has 150 classes'):
        ds[1]
    Image.new('RGB', (40, 40)).save(ann)
    with pytest.raises(engine.UserError, match='not a single-channel 8-bit PNG'):
        ds[1]


# -- joint transforms -------------------------------------------------------------------------------------------------

def test_rescale_size_follows_mmcv_keep_ratio_rule():
    assert seg.rescale_size(512, 683, (2048, 512)) == (512, 683)                # the short side binds
    assert seg.rescale_size(100, 900, (2048, 512)) == (228, 2048)               # the long side binds (9:1)
    assert seg.rescale_size(683, 512, (2048, 512)) == (683, 512)                # portrait: same rule
    assert seg.rescale_size(300, 400, (1024, 256)) == (256, 341)               # 341.33 rounds down
    assert seg.rescale_size(64, 64, (256, 64)) == (64, 64)


def test_train_transform_keeps_image_and_mask_aligned():
    """Label k is painted as a pure primary colour; every step (rescale, crop, flip, photometric distortion, pad)
    must keep the mask on the image: the dominant channel of each pixel names its label, except within 1 px of
    region borders, where bilinear resizing blends the colours. Padding: mask 255 exactly where the image is the mean
    colour."""
    rng = np.random.default_rng(0)
    tf = functools.partial(seg.train_pipeline, crop_size=32, scale=(128, 32), ratio_range=(0.5, 2.0),
                           cat_max_ratio=0.75)
    agreement = []
    for trial in range(30):
        blocks = rng.integers(0, 3, (5, 7))
        lab = np.kron(blocks, np.ones((8, 9), np.int64)).astype(np.uint8)    # 40 x 63, blocks of 8 x 9 px
        img = tv_tensors.Image(torch.from_numpy(PRIMARIES[lab]).permute(2, 0, 1).contiguous())
        torch.manual_seed(trial)
        out, mask = tf(img, tv_tensors.Mask(torch.from_numpy(lab)))
        assert out.shape == (3, 32, 32) and out.dtype == torch.float32
        assert mask.shape == (32, 32) and mask.dtype == torch.uint8 and type(mask) is torch.Tensor
        assert set(mask.unique().tolist()) <= {0, 1, 2, 255}
        pad = (out == 0).all(0)
        assert torch.equal(mask == 255, pad)
        valid = mask != 255
        decoded = cim.unnormalize(out[None])[0].argmax(0)
        agreement.append(float((decoded == mask.long())[valid].float().mean()))
        near = torch.nn.functional.max_pool2d(torch.stack([(mask == k).float() for k in range(3)])[None], 3, 1, 1)[0]
        inner = valid[1:-1, 1:-1]  # at the crop's edge the other side of a border may be cut away
        assert near.gather(0, decoded[None])[0, 1:-1, 1:-1][inner].all()  # disagreements: 1 px from a border
    assert min(agreement) > 0.8 and np.mean(agreement) > 0.9, agreement
    # the check has teeth: an image flipped without its mask agrees far less
    flip_image_only = torch.from_numpy(np.ascontiguousarray(PRIMARIES[lab][:, ::-1])).permute(2, 0, 1)
    assert (flip_image_only.argmax(0) == torch.from_numpy(lab)).float().mean() < 0.8


def test_cat_max_ratio_redraws_crops_dominated_by_one_class():
    """A 64 x 16 mask, rows 0..39 class 1 and 40..63 class 2, 16 x 16 crops: only tops 29..35 (7 of 49) hold both
    classes with neither at 75 %; 10 tries accept one with probability 1 - (42/49)^10 = 0.79. Ignored pixels
    do not count, and a crop of one class plus ignored pixels is rejected."""
    mask = torch.ones(64, 16, dtype=torch.uint8)
    mask[40:] = 2

    def acceptance(ratio, m):
        ok = 0
        for s in range(300):
            torch.manual_seed(s)
            top, left, h, w = seg.random_crop_box(m, 16, ratio)
            ok += seg.crop_is_balanced(m[top:top + h, left:left + w], 0.75)
        return ok / 300
    assert acceptance(1.0, mask) < 0.25 and acceptance(0.75, mask) > 0.65
    assert seg.crop_is_balanced(torch.tensor([1, 1, 2, 255, 255, 255, 255]), 0.75)
    assert not seg.crop_is_balanced(torch.tensor([1, 1, 1, 255, 255]), 0.75)
    assert not seg.crop_is_balanced(torch.tensor([1, 1, 1, 2]), 0.75)          # 75 % is too much (strict)
    torch.manual_seed(0)
    box = seg.random_crop_box(torch.ones(64, 16, dtype=torch.uint8), 16, 0.75)
    assert box[2:] == (16, 16) and 0 <= box[0] <= 48 and box[1] == 0            # never balanced: the last draw


def test_photometric_distortion_saturation_is_hsv_and_steps_are_random():
    g = torch.Generator().manual_seed(0)
    px = torch.rand(3, 5, 7, generator=g) * 255
    for factor in (0.5, 1.3, 4.0):
        got = seg.scale_saturation(px, factor)
        for y in range(5):
            for x in range(7):
                h, s, v = colorsys.rgb_to_hsv(*px[:, y, x].tolist())
                ref = colorsys.hsv_to_rgb(h, min(s * factor, 1.0), v)
                assert got[:, y, x].tolist() == pytest.approx(ref, abs=1e-3)
    img = tv_tensors.Image((torch.rand(3, 8, 8, generator=g) * 255).to(torch.uint8))
    changed = 0
    for s in range(20):
        torch.manual_seed(s)
        out = seg.photometric_distortion(img)       # the image alone: train_pipeline never passes the mask through it
        assert out.dtype == torch.uint8 and out.shape == img.shape
        changed += not torch.equal(out, img)
    assert changed >= 15                                   # all four steps skipped: probability 1/16


def test_test_transform_rescales_image_only():
    img = tv_tensors.Image(torch.zeros(3, 30, 40, dtype=torch.uint8))
    out, mask = seg.test_pipeline(img, tv_tensors.Mask(torch.zeros(30, 40, dtype=torch.uint8)), (256, 64))
    assert out.shape == (3, 64, 85) and mask.shape == (30, 40) and type(out) is type(mask) is torch.Tensor


# -- models -----------------------------------------------------------------------------------------------------------

def test_dilated_resnet50_has_output_stride_8_and_loads_torchvision_weights():
    torch.manual_seed(0)
    model = seg.FCN(150)
    c3, c4 = seg.resnet_stages(model.backbone, torch.randn(2, 3, 64, 64))
    assert c3.shape == (2, 1024, 8, 8) and c4.shape == (2, 2048, 8, 8)
    b = model.backbone
    assert b.layer3[0].conv2.dilation == (1, 1) and b.layer3[1].conv2.dilation == (2, 2)   # contract_dilation
    assert b.layer4[0].conv2.dilation == (2, 2) and b.layer4[2].conv2.dilation == (4, 4)
    tv = torchvision.models.resnet50().state_dict()
    missing, ignored = engine.load_pretrained(model.backbone, tv, 'torchvision', verbose=False)
    assert missing == [] and sorted(ignored) == ['fc.bias', 'fc.weight']
    assert all(torch.equal(v, tv[k]) for k, v in model.backbone.state_dict().items())
    model.train()
    outs = model(torch.randn(2, 3, 64, 64))
    assert [o.shape for o in outs] == [(2, 150, 64, 64)] * 2                   # decode + auxiliary head
    model.eval()
    assert [o.shape for o in model(torch.randn(1, 3, 40, 56))] == [(1, 150, 40, 56)]
    assert isinstance(model.auxiliary_head[3], torch.nn.Dropout2d)
    assert model.decode_head.conv_cat[0].in_channels == 2048 + 512
    assert model.decode_head.conv_seg.weight.std().item() == pytest.approx(0.01, rel=0.1)


def test_vit_position_embeddings_interpolated_from_224_to_512():
    """Small version of ViT-B/16 pre-trained at 224 (14 x 14 patches) loaded for 512 crops (32 x 32)."""
    torch.manual_seed(0)
    src = cim.VisionTransformer(224, 16, embed_dim=8, depth=2, num_heads=2).state_dict()
    model = seg.LinearViT(cim.VisionTransformer(512, 16, embed_dim=8, depth=2, num_heads=2), 150)
    engine.load_pretrained(model.backbone, src, 'vit224', verbose=False)
    pos = model.backbone.pos_embed.detach()
    assert pos.shape == (1, 1 + 32 * 32, 8)
    assert torch.equal(pos, engine.interpolate_pos_embed(src['pos_embed'], 1024))
    assert torch.equal(pos[:, 0], src['pos_embed'][:, 0])                     # cls position kept
    assert torch.equal(model.backbone.blocks[1].mlp.fc2.weight, src['blocks.1.mlp.fc2.weight'])
    with torch.no_grad():
        assert model(torch.randn(1, 3, 512, 512))[0].shape == (1, 150, 512, 512)


def test_sliding_windows_cover_every_pixel_and_match_whole_inference():
    for length in (1, 20, 32, 33, 50, 64, 97, 683):
        for crop, stride in ((32, 21), (32, 32), (32, 1), (512, 341)):
            starts = seg.window_starts(length, crop, stride)
            covered = torch.zeros(max(length, crop))
            for s in starts:
                covered[s:s + crop] += 1
            assert (covered[:length] > 0).all() and max(starts) + crop == max(length, crop)
            assert all(b - a <= stride for a, b in zip(starts, starts[1:]))
    assert seg.window_starts(683, 512, 341) == [0, 171]                        # mmseg: the last window flush

    class Pointwise(torch.nn.Module):                                           # no context: windows cannot matter
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 5, 1)

        def forward(self, x):
            return [self.conv(x)]
    torch.manual_seed(0)
    net = Pointwise()
    for h, w in ((50, 70), (20, 24), (32, 32), (32, 90)):
        x = torch.randn(2, 3, h, w)
        assert torch.allclose(seg.slide_inference(net, x, 32, 21, chunk=2), net(x)[0], atol=1e-6)
    vit = seg.LinearViT(cim.VisionTransformer(32, 8, embed_dim=16, depth=1, num_heads=2), 7).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():                                                       # one window == a plain forward
        assert torch.allclose(seg.slide_inference(vit, x, 32, 21), vit(x)[0], atol=1e-6)


def test_vit_optimizer_layer_decay_and_no_weight_decay_groups():
    model = seg.LinearViT(cim.VisionTransformer(32, 8, embed_dim=16, depth=3, num_heads=2), 7)
    args = type('A', (), dict(layer_decay=0.8, weight_decay=0.05, lr=3e-4, betas=(0.9, 0.999)))
    opt = seg.build_optimizer(model, args)
    assert isinstance(opt, torch.optim.AdamW)
    got = {id(p): (g['lr_scale'], g['weight_decay']) for g in opt.param_groups for p in g['params']}
    assert got[id(model.decode_head.weight)] == (1.0, 0.05) and got[id(model.decode_head.bias)] == (1.0, 0.0)
    assert got[id(model.backbone.pos_embed)] == (pytest.approx(0.8 ** 4), 0.0)
    assert got[id(model.backbone.blocks[2].attn.qkv.weight)] == (pytest.approx(0.8), 0.05)
    assert got[id(model.backbone.norm.weight)] == (1.0, 0.0)


def test_validate_scores_an_oracle_and_whole_equals_slide(tmp_path):
    """A pointwise 'model' that reads each pixel's label from its red channel (PNG images, red = ADE label): through
    the test view (rescale), inference, logits resized back to the annotation, reduce_zero_label and the confusion
    matrix it scores near 100 (only region borders blur); a label off by one or a misaligned mask would not."""
    rng = np.random.default_rng(0)
    for d in ('images', 'annotations'):
        (tmp_path / d / 'validation').mkdir(parents=True)
    for i in range(3):
        lab = np.kron(rng.integers(0, 151, (4, 5)), np.ones((11, 13), np.int64)).astype(np.uint8)   # 44 x 65
        Image.fromarray(lab).save(tmp_path / 'annotations' / 'validation' / f'{i}.png')
        Image.fromarray(np.stack([lab, lab // 2, 255 - lab], -1)).save(tmp_path / 'images' / 'validation' / f'{i}.png')

    class Oracle(torch.nn.Module):
        def forward(self, x):
            k = (cim.unnormalize(x)[:, 0] * 255).round().long() - 1                 # ADE label k -> class k - 1
            return [torch.nn.functional.one_hot(k.clamp(0, 149), 150).permute(0, 3, 1, 2).float()]
    for scale in ((128, 44), (128, 32)):                                # the annotation's size, and 32 x 47
        data = seg.ADE20K(str(tmp_path), 'validation', functools.partial(seg.test_pipeline, scale=scale))
        loader = torch.utils.data.DataLoader(data, 1, sampler=engine.ShardSampler(len(data)))
        res = {}
        for mode in ('whole', 'slide'):
            args = type('A', (), dict(arch='vit_tiny', eval_mode=mode, img_size=32, stride=21, num_classes=150))
            res[mode] = seg.validate(Oracle(), loader, args, torch.device('cpu'), None)
        assert res['whole']['n_val'] == 3 and np.allclose(res['whole']['IoU'], res['slide']['IoU'], equal_nan=True)
        if scale == (128, 44):
            assert res['whole']['mIoU'] == res['whole']['aAcc'] == 100.0
        else:  # resized: blended colours at region borders decode to wrong (often absent) classes
            assert res['whole']['aAcc'] > 85, res['whole']                     # measured: 91


# -- end to end ------------------------------------------------------------------------------------------------------

TINY = ['--img-size', '32', '--scale', '128', '32', '--num-workers', '0', '--log-every', '1']


def read_log(out):
    return [json.loads(line) for line in open(os.path.join(out, 'log.jsonl'))]




def test_fcn_end_to_end_evaluates_saves_and_refuses_another_arch(ade, micro, tmp_path):
    argv = ['--data', ade, '--arch', 'resnet50', '--init', micro('resnet50'), '--max-steps', '3', '--eval-every', '2',
            '--amp', 'none', '--output-dir', str(tmp_path / 'a')] + TINY
    res = seg.main(argv)
    assert res['step'] == 3 and res['n_val'] == 3 and 0 <= res['mIoU'] <= 100 and 0 <= res['aAcc'] <= 100
    log = read_log(tmp_path / 'a')
    train_lines = [x for x in log if 'loss' in x]
    evals = [x for x in log if 'mIoU' in x]
    assert [x['step'] for x in train_lines] == [1, 2, 3] and [x['step'] for x in evals] == [2, 3]
    assert all(np.isfinite([x['loss'], x['aux_loss'], x['grad_norm']]).all() for x in train_lines)
    assert train_lines[0]['lr'] == pytest.approx(0.01) and train_lines[-1]['lr'] < 0.01       # poly decay
    assert len(evals[-1]['IoU']) == 150 and evals[-1]['mIoU'] == pytest.approx(res['mIoU'])
    files = set(os.listdir(tmp_path / 'a'))
    assert {engine.CHECKPOINT, 'checkpoint-best.pth', 'step000002.png', 'step000003.png'} <= files
    assert Image.open(tmp_path / 'a' / 'step000003.png').size[0] > 3 * 160                  # 3 columns, enlarged
    best = torch.load(tmp_path / 'a' / 'checkpoint-best.pth', weights_only=True)
    assert best['mIoU'] == res['best_mIoU'] and best['step'] == res['best_step']
    # unset flags took the FCN recipe (mmseg fcn_r50-d8)
    a = torch.load(tmp_path / 'a' / engine.CHECKPOINT, weights_only=True)['args']
    assert (a['eval_mode'], a['momentum'], a['aux_weight'], a['batch_size']) == ('whole', 0.9, 0.4, 2)
    # resuming with another architecture: one line
    with pytest.raises(engine.UserError, match=r'written with --arch resnet50 \(now vit_tiny\)'):
        seg.main(argv[:2] + ['--arch', 'vit_tiny', '--patch-size', '8', '--init', 'none', '--max-steps', '5',
                             '--warmup-steps', '1', '--output-dir', str(tmp_path / 'a')] + TINY)


def test_preempted_run_resumes_exactly(ade, micro, tmp_path, monkeypatch):
    """Killed after logging step 3, past the save at step 2 (mid-epoch: 3 steps per epoch), rerun: bit-identical to
    an uninterrupted run (bf16 autocast, stochastic depth 0.1 from the ViT recipe: the RNG states must be restored
    too), and log.jsonl equal record for record (timings aside; step 3 not twice)."""
    argv = ['--data', ade, '--arch', 'vit_tiny', '--patch-size', '8', '--init', micro('vit_tiny', 32, 8),
            '--max-steps', '5', '--warmup-steps', '1', '--eval-every', '2', '--save-every-steps', '2',
            '--amp', 'bf16'] + TINY
    res = seg.main(argv + ['--output-dir', str(tmp_path / 'a')])
    preempt_after(monkeypatch, 1, 'log_jsonl', when=lambda kwargs, record: record.get('step') == 3)
    with pytest.raises(Preempted):
        seg.main(argv + ['--output-dir', str(tmp_path / 'b')])
    assert torch.load(tmp_path / 'b' / engine.CHECKPOINT, weights_only=True)['step'] == 2
    assert read_log(tmp_path / 'b')[-1]['step'] == 3
    res2 = seg.main(argv + ['--output-dir', str(tmp_path / 'b')])
    a = torch.load(tmp_path / 'a' / engine.CHECKPOINT, weights_only=True)
    b = torch.load(tmp_path / 'b' / engine.CHECKPOINT, weights_only=True)
    assert a['args']['amp'] == 'bf16' and a['args']['drop_path'] == 0.1
    assert all(torch.equal(a['model'][k], b['model'][k]) for k in a['model'])
    for k, v in a['optimizer']['state'].items():
        assert all(torch.equal(x, b['optimizer']['state'][k][n]) for n, x in v.items())
    log_b = read_log(tmp_path / 'b')
    assert res2 == res and [x['step'] for x in log_b if 'mIoU' in x] == [2, 4, 5]
    assert [x['step'] for x in log_b if 'loss' in x] == [1, 2, 3, 4, 5]
    timeless = [[{k: v for k, v in x.items() if k != 'imgs_per_s'} for x in read_log(tmp_path / d)] for d in 'ab']
    assert timeless[0] == timeless[1]


def test_vit_end_to_end_loads_interpolated_weights_slides_and_subsets(ade, micro, tmp_path, capsys):
    """ViT (patch 8) pre-trained at 16 px, segmenting 32 px crops: the grid 2x2 -> 4x4. With --lr 0 the checkpoint
    holds the loaded weights; evaluation slides 32 px windows over the test images (36..55 px, rescaled).
    --subset 4 of the 6 training images at batch 2: 2 steps per epoch."""
    init = micro('vit_tiny', size=16, patch=8)
    out = tmp_path / 'vit'
    res = seg.main(['--data', ade, '--arch', 'vit_tiny', '--patch-size', '8', '--init', init, '--max-steps', '2',
                    '--warmup-steps', '1', '--lr', '0', '--subset', '4', '--output-dir', str(out)] + TINY)
    assert res['n_val'] == 3 and res['step'] == 2
    assert '4 training / 3 val images' in capsys.readouterr().out
    assert [x['epoch'] for x in read_log(out) if 'loss' in x] == [0.5, 1.0]
    state = torch.load(out / engine.CHECKPOINT, weights_only=True)
    a = state['args']
    assert (a['eval_mode'], a['stride'], a['subset'], a['lr'], a['layer_decay'], a['drop_path']) == ('slide', 21, 4,
                                                                                                      0.0, 0.8, 0.1)
    src = torch.load(init, weights_only=True)
    assert torch.equal(state['model']['backbone.pos_embed'], engine.interpolate_pos_embed(src['pos_embed'], 16))
    assert torch.equal(state['model']['backbone.blocks.1.attn.qkv.weight'], src['blocks.1.attn.qkv.weight'])
    assert state['model']['decode_head.weight'].shape == (150, 32)


def test_demo_mosaics_and_demo_run(micro, tmp_path, monkeypatch, capsys):
    x = torch.arange(8 * 28 * 28).remainder(251).to(torch.uint8).view(8, 28, 28)
    y = torch.arange(8)
    imgs, masks = seg.fashion_mosaics(x, y, threshold=100)
    assert imgs.shape == masks.shape == (2, 64, 64)
    assert torch.equal(imgs[1, 2:30, 34:62], x[5]) and imgs[1, :2].sum() == 0          # item 5: mosaic 1, top right
    assert torch.equal(masks[1, 2:30, 34:62], torch.where(x[5] >= 100, 6, 0).to(torch.uint8))
    assert masks[:, :2].sum() == 0 and set(masks.unique().tolist()) == set(range(9))
    # the demo: no --data; the checkpoint missing -> one line; present -> pre-trained and random init
    monkeypatch.chdir(tmp_path)
    with pytest.raises(engine.UserError, match=r'run `python train.py` first'):
        seg.main([])
    torch.manual_seed(0)
    enh = cim.build_enhancer('vit_tiny', 32, 4).state_dict()
    torch.save(dict(model={'enhancer.' + k: v for k, v in enh.items()}, args=dict(arch='vit_tiny', patch_size=4,
                                                                                  img_size=32)), tmp_path / 'ck.pth')
    # --batch-size 2 and --lr 3e-4 are the ViT recipe's values, given explicitly: they win over the demo's 16 / 5e-3
    res = seg.main(['--init', str(tmp_path / 'ck.pth'), '--subset', '8', '--max-steps', '2', '--batch-size', '2',
                    '--lr', '3e-4', '--num-workers', '0'])
    # the fake Fashion-MNIST: 400 / 200 items -> 100 / 50 mosaics, 50 < 100 validation mosaics
    assert set(res) == {'pre-trained', 'random init'} and all(r['n_val'] == 50 for r in res.values())
    text = capsys.readouterr().out
    taken = next(line for line in text.splitlines() if 'unset flags take' in line)
    assert '--arch vit_tiny' in taken and '--patch-size 4' in taken and '--warmup-steps 0' in taken
    assert '--img-size 32' in taken and not re.search(r'--batch-size|--lr\b', taken)
    assert 'pre-trained' in text and 'random init' in text and 'on 8 training mosaics' in text
    state = torch.load(tmp_path / 'out' / 'demo_seg' / 'pretrained' / engine.CHECKPOINT, weights_only=True)
    a = state['args']
    assert (a['batch_size'], a['lr'], a['subset'], a['img_size'], a['eval_every'], a['arch'], a['patch_size'],
            a['warmup_steps'], a['drop_path']) == (2, 3e-4, 8, 32, 300, 'vit_tiny', 4, 0, 0.1)
    assert os.path.isfile(tmp_path / 'out' / 'demo_seg' / 'pretrained' / 'step000002.png')
    assert os.path.isfile(tmp_path / 'out' / 'demo_seg' / 'scratch' / engine.CHECKPOINT)


# -- bad input: one line ---------------------------------------------------------------------------------------------

def test_bad_inputs_raise_one_line_errors_before_writing(ade, micro, tmp_path, capsys):
    (tmp_path / 'flat').mkdir()
    vit_init = micro('vit_tiny')
    r50 = ['--data', ade, '--arch', 'resnet50', '--init', 'none', '--max-steps', '2'] + TINY
    vit = ['--data', ade, '--arch', 'vit_tiny', '--patch-size', '8', '--init', 'none', '--max-steps', '2',
           '--warmup-steps', '1'] + TINY
    cases = {
        "images/training' does not exist: --data must be ADEChallengeData2016": r50[:1] + [str(tmp_path / 'flat')] +
        r50[2:],
        "weights file '/nonexistent.pth' does not exist": r50[:4] + ['--init', '/nonexistent.pth'] + r50[6:],
        'holds vit weights but the model is a resnet': r50[:4] + ['--init', vit_init] + r50[6:],
        '--init is required with --data': ['--data', ade],
        '--img-size 30 is not divisible by --patch-size 8': vit + ['--img-size', '30'],
        'use --eval-mode slide': vit + ['--eval-mode', 'whole'],
        'BatchNorm needs more than one image per process': r50 + ['--batch-size', '1'],
        'error: argument --max-steps: must be >= 1, got 0': r50 + ['--max-steps', '0'],   # the flags' own types
        'error: argument --subset: must be >= 1, got 0': r50 + ['--subset', '0'],
        '--warmup-steps 1500 must be between 0 and --max-steps 2': vit[:-len(TINY) - 2] + TINY,
        '--stride 40 larger than --img-size 32': vit + ['--stride', '40'],
    }
    for msg, argv in cases.items():
        with pytest.raises((engine.UserError, SystemExit)) as e:          # SystemExit 2: argparse's one line
            seg.main(argv + ['--output-dir', str(tmp_path / 'out')])
        text = str(e.value) if isinstance(e.value, engine.UserError) else capsys.readouterr().err.rstrip('\n')
        assert msg in text and '\n' not in text, (msg, text)
        assert not (tmp_path / 'out').exists(), msg                         # checked before anything is written
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        seg.main(['--arch', 'vit_huge'])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1
    assert err[0].startswith("error: argument --arch: invalid choice: 'vit_huge'")


def test_cli_one_line_errors_and_a_redirected_run_without_progress_bars(ade, tmp_path):
    """As a user runs it, output redirected: errors are one line; a run's log lines and evaluation summary are plain
    lines, with no carriage returns or cursor-up escapes of (nested: train, val) progress bars."""
    cases = {"have no partner with the same name": ['--data', str(tmp_path), '--init', 'none']}
    for d in ('images', 'annotations'):
        (tmp_path / d / 'training').mkdir(parents=True)
    Image.new('RGB', (8, 8)).save(tmp_path / 'images' / 'training' / 'a.jpg')
    env = {**os.environ, 'PYTHONPATH': ROOT, 'OMP_NUM_THREADS': '1'}
    run = ['--data', ade, '--arch', 'vit_tiny', '--patch-size', '8', '--init', 'none', '--max-steps', '2',
           '--warmup-steps', '1', '--amp', 'none', '--output-dir', str(tmp_path / 'run')] + TINY
    procs = {msg: subprocess.Popen([sys.executable, os.path.join(ROOT, 'segment.py')] + argv, cwd=tmp_path, env=env,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for msg, argv in dict(cases, run=run).items()}
    for msg, p in procs.items():
        out, err = p.communicate(timeout=300)
        if msg == 'run':
            assert p.returncode == 0, err[-3000:]
            assert 'step 1/2: loss' in out and 'step 2/2: val mIoU' in out and 'done: vit_tiny' in out
            assert '\r' not in out + err and '\x1b[A' not in out + err
            continue
        lines = err.strip().splitlines()
        assert p.returncode == 2 and len(lines) == 1 and lines[0].startswith('error: ') and msg in lines[0], err


def test_a_second_run_in_a_live_runs_folder_is_refused(ade, held_dir):
    out, p = held_dir
    with pytest.raises(engine.UserError, match=f'in use by a live run \\(process {p.pid}\\)'):
        seg.main(['--data', ade, '--arch', 'vit_tiny', '--patch-size', '8', '--init', 'none', '--max-steps', '2',
                  '--warmup-steps', '1', '--output-dir', str(out)] + TINY)
    assert not (out / engine.CHECKPOINT).exists()
