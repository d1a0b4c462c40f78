"""Corrupted Image Modeling (Fang et al., ICLR 2023), step by step, in the order the data flows.

One pre-training step (Fig. 1b, Sec. 2), as CIM.forward calls it:

    clean image ─► frozen tokenizer encoder ─► golden tokens g                 tokenize  (Sec. 2.1)
    clean image ─► patch embeddings ─► mask m ─► small BEiT ─► p_BEiT          generate  (Eq. 1)
    p_BEiT ─► sample ─► x_corrupted = replace(g, m, x_sampled) ─► decoder      corrupt   (Eq. 2, Sec. 2.1)
    corrupted image ─► enhancer (ViT or ResNet-50) ─► RESPIX or REVDET head    enhance   (Sec. 2.2)
    loss = generator MIM loss + enhancer weight x enhancer loss                           (Sec. 2.3, Table 9)

The tokenizer is any frozen module with this interface (dvae.py has the DALL-E dVAE and a small trainable one):
    tokenizer.encode(imgs)    imgs: [B, 3, s, s] float in [0, 1] -> tokens [B, s/d, s/d] long (argmax codes)
    tokenizer.decode(tokens)  tokens: [B, h, w] long -> images [B, 3, h*d, w*d] float in [0, 1]
    tokenizer.vocab_size      number of codes (DALL-E: 8192)
    tokenizer.downsample      d, pixels per token side (DALL-E: 8, so 14 x 14 tokens from 112 px)

Usage:
    tok = dvae.load_tokenizer('dalle/')                   # encoder.pkl + decoder.pkl
    model = CIM(tok, arch='vit_base', task='respix')
    out = model(imgs_224_normalized, imgs_112_in_0_1)     # dict: loss, gen_loss, mim_acc, enh_loss, ...
    out['loss'].backward()
The file follows the main path, 1-9: random masking, the ViT parts, the generator, sampling and replacement, decoding,
the enhancers and head, RESPIX, REVDET, then the CIM module. The ablations (10: blockwise masks, Table 4; MAE's patch
normalization, Table 6; softmax's alternatives are in sample_tokens) and the figures (11: Figs. 2-4) come after it.
Training plumbing is in train.py and engine.py; this file imports nothing of ours.
"""
import math
import random

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from PIL import Image, ImageDraw, ImageFont

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
ARCHS = ('vit_tiny', 'vit_small', 'vit_base', 'resnet50')
TASKS = ('respix', 'revdet')
MASK_TYPES = ('random', 'block')                 # Table 4
SAMPLINGS = ('softmax', 'argmax', 'uniform')     # Table 7
TARGET_NORMS = ('sliding', 'patch', 'none')      # Table 6
VIT_CONFIGS = {'vit_tiny': dict(embed_dim=192, depth=12, num_heads=3),   # DeiT-Ti / timm vit_tiny_patch16_224
               'vit_small': dict(embed_dim=384, depth=12, num_heads=6),
               'vit_base': dict(embed_dim=768, depth=12, num_heads=12)}
NO_WEIGHT_DECAY_KEYS = ('bias', 'norm', 'bn', 'downsample.1', 'pos_embed', 'cls_token', 'mask_token')


# ------------------------------------------------------------------------------------------------------------------
# 1. Masking (Eq. 1): k of the n patch positions, k uniform in [k_min, k_max] (paper: 100-120 of 196)

def mask_count_range(num_patches, mask_ratio):
    """(k_min, k_max) for n patches and a ratio range; (100/196, 120/196) gives (100, 120) at n = 196."""
    k_min = round(mask_ratio[0] * num_patches)
    k_max = round(mask_ratio[1] * num_patches)
    if not 0 < k_min <= k_max < num_patches:
        raise ValueError(f"mask ratio {tuple(mask_ratio)} masks {k_min}..{k_max} of {num_patches} patches; "
                         f"need 0 < min <= max < {num_patches}")
    return k_min, k_max


def random_mask(batch_size, num_patches, mask_ratio=(100 / 196, 120 / 196), device=None):
    """Random masking (Eq. 1, Table 4 'Random'): each image masks its own k ~ U{k_min..k_max} positions.

    Returns mask: [B, N] bool, True = masked. Every position is equally likely; no host sync.
    """
    k_min, k_max = mask_count_range(num_patches, mask_ratio)
    # a count per image, not one per batch: the paper's range is over images (Sec. 2.1: 100-120 of 196)
    k = torch.randint(k_min, k_max + 1, (batch_size, 1), device=device)
    # ranks of uniform noise: k of them below k is a uniform k-subset, with no Python loop over images
    rank = torch.rand(batch_size, num_patches, device=device).argsort(dim=1).argsort(dim=1)  # a random permutation
    return rank < k


# ------------------------------------------------------------------------------------------------------------------
# 2. Transformer parts: a vanilla ViT (Dosovitskiy et al.) with timm's parameter names; used by the generator too

class PatchEmbed(nn.Module):
    """Non-overlapping patches -> linear embeddings. imgs: [B, C, H, W] -> [B, N, D]."""

    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=768):
        super().__init__()
        self.grid = img_size // patch_size
        self.num_patches = self.grid ** 2
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):  # x: [B, L, D]
        B, L, D = x.shape
        # one fused q/k/v projection, split by heads: timm's layout, so its checkpoints load as they are
        q, k, v = self.qkv(x).view(B, L, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        # the fused kernel (flash / memory-efficient on a GPU) never materializes the [L, L] attention matrix
        x = F.scaled_dot_product_attention(q, k, v)  # [B, heads, L, D/heads]
        return self.proj(x.transpose(1, 2).reshape(B, L, D))


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm Transformer block. Stochastic depth (drop_path > 0) drops each residual branch for whole samples and
    scales the kept ones by 1 / (1 - p), as timm and DINO; pre-training uses none (Table 9), fine-tuning 0.1."""

    def __init__(self, dim, num_heads, mlp_ratio=4.0, drop_path=0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = torchvision.ops.StochasticDepth(drop_path, 'row') if drop_path > 0 else nn.Identity()

    def forward(self, x):
        # pre-norm residuals (ViT, BEiT): each branch sees a normalized input, the trunk keeps the raw sum
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


def init_vit_weights(module):
    """timm/BEiT practice (the paper is silent): truncated normal std 0.02 for linears, LayerNorm = identity."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class VisionTransformer(nn.Module):
    """Vanilla ViT (1-D absolute position embedding, cls token, no LayerScale, no relative position bias).

    State-dict names and shapes equal timm's VisionTransformer (`vit_small_patch16_224`, ...), so the weights load
    there; so do the attributes CIM reads (patch_embed.proj, blocks, num_prefix_tokens, forward_features).
    num_classes=0 gives `head = Identity` (pre-training); finetune.py sets a classifier. drop_path_rate: stochastic
    depth rising linearly from 0 at the first block to the rate at the last (timm / BEiT).
    """

    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=768, depth=12, num_heads=12,
                 num_classes=0, drop_path_rate=0.0):
        super().__init__()
        self.embed_dim = embed_dim
        self.num_prefix_tokens = 1  # the cls token
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.patch_embed.num_patches, embed_dim))
        rates = torch.linspace(0, drop_path_rate, depth).tolist()
        self.blocks = nn.Sequential(*[Block(embed_dim, num_heads, drop_path=r) for r in rates])
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes else nn.Identity()
        init_vit_weights(self)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)

    def forward_features(self, imgs):
        """imgs: [B, 3, H, W] -> tokens after the final norm: [B, 1 + N, D] (cls first), as timm's."""
        x = self.patch_embed(imgs)
        # a cls token although CIM trains none: timm's layout, and fine-tuning pools the patch tokens instead
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        return self.norm(self.blocks(x))

    def forward(self, imgs):
        """Classification on the average-pooled patch tokens (see finetune.py for why). -> [B, num_classes]."""
        return self.head(self.forward_features(imgs)[:, 1:].mean(dim=1))


# ------------------------------------------------------------------------------------------------------------------
# 3. Generator: a small trainable BEiT (Sec. 2.1) that predicts the golden tokens at masked positions

class Generator(nn.Module):
    """Small BEiT: patch embeddings, [MASK] embedding at masked positions, `depth` blocks, linear head to the
    tokenizer vocabulary (Sec. 2.1). Depth 4 by default (Table 5, 4-7 allowed); width = the ViT enhancer's, or
    384 for ResNet (Table 9). `shared` = (patch_embed, first blocks) taken from the ViT enhancer (Table 5).
    """

    def __init__(self, img_size, patch_size, vocab_size, embed_dim, depth=4, num_heads=None, shared=None):
        super().__init__()
        num_heads = num_heads or embed_dim // 64
        # the generator sees the clean image as patch embeddings, the enhancer only the decoded corrupted one (Sec. 2.1)
        own_patch_embed = PatchEmbed(img_size, patch_size, 3, embed_dim)
        blocks = [Block(embed_dim, num_heads) for _ in range(depth)]
        init_vit_weights(nn.ModuleList(blocks + [own_patch_embed]))
        if shared is not None:  # the very same modules as the enhancer's: updated by both losses
            own_patch_embed, shared_blocks = shared
            blocks[:len(shared_blocks)] = list(shared_blocks)
        self.patch_embed = own_patch_embed
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.patch_embed.num_patches, embed_dim))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.blocks = nn.ModuleList(blocks)
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.head = nn.Linear(embed_dim, vocab_size)
        init_vit_weights(nn.ModuleList([self.norm, self.head]))
        for p in (self.cls_token, self.pos_embed, self.mask_token):
            nn.init.trunc_normal_(p, std=0.02)

    def forward(self, imgs, mask):
        """imgs: [B, 3, H, W] normalized, mask: [B, N] bool -> logits [B, N, vocab] at every position.

        Only the masked positions are trained and sampled; predicting all N keeps the step free of gathers and
        costs 2% of a ViT-B CIM step on the CPU (README, bench.py)."""
        x = self.patch_embed(imgs)                                                 # [B, N, D]
        # one learned [MASK] vector stands in for every masked patch, as in BEiT, so the generator must infer its token
        x = torch.where(mask.unsqueeze(-1), self.mask_token.to(x.dtype), x)      # Eq. 1: replace(x, m, [MASK])
        # positions are added after masking: a [MASK] still knows where it is
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.norm(x[:, 1:]))


def mim_loss(logits, golden, mask):
    """BEiT's MIM objective (Sec. 2.3): cross-entropy of the golden tokens at the masked positions.

    logits: [B, N, V], golden: [B, N] long, mask: [B, N] bool -> (loss, accuracy), 0-dim tensors, both over the
    masked positions only (no host sync: unmasked targets are ignore_index).
    """
    # unmasked positions are given away by the input, so only the masked ones are scored (BEiT)
    target = torch.where(mask, golden, -100)
    # fp32: a softmax over 8192 codes in bf16 loses the small probabilities the loss is made of
    loss = F.cross_entropy(logits.flatten(0, 1).float(), target.flatten(), ignore_index=-100)
    acc = ((logits.argmax(-1) == golden) & mask).sum() / mask.sum().clamp(min=1)
    return loss, acc


# ------------------------------------------------------------------------------------------------------------------
# 4. Sampling (Eq. 2) and replacement

@torch.no_grad()
def sample_tokens(logits, strategy='softmax', temperature=1.0):
    """x_sampled ~ p_BEiT (Eq. 2). logits: [..., V] -> tokens [...] long; no gradient flows through sampling.

    'softmax': draw from softmax(logits / T) (T = 1 in the paper), done as Gumbel-max: argmax(logits/T + Gumbel
    noise) has exactly the softmax distribution (Table 7's 'Gumbel sampling'). 'argmax' and 'uniform' (over the
    codebook) are Table 7's ablations, both reported to diverge.
    """
    if strategy == 'softmax':
        # -log(Exp(1)) is Gumbel(0, 1) noise; fp32 so that bf16 logits do not tie and bias the argmax
        # (one vectorized draw for every position: no multinomial call per token)
        gumbel = -torch.empty_like(logits, dtype=torch.float32).exponential_().log()
        return (logits.float() / temperature + gumbel).argmax(-1)
    if strategy == 'argmax':
        # the generator's single best guess: no diversity, which Table 7 reports as diverging
        return logits.argmax(-1)
    if strategy == 'uniform':
        # ignores the generator: masked positions decode to codes unrelated to the image (Table 7: diverges)
        return torch.randint(logits.shape[-1], logits.shape[:-1], device=logits.device)
    raise ValueError(f"unknown sampling strategy '{strategy}' (choose from {', '.join(SAMPLINGS)})")


def replace_tokens(golden, mask, sampled):
    """x_corrupted = replace(g, m, x_sampled) (Eq. 2), and the REVDET labels.

    golden, sampled: [B, N] long, mask: [B, N] bool -> (corrupted [B, N] long, replaced [B, N] bool).
    A token is 'replaced' only where it differs from the golden one: a sample that equals the golden token
    counts as original (Sec. 2.2, as in ELECTRA).
    """
    # unmasked positions keep their golden tokens: only the masked ones may change (Eq. 2)
    corrupted = torch.where(mask, sampled, golden)
    return corrupted, corrupted != golden


# ------------------------------------------------------------------------------------------------------------------
# 5. Decode: the frozen tokenizer decoder maps corrupted tokens back to an image (Sec. 2.1, 2.3)

@torch.no_grad()
def decode_tokens(tokenizer, tokens, grid, out_size, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """tokens: [B, N] -> corrupted image [B, 3, out_size, out_size], normalized like the clean enhancer view.

    The decoder gives grid * downsample pixels (112 for DALL-E at 14x14 tokens); we upsample bilinearly to the
    enhancer resolution (the paper does not say which; bilinear is BEiT's default resize). Under no_grad: the
    enhancer's gradient never reaches the generator (Sec. 2.3).
    """
    # the decoder turns local token swaps into non-local, plausible changes of the image (Sec. 2.2): the corruption
    # the enhancer must see through
    imgs = tokenizer.decode(tokens.view(-1, grid, grid))               # [B, 3, s, s] in [0, 1]
    if imgs.shape[-1] != out_size:
        imgs = F.interpolate(imgs, size=(out_size, out_size), mode='bilinear', align_corners=False)
    m = torch.as_tensor(mean, device=imgs.device, dtype=imgs.dtype).view(1, 3, 1, 1)  # no copy for device buffers
    s = torch.as_tensor(std, device=imgs.device, dtype=imgs.dtype).view(1, 3, 1, 1)
    return (imgs - m) / s


# ------------------------------------------------------------------------------------------------------------------
# 6. Enhancers (Sec. 2.2): a vanilla ViT or torchvision's ResNet-50, plus a one-layer prediction head

def build_enhancer(arch, img_size=224, patch_size=16, drop_path=0.0):
    """The network being pre-trained, without classifier: cim.VisionTransformer or torchvision resnet50.
    drop_path: stochastic depth of the ViT's blocks (fine-tuning; ResNet-50 gets it from engine.py's hooks)."""
    if arch in VIT_CONFIGS:
        return VisionTransformer(img_size, patch_size, drop_path_rate=drop_path, **VIT_CONFIGS[arch])
    if arch == 'resnet50':
        # 'the torchvision ResNet-50 without further architectural change' (footnote 5)
        net = torchvision.models.resnet50()  # unchanged (footnote 5); the classifier is unused in pre-training
        net.fc = nn.Identity()
        return net.to(memory_format=torch.channels_last)  # faster convolutions; same parameters
    raise ValueError(f"unknown arch '{arch}' (choose from {', '.join(ARCHS)})")


def is_vit(net):
    """A ViT by timm's attribute names (ours, or timm's own VisionTransformer); else a torchvision ResNet."""
    return hasattr(net, 'patch_embed') and hasattr(net, 'blocks')


def enhancer_feature_map(enhancer, imgs):
    """Final feature map of an enhancer. imgs: [B, 3, H, W] -> [B, D, h, w]
    (ViT: patch tokens after the final norm, h = H / patch; ResNet-50: layer4, h = H / 32)."""
    if is_vit(enhancer):
        x = enhancer.forward_features(imgs)[:, enhancer.num_prefix_tokens:]      # [B, h*w, D]
        ph, pw = enhancer.patch_embed.proj.stride
        return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], imgs.shape[-2] // ph, imgs.shape[-1] // pw)
    r = enhancer
    # torchvision's forward up to layer4, without its avgpool and fc: the head needs the spatial map
    x = r.maxpool(r.relu(r.bn1(r.conv1(imgs.contiguous(memory_format=torch.channels_last)))))
    return r.layer4(r.layer3(r.layer2(r.layer1(x))))


def pooled_features(enhancer, imgs):
    """Global features for kNN / linear probing. imgs: [B, 3, H, W] -> [B, D] (mean over the feature map)."""
    return enhancer_feature_map(enhancer, imgs).float().mean(dim=(2, 3))


class PixelShuffleHead(nn.Module):
    """'The prediction head is a simple linear layer' (Sec. 2.2): one nn.Linear applied at every location of the
    feature map, its out_chans * r * r outputs rearranged (pixel shuffle) onto an r-times finer grid.

    ViT: r = patch size (RESPIX, 3 channels) or 1 (REVDET). ResNet-50: r = 32 (RESPIX, onto pixels) or
    32 / patch (REVDET, onto the token grid). feats: [B, D, h, w] -> [B, out_chans, r*h, r*w].
    """

    def __init__(self, dim, out_chans, upscale, init_scale=1.0):
        super().__init__()
        self.upscale = upscale
        self.proj = nn.Linear(dim, out_chans * upscale ** 2)
        nn.init.trunc_normal_(self.proj.weight, std=0.02 * init_scale)
        nn.init.zeros_(self.proj.bias)

    def forward(self, feats):
        # a linear layer per location is a 1x1 convolution; pixel shuffle then places each location's r x r outputs
        # on its own r x r block, so the head stays 'a simple linear layer' (Sec. 2.2)
        x = self.proj(feats.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)  # per-location linear
        return F.pixel_shuffle(x, self.upscale)


# ------------------------------------------------------------------------------------------------------------------
# 7. RESPIX (Sec. 2.2): regress all pixels of the clean image, normalized in 8x8 sliding windows (Fig. 4, Table 6)

def sliding_window_stats(imgs, window=8, eps=1e-6):
    """Mean and std of the window x window pixels (all channels) 'centered' on each pixel.

    imgs: [B, C, H, W] -> (mean, std), each [B, 1, H, W]. For the even window 8, pixel i uses rows/cols
    i-4 .. i+3. Border rule: windows are cut at the image border and use only the pixels inside
    (count_include_pad=False). Channels are pooled and std is unbiased, like MAE's per-patch normalization.
    """
    x = imgs.float()
    H, W = x.shape[-2:]
    # stride 1: a window around every pixel (Sec. 2.2), where MAE's patches share one mean/std per patch
    pool = dict(kernel_size=window, stride=1, padding=window // 2)
    mean = F.avg_pool2d(x.mean(1, keepdim=True), count_include_pad=False, **pool)[..., :H, :W]
    sq_mean = F.avg_pool2d((x ** 2).mean(1, keepdim=True), count_include_pad=False, **pool)[..., :H, :W]
    inside = F.avg_pool2d(torch.ones_like(x[:1, :1]), count_include_pad=True, **pool)[..., :H, :W]
    # E[x^2] - E[x]^2 from two pools (no unfold of H*W windows), rescaled to the unbiased std of the n values
    n = inside * window ** 2 * x.shape[1]  # pixel values in each (cut) window
    return mean, ((sq_mean - mean ** 2).clamp(min=0) * n / (n - 1) + eps).sqrt()


def window_stats(imgs, norm='sliding', patch_size=16):
    """The (mean, std) that the RESPIX target divides out (Table 6): 'sliding' 8x8, 'patch' (MAE) or 'none'."""
    if norm == 'sliding':
        return sliding_window_stats(imgs, 8)
    if norm == 'patch':
        return patch_stats(imgs, patch_size)
    if norm == 'none':
        return torch.zeros_like(imgs[:, :1], dtype=torch.float32), torch.ones_like(imgs[:, :1], dtype=torch.float32)
    raise ValueError(f"unknown RESPIX target normalization '{norm}' (choose sliding, patch or none)")


def respix_target(imgs, norm='sliding', patch_size=16):
    """The RESPIX regression target: the clean, mean/std-normalized enhancer view [B, 3, H, W], each pixel
    normalized by its window's statistics (Sec. 2.2: 8x8 sliding window)."""
    mean, std = window_stats(imgs, norm, patch_size)
    # the clean image's own statistics are the 'template' of Fig. 4: the enhancer learns only the residual
    return (imgs.float() - mean) / std


def respix_loss(pred, target):
    """l1 + l2 pixel regression loss (Sec. 2.3), each a mean over all pixels. pred, target: [B, 3, H, W]."""
    pred = pred.float()
    # l1 and l2 with equal weights: the paper gives none, so both count once
    return F.l1_loss(pred, target) + F.mse_loss(pred, target)


# ------------------------------------------------------------------------------------------------------------------
# 8. REVDET (Sec. 2.2): detect, for every token, whether the generator replaced it

def revdet_loss(logits, replaced):
    """Per-token binary cross-entropy. logits: [B, N], replaced: [B, N] bool -> 0-dim loss."""
    # every token is scored, replaced or not, as in ELECTRA's discriminator (Sec. 2.2); fp32 for the log-sigmoid
    return F.binary_cross_entropy_with_logits(logits.float(), replaced.float())


def revdet_metrics(logits, replaced):
    """Detection accuracy next to what guessing gives, so that learning can be told from guessing: majority_acc
    (always answer the more frequent label) and label_entropy (nats: the BCE of the best constant answer).
    logits: [B, N], replaced: [B, N] bool -> dict of 0-dim tensors."""
    # p: the batch's share of replaced tokens (~55% with softmax sampling): the base rate to beat
    p = replaced.float().mean()
    return dict(det_acc=((logits.float() > 0) == replaced).float().mean(),
                majority_acc=torch.maximum(p, 1 - p),
                label_entropy=torch.special.entr(p) + torch.special.entr(1 - p))


# ------------------------------------------------------------------------------------------------------------------
# 9. One step: generator and enhancer trained simultaneously (Sec. 2.3)

class CIM(nn.Module):
    """Generator + enhancer around a frozen tokenizer. forward(enhancer view, tokenizer view) -> losses, metrics.

    arch: vit_tiny | vit_small | vit_base | resnet50, or a network: a ViT with timm's attribute names or a
    torchvision ResNet-50 with fc removed. task: respix | revdet. Defaults are Table 9's.
    """

    def __init__(self, tokenizer, arch='vit_base', task='respix', img_size=224, patch_size=16, gen_depth=4,
                 gen_width=None, mask_ratio=(100 / 196, 120 / 196), mask_type='random', sampling='softmax',
                 temperature=1.0, target_norm='sliding', share_layers=True, enhancer_weight=None,
                 mean=IMAGENET_MEAN, std=IMAGENET_STD):
        super().__init__()
        # a caller's mistakes (train.py turns the user's into one-line errors first)
        assert task in TASKS and mask_type in MASK_TYPES, (task, mask_type)
        assert sampling in SAMPLINGS and target_norm in TARGET_NORMS, (sampling, target_norm)
        assert img_size % patch_size == 0, f'image size {img_size} is not a multiple of the patch size {patch_size}'
        self.task = task
        self.img_size = img_size
        self.patch_size = patch_size
        self.grid = img_size // patch_size
        self.num_patches = self.grid ** 2
        self.mask_ratio = tuple(mask_ratio)
        self.mask_type = mask_type
        self.k_min, self.k_max = mask_count_range(self.num_patches, mask_ratio)
        self.sampling = sampling
        self.temperature = temperature
        self.target_norm = target_norm
        default_weight = 10.0 if task == 'respix' else 1.0  # Table 9
        self.enhancer_weight = default_weight if enhancer_weight is None else enhancer_weight
        self.mean = tuple(mean)
        self.std = tuple(std)
        self.register_buffer('pixel_mean', torch.tensor(mean), persistent=False)  # on the device, no copy per step
        self.register_buffer('pixel_std', torch.tensor(std), persistent=False)

        # the DALL-E dVAE is used as published and never updated (Sec. 2.3): no gradient, no train-mode behaviour
        self.tokenizer = tokenizer.eval().requires_grad_(False)  # frozen (Fig. 1b lock icon)
        self.enhancer = build_enhancer(arch, img_size, patch_size) if isinstance(arch, str) else arch
        vit = is_vit(self.enhancer)
        assert vit or (img_size % 32 == 0 and 32 % patch_size == 0), 'resnet50: stride-32 features, token grid'
        enh_width = self.enhancer.embed_dim if vit else 2048
        width = gen_width or (enh_width if vit else 384)  # Table 9: the ViT's width, 384 for ResNet
        shared = None
        if share_layers and vit:  # Table 5: share the patch embedding and the first 2 blocks
            assert width == enh_width and gen_depth >= 2, f'sharing needs width {enh_width}, depth >= 2'
            shared = (self.enhancer.patch_embed, self.enhancer.blocks[:2])
        heads = self.enhancer.blocks[0].attn.num_heads if shared else max(1, width // 64)
        self.generator = Generator(img_size, patch_size, tokenizer.vocab_size, width, gen_depth, heads, shared)
        # the head upsamples the feature grid to its target grid: pixels for RESPIX, tokens for REVDET
        feat_grid = self.grid if vit else img_size // 32
        out_grid = img_size if task == 'respix' else self.grid
        self.feature_map = enhancer_feature_map  # (enhancer, imgs) -> [B, D, h, w]; compile() may swap in its own
        # paper silent; REVDET scales its head init by 0.001 as BEiT's fine-tuning head, so that it starts at chance
        # (BCE ln 2) rather than at the noise of ResNet-50's 2048 un-normalized features (logits std 1.3)
        self.head = PixelShuffleHead(enh_width, 3 if task == 'respix' else 1, out_grid // feat_grid,
                                     init_scale=1e-3 if task == 'revdet' else 1.0)

    def make_mask(self, batch_size, device):
        """[B, N] bool for one batch (random on device; blockwise on CPU, better done in data workers)."""
        if self.mask_type == 'random':
            return random_mask(batch_size, self.num_patches, self.mask_ratio, device)
        return torch.stack([blockwise_mask(random.randint(self.k_min, self.k_max), self.grid)
                            for _ in range(batch_size)]).to(device)

    def check_inputs(self, imgs, tok_imgs):
        s = self.grid * self.tokenizer.downsample
        if imgs.dim() != 4 or imgs.shape[1:] != (3, self.img_size, self.img_size):
            raise ValueError(f'enhancer view must be [B, 3, {self.img_size}, {self.img_size}], got {list(imgs.shape)}')
        if tok_imgs.dim() != 4 or tok_imgs.shape[1:] != (3, s, s) or tok_imgs.shape[0] != imgs.shape[0]:
            raise ValueError(f'tokenizer view must be [B, 3, {s}, {s}] ({self.grid}x{self.grid} tokens x '
                             f'{self.tokenizer.downsample}), got {list(tok_imgs.shape)}')

    @torch.no_grad()
    def tokenize(self, tok_imgs):
        """Golden tokens g (Sec. 2.1): the frozen encoder's codes. tok_imgs: [B, 3, s, s] in [0, 1] -> [B, N] long."""
        return self.tokenizer.encode(tok_imgs).flatten(1)

    def generate(self, imgs, mask, golden):
        """The generator's half (Eq. 1, Sec. 2.3): p_BEiT at every position, its MIM loss at the masked ones.
        imgs: [B, 3, S, S], mask, golden: [B, N] -> (logits [B, N, V], gen_loss, mim_acc)."""
        logits = self.generator(imgs, mask)
        gen_loss, mim_acc = mim_loss(logits, golden, mask)
        return logits, gen_loss, mim_acc

    @torch.no_grad()
    def corrupt(self, golden, mask, logits, out_size=None):
        """Eq. 2, then the frozen decoder: sample, replace the masked tokens, decode (no gradient).
        -> (corrupted tokens [B, N], replaced [B, N] bool, corrupted image [B, 3, S, S] normalized)."""
        sampled = sample_tokens(logits, self.sampling, self.temperature)
        corrupted, replaced = replace_tokens(golden, mask, sampled)
        image = decode_tokens(self.tokenizer, corrupted, self.grid, out_size or self.img_size, self.pixel_mean,
                              self.pixel_std)
        return corrupted, replaced, image

    def enhance(self, corrupted_imgs, imgs, replaced):
        """Sec. 2.2: the enhancer and its linear head on the corrupted image, scored against the clean image's
        window-normalized pixels (RESPIX) or the replaced-token map (REVDET). -> (pred, target, loss)."""
        pred = self.head(self.feature_map(self.enhancer, corrupted_imgs))
        if self.task == 'respix':
            target = respix_target(imgs, self.target_norm, self.patch_size)
            return pred, target, respix_loss(pred, target)
        return pred, replaced, revdet_loss(pred.flatten(1), replaced)

    def forward(self, imgs, tok_imgs, mask=None, return_vis=False):
        """imgs: [B, 3, S, S] enhancer view (mean/std-normalized), tok_imgs: [B, 3, s, s] the same crop in [0, 1]
        at s = grid * tokenizer.downsample, mask: optional [B, N] bool (True = masked, any number of positions).
        Returns {'loss', 'gen_loss', 'mim_acc', 'enh_loss', 'replaced_frac'} (REVDET also 'det_acc',
        'majority_acc', 'label_entropy'; + 'vis'): 0-dim tensors; loss = gen_loss + enhancer_weight * enh_loss."""
        self.check_inputs(imgs, tok_imgs)
        mask = self.make_mask(imgs.shape[0], imgs.device) if mask is None else mask.to(imgs.device, torch.bool)
        golden = self.tokenize(tok_imgs)                                            # [B, N]
        logits, gen_loss, mim_acc = self.generate(imgs, mask, golden)               # [B, N, V]
        corrupted, replaced, corrupted_imgs = self.corrupt(golden, mask, logits)    # [B, N], [B, N], [B, 3, S, S]
        pred, target, enh_loss = self.enhance(corrupted_imgs, imgs, replaced)
        # one backward of the sum trains both networks at once; corrupt() ran without gradient, so the enhancer's
        # loss never reaches the generator, which learns from its MIM loss alone (Sec. 2.3)
        out = dict(loss=gen_loss + self.enhancer_weight * enh_loss, gen_loss=gen_loss, mim_acc=mim_acc,
                   enh_loss=enh_loss, replaced_frac=replaced.float().mean())
        if self.task == 'revdet':
            out.update(revdet_metrics(pred.flatten(1), replaced))
        if return_vis:
            out['vis'] = dict(imgs=imgs.detach(), tok_imgs=tok_imgs, mask=mask, golden=golden, logits=logits.detach(),
                              corrupted=corrupted, replaced=replaced, corrupted_imgs=corrupted_imgs,
                              pred=pred.detach(), target=target)
        return out

    def compile(self, **kwargs):
        """torch.compile of the networks while the step (masking, sampling, replacement, losses) stays eager: the
        tokenizer (its own compile), each generator and ViT block, ResNet-50's whole trunk as one graph.

        Static shapes (dynamic=False unless given): the figures' batch of 8 gets graphs of its own, instead of a
        dynamic-batch graph that the training steps would then run. ResNet-50's four stages would share one code
        object (nn.Sequential.forward), whose variants (stages x train / eval) reach Dynamo's recompile limit."""
        kwargs.setdefault('dynamic', False)
        self.tokenizer.compile(**kwargs)
        parts = list(self.generator.blocks)
        if is_vit(self.enhancer):
            parts += list(self.enhancer.blocks)
        else:
            self.feature_map = torch.compile(enhancer_feature_map, **kwargs)
        for m in dict.fromkeys(parts):  # the shared blocks once
            m.compile(**kwargs)
        return self



# ------------------------------------------------------------------------------------------------------------------
# 10. Ablations off the main path: blockwise masks (Table 4), MAE's per-patch target normalization (Table 6)

def blockwise_mask(num_masked, grid, min_block=16, min_aspect=0.3, rng=None):
    """BEiT's blockwise masking (Table 4 'Blockwise'; BEiT Alg. 1): rectangles of >= min_block patches with
    aspect ratio in [min_aspect, 1/min_aspect], h, w < grid, until exactly num_masked patches are masked.

    BEiT stops when 10 tries find no block that fits the remaining budget, a few patches short (and masks nothing
    on grids too small for a 16-patch block). We keep the count exact, as the paper's 100-120 range asks:
    min_block is capped to what fits, then smaller blocks fill the remainder, then (rarely) single patches.
    A Python loop over blocks, as in BEiT: call it in data-loader workers, not in the training step.
    Returns mask: [grid*grid] bool with exactly num_masked True.
    """
    rng = rng or random
    if not 0 <= num_masked <= grid * grid:
        raise ValueError(f'cannot mask {num_masked} of {grid * grid} patches')
    mask = np.zeros((grid, grid), dtype=bool)
    log_aspect = (math.log(min_aspect), math.log(1 / min_aspect))
    lo = max(1, min(min_block, num_masked, (grid - 1) ** 2))  # a block must fit: h, w < grid
    while mask.sum() < num_masked:
        budget = num_masked - int(mask.sum())
        added = 0
        for _ in range(10):  # BEiT tries 10 rectangles for each block
            area = rng.uniform(min(lo, budget), max(lo, budget))
            aspect = math.exp(rng.uniform(*log_aspect))
            h = int(round(math.sqrt(area * aspect)))
            w = int(round(math.sqrt(area / aspect)))
            if 0 < h < grid and 0 < w < grid:
                top = rng.randint(0, grid - h)
                left = rng.randint(0, grid - w)
                new = h * w - int(mask[top:top + h, left:left + w].sum())
                if 0 < new <= budget:
                    mask[top:top + h, left:left + w] = True
                    added = new
                    break
        if added == 0:
            if lo == 1:
                break
            lo = 1  # where BEiT stops: go on with smaller blocks
    free = np.flatnonzero(~mask.reshape(-1))  # the last few, if still short: single patches
    mask.reshape(-1)[rng.sample(list(free), num_masked - int(mask.sum()))] = True
    return torch.from_numpy(mask.reshape(-1))


def patch_stats(imgs, patch_size=16, eps=1e-6):
    """MAE's statistics (Table 6 'non-overlap window'): mean and unbiased std of each non-overlapping
    patch_size x patch_size patch, all channels together, spread over its pixels. -> ([B, 1, H, W]) x 2."""
    x = imgs.float()
    n = patch_size ** 2 * x.shape[1]
    mean = F.avg_pool2d(x.mean(1, keepdim=True), patch_size)
    sq_mean = F.avg_pool2d((x ** 2).mean(1, keepdim=True), patch_size)
    std = ((sq_mean - mean ** 2).clamp(min=0) * n / (n - 1) + eps).sqrt()
    return (F.interpolate(mean, scale_factor=patch_size, mode='nearest'),
            F.interpolate(std, scale_factor=patch_size, mode='nearest'))


# ------------------------------------------------------------------------------------------------------------------
# 11. Figures (PNG): Fig. 2 corrupted samples, Fig. 3 enhancer outputs, Fig. 4 normalization templates

def unnormalize(imgs, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """[B, 3, H, W] mean/std-normalized -> [0, 1]."""
    m = torch.tensor(mean, device=imgs.device).view(1, 3, 1, 1)
    s = torch.tensor(std, device=imgs.device).view(1, 3, 1, 1)
    return (imgs.float() * s + m).clamp(0, 1)


def masked_view(imgs, mask, grid):
    """imgs: [B, 3, H, W] in [0, 1], mask: [B, N] -> the generator's view with masked patches grey."""
    m = mask.view(-1, 1, grid, grid).float()
    m = F.interpolate(m, size=imgs.shape[-2:], mode='nearest')
    return imgs.float() * (1 - m) + 0.5 * m


def token_map(values, grid, size, colour=(1.0, 0.0, 0.0), base=None):
    """values: [B, N] in [0, 1] per token -> [B, 3, size, size]: `colour` blended over `base` (default black) by
    the value, each token a square (nearest)."""
    v = F.interpolate(values.float().view(-1, 1, grid, grid), size=(size, size), mode='nearest')
    base = torch.zeros(v.shape[0], 3, size, size, device=v.device) if base is None else base.float()
    c = torch.tensor(colour, device=v.device).view(1, 3, 1, 1)
    return base * (1 - 0.6 * v) + c * 0.6 * v


def _rescale(x):
    """Per-image min-max to [0, 1] (for showing normalized targets)."""
    lo = x.amin(dim=(1, 2, 3), keepdim=True)
    hi = x.amax(dim=(1, 2, 3), keepdim=True)
    return (x - lo) / (hi - lo).clamp(min=1e-6)


def save_grid(path, columns, titles, min_cell=96):
    """columns: list of [B, 3, h, w] in [0, 1] -> one PNG: a row of column titles, then one row per image.

    Cells are enlarged by an integer factor to at least min_cell pixels (nearest, so tokens stay sharp)."""
    size = max(c.shape[-1] for c in columns)
    cell = size * max(1, -(-min_cell // size))
    cols = [F.interpolate(c.float().cpu(), size=(cell, cell), mode='nearest') for c in columns]
    grid = torchvision.utils.make_grid(torch.stack(cols, dim=1).flatten(0, 1), nrow=len(cols), padding=2,
                                       pad_value=1.0)
    body = Image.fromarray(grid.mul(255).round().byte().permute(1, 2, 0).numpy())
    try:
        font = ImageFont.load_default(size=13)
    except TypeError:  # Pillow < 10.1: the fixed bitmap font
        font = ImageFont.load_default()
    canvas = Image.new('RGB', (body.width, body.height + 20), 'white')
    canvas.paste(body, (0, 20))
    draw = ImageDraw.Draw(canvas)
    for i, title in enumerate(titles):
        draw.text((4 + i * (cell + 2), 3), title, fill='black', font=font)
    canvas.save(path)


@torch.no_grad()
def save_fig2(path, model, imgs, tok_imgs, n_samples=4, mask=None):
    """Fig. 2: original, masked, and n_samples corrupted images sampled from one masked input."""
    model.check_inputs(imgs, tok_imgs)
    mask = model.make_mask(imgs.shape[0], imgs.device) if mask is None else mask.to(imgs.device, torch.bool)
    golden = model.tokenize(tok_imgs)
    logits = model.generate(imgs, mask, golden)[0]
    s = tok_imgs.shape[-1]
    samples = [unnormalize(model.corrupt(golden, mask, logits, s)[2], model.mean, model.std)
               for _ in range(n_samples)]
    titles = ['original', 'masked'] + [f'sample {i + 1}' for i in range(n_samples)]
    save_grid(path, [tok_imgs, masked_view(tok_imgs, mask, model.grid)] + samples, titles)


def respix_to_pixels(pred, imgs, norm='sliding', patch_size=16, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """RESPIX prediction -> pixels in [0, 1] for display: undo the window normalization with the clean image's
    statistics (the paper's footnote 1: 'we have to inject the original image's information')."""
    w_mean, w_std = window_stats(imgs, norm, patch_size)
    return unnormalize(pred.float() * w_std + w_mean, mean, std)


@torch.no_grad()
def save_fig3(path, model, vis):
    """Fig. 3: original, masked, corrupted image (the enhancer's input), and the enhancer's output. RESPIX: the
    prediction un-normalized back to pixels. REVDET: the truly replaced tokens and the detected ones (sigmoid > 0.5
    shaded by the probability), tinted red on the corrupted image."""
    imgs = vis['imgs']
    original = unnormalize(imgs, model.mean, model.std)
    corrupted = unnormalize(vis['corrupted_imgs'], model.mean, model.std)
    columns = [original, masked_view(original, vis['mask'], model.grid), corrupted]
    titles = ['original', 'masked', 'corrupted']
    if model.task == 'respix':
        columns.append(respix_to_pixels(vis['pred'], imgs, model.target_norm, model.patch_size, model.mean, model.std))
        titles.append('RESPIX output')
    else:
        size = corrupted.shape[-1]
        prob = torch.sigmoid(vis['pred'].float().flatten(1))
        columns.append(token_map(vis['replaced'], model.grid, size, base=corrupted))
        columns.append(token_map(prob, model.grid, size, base=corrupted))
        titles += ['replaced (truth)', 'detected p']
    save_grid(path, columns, titles)


@torch.no_grad()
def save_fig4(path, imgs, patch_size=16, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """Fig. 4: original, MAE's non-overlapping-window template, CIM's sliding-window template."""
    save_grid(path, [unnormalize(imgs, mean, std), _rescale(respix_target(imgs, 'patch', patch_size)),
                     _rescale(respix_target(imgs, 'sliding'))], ['original', 'patch norm', 'sliding norm'])
