"""train.py end to end, as a user runs it: subprocesses on tiny generated data and a tiny tokenizer."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

import cim
import dvae
import engine
import train
from conftest import Preempted, preempt_after, tiny_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(ROOT, 'train.py')
FIXTURES = os.path.join(ROOT, 'tests', 'fixtures')


def run(args, cwd, launcher=(), env=None, timeout=300):
    """python train.py ARGS (or LAUNCHER train.py ARGS) -> CompletedProcess with text stdout/stderr."""
    env = {**os.environ, 'PYTHONPATH': ROOT, 'OMP_NUM_THREADS': '1', **(env or {})}  # tiny models: 1 thread
    cmd = [sys.executable, *map(str, launcher), TRAIN, *map(str, args)]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def ok(r):
    assert r.returncode == 0, f'exit {r.returncode}\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}'
    return r


@pytest.fixture(scope='module')
def files(tmp_path_factory):
    """A tiny tokenizer (4x downsampling, 64 codes) and an ImageFolder of 15 readable images + 1 broken one."""
    d = tmp_path_factory.mktemp('train')
    dvae.save_tokenizer(tiny_tokenizer(vocab_size=64, n_hid=8, group_count=3), str(d / 'tok.pt'))
    rng = np.random.default_rng(0)
    for c, n in (('a', 8), ('b', 7)):
        (d / 'data' / c).mkdir(parents=True)
        for i in range(n):
            Image.fromarray((rng.random((36, 44, 3)) * 255).astype(np.uint8)).save(d / 'data' / c / f'{i}.png')
    (d / 'data' / 'b' / 'z_broken.jpg').write_bytes(b'\xff\xd8\xff\xe0 truncated jpeg')
    return d


def tiny(files, out, *extra, img_size=16):
    """ViT-Tiny at 16 px, patch 4 (4x4 tokens, tokenizer view 16 px), 16 images, batch 4: 4 steps per epoch."""
    return ['--data', files / 'data', '--tokenizer', files / 'tok.pt', '--arch', 'vit_tiny', '--img-size', img_size,
            '--patch-size', 4, '--batch-size', 4, '--epochs', 2, '--warmup-epochs', 1, '--num-workers', 0,
            '--log-every', 1, '--vis-every', 0, '--output-dir', out, *extra]


def model_state(path):
    return torch.load(path, map_location='cpu', weights_only=True)


def read_log(out):
    return [json.loads(line) for line in open(os.path.join(out, 'log.jsonl'))]


# ---------------------------------------------------------------------------------------------------------------

def test_preempted_run_resumes_exactly(files, tmp_path, monkeypatch, capsys):
    """Killed mid-epoch, resumed: bit-identical to an uninterrupted run (bf16 autocast, a loader worker, figures on).
    Also from a truncated checkpoint-last (falls back to -prev). The broken image is skipped and counted."""
    common = ['--num-workers', 1, '--save-every-steps', 1, '--vis-every', 1, '--amp', 'bf16']
    a = ok(run(tiny(files, tmp_path / 'a', *common), tmp_path))
    assert 'no --data' not in a.stdout
    log = read_log(tmp_path / 'a')
    assert [r['step'] for r in log] == list(range(1, 9))
    assert log[-1]['n_bad_images'] == 2 and log[-1]['skipped_steps'] == 0  # the broken file, once per epoch
    assert all(np.isfinite([r['gen_loss'], r['enh_loss'], r['grad_norm']]).all() for r in log)
    assert "skipping unreadable image" in a.stderr and 'z_broken.jpg' in a.stderr
    assert {f'epoch00{e}_fig{k}.png' for e in (1, 2) for k in (2, 3)} <= set(os.listdir(tmp_path / 'a'))
    assert a.stdout.count('epoch 1 done') == 1 and 'epoch 2 done (8/8 steps)' in a.stdout

    with monkeypatch.context() as m:
        preempt_after(m, 6)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # as run()'s subprocesses: CPU kernels sum in a thread-count-dependent order
        try:
            with pytest.raises(Preempted):
                train.main([str(x) for x in tiny(files, tmp_path / 'b', *common)])
        finally:
            torch.set_num_threads(threads)
    assert model_state(tmp_path / 'b' / engine.CHECKPOINT)['step'] == 6
    shutil.copytree(tmp_path / 'b', tmp_path / 'c')
    b = ok(run(tiny(files, tmp_path / 'b', *common), tmp_path))
    assert "resumed from" in b.stdout and 'at step 6' in b.stdout
    last = tmp_path / 'c' / engine.CHECKPOINT
    last.write_bytes(last.read_bytes()[:len(last.read_bytes()) // 2])      # preempted while writing
    c = ok(run(tiny(files, tmp_path / 'c', *common), tmp_path))
    assert 'truncated' in c.stderr and 'at step 5' in c.stdout              # checkpoint-prev: one step earlier

    want = model_state(tmp_path / 'a' / engine.CHECKPOINT)
    for out in ('b', 'c'):
        got = model_state(tmp_path / out / engine.CHECKPOINT)
        assert got['step'] == want['step'] == 8
        for k, v in want['model'].items():
            assert torch.equal(v, got['model'][k]), (out, k)
        for k, v in want['optimizer']['state'].items():
            assert all(torch.equal(x, got['optimizer']['state'][k][n]) for n, x in v.items())
    torch.manual_seed(0)
    init = cim.CIM(tiny_tokenizer(64, 8, 3), 'vit_tiny', 'respix', 16, 4).state_dict()
    assert not torch.equal(init['enhancer.blocks.0.mlp.fc1.weight'], want['model']['enhancer.blocks.0.mlp.fc1.weight'])


def test_resumed_log_equals_the_uninterrupted_one(files, tmp_path, monkeypatch, capsys):
    """Killed after a log record that came after its last checkpoint, then rerun: log.jsonl equals the uninterrupted
    run's record for record (timings aside), with no repeated step, and so does the epoch summary. A checkpoint
    closes the log interval (log every 3, save every 2: records at 2, 3, 4, 6, 8), so no partial sums are lost."""
    def argv(out):
        return [str(x) for x in tiny(files, tmp_path / out, '--log-every', 3, '--save-every-steps', 2, '--amp', 'none')]

    def timeless(out):
        return [{k: v for k, v in r.items() if k != 'imgs_per_s'} for r in read_log(tmp_path / out)]

    def epoch_lines(text):  # 'epoch N done (...): <means>, <img/s>, <min>' without the timings
        return [line.split(' img/s')[0].rsplit(', ', 1)[0] for line in text.splitlines() if ' done (' in line]

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train.main(argv('a'))
        a = capsys.readouterr().out
        with monkeypatch.context() as m:
            preempt_after(m, 1, 'log_jsonl', when=lambda kwargs, record: record.get('step') == 3)
            with pytest.raises(Preempted):
                train.main(argv('b'))
        assert [r['step'] for r in read_log(tmp_path / 'b')] == [2, 3]  # 3: logged after the checkpoint at 2
        capsys.readouterr()
        train.main(argv('b'))
        b = capsys.readouterr().out
    finally:
        torch.set_num_threads(threads)
    assert 'at step 2' in b
    assert [r['step'] for r in timeless('a')] == [2, 3, 4, 6, 8]
    assert timeless('b') == timeless('a')
    assert len(epoch_lines(a)) == 2 and epoch_lines(b) == epoch_lines(a)


def test_a_second_run_in_a_live_runs_folder_is_refused(files, held_dir):
    out, p = held_dir
    with pytest.raises(engine.UserError, match=f'in use by a live run \\(process {p.pid}\\)'):
        train.main([str(x) for x in tiny(files, out)[:-2] + ['--output-dir', out]])
    assert not (out / engine.CHECKPOINT).exists()


def test_two_process_ddp_equals_one_process(files, tmp_path):
    """torchrun, 2 gloo processes x batch 2 == 1 process x batch 4 (same samples per step, same crops and
    masks). Block masks come from the loader and sampling is argmax, so only the generator's loss normalization
    (masked tokens per process vs. per global batch) and float reduction order differ."""
    args = ['--mask-type', 'block', '--sampling', 'argmax', '--amp', 'none', '--epochs', 1, '--warmup-epochs', 0,
            '--lr', 2e-3]
    ok(run(tiny(files, tmp_path / 'one', *args, img_size=32), tmp_path))  # 8x8 tokens: room for blocks
    ddp = ok(run(tiny(files, tmp_path / 'two', *args, '--batch-size', 2, img_size=32), tmp_path,
                 launcher=('-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', 2)))
    assert 'total batch 4 (2 x 2 x 1)' in ddp.stdout and ddp.stdout.count('done:') == 1  # rank 0 alone prints
    one, two = (model_state(tmp_path / d / engine.CHECKPOINT)['model'] for d in ('one', 'two'))
    torch.manual_seed(0)
    init = cim.CIM(tiny_tokenizer(64, 8, 3), 'vit_tiny', 'respix', 32, 4, mask_type='block').state_dict()
    diff = sum((one[k] - two[k]).float().norm() ** 2 for k in one) ** 0.5
    moved = sum((one[k] - init[k]).float().norm() ** 2 for k in one) ** 0.5
    assert moved > 1.0 and diff < 0.01 * moved, (diff, moved)
    log1, log2 = read_log(tmp_path / 'one'), read_log(tmp_path / 'two')
    assert [r['n_bad_images'] for r in log1] == [r['n_bad_images'] for r in log2]  # summed over both ranks
    for r1, r2 in zip(log1, log2):
        assert r1['enh_loss'] == pytest.approx(r2['enh_loss'], rel=1e-3)  # averaged over both ranks
        assert r1['replaced_frac'] == pytest.approx(r2['replaced_frac'], abs=0.02)


def test_export_loads_into_torchvision_resnet50_and_timm_vit(files, tmp_path):
    """resnet50 (REVDET, fp16 autocast + loss scaling, channels_last): one step, export, torchvision loads it with
    only fc.* missing. ViT-S/16 at 224: export matches timm's vit_small_patch16_224 names/shapes minus head.*."""
    r = ok(run(tiny(files, tmp_path / 'r50', '--arch', 'resnet50', '--task', 'revdet', '--amp', 'fp16',
                    '--batch-size', 2, '--max-steps', 1, img_size=32), tmp_path))
    ckpt = model_state(tmp_path / 'r50' / engine.CHECKPOINT)
    assert ckpt['step'] == 1 and ckpt['scaler']['scale'] in (2.0 ** 16, 2.0 ** 15)
    assert 'det_acc' in r.stdout and 'majority' in r.stdout and 'label entropy' in r.stdout
    assert {'det_acc', 'majority_acc', 'label_entropy'} <= set(read_log(tmp_path / 'r50')[-1])
    ok(run(['--export', tmp_path / 'r50' / engine.CHECKPOINT, '--to', tmp_path / 'r50.pth'], tmp_path))
    sd = torch.load(tmp_path / 'r50.pth', weights_only=True)
    net = torchvision.models.resnet50()
    missing, unexpected = net.load_state_dict(sd, strict=False)
    assert sorted(missing) == ['fc.bias', 'fc.weight'] and not unexpected
    assert torch.equal(net.layer4[2].conv3.weight, ckpt['model']['enhancer.layer4.2.conv3.weight'])

    torch.manual_seed(0)
    model = cim.CIM(tiny_tokenizer(64, 8, 3), 'vit_small', 'respix', 224, 16)
    args = dict(vars(train.get_args_parser().parse_args([])), arch='vit_small', img_size=224, patch_size=16)
    state = {k: v for k, v in model.state_dict().items() if not k.startswith('tokenizer.')}
    engine.atomic_save(dict(model=state, args=args, step=300), str(tmp_path / engine.CHECKPOINT))
    train.export(str(tmp_path / engine.CHECKPOINT), str(tmp_path / 'vits.pth'))
    sd = torch.load(tmp_path / 'vits.pth', weights_only=True)
    with open(os.path.join(FIXTURES, 'timm_vit_small_patch16_224.txt')) as f:  # timm.create_model(...).state_dict()
        timm_shapes = {line.split(' ', 1)[0]: eval(line.split(' ', 1)[1]) for line in f if line.strip()}
    assert {k: list(v.shape) for k, v in sd.items()} == {k: v for k, v in timm_shapes.items()
                                                          if not k.startswith('head.')}
    assert torch.equal(sd['blocks.11.attn.qkv.weight'], model.enhancer.blocks[11].attn.qkv.weight)


def test_demo_smoke(tmp_path):
    """`python train.py` with no --data at minimum size (the tokenizer trained for 5 steps by the demo's own
    function first): pre-training, checkpoint, log, PNGs, kNN against random init."""
    out = tmp_path / 'demo'
    train.demo_tokenizer(str(out / 'tokenizer.pt'), 5, 0, torch.device('cpu'))
    assert dvae.load_tokenizer(str(out / 'tokenizer.pt')).downsample == 4
    r = ok(run(['--subset', 64, '--epochs', 1, '--batch-size', 16, '--output-dir', out], tmp_path))
    assert 'no --data: running the built-in demo on Fashion-MNIST' in r.stdout
    assert '--arch vit_tiny' in r.stdout and '--patch-size 4' in r.stdout  # the demo-scale values taken
    assert '--subset' not in r.stdout.splitlines()[0] and '64 images' in r.stdout  # explicit flags win
    assert 'kNN top-1' in r.stdout and 'pre-trained vs random init' in r.stdout
    assert 'training the demo tokenizer' not in r.stdout                   # reused
    files = set(os.listdir(out))
    assert {'tokenizer.pt', engine.CHECKPOINT, 'log.jsonl', 'epoch001_fig2.png', 'epoch001_fig3.png'} <= files


def test_the_one_override_rule_and_help_prints_the_recipes():
    """An unset flag takes the recipe's value; an explicit one always wins, also when it equals the paper's
    default (the old rule replaced an explicit --epochs 300 in the demo)."""
    args = train.get_args_parser().parse_args(['--epochs', '300', '--arch', 'vit_small'])
    taken = engine.apply_recipe(args, train.DEMO)
    assert args.epochs == 300 and args.arch == 'vit_small' and 'epochs' not in taken
    assert args.batch_size == 64 and args.img_size == 32 and taken['subset'] == 3200
    args = train.get_args_parser().parse_args(['--data', 'x'])
    engine.apply_recipe(args, train.PAPER)
    assert (args.arch, args.img_size, args.epochs, args.batch_size, args.subset) == ('vit_base', 224, 300, 256, None)
    text = ' '.join(train.get_args_parser().format_help().split())
    assert 'pre-training epochs (Table 9: 300; demo: 4)' in text and '(Table 9: 0.0015; demo: 0.032)' in text
    assert 'across the classes; default: all (demo: 3200)' in text
    assert '--demo-images' not in text and '--stop-after-steps' not in text   # no test-only knobs


def test_bounded_run_subset_and_max_steps(files, tmp_path):
    """--subset 8 of the 16 images (batch 4: 2 steps per epoch) and --max-steps 5: five optimizer steps over three
    epochs, the warmup keeping its share (1 of 2 epochs = half of the 5 steps, rounded). REVDET's log lines put
    the detection accuracy and BCE next to what guessing gives."""
    r = ok(run(tiny(files, tmp_path / 'b', '--subset', 8, '--max-steps', 5, '--lr', 1e-3, '--task', 'revdet'),
               tmp_path))
    assert '8 images, 2 steps/epoch, 5 steps' in r.stdout
    log = read_log(tmp_path / 'b')
    assert [x['step'] for x in log] == [1, 2, 3, 4, 5] and log[-1]['epoch'] == 2.5
    assert max(x['lr'] for x in log) == log[1]['lr']                        # warmup: 2 of 5 steps, then decay
    assert model_state(tmp_path / 'b' / engine.CHECKPOINT)['step'] == 5
    for rec in log:
        p = rec['replaced_frac']
        assert rec['majority_acc'] == pytest.approx(max(p, 1 - p), abs=0.02)   # means over micro-steps
        assert rec['label_entropy'] == pytest.approx(-(p * np.log(p) + (1 - p) * np.log(1 - p)), abs=0.02)
    assert 'det_acc' in r.stdout and 'vs majority' in r.stdout and 'vs label entropy' in r.stdout


def test_figure_rows_are_spread_over_the_classes():
    assert train.spread_over_classes([0, 0, 0, 1, 1, 2], 4) == [0, 3, 5, 1]
    assert train.spread_over_classes([0] * 10, 3) == [0, 1, 2]             # a flat folder: the first images


def test_non_finite_losses_stop_the_run(files, tmp_path):
    r = run(tiny(files, tmp_path / 'nan', '--lr', 1e30, '--max-bad-steps', 2, '--epochs', 3), tmp_path)
    assert r.returncode == 1 and 'Traceback' not in r.stderr, r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith('error: 2 consecutive steps had a non-finite loss')
    assert read_log(tmp_path / 'nan')[-1]['skipped_steps'] >= 2
    assert not os.path.exists(tmp_path / 'nan' / engine.CHECKPOINT)    # nothing non-finite was saved


# ---------------------------------------------------------------------------------------------------------------
# bad input: one line 'error: ...', exit status 2, no traceback. All cases run in parallel.

def _bad_input_cases(files, tmp):
    (tmp / 'empty').mkdir()
    (tmp / 'mixed' / 'cls').mkdir(parents=True)
    Image.new('RGB', (8, 8)).save(tmp / 'mixed' / 'loose.png')
    (tmp / 'garbage.pt').write_text('not a tokenizer')
    (tmp / 'dalle').mkdir()
    for name, arch, vocab in (('other_arch', 'resnet50', 64), ('other_tok', 'vit_tiny', 32)):
        (tmp / name).mkdir()
        args = vars(train.get_args_parser().parse_args([str(x) for x in tiny(files, tmp / name)]))
        engine.atomic_save(dict(model={}, args={**args, 'arch': arch, 'world_size': 1}, optimizer={}, scaler={},
                                rng=[], log={}, tokenizer=dict(vocab_size=vocab, downsample=4), step=0),
                           str(tmp / name / engine.CHECKPOINT))

    def t(*extra):
        return tiny(files, tmp / 'out', *extra)
    return {
        'unknown arch': (t('--arch', 'vit_huge'), "argument --arch: invalid choice: 'vit_huge'"),
        'unknown task': (t('--task', 'inpaint'), "argument --task: invalid choice"),
        'missing tokenizer': (t('--tokenizer', tmp / 'nope'), "tokenizer"),
        'tokenizer not a checkpoint': (t('--tokenizer', tmp / 'garbage.pt'), "garbage.pt"),
        'DALL-E folder without pkl files': (t('--tokenizer', tmp / 'dalle'), "encoder.pkl"),
        'empty data folder': (t('--data', tmp / 'empty'), "no images"),
        'mixed data layout': (t('--data', tmp / 'mixed'), "mixes image files and class folders"),
        'img size vs patch size': (t('--img-size', 30), "not divisible by --patch-size"),
        'resnet50 grid vs patch size': (t('--arch', 'resnet50', '--img-size', 96, '--patch-size', 12),
                                        "--patch-size dividing 32"),
        'subset 0': (t('--subset', 0), 'argument --subset: must be >= 1, got 0'),
        'max steps 0': (t('--max-steps', 0), 'argument --max-steps: must be >= 1, got 0'),
        'mask ratio': (t('--mask-ratio', 0.9, 1.0), '--mask-ratio: mask ratio'),
        'no tokenizer with data': (t()[:2] + t()[4:], '--tokenizer is required with --data'),
        'batch larger than the data': (t('--batch-size', 32), "no optimizer step"),
        'generator width with sharing': (t('--gen-width', 96), "--no-share"),
        'resume another arch': (tiny(files, tmp / 'other_arch'), "--arch resnet50 (now vit_tiny)"),
        'resume another tokenizer': (tiny(files, tmp / 'other_tok'), "tokenizer {'vocab_size': 32"),
        'export without --to': (['--export', tmp / 'other_arch' / engine.CHECKPOINT], "--to"),
    }


@pytest.fixture(scope='module')
def bad_input_results(files, tmp_path_factory):
    """Runs all cases, two at a time (2 cores); each process mostly imports torch."""
    tmp = tmp_path_factory.mktemp('bad')
    cases = _bad_input_cases(files, tmp)
    env = {**os.environ, 'PYTHONPATH': ROOT, 'OMP_NUM_THREADS': '1'}
    results, names = {}, list(cases)
    for i in range(0, len(names), 2):
        procs = {name: subprocess.Popen([sys.executable, TRAIN, *map(str, cases[name][0])], cwd=tmp, env=env,
                                        text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                 for name in names[i:i + 2]}
        for name, p in procs.items():
            out, err = p.communicate(timeout=300)
            results[name] = (p.returncode, out, err, cases[name][1])
    return results


BAD_INPUTS = ['unknown arch', 'unknown task', 'missing tokenizer', 'tokenizer not a checkpoint',
              'DALL-E folder without pkl files', 'empty data folder', 'mixed data layout', 'img size vs patch size',
              'resnet50 grid vs patch size', 'batch larger than the data', 'generator width with sharing',
              'resume another arch', 'resume another tokenizer', 'export without --to', 'subset 0', 'max steps 0',
              'mask ratio', 'no tokenizer with data']


@pytest.mark.parametrize('case', BAD_INPUTS)
def test_bad_input_is_one_clear_line(bad_input_results, case):
    code, stdout, stderr, expected = bad_input_results[case]
    assert code == 2, (code, stderr[-3000:])
    assert 'Traceback' not in stderr and len(stderr.strip().splitlines()) == 1, stderr
    assert stderr.startswith('error: ') and expected in stderr, stderr


def test_a_junk_tokenizer_is_one_short_line_and_nothing_is_written(files, tmp_path):
    """A file that is not a tokenizer: under 200 characters beside its path, no unsafe weights_only advice, and
    no output folder left behind (inputs are checked before anything is written)."""
    (tmp_path / 'junk.pth').write_bytes(b'PK\x03\x04 not really a zip')
    r = run(tiny(files, tmp_path / 'out', '--tokenizer', tmp_path / 'junk.pth'), tmp_path)
    err = r.stderr.strip()
    assert r.returncode == 2 and len(err.splitlines()) == 1 and err.startswith('error: '), err
    assert len(err) - len(str(tmp_path / 'junk.pth')) < 200 and 'weights_only' not in err
    r = run(tiny(files, tmp_path / 'out', '--tokenizer', tmp_path / 'missing.pt'), tmp_path)
    assert r.returncode == 2 and not os.path.exists(tmp_path / 'out')
