"""bench.py on a tiny CIM on the CPU: every number it promises is printed, and the split and FLOPs add up."""
import re

import pytest
import torch

import bench
import dvae
from conftest import tiny_tokenizer


@pytest.fixture(scope='module')
def tok_path(tmp_path_factory):
    path = tmp_path_factory.mktemp('bench') / 'tok.pt'
    dvae.save_tokenizer(tiny_tokenizer(group_count=2), str(path))  # 2x downsampling
    return str(path)


def test_bench_prints_peak_throughput_split_all_positions_and_loader(tok_path, capsys):
    bench.main(['--arch', 'vit_tiny', '--task', 'revdet', '--img-size', '16', '--patch-size', '4', '--tokenizer',
                tok_path, '--batch-size', '2', '--steps', '1', '--loader-images', '4', '--num-workers', '0'])
    out = capsys.readouterr().out
    assert 'amp off' in out  # unset on a CPU: full precision
    assert re.search(r'dense bf16 matmul peak, measured: \d+\.\d+ TFLOP/s', out)
    assert re.search(r"dense float32 matmul peak, measured: \d+\.\d+ TFLOP/s \(this run's reference\)", out)
    enh = next(line for line in out.splitlines() if line.strip().startswith('enhancer only:'))
    full = next(line for line in out.splitlines() if line.strip().startswith('CIM:'))
    for line in (enh, full):
        assert 'ms/step' in line and 'img/s' in line and 'GFLOP/img' in line and '% of peak' in line
    split = next(line for line in out.splitlines() if line.startswith('CIM step time split'))
    shares = [float(x) for x in re.findall(r'(\d+\.\d+)%', split)]
    assert len(shares) == 5 and sum(shares) == pytest.approx(100, abs=0.5)
    for stage in ('tokenizer encode', 'generator fwd+bwd', 'sample + decode', 'enhancer fwd+bwd', 'optimizer'):
        assert stage in split
    ratio = re.search(r'time ratio \d+\.\d+x, FLOP ratio (\d+\.\d+)x', out)
    assert ratio and float(ratio.group(1)) > 1  # CIM adds the tokenizer and the generator to the enhancer's FLOPs
    assert re.search(r'on all 16 positions: .* on the \d+ masked at most: .*costs -?\d+\.\d+% of the CIM step', out)
    assert re.search(r'data loader: \d+\.\d+ img/s per worker process', out)
    assert re.search(r'the loader needs >= \d+ workers per device', out)


def test_count_flops_of_a_matmul_is_2mnk():
    a = torch.randn(8, 16)
    b = torch.randn(16, 4)
    assert bench.count_flops(lambda: a @ b) == 2 * 8 * 16 * 4
