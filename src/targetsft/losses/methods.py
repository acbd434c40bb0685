"""The registry of named methods: each is a label-trust rule and a residual, ``Q = γ·onehot(y) + (1 − γ)·π̃``.

``METHODS[name]`` is a :class:`MethodSpec` with its parameters, their defaults and checks, and the row of the
paper's table it implements (arXiv 2606.11189, "A Unifying Lens on Supervised Fine-Tuning Through Target
Distribution Design"). New methods can be registered with :func:`register_method`, or built directly from the
rules in :mod:`targetsft.functional` and passed to the losses as a :class:`~targetsft.losses.target.Target`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from targetsft.losses import residual as R
from targetsft.losses import trust as T
from targetsft.losses.target import Target


@dataclass(frozen=True)
class Param:
    """One parameter of a method: its default, a one-line meaning and a range check."""

    default: Any
    doc: str
    check: Callable[[Any], bool] = lambda v: True
    expect: str = ""

    def validate(self, method: str, name: str, value: Any) -> Any:
        if isinstance(self.default, bool):
            if not isinstance(value, bool):
                raise TypeError(f"{method}: parameter {name!r} must be a bool, got {value!r}")
        elif isinstance(self.default, (int, float)) and not isinstance(self.default, bool):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"{method}: parameter {name!r} must be a number, got {value!r}")
            value = type(self.default)(value) if isinstance(self.default, float) else value
        if not self.check(value):
            raise ValueError(f"{method}: parameter {name!r} must be {self.expect}, got {value!r}")
        return value


REF_MODELS = ("frozen", "snapshot")


@dataclass(frozen=True)
class MethodSpec:
    """A named method: ``build(**params) -> Target`` and the description of ``γ`` and ``π̃``.

    What the trainer owes a method beyond its loss is declared here, not looked up by name. ``ref_model``: the
    reference a method that needs one (``"ref"`` in :attr:`needs`) is given: ``"frozen"``, π_ref, ``reference.model``
    or a frozen copy of the initial student; ``"snapshot"``, π_old, a copy of the student (its LoRA adapters included)
    that takes the trained weights right before every ``refresh``-th optimizer step (``refresh`` is then one of
    ``trainer_params``). ``trainer_params``: parameters the trainer reads and the loss does not; a training config
    sets them in ``loss.params`` beside the loss's own.
    """

    name: str
    gamma: str
    residual: str
    reference: str
    build: Callable[..., Target]
    params: Mapping[str, Param]
    summary: str
    ref_model: str = "frozen"
    trainer_params: Mapping[str, Param] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.ref_model not in REF_MODELS:
            raise ValueError(f"{self.name}: ref_model must be one of {REF_MODELS}, got {self.ref_model!r}")
        if self.ref_model == "snapshot" and "refresh" not in self.trainer_params:
            raise ValueError(f"{self.name}: a snapshot reference needs a 'refresh' trainer parameter")
        both = sorted(set(self.params) & set(self.trainer_params))
        if both:
            raise ValueError(f"{self.name}: {both} are both loss and trainer parameters")

    @property
    def all_params(self) -> dict[str, Param]:
        """Every parameter a training config's ``loss.params`` may set: the loss's, then the trainer's."""
        return {**self.params, **self.trainer_params}

    @property
    def defaults(self) -> dict[str, Any]:
        """The default of every parameter, the loss's and then the trainer's."""
        return {k: p.default for k, p in self.all_params.items()}

    @property
    def needs(self) -> frozenset[str]:
        return self.build(**{k: p.default for k, p in self.params.items()}).needs

    def target(self, **params: Any) -> Target:
        """Validate ``params`` against this method's loss parameters and build its :class:`Target`."""
        unknown = sorted(set(params) - set(self.params))
        if unknown:
            valid = ", ".join(self.params) or "none"
            if self.trainer_params:
                valid += f" (and, read by the trainer from a config's loss.params: {', '.join(self.trainer_params)})"
            raise ValueError(f"unknown parameter(s) {unknown} for method {self.name!r}; valid: {valid}")
        values = {k: p.default for k, p in self.params.items()}
        for k, v in params.items():
            values[k] = self.params[k].validate(self.name, k, v)
        return self.build(**values)

    def split_params(self, params: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """A training config's ``loss.params`` as (the loss's, as given; the trainer's, checked, defaults filled
        in)."""
        if not isinstance(params, Mapping):
            raise TypeError(f"{self.name}: parameters must be a mapping, got {params!r}")
        loss = {k: v for k, v in params.items() if k not in self.trainer_params}
        trainer = {k: p.default for k, p in self.trainer_params.items()}
        for k, v in params.items():
            if k in self.trainer_params:
                trainer[k] = self.trainer_params[k].validate(self.name, k, v)
        return loss, trainer

    @property
    def doc(self) -> str:
        lines = [f"{self.name}: γ = {self.gamma}; π̃ = {self.residual}  [{self.reference}]", f"  {self.summary}"]
        for k, p in self.all_params.items():
            lines.append(f"  {k} = {p.default!r}: {p.doc}")
        return "\n".join(lines)


METHODS: dict[str, MethodSpec] = {}


def register_method(spec: MethodSpec, *, overwrite: bool = False) -> MethodSpec:
    """Add a method to :data:`METHODS` so that it can be selected by name everywhere (losses, YAML, CLI)."""
    if spec.name in METHODS and not overwrite:
        raise ValueError(f"method {spec.name!r} is already registered")
    METHODS[spec.name] = spec
    return spec


def get_method(name: str) -> MethodSpec:
    try:
        return METHODS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown method {name!r}; valid methods: {', '.join(METHODS)}") from None


def resolve_target(method: str | Target, params: Mapping[str, Any]) -> Target:
    """A :class:`Target` from a registered name plus parameters, or a ready Target (then no parameters)."""
    if isinstance(method, Target):
        if params:
            raise ValueError(f"parameters {sorted(params)} given with a ready Target; set them on its rules instead")
        return method
    return get_method(method).target(**params)


def _unit(v: float) -> bool:
    return 0.0 <= v <= 1.0


def _positive(v: float) -> bool:
    return v > 0.0


def _nonneg(v: float) -> bool:
    return v >= 0.0


def _tail(v: str) -> bool:
    return v in R.TAILS


_EPSILON = Param(0.1, "mass spread uniformly over the vocabulary", _unit, "in [0, 1]")
_LAM_KL = Param(0.1, "weight λ of the KL(π_ref ‖ π_θ) anchor", _nonneg, ">= 0")
_LAM_MIX = Param(0.5, "share λ of the target given to the teacher", _unit, "in [0, 1]")
_TEMP = Param(1.0, "temperature of the teacher's softmax (the student stays at 1)", _positive, "> 0")
_TAIL = Param(
    "student", "top-k teacher completion: 'student' (tail ∝ π_θ) or 'renormalize'", _tail, "'student' or 'renormalize'"
)
_EXCLUDE = Param(False, "remove the label's own share from π̃ before mixing")
_SCALE = Param(
    "target",
    "'target' gives ∂ℓ/∂z = p − Q; 'original' multiplies by the original loss's per-token scale",
    lambda v: v in ("target", "original"),
    "'target' or 'original'",
)


def _spec(name: str, gamma: str, residual: str, reference: str, summary: str, params: dict[str, Param], **trainer: Any):
    """Register the decorated ``build`` as method ``name``; ``trainer``: :class:`MethodSpec`'s ``ref_model`` and
    ``trainer_params``."""

    def decorator(build: Callable[..., Target]) -> Callable[..., Target]:
        register_method(MethodSpec(name, gamma, residual, reference, build, params, summary, **trainer))
        return build

    return decorator


@_spec("sft", "1", "—", "standard SFT", "Cross-entropy on the one-hot label: ℓ = −log p_θ(y).", {})
def _sft() -> Target:
    return Target(trust=T.Constant(1.0))


@_spec(
    "label_smoothing",
    "1 − ε",
    "Unif(V)",
    "Szegedy et al. 2016; paper table",
    "Equals F.cross_entropy(label_smoothing=ε).",
    {"epsilon": _EPSILON},
)
def _label_smoothing(epsilon: float) -> Target:
    return Target(trust=T.Constant(1.0 - epsilon), residual=R.Uniform())


@_spec(
    "dft",
    "sg p_θ(y)",
    "sg π_θ",
    "DFT, arXiv 2508.05629",
    "Gradient p_y·(p − onehot): DFT's loss −sg(p_y)·log p_y. Target-SFT at η = 0.",
    {"exclude_label": _EXCLUDE},
)
def _dft(exclude_label: bool) -> Target:
    return Target(trust=T.LabelProb(1.0), residual=R.Self(), exclude_label=exclude_label)


@_spec(
    "beyond_log",
    "sg p_θ(y)^α",
    "sg π_θ",
    "Beyond log-likelihood, arXiv 2510.00526",
    "Gradient of ℓ = (1 − p_y^α)/α. α → 0 is SFT, α = 1 is DFT; the default 0.5 sits between.",
    {"alpha": Param(0.5, "exponent α of the probability weight", _positive, "> 0")},
)
def _beyond_log(alpha: float) -> Target:
    return Target(trust=T.LabelProb(alpha), residual=R.Self())


@_spec(
    "profit",
    "1{sg p_θ(y) > τ}",
    "sg π_θ",
    "ProFiT, arXiv 2601.09195",
    "Trains only tokens the model already gives probability above τ; the others get no update (Q = p).",
    {"tau": Param(0.1, "probability threshold τ", _unit, "in [0, 1]")},
)
def _profit(tau: float) -> Target:
    return Target(trust=T.Threshold(tau), residual=R.Self())


@_spec(
    "eaft",
    "(H(top-k p_θ)/log k)^α",
    "sg π_θ",
    "EAFT, arXiv 2601.02151",
    "γ = normalised entropy of the student's renormalised top-k distribution, to the power α: tokens the model "
    "is confidently wrong about (low entropy) get little label trust. k = 20 and α = 1 follow LLaMA-Factory.",
    {
        "k": Param(
            20, "number of top tokens whose entropy is measured", lambda v: int(v) == v and v >= 2, "an integer >= 2"
        ),
        "alpha": Param(1.0, "exponent α", _positive, "> 0"),
    },
)
def _eaft(k: int, alpha: float) -> Target:
    return Target(trust=T.TopkEntropy(int(k), alpha), residual=R.Self())


@_spec(
    "critical",
    "1{y critical}",
    "sg π_θ",
    "Critical-token fine-tuning, arXiv 2510.10974",
    "Pass token_weights as a 0/1 mask of critical tokens; other tokens get no update (Q = p).",
    {},
)
def _critical() -> Target:
    return Target(trust=T.TokenWeights(binary=True), residual=R.Self())


@_spec(
    "weighted",
    "token_weights",
    "sg π_θ",
    "iw-SFT, arXiv 2507.12856",
    "γ_t = token_weights[t] ∈ [0, 1] (e.g. a trajectory importance weight broadcast over its tokens): "
    "gradient w_t·(p − onehot).",
    {},
)
def _weighted() -> Target:
    return Target(trust=T.TokenWeights(), residual=R.Self())


@_spec(
    "asft",
    "p_θ(y)/(p_θ(y) + λ)",
    "π_ref",
    "ASFT, arXiv 2509.23753",
    "DFT plus λ·KL(π_ref ‖ π_θ). Its gradient is (p_y + λ)·(p − Q); scale='target' (default) drops that "
    "per-token factor so that ∂ℓ/∂z = p − Q, scale='original' keeps it.",
    {"lam": _LAM_KL, "scale": _SCALE, "tail": _TAIL},
)
def _asft(lam: float, scale: str, tail: str) -> Target:
    return Target(
        trust=T.Ratio(lam),
        residual=R.Reference(tail),
        scale=T.LabelProbPlus(lam) if scale == "original" else None,
    )


@_spec(
    "sft_kl",
    "1/(1 + λ)",
    "π_ref",
    "SFT + KL, arXiv 2509.04259",
    "−log p_y + λ·KL(π_ref ‖ π_θ) = (1 + λ)·CE(Q, p) + const; scale='target' (default) divides by 1 + λ.",
    {"lam": _LAM_KL, "scale": _SCALE, "tail": _TAIL},
)
def _sft_kl(lam: float, scale: str, tail: str) -> Target:
    return Target(
        trust=T.Constant(1.0 / (1.0 + lam)),
        residual=R.Reference(tail),
        scale=T.Constant(1.0 + lam) if scale == "original" else None,
    )


@_spec(
    "proximal_sft",
    "1{r ≤ 1 + ε}, r = p_θ(y)/π_old(y)",
    "sg π_θ",
    "Proximal SFT, arXiv 2508.17784",
    "ℓ = −min(r, clip(r, 1 − ε, 1 + ε)) with π_old the policy before the update (give it as the reference: "
    "ref_logits; the trainer snapshots the student every `refresh` optimizer steps). Its gradient is "
    "r·1{r ≤ 1 + ε}·(p − onehot): a token past the trust region gets no update (Q = p), the others SFT's target "
    "scaled by r. scale='target' (default) drops the factor r so that ∂ℓ/∂z = p − Q; scale='original' keeps it "
    "(exactly the paper's gradient). The paper's π̃ = π_old names the anchor; the gradient has no π_old term.",
    {"epsilon": Param(0.2, "clip range ε of the ratio r", _positive, "> 0"), "scale": _SCALE},
    ref_model="snapshot",  # π_old: the student, copied every `refresh` optimizer steps
    trainer_params={
        "refresh": Param(
            1, "optimizer steps between snapshots of π_old (trainer)", lambda v: int(v) == v >= 1, "an integer >= 1"
        )
    },
)
def _proximal_sft(epsilon: float, scale: str) -> Target:
    return Target(trust=T.ClipRatio(epsilon), residual=R.Self(), scale=T.RefRatio() if scale == "original" else None)


@_spec(
    "gem",
    "0 (GEM's label and negative weights are both 1)",
    "signed: onehot(y) + sg π_θ − q, q ∝ sg π_θ^(1/β)",
    "GEM, arXiv 2408.16673",
    "ℓ = CE(onehot(y), π_θ) − CE(q, π_θ): its logit gradient is q − onehot(y), so Q = onehot(y) + p − q. That Q sums "
    "to 1 but is signed (negative where the sharpened q exceeds p); it is stored as γ = 0 with that signed residual, "
    "so the logged γ is 0, Q(label) = 1 + p_y − q_y and H(π̃) is not defined (NaN). The loss value is CE(Q, p) = "
    "GEM's loss + H(sg π_θ), the same gradient. β = 0.7 as in the authors' Llama-3 training script (linear h only).",
    {"beta": Param(0.7, "temperature β of the sharpened student q (β < 1 sharpens)", _positive, "> 0")},
)
def _gem(beta: float) -> Target:
    return Target(trust=T.Constant(0.0), residual=R.Entropic(beta))


@_spec(
    "kd",
    "0",
    "π_T at temperature T",
    "Hinton et al. 2015 (arXiv 1503.02531)",
    "Cross-entropy to the teacher = KL(π_T ‖ π_θ) + H(π_T). The temperature applies to the teacher only.",
    {"temperature": _TEMP, "tail": _TAIL},
)
def _kd(temperature: float, tail: str) -> Target:
    return Target(trust=T.Constant(0.0), residual=R.Teacher(temperature, tail))


@_spec(
    "hybrid_kd",
    "1 − λ",
    "π_T at temperature T",
    "distillation mixed with SFT; paper table",
    "(1 − λ)·(−log p_y) + λ·CE(π_T, p).",
    {"lam": _LAM_MIX, "temperature": _TEMP, "tail": _TAIL},
)
def _hybrid_kd(lam: float, temperature: float, tail: str) -> Target:
    return Target(trust=T.Constant(1.0 - lam), residual=R.Teacher(temperature, tail))


@_spec(
    "target_sft",
    "sg p_θ(y)",
    "∝ π_θ^(1−η)·π_T^η",
    "Target-SFT, arXiv 2606.11189",
    "Q = p_y·onehot(y) + (1 − p_y)·π̃: trusted tokens get the label, uncertain ones the teacher-guided "
    "residual. η = 0 is DFT exactly, η = 1 confidence-weighted distillation. The paper gives no default η; 0.5 "
    "weighs student and teacher equally. π̃ keeps the label (as on the paper's page) unless exclude_label.",
    {
        "eta": Param(0.5, "teacher intensity η", _unit, "in [0, 1]"),
        "temperature": _TEMP,
        "tail": _TAIL,
        "exclude_label": _EXCLUDE,
    },
)
def _target_sft(eta: float, temperature: float, tail: str, exclude_label: bool) -> Target:
    return Target(trust=T.LabelProb(1.0), residual=R.Guided(eta, temperature, tail), exclude_label=exclude_label)


# The four cells of the label-trust × residual grid that no earlier method occupies (used by the ablation).
@_spec(
    "confidence_smoothing",
    "sg p_θ(y)",
    "Unif(V)",
    "this library (γ of DFT, π̃ of label smoothing)",
    "Uncertain tokens are smoothed toward uniform instead of toward the model itself.",
    {},
)
def _confidence_smoothing() -> Target:
    return Target(trust=T.LabelProb(1.0), residual=R.Uniform())


@_spec(
    "self_smoothing",
    "1 − λ",
    "sg π_θ",
    "this library (fixed γ, π̃ of DFT)",
    "A fixed share λ of the target is the model's own distribution: gradient (1 − λ)·(p − onehot).",
    {"lam": Param(0.5, "share λ of the target given to the model's own distribution", _unit, "in [0, 1]")},
)
def _self_smoothing(lam: float) -> Target:
    return Target(trust=T.Constant(1.0 - lam), residual=R.Self())


@_spec(
    "confidence_kd",
    "sg p_θ(y)",
    "π_T",
    "this library (Target-SFT at η = 1)",
    "Confidence-weighted distillation: the teacher fills exactly the mass the model does not put on y.",
    {"temperature": _TEMP, "tail": _TAIL},
)
def _confidence_kd(temperature: float, tail: str) -> Target:
    return Target(trust=T.LabelProb(1.0), residual=R.Teacher(temperature, tail))


@_spec(
    "guided_kd",
    "1 − λ",
    "∝ π_θ^(1−η)·π_T^η",
    "this library (fixed γ, π̃ of Target-SFT)",
    "Hybrid KD whose soft part is the teacher-guided residual instead of the bare teacher.",
    {
        "lam": _LAM_MIX,
        "eta": Param(0.5, "teacher intensity η", _unit, "in [0, 1]"),
        "temperature": _TEMP,
        "tail": _TAIL,
    },
)
def _guided_kd(lam: float, eta: float, temperature: float, tail: str) -> Target:
    return Target(trust=T.Constant(1.0 - lam), residual=R.Guided(eta, temperature, tail))


def methods_table() -> str:
    """The registry as a markdown table (method, γ, π̃, parameters with defaults, source)."""
    rows = ["| method | γ (label trust) | π̃ (residual) | parameters (default) | source |", "|---|---|---|---|---|"]
    for m in METHODS.values():
        params = ", ".join(f"`{k}={p.default!r}`" for k, p in m.all_params.items()) or "—"
        rows.append(f"| `{m.name}` | {m.gamma} | {m.residual} | {params} | {m.reference} |")
    return "\n".join(rows)
