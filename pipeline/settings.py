"""The settings tree: one frozen dataclass per component, the only place a default is written.

A command composes the sections it needs as keyword parameters (`teacher: TeacherSettings =
TeacherSettings()`), and `pipeline/cli.py` turns each section into nested flags (`--teacher.model X`,
`--train.lr 1e-4`) and config-file sections (`teacher:`, `train:`), as litgpt and torchtune do. The
same section means the same thing in every command that takes it: one `teacher:` serves generate,
classify, instances, the score judge, the eval judge and loop; one `train:` serves train, loop and
federate.

Each class documents its fields in an `Args:` section (the `--help` text and docs/options.md are
written from it) and checks them in `__post_init__`, so a bad value fails before any work, with the
field's dotted name, wherever it came from (flag, config file or code).
"""

from __future__ import annotations

import math
import re
import typing
from dataclasses import asdict, dataclass, fields, is_dataclass
from typing import Any, Literal, get_args, get_type_hints

EMBEDDED = "smollm2-135m-instruct"  # the model shipped in a PyPI wheel: default teacher and student
API_KEY_ENV = "OPENAI_API_KEY"  # where the openai backend looks for the key unless told otherwise
DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


class SettingsError(ValueError):
    """A field of a settings section holds a value it cannot take."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


def _check(ok: bool, field: str, message: str) -> None:
    if not ok:
        raise SettingsError(field, message)


def _finite(obj: Any) -> None:
    """Every float field is a real number: NaN and infinity pass every `<` test, so refuse them first."""
    for f in fields(obj):
        v = getattr(obj, f.name)
        if isinstance(v, float):
            _check(math.isfinite(v), f.name, f"must be a finite number, got {v}")


def _fraction(obj: Any, name: str, *, low_open: bool = False, high_open: bool = False) -> None:
    v = getattr(obj, name)
    ok = (v > 0 if low_open else v >= 0) and (v < 1 if high_open else v <= 1)
    _check(ok, name, f"must be in {'(' if low_open else '['}0, 1{')' if high_open else ']'}, got {v}")


def _positive(obj: Any, *names: str) -> None:
    for name in names:
        _check(getattr(obj, name) >= 1, name, f"must be at least 1, got {getattr(obj, name)}")


def _not_negative(obj: Any, *names: str) -> None:
    for name in names:
        _check(getattr(obj, name) >= 0, name, f"must be >= 0, got {getattr(obj, name)}")


@dataclass(frozen=True)
class TeacherSettings:
    """The teacher: the model that writes, classifies, completes, judges and augments.

    Args:
        model: The embedded alias, a local folder, a .gguf file, a Hub id, or a served model name.
        backend: transformers (in-process), vllm (GPU) or openai (any OpenAI-compatible server).
        base_url: Server URL for the openai backend, e.g. http://localhost:8000/v1.
        api_key_env: Environment variable holding the API key (the key is never logged).
        options: The backend's own settings as comma-separated key=value pairs, e.g.
            "timeout=300,max_retries=10" (openai), "engine=hf" or "device=cuda" (transformers).
        pool: Several teachers instead of model: a teachers file (YAML/TOML: name, model, backend,
            options, share) or comma-separated models, each optionally =share; requests are spread by
            share (docs/teachers.md). Entries without a backend use this section's.
    """

    model: str = EMBEDDED
    backend: Literal["transformers", "vllm", "openai"] = "transformers"
    base_url: str | None = None
    api_key_env: str = API_KEY_ENV
    options: str | None = None
    pool: str | None = None

    def __post_init__(self) -> None:
        _check(bool(self.model.strip()), "model", "must not be empty")
        _check(bool(re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", self.api_key_env)), "api_key_env",
               f"must be an environment variable name, got {self.api_key_env!r}")


@dataclass(frozen=True)
class StudentSettings:
    """The student: the small model that is scored against, trained, evaluated and sampled.

    Args:
        model: Base model: the embedded alias, a local folder, a .gguf file or a Hub id.
        device: Where every model of the student side runs (scoring, training, distillation's teacher,
            evaluation, sampling, merging, federated clients): auto (CUDA when torch sees a GPU, else the
            CPU; the choice is printed once), cpu, cuda, cuda:N or mps.
        dtype: Weights' precision for scoring, evaluation and sampling: auto (bf16 where the hardware
            has it), bfloat16, float16 or float32.
    """

    model: str = EMBEDDED
    device: str = "auto"
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"

    def __post_init__(self) -> None:
        _check(bool(self.model.strip()), "model", "must not be empty")
        _check(bool(DEVICE.match(self.device)), "device",
               f"expected auto, cpu, cuda, cuda:N or mps, got {self.device!r}")


def _one_of(obj: Any, *names: str) -> None:
    """Literal fields hold one of their choices also when the section is built in code (the command
    line and config files already offer only those)."""
    hints = get_type_hints(type(obj))
    for name in names:
        choices = get_args(hints[name])
        _check(getattr(obj, name) in choices, name,
               f"use one of {', '.join(map(str, choices))}, got {getattr(obj, name)!r}")


@dataclass(frozen=True)
class LoraSettings:
    """The LoRA adapter trained on the student (all linear layers by default, as QLoRA found best).

    Args:
        r: LoRA rank.
        alpha: Scaling numerator (alpha / r scales the update); twice the rank is usual.
        dropout: Dropout on the LoRA input.
        target_modules: Layers that get adapters: all-linear, or comma-separated names (q_proj,v_proj).
        qlora: Load the base in 4-bit NF4 (bitsandbytes, CUDA only); merge later into a full-precision base.
    """

    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: str = "all-linear"
    qlora: bool = False

    def __post_init__(self) -> None:
        _finite(self)
        _positive(self, "r", "alpha")
        _fraction(self, "dropout", high_open=True)
        _check(bool(self.target_modules.strip(", ")), "target_modules", "must name at least one layer")


@dataclass(frozen=True)
class TrainSettings:
    """Supervised fine-tuning of the student: loss on the answers only, cosine schedule, checkpoints.

    Args:
        epochs: Passes over the training data (fractions allowed).
        lr: Peak learning rate (cosine schedule after a linear warmup; constant within a federated round).
        max_length: Longest example in tokens, prompt plus answer; also the packed row length.
        batch_size: Examples per device per forward pass (packed: rows, sized to match).
        grad_accum: Forward passes per optimizer step; batch_size * grad_accum should stay <= 32.
        max_steps: Stop after this many optimizer steps (-1: run all epochs).
        warmup_ratio: Share of steps spent warming the learning rate up.
        packing: Pack examples into rows (they cannot attend to each other); off: length grouping.
        overlong: Examples over max_length: drop (counted), truncate (counted; their EOS is lost) or error.
        precision: auto (bf16 where the hardware has it, fp16 on older GPUs), bf16, fp16 or fp32.
        gradient_checkpointing: Trade compute for memory (non-reentrant, works with frozen embeddings).
        template: auto (the tokenizer's chat template if it has one, else Alpaca's), chat or alpaca.
        eval_steps: Evaluate loss and token accuracy on the validation split every this many steps.
        save_steps: Save a checkpoint every this many steps (the last two are kept).
        logging_steps: Log train loss every this many steps.
        resume: Continue from the latest complete checkpoint in runs/<run>/student/checkpoints/.
        seed: Seed for LoRA initialisation and data order.
    """

    epochs: float = 3.0
    lr: float = 2e-4
    max_length: int = 512
    batch_size: int = 8
    grad_accum: int = 4
    max_steps: int = -1
    warmup_ratio: float = 0.03
    packing: bool = True
    overlong: Literal["drop", "truncate", "error"] = "drop"
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    gradient_checkpointing: bool = False
    template: Literal["auto", "chat", "alpaca"] = "auto"
    eval_steps: int = 50
    save_steps: int = 50
    logging_steps: int = 5
    resume: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        _finite(self)
        _check(self.epochs > 0, "epochs", f"must be > 0, got {self.epochs}")
        _check(self.lr > 0, "lr", f"must be > 0, got {self.lr}")
        _positive(self, "max_length", "batch_size", "grad_accum", "eval_steps", "save_steps", "logging_steps")
        _check(self.max_steps == -1 or self.max_steps >= 1, "max_steps",
               f"must be -1 or at least 1, got {self.max_steps}")
        _fraction(self, "warmup_ratio", high_open=True)
        _one_of(self, "overlong", "precision", "template")


@dataclass(frozen=True)
class ForgetSettings:
    """Remedies for catastrophic forgetting in `sift train`, prepared once before training and cached in
    runs/<run>/forget/ (docs/forgetting.md).

    Args:
        self_distill: SDFT (Yang et al., 2024): the student's base model first rewrites each training
            answer in its own words, shown the original as its reference; a rewrite is trained on only
            where it still agrees with the original (self_distill_rouge), else the original is.
        self_distill_rouge: ROUGE-L F1 against the original at or above which a rewrite is kept; a
            rewrite that does not stop within max_new_tokens is never kept.
        self_distill_prompt: Your own rewrite template (placeholders {instruction} and {reference}).
        replay: Share of the training examples (so of each batch, in expectation) that are replay: the
            base model's own answers to general prompts it wrote itself (or to replay_file's), made
            once before training and kept clear of every eval set (0: off).
        replay_file: Prompts to replay instead of generated ones (chat, Alpaca or Self-Instruct
            records; their answers are ignored: the base model answers them).
        eval_files: More eval files (comma-separated) replay must not overlap; the general set and
            the run's valid split always count.
        max_new_tokens: Longest rewrite, replay prompt or replay answer in tokens.
    """

    self_distill: bool = False
    self_distill_rouge: float = 0.5
    self_distill_prompt: str | None = None
    replay: float = 0.0
    replay_file: str | None = None
    eval_files: str | None = None
    max_new_tokens: int = 256

    def __post_init__(self) -> None:
        _finite(self)
        _fraction(self, "self_distill_rouge")
        _fraction(self, "replay", high_open=True)
        _positive(self, "max_new_tokens")
        _check(self.replay_file is None or self.replay > 0, "replay_file",
               "is used only with a replay share: add --forget.replay R")

    @property
    def active(self) -> bool:
        return self.self_distill or self.replay > 0


@dataclass(frozen=True)
class DistillSettings:
    """Knowledge distillation: the student also learns the teacher's next-token distributions.

    Args:
        enabled: Add the distillation loss on the answer tokens (needs a teacher sharing the tokenizer).
        teacher: Model to distil from, with the student's tokenizer: alias, folder, .gguf or Hub id
            (in sift loop, default: teacher.model).
        temperature: Softens both distributions in the KL term (loss scaled by T^2).
        alpha: Weight of the KL term; 1 - alpha weighs cross-entropy on the data (0: plain SFT).
        top_k: 0: run the teacher at every step; k: cache its top-k log-probabilities once and reuse them.
    """

    enabled: bool = False
    teacher: str | None = None
    temperature: float = 2.0
    alpha: float = 0.5
    top_k: int = 0

    def __post_init__(self) -> None:
        _finite(self)
        _check(self.temperature > 0, "temperature", f"must be > 0, got {self.temperature}")
        _fraction(self, "alpha")
        _not_negative(self, "top_k")


@dataclass(frozen=True)
class FilterSettings:
    """Quality heuristics and exact ROUGE-L dedup against everything kept so far (Self-Instruct).

    Args:
        rules: A preset (self-instruct, alpaca), `rouge` alone, or a comma list of rule names
            (default: the recipe's preset in generate, self-instruct in filter and loop).
        threshold: ROUGE-L F1 above which an instruction duplicates the pool (Self-Instruct and Alpaca: 0.7).
        use_stemmer: Porter-stem tokens before ROUGE-L (both references: off).
        top_k: How many most similar pool instructions to score exactly per record, with the mean over
            the whole pool: an LCS for every pair, about 15x slower (0: dedup only, exact and fastest).
        prefilter: `minhash` for an inexact MinHash-LSH prefilter on huge sets (may miss duplicates).
        workers: Threads for the ROUGE-L comparisons (-1: all cores).
    """

    rules: str | None = None
    threshold: float = 0.7
    use_stemmer: bool = False
    top_k: int = 0
    prefilter: Literal["minhash"] | None = None
    workers: int = -1

    def __post_init__(self) -> None:
        _finite(self)
        _fraction(self, "threshold")
        _not_negative(self, "top_k")
        _check(self.workers == -1 or self.workers >= 1, "workers", f"must be -1 or at least 1, got {self.workers}")


@dataclass(frozen=True)
class GenerateSettings:
    """`sift generate`: new instructions from the seeds (Self-Instruct bootstrap or the Alpaca recipe).

    Args:
        recipe: self-instruct (6 seed + 2 machine examples, continue the list) or alpaca (3 seeds,
            instruction/input/output written together).
        n: Number of instructions to accept.
        max_requests: Request budget (default 10*n+100).
        batch_size: Requests per round; each finished round is journaled.
        seed: Run seed; prompts and per-request sampling seeds derive from it.
        temperature: Sampling temperature (default the recipe's: 0.7 self-instruct, 1.0 alpaca).
        top_p: Nucleus mass (default the recipe's: 0.5 self-instruct, 1.0 alpaca).
        max_tokens: New tokens per response (default the recipe's: 1024 self-instruct, 3072 alpaca).
        prompt: Your own template file (placeholders {examples} and {next}); default the recipe's.
    """

    recipe: Literal["self-instruct", "alpaca"] = "self-instruct"
    n: int = 100
    max_requests: int | None = None
    batch_size: int = 16
    seed: int = 0
    temperature: float | None = None
    top_p: float | None = None
    max_tokens: int | None = None
    prompt: str | None = None

    def __post_init__(self) -> None:
        _finite(self)
        _positive(self, "n", "batch_size")
        _check(self.max_requests is None or self.max_requests >= 1, "max_requests",
               f"must be at least 1, got {self.max_requests}")
        _check(self.temperature is None or self.temperature >= 0, "temperature",
               f"must be >= 0, got {self.temperature}")
        _check(self.top_p is None or 0 < self.top_p <= 1, "top_p", f"must be in (0, 1], got {self.top_p}")
        _check(self.max_tokens is None or self.max_tokens >= 1, "max_tokens",
               f"must be at least 1, got {self.max_tokens}")


@dataclass(frozen=True)
class ClassifySettings:
    """`sift classify`: is each instruction a classification task (the reference's few-shot yes/no)?

    Args:
        batch_size: Records per batch (and per journal entry).
        max_tokens: Tokens of the answer (3 in the reference).
        prompt: Your own template file (placeholder {instruction}); default the few-shot yes/no prompt.
    """

    batch_size: int = 32
    max_tokens: int = 3
    prompt: str | None = None

    def __post_init__(self) -> None:
        _positive(self, "batch_size", "max_tokens")


@dataclass(frozen=True)
class InstancesSettings:
    """`sift instances`: inputs and outputs for each task, input-first or output-first.

    Args:
        batch_size: Records per batch (and per journal entry).
        max_instances: Instances kept per task (5 in Self-Instruct).
        max_tokens: New tokens per response (about 300 in the reference).
        prompt_input_first: Your own template for non-classification tasks (placeholder {instruction}).
        prompt_output_first: Your own template for classification tasks (placeholder {instruction}).
    """

    batch_size: int = 32
    max_instances: int = 5
    max_tokens: int = 300
    prompt_input_first: str | None = None
    prompt_output_first: str | None = None

    def __post_init__(self) -> None:
        _positive(self, "batch_size", "max_instances", "max_tokens")


@dataclass(frozen=True)
class ScoreSettings:
    """`sift score`: per-record scores and the rules that keep the best (Cherry LLM, AlpaGasus).

    Args:
        scorers: Comma list of ifd (instruction-following difficulty on the student's base), length
            (answer words), judge (the teacher's 1-5 rating), reward (a reward model folder).
        keep: Selection rules in order, e.g. "ifd<1,judge>=4,top=0.25:judge" (SCORE<N, <=, >, >=, ==,
            or top=FRACTION:SCORE, the highest); none: keep all.
        judge_prompt: Your own rating prompt file (placeholders {instruction}, {input}, {output}).
        reward_model: A sequence-classification reward model folder (needed by the reward scorer).
        batch_size: Records per forward pass.
    """

    scorers: str = "ifd,length"
    keep: str | None = None
    judge_prompt: str | None = None
    reward_model: str | None = None
    batch_size: int = 8

    def __post_init__(self) -> None:
        _check(bool(self.scorers.strip(", ")), "scorers", "must name at least one scorer")
        _positive(self, "batch_size")


@dataclass(frozen=True)
class ExportSettings:
    """`sift export`: the training and validation splits, decontaminated against the general eval set.

    Args:
        valid_fraction: Share of records held out for validation (at least one when there are two).
        seed: Changes which records fall in the validation split.
        decontaminate_general: Drop records sharing a 13-gram with the general eval set.
    """

    valid_fraction: float = 0.1
    seed: int = 0
    decontaminate_general: bool = True

    def __post_init__(self) -> None:
        _finite(self)
        _fraction(self, "valid_fraction", high_open=True)


@dataclass(frozen=True)
class EvalSettings:
    """`sift eval`: base against student on held-out sets, paired, with bootstrap intervals.

    Args:
        sets: Built-in eval sets, comma-separated: valid (the run's split), general (shipped with sift);
            none given: valid, unless eval_file is given.
        eval_file: A held-out file of your own, run as one more set named after its stem.
        base: Model to compare against (default: the student's own base, as its adapter names it).
        limit: Evaluate at most this many examples per set (a seeded subset); 0 for all.
        max_new_tokens: Longest greedy answer; an answer that reaches it counts as not stopped.
        batch_size: Examples per forward pass on the plain engine; judge requests per progress report.
        engine: fast (student merged, the fast decode engine, length-sorted NLL) or plain (model.generate).
        judge: Also let the teacher judge base against student pairwise, each pair in both orders.
        seed: Seed for the example subset and the bootstrap.
    """

    sets: str | None = None
    eval_file: str | None = None
    base: str | None = None
    limit: int = 0
    max_new_tokens: int = 128
    batch_size: int = 16
    engine: Literal["fast", "plain"] = "fast"
    judge: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        _not_negative(self, "limit")
        _positive(self, "max_new_tokens", "batch_size")


@dataclass(frozen=True)
class LoopSettings:
    """`sift loop`: student-in-the-loop rounds (LLM2LLM): train, find what the student fails, augment it.

    Args:
        rounds: Rounds of train, score, augment (each trains a fresh student on all data so far).
        metric: How an answer is scored: rouge (ROUGE-L F1 against the reference) or judge (teacher says yes/no).
        fail_below: An example whose score is below this is a failure.
        max_failures: Augment at most this many failures per round, the worst first (0: all).
        per_failure: New examples the teacher writes for each failure.
        eval_limit: Score at most this many original training examples per round, a seeded subset (0: all).
        max_new_tokens: Longest greedy student answer when scoring.
        augment_max_tokens: Longest teacher response per failure.
        temperature: Teacher sampling temperature for new examples.
        top_p: Teacher nucleus sampling mass for new examples.
        train_on_seeds: Include the seed examples in round 0's data (and score them).
        teacher_batch_size: Requests per teacher batch (and per journal entry).
        prompt: Your own augmentation template (placeholders instruction, input, output, student_answer, count).
        grade_prompt: Your own grading template for metric judge (instruction, input, reference, answer).
        policy: fixed (the pool's shares as given) or learned (Thompson sampling on whether each
            teacher's additions improved the failures they targeted; docs/teachers.md).
        seed: Seed for the split, the scored subset and teacher sampling.
    """

    rounds: int = 2
    metric: Literal["rouge", "judge"] = "rouge"
    fail_below: float = 0.5
    max_failures: int = 0
    per_failure: int = 2
    eval_limit: int = 0
    max_new_tokens: int = 128
    augment_max_tokens: int = 512
    temperature: float = 0.7
    top_p: float = 0.9
    train_on_seeds: bool = True
    teacher_batch_size: int = 16
    prompt: str | None = None
    grade_prompt: str | None = None
    policy: Literal["fixed", "learned"] = "fixed"
    seed: int = 0

    def __post_init__(self) -> None:
        _finite(self)
        _positive(self, "rounds", "per_failure", "max_new_tokens", "augment_max_tokens", "teacher_batch_size")
        _not_negative(self, "max_failures", "eval_limit", "temperature")
        _fraction(self, "fail_below")
        _fraction(self, "top_p", low_open=True)
        _one_of(self, "metric", "policy")


@dataclass(frozen=True)
class FederateSettings:
    """`sift federate`: federated LoRA over parties on Flower. The clients' training settings come from
    `train:` (lr, batch_size, grad_accum, max_length, precision, template, seed), the adapter from
    `lora:`, the device from `student:`, each client's validation share from `export:`.

    Args:
        clients: Number of clients when splitting the run's exported records.
        rounds: Rounds in all; a rerun with more rounds continues, finished rounds are kept.
        local_steps: Optimizer steps each client trains per round.
        client_runs: Comma-separated run names, one client each (their train.jsonl and valid.jsonl).
        split_by: Record field whose values keep records together when splitting (dots reach inside,
            e.g. provenance.seed_ids; a list splits by its first item).
        aggregation: fedavg (average A and B, weighted by examples) or exact (average B·A, re-factorise).
        eval_file: Held-out set for the server's evaluation (default: the general eval set).
        eval_limit: Held-out rows scored per round (a seeded subset; 0: all).
        round_timeout: Seconds the server waits for a round's replies; a client that does not answer failed.
        engine: simulation (Flower's simulation engine, every client here) or deployment (a running
            SuperLink, one SuperNode per party).
        superlink: The SuperLink's address for the deployment engine (host:port of flower-superlink).
    """

    clients: int = 3
    rounds: int = 2
    local_steps: int = 8
    client_runs: str | None = None
    split_by: str = "task_id"
    aggregation: Literal["fedavg", "exact"] = "fedavg"
    eval_file: str | None = None
    eval_limit: int = 64
    round_timeout: float = 3600.0
    engine: Literal["simulation", "deployment"] = "simulation"
    superlink: str = "127.0.0.1:9093"

    def __post_init__(self) -> None:
        _finite(self)
        _positive(self, "clients", "rounds", "local_steps")
        _not_negative(self, "eval_limit")
        _check(self.round_timeout > 0, "round_timeout", f"must be > 0, got {self.round_timeout}")
        hints = typing.get_type_hints(FederateSettings)  # a choice given in code is checked too
        for name in ("aggregation", "engine"):
            allowed = typing.get_args(hints[name])
            _check(getattr(self, name) in allowed, name,
                   f"expected one of {', '.join(allowed)}, got {getattr(self, name)!r}")



@dataclass(frozen=True)
class RefineSettings:
    """`sift refine`: the teacher critiques and rewrites each record, the student keeps what suits it
    (Reflection-Tuning, Li et al. 2023; Selective Reflection-Tuning, Li et al. 2024).

    Args:
        target: What the teacher rewrites: response, instruction (a new instruction with its answer),
            or both (the instruction first, then the response of the version kept).
        select: Which version a record keeps: student (the paper's rule: the instruction with the higher
            IFD, the response with the lower r-IFD), teacher (every rewrite that passes the filters),
            judge (the higher judge rating), student+judge (the student's rule, unless the judge rates
            the rewrite lower), or original (no rewrite: a control with the same scores).
        rounds: Refine again, up to this many times, the records whose rewrite was kept in the round before.
        judge: Also rate both versions with the teacher as judge (1-5; judge and student+judge always do).
        judge_prompt: Your own rating prompt file (placeholders {instruction}, {input}, {output}).
        prompt_response: Your own response template (placeholders {instruction}, {input}, {output}).
        prompt_instruction: Your own instruction template (placeholders {instruction}, {input}, {output}).
        batch_size: Records per batch (teacher requests, student forward passes, one journal entry).
        max_tokens: New tokens per teacher reply (critique and rewrite).
        temperature: Teacher sampling temperature (the reference's: 0, greedy).
        seed: Seed of the teacher's sampling.
    """

    target: Literal["response", "instruction", "both"] = "both"
    select: Literal["student", "teacher", "judge", "student+judge", "original"] = "student"
    rounds: int = 1
    judge: bool = False
    judge_prompt: str | None = None
    prompt_response: str | None = None
    prompt_instruction: str | None = None
    batch_size: int = 8
    max_tokens: int = 512
    temperature: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        _finite(self)
        _positive(self, "rounds", "batch_size", "max_tokens")
        _not_negative(self, "temperature")
        for name in ("target", "select"):  # the command line checks these choices; code callers too
            choices = typing.get_args(typing.get_type_hints(type(self))[name])
            _check(getattr(self, name) in choices, name,
                   f"expected one of {', '.join(choices)}, got {getattr(self, name)!r}")

def is_section(hint: Any) -> bool:
    """Whether a parameter's type is a settings section (a dataclass the CLI expands into flags)."""
    return isinstance(hint, type) and is_dataclass(hint)


def to_dict(**sections: Any) -> dict[str, Any]:
    """The effective settings as plain data, for manifest.json and --print-config: sections as
    mappings, everything else as given."""
    return {name: asdict(value) if is_dataclass(value) and not isinstance(value, type) else value
            for name, value in sections.items()}
