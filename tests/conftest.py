"""Shared test helpers: tiny models built in the test, never downloaded."""
import torch

import dvae


def tiny_tokenizer(vocab_size=512, n_hid=8, group_count=3, seed=0):
    """A randomly initialised small dVAE tokenizer (downsample 2 ** (group_count - 1)), frozen like the real one."""
    torch.manual_seed(seed)
    return dvae.Tokenizer(vocab_size=vocab_size, n_hid=n_hid, n_blk_per_group=1, group_count=group_count)
