"""The defense contract and the defended model.

A :class:`Defense` is an ``nn.Module`` whose :meth:`purify` maps images in [0,1]
to images in [0,1] of the same shape. It declares, honestly, what an attacker
must know; the runner reads the declarations and builds the adaptive attack:

* ``stochastic``: random at inference (attacks need EOT). The randomness comes
  from ``self.generator`` (a seedable ``torch.Generator``), never from hidden
  global state.
* ``differentiable``: end to end. If not, :meth:`bpda_surrogate` gives the
  function whose gradient stands in (BPDA; the identity by default).
* ``uses_masks``: the defense draws masks; :meth:`sample_masks` draws them and
  ``purify(x, masks=...)`` applies given ones, so an attacker can fix them.
* ``exact_gradient``: :meth:`purify_exact` computes the same purification (same random
  draws) differentiably, however costly: back-propagating through an iterative loop with
  checkpointing (``defenses.unroll``) or through a decomposition (SVD). Attacks with
  ``gradient: exact`` use it instead of the BPDA surrogate.

Training: :meth:`fit` receives the frozen target, the training data (an
``ImageData``), a :class:`TrainContext` (device, seed, the stage store, per-epoch
state and callback) and the validated training options (an instance of the
defense's ``TrainConfig`` dataclass); ``benchmark.trainer.Trainer`` runs an epoch
loop for it. A defense with nothing to learn
sets ``trainable = False``. Bump ``version`` when a change to the code changes
what training produces, so cached artifacts are not reused.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import typing
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
from torch import nn

from benchmark.registry import DEFENSES

if TYPE_CHECKING:
    from benchmark.artifacts import StageStore
    from benchmark.resume import EpochCheckpoint


@dataclass
class TrainContext:
    """What a run hands a defense's training besides the classifier, the data and the defense's own
    training options: the device, the seed, where training stages shared between rows are cached
    (``stages``: DIR's pre-training, the static adversarial pairs), where per-epoch state goes so that
    a killed training resumes (``checkpoint``) and a callback after each epoch (``on_epoch(row)``).
    Outside a run (a script, a test) give the device and the seed: nothing is cached or resumed."""

    device: torch.device
    seed: int = 0
    stages: StageStore | None = None
    checkpoint: EpochCheckpoint | None = None
    on_epoch: Callable[[dict], None] | None = None

    def __post_init__(self) -> None:
        self.device = torch.device(self.device)

    def part(self, name: str) -> TrainContext:
        """The context of one part of a training that has several (DIR's pre-training): the same
        device, seed, stages and callback; its per-epoch state in a subfolder ``name`` of this one's."""
        ckpt = self.checkpoint
        return replace(self, checkpoint=None if ckpt is None else type(ckpt)(ckpt.folder / name, f"{ckpt.key}:{name}"))


@dataclass
class TrainOptions:
    """The run mechanics that the options of a defense's training share (its dataclass of options
    extends this one): augmentation, bf16 autocast (``auto``: on CUDA), ``torch.compile`` of the
    networks being trained, the progress bar."""

    augment: bool = True
    bf16: Literal["auto", True, False] = "auto"
    compile: bool = False  # torch.compile the networks being trained (in place; the first epoch compiles)
    progress: bool = True

    def use_bf16(self, device: torch.device) -> bool:
        return device.type == "cuda" if self.bf16 == "auto" else bool(self.bf16)

    def require_positive(self, where: str, *keys: str) -> None:
        """One-line config errors for options that must be at least 1."""
        from benchmark.config import require, subkey

        for key in keys:
            require(getattr(self, key) >= 1, subkey(where, key), f"must be >= 1, got {getattr(self, key)}")


@dataclass
class FitResult:
    """What a defense's training reports (stored in its checkpoint card)."""

    seconds: float = 0.0
    seconds_per_epoch: float | None = None
    epochs: int = 0
    history: list[dict] | None = None
    stuck: str | None = None  # the Trainer's note when the loss never left its starting value


_SIGNATURE_OPTIONS: dict[type, type] = {}


def _signature_options(cls: type) -> type | None:
    """A dataclass of the keyword parameters of ``cls.__init__`` (names, annotated types, defaults):
    the options of a defense that declares no ``Options`` of its own (a plugin's plain keywords).
    None when the constructor takes ``**kwargs``: its options cannot be known before it runs."""
    params = list(inspect.signature(cls.__init__).parameters.values())[1:]
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return None
    if cls not in _SIGNATURE_OPTIONS:
        try:
            hints = typing.get_type_hints(cls.__init__)
        except Exception:  # an annotation that cannot be resolved here: the value goes unchecked
            hints = {}
        fields = []
        for param in params:
            if param.kind is param.VAR_POSITIONAL:
                continue
            if param.default is param.empty:
                fields.append((param.name, hints.get(param.name, Any)))
            else:
                fields.append((param.name, hints.get(param.name, Any),
                               dataclasses.field(default_factory=lambda d=param.default: copy.deepcopy(d))))
        _SIGNATURE_OPTIONS[cls] = dataclasses.make_dataclass(f"{cls.__name__}Options", fields, kw_only=True)
    return _SIGNATURE_OPTIONS[cls]


class Defense(nn.Module):
    """Base class of every purification defense.

    Its constructor options are a dataclass, ``Options`` (with ``validate(where)`` for their
    values), read from a config's ``options`` once, at the edge, without building anything:
    :meth:`read_options`. A defense that declares none takes its constructor's keywords."""

    Options: ClassVar[type | None] = None

    stochastic: ClassVar[bool] = False
    differentiable: ClassVar[bool] = True
    uses_masks: ClassVar[bool] = False
    trainable: ClassVar[bool] = False
    version: ClassVar[int] = 1
    TrainConfig: ClassVar[type | None] = None
    # Constructor options that only change inference; the trained artifact is shared across them.
    inference_options: ClassVar[tuple[str, ...]] = ()
    # Differentiable, but exact gradients are impractical (an iterative inner loop): adaptive
    # attacks use the BPDA surrogate unless told otherwise.
    prefers_bpda: ClassVar[bool] = False
    # purify_exact gives exact gradients (of the draw's randomness held fixed) where BPDA is the default
    exact_gradient: ClassVar[bool] = False
    # Under torchrun every rank runs fit() at once, each on its part of every batch, with gradients
    # averaged (benchmark.distributed.synchronized); otherwise rank 0 trains alone.
    data_parallel: ClassVar[bool] = False

    @property
    def own_classifier(self) -> nn.Module | None:
        """A defense that retrains the classifier on its own outputs (ME-Net) registers a copy of
        the target as the submodule ``own_classifier`` (in ``attach_classifier``); the defended
        model then uses it instead of the shared target."""
        return self._modules.get("own_classifier")

    def __init__(self) -> None:
        super().__init__()
        self.generator: torch.Generator | None = None

    # -- inference ----------------------------------------------------------------------
    def purify(self, x: torch.Tensor, masks: Any = None) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.purify(x)

    def purify_exact(self, x: torch.Tensor, masks: Any = None) -> torch.Tensor:
        """:meth:`purify` with exact gradients (declared by ``exact_gradient``): the same forward
        result for the same random draws, differentiable end to end."""
        raise NotImplementedError(f"{type(self).__name__} does not declare exact gradients")

    def bpda_surrogate(self, x: torch.Tensor) -> torch.Tensor:
        """Differentiable stand-in for :meth:`purify` on the backward pass (BPDA)."""
        return x

    def sample_masks(self, x: torch.Tensor) -> Any:
        """Draw the masks the next ``purify(x)`` would use (only if ``uses_masks``)."""
        raise NotImplementedError(f"{type(self).__name__} does not use masks")

    # -- speed --------------------------------------------------------------------------
    def compile_modules(self, training: bool = False) -> list[nn.Module]:
        """The networks ``compile`` (the attack engine's, or a defense's ``train: {compile: true}``)
        compiles in place with torch.compile; ``training``: also those used only in training
        (critics). Default: the denoiser ``net`` if the defense has one."""
        net = self._modules.get("net")
        return [net] if net is not None else []

    # -- randomness ---------------------------------------------------------------------
    def seed(self, seed: int, device: torch.device | str | None = None) -> None:
        """(Re)seed the defense's own generator (stochastic defenses only draw from it)."""
        dev = torch.device(device) if device is not None else self._device()
        self.generator = torch.Generator(device=dev).manual_seed(int(seed))

    def _device(self) -> torch.device:
        for t in list(self.parameters()) + list(self.buffers()):
            return t.device
        return torch.device("cpu")

    def _gen(self, device: torch.device) -> torch.Generator:
        """The defense's generator on ``device`` (seeded from the global generator if it has none there).
        A bare ``cuda`` means the current GPU, as a generator's device says it (``cuda:0``)."""
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        if self.generator is None or self.generator.device != device:
            self.seed(int(torch.randint(0, 2**31 - 1, (1,))), device)
        return self.generator

    # -- training -----------------------------------------------------------------------
    def fit(self, classifier: nn.Module, train, context: TrainContext, config: Any = None) -> FitResult:
        """Train the defense against the frozen ``classifier`` on ``train`` (an ImageData), on
        ``context.device`` from ``context.seed``, with its training options ``config``."""
        return FitResult()

    @classmethod
    def options_type(cls) -> type | None:
        """The dataclass of this defense's constructor options (None: a constructor with ``**kwargs``
        and no ``Options``, whose options are checked only when it runs)."""
        return cls.Options if cls.Options is not None else _signature_options(cls)

    @classmethod
    def read_options(cls, options: dict | None, where: str = "options") -> Any:
        """``options`` checked (unknown or missing keys, types, values) into :meth:`options_type`:
        one-line errors naming ``where`` and the key. Unchecked (a dict) without an options type."""
        from benchmark.config import from_dict

        kind = cls.options_type()
        return dict(options or {}) if kind is None else from_dict(kind, options or {}, where)

    def config(self) -> dict:
        """The options that built this defense (its ``options``, set by a constructor that reads them)."""
        opts = getattr(self, "options", None)
        return dataclasses.asdict(opts) if dataclasses.is_dataclass(opts) else {}

    @classmethod
    def stochastic_with(cls, options: dict) -> bool:
        """Whether a defense built with these constructor options is stochastic, without building it
        (a defense whose ``stochastic`` depends on its options overrides this)."""
        for klass in cls.__mro__:  # a property (decided per instance) counts as stochastic
            if "stochastic" in klass.__dict__:
                declared = klass.__dict__["stochastic"]
                return True if isinstance(declared, property) else bool(declared)
        return False

    @classmethod
    def batch_dependent_with(cls, options: dict) -> bool:
        """Whether a defense built with these options purifies an image differently depending on the
        batch's other images (batch statistics at inference): the evaluation batch size is then part
        of a cell's identity, and attacks that re-batch survivors are refused."""
        return False

    def declarations(self) -> dict:
        out = {
            "stochastic": self.stochastic,
            "differentiable": self.differentiable,
            "uses_masks": self.uses_masks,
            "trainable": self.trainable,
        }
        if self.prefers_bpda:
            out["prefers_bpda"] = True
        if self.exact_gradient:
            out["exact_gradient"] = True
        if self.own_classifier is not None:
            out["own_classifier"] = True
        return out


def reinitialise(module: nn.Module) -> None:
    """Fresh weights for every submodule that can reset its parameters (only the architecture stays)."""
    for m in module.modules():
        if m is not module and hasattr(m, "reset_parameters"):
            m.reset_parameters()


def fresh_copy(classifier: nn.Module, scratch: bool = False) -> nn.Module:
    """A frozen copy of ``classifier`` for a defense that trains its own (``own_classifier``);
    ``scratch``: re-initialised, so that only the architecture is the original's."""
    out = copy.deepcopy(classifier)
    if scratch:
        reinitialise(out)
    for p in out.parameters():
        p.requires_grad_(False)
    return out


@dataclass
class NoOptions:
    """A defense without options."""


@DEFENSES.register("none", paper="(the target model alone)", description="no defense: the identity")
class NoDefense(Defense):
    """The target model alone."""

    Options = NoOptions

    def __init__(self, **options: Any) -> None:
        super().__init__()
        self.options = self.read_options(options, "defense 'none'")

    def purify(self, x: torch.Tensor, masks: Any = None) -> torch.Tensor:
        return x


class DefendedModel(nn.Module):
    """``classifier(defense.purify(x))`` for images ``x`` in [0,1]: what every attack sees.

    ``bpda=True`` keeps the forward pass exact but routes gradients through the
    defense's ``bpda_surrogate`` (forced on for non-differentiable defenses by the
    runner). ``masks`` fixes the masks of a mask-using defense (the attacker knows them).
    ``exact=True`` (a defense that declares ``exact_gradient``) differentiates the purification
    itself (``purify_exact``) instead of the surrogate. Parameters are frozen: attacks take
    gradients with respect to the input only.
    """

    def __init__(self, defense: Defense, classifier: nn.Module, *, bpda: bool = False) -> None:
        super().__init__()
        self.defense = defense
        self.classifier = classifier
        self.bpda = bpda
        self.exact = False
        self.masks: Any = None
        self.fixed_seed: int | None = None
        self.eval()
        for p in self.parameters():
            p.requires_grad_(False)

    @classmethod
    def for_defense(cls, defense: Defense, target: nn.Module) -> DefendedModel:
        """The defended model the declarations ask for: the defense's own classifier if it has one
        (ME-Net), else the target; BPDA for non-differentiable or ``prefers_bpda`` defenses."""
        own = defense.own_classifier
        return cls(defense, own if own is not None else target,
                   bpda=not defense.differentiable or defense.prefers_bpda)

    def purify(self, x: torch.Tensor) -> torch.Tensor:
        if self.exact and torch.is_grad_enabled() and x.requires_grad:
            return self.defense.purify_exact(x, masks=self.masks)
        if self.bpda and torch.is_grad_enabled() and x.requires_grad:
            with torch.no_grad():
                purified = self.defense.purify(x, masks=self.masks)
            surrogate = self.defense.bpda_surrogate(x)
            return surrogate + (purified - surrogate).detach()
        out = self.defense.purify(x, masks=self.masks)
        if torch.is_grad_enabled() and x.requires_grad and not out.requires_grad:
            # No BPDA asked for a defense whose output carries no gradient (non-differentiable, or
            # an inner loop it detaches): the honest gradient is zero (what a naive white-box
            # attack sees), not an error.
            out = out + 0 * x
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fixed_seed is not None:  # every pass draws the same randomness
            self.defense.seed(self.fixed_seed, x.device)
        k = int(getattr(self.defense, "chains", 1) or 1)
        if torch.is_grad_enabled() and x.requires_grad and self.fixed_seed is None:
            # an attack's gradient pass (EBM: attack_chains); with the randomness fixed, the attack
            # must see the very function that is scored: the same chains, so the same draws
            k = int(getattr(self.defense, "attack_chains", k) or k)
        if k == 1:
            return self.classifier(self.purify(x))
        # A defense that purifies each input along k parallel chains (EBM): classify every chain's
        # output and average the logits; with BPDA the gradient reaches x through each chain.
        logits = self.classifier(self.purify(x.repeat_interleave(k, dim=0)))
        return logits.view(len(x), k, -1).mean(dim=1)

    def train(self, mode: bool = True) -> DefendedModel:
        # Attacks and evaluation never switch BN/dropout to training mode.
        return super().train(False)

    @property
    def stochastic(self) -> bool:
        return self.defense.stochastic and self.masks is None and self.fixed_seed is None

    @contextmanager
    def fixed_masks(self, masks: Any):
        """Run the block with the defense's masks fixed to ``masks`` (an attacker who knows them)."""
        saved, self.masks = self.masks, masks
        try:
            yield self
        finally:
            self.masks = saved

    @contextmanager
    def fixed_randomness(self, seed: int):
        """Run the block with the defense's randomness frozen: every forward pass (of the attack and
        of the scoring) reseeds it to ``seed`` (the "deterministic white-box" protocol)."""
        saved, self.fixed_seed = self.fixed_seed, int(seed)
        try:
            yield self
        finally:
            self.fixed_seed = saved

    @contextmanager
    def gradients(self, *, bpda: bool | None = None, exact: bool | None = None):
        """Run the block with BPDA and/or exact gradients switched as given (None: unchanged), and as
        before afterwards. Exact gradients take precedence over BPDA (``purify`` checks them first);
        BPDA that the declarations force is never switched off."""
        saved = (self.bpda, self.exact)
        if exact is not None:
            if exact and not self.defense.exact_gradient:
                raise ValueError(f"{type(self.defense).__name__} does not declare exact gradients")
            self.exact = exact
        if bpda is not None:  # a BPDA the declarations force (non-differentiable, prefers_bpda) stays
            self.bpda = bpda or saved[0]
        try:
            yield self
        finally:
            self.bpda, self.exact = saved


@contextmanager
def compiled(modules: list[nn.Module], enabled: bool = True):
    """Run the block with ``modules`` compiled in place (``nn.Module.compile``: parameters, state-dict
    names and train/eval mode unchanged), and eager again afterwards."""
    if not enabled or not modules:
        yield
        return
    for m in modules:
        m.compile()
    try:
        yield
    finally:
        for m in modules:  # nn.Module.compile stores the compiled call here; None is the eager call
            m._compiled_call_impl = None
