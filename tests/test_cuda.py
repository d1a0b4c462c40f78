"""The CUDA code paths, checked on a CPU with fake CUDA tensors (torch's FakeTensorMode): shapes, dtypes and devices
as on a GPU, no arithmetic. A read of a CUDA tensor's value on the host (.item(), .tolist(), bool(), a copy to the
CPU, nonzero, boolean indexing) is an error that names our line, so a host sync in a training step fails here.
Also the defects a CPU cannot show: precision flags, SyncBatchNorm and stochastic depth, torch.compile's graphs."""
import argparse
import collections
import contextlib
import copy
import os
import traceback
import warnings
from unittest import mock

import pytest
import torch
import torch.nn as nn
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

import bench
import cim
import dvae
import engine
import finetune
import segment
import train
from conftest import tiny_tokenizer

CUDA = torch.device('cuda', 0)
aten = torch.ops.aten
PROJECT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class HostSync(AssertionError):
    pass


def our_line():
    """file:line of the innermost frame in the project's own scripts (not tests, not torch)."""
    for f in reversed(traceback.extract_stack()):
        if f.filename.startswith(PROJECT) and os.sep + 'tests' + os.sep not in f.filename:
            return f'{os.path.basename(f.filename)}:{f.lineno} {f.line}'
    return '?'


class CudaStep(TorchDispatchMode):
    """Entered inside FakeTensorMode, it sees every op first. A host read of a CUDA tensor raises HostSync; a CPU
    scalar read (torchvision's MixUp / CutMix draws, free on a GPU too) gets a stand-in value. It counts ops and
    records what the multi-tensor multiply of the clip gets (CUDA's fast path needs the scalar's dtype to match)."""

    def __init__(self):
        super().__init__()
        self.counts = collections.Counter()
        self.foreach_mul = []  # (gradients' dtype, scalar's dtype)
        self.embedding_dtypes = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.counts[func.overloadpacket] += 1
        if func is aten._local_scalar_dense.default:
            if args[0].device.type == 'cuda':
                raise HostSync(f'host read of a CUDA tensor at {our_line()}')
            return False if args[0].dtype == torch.bool else 0.5 if args[0].is_floating_point() else 0
        to_cpu = func is aten._to_copy.default and str(kwargs.get('device', '')) == 'cpu'
        if (to_cpu and args[0].device.type == 'cuda') or (func is aten.copy_.default and args[0].device.type == 'cpu'
                                                          and args[1].device.type == 'cuda'):
            raise HostSync(f'CUDA -> CPU copy at {our_line()}')
        if func.overloadpacket in (aten.nonzero, aten.masked_select) and args[0].device.type == 'cuda':
            raise HostSync(f'{func} (its output size is data-dependent) at {our_line()}')
        if func.overloadpacket is aten._foreach_mul_ and isinstance(args[1], torch.Tensor):
            self.foreach_mul.append((args[0][0].dtype, args[1].dtype))
        out = func(*args, **kwargs)
        if func.overloadpacket is aten.embedding:
            self.embedding_dtypes.add(out.dtype)
        return out


def fake_cuda():
    """FakeTensorMode as CUDA: autocast enabled although this machine has no GPU (torch would disable it), and the
    multi-tensor (foreach) paths that torch takes for real CUDA tensors taken for fake ones too. Real CPU tensors
    (a mixer's Beta distribution) become fake where they are used. -> (the context to enter, the mode)."""
    stack = contextlib.ExitStack()
    stack.enter_context(mock.patch('torch.cuda.amp.common.amp_definitely_not_available', return_value=False))
    stack.enter_context(mock.patch('torch.cuda.is_bf16_supported', return_value=True))
    stack.enter_context(mock.patch('torch.utils._foreach_utils._foreach_supported_types',
                                   [torch.Tensor, nn.Parameter, FakeTensor]))
    mode = stack.enter_context(FakeTensorMode(allow_non_fake_inputs=True))
    return stack, mode


@pytest.fixture(scope='module', autouse=True)
def fused_sgd_on_fake_tensors():
    """torch has no fake kernel for fused SGD (AdamW's exists): an in-place op that returns nothing, so a no-op
    stands in for it on meta tensors, here only."""
    lib = torch.library.Library('aten', 'IMPL')
    for name in ('_fused_sgd_', '_fused_sgd_.tensor_lr'):
        lib.impl(name, lambda *args, **kwargs: None, 'Meta')
    yield
    lib._destroy()


def to_fake_cuda(module, mode):
    """module's parameters and buffers (built for real on the CPU) as fake CUDA tensors, in place. -> module."""
    for m in module.modules():
        for name, p in m._parameters.items():
            if p is not None:
                m._parameters[name] = nn.Parameter(mode.from_tensor(p).detach().to(CUDA), p.requires_grad)
        for name, b in m._buffers.items():
            if b is not None:
                m._buffers[name] = mode.from_tensor(b).to(CUDA)
    return module


def fake_backward(params):
    """Fake mode cannot run autograd on CUDA tensors (the engine asks the driver for the device), so backward stands
    in: zero gradients of each parameter's shape, dtype and device, all that the rest of the step reads."""
    def backward(self, *args, **kwargs):
        for p in params:
            p.grad = torch.zeros_like(p) if p.grad is None else p.grad
    return mock.patch.object(torch.Tensor, 'backward', backward)


def output_dtypes(roots, kinds):
    """Forward hooks on the roots' submodules of the given kinds -> {(root index, qualified name): output dtype},
    filled as they run."""
    seen = {}
    for r, root in enumerate(roots):
        for name, m in root.named_modules():
            if isinstance(m, kinds):
                m.register_forward_hook(lambda mod, i, out, key=(r, name): seen.__setitem__(key, out.dtype))
    return seen


@pytest.fixture(scope='module')
def dalle():
    """A full-size DALL-E dVAE with random weights, built once (real, on the CPU)."""
    torch.manual_seed(0)
    return dvae.Tokenizer()


def check_step_outputs(step, norm, metrics, n_steps=2):
    assert norm.dtype == torch.float64 and norm.device == CUDA  # engine.grad_norm: fp64, on the device
    assert metrics.dtype == torch.float32 and metrics.device == CUDA
    # engine.grad_norm: one multi-tensor norm kernel and one over its results, not one per parameter
    assert step.counts[aten._foreach_norm] == n_steps and step.counts[aten.linalg_vector_norm] == n_steps
    assert all(g == s for g, s in step.foreach_mul), step.foreach_mul  # the clip's scalar in the gradients' dtype


# ---------------------------------------------------------------------------------------------------------------
# One whole training step of each script on fake CUDA tensors

@pytest.mark.parametrize('arch, task, dtype', [('vit_base', 'respix', torch.bfloat16),
                                               ('resnet50', 'revdet', torch.float16)])
def test_train_step_on_cuda_has_no_host_sync_and_dalles_precision(arch, task, dtype, dalle):
    """train.train_step at full size (224 px, DALL-E dVAE): forward, (stand-in) backward, unscale, norm, clip, fused
    AdamW step, scaler update, with no host read; the tokenizer at DALL-E's precision (fp16 body, fp32 logits conv
    in true fp32, fp32 token lookup), generator and enhancer in the autocast dtype, losses in fp32."""
    model = cim.CIM(copy.deepcopy(dalle), arch, task)
    stack, mode = fake_cuda()
    with stack:
        to_fake_cuda(model, mode)
        tok_seen = output_dtypes([model.tokenizer], dvae.Conv2d)
        layers = output_dtypes([model.generator, model.enhancer, model.head], (nn.Linear, nn.Conv2d))
        tf32 = []
        model.tokenizer.encoder.blocks.output.conv.register_forward_pre_hook(
            lambda m, i: tf32.append(torch.backends.cudnn.allow_tf32))
        outs = []
        model.register_forward_hook(lambda m, i, out: outs.append(out))
        imgs = torch.randn(2, 3, 224, 224, device=CUDA)
        tok_imgs = torch.rand(2, 3, 112, 112, device=CUDA)
        params = [p for p in model.parameters() if p.requires_grad]
        groups = engine.param_groups(model, 0.05, cim.NO_WEIGHT_DECAY_KEYS)
        optimizer = torch.optim.AdamW(groups, lr=1e-4, betas=(0.9, 0.98), fused=True)  # train.py's
        scaler = torch.amp.GradScaler('cuda', init_scale=2.0 ** 16 if dtype == torch.float16 else 1.0)
        keys = train.LOG_KEYS + (train.REVDET_KEYS if task == 'revdet' else ())
        with fake_backward(params), CudaStep() as step:
            for _ in range(2):  # the second step runs with AdamW's state
                metrics, norm = train.train_step(model, [[imgs, tok_imgs]], optimizer, scaler, params, keys, 3.0,
                                                 dtype)
    check_step_outputs(step, norm, metrics)
    assert step.foreach_mul  # the clip ran
    tok_convs = {name: d for (_, name), d in tok_seen.items()}
    assert tok_convs.pop('encoder.blocks.output.conv') == torch.float32
    all_convs = {n for n, m in model.tokenizer.named_modules() if isinstance(m, dvae.Conv2d)}
    assert set(tok_convs) == all_convs - {'encoder.blocks.output.conv', 'decoder.blocks.input'}  # a lookup instead
    assert set(tok_convs.values()) == {torch.float16} and len(tok_convs) == 73
    assert step.embedding_dtypes == {torch.float32}  # the decoder's token lookup
    assert tf32 == [False, False] and torch.backends.cudnn.allow_tf32  # true fp32 there only, the flag restored
    assert {r for r, _ in layers} == {0, 1, 2} and set(layers.values()) == {dtype}  # every linear and conv
    assert {outs[0][k].dtype for k in ('loss', 'gen_loss', 'enh_loss', 'mim_acc')} == {torch.float32}


def ft_args(arch, **kw):
    a = dict(arch=arch, num_classes=1000, smoothing=0.1, clip_grad=0.0, linear_probe=False, weight_decay=0.05,
             layer_decay=0.8, betas=(0.9, 0.999))
    return argparse.Namespace(**dict(a, **kw))


@pytest.mark.parametrize('mode_, arch, dtype', [('finetune', 'vit_base', torch.bfloat16),
                                                ('finetune', 'resnet50', torch.float16),
                                                ('probe', 'vit_base', torch.bfloat16)])
def test_finetune_step_on_cuda_has_no_host_sync(mode_, arch, dtype):
    """finetune.finetune_step with the script's optimizer (build_optimizer) and Mixup / CutMix, label smoothing,
    clipping: no host read, fp32 loss; the probe's SGD is fused (unfused, GradScaler reads found_inf every step)."""
    probe = mode_ == 'probe'
    args = ft_args(arch, linear_probe=probe, clip_grad=1.0, weight_decay=0.0 if probe else 0.05)
    if probe:
        model = finetune.LinearProbe(cim.build_enhancer(arch), 1000)
    else:
        model = finetune.build_classifier(arch, 1000, 224, 16, 0.1)
    mixer = None if probe else finetune.make_mixer(0.8, 1.0, 1000)  # built once, on the CPU, as in main()
    stack, mode = fake_cuda()
    with stack:
        to_fake_cuda(model, mode)
        imgs = torch.randn(4, 3, 224, 224, device=CUDA)
        labels = torch.randint(1000, (4,), device=CUDA)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = finetune.build_optimizer(model, args, 1e-3)
        scaler = torch.amp.GradScaler('cuda', init_scale=2.0 ** 16 if dtype == torch.float16 else 1.0)
        criterion = finetune.LOSSES['bce' if arch == 'resnet50' else 'ce']
        with fake_backward(params), CudaStep() as step:
            for _ in range(2):
                loss, norm = finetune.finetune_step(model, [(imgs, labels), (imgs, labels)], optimizer, scaler,
                                                    params, criterion, mixer, args, dtype)
    check_step_outputs(step, norm, loss.view(1))
    assert step.foreach_mul


@pytest.mark.parametrize('arch, dtype', [('resnet50', torch.float16), ('vit_base', torch.bfloat16)])
def test_segment_step_on_cuda_has_no_host_sync(arch, dtype):
    """segment.segment_step at 512 px with the script's model and optimizer (FCN + SGD, ViT + AdamW)."""
    args = argparse.Namespace(arch=arch, num_classes=150, img_size=512, patch_size=16, drop_path=0.1, init='none',
                              lr=0.01, momentum=0.9, weight_decay=5e-4, layer_decay=0.8, betas=(0.9, 0.999),
                              aux_weight=0.4)
    model = segment.build_model(args)
    stack, mode = fake_cuda()
    with stack:
        to_fake_cuda(model, mode)
        imgs = torch.randn(2, 3, 512, 512, device=CUDA)
        masks = torch.randint(255, (2, 512, 512), device=CUDA, dtype=torch.uint8)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = segment.build_optimizer(model, args)
        scaler = torch.amp.GradScaler('cuda', init_scale=2.0 ** 16 if dtype == torch.float16 else 1.0)
        with fake_backward(params), CudaStep() as step:
            for _ in range(2):
                metrics, norm = segment.segment_step(model, [(imgs, masks)], optimizer, scaler, params, args, dtype)
    check_step_outputs(step, norm, metrics)
    assert len(metrics) == (2 if arch == 'resnet50' else 1)  # with the FCN's auxiliary loss


def test_a_host_read_in_a_step_fails_and_names_its_line():
    """The check itself: an .item() on a CUDA tensor inside the mode is an error naming the line."""
    stack, mode = fake_cuda()
    with stack, CudaStep():
        x = torch.ones(3, device=CUDA)
        with pytest.raises(HostSync, match='CUDA tensor'):
            x.sum().item()
        with pytest.raises(HostSync, match='CPU copy'):
            x.cpu()
        assert torch.zeros(()).item() == 0.5  # CPU reads are free


# ---------------------------------------------------------------------------------------------------------------
# The defects a CPU cannot show

def test_sync_batchnorm_keeps_the_resnets_stochastic_depth():
    """segment.build_model under DDP on GPUs: the stochastic-depth hooks go on the SyncBatchNorm modules (the
    conversion makes new modules, and used to drop the 15 hooks added before it)."""
    args = argparse.Namespace(arch='resnet50', num_classes=5, img_size=64, patch_size=16, drop_path=0.1, init='none')
    model = segment.build_model(args, sync_bn=True)
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert bns and all(isinstance(m, nn.SyncBatchNorm) for m in bns)
    assert sum(len(m._forward_hooks) for m in model.backbone.modules()) == 15  # blocks 2-16: p = 0.1 * i / 15
    assert sum(len(m._forward_hooks) for m in segment.build_model(args).backbone.modules()) == 15


def test_whole_image_validation_turns_cudnn_autotuning_off():
    """ADE20K's whole images come in many sizes: segment.validate runs them without cudnn.benchmark, and restores it."""
    seen = []

    class Probe(nn.Module):
        def forward(self, imgs):
            seen.append(torch.backends.cudnn.benchmark)
            return [torch.zeros(imgs.shape[0], 3, *imgs.shape[-2:])]

    args = argparse.Namespace(arch='resnet50', eval_mode='whole', num_classes=3, img_size=32, stride=21)
    loader = [(torch.zeros(1, 3, 20, 30), torch.zeros(1, 20, 30)), (torch.zeros(1, 3, 24, 28), torch.zeros(1, 24, 28))]
    old = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    try:
        segment.validate(Probe(), loader, args, torch.device('cpu'), None)
        assert seen == [False, False] and torch.backends.cudnn.benchmark
    finally:
        torch.backends.cudnn.benchmark = old


def test_tokenizer_encode_runs_the_logits_conv_without_tf32():
    """dvae.Tokenizer.encode: cuDNN's TF32 (default on Ampere and later) is off for DALL-E's fp32 logits conv."""
    tok = tiny_tokenizer(64, 8, 2)
    seen = []
    tok.encoder.blocks.output.conv.register_forward_pre_hook(lambda m, i: seen.append(torch.backends.cudnn.allow_tf32))
    assert torch.backends.cudnn.allow_tf32
    tok.encode(torch.rand(1, 3, 8, 8))
    assert seen == [False] and torch.backends.cudnn.allow_tf32


@pytest.mark.parametrize('arch', ['resnet50', 'vit_tiny'])
def test_compiled_cim_keeps_static_graphs_across_figures(arch, monkeypatch):
    """CIM.compile: training, then the figures' batch of 8 in eval mode, then training again. Each graph is static
    (the training steps never run a dynamic-batch graph made for the figures), training recompiles nothing after
    the figures, and ResNet-50's trunk is one graph, not four stages that share nn.Sequential's code object and
    its recompile limit. Dynamo with a recording backend (no inductor): the graphs, not their code."""
    torch._dynamo.reset()
    graphs = []

    def backend(gm, inputs):
        shapes = [s for x in inputs if isinstance(x, torch.Tensor) for s in x.shape]
        graphs.append(any(isinstance(s, torch.SymInt) for s in shapes + list(inputs)))
        return gm.forward

    tok = tiny_tokenizer(64, 8, 2)
    img, patch = (64, 16) if arch == 'resnet50' else (32, 4)
    torch.manual_seed(0)
    model = cim.CIM(tok, arch, 'revdet', img, patch).compile(backend=backend)
    s = model.grid * tok.downsample

    def train_step():
        model(torch.randn(4, 3, img, img), torch.rand(4, 3, s, s))['loss'].backward()

    with warnings.catch_warnings(), torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
        warnings.simplefilter('ignore')
        train_step()
        n_train = len(graphs)
        model.eval()
        with torch.no_grad():
            vis = model(torch.randn(8, 3, img, img), torch.rand(8, 3, s, s), return_vis=True)['vis']
        model.train()
        n_figures = len(graphs)
        train_step()
        train_step()
    torch._dynamo.reset()
    assert vis['pred'].shape[0] == 8
    assert not any(graphs), 'a graph with dynamic shapes'
    assert len(graphs) == n_figures > n_train  # the figures compiled their own; training went back to its own
    # the tokenizer's encoder and decoder, a block (all alike, the ViT's and the generator's), ResNet-50's trunk
    assert n_train == (4 if arch == 'resnet50' else 3)


# ---------------------------------------------------------------------------------------------------------------
# bench.py measures what train.py runs

def test_bench_keeps_trains_precision_and_makes_block_masks_outside_the_step(tmp_path, monkeypatch, capsys):
    """No TF32 switched on (train.py does not), and --mask-type block draws its masks once, outside the timed
    steps, as train.py's loader workers do (a CPU Python loop inside the step would be timed)."""
    path = str(tmp_path / 'tok.pt')
    dvae.save_tokenizer(tiny_tokenizer(group_count=2), path)
    calls = []
    real = cim.blockwise_mask
    monkeypatch.setattr(cim, 'blockwise_mask', lambda *a, **k: calls.append(1) or real(*a, **k))
    matmul_tf32 = torch.backends.cuda.matmul.allow_tf32
    bench.main(['--arch', 'vit_tiny', '--img-size', '32', '--patch-size', '4', '--tokenizer', path, '--mask-type',
                'block', '--batch-size', '2', '--steps', '2', '--no-loader'])
    assert torch.backends.cuda.matmul.allow_tf32 == matmul_tf32 and torch.backends.cudnn.allow_tf32
    assert len(calls) == 2  # one mask per image of the batch of 2, once
    assert 'CIM:' in capsys.readouterr().out


def test_bench_counts_only_sync_warnings_and_says_where(monkeypatch):
    monkeypatch.setattr(torch.cuda, 'set_sync_debug_mode', lambda mode: None)

    def step():
        warnings.warn('called a synchronizing CUDA operation')
        warnings.warn('some other warning')
    where = bench.host_syncs(step)
    assert len(where) == 1 and where[0].startswith('test_cuda.py:')
