"""DIR: information discard and robust representation restoration (Zhou et al., ICML 2023).

A masked-autoencoder ViT denoiser ``g`` sees the input through K complementary
random patch masks, restores each masked view, and averages the restorations
(Eq. 5). It is pre-trained to reconstruct natural images from masked adversarial
ones (Eq. 2), then trained by Algorithm 1: adversarial examples against the whole
defended model ``h(g(.))``, a cross-entropy loss on the restoration, and a
representation-robustness term (Eqs. 4-7) weighted by ``alpha``. Only the
denoiser is updated; the target classifier ``h`` stays frozen.

Defaults follow the paper where it and the released code (chenyyyykun/DIR) differ;
the code's behaviour is available as options: ``rep_project: false`` (the code never projects the representation
perturbation), ``rep_grad: target`` (the code's L_rep gradient flows only through
h(x~)), ``mask_mode: zero`` (pixels zeroed instead of tokens dropped),
``alpha: 1``, ``head: token-conv`` (the code's output layer: a Conv1d whose channels
are the 256 tokens, so it mixes patches; 5.63M parameters against 4.58M with the
paper's per-patch linear head) and the code's constant lr through the TrainConfig.
``joint_classifier: true`` trains the classifier together with the denoiser, as the
code does: a copy of the target (the shared target never changes) that the defended
model then uses (``classifier_lr``, default 0.01 since the copy starts trained).

Measured (quick profile, CIFAR-10 JPEG copy, fixed PGD-AT ResNet-18 target, see
``benchmarks/RESULTS.md``): with the paper's L_rep (alpha 2, gradient through both
KL arguments) main training collapses within its first epoch to a restoration the
target maps to one class (10.4% clean); the code's L_rep gradient, or alpha 0.5,
train normally. With a frozen target the denoiser can only lower the KL term by
moving the restoration where the target is flat, which a constant image achieves;
the official code escapes this because its classifier is trained jointly.

Two departures from both, for stability: the main-training update clips the global
gradient norm to 1.0 (``grad_clip``; the paper's unclipped SGD at lr 1e-2 diverged
to NaN in our CIFAR-10 quick run), and the [0,1] clip of the restoration passes
gradients straight through during training (a plain clip gives zero gradient to
pixels pushed out of range, and training can freeze there).

Complementary masks for a ratio r != 0.5 (our definition, since the paper gives
none): each image gets a random order of its N patches; view k keeps the
``round((1 - r) N)`` patches of a cyclic window starting at ``round(k N / K)``.
K windows of that length cover every patch only if ``K (1 - r) >= 1``, so K is
raised to ``ceil(1 / (1 - r))`` when needed (r = 0.7 with K = 2 uses 4 views).
For r = 0.5 and K = 2 this is exactly the paper's pair of complementary halves.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from attacks.pgd import pgd_linf, project_linf
from benchmark import distributed
from benchmark.artifacts import stage
from benchmark.config import require, subkey
from benchmark.data import augment
from benchmark.registry import DEFENSES
from benchmark.trainer import Trainer
from defenses.base import Defense, FitResult, TrainContext, TrainOptions, fresh_copy


# ----------------------------------------------------------------------------- the ViT
class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, qkv_bias: bool = False) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"width {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Block(nn.Module):
    """Pre-norm transformer block (ViT/MAE)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, qkv_bias: bool = False, eps: float = 1e-6) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, heads, qkv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class MaskedViT(nn.Module):
    """MAE-style encoder-decoder over patches: encode the visible patches (+ cls), fill the
    hidden positions with a learned mask token, decode, and predict every patch's pixels.

    ``layout="released"`` is the official code's variant (``pretrain_model.py``): no positional
    embedding on the encoder's cls token, LayerNorm eps 1e-5 (timm's blocks), no projection into
    the decoder and no norm after it (the decoder works at the encoder's width), PyTorch's default
    initialisation of the linear layers, and a patch's pixels ordered channel first."""

    def __init__(self, image_size: int, in_channels: int, patch_size: int, embed_dim: int, depth: int,
                 num_heads: int, mlp_ratio: float, decoder_dim: int, decoder_depth: int, decoder_heads: int,
                 head: str = "patch", layout: Literal["paper", "released"] = "paper") -> None:
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"image_size {image_size} is not divisible by patch_size {patch_size}")
        out = patch_size * patch_size * in_channels
        if head == "token-conv" and decoder_dim % out:
            raise ValueError(f"head 'token-conv' needs decoder_dim ({decoder_dim}) divisible by "
                             f"patch_size^2 * in_channels ({out})")
        released = layout == "released"
        if released and decoder_dim != embed_dim:
            raise ValueError(f"layout 'released' decodes at the encoder's width: decoder_dim {decoder_dim} "
                             f"!= embed_dim {embed_dim}")
        self.layout = layout
        ln_eps = 1e-5 if released else 1e-6
        self.patch_size, self.in_channels = patch_size, in_channels
        self.grid = image_size // patch_size
        self.num_patches = self.grid ** 2
        self.patch_embed = nn.Conv2d(in_channels, embed_dim, patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        # the released encoder has no positional slot for its cls token
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_patches + (0 if released else 1), embed_dim))
        self.blocks = nn.ModuleList([Block(embed_dim, num_heads, mlp_ratio, eps=ln_eps) for _ in range(depth)])
        self.norm = nn.LayerNorm(embed_dim, eps=ln_eps)
        self.decoder_embed = nn.Identity() if released else nn.Linear(embed_dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, self.num_patches + 1, decoder_dim))
        self.decoder_blocks = nn.ModuleList([Block(decoder_dim, decoder_heads, mlp_ratio, eps=ln_eps)
                                             for _ in range(decoder_depth)])
        self.decoder_norm = nn.Identity() if released else nn.LayerNorm(decoder_dim, eps=ln_eps)
        self.head_kind = head
        if head == "patch":  # the paper: a per-patch linear head
            self.head = nn.Linear(decoder_dim, out)
        else:  # the official code: a Conv1d over the feature axis whose channels are the tokens (mixes patches)
            self.head = nn.Conv1d(self.num_patches, self.num_patches, decoder_dim // out, stride=decoder_dim // out)
        for p in (self.cls_token, self.pos_embed, self.mask_token, self.decoder_pos_embed):
            nn.init.trunc_normal_(p, std=0.02)
        if not released:
            self.apply(self._init)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def unpatchify(self, tokens: torch.Tensor) -> torch.Tensor:
        b, p, c, g = tokens.shape[0], self.patch_size, self.in_channels, self.grid
        if self.layout == "released":  # a token's values are (channel, row, column)
            return tokens.view(b, g, g, c, p, p).permute(0, 3, 1, 4, 2, 5).reshape(b, c, g * p, g * p)
        x = tokens.view(b, g, g, p, p, c).permute(0, 5, 1, 3, 2, 4)
        return x.reshape(b, c, g * p, g * p)

    def forward(self, x: torch.Tensor, visible: torch.Tensor | None, slots: torch.Tensor | None = None) -> torch.Tensor:
        """``visible``: (B, V) indices of the patches the encoder sees (None: all of them). ``slots``:
        the positions where the decoder places their encodings (default: their own, ``visible``)."""
        n = self.num_patches
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2) + self.pos_embed[:, -n:]
        if visible is not None:
            tokens = tokens.gather(1, visible[..., None].expand(-1, -1, tokens.shape[-1]))
        cls = self.cls_token + (self.pos_embed[:, :1] if self.layout == "paper" else 0)
        h = torch.cat([cls.expand(len(x), -1, -1), tokens], dim=1)
        for blk in self.blocks:
            h = blk(h)
        h = self.decoder_embed(self.norm(h))
        body = h[:, 1:]
        if visible is not None:  # hidden positions get the mask token, visible ones their encoding
            where = visible if slots is None else slots
            full = self.mask_token.to(body.dtype).expand(len(x), n, -1).clone()
            body = full.scatter(1, where[..., None].expand(-1, -1, body.shape[-1]), body)
        h = torch.cat([h[:, :1], body], dim=1) + self.decoder_pos_embed
        for blk in self.decoder_blocks:
            h = blk(h)
        h = self.decoder_norm(h)[:, 1:]
        return self.unpatchify(self.head(h))


# ----------------------------------------------------------------------------- training options
@dataclass
class DIRTrain(TrainOptions):
    """Pre-training (Eq. 2) and main training (Algorithm 1) options. Defaults: the paper."""

    pretrain_epochs: int = 20
    pretrain_batch_size: int = 256
    pretrain_lr: float = 1.5e-4  # AdamW base lr per 256 images (the official pre_training.py)
    pretrain_weight_decay: float = 0.05
    pretrain_warmup_fraction: float = 0.1
    pretrain_attack_steps: int = 5  # PGD against the target alone (code hints at 20)
    epochs: int = 90
    batch_size: int = 128
    lr: float = 1e-2
    momentum: float = 0.9
    weight_decay: float = 2e-4
    milestones: list[float] = field(default_factory=lambda: [75 / 90, 1.0])  # lr / 10 at these fractions
    alpha: float = 2.0
    eps: float = 8 / 255
    step_size: float = 2 / 255
    attack_steps: int = 5
    rep_steps: int = 5
    rep_project: bool = True  # project delta to the eps ball and x~ + delta to [0,1] (code: no)
    rep_grad: Literal["both", "target"] = "both"  # L_rep gradient through both KL arguments (code: target)
    # Global gradient-norm clip in main training: a benchmark choice, not in the paper. Without it the
    # first SGD step at lr 1e-2 (gradient norm ~5.8e3 measured) throws the restoration out of [0,1] and
    # training diverges to NaN (H100 quick run); null restores the paper's unclipped update.
    grad_clip: float | None = 1.0
    # With the ``joint_classifier`` option: lr of the classifier copy (the code trains its classifier
    # from scratch at 0.1; the copy starts from the trained target, hence a smaller default).
    classifier_lr: float = 0.01

    def validate(self, where: str) -> None:
        self.require_positive(where, "pretrain_batch_size", "epochs", "batch_size", "attack_steps", "rep_steps",
                              "pretrain_attack_steps")
        require(self.pretrain_epochs >= 0, subkey(where, "pretrain_epochs"), "must be >= 0 (0 = no pre-training)")
        for key in ("pretrain_lr", "lr"):
            require(getattr(self, key) > 0, subkey(where, key), f"must be > 0, got {getattr(self, key)}")
        require(self.alpha >= 0, subkey(where, "alpha"), f"must be >= 0, got {self.alpha}")
        require(0 < self.eps <= 1, subkey(where, "eps"), f"must be in (0, 1], got {self.eps}")
        require(0 < self.step_size <= 1, subkey(where, "step_size"), f"must be in (0, 1], got {self.step_size}")
        require(all(0 < m <= 1 for m in self.milestones), subkey(where, "milestones"),
                f"must be fractions of training in (0, 1], got {self.milestones}")


@dataclass
class DIROptions:
    """The denoiser: a masked-autoencoder ViT (defaults: the paper's at CIFAR size) and its masks."""

    image_size: int = 32  # filled from the dataset unless set
    in_channels: int = 3  # filled from the dataset unless set
    patch_size: int = 2  # pixels per patch side
    embed_dim: int = 192  # encoder width
    depth: int = 8  # encoder blocks (the paper's; Table 5 varies it)
    num_heads: int = 3  # encoder attention heads
    mlp_ratio: float = 4.0  # MLP width over embed_dim, encoder and decoder
    decoder_depth: int = 2  # decoder blocks (the paper's; Table 5 varies it)
    decoder_dim: int | None = None  # default: embed_dim
    decoder_heads: int | None = None  # default: num_heads
    mask_ratio: float = 0.5  # share of patches hidden in each view
    num_masks: int = 2  # views per restoration (at least enough to show every patch)
    mask_mode: Literal["drop", "zero"] = "drop"  # hidden patches left out of the encoder, or zeroed
    head: Literal["patch", "token-conv"] = "patch"  # per-patch linear head, or the code's token Conv1d
    joint_classifier: bool = False  # train a copy of the target with the denoiser (the official code)

    def validate(self, where: str) -> None:
        require(0 < self.mask_ratio < 1, subkey(where, "mask_ratio"), f"must be in (0, 1), got {self.mask_ratio}")
        for key in ("image_size", "in_channels", "patch_size", "embed_dim", "depth", "num_heads", "num_masks"):
            require(getattr(self, key) >= 1, subkey(where, key), f"must be >= 1, got {getattr(self, key)}")
        require(self.image_size % self.patch_size == 0, subkey(where, "image_size"),
                f"{self.image_size} is not divisible by patch_size {self.patch_size}")
        dim, heads = self.decoder_dim or self.embed_dim, self.decoder_heads or self.num_heads
        require(self.embed_dim % self.num_heads == 0, subkey(where, "embed_dim"),
                f"{self.embed_dim} is not divisible by num_heads {self.num_heads}")
        require(dim % heads == 0, subkey(where, "decoder_dim"), f"{dim} is not divisible by decoder_heads {heads}")
        out = self.patch_size ** 2 * self.in_channels
        require(self.head != "token-conv" or dim % out == 0, subkey(where, "head"),
                f"'token-conv' needs decoder_dim ({dim}) divisible by patch_size^2 * in_channels ({out})")


def rank_batches(data, batch_size: int, cfg: TrainOptions, gen: torch.Generator, aug_gen: torch.Generator):
    """One epoch of shuffled (and, with ``cfg.augment``, augmented) batches; under torchrun each
    rank gets its part of every batch."""
    for x, y in data.batches(batch_size, shuffle=True, generator=gen):
        part = distributed.rank_slice(len(x))
        x, y = x[part], y[part]
        if cfg.augment:
            x = augment(x, generator=aug_gen)
        yield x, y


def representation_delta(classifier, restored: torch.Tensor, steps: int, step_size: float,
                         eps: float | None) -> torch.Tensor:
    """Eq. 4: the perturbation of the restored image that most changes the classifier's output
    (``steps`` signed ascent steps of ``step_size`` on KL(h(x~) || h(x~ + delta)), from 0.001 N(0, I)).
    ``eps``: project delta to the eps ball and x~ + delta to [0,1]; None: never (the official code)."""
    restored = restored.detach()
    target = F.softmax(classifier(restored).float(), dim=1).detach()
    delta = 0.001 * torch.randn_like(restored)
    for _ in range(steps):
        delta.requires_grad_(True)
        kl = F.kl_div(F.log_softmax(classifier(restored + delta).float(), dim=1), target, reduction="sum")
        (grad,) = torch.autograd.grad(kl, delta)
        delta = delta.detach() + step_size * grad.sign()
        if eps is not None:
            delta = project_linf(restored + delta, restored, eps) - restored
    return delta.detach()


# ----------------------------------------------------------------------------- the defense
@DEFENSES.register("dir", paper="Zhou et al., ICML 2023",
                   description="DIR: masked-autoencoder ViT over K complementary masks, restorations averaged")
class DIR(Defense):
    version = 3  # 2: token-conv head option, reseeded main training; 3: joint classifier, ViT-only stage
    stochastic = True  # fresh masks every call
    differentiable = True
    uses_masks = True
    trainable = True
    data_parallel = True
    TrainConfig = DIRTrain
    data_shape_options = ("in_channels", "image_size")
    Options = DIROptions

    def __init__(self, **options: Any) -> None:
        super().__init__()
        o = self.options = self.read_options(options)
        self.joint_classifier = o.joint_classifier
        self._build(MaskedViT(o.image_size, o.in_channels, o.patch_size, o.embed_dim, o.depth, o.num_heads,
                              o.mlp_ratio, o.decoder_dim or o.embed_dim, o.decoder_depth,
                              o.decoder_heads or o.num_heads, o.head),
                    o.mask_ratio, o.num_masks, o.mask_mode)

    def _build(self, net: MaskedViT, mask_ratio: float, num_masks: int, mask_mode: str) -> None:
        """The denoiser and its complementary views (the windows of the per-image patch order)."""
        self.net = net
        n = net.num_patches
        self.mask_ratio, self.mask_mode = mask_ratio, mask_mode
        self.num_visible = max(1, round((1 - mask_ratio) * n))
        self.num_views = max(num_masks, math.ceil(n / self.num_visible))  # every patch visible somewhere
        offsets = torch.tensor([round(k * n / self.num_views) for k in range(self.num_views)])
        window = (offsets[:, None] + torch.arange(self.num_visible)[None, :]) % n  # (K, V) positions in the order
        self.register_buffer("windows", window, persistent=False)

    def attach_classifier(self, classifier: nn.Module) -> None:
        """``joint_classifier``: the official code trains the classifier together with the denoiser;
        here a copy of the target (the shared target itself never changes) is trained in main
        training and used by the defended model."""
        if self.joint_classifier and self.own_classifier is None:
            self.own_classifier = fresh_copy(classifier)

    # -- masks ---------------------------------------------------------------------------------
    def sample_masks(self, x: torch.Tensor) -> torch.Tensor:
        """One random patch order per image, (B, N); it determines all K complementary masks."""
        gen = self._gen(x.device)
        noise = torch.rand(len(x), self.net.num_patches, device=x.device, generator=gen)
        return noise.argsort(dim=1)

    def visible_patches(self, order: torch.Tensor) -> torch.Tensor:
        """(B, K, V) indices of the patches each view keeps."""
        b = order.shape[0]
        idx = self.windows.to(order.device)[None].expand(b, -1, -1).reshape(b, -1)
        return order.gather(1, idx).view(b, self.num_views, self.num_visible)

    def patch_masks(self, order: torch.Tensor) -> torch.Tensor:
        """(B, K, N) booleans: True where view k sees the patch."""
        vis = self.visible_patches(order)
        m = torch.zeros(order.shape[0], self.num_views, self.net.num_patches, dtype=torch.bool, device=order.device)
        return m.scatter(2, vis, True)

    # -- restoration ---------------------------------------------------------------------------
    def restore_views(self, x: torch.Tensor, masks: torch.Tensor | None = None) -> torch.Tensor:
        """The K restorations g(x ⊙ m_k), (B, K, C, H, W), unclamped."""
        order = self.sample_masks(x) if masks is None else masks
        if order.shape[0] != x.shape[0]:
            raise ValueError(f"masks for {order.shape[0]} images given with a batch of {x.shape[0]}")
        b, k = x.shape[0], self.num_views
        xs = x.repeat_interleave(k, dim=0)  # (B*K, C, H, W), views of one image adjacent
        if self.mask_mode == "drop":
            visible = self.visible_patches(order)
            out = self.net(xs, visible.reshape(b * k, -1), self.decoder_slots(visible).reshape(b * k, -1))
        else:  # zero the hidden pixels and let the encoder see every (partly zero) patch
            pm = self.patch_masks(order).reshape(b * k, 1, self.net.grid, self.net.grid).to(x.dtype)
            pix = F.interpolate(pm, scale_factor=self.net.patch_size, mode="nearest")
            out = self.net(xs * pix, None)
        return out.view(b, k, *x.shape[1:])

    def decoder_slots(self, visible: torch.Tensor) -> torch.Tensor:
        """(B, K, V) positions where the decoder places each view's encodings: their own."""
        return visible

    def restore(self, x: torch.Tensor, masks: torch.Tensor | None = None) -> torch.Tensor:
        """Eq. 5: the average of the K restorations, clipped to [0,1]."""
        return self.restore_views(x, masks).mean(dim=1).clamp(0.0, 1.0)

    def purify(self, x: torch.Tensor, masks: Any = None) -> torch.Tensor:
        return self.restore(x, masks)

    # -- training ------------------------------------------------------------------------------
    def fit(self, classifier: nn.Module, train, context: TrainContext, config: DIRTrain | None = None) -> FitResult:
        cfg = config or DIRTrain()
        device, seed = context.device, context.seed
        self.attach_classifier(classifier)
        distributed.broadcast_module(self)  # torchrun: every rank starts from rank 0's weights
        target = classifier  # pre-training attacks the shared target alone (Eq. 2)
        torch.manual_seed(seed)
        self.seed(seed, device)
        data = train.to(device)
        classifier.eval()
        for p in classifier.parameters():
            p.requires_grad_(False)
        use_bf16 = cfg.use_bf16(device)
        history: list[dict] = []
        t_start = time.perf_counter()
        if cfg.pretrain_epochs > 0:
            history += self._pretrain_cached(target, data, cfg, context)
        torch.manual_seed(seed + 1)  # main training draws the same randomness whether or not pre-training ran
        self.seed(seed + 1, device)
        joint = self.own_classifier is not None
        history += self.main_train(self.own_classifier if joint else target, data, cfg, device, use_bf16, seed,
                                   joint=joint, context=context)
        self.eval()
        main = [h["seconds"] for h in history if h["phase"] == "main"]
        pre = [h["seconds"] for h in history if h["phase"] == "pretrain"]
        return FitResult(seconds=time.perf_counter() - t_start, seconds_per_epoch=statistics.median(main),
                         epochs=cfg.epochs, history=history
                         + [{"phase": "summary", "pretrain_seconds_per_epoch": statistics.median(pre) if pre else None,
                             "main_seconds_per_epoch": statistics.median(main)}])

    PRETRAIN_FIELDS = ("pretrain_epochs", "pretrain_batch_size", "pretrain_lr", "pretrain_weight_decay",
                       "pretrain_warmup_fraction", "pretrain_attack_steps", "eps", "step_size", "augment")

    LABEL = "DIR"  # names the shared pre-training stage (``dir-pretrain``) and its messages

    def _pretrain_cached(self, classifier, data, cfg, context: TrainContext) -> list[dict]:
        """Pre-train (:meth:`_pretrain`), or reuse the pre-trained weights of an earlier run with the same
        architecture, pre-training options, target, data and seed (a stage of ``context.stages``: the
        ablations over alpha, L_rep or the main-training schedule then share one pre-training)."""
        model = {k: v for k, v in self.config().items() if k != "joint_classifier"}  # the ViT alone
        key = {"code": self.version, "model": model, "n": len(data), "seed": context.seed,
               "bf16": cfg.use_bf16(context.device), "pretrain": {k: getattr(cfg, k) for k in self.PRETRAIN_FIELDS}}
        name = self.LABEL.lower()

        def build() -> dict:
            return {"defense": name, "options": self.config(), "history": self._pretrain(classifier, data, cfg, context)}

        card, reused = stage(context.stages, f"{name}-pretrain", key, self.net, build, f"{self.LABEL} pre-training stage")
        return [dict(h, reused=True) for h in card["history"]] if reused else card["history"]

    def _pretrain(self, classifier, data, cfg: DIRTrain, context: TrainContext) -> list[dict]:
        return self.pretrain(classifier, data, cfg, context.device, cfg.use_bf16(context.device), context.seed,
                             context.part("pretrain"))  # a killed pre-training resumes after its last epoch

    def pretrain(self, classifier, data, cfg: DIRTrain, device, use_bf16: bool, seed: int,
                 context: TrainContext | None = None) -> list[dict]:
        """Eq. 2: reconstruct the natural image from each masked view of an adversarial example
        crafted against the target alone. ``context``: per-epoch state, as for the main training."""

        lr = cfg.pretrain_lr * cfg.pretrain_batch_size / 256
        opt = distributed.synchronized(torch.optim.AdamW(self.net.parameters(), lr=lr, betas=(0.9, 0.95),
                                                         weight_decay=cfg.pretrain_weight_decay))
        per = math.ceil(len(data) / cfg.pretrain_batch_size)
        steps = cfg.pretrain_epochs * per
        warm = max(1, int(cfg.pretrain_warmup_fraction * steps))
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: (s + 1) / warm if s < warm else 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, steps - warm))))
        gen = torch.Generator().manual_seed(seed)
        aug_gen = torch.Generator(device=device).manual_seed(seed)
        trainer = Trainer(self, f"{self.LABEL} pretrain", context or TrainContext(device, seed), cfg.pretrain_epochs,
                          optimizers={"adamw": opt}, schedulers={"lr": sched},
                          gens={"shuffle": gen, "augment": aug_gen, "masks": self._gen(device)},
                          progress=cfg.progress, steps_per_epoch=per, phase="pretrain")

        def step(batch) -> dict[str, torch.Tensor]:
            x, y = batch
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
                x_adv = pgd_linf(classifier, x, y, eps=cfg.eps, step_size=cfg.step_size,
                                 steps=cfg.pretrain_attack_steps)  # its random start: the global generator, saved
                views = self.restore_views(x_adv)
            loss = (views.float() - x[:, None]).pow(2).mean()  # squared error of every masked view
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            return {"loss": loss.detach()}

        self.train()
        return trainer.fit(lambda epoch: rank_batches(data, cfg.pretrain_batch_size, cfg, gen, aug_gen), step).history

    def representation_delta(self, classifier, restored: torch.Tensor, cfg: DIRTrain) -> torch.Tensor:
        """Eq. 4 (see :func:`representation_delta`), projected unless ``rep_project`` is off."""
        return representation_delta(classifier, restored, cfg.rep_steps, cfg.step_size,
                                    cfg.eps if cfg.rep_project else None)

    def main_train(self, classifier, data, cfg: DIRTrain, device, use_bf16: bool, seed: int,
                   joint: bool = False, context: TrainContext | None = None) -> list[dict]:
        """Algorithm 1: L_den = CE(h(x~), y) + alpha * KL(h(x~) || h(x~ + delta)); the denoiser only,
        or (``joint``) the denoiser and the defense's own copy of the classifier, as the official code.
        A run's ``context`` gives the per-epoch state: a killed main training resumes after its last epoch."""
        groups = [{"params": list(self.net.parameters())}]
        if joint:
            for p in classifier.parameters():
                p.requires_grad_(True)
            groups.append({"params": list(classifier.parameters()), "lr": cfg.classifier_lr})
        opt = distributed.synchronized(torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum,
                                                       weight_decay=cfg.weight_decay))
        steps_per_epoch = math.ceil(len(data) / cfg.batch_size)
        bounds = [int(m * cfg.epochs * steps_per_epoch) for m in cfg.milestones]
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.1 ** sum(s >= b for b in bounds))
        gen = torch.Generator().manual_seed(seed + 1)
        aug_gen = torch.Generator(device=device).manual_seed(seed + 1)
        trainer = Trainer(self, "DIR main", context or TrainContext(device, seed), cfg.epochs,
                          optimizers={"sgd": opt}, schedulers={"lr": sched},
                          gens={"shuffle": gen, "augment": aug_gen, "masks": self._gen(device)},
                          progress=cfg.progress, steps_per_epoch=steps_per_epoch, phase="main")

        def defended(z: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
            return classifier(self.restore(z, masks)).float()

        def step(batch) -> dict[str, torch.Tensor]:
            x, y = batch
            masks = self.sample_masks(x)  # one mask group per step (Alg. 1, line 4)
            self.eval()
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
                # PGD-5 against the whole defended model, with this step's masks
                x_adv = pgd_linf(lambda z, masks=masks: defended(z, masks), x, y, eps=cfg.eps,
                                 step_size=cfg.step_size, steps=cfg.attack_steps)
            self.train()
            classifier.train(joint)  # a jointly trained classifier updates its BN statistics too
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
                # Clip to [0,1] as at inference, but let the gradient pass the clip
                # (straight-through): a plain clip gives zero gradient to every pixel pushed
                # out of range, and on dark images (digits) training then freezes for good.
                raw = self.restore_views(x_adv, masks).mean(dim=1)
                restored = raw + (raw.clamp(0.0, 1.0) - raw).detach()
                delta = self.representation_delta(classifier, restored.detach(), cfg)
                logits = classifier(restored).float()
                base = restored if cfg.rep_grad == "both" else restored.detach()
                logits_shift = classifier(base + delta).float()
            ce = F.cross_entropy(logits, y)
            kl = F.kl_div(F.log_softmax(logits_shift, dim=1), F.softmax(logits, dim=1), reduction="batchmean")
            loss = ce + cfg.alpha * kl
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip is not None:
                nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], cfg.grad_clip)
            opt.step()
            sched.step()
            return {"loss": loss.detach(), "robust_train_acc": (logits.detach().argmax(1) == y).float().mean()}

        history = trainer.fit(lambda epoch: rank_batches(data, cfg.batch_size, cfg, gen, aug_gen), step).history
        if joint:
            classifier.eval()
            for p in classifier.parameters():
                p.requires_grad_(False)
        return history
