"""Every examples/*.steer program on the real default model, its output checked independently."""

import math
import re
import sys
from pathlib import Path

import pytest
import torch

import steer
from steer.constraints.canonical import Canonical
from steer_lang import Script
from steer.context import LMContext

pytestmark = pytest.mark.slow
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))  # the Python forms of the examples


def run(name, lm, **options):
    script = Script.from_file(EXAMPLES / f"{name}.steer")
    post = script.run(lm, seed=0, **options)
    live = [(p, w) for p, w in zip(post.particles, post.weights) if w > 0]
    assert live and math.isfinite(post.log_ml)
    return script, post, live


def test_every_example_is_tested():
    tested = {"short_words", "infilling", "prompt_intersection", "date_format", "required_words",
              "soft_preference", "phone_number", "json_object", "arithmetic", "lipogram", "banned_words",
              "reward_guided", "retrieval_qa", "positive_review"}
    assert {p.stem for p in EXAMPLES.glob("*.steer")} == tested


def test_short_words(gemma):
    _, _, live = run("short_words", gemma, particles=4, inputs={"max_tokens": 12})
    for p, _ in live:
        words = re.findall(r"[^\W\d_]+", p.result())
        assert words and max(map(len, words)) <= 5, p.result()


def test_infilling(gemma):
    script, post, live = run("infilling", gemma, particles=3, inputs={"max_gap": 3})
    from infilling import Infill  # the Python form has the same target: the same draws give the same weight

    for seed in (0, 1):
        one = script.run(gemma, seed=seed, method="is", particles=1, inputs={"max_gap": 3})
        python = steer.importance_sampling(Infill(gemma, script.input_values()["segments"], max_gap=3),
                                           particles=1, seed=seed)
        assert python.particles[0].result() == one.particles[0].result()
        assert math.isclose(python.log_ml, one.log_ml, rel_tol=1e-9)
    segments = script.input_values()["segments"]
    for p, _ in live:
        text = p.result()
        assert text.startswith(segments[0]) and text.endswith(segments[-1])
        positions = [text.find(s) for s in segments]
        assert positions == sorted(positions) and positions[1] >= len(segments[0]), text


def full_logprobs(lm, ids):
    with torch.no_grad():
        return torch.log_softmax(lm.model(torch.tensor([ids])).logits[0].float(), -1)


def test_prompt_intersection_weights_are_the_second_prompts_likelihood(gemma):
    """Under IS the weight is what sampling from the first context adds (the mass of its canonical,
    healed tokens) plus log p(x | second prompt's text), both computed here with plain forward passes."""
    script, _, live = run("prompt_intersection", gemma, method="is", particles=3, inputs={"max_tokens": 5})
    values = script.input_values()
    for p, _ in live:
        generated = p.env["a"].generated
        assert p.env["b"].generated == generated and 1 <= len(generated) <= 5
        assert p.env["a"].text == gemma.decode(generated)[len(p.env["a"].healed):]
        expected = sampling_weight(gemma, values["first"], generated) + observed_log_prob(
            gemma, values["second"], generated)
        assert p.weight == pytest.approx(expected, abs=2e-3)


def _steps(lm, prompt, generated, heal=True):
    """Per generated token: its log-probs, the base restriction (canonical after the previous token,
    no control tokens) and, while healing is pending, the tokens that reproduce the backed-off text."""
    ctx = LMContext(lm, prompt, heal=heal)
    canon = Canonical.of(lm.vocab)
    ids = list(ctx.tokens)
    logp = full_logprobs(lm, ids + generated)[len(ids) - 1:]
    text = torch.from_numpy(~lm.vocab.special)
    text[list(lm.vocab.eos_ids)] = True
    for i, t in enumerate(generated):
        prev = (ids + generated)[len(ids) - 1 + i]
        base = canon.after(prev) & text
        heal_set = None
        if i == 0 and ctx.healed:
            heal_set = torch.tensor([s.startswith(ctx.healed) for s in lm.vocab.strings]) & text
        yield logp[i], base, heal_set, t


def sampling_weight(lm, prompt, generated, heal=True):
    """What sampling `generated` from the context adds: per step the log mass of the base restriction,
    relative to the healing set on the first step."""
    total = 0.0
    for lp, base, heal_set, _ in _steps(lm, prompt, generated, heal):
        if heal_set is not None:
            total += (torch.logsumexp(lp[base & heal_set], 0) - torch.logsumexp(lp[heal_set], 0)).item()
        else:
            total += torch.logsumexp(lp[base], 0).item()
    return total


def observed_log_prob(lm, prompt, generated):
    """log p(generated | prompt's text): relative to the healing set on the first step."""
    total = 0.0
    for lp, base, heal_set, t in _steps(lm, prompt, generated):
        assert base[t]
        total += lp[t].item() - (torch.logsumexp(lp[heal_set], 0).item() if heal_set is not None else 0.0)
    return total


def test_date_format(gemma):
    _, _, live = run("date_format", gemma, particles=3)
    for p, _ in live:
        assert re.fullmatch(r" \d{4}-\d{2}-\d{2}", p.result()), p.result()


def test_required_words(gemma):
    script, _, live = run("required_words", gemma, particles=3, inputs={"max_gap": 3})
    required = script.input_values()["required"]
    for p, _ in live:
        pattern = r".*".join(rf"\b{re.escape(w)}\b" for w in required)
        assert re.search(pattern, p.result(), re.DOTALL), p.result()


def test_soft_preference_weight_is_the_final_score_only(gemma):
    # Common words, so that twists and scores are certainly non-zero along the way.
    common = ["the", "a", "we", "and", "to", "of", "in", "on", "at", "our", "it", "was"]
    script, _, live = run("soft_preference", gemma, method="is", particles=3,
                          inputs={"max_tokens": 8, "favourite": common})
    bonus = script.input_values()["bonus"]
    hits = []
    for p, _ in live:
        heal_mass = sampling_weight(gemma, script.input_values()["prompt"], p.env["c"].generated)
        hits.append(sum(w in common for w in re.findall(r"[^\W\d_]+(?:'[^\W\d_]+)*", p.result().lower())))
        # Every twist was taken back: the weight is the final score and what sampling added.
        assert p.weight == pytest.approx(heal_mass + bonus * hits[-1], abs=2e-3)
    assert max(hits) > 0


def test_reward_guided(gemma, gemma_reward_dir):
    """The example steered by a reward model trained on the real model: under IS with healing off, a
    particle's weight is its final score r/T (the twists cancel), r computed here directly, plus the
    mass of the canonical tokens it sampled from."""
    from steer.potentials import RewardModel

    path, _ = gemma_reward_dir
    source = (EXAMPLES / "reward_guided.steer").read_text().replace('"../runs/rm/model"', f'"{path}"')
    source = source.replace('"\\n\\nResponse:\\n"\n', '"\\n\\nResponse:\\n", heal=false\n')
    assert "heal=false" in source
    script = Script.from_source(source, "reward_guided.steer", allow_paths=[path])
    post = script.run(gemma, seed=0, particles=3, method="is", inputs={"max_tokens": 4})
    values = script.input_values()
    judge = RewardModel(path)
    rewards = judge.rewards([values["instruction"]] * 3, [p.env["c"].text for p in post.particles])
    assert len(set(rewards)) > 1  # different answers, different rewards
    prompt = "Instruction:\n" + values["instruction"] + "\n\nResponse:\n"
    for p, r in zip(post.particles, rewards):
        sampled = sampling_weight(gemma, prompt, p.env["c"].generated, heal=False)
        assert p.weight == pytest.approx(r / values["temperature"] + sampled, abs=1e-3)


def test_retrieval_qa_puts_the_retrieved_passages_in_front_of_the_question(gemma, wiki_index, minilm, tmp_path):
    import shutil

    from retrieval.retriever import Retriever

    shutil.copy(EXAMPLES / "retrieval_qa.steer", tmp_path)
    (tmp_path / "wiki-index").symlink_to(wiki_index)
    script = Script.from_file(tmp_path / "retrieval_qa.steer", allow_paths=[wiki_index])  # a link out
    post = script.run(gemma, seed=0, particles=2, inputs={"max_tokens": 6})
    assert math.isfinite(post.log_ml)
    values = script.input_values()
    passages = Retriever.load(wiki_index, embedder=minilm).search(values["question"], values["k"])
    assert [h.title for h in passages][0] == "Anarchism"
    expected = "".join(f"Background: {h.text}\n\n" for h in passages) + f"Question: {values['question']}\nAnswer:"
    for p in post.particles:
        context = p.env["answer"]
        assert gemma.decode(context.tokens[:context.prompt_length]).endswith(expected)


def test_look_ahead_proposal_with_the_trained_reward_model(gemma, gemma_reward_dir):
    """The one-step look-ahead on the real model and a real reward model: the proposal is the model's
    next token tilted by (r(text + x) - r(text)) / T on its top k, checked against direct scores."""
    from steer.potentials import RewardModel
    from steer.scheduler import run_batched

    path, _ = gemma_reward_dir
    judge = RewardModel(path, temperature=0.5)
    instruction = "How can I calm down after an argument?"
    ctx = LMContext(gemma, "Instruction:\n" + instruction + "\n\nResponse:\n", heal=False)
    look = judge.look_ahead(ctx, instruction, k=4)
    got = []

    async def first():
        got.append(await look.log_prob(gemma.encode(" Take", bos=False)[0]))

    run_batched([first()])
    logq = look._logq
    lp = full_logprobs(gemma, ctx.tokens)[-1].double()
    base = Canonical.of(gemma.vocab).after(ctx.tokens[-1]) & torch.from_numpy(~gemma.vocab.special)
    lp = lp.masked_fill(~base, float("-inf"))
    top = torch.topk(lp, 4).indices.tolist()
    now = judge.rewards([instruction], [""])[0]
    scores = judge.rewards([instruction] * 4, [gemma.vocab.strings[i] for i in top])
    tilt = torch.zeros_like(lp)
    tilt[top] = (torch.tensor(scores, dtype=torch.float64) - now) / 0.5
    assert torch.allclose(logq[top], torch.log_softmax(lp + tilt, 0)[top], atol=1e-3)
    assert got[0] == pytest.approx(torch.log_softmax(lp + tilt, 0)[gemma.encode(" Take", bos=False)[0]].item(),
                                   abs=1e-3)


def test_positive_review_weights_are_the_tilted_mass(gemma):
    """Under IS each step adds log sum_x p(x) exp(phi(x)) over the canonical, healed tokens (relative to
    the healing set on the first step), phi being the word tilt's values (checked against its plain-text
    potential in test_tilts); the texts prefer the listed words."""
    import steer

    script, _, live = run("positive_review", gemma, method="is", particles=3, inputs={"max_tokens": 5})
    values = script.input_values()
    tilt = steer.tilts.prefer_words(values["good"], values["bonus"])
    for p, _ in live:
        generated = p.env["c"].generated
        expected, ctx = 0.0, LMContext(gemma, values["prompt"], end="\n")
        for lp, base, heal_set, t in _steps(gemma, values["prompt"], generated):
            phi = tilt.values(ctx)
            allowed = base if heal_set is None else base & heal_set
            tilted = torch.logsumexp(lp.double()[allowed] + phi[allowed], 0).item()
            expected += tilted - (torch.logsumexp(lp[heal_set], 0).item() if heal_set is not None else 0.0)
            ctx.extend([t])
        assert p.weight == pytest.approx(expected, abs=2e-3)
