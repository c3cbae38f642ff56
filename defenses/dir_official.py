"""DIR as its released code trains it, and the control that isolates its denoiser.

``dir`` (``defenses/dir.py``) follows the paper: a frozen adversarially trained target, only the
denoiser trains. The released code (github.com/dwDavidxd/DIR: ``train.py``, ``pre_training.py``,
``pretrain_model.py``) trains differently, and these two rows make that version runnable:

``dir-official``
    * **Its own classifier, trained from scratch jointly with the denoiser** (the defense owns it,
      as ME-Net owns its classifier: a copy of the config's target architecture, re-initialised).
      The config's target weights only craft pre-training's adversarial examples (the README:
      "PGD attack against standard adversarially trained model").
    * One SGD over two parameter groups, momentum 0.9, weight decay 2e-4 on both: the denoiser at
      a constant 5e-5, the classifier at 0.1, x0.1 from epoch 75 and x0.01 from epoch 90 of 91
      (``milestones``: fractions of the epochs, so shorter runs keep the shape). Batch 128,
      random crop 4 + flip, inputs in [0, 1].
    * Per step: PGD-5 (eps 8/255, step 2/255, uniform start, CE) through classifier(denoiser(x)),
      both in eval mode, fresh masks at every forward; a restoration x~ of the adversarial batch
      (eval mode, other masks) and its representation perturbation: 5 signed steps of 2/255 on
      KL(h(x~) || h(x~ + delta)) from 0.001 N(0, I), **never projected or clipped** (the code
      assigns its projection to a variable it does not return); then, in train mode,
      L = CE(h(g(x')), y) + 1 * KL(softmax h(g(x')) || softmax h(x~ + delta)), batch mean, where the
      two g(x') are separate forwards with fresh masks. Neither KL argument is detached: the
      classifier gets gradient from both, the denoiser through h(g(x')).
    * The denoiser: the official ``MAE_ViT``: 2x2 patches, width 192, 8 encoder and 2 decoder
      blocks, 3 heads; a per-image random permutation split into two complementary halves, each
      encoded separately with the cls token; the decoder fills the rest with a learned mask token;
      the two decoded halves are averaged and mapped to pixels by a Conv1d whose channels are the
      tokens (``MaskedViT(layout="released", head="token-conv")``). The released decoder places
      half 2's tokens at half 1's positions (it un-shuffles both halves with the same indices):
      ``decoder_index_bug: true`` (default) keeps that, ``false`` places each half at its own.
      The restoration is not clipped to [0, 1] (neither in training nor at inference).
    * Pre-training: AdamW, lr 1.5e-4 x batch / 256, betas (0.9, 0.95), weight decay 0.05, batch 250,
      per epoch the smaller of a linear warm-up over 20% of the epochs (200 of 1000) and a half cosine
      over all of them (so the cosine already binds before the warm-up ends), in the
      stored order (no shuffling, no augmentation, the last partial batch dropped), squared error of
      the fused restoration on pixels mapped to [-1, 1] (while main training feeds [0, 1], as
      released), from fixed adversarial examples crafted once against the target (PGD-20, eps
      8/255, step 0.003: ``pre_training.py`` declares these attack arguments without using them). The
      released decoder (with its index bug) is assumed in pre-training too: the model the script
      imports (``model_try``) is not released. Epochs configurable (released:
      1000; its README: more than 600 for good reconstructions). ``pretrain_range: unit`` pre-trains
      in [0, 1] instead (a repair: at smoke size the released mismatch left the restorations of
      [0, 1] images unusable and the classifier at chance).
    * Masks are drawn at inference too: the defense is stochastic; attacks use EOT and the
      mask-adaptive attack fixes them.

``joint-at``
    The same joint loop, objective and budget with no denoiser (the identity): a classifier
    trained from scratch with PGD-5 adversarial training plus the KL term. ``dir-official`` minus
    ``joint-at`` is what the denoiser adds; ``joint-at`` minus the AT target, what the KL term (and
    this recipe) adds.

What had to change for the code to run (listed in the tables' footer too): ``train.py`` imports
``lightweight_model``, missing from the repository (``pretrain_model.MAE_ViT`` is used: the model
the repository has); ``pre_training.py`` imports the missing ``model_try`` and ``utils`` and calls
the model with two inputs while its ``forward`` takes one (the loss is computed outside the model
here: the fused restoration's squared error, as ``MAE_ViT.Loss``); its data files (pickled
adversarial examples) are not released (crafted here as above); its run resumes at epoch 290 of a
checkpoint (here it starts at 0); the pickled pre-trained weights in its ``model/`` folder are not
used (this suite never unpickles checkpoints). Other departures: masks come from the defense's
seeded generator (the code uses NumPy's global one); PGD's random start is clipped to [0, 1] before
the first forward; the classifier keeps the suite's input normalisation layer (the target
architecture's per-channel mean/std; the released ResNet18 sees raw [0, 1] pixels); on CUDA the
passes run under bf16 autocast unless ``bf16: false`` (the code: fp32); under ``joint-at`` the two
g(x') forwards are one (the identity makes them equal; the BN running statistics are then updated
once per step instead of twice); the seed is the config's (the code's: 42).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from attacks.pgd import pgd_linf
from benchmark import distributed
from benchmark.config import require, subkey
from benchmark.errors import BenchError
from benchmark.registry import DEFENSES
from benchmark.trainer import Trainer
from defenses.base import Defense, FitResult, TrainContext, TrainOptions, fresh_copy
from defenses.dir import DIR, MaskedViT, rank_batches, representation_delta
from defenses.pairs import PairTrain, static_pairs

RELEASED_NOTE = ("trained as the released code (github.com/dwDavidxd/DIR): its own classifier, the target's "
                 "architecture trained from scratch jointly with the denoiser; the target's weights only craft "
                 "pre-training's examples. Made runnable: the missing lightweight_model is pretrain_model.MAE_ViT, "
                 "pre-training's loss is computed outside the model, its adversarial examples are crafted here "
                 "(PGD-20 against the target), masks come from a seeded generator")
CONTROL_NOTE = ("the released DIR's joint loop without a denoiser: the target's architecture trained from scratch "
                "with PGD-5 AT + the KL term (the control of dir-official); the target's weights are not used")


@dataclass
class JointTrain(TrainOptions):
    """The released ``train.py``'s joint loop (defaults: the released script)."""

    epochs: int = 91
    batch_size: int = 128
    lr: float = 0.1  # the classifier's
    momentum: float = 0.9
    weight_decay: float = 2e-4
    milestones: list[float] = field(default_factory=lambda: [75 / 91, 90 / 91])  # classifier lr x0.1 from each
    rep_weight: float = 1.0  # weight of the KL term
    eps: float = 8 / 255
    step_size: float = 2 / 255  # PGD's and the representation perturbation's
    attack_steps: int = 5
    rep_steps: int = 5

    def validate(self, where: str) -> None:
        self.require_positive(where, "epochs", "batch_size", "attack_steps", "rep_steps")
        require(self.lr > 0, subkey(where, "lr"), f"must be > 0, got {self.lr}")
        require(self.rep_weight >= 0, subkey(where, "rep_weight"), f"must be >= 0, got {self.rep_weight}")
        require(0 < self.eps <= 1, subkey(where, "eps"), f"must be in (0, 1], got {self.eps}")
        require(0 < self.step_size <= 1, subkey(where, "step_size"), f"must be in (0, 1], got {self.step_size}")
        require(all(0 < m <= 1 for m in self.milestones), subkey(where, "milestones"),
                f"must be fractions of training in (0, 1], got {self.milestones}")


@dataclass
class DIROfficialTrain(JointTrain):
    """:class:`JointTrain` plus the denoiser's lr and the released ``pre_training.py``."""

    denoiser_lr: float = 5e-5  # constant
    pretrain_epochs: int = 1000  # 0: no pre-training
    pretrain_batch_size: int = 250
    pretrain_lr: float = 1.5e-4  # AdamW base lr per 256 images
    pretrain_weight_decay: float = 0.05
    pretrain_warmup_fraction: float = 0.2  # linear warm-up epochs (200 of 1000), then cosine
    pretrain_attack_steps: int = 20  # PGD against the target for the fixed pre-training examples
    pretrain_step_size: float = 0.003
    # pixels in pre-training: "signed" = mapped to [-1, 1], as released (main training then feeds [0, 1]);
    # "unit" = [0, 1] throughout (a repair, for comparison)
    pretrain_range: Literal["signed", "unit"] = "signed"

    def validate(self, where: str) -> None:
        super().validate(where)
        self.require_positive(where, "pretrain_batch_size", "pretrain_attack_steps")
        require(self.pretrain_epochs >= 0, subkey(where, "pretrain_epochs"), "must be >= 0 (0 = no pre-training)")
        for key in ("denoiser_lr", "pretrain_lr", "pretrain_step_size"):
            require(getattr(self, key) > 0, subkey(where, key), f"must be > 0, got {getattr(self, key)}")
        require(0 <= self.pretrain_warmup_fraction <= 1, subkey(where, "pretrain_warmup_fraction"),
                f"must be in [0, 1], got {self.pretrain_warmup_fraction}")


def classifier_lr_factor(step: int, steps_per_epoch: int, epochs: int, milestones: list[float]) -> float:
    """The released schedule: x0.1 from each milestone's epoch on (1-based epochs, as ``train.py``
    sets the lr before each epoch: from epoch 75 and 90 of 91)."""
    epoch = step // steps_per_epoch + 1
    return 0.1 ** sum(epoch >= round(m * epochs) for m in milestones)


def pretrain_lr_factor(epoch: int, epochs: int, warmup_fraction: float) -> float:
    """``pre_training.py``'s per-epoch factor: min(linear warm-up, half-cosine over all epochs)."""
    warm = warmup_fraction * epochs
    ramp = (epoch + 1) / warm if warm > 0 else 1.0
    return min(ramp, 0.5 * (math.cos(epoch / epochs * math.pi) + 1))


def joint_objective(classifier: nn.Module, restored: torch.Tensor, restored_again: torch.Tensor | None,
                    perturbed: torch.Tensor, y: torch.Tensor, weight: float):
    """``train.py``'s loss: CE(h(g(x')), y) + weight * KL(softmax h(g(x')) || softmax h(x~ + delta)), the
    KL's target from a second restoration ``restored_again`` (None: ``restored``). Nothing is
    detached: the classifier gets the KL's gradient through both arguments. Returns (loss, CE, KL,
    the logits of ``restored``)."""
    logits = classifier(restored).float()
    logits_rec = logits if restored_again is None else classifier(restored_again).float()
    ce = F.cross_entropy(logits, y)
    kl = F.kl_div(F.log_softmax(classifier(perturbed).float(), dim=1), F.softmax(logits_rec, dim=1),
                  reduction="batchmean")
    return ce + weight * kl, ce, kl, logits


def joint_train(owner: Defense, denoise, classifier: nn.Module, data, cfg: JointTrain, context: TrainContext,
                name: str, denoiser: tuple[list[nn.Parameter], float] | None = None) -> list[dict]:
    """The released ``train.py`` loop on ``owner`` (which holds ``classifier``): adversarial examples
    against classifier(denoise(.)), the KL game on the restoration, one SGD over both (the denoiser's
    group first, ``denoiser`` = (parameters, constant lr); the classifier's with the step schedule).
    ``denoise``: None for the identity (``joint-at``). Resumes after the last finished epoch of a killed run."""
    device, seed = context.device, context.seed
    use_bf16 = cfg.use_bf16(device)
    groups = []
    if denoiser is not None:
        groups.append({"params": denoiser[0], "lr": denoiser[1]})
    groups.append({"params": list(classifier.parameters()), "lr": cfg.lr})
    for p in classifier.parameters():
        p.requires_grad_(True)
    opt = distributed.synchronized(torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum,
                                                   weight_decay=cfg.weight_decay))
    per = math.ceil(len(data) / cfg.batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, [lambda s: 1.0] * (len(groups) - 1) + [
        lambda s: classifier_lr_factor(s, per, cfg.epochs, cfg.milestones)])
    gen = torch.Generator().manual_seed(seed + 1)
    aug_gen = torch.Generator(device=device).manual_seed(seed + 1)
    trainer = Trainer(owner, name, context, cfg.epochs, optimizers={"sgd": opt}, schedulers={"lr": sched},
                      gens={"shuffle": gen, "augment": aug_gen, "masks": owner._gen(device)},
                      progress=cfg.progress, steps_per_epoch=per, phase="main")
    restore = denoise or (lambda z: z)
    lr_used: dict[str, float] = {}  # the lrs of the epoch's last step, for its history row

    def step(batch) -> dict[str, torch.Tensor]:
        x, y = batch
        owner.eval()  # the denoiser and the classifier while crafting
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
            x_adv = pgd_linf(lambda z: classifier(restore(z)).float(), x, y, eps=cfg.eps, step_size=cfg.step_size,
                             steps=cfg.attack_steps)
            with torch.no_grad():
                rec = restore(x_adv)
            rec_adv = rec + representation_delta(classifier, rec, cfg.rep_steps, cfg.step_size, None)
        owner.train()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
            # two restorations of x' with fresh masks (one under the identity: they are equal)
            loss, ce, kl, logits = joint_objective(classifier, restore(x_adv),
                                                   restore(x_adv) if denoise is not None else None, rec_adv, y,
                                                   cfg.rep_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        lr_used["classifier_lr"] = opt.param_groups[-1]["lr"]
        if denoiser is not None:
            lr_used["denoiser_lr"] = opt.param_groups[0]["lr"]
        opt.step()
        sched.step()
        return {"loss": loss.detach(), "ce": ce.detach(), "kl": kl.detach(),
                "robust_train_acc": (logits.detach().argmax(1) == y).float().mean()}

    history = trainer.fit(lambda epoch: rank_batches(data, cfg.batch_size, cfg, gen, aug_gen), step,
                          epoch_info=lambda: dict(lr_used)).history
    owner.eval()
    for p in classifier.parameters():
        p.requires_grad_(False)
    return history


def _fit_result(history: list[dict], epochs: int, started: float) -> FitResult:
    main = sorted(h["seconds"] for h in history if h["phase"] == "main")
    return FitResult(seconds=time.perf_counter() - started, seconds_per_epoch=main[len(main) // 2] if main else None,
                     epochs=epochs, history=history)


class _OwnClassifier:
    """A defense that trains its own classifier from scratch: a re-initialised copy of the target's
    architecture (the target's weights are not used), made when the run attaches the target."""

    def attach_classifier(self, classifier: nn.Module) -> None:
        if self.own_classifier is None:
            self.own_classifier = fresh_copy(classifier, scratch=True)


@dataclass
class JointATOptions:
    """No options: the classifier is the target's architecture."""


@DEFENSES.register("joint-at", paper="control for Zhou et al., ICML 2023 (released code)",
                   description="the released DIR's joint training without its denoiser: AT + KL from scratch")
class JointAT(_OwnClassifier, Defense):
    trainable = True
    data_parallel = True
    TrainConfig = JointTrain
    Options = JointATOptions
    note = CONTROL_NOTE

    def __init__(self, **options: Any) -> None:
        super().__init__()
        self.options = self.read_options(options)

    def purify(self, x: torch.Tensor, masks: Any = None) -> torch.Tensor:
        return x

    def fit(self, classifier, train, context: TrainContext, config: JointTrain | None = None) -> FitResult:
        cfg = config or JointTrain()
        self.attach_classifier(classifier)
        started = time.perf_counter()
        torch.manual_seed(context.seed)
        self.seed(context.seed, context.device)
        distributed.broadcast_module(self)
        history = joint_train(self, None, self.own_classifier, train.to(context.device), cfg, context, "joint-AT")
        return _fit_result(history, cfg.epochs, started)


@dataclass
class DIROfficialOptions:
    """The released ``MAE_ViT`` (defaults: the released, at CIFAR size)."""

    image_size: int = 32  # filled from the dataset unless set
    in_channels: int = 3  # filled from the dataset unless set
    patch_size: int = 2  # pixels per patch side
    embed_dim: int = 192  # encoder and decoder width
    depth: int = 8  # encoder blocks
    num_heads: int = 3  # attention heads, encoder and decoder
    mlp_ratio: float = 4.0
    decoder_depth: int = 2  # decoder blocks
    decoder_index_bug: bool = True  # half 2's tokens decoded at half 1's positions, as released

    def validate(self, where: str) -> None:
        for key in ("image_size", "in_channels", "patch_size", "embed_dim", "depth", "num_heads", "decoder_depth"):
            require(getattr(self, key) >= 1, subkey(where, key), f"must be >= 1, got {getattr(self, key)}")
        require(self.image_size % self.patch_size == 0, subkey(where, "image_size"),
                f"{self.image_size} is not divisible by patch_size {self.patch_size}")
        require(self.embed_dim % self.num_heads == 0, subkey(where, "embed_dim"),
                f"{self.embed_dim} is not divisible by num_heads {self.num_heads}")

    def check_shape(self, where: str) -> None:
        """What depends on the data's shape (filled in when the defense is built)."""
        out = self.patch_size ** 2 * self.in_channels
        require(self.embed_dim % out == 0, subkey(where, "embed_dim"),
                f"the token Conv1d head needs embed_dim ({self.embed_dim}) divisible by patch_size^2 * "
                f"in_channels ({out})")
        require(((self.image_size // self.patch_size) ** 2) % 2 == 0, subkey(where, "image_size"),
                "two complementary halves need an even number of patches")


@DEFENSES.register("dir-official", paper="Zhou et al., ICML 2023 (released code)",
                   description="DIR as its released code trains it: the ViT and a classifier from scratch, jointly")
class DIROfficial(_OwnClassifier, DIR):
    version = 1
    TrainConfig = DIROfficialTrain
    Options = DIROfficialOptions
    note = RELEASED_NOTE

    def __init__(self, **options: Any) -> None:
        Defense.__init__(self)  # DIR's constructor reads the paper's options
        o = self.options = self.read_options(options)
        o.check_shape("options")
        self.joint_classifier = True
        self._build(MaskedViT(o.image_size, o.in_channels, o.patch_size, o.embed_dim, o.depth, o.num_heads,
                              o.mlp_ratio, o.embed_dim, o.decoder_depth, o.num_heads, head="token-conv",
                              layout="released"),
                    mask_ratio=0.5, num_masks=2, mask_mode="drop")
        self.decoder_index_bug = o.decoder_index_bug

    def decoder_slots(self, visible: torch.Tensor) -> torch.Tensor:
        """As released, every half is un-shuffled with the first half's indices (the bug), unless
        ``decoder_index_bug`` is off."""
        return visible[:, :1].expand_as(visible) if self.decoder_index_bug else visible

    def restore(self, x: torch.Tensor, masks: torch.Tensor | None = None) -> torch.Tensor:
        """The average of the two halves' restorations, not clipped (as released)."""
        return self.restore_views(x, masks).mean(dim=1)

    def fit(self, classifier, train, context: TrainContext, config: DIROfficialTrain | None = None) -> FitResult:
        cfg = config or DIROfficialTrain()
        self.attach_classifier(classifier)
        device, started = context.device, time.perf_counter()
        distributed.broadcast_module(self)
        data = train.to(device)
        classifier.eval()
        for p in classifier.parameters():
            p.requires_grad_(False)
        torch.manual_seed(context.seed)
        self.seed(context.seed, device)
        history = self._pretrain_cached(classifier, data, cfg, context) if cfg.pretrain_epochs else []
        torch.manual_seed(context.seed + 1)
        self.seed(context.seed + 1, device)
        history += joint_train(self, self.restore, self.own_classifier, data, cfg, context, "DIR-official main",
                               denoiser=(list(self.net.parameters()), cfg.denoiser_lr))
        return _fit_result(history, cfg.epochs, started)

    PRETRAIN_FIELDS = ("pretrain_epochs", "pretrain_batch_size", "pretrain_lr", "pretrain_weight_decay",
                       "pretrain_warmup_fraction", "pretrain_attack_steps", "pretrain_step_size", "pretrain_range",
                       "eps")

    LABEL = "DIR-official"  # its pre-training stage: ``dir-official-pretrain``

    def _pretrain(self, target: nn.Module, data, cfg: DIROfficialTrain, context: TrainContext) -> list[dict]:
        """``pre_training.py``: the fused restoration of fixed adversarial examples against their
        natural images, both in [-1, 1] (``pretrain_range``); AdamW with a per-epoch warm-up and cosine.
        ``data``: the training split on ``context.device``."""
        device, seed = context.device, context.seed
        crafting = PairTrain(eps=cfg.eps, step_size=cfg.pretrain_step_size, attack_steps=cfg.pretrain_attack_steps,
                             bf16=cfg.bf16, progress=False)
        adv = static_pairs(target, data, crafting, device, seed, context.stages).to(device)
        opt = distributed.synchronized(torch.optim.AdamW(
            self.net.parameters(), lr=cfg.pretrain_lr * cfg.pretrain_batch_size / 256, betas=(0.9, 0.95),
            weight_decay=cfg.pretrain_weight_decay))
        per = len(data) // cfg.pretrain_batch_size
        if per == 0:
            raise BenchError(f"DIR-official pre-training: pretrain_batch_size {cfg.pretrain_batch_size} is larger "
                             f"than the training split ({len(data)} images); lower it")
        sched = torch.optim.lr_scheduler.LambdaLR(  # per epoch, stepped per batch
            opt, lambda s: pretrain_lr_factor(s // per, cfg.pretrain_epochs, cfg.pretrain_warmup_fraction))
        trainer = Trainer(self, "DIR-official pretrain", context.part("pretrain"), cfg.pretrain_epochs,
                          optimizers={"adamw": opt}, schedulers={"lr": sched}, gens={"masks": self._gen(device)}, progress=cfg.progress,
                          steps_per_epoch=per, phase="pretrain")
        use_bf16 = cfg.use_bf16(device)
        lr_used: dict[str, float] = {}

        def batches(epoch: int):
            for b in range(per):  # the stored order, the last partial batch dropped
                idx = torch.arange(b * cfg.pretrain_batch_size, (b + 1) * cfg.pretrain_batch_size, device=device)
                idx = idx[distributed.rank_slice(len(idx))]
                yield data.as_float(idx), adv[idx].float().div_(255)

        def pixels(z: torch.Tensor) -> torch.Tensor:
            return z * 2 - 1 if cfg.pretrain_range == "signed" else z

        def step(batch) -> dict[str, torch.Tensor]:
            x, x_adv = batch
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
                fused = self.restore_views(pixels(x_adv)).mean(dim=1)
            loss = (fused.float() - pixels(x)).pow(2).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            lr_used["lr"] = opt.param_groups[0]["lr"]
            opt.step()
            sched.step()
            return {"loss": loss.detach()}

        self.train()
        return trainer.fit(batches, step, epoch_info=lambda: dict(lr_used)).history
