"""dvae.py against OpenAI's dall_e package (the test-only oracle), and the small trainable tokenizer."""
import functools
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import dvae
import engine

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(vocab_size=64, n_hid=16, n_blk_per_group=1, group_count=2, n_init=16)  # downsample 2


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.fixture(scope='module')
def official():
    """Small official modules with random weights (dall_e requires n_hid >= 64, vocab >= 512)."""
    dall_e = pytest.importorskip('dall_e')
    torch.manual_seed(0)
    enc = dall_e.Encoder(n_hid=64, vocab_size=512)
    dec = dall_e.Decoder(n_hid=64, vocab_size=512, n_init=32)
    with torch.no_grad():
        for name, p in list(enc.named_parameters()) + list(dec.named_parameters()):
            if name.endswith('.b'):  # nonzero biases (zero at init), so a misplaced bias shows
                p.normal_(std=0.1)
    return dall_e, enc, dec


@pytest.fixture(scope='module')
def dalle_dirs(official, tmp_path_factory):
    """Official-format files, as OpenAI published them (torch.save of whole modules): zip and legacy format."""
    _, enc, dec = official
    dirs = []
    for fmt, zip_format in (('zip', True), ('legacy', False)):
        d = tmp_path_factory.mktemp(fmt)
        torch.save(enc, d / 'encoder.pkl', _use_new_zipfile_serialization=zip_format)
        torch.save(dec, d / 'decoder.pkl', _use_new_zipfile_serialization=zip_format)
        dirs.append(str(d))
    return dirs


def official_tokens_and_images(official, x):
    dall_e, enc, dec = official
    with torch.no_grad():
        logits = enc(dall_e.map_pixels(x))
        tokens = logits.argmax(1)
        out = dec(F.one_hot(tokens, 512).permute(0, 3, 1, 2).float())
    return logits, tokens, out, dall_e.unmap_pixels(torch.sigmoid(out[:, :3]))


# ---- the architecture is DALL-E's ----------------------------------------------------------------------------

def test_default_config_has_official_names_and_shapes():
    dall_e = pytest.importorskip('dall_e')
    meta = torch.device('meta')
    with meta:
        ours = dvae.Tokenizer()
    for mine, theirs in ((ours.encoder, dall_e.Encoder(device=meta)), (ours.decoder, dall_e.Decoder(device=meta))):
        shapes = {k: v.shape for k, v in theirs.state_dict().items()}
        assert {k: v.shape for k, v in mine.state_dict().items()} == shapes
    assert ours.downsample == 8 and ours.vocab_size == 8192
    assert ours.encoder.state_dict()['blocks.group_1.block_1.res_path.conv_1.w'].shape == (64, 256, 3, 3)


def test_outputs_equal_official(official):
    _, enc, dec = official
    tok = dvae.Tokenizer(vocab_size=512, n_hid=64, n_init=32)
    tok.encoder.load_state_dict(enc.state_dict(), strict=True)
    tok.decoder.load_state_dict(dec.state_dict(), strict=True)
    x = torch.rand(2, 3, 32, 32)
    logits, tokens, out, imgs = official_tokens_and_images(official, x)
    with torch.no_grad():
        assert rel_err(tok.encoder(dvae.map_pixels(x)), logits) < 1e-5
        assert rel_err(tok.decoder(F.one_hot(tokens, 512).permute(0, 3, 1, 2).float()), out) < 1e-5
    assert torch.equal(tok.encode(x), tokens)
    assert rel_err(tok.decode(tokens), imgs) < 1e-5


# ---- safe loading of the published pickles -------------------------------------------------------------------

SUBPROCESS = r'''
import sys, json, torch
sys.modules['dall_e'] = None  # `import dall_e` now raises ImportError
import dvae
x = torch.load(sys.argv[1])
out = {}
for d in json.loads(sys.argv[2]):
    tok = dvae.load_dalle(d)
    tokens = tok.encode(x)
    out[d] = dict(logits=tok.encoder(dvae.map_pixels(x)).detach(), tokens=tokens, imgs=tok.decode(tokens),
                  config=tok.config)
assert not any(m == 'dall_e' or m.startswith('dall_e.') for m, v in sys.modules.items() if v is not None)
torch.save(out, sys.argv[3])
'''


def test_load_dalle_without_dall_e_package(official, dalle_dirs, tmp_path):
    x = torch.rand(2, 3, 32, 32)
    torch.save(x, tmp_path / 'x.pt')
    subprocess.run([sys.executable, '-c', SUBPROCESS, str(tmp_path / 'x.pt'), json.dumps(dalle_dirs),
                    str(tmp_path / 'out.pt')], check=True, cwd=REPO, env={**os.environ, 'PYTHONPATH': REPO})
    out = torch.load(tmp_path / 'out.pt')
    logits, tokens, _, imgs = official_tokens_and_images(official, x)
    for d in dalle_dirs:  # zip and legacy torch.save formats
        assert out[d]['config'] == dict(vocab_size=512, n_hid=64, n_blk_per_group=2, group_count=4, n_init=32)
        assert rel_err(out[d]['logits'], logits) < 1e-5
        assert torch.equal(out[d]['tokens'], tokens)
        assert rel_err(out[d]['imgs'], imgs) < 1e-5


class Payload:
    """Unpickling this creates a directory: the proof of code execution."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return os.mkdir, (self.path,)


@pytest.mark.parametrize('zip_format', [True, False])
def test_malicious_pickle_is_refused_not_run(official, dalle_dirs, tmp_path, zip_format):
    _, enc, dec = official
    marker = str(tmp_path / 'pwned')
    d = tmp_path / 'weights'
    d.mkdir()
    torch.save(dec, d / 'decoder.pkl')
    torch.save(Payload(marker), d / 'encoder.pkl', _use_new_zipfile_serialization=zip_format)
    torch.load(d / 'encoder.pkl', weights_only=False)  # control: a plain torch.load runs the payload
    assert os.path.isdir(marker)
    os.rmdir(marker)
    with pytest.raises(ValueError, match=r"refusing to unpickle global 'posix\.mkdir'"):
        dvae.load_dalle(str(d))
    assert not os.path.exists(marker)
    enc.payload = Payload(marker)  # hidden inside an otherwise genuine Encoder
    try:
        torch.save(enc, d / 'encoder.pkl', _use_new_zipfile_serialization=zip_format)
    finally:
        del enc.payload
    with pytest.raises(ValueError, match='mkdir'):
        dvae.load_tokenizer(str(d))
    assert not os.path.exists(marker)


def test_load_dalle_rejects_other_files(official, dalle_dirs, tmp_path):
    _, enc, dec = official
    d = tmp_path / 'w'
    d.mkdir()
    with pytest.raises(engine.UserError, match='encoder.pkl'):
        dvae.load_dalle(str(d))
    with pytest.raises(engine.UserError, match='does not exist'):
        dvae.load_dalle(str(tmp_path / 'missing'))
    torch.save(dec, d / 'decoder.pkl')
    for obj, match in (({'a': 1}, 'type dict'), (enc.state_dict(), 'type OrderedDict'),
                       (dec, 'dall_e.decoder.Decoder, not a pickled dall_e.encoder.Encoder')):
        torch.save(obj, d / 'encoder.pkl')
        with pytest.raises(ValueError, match=match):
            dvae.load_dalle(str(d))
    block = enc.blocks.group_1.block_1
    block.post_gain = 0.5  # a pickle whose residual scaling our modules would not reproduce
    try:
        torch.save(enc, d / 'encoder.pkl')
    finally:
        block.post_gain = 1 / 64
    with pytest.raises(ValueError, match='post-gains'):
        dvae.load_dalle(str(d))
    (d / 'encoder.pkl').write_text('not a pickle')
    with pytest.raises(ValueError, match='cannot read'):
        dvae.load_dalle(str(d))


# ---- the tokenizer -------------------------------------------------------------------------------------------

def test_map_unmap_round_trip():
    x = torch.rand(2, 3, 8, 8)
    y = dvae.map_pixels(x)
    assert y.min() >= 0.1 and y.max() <= 0.9
    torch.testing.assert_close(dvae.unmap_pixels(y), x)
    assert dvae.unmap_pixels(torch.tensor([[[[0.0, 1.0]]]])).tolist() == [[[[0.0, 1.0]]]]  # clamped


def test_encode_decode_shapes_dtypes_autocast_channels_last():
    torch.manual_seed(0)
    tok = dvae.Tokenizer(**dvae.SMALL_CONFIG)
    x = torch.rand(2, 3, 32, 16)
    tokens = tok.encode(x)
    assert tokens.shape == (2, 8, 4) and tokens.dtype == torch.long
    imgs = tok.decode(tokens)
    assert imgs.shape == (2, 3, 32, 16) and imgs.dtype == torch.float32 and 0 <= imgs.min() and imgs.max() <= 1
    assert not imgs.requires_grad and all(not p.requires_grad for p in tok.parameters())
    assert not tok.train().training  # stays frozen inside a model in train mode
    torch.testing.assert_close(tok.encode(x.contiguous(memory_format=torch.channels_last)), tokens, rtol=0, atol=0)
    with torch.no_grad():  # the encoder itself on a channels_last input
        ref = tok.encoder(dvae.map_pixels(x))
        cl = tok.encoder(dvae.map_pixels(x).contiguous(memory_format=torch.channels_last))
        assert cl.is_contiguous(memory_format=torch.channels_last) and rel_err(cl, ref) < 1e-5
    with torch.autocast('cpu', dtype=torch.bfloat16), torch.no_grad():  # the bare networks follow autocast
        assert tok.encoder(dvae.map_pixels(x)).dtype == torch.bfloat16
        assert tok.decoder(tokens).dtype == torch.bfloat16


def test_cpu_policy_is_float32_whatever_the_autocast():
    assert dvae.body_dtype('cpu') == torch.float32 and dvae.body_dtype(torch.device('cuda', 1)) == torch.float16
    torch.manual_seed(0)
    tok = dvae.Tokenizer(**dvae.SMALL_CONFIG)
    x = torch.rand(2, 3, 16, 16)
    tokens = tok.encode(x)
    imgs = tok.decode(tokens)
    for dtype in (torch.bfloat16, torch.float16):
        with torch.autocast('cpu', dtype=dtype):
            assert torch.equal(tok.encode(x), tokens)
            assert torch.equal(tok.decode(tokens), imgs)
    half_input = x.to(torch.bfloat16)  # low-precision images are computed on in float32
    assert torch.equal(tok.encode(half_input), tok.encode(half_input.float()))


def _record_dtypes(modules):
    """Forward hooks on {name: module} -> {name: (input dtype, output dtype)}, filled as they run."""
    seen = {}
    for name, module in modules.items():
        module.register_forward_hook(functools.partial(_store_dtypes, seen, name))
    return seen


def _store_dtypes(seen, name, module, inputs, output):
    seen[name] = (inputs[0].dtype, output.dtype)


def test_float16_body_keeps_dalles_float32_convs():
    """The CUDA policy, run on the CPU: body in float16, the encoder's logits conv and the decoder's token lookup in
    float32, the decoder's output conv in float16 (only those two convs have use_float16=False in dall_e)."""
    torch.manual_seed(0)
    tok = dvae.Tokenizer(**dvae.SMALL_CONFIG)
    seen = _record_dtypes({'enc_input': tok.encoder.blocks.input, 'enc_logits': tok.encoder.blocks.output.conv,
                           'dec_block': tok.decoder.blocks.group_1.block_1, 'dec_out': tok.decoder.blocks.output.conv})
    x = dvae.map_pixels(blobs(4, size=32))
    with torch.no_grad():
        ref = tok.encoder(x)  # [4, 512, 8, 8] float32
        logits = tok.encoder(x, dtype=torch.float16)
        tokens = ref.argmax(1)
        out = tok.decoder(tokens, dtype=torch.float16)  # [4, 6, 32, 32]
        out_ref = tok.decoder(tokens)
        one_hot = F.one_hot(tokens, tok.vocab_size).permute(0, 3, 1, 2).float()
        out_one_hot = tok.decoder(one_hot, dtype=torch.float16)
    assert seen['enc_input'] == (torch.float16, torch.float16)
    assert seen['enc_logits'] == (torch.float32, torch.float32)
    assert seen['dec_block'][0] == torch.float16 and seen['dec_out'] == (torch.float16, torch.float16)
    assert logits.dtype == torch.float32 and out.dtype == torch.float16
    assert (logits.argmax(1) == tokens).float().mean() > 0.9 and rel_err(logits, ref) < 1e-2
    assert (torch.sigmoid(out[:, :3].float()) - torch.sigmoid(out_ref[:, :3])).abs().max() < 1e-2
    assert rel_err(out_one_hot.float(), out.float()) < 1e-3  # the same float32 input conv, then float16


def test_decode_by_index_equals_decode_by_one_hot():
    torch.manual_seed(0)
    dec = dvae.Decoder(n_init=16, n_hid=16, n_blk_per_group=1, group_count=3, vocab_size=100)
    dec.blocks.input.b.data.normal_()
    tokens = torch.randint(0, 100, (3, 4, 5))
    with torch.no_grad():
        by_index = dec(tokens)
        by_one_hot = dec(F.one_hot(tokens, 100).permute(0, 3, 1, 2).float())
    assert by_index.shape == (3, 6, 16, 20)
    assert rel_err(by_index, by_one_hot) < 1e-5


def test_compiled_tokenizer_equals_eager():
    """Tokenizer.compile covers encode and decode (inductor: C++ kernels built with gcc, ~40 s cold on a CPU)."""
    config = {**TINY, 'group_count': 1}  # the smallest network: compile time grows with the number of kernels
    torch.manual_seed(0)
    tok = dvae.Tokenizer(**config)
    x = torch.rand(2, 3, 4, 4)
    tokens = tok.encode(x)
    imgs = tok.decode(tokens)
    assert tok.compile() is tok
    assert tok.encoder._compiled_call_impl is not None and tok.decoder._compiled_call_impl is not None
    assert torch.equal(tok.encode(x), tokens)
    assert (tok.decode(tokens) - imgs).abs().max() < 1e-5
    assert set(tok.state_dict()) == set(dvae.Tokenizer(**config).state_dict())  # official names kept


def test_bad_inputs_give_value_errors():
    tok = dvae.Tokenizer(**TINY)
    for bad, match in ((torch.rand(2, 1, 8, 8), 'expects images'), (torch.rand(3, 8, 8), 'expects images'),
                       (torch.randint(0, 255, (2, 3, 8, 8), dtype=torch.uint8), 'dtype torch.uint8'),
                       (torch.rand(2, 3, 8, 7), 'not divisible by .* 2'), ('img.png', 'got str')):
        with pytest.raises(ValueError, match=match):
            tok.encode(bad)
    with pytest.raises(ValueError, match='integer tokens'):
        tok.decode(torch.rand(2, 4, 4))


def test_save_load_round_trip(tmp_path):
    torch.manual_seed(0)
    tok = dvae.Tokenizer(**TINY)
    path = str(tmp_path / 'tok.pt')
    dvae.save_tokenizer(tok, path)
    assert set(torch.load(path, weights_only=True)) == {'config', 'state_dict'}
    loaded = dvae.load_tokenizer(path)
    assert loaded.config == tok.config and loaded.downsample == 2
    for k, v in tok.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v)
    x = torch.rand(2, 3, 8, 8)
    assert torch.equal(loaded.encode(x), tok.encode(x))
    with pytest.raises(engine.UserError, match='does not exist'):
        dvae.load_tokenizer(str(tmp_path / 'missing.pt'))
    torch.save({'config': {**TINY, 'vocab_size': 65}, 'state_dict': tok.state_dict()}, tmp_path / 'bad.pt')
    with pytest.raises(ValueError, match='do not fit'):
        dvae.load_tokenizer(str(tmp_path / 'bad.pt'))
    torch.save({'weights': 1}, tmp_path / 'other.pt')
    with pytest.raises(ValueError, match='not a tokenizer'):
        dvae.load_tokenizer(str(tmp_path / 'other.pt'))
    torch.save(Payload(str(tmp_path / 'pwned')), tmp_path / 'evil.pt')
    with pytest.raises(engine.UserError, match='is not a tokenizer') as e:  # refused by engine.torch_load
        dvae.load_tokenizer(str(tmp_path / 'evil.pt'))
    assert not os.path.exists(tmp_path / 'pwned') and 'weights_only' not in str(e.value)


class FixedTokenizer(torch.nn.Module):
    """encode -> given tokens, decode -> images off by a known amount: for a brute-force check of the metrics."""
    vocab_size = 8

    def __init__(self, tokens, offset):
        super().__init__()
        self.p, self.tokens, self.offset = torch.nn.Parameter(torch.zeros(1)), tokens, offset

    def encode(self, x):
        return self.tokens[:len(x)]

    def decode(self, t):
        return torch.full((len(t), 3, 4, 4), 0.5) + self.offset[:len(t), None, None, None]


def test_evaluate_tokenizer_metrics():
    tokens = torch.tensor([0, 0, 0, 1, 1, 2]).view(2, 1, 3)
    offset = torch.tensor([0.1, 0.01])
    stats = dvae.evaluate_tokenizer(FixedTokenizer(tokens, offset), torch.full((2, 3, 4, 4), 0.5))
    assert stats['psnr'] == pytest.approx((20 + 40) / 2, abs=1e-3)  # PSNR = -10 log10(offset^2)
    p = torch.tensor([3, 2, 1]) / 6
    assert stats['perplexity'] == pytest.approx(torch.exp(-(p * p.log()).sum()).item(), rel=1e-6)
    assert stats['usage'] == pytest.approx(3 / 8)


# ---- training a small tokenizer ------------------------------------------------------------------------------

def blobs(n, size=8, seed=0):
    """Smooth random images [n, 3, size, size] in [0, 1] (learnable structure, unlike uniform noise)."""
    g = torch.Generator().manual_seed(seed)
    return F.interpolate(torch.rand(n, 3, 2, 2, generator=g), size=(size, size), mode='bilinear', align_corners=True)


def test_training_lowers_the_loss(tmp_path):
    data = blobs(64)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(data), batch_size=16, shuffle=True)

    def recon_nll(tok):
        torch.manual_seed(1)  # same Gumbel noise
        with torch.no_grad():
            return dvae.dvae_loss(tok, data, tau=1.0, kl_weight=0.0)[1]['nll'].item()

    torch.manual_seed(0)
    before = recon_nll(dvae.Tokenizer(**TINY))
    torch.manual_seed(0)  # the same initial weights inside train_tokenizer
    logs = []
    ckpt = str(tmp_path / 'ckpt.pt')
    tok = dvae.train_tokenizer(loader, TINY, steps=60, lr=1e-2, kl_weight=0.0, log=logs.append, progress=False,
                               ckpt_path=ckpt)
    assert recon_nll(tok) < 0.85 * before  # measured: 1.41 -> 0.96
    assert [m['step'] for m in logs] == [50, 60] and not any(p.requires_grad for p in tok.parameters())
    resumed = dvae.load_tokenizer(ckpt)  # the training checkpoint is a tokenizer file too
    assert torch.equal(resumed.encode(data), tok.encode(data))
    saved = torch.load(ckpt, weights_only=True)
    assert saved['step'] == 60 and saved['steps'] == 60  # the schedule's length, checked on resume


def test_cli_train_eval_and_errors(tmp_path, capsys):
    from torchvision.utils import save_image
    data = tmp_path / 'imgs'
    data.mkdir()
    for i, img in enumerate(blobs(24, size=12)):
        save_image(img, data / f'{i}.png')
    out = tmp_path / 'run'
    dvae.main(['train', '--data', str(data), '--image-size', '8', '--vocab', '64', '--n-hid', '16', '--groups', '2',
               '--n-init', '16', '--steps', '3', '--batch-size', '8', '--workers', '0', '--out-dir', str(out)])
    report = json.load(open(out / 'report.json'))
    assert report['n_images'] == 1 and 0 < report['usage'] <= 1 and report['psnr'] > 0  # 5% of 24 held out
    assert (out / 'reconstructions.png').stat().st_size > 0 and (out / 'log.jsonl').exists()
    assert dvae.load_tokenizer(str(out / 'tokenizer.pt')).config['vocab_size'] == 64
    printed = capsys.readouterr().out  # 5% of 24 images: 1 held out
    assert 'evaluating on 1 of the requested 1000 images: the 5% held out from training of the 24 images in' in printed
    split = tmp_path / 'split'
    for name, n in (('train', 2), ('test', 3)):
        (split / name).mkdir(parents=True)
        for i, img in enumerate(blobs(n, size=12)):
            save_image(img, split / name / f'{i}.png')
    for folder, which in ((data, 'the 5% held out from training of the 24 images in'),
                          (split, f"the folder's test split '{split / 'test'}' (3 images)")):
        dvae.main(['eval', '--tokenizer', str(out / 'tokenizer.pt'), '--data', str(folder), '--image-size', '8',
                   '--eval-images', '3925', '--out', str(tmp_path / 'eval.png')])
        printed = capsys.readouterr().out
        assert f'evaluating on {1 if folder == data else 3} of the requested 3925 images: {which}' in printed
        assert 'PSNR' in printed
    (tmp_path / 'junk.pth').write_bytes(b'\x00\x17junk' * 50)  # neither a zip nor a pickle
    train = ['train', '--data', str(data), '--image-size', '8', '--vocab', '64', '--n-hid', '16', '--groups', '2',
             '--n-init', '16', '--batch-size', '8', '--workers', '0', '--out-dir', str(out), '--resume']
    for argv, match in ((['eval', '--tokenizer', str(tmp_path / 'missing'), '--data', str(data)], 'does not exist'),
                        (['eval', '--tokenizer', str(tmp_path / 'junk.pth'), '--data', str(data)], 'not a tokenizer'),
                        (['train', '--data', str(tmp_path / 'nothing'), '--out-dir', str(out)], 'nothing'),
                        (['train', '--data', str(data), '--image-size', '6', '--out-dir', str(out), '--steps', '1',
                          '--batch-size', '4', '--workers', '0'], 'not divisible'),
                        (train + ['--steps', '5'], 'not 5; resume with --steps 3, or pass a new --out-dir'),
                        (['train', '--data', str(data), '--bogus'], 'unrecognized arguments: --bogus')):
        with pytest.raises(SystemExit) as e:
            engine.run_cli(lambda: dvae.main(argv))  # as `python dvae.py ...` runs it
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith('error: ') and err.count('\n') == 1 and match in err
        assert 'weights_only' not in err and len(err) < 200 + len(str(tmp_path)) + 20
    dvae.main(train + ['--steps', '3'])  # the same --steps: resumes at the end, nothing left to train
    assert 'trained 0.0 min' in capsys.readouterr().out
