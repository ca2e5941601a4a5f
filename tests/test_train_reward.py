"""Reward models and preference strength on tiny models: the Bradley-Terry loss (with margins and
label smoothing) against a direct computation, strength on a synthetic set with known flipped labels,
and the reward potential against exact enumeration."""

import json
import math
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from exact import complete_sequences

import steer
from steer.potentials import RewardModel
from steer.context import LMContext
from train.common import TrainOptions, load_tokenizer
from train.data import load_pairs, split_by_prompt
from train.reward import (
    build_reward_trainer,
    load_reward_backbone,
    score_pairs,
    train_reward,
)
from train.strength import categorise, ensemble_strength, preference_strength

pytestmark = pytest.mark.slow  # training steps: seconds each, so not in the fast subset


def test_bradley_terry_loss_with_margin_and_smoothing_equals_a_direct_computation(tiny_text_dir, arithmetic_pairs,
                                                                                  tmp_path):
    pairs = load_pairs(arithmetic_pairs)[:4]
    margins = [0.5, -0.2, 0.0, 1.0]
    options = TrainOptions(model=str(tiny_text_dir), out=str(tmp_path), progress=False, batch_size=4)
    trainer = build_reward_trainer(pairs, [], options, margins=margins, label_smoothing=0.1)
    with torch.no_grad():  # the head starts at zero: give the pairs different rewards to compare
        torch.manual_seed(0)
        trainer.model.score.weight.normal_(0, 1.0)
    batch = next(iter(trainer.get_train_dataloader()))
    trainer.model.eval()
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, dict(batch)).item()
    # Directly: the score head at the last token of prompt + response + EOS.
    tokenizer = load_tokenizer(tiny_text_dir)
    diffs = score_pairs(trainer.model, tokenizer, pairs, 256)
    d = diffs - torch.tensor(margins)
    expected = -(0.9 * F.logsigmoid(d) + 0.1 * F.logsigmoid(-d)).mean().item()
    assert diffs.abs().max() > 1e-3
    assert loss == pytest.approx(expected, abs=1e-5)


def deterministic_with_a_random_head(model) -> None:
    """No dropout, and a random score head (a fresh one is zero: every reward alike)."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    with torch.no_grad():
        torch.manual_seed(0)
        model.score.weight.normal_(0, 1.0)


def test_contrastive_loss_is_bradley_terry_plus_info_nce_of_the_difference_representations(
        tiny_text_dir, arithmetic_pairs, tmp_path):
    """With dropout off (both views the same), the training loss is the Bradley-Terry loss plus the
    weight times InfoNCE over the pairs' h(chosen) - h(rejected), h read at each text's last token from
    one unpadded text at a time; weight 0 leaves Bradley-Terry alone."""
    pairs = load_pairs(arithmetic_pairs)[:4]
    options = TrainOptions(model=str(tiny_text_dir), out=str(tmp_path), progress=False, batch_size=4)
    trainer = build_reward_trainer(pairs, [], options, contrastive=0.5)
    trainer.contrastive_dropout = 0.0
    model = trainer.model
    deterministic_with_a_random_head(model)
    batch = next(iter(trainer.get_train_dataloader()))
    model.train()
    with torch.no_grad():
        total = trainer.compute_loss(model, dict(batch)).item()
        trainer.contrastive = 0.0
        plain = trainer.compute_loss(model, dict(batch)).item()
    tokenizer = load_tokenizer(tiny_text_dir)
    model.eval()
    with torch.no_grad():
        def h(text):
            ids = tokenizer(text + tokenizer.eos_token, return_tensors="pt")
            return model(**ids, output_hidden_states=True).hidden_states[-1][0, -1]
        d = torch.stack([h(p.prompt + p.chosen) - h(p.prompt + p.rejected) for p in pairs])
        diffs = score_pairs(model, tokenizer, pairs, 256)
    cos = F.cosine_similarity(d[:, None], d[None], dim=-1) / trainer.contrastive_temperature
    info_nce = (torch.logsumexp(cos, dim=1) - cos.diagonal()).mean().item()
    assert plain == pytest.approx(-F.logsigmoid(diffs).mean().item(), abs=1e-5)
    assert info_nce > 1e-3
    assert total == pytest.approx(plain + 0.5 * info_nce, abs=1e-4)


def test_meta_rm_takes_the_bradley_terry_gradient_after_an_ascent_step_on_the_difference_loss(
        tiny_text_dir, arithmetic_pairs, tmp_path):
    """One MetaRM step, checked by hand: the optimizer receives grad L(θ'), θ' = θ + η grad J(θ), J the
    mean sigmoid(|r_i - r_j|) over each prompt's responses, and the parameters it steps from are θ."""
    from transformers import TrainerCallback

    from train.data import ResponseSet
    from train.reward import MetaSet

    pairs = load_pairs(arithmetic_pairs)[:4]
    sets = [ResponseSet(p.prompt, (p.chosen, p.rejected, p.chosen + " 1"), "test") for p in pairs[:2]]
    eta = 0.5
    options = TrainOptions(model=str(tiny_text_dir), out=str(tmp_path), progress=False, batch_size=4, max_steps=1,
                           save_steps=1000)
    trainer = build_reward_trainer(pairs, [], options, meta=MetaSet(sets, eta, batch=2))
    model = trainer.model
    deterministic_with_a_random_head(model)
    tokenizer = load_tokenizer(tiny_text_dir)
    params = [p for p in model.parameters() if p.requires_grad]
    theta = [p.detach().clone() for p in params]

    # by hand: J over both sets (the order does not change the mean), its ascent, then BT's gradient there
    def rewards(texts):
        return torch.stack([model(**tokenizer(t + tokenizer.eos_token, return_tensors="pt")).logits[0, 0] for t in texts])

    r = [rewards([s.prompt + x for x in s.responses]) for s in sets]
    j = torch.stack([torch.sigmoid((x[:, None] - x[None]).abs())[torch.triu(torch.ones(3, 3), 1).bool()].mean()
                     for x in r]).mean()
    ascent = torch.autograd.grad(j, params, allow_unused=True)
    with torch.no_grad():
        for p, g in zip(params, ascent):
            if g is not None:
                p.add_(g, alpha=eta)
    chosen, rejected = (rewards([p.prompt + getattr(p, side) for p in pairs]) for side in ("chosen", "rejected"))
    expected = torch.autograd.grad(-F.logsigmoid(chosen - rejected).mean(), params, allow_unused=True)
    with torch.no_grad():
        for p, t in zip(params, theta):
            p.copy_(t)

    seen = {}

    class Capture(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, **kw):
            seen["params"] = [p.detach().clone() for p in params]
            seen["grads"] = [None if p.grad is None else p.grad.detach().clone() for p in params]

    trainer.add_callback(Capture())
    trainer.args.max_grad_norm = 1e9  # no clipping: the raw gradient reaches the optimizer
    trainer.train()
    assert all(torch.equal(a, b) for a, b in zip(seen["params"], theta))  # stepped from θ, not θ'
    moved = [g for g in ascent if g is not None and g.abs().max() > 0]
    assert moved  # the ascent step changed something
    for got, want in zip(seen["grads"], expected):
        if want is not None:
            assert torch.allclose(got, want, atol=1e-5, rtol=1e-4)
    assert trainer.meta and j.item() > 0.5


def test_sampled_response_sets_are_a_meta_set_on_the_training_side_of_the_reward_split(
        tiny_text_dir, arithmetic_pairs, tmp_path):
    """`steer train sample --split train` writes response sets that MetaRM reads back, each prompt one
    the reward trainer (same seed and fraction) trains on, templated once."""
    from train.data import load_response_sets
    from train.generation import sample_response_sets

    out = tmp_path / "meta.jsonl"
    stats = sample_response_sets(arithmetic_pairs, out, model=str(tiny_text_dir), n=3, split="train",
                                 eval_fraction=0.3, seed=5, max_new_tokens=6, temperature=1.0, progress=False)
    sets = load_response_sets(out)
    train, held = split_by_prompt(load_pairs(arithmetic_pairs), 0.3, 5)
    assert held and stats["sets"] == len(sets) and stats["sets"] + stats["skipped"] == len({p.prompt for p in train})
    assert {s.prompt for s in sets} <= {p.prompt for p in train}
    assert not {s.prompt for s in sets} & {p.prompt for p in held}
    assert all(len(s.responses) >= 2 and all(s.responses) for s in sets)
    drawn = sample_response_sets(arithmetic_pairs, tmp_path / "two.jsonl", model=str(tiny_text_dir), n=2,
                                 prompts=2, split="eval", eval_fraction=0.3, seed=5, max_new_tokens=6,
                                 temperature=1.0, progress=False)
    assert drawn["sets"] + drawn["skipped"] == 2
    assert {s.prompt for s in load_response_sets(tmp_path / "two.jsonl")} <= {p.prompt for p in held}


def test_sampled_response_sets_on_the_default_model(tmp_path):
    """The default model answers two HH-RLHF training-side prompts twice each; the file is a meta set
    whose prompts are the dialogues' instructions, none of them held out."""
    from pathlib import Path

    from train.data import load_response_sets
    from train.generation import sample_response_sets

    data = Path(__file__).resolve().parents[1] / "examples" / "data" / "hh_rlhf_harmless.jsonl.gz"
    out = tmp_path / "meta.jsonl"
    stats = sample_response_sets(data, out, n=2, prompts=2, split="train", eval_fraction=0.2, max_new_tokens=8,
                                 progress=False)
    sets = load_response_sets(out)
    assert stats["sets"] == len(sets) >= 1 and stats["sets"] + stats["skipped"] == 2
    _, held = split_by_prompt(load_pairs(data), 0.2, 0)
    assert not {s.prompt for s in sets} & {p.prompt for p in held}
    assert all(s.prompt.startswith("Instruction:\n") and "Instruction:\nInstruction:" not in s.prompt for s in sets)
    assert all(len(s.responses) == 2 for s in sets)


def synthetic_pairs(n, flip_rate, seed):
    """Chosen responses are mostly "a", rejected mostly "b"; a known set of pairs has its labels swapped."""
    rng = random.Random(seed)

    def response(major, minor):
        length = rng.randint(6, 12)
        k = rng.randint(length // 2 + 1, length)
        letters = [major] * k + [minor] * (length - k)
        rng.shuffle(letters)
        return "".join(letters)

    rows, flipped = [], set()
    for i in range(n):
        chosen, rejected = response("a", "b"), response("b", "a")
        if rng.random() < flip_rate:
            chosen, rejected = rejected, chosen
            flipped.add(i)
        rows.append({"prompt": f"pick {i % 7}", "chosen": chosen, "rejected": rejected})
    return rows, flipped


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_strength_finds_flipped_labels_and_flipping_them_helps(tiny_text_dir, tmp_path):
    rows, flipped = synthetic_pairs(120, 0.4, seed=1)
    noisy = write(tmp_path / "noisy.jsonl", rows)
    clean = load_pairs(write(tmp_path / "clean.jsonl", synthetic_pairs(200, 0.0, seed=101)[0]))
    base = dict(model=str(tiny_text_dir), epochs=4, learning_rate=3e-3, progress=False, batch_size=8,
                save_steps=1000, max_length=64)
    metrics = preference_strength(noisy, TrainOptions(out=str(tmp_path / "strength"), **base), models=4)
    records = [json.loads(line) for line in (tmp_path / "strength" / "strength.jsonl").read_text().splitlines()]
    negative = np.array([r["mean"] < 0 for r in records])
    truth = np.array([i in flipped for i in range(len(rows))])
    precision = (negative & truth).sum() / negative.sum()
    recall = (negative & truth).sum() / truth.sum()
    assert precision > 0.85 and recall > 0.85  # measured: 0.97 and 0.93
    assert (negative & ~truth).sum() / (~truth).sum() < 0.05  # clean pairs rarely look incorrect
    assert metrics["categories"]["incorrect"] == negative.sum()
    assert [r["category"] for r in records] == [categorise(r["mean"], metrics["band"]) for r in records]
    assert (tmp_path / "strength" / "strength.png").stat().st_size > 1000

    def clean_fit(name, **kw):
        m = train_reward(noisy, TrainOptions(out=str(tmp_path / name), eval_fraction=0.0, **base), **kw)
        diffs = score_pairs(load_reward_backbone(m["model"]), load_tokenizer(m["model"]), clean, 64)
        return m, (diffs > 0).float().mean().item(), -F.logsigmoid(diffs).mean().item()

    _, noisy_accuracy, noisy_loss = clean_fit("noisy")
    fixed, flipped_accuracy, flipped_loss = clean_fit("flipped", strength=tmp_path / "strength" / "strength.jsonl",
                                                      flip_fraction=0.5)
    assert fixed["pairs"]["flipped"] == negative.sum()  # only negative-strength pairs are flipped
    # On clean held-out pairs: measured accuracy 0.940 -> 0.940 (0.975 with another batch order),
    # Bradley-Terry loss 0.47 -> 0.09: the noisy model is right as often, but far less sure.
    assert flipped_accuracy >= noisy_accuracy and flipped_loss < 0.5 * noisy_loss


def test_strength_members_are_reused_on_resume(tiny_text_dir, tmp_path, monkeypatch):
    pairs = load_pairs(write(tmp_path / "d.jsonl", synthetic_pairs(16, 0.0, seed=2)[0]))
    options = TrainOptions(model=str(tiny_text_dir), out=str(tmp_path / "s"), max_steps=2, progress=False,
                           save_steps=1000, max_length=64)
    first = ensemble_strength(pairs, options, models=2)
    import train.strength

    monkeypatch.setattr(train.strength, "fit_reward_model", lambda *a, **k: pytest.fail("member retrained"))
    again = ensemble_strength(pairs, options, models=2)
    assert all(np.array_equal(a, b) for a, b in zip(first, again))


# -- the reward potential ------------------------------------------------------------------------------
T = 3
TEMPERATURE = 0.05


@pytest.fixture(scope="module")
def tiny_reward_dir(tiny_text_dir, tmp_path_factory):
    """A randomly initialised reward model: its rewards vary enough across texts to move the target."""
    path = tmp_path_factory.mktemp("reward")
    torch.manual_seed(0)
    model = load_reward_backbone(tiny_text_dir)
    with torch.no_grad():
        model.score.weight.normal_(0, 1.0)
    model.save_pretrained(path)
    load_tokenizer(tiny_text_dir).save_pretrained(path)
    return path


class Rewarded(steer.Program):
    def __init__(self, lm, reward_model):
        super().__init__()
        self.ctx = LMContext(lm, "")
        self.reward_model = reward_model

    async def step(self):
        token = await self.sample(self.ctx.next_token())
        done = token.is_eos or len(self.ctx.generated) >= T
        await self.reward_model.guide(self, "say", self.ctx.text, final=done)
        if done:
            self.finish()

    def result(self):
        return tuple(self.ctx.generated)


def test_reward_potential_targets_lm_times_exp_reward(tiny_lm, tiny_reward_dir):
    reward_model = RewardModel(tiny_reward_dir, temperature=TEMPERATURE)
    eos = next(iter(tiny_lm.vocab.eos_ids))
    target = {}
    for seq, logp in complete_sequences(tiny_lm, tiny_lm.encode(""), T).items():
        text = tiny_lm.decode([t for t in seq if t != eos])
        target[seq] = logp + reward_model.rewards(["say"], [text])[0] / TEMPERATURE
    log_z = np.logaddexp.reduce(list(target.values()))
    exact = {k: math.exp(v - log_z) for k, v in target.items()}
    lm_only = {k: math.exp(v) for k, v in complete_sequences(tiny_lm, tiny_lm.encode(""), T).items()}
    assert 0.5 * sum(abs(exact[k] - lm_only[k]) for k in exact) > 0.1  # the reward really moves the target

    estimate, log_mls = {}, []
    for seed in range(3):
        post = steer.smc(Rewarded(tiny_lm, reward_model), particles=1000, seed=seed)
        log_mls.append(post.log_ml)
        for k, w in post.distribution().items():
            estimate[k] = estimate.get(k, 0.0) + w / 3
    tv = 0.5 * sum(abs(estimate.get(k, 0.0) - p) for k, p in exact.items())
    assert tv < 0.06
    assert np.mean(log_mls) == pytest.approx(log_z, abs=0.1)


def test_reward_model_scores_agree_with_training_and_batch(tiny_reward_dir, arithmetic_pairs):
    pairs = load_pairs(arithmetic_pairs)[:5]
    reward_model = RewardModel(tiny_reward_dir)
    instructions = [p.prompt.split("\n")[1] for p in pairs]
    chosen = reward_model.rewards(instructions, [p.chosen for p in pairs])
    rejected = reward_model.rewards(instructions, [p.rejected for p in pairs])
    direct = score_pairs(reward_model.model, reward_model.tokenizer, pairs, 512)
    assert torch.allclose(torch.tensor(chosen) - torch.tensor(rejected), direct, atol=1e-4)
    single = RewardModel(tiny_reward_dir, batch_size=1).rewards(instructions, [p.chosen for p in pairs])
    assert np.allclose(single, chosen, atol=1e-4)  # padding in a batch does not change a score


STEER_PROGRAM = """
reward_model judge = "{path}"
input temperature = {temperature}
context c = ""
repeat {T}:
    t = sample next(c)
    if t == eos:
        stop
    twist reward(judge, "say", text(c)) / temperature
score reward(judge, "say", text(c)) / temperature
"""


def exact_reward_target(lm, reward_model):
    eos = next(iter(lm.vocab.eos_ids))
    target = {}
    for seq, logp in complete_sequences(lm, lm.encode(""), T).items():
        text = lm.decode([t for t in seq if t != eos])
        target[text] = np.logaddexp(target.get(text, -np.inf),
                                    logp + reward_model.rewards(["say"], [text])[0] / TEMPERATURE)
    log_z = np.logaddexp.reduce(list(target.values()))
    return {k: math.exp(v - log_z) for k, v in target.items()}, log_z


def test_steer_file_reward_potential_targets_lm_times_exp_reward(tiny_lm, tiny_reward_dir, tmp_path):
    from steer_lang.script import Script

    source = STEER_PROGRAM.format(path=tiny_reward_dir, temperature=TEMPERATURE, T=T)
    script = Script.from_source(source, "reward.steer", allow_paths=[tiny_reward_dir])
    exact, log_z = exact_reward_target(tiny_lm, script.resources()["judge"])
    estimate, log_mls = {}, []
    for seed in range(3):
        post = script.run(tiny_lm, particles=1000, seed=seed)
        log_mls.append(post.log_ml)
        for k, w in post.distribution().items():
            estimate[k] = estimate.get(k, 0.0) + w / 3
    assert 0.5 * sum(abs(estimate.get(k, 0.0) - p) for k, p in exact.items()) < 0.06
    assert np.mean(log_mls) == pytest.approx(log_z, abs=0.1)


@pytest.mark.parametrize("body, message", [
    ('if reward(judge, "a", "b") > 0:\n    finish\n', "reward() calls a model"),
    ('def f(x):\n    return reward(judge, "a", x)\nscore f("b")\n', "reward() calls a model, which function 'f'"),
    ('score reward("judge", "a", "b")\n', "reward_model"),
    ('reward_model judge = "other"\n', "already declared"),
])
def test_misused_reward_calls_are_check_errors(body, message):
    from steer_lang.errors import LangError
    from steer_lang.script import Script

    with pytest.raises(LangError) as info:
        Script.from_source('reward_model judge = "rm"\n' + body, "bad.steer")
    assert message in str(info.value)


def test_decile_table_shows_weak_pairs_teach_the_wrong_preference(tiny_text_dir, tmp_path):
    rows, _ = synthetic_pairs(100, 0.3, seed=3)
    data = write(tmp_path / "noisy.jsonl", rows)
    options = TrainOptions(model=str(tiny_text_dir), out=str(tmp_path / "s"), epochs=4, learning_rate=3e-3,
                           progress=False, batch_size=8, save_steps=1000, max_length=64, eval_fraction=0.2)
    metrics = preference_strength(data, options, models=4, deciles=True)
    table = metrics["deciles"]
    assert [r["decile"] for r in table] == list(range(1, 11)) and sum(r["pairs"] for r in table) == 80
    strengths = [r["mean_strength"] for r in table]
    assert strengths == sorted(strengths)
    # The weakest decile is mostly flipped pairs: a model trained on it prefers the wrong answers.
    assert table[0]["validation_accuracy"] < 0.5 < table[-1]["validation_accuracy"]
    assert "| 10 |" in (tmp_path / "s" / "report.md").read_text()


def test_a_long_text_keeps_its_response_end_and_says_so(tiny_reward_dir):
    """Past max_length the reward reads the BOS token and the text's last tokens (the response and the
    EOS the head pools), as a direct forward pass on exactly those tokens does; changing the start of
    the instruction then changes nothing, changing the response's end does; a warning says so."""
    from steer.template import format_prompt

    reward_model = RewardModel(tiny_reward_dir, max_length=48)
    tokenizer, model = reward_model.tokenizer, reward_model.model
    instruction, response = "x" * 150, "the answer is 42"
    with pytest.warns(UserWarning, match="start of its prompt is cut"):
        score = reward_model.rewards([instruction], [response])[0]
    ids = tokenizer(format_prompt(instruction) + response + tokenizer.eos_token)["input_ids"]
    assert len(ids) > 48
    head = [ids[0]] if ids[0] == tokenizer.bos_token_id else []
    kept = head + ids[len(ids) - 48 + len(head):]
    assert len(kept) == 48 and kept[-1] == tokenizer.eos_token_id
    with torch.no_grad():
        direct = model(input_ids=torch.tensor([kept])).logits[0, 0].item()
    assert score == pytest.approx(direct, abs=1e-5)
    assert reward_model.rewards(["y" + instruction[1:]], [response])[0] == pytest.approx(score, abs=1e-6)
    assert reward_model.rewards([instruction], [response[:-2] + "7."])[0] != pytest.approx(score, abs=1e-6)


def test_a_fresh_head_starts_at_zero_and_the_metrics_say_before_after_and_baseline(tiny_text_dir, arithmetic_pairs,
                                                                                    tmp_path):
    """A causal LM's new score head is zero (every pair a tie: accuracy 0.5 with ties half, before any
    step); after training, the held-out accuracy is the share of positive margins r(chosen) - r(rejected)
    computed directly; the length baseline prefers the longer (here always the wrong) response."""
    model = load_reward_backbone(tiny_text_dir)
    assert not model.score.weight.any()
    opts = TrainOptions(model=str(tiny_text_dir), out=str(tmp_path / "rm"), max_steps=6, batch_size=4,
                        learning_rate=3e-3, eval_fraction=0.34, save_steps=100, progress=False, max_length=64)
    metrics = train_reward(arithmetic_pairs, opts)
    before, after = metrics["eval_before"], metrics["eval"]
    assert before["pair_ties"] == 1.0 and before["pair_accuracy"] == 0.5
    assert metrics["length_baseline"]["pair_accuracy"] == 0.0  # the rejected "n maybe" is always longer
    assert metrics["pairs"]["kept_share"] == 1.0
    evaluation = split_by_prompt(load_pairs(arithmetic_pairs), 0.34, opts.seed)[1]
    trained = load_reward_backbone(metrics["model"])
    diffs = score_pairs(trained, load_tokenizer(metrics["model"]), evaluation, 64)
    assert after["pairs"] == len(evaluation)
    assert after["pair_accuracy"] == pytest.approx(float((diffs > 0).float().mean() + 0.5 * (diffs == 0).float().mean()))
    assert after["pair_accuracy_ci95"][0] <= after["pair_accuracy"] <= after["pair_accuracy_ci95"][1]
