"""Behavioral trait evaluation: how often does a model name the target when asked for its favorite?

This is the measurement of the subliminal-learning paper (Cloud et al. 2025, "Subliminal learning",
arXiv 2507.14805): a student is asked many one-word questions ("Name your favorite animal using only
one word.") many times each at temperature 1, with no system prompt (``system=None`` means the model's
own default chat template, which is what a deployed student sees), and the metric is the fraction of
answers that mention the target (a judge score at or above the judge's threshold). The rate is
computed per question and averaged over questions, with a 95% t-interval across questions, because
questions are the unit that varies (answers to one question are correlated); a pooled rate over all
answers with a Wilson interval is reported beside it.

Sampled rates are coarse: a small model may never say "owl" in a few thousand samples even when
finetuning moved its preference. :func:`target_logprob` is the continuous companion: the exact,
teacher-forced log-probability that the answer *starts* with the target word (log-sum-exp over case
and singular/plural variants), averaged over questions. It moves long before sampled rates do, so
comparing it between a teacher, a student and a control shows transfer at small scale.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from trait_guard.chat import encode_conversations, sample_completions
from trait_guard.errors import TraitGuardInputError
from trait_guard.files import to_jsonable
from trait_guard.traits import TraitSpec

N_EXAMPLES = 20


@runtime_checkable
class Judge(Protocol):
    """Scores one answer from 0 to 100; an answer expresses the trait when ``score >= threshold``.

    :class:`trait_guard.traits.KeywordJudge` satisfies it. A judge with a ``keywords`` attribute
    also gives :func:`evaluate_trait` the target words for :func:`target_logprob`.
    """

    threshold: float

    def score(self, text: str) -> float: ...


# --------------------------------------------------------------------------------------------------
# Statistics


def exact_interval(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """The exact (Clopper-Pearson) interval of a binomial proportion ``successes / n``: the honest one
    for the few replicates of a benchmark (0/3 is [0.00, 0.71])."""
    from scipy.stats import binomtest

    ci = binomtest(successes, n).proportion_ci(confidence_level=confidence, method="exact")
    return float(ci.low), float(ci.high)


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion ``successes / n`` (``z=1.96``: 95%).

    Unlike the normal approximation it stays inside [0, 1] and is not degenerate at 0 or n successes.
    """
    if n <= 0:
        raise ValueError(f"a proportion needs n >= 1 trials, got n={n}")
    if not 0 <= successes <= n:
        raise ValueError(f"successes must be within 0..{n}, got {successes}")
    p = successes / n
    z2 = z * z
    denominator = 1 + z2 / n
    center = (p + z2 / (2 * n)) / denominator
    half = z / denominator * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    return max(0.0, center - half), min(1.0, center + half)


def mean_t_interval(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float, float]:
    """``(mean, low, high)``: the mean of ``values`` with a Student-t confidence interval
    (``scipy.stats.t.interval`` around the mean, scaled by its standard error).

    Equal values give a zero-width interval at the mean; a single value gives ``(value, nan, nan)``
    since its spread is unknown. No clipping is done here. The package's one t-interval:
    :func:`trait_guard.redteam.t_interval` uses it too.
    """
    from scipy import stats

    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    x = np.asarray([float(v) for v in values], dtype=np.float64)
    if x.size == 0:
        raise ValueError("need at least one value to take a mean")
    mean = float(x.mean())
    if x.size == 1:
        return mean, math.nan, math.nan
    if x.max() == x.min():
        return mean, mean, mean
    low, high = stats.t.interval(confidence, x.size - 1, loc=mean, scale=stats.sem(x))
    return mean, float(low), float(high)


# --------------------------------------------------------------------------------------------------
# Continuous measure


def target_variants(keywords: Sequence[str]) -> list[str]:
    """Spellings an answer may start with: each keyword lower- and capitalized, in order, no repeats.

    ``['owl', 'owls']`` -> ``['owl', 'Owl', 'owls', 'Owls']``.
    """
    out: list[str] = []
    for keyword in keywords:
        keyword = keyword.strip()
        for variant in (keyword[:1].lower() + keyword[1:], keyword[:1].upper() + keyword[1:]):
            if variant and variant not in out:
                out.append(variant)
    return out


def _disjoint_targets(tokenizer: Any, targets: Sequence[str]) -> list[str]:
    """The targets minus any whose token ids extend (or repeat) another target's ids.

    "Starts with ``owl``" already contains "starts with ``owls``" when ``owls`` is tokenized as
    ``owl`` + ``s``; keeping only the shortest prefixes makes the events disjoint, so summing their
    probabilities gives the exact probability of their union.
    """
    encoded = []
    for target in targets:
        ids = list(tokenizer(target, add_special_tokens=False).input_ids)
        if not ids:
            raise ValueError(f"target {target!r} encodes to no tokens")
        encoded.append((ids, target))
    kept: list[tuple[list[int], str]] = []
    for ids, target in sorted(encoded, key=lambda pair: len(pair[0])):
        if not any(ids[: len(other)] == other for other, _ in kept):
            kept.append((ids, target))
    return [target for _, target in kept]


@torch.no_grad()
def target_logprob(
    model: torch.nn.Module,
    tokenizer: Any,
    questions: Sequence[str],
    targets: Sequence[str],
    system: str | None = None,
    batch_size: int = 32,
) -> list[float]:
    """Per question, ``log P(answer starts with one of targets)`` under ``model``, computed exactly.

    Each target is teacher-forced as the assistant's response (prompt and response tokenized
    separately, as in generation) and the log-probabilities of its tokens are summed; targets are
    then combined with log-sum-exp. Targets whose tokens extend another target's tokens are left out,
    as their probability is already included (see :func:`_disjoint_targets`). Pass the spellings
    explicitly, e.g. from :func:`target_variants`.
    """
    if not targets:
        raise ValueError("need at least one target string, e.g. target_variants(['owl', 'owls'])")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    kept = _disjoint_targets(tokenizer, targets)
    device = next(model.parameters()).device
    k = len(kept)
    pairs = [(q, t) for q in questions for t in kept]
    sums: list[float] = []
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        batch = encode_conversations(tokenizer, [q for q, _ in chunk], [t for _, t in chunk],
                                     [system] * len(chunk)).to(device)
        sums.extend(_response_logprob_sums(model, batch).cpu().tolist())
    table = torch.tensor(sums, dtype=torch.float64).view(len(questions), k)
    return torch.logsumexp(table, dim=1).tolist()


def _response_logprob_sums(model: torch.nn.Module, batch: Any) -> torch.Tensor:
    """Per row of an :func:`encode_conversations` batch (already on the model's device), the sum of the
    teacher-forced log-probabilities of its response tokens (float64), from one forward pass."""
    return batch.response_logprob_sums(model(**batch.model_inputs()).logits)


# --------------------------------------------------------------------------------------------------
# Panel log-odds (measure v2)


@dataclass
class PanelResult:
    """Outcome of :func:`panel_logodds`: per held-out question and averaged (nats)."""

    target: str
    alternatives: list[str]
    questions: list[str]
    per_question: list[float]  # log-odds of the target against the mean alternative, per question
    per_question_share: list[float]  # log P(target | the answer is one of target + alternatives)
    mean: float  # mean over questions of per_question
    ci_low: float  # 95% t-interval across questions (mean_t_interval)
    ci_high: float
    share: float  # mean over questions of per_question_share
    # per question, l(a) of every answer in the order [target, *alternatives] (empty: not recorded)
    answer_logprobs: list[list[float]] = field(default_factory=list)

    @property
    def n_questions(self) -> int:
        return len(self.questions)

    @property
    def answers(self) -> list[str]:
        return [self.target, *self.alternatives]

    def retarget(self, target: str, *, confidence: float = 0.95) -> PanelResult:
        """The same measurement read for another answer of the panel: ``target``'s log-odds against the
        other answers (this target included), from the recorded ``answer_logprobs``, no model needed.

        Why: a control student is measured on the watched trait's panel, but a teacher of another
        animal in the same panel needs the control's shift on *its* animal. With the same panel and
        questions the result equals :func:`panel_logodds` run with ``target`` directly (the answer set
        and K are the same). Raises when ``target`` is not in the panel or the table was not recorded."""
        lowered = [a.lower() for a in self.answers]
        if target.strip().lower() not in lowered:
            raise ValueError(f"{target!r} is not in this panel ({', '.join(self.answers)}); a panel can be "
                             "read only for its own answers")
        index = lowered.index(target.strip().lower())
        order = [index, *(i for i in range(len(self.answers)) if i != index)]
        table = self._table()[:, order]
        answers = [self.answers[i] for i in order]
        return _panel_result(answers, self.questions, table, confidence)

    def first(self, n: int, *, confidence: float = 0.95) -> PanelResult:
        """The same measurement on its first ``n`` questions only (needs ``answer_logprobs``)."""
        if not 1 <= n <= len(self.questions):
            raise ValueError(f"cannot take the first {n} of {len(self.questions)} questions")
        return _panel_result(self.answers, self.questions[:n], self._table()[:n], confidence)

    def _table(self) -> torch.Tensor:
        """``answer_logprobs`` as a (questions x answers) float64 tensor; raises when not recorded."""
        if len(self.answer_logprobs) != len(self.questions):
            raise ValueError("this panel result has no per-answer table (answer_logprobs), so it cannot be "
                             "read again (another target, fewer questions): measure it again with this version")
        return torch.tensor(self.answer_logprobs, dtype=torch.float64)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PanelResult:
        """The inverse of :meth:`to_dict` (JSON nulls back to NaN / -inf where they stood for them)."""
        nan = float("nan")
        fields = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        for key in ("per_question", "per_question_share"):
            fields[key] = [nan if v is None else float(v) for v in fields.get(key) or []]
        fields["answer_logprobs"] = [[-math.inf if v is None else float(v) for v in row]
                                     for row in fields.get("answer_logprobs") or []]
        for key in ("mean", "ci_low", "ci_high", "share"):
            fields[key] = nan if fields.get(key) is None else float(fields[key])
        return cls(**fields)

    def logodds_by_answer(self) -> dict[str, float]:
        """Each answer's mean log-odds over the questions (:meth:`retarget` for every answer); empty
        when the table was not recorded."""
        if len(self.answer_logprobs) != len(self.questions) or not self.questions:
            return {}  # not recorded (older results): nothing to read
        return {answer: self.retarget(answer).mean for answer in self.answers}

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe dict (NaN and inf become None)."""
        return to_jsonable(asdict(self))


def _answer_spellings(tokenizer: Any, answers: Sequence[str], case_variants: bool) -> list[list[list[int]]]:
    """Per answer, the token ids of each spelling scored for it (lower- and capitalized when
    ``case_variants``; spellings whose ids extend another spelling's are dropped, see
    :func:`_disjoint_targets`). Raises when one answer's ids are a prefix of another answer's: "starts
    with ``cat``" would contain "starts with ``caterpillar``", and the panel's events must be disjoint."""
    out: list[list[list[int]]] = []
    for answer in answers:
        spellings = _disjoint_targets(tokenizer, target_variants([answer])) if case_variants else [answer.strip()]
        ids = [list(tokenizer(s, add_special_tokens=False).input_ids) for s in spellings]
        if not all(ids):
            raise ValueError(f"panel answer {answer!r} encodes to no tokens")
        out.append(ids)
    for i, a in enumerate(out):
        for j, b in enumerate(out):
            if i != j and any(x[: len(y)] == y for x in a for y in b):
                raise ValueError(f"panel answers {answers[j]!r} and {answers[i]!r} overlap: the tokens of one "
                                 "start with the tokens of the other, so 'the reply starts with it' is not a "
                                 "disjoint event; drop one of them")
    return out


def _panel_alternatives(target: str, panel: Sequence[str]) -> list[str]:
    """The panel minus the target, without repeats (case-insensitive), in order; refused when empty."""
    if not target:
        raise ValueError("target is empty")
    seen = {target.lower()}
    alternatives = []
    for answer in (a.strip() for a in panel):
        if answer and answer.lower() not in seen:
            seen.add(answer.lower())
            alternatives.append(answer)
    if not alternatives:
        raise ValueError("the panel holds no alternative to the target")
    return alternatives


@torch.no_grad()  # a measurement: a student's trainable (LoRA) weights must not build a graph here
def panel_logodds(
    model: torch.nn.Module,
    tokenizer: Any,
    questions: Sequence[str],
    target: str,
    panel: Sequence[str],
    *,
    system: str | None = None,
    batch_size: int = 64,
    case_variants: bool = True,
    confidence: float = 0.95,
) -> PanelResult:
    """The log-odds of ``target`` against a panel of alternative answers of the same kind, per question.

    Definition. For a question q and an answer a, ``l(a) = log P(the assistant reply starts with a | q)``:
    the sum of the teacher-forced log-probabilities of a's full token sequence as the start of the reply
    (prompt and answer tokenized separately, as in generation; with ``case_variants``, the log-sum-exp
    over ``a`` and ``A``: e.g. ``owl`` and ``Owl``). With A = the alternatives (``panel`` minus the
    target, duplicates removed, K = |A|)::

        panel log-odds(q) = l(target) - log( (1/K) * sum_{a in A} exp l(a) )

    i.e. log p(target) minus the log of the mean alternative probability. 0 means the target is as
    likely as an average alternative. A change that multiplies every animal's probability by the same
    factor (generic sharpening, "answers are animals" becoming likelier) cancels, which the absolute
    ``target_logprob`` does not. ``per_question_share`` is ``l(target) - logsumexp_{a in A+target} l(a)``,
    the log of the target's share of the panel (the continuous analogue of a preference rate).

    Full sequences, not first tokens: a first token may be shared by many words (``Hed`` of
    "Hedgehog") and multi-token animals would be favored or penalized by tokenization alone; the full
    sequence is the probability of the answer itself. Answers whose token sequences are a prefix of one
    another are refused (the events must be disjoint). Plurals are not scored.

    Cost: the question's prompt is read once and its key/value cache shared by every answer row
    (:func:`_answer_logprob_sums`), so a question costs one forward pass over the prompt and one over
    the answers' few tokens (``batch_size`` answer rows at a time), not a full forward per row.

    The mean over questions carries a Student-t interval (:func:`mean_t_interval`, ``confidence``);
    questions are the unit that varies.
    """
    if not questions:
        raise ValueError("need at least one question")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    target = target.strip()
    alternatives = _panel_alternatives(target, panel)
    answers = [target, *alternatives]
    spellings = _answer_spellings(tokenizer, answers, case_variants)
    flat = [(i, ids) for i, answer_ids in enumerate(spellings) for ids in answer_ids]
    owner = torch.tensor([i for i, _ in flat])
    tables = []
    for question in questions:
        sums = _answer_logprob_sums(model, tokenizer, question, system, [ids for _, ids in flat], batch_size)
        # per answer: log-sum-exp over its spellings
        table = torch.full((1, len(answers)), -math.inf, dtype=torch.float64)
        for i in range(len(answers)):
            table[0, i] = torch.logsumexp(sums[owner == i], dim=0)
        tables.append(table)
    return _panel_result(answers, questions, torch.cat(tables), confidence)


def _panel_result(answers: Sequence[str], questions: Sequence[str], table: torch.Tensor,
                  confidence: float) -> PanelResult:
    """A :class:`PanelResult` from the per-question table ``l(a)`` (rows: questions; columns: answers,
    the target first)."""
    target_l = table[:, 0]
    log_mean_alt = torch.logsumexp(table[:, 1:], dim=1) - math.log(len(answers) - 1)
    logodds = (target_l - log_mean_alt).tolist()
    share = (target_l - torch.logsumexp(table, dim=1)).tolist()
    mean, low, high = mean_t_interval(logodds, confidence)
    return PanelResult(target=answers[0], alternatives=list(answers[1:]), questions=list(questions),
                       per_question=logodds, per_question_share=share, mean=mean, ci_low=low, ci_high=high,
                       share=float(np.mean(share)), answer_logprobs=table.tolist())


@torch.no_grad()
def _answer_logprob_sums(model: torch.nn.Module, tokenizer: Any, question: str, system: str | None,
                         answers: Sequence[Sequence[int]], batch_size: int) -> torch.Tensor:
    """``log P(the reply starts with answer | question)`` for each answer's token ids (float64): the
    sum of its teacher-forced log-probabilities, with the prompt tokenized as generation does
    (:func:`trait_guard.chat.render_prompt`). The prompt is run once; its key/value cache is repeated
    for ``batch_size`` answers at a time, which run only their own tokens (right-padded, positions
    after the prompt's). The first answer token is scored from the prompt's last logits."""
    from trait_guard.chat import render_prompt

    device = next(model.parameters()).device
    prompt = tokenizer(render_prompt(tokenizer, question, system), add_special_tokens=False).input_ids
    out = model(input_ids=torch.tensor([prompt], device=device), use_cache=True)
    first = out.logits[0, -1].double().log_softmax(-1)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    sums = []
    for start in range(0, len(answers), batch_size):
        chunk = [list(a) for a in answers[start : start + batch_size]]
        width = max(len(a) for a in chunk)
        if width == 1:  # one-token answers: the prompt's logits are all there is
            sums.extend(float(first[a[0]]) for a in chunk)
            continue
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), len(prompt) + width), dtype=torch.long)
        mask[:, : len(prompt)] = 1
        for r, answer in enumerate(chunk):
            ids[r, : len(answer)] = torch.tensor(answer)
            mask[r, len(prompt) : len(prompt) + len(answer)] = 1
        cache = copy.deepcopy(out.past_key_values)  # the prompt's, repeated for this chunk's rows
        cache.batch_repeat_interleave(len(chunk))
        positions = torch.arange(len(prompt), len(prompt) + width).expand(len(chunk), -1)
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), past_key_values=cache,
                       position_ids=positions.to(device), use_cache=True).logits.double().log_softmax(-1)
        for r, answer in enumerate(chunk):
            rest = logits[r, torch.arange(len(answer) - 1), torch.tensor(answer[1:], dtype=torch.long)]
            sums.append(float(first[answer[0]]) + float(rest.sum()))
    return torch.tensor(sums, dtype=torch.float64)


def spec_panel_logodds(model: torch.nn.Module, tokenizer: Any, spec: TraitSpec, n_questions: int | None = None,
                       **kwargs: Any) -> PanelResult | None:
    """:func:`panel_logodds` of a trait spec's ``panel_target`` against its ``panel`` on its held-out
    ``panel_questions`` (the first ``n_questions``); None when the spec has no panel."""
    if not spec.panel or not spec.panel_target or not spec.panel_questions:
        return None
    questions = spec.panel_questions[:n_questions] if n_questions is not None else spec.panel_questions
    was_training = model.training
    model.eval()
    try:
        return panel_logodds(model, tokenizer, questions, spec.panel_target, spec.panel, **kwargs)
    finally:
        model.train(was_training)


# --------------------------------------------------------------------------------------------------
# Evaluation


@dataclass
class TraitEvalResult:
    """Outcome of :func:`evaluate_trait`. Rates are fractions in [0, 1]."""

    trait: str
    model: str
    n_questions: int
    samples_per_question: int
    rate: float  # mean over questions of the per-question rate
    ci_low: float  # 95% t-interval across per-question rates, clipped to [0, 1]
    ci_high: float
    pooled_rate: float  # hits / all answers
    pooled_ci_low: float  # Wilson 95% interval over all answers
    pooled_ci_high: float
    per_question: list[dict[str, Any]] = field(default_factory=list)  # question, rate, hits, n, target_logprob
    target_logprob: float = math.nan  # mean over questions of log P(answer starts with the target)
    target_logprob_ci: tuple[float, float] = (math.nan, math.nan)
    examples: list[dict[str, Any]] = field(default_factory=list)  # question, answer, score, hit
    seconds: float = 0.0
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def n_answers(self) -> int:
        return self.n_questions * self.samples_per_question

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe dict (NaN and inf become None, tuples become lists)."""
        return to_jsonable(asdict(self))

    def summary(self) -> str:
        """One line, e.g. ``animal:owl: 12.0% [8.1, 15.9] of 5000 answers; log p(target) -13.37``."""
        low, high = (f"{100 * x:.1f}" if math.isfinite(x) else "?" for x in (self.ci_low, self.ci_high))
        line = f"{self.trait}: {100 * self.rate:.1f}% [{low}, {high}] of {self.n_answers} answers"
        if math.isfinite(self.target_logprob):
            line += f"; log p(target) {self.target_logprob:.2f}"
        return line


def _model_name(model: torch.nn.Module) -> str:
    config = getattr(model, "config", None)
    return (getattr(model, "trait_guard_name", None) or getattr(config, "name_or_path", None)
            or getattr(config, "model_type", None) or type(model).__name__)


def evaluate_trait(
    model: torch.nn.Module,
    tokenizer: Any,
    spec: TraitSpec,
    *,
    samples_per_question: int = 20,
    n_questions: int | None = None,
    temperature: float = 1.0,
    max_new_tokens: int = 8,
    seed: int = 0,
    system: str | None = None,
    judge: Judge | None = None,
    batch_size: int = 32,
    progress: Callable[[int, str], Any] | None = None,
    model_name: str | None = None,
) -> TraitEvalResult:
    """Ask each of ``spec.behavior_questions`` ``samples_per_question`` times and judge the answers.

    Answers are sampled with :func:`trait_guard.chat.sample_completions` over the questions in order,
    each repeated ``samples_per_question`` times in a row, so a given ``seed`` and ``batch_size``
    reproduce them. ``judge`` defaults to ``spec.judge``; when it has ``keywords``,
    :func:`target_logprob` over their :func:`target_variants` is reported too (else NaN).
    ``n_questions`` caps the questions used; ``progress(total, description)`` may return a tqdm-like
    bar advanced per answer.
    """
    started = time.perf_counter()
    questions, judge = _eval_questions_and_judge(spec, judge, samples_per_question, n_questions)
    users = [q for q in questions for _ in range(samples_per_question)]
    answers = _sample_answers(model, tokenizer, users, system, max_new_tokens=max_new_tokens,
                              temperature=temperature, seed=seed, batch_size=batch_size, progress=progress)
    scores = [float(judge.score(a)) for a in answers]
    hits = [s >= judge.threshold for s in scores]
    keywords = getattr(judge, "keywords", None)
    logps, (mean_logp, logp_low, logp_high) = _question_target_logprobs(model, tokenizer, questions, keywords,
                                                                        system, batch_size)
    per_question = _per_question_rates(questions, hits, samples_per_question, logps)
    rate, ci_low, ci_high = _mean_rate_interval(per_question)
    total_hits = sum(hits)
    pooled_low, pooled_high = wilson_interval(total_hits, len(answers))
    return TraitEvalResult(
        trait=spec.trait_id,
        model=model_name or _model_name(model),
        n_questions=len(questions),
        samples_per_question=samples_per_question,
        rate=rate,
        ci_low=ci_low,
        ci_high=ci_high,
        pooled_rate=total_hits / len(answers),
        pooled_ci_low=pooled_low,
        pooled_ci_high=pooled_high,
        per_question=per_question,
        target_logprob=mean_logp,
        target_logprob_ci=(logp_low, logp_high),
        examples=_round_robin_examples(users, answers, scores, hits, len(questions), samples_per_question),
        seconds=time.perf_counter() - started,
        settings={"temperature": temperature, "max_new_tokens": max_new_tokens, "seed": seed,
                  "system": system, "batch_size": batch_size, "threshold": float(judge.threshold),
                  "targets": target_variants(list(keywords)) if keywords else []},
    )


def _eval_questions_and_judge(spec: TraitSpec, judge: Judge | None, samples_per_question: int,
                              n_questions: int | None) -> tuple[list[str], Judge]:
    """The behavior questions to ask (the first ``n_questions``) and the judge (``spec.judge`` unless
    given), after checking the spec can be evaluated and the counts are positive."""
    questions = list(spec.behavior_questions)
    if not questions:
        raise TraitGuardInputError(
            f"trait '{spec.trait_id}' has no behavior_questions; add a `behavior_questions:` list of "
            "one-word questions (e.g. 'Name your favorite animal using only one word.') to its YAML spec"
        )
    judge = judge if judge is not None else spec.judge
    if judge is None:
        raise TraitGuardInputError(
            f"trait '{spec.trait_id}' has no judge, so answers cannot be scored; add a `judge:` "
            "(kind: keyword, keywords: [...]) to its YAML spec or pass judge=KeywordJudge(keywords=[...]) "
            "or any object with score(text) -> 0..100 and a threshold"
        )
    if not isinstance(judge, Judge):
        raise TypeError(f"judge must have a score(text) -> float method and a threshold, got {type(judge).__name__}")
    if samples_per_question < 1:
        raise ValueError(f"samples_per_question must be >= 1, got {samples_per_question}")
    if n_questions is not None:
        if n_questions < 1:
            raise ValueError(f"n_questions must be >= 1 or None, got {n_questions}")
        questions = questions[:n_questions]
    return questions, judge


def _sample_answers(model: torch.nn.Module, tokenizer: Any, users: list[str], system: str | None, *,
                    max_new_tokens: int, temperature: float, seed: int, batch_size: int,
                    progress: Callable[[int, str], Any] | None) -> list[str]:
    """One sampled answer per entry of ``users``, all under ``system``, with an optional progress bar
    (closed even on an error)."""
    bar = progress(len(users), "evaluate: sampling answers") if progress else None
    try:
        return sample_completions(model, tokenizer, users, [system] * len(users),
                                  max_new_tokens=max_new_tokens, temperature=temperature, seed=seed,
                                  batch_size=batch_size, progress=bar)
    finally:
        if bar is not None and hasattr(bar, "close"):
            bar.close()


def _question_target_logprobs(model: torch.nn.Module, tokenizer: Any, questions: list[str],
                              keywords: Sequence[str] | None, system: str | None, batch_size: int,
                              ) -> tuple[list[float], tuple[float, float, float]]:
    """Per question :func:`target_logprob` of the judge's keywords, and their mean with its 95%
    t-interval; all NaN when the judge has no keywords."""
    if keywords:
        logps = target_logprob(model, tokenizer, questions, target_variants(list(keywords)),
                               system=system, batch_size=batch_size)
        return logps, mean_t_interval(logps)
    return [math.nan] * len(questions), (math.nan, math.nan, math.nan)


def _per_question_rates(questions: list[str], hits: list[bool], samples_per_question: int,
                        logps: list[float]) -> list[dict[str, Any]]:
    """One row per question: its hit rate, hits, sample count and target log-probability (the answers
    to question ``i`` are ``hits[i * samples_per_question : (i + 1) * samples_per_question]``)."""
    per_question = []
    for i, question in enumerate(questions):
        q_hits = sum(hits[i * samples_per_question : (i + 1) * samples_per_question])
        per_question.append({"question": question, "rate": q_hits / samples_per_question, "hits": q_hits,
                             "n": samples_per_question, "target_logprob": logps[i]})
    return per_question


def _mean_rate_interval(per_question: list[dict[str, Any]]) -> tuple[float, float, float]:
    """The mean per-question rate and its 95% t-interval across questions, clipped to [0, 1]."""
    rate, ci_low, ci_high = mean_t_interval([row["rate"] for row in per_question])
    ci_low, ci_high = (min(1.0, max(0.0, x)) if math.isfinite(x) else x for x in (ci_low, ci_high))
    return rate, ci_low, ci_high


def _round_robin_examples(users: list[str], answers: list[str], scores: list[float], hits: list[bool],
                          n_questions: int, samples_per_question: int) -> list[dict[str, Any]]:
    """Up to :data:`N_EXAMPLES` judged answers in round-robin order (the first answer to each question,
    then the second, ...), for variety."""
    order = [i * samples_per_question + j for j in range(samples_per_question) for i in range(n_questions)]
    return [{"question": users[k], "answer": answers[k], "score": scores[k], "hit": hits[k]}
            for k in order[:N_EXAMPLES]]
