"""One preference, trained in (DPO) or steered in (SMC), beside best-of-N, on one reward-KL plot.

The reward r(x) counts positive words (bench/soft.py's list) in a response of at most 20 tokens to
"Write a short review of <subject>." (steer's instruction template, the default model).  For a
temperature beta the KL-regularised optimum is pi*(x) = p(x) exp(r(x)/beta) / Z, which is

(a) what DPO at beta trains towards: LoRA on pairs of the base model's own responses to training
    subjects (the best and the worst of `--candidates` by r, ties dropped, and with
    `--pairs-per-subject K` up to K - 1 more pairs of them whose rewards differ); the trained policy is
    sampled on held-out subjects, and KL(pi || p) = E_pi[log pi(x) - log p(x)] over its samples;
(a') with `--online-steps N`, what online DPO at beta trains towards too: N steps, each drawing two
    responses to each of 8 training subjects from the policy as it trains, ranked by r, against the
    base model as reference; evaluated as (a);
(b) exactly the target of SMC steering with `prefer_words(words, 1/beta)`: E[r] from the weighted
    particles, KL = E[r]/beta - log Z from the weights and log_ml (`Posterior.kl_to_base`);
(c) approached by best-of-N for N in --best-of: E[r] of the best of N base samples, KL <= log N -
    (N - 1)/N (the usual analytical bound).

Intervals are 95% bootstrap intervals over held-out subjects.  Costs: DPO's training minutes (data
generation included) and every method's sampling seconds per output.

    python bench/preference_frontier.py [--betas 2 1 0.5] [--online-steps 60] [--out runs/frontier]

Prints a table and a final JSON line; writes frontier.png and frontier.json to --out.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from soft import WORDS, hits  # noqa: E402

import steer  # noqa: E402
from steer.context import LMContext  # noqa: E402
from steer.lm.loading import default_model_path  # noqa: E402
from steer.template import format_prompt  # noqa: E402
from train.common import TrainOptions, load_causal_lm, load_tokenizer  # noqa: E402
from train.dpo import train_dpo  # noqa: E402
from train.online_dpo import train_online_dpo  # noqa: E402
from train.intervals import grouped_mean_ci95  # noqa: E402

TOKENS = 20
SUBJECTS = ["the movie Titanic", "a pizza place downtown", "a beach hotel", "a jazz concert", "a new phone",
            "a science fiction novel", "a video game", "an art museum", "a coffee shop", "a bicycle",
            "a cooking class", "a theme park", "a train journey", "a board game", "a laptop", "a football match",
            "a sushi bar", "a camping trip", "a musical", "a gym", "a dentist", "a bookshop", "a zoo", "a bakery",
            "a rock album", "a history podcast", "a pair of running shoes", "a ski resort", "a ferry ride",
            "a yoga studio", "a car wash", "an airline", "a library", "a farmers market", "a comedy show",
            "a wine bar", "a tablet", "a hiking trail", "a spa", "a vegan restaurant", "a cinema",
            "a documentary", "a science museum", "a hostel", "a guided tour", "a food truck", "a watch",
            "a water park", "a jazz album", "a language course", "a bus company", "an opera", "a tea house",
            "a children's book", "a sports bar", "a botanical garden"]


def instruction(subject: str) -> str:
    return f"Write a short review of {subject}."


# -- sampling from a Hugging Face model and scoring its samples -------------------------------------------
def sample(model, tokenizer, prompts: list[str], n: int, seed: int) -> list[list[list[int]]]:
    """n pure samples (temperature 1, no top-k or top-p) of at most TOKENS tokens per prompt, as ids."""
    torch.manual_seed(seed)
    out = []
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt")
        with torch.no_grad():
            gen = model.generate(**ids, do_sample=True, top_k=0, top_p=1.0, temperature=1.0, max_new_tokens=TOKENS,
                                 num_return_sequences=n, pad_token_id=tokenizer.pad_token_id)
        rows = []
        for row in gen[:, ids["input_ids"].shape[1]:].tolist():
            if tokenizer.eos_token_id in row:
                row = row[:row.index(tokenizer.eos_token_id) + 1]
            rows.append([t for t in row if t != tokenizer.pad_token_id])
        out.append(rows)
    return out


def log_prob(model, tokenizer, prompt: str, response: list[int]) -> float:
    """log p(response | prompt) under `model`, summed over the response's tokens."""
    prefix = tokenizer(prompt)["input_ids"]
    ids = torch.tensor([prefix + response])
    with torch.no_grad():
        logits = model(ids).logits[0, len(prefix) - 1:-1].float()
    return float(logits.log_softmax(-1).gather(-1, torch.tensor(response)[:, None]).sum())


def text_of(tokenizer, response: list[int]) -> str:
    return tokenizer.decode(response, skip_special_tokens=True)


# -- the three methods ---------------------------------------------------------------------------------
class Steered(steer.Program):
    """The response drawn from p(x) exp(r(x)/beta): the word tilt with bonus 1/beta is this target."""

    def __init__(self, lm, prompt: str, beta: float):
        super().__init__()
        self.ctx = LMContext(lm, prompt, heal=False)
        self.tilt = steer.tilts.prefer_words(WORDS, 1.0 / beta)

    async def step(self):
        token = await self.sample(self.ctx.next_token(tilt=self.tilt))
        if token.is_eos or self.ctx.written >= TOKENS:
            if not token.is_eos:
                self.score(self.tilt.settle(self.ctx))
            self.finish()


def steered(lm, subjects: list[str], beta: float, particles: int, seed: int) -> dict:
    rewards, kls, seconds = [], [], 0.0
    for k, subject in enumerate(subjects):
        post = steer.smc(Steered(lm, format_prompt(instruction(subject)), beta), particles=particles, seed=seed + k)
        r = [hits(p.ctx.text) for p in post.particles]
        rewards.append([float(np.dot(post.weights, r))])
        kls.append([post.kl_to_base([x / beta for x in r])])
        seconds += post.seconds
    return summarise(rewards, kls, seconds / len(subjects))


def best_of(samples: dict[str, list[str]], n: int) -> dict:
    """The reward of the best of n base samples, per subject over all its disjoint groups of n."""
    rewards = []
    for texts in samples.values():
        groups = [texts[i:i + n] for i in range(0, len(texts) - n + 1, n)]
        rewards.append([float(max(hits(t) for t in g)) for g in groups])
    kl = float(np.log(n) - (n - 1) / n)
    return summarise(rewards, [[kl]] * len(rewards), None)


def summarise(rewards: list[list[float]], kls: list[list[float]], seconds: float | None) -> dict:
    return {"reward": float(np.mean([x for g in rewards for x in g])), "reward_ci95": grouped_mean_ci95(rewards),
            "kl": float(np.mean([x for g in kls for x in g])), "kl_ci95": grouped_mean_ci95(kls),
            "seconds_per_output": seconds}


def preference_pairs(base, tokenizer, subjects: list[str], candidates: int, per_subject: int, seed: int,
                     out: Path) -> Path:
    """The base model's responses to the training subjects as pairs ranked by r, written as JSONL: per
    subject the best against the worst, then up to `per_subject - 1` more pairs drawn at random from
    the others whose rewards differ (subjects whose responses all score the same give none)."""
    prompts = [format_prompt(instruction(s)) for s in subjects]
    rng = np.random.default_rng(seed)
    rows = []
    for subject, responses in zip(subjects, sample(base, tokenizer, prompts, candidates, seed)):
        texts = dict.fromkeys(t for t in (text_of(tokenizer, r).strip() for r in responses) if t)
        scored = sorted(((hits(t), t) for t in texts), key=lambda x: x[0])
        ordered = [(c, r) for c in scored for r in scored if c[0] > r[0]]
        if not ordered:
            continue
        first = (scored[-1], scored[0])
        others = [p for p in ordered if p != first]
        picked = [first, *(others[i] for i in rng.permutation(len(others))[:per_subject - 1])]
        rows += [{"prompt": instruction(subject), "chosen": c[1], "rejected": r[1]} for c, r in picked]
    path = out / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def dpo_arm(base, tokenizer, data: Path, eval_subjects: list[str], beta: float, args, out: Path,
            pair_minutes: float) -> dict:
    started = time.perf_counter()
    options = TrainOptions(model=str(default_model_path()), out=str(out / f"dpo-beta{beta:g}"), epochs=args.epochs,
                           batch_size=8, learning_rate=args.lr, max_length=96, lora=True, lora_r=16,
                           eval_fraction=0.1, save_steps=10_000, progress=False, seed=args.seed)
    metrics = train_dpo(data, options, beta=beta)
    minutes = (time.perf_counter() - started) / 60 + pair_minutes
    return {**sampled_policy(Path(metrics["model"]), base, tokenizer, eval_subjects, args),
            "training_minutes": minutes, "pairs": sum(1 for _ in data.open()),
            "held_out_pair_accuracy": (metrics.get("eval") or {}).get("pair_accuracy")}


def online_dpo_arm(base, tokenizer, train_subjects: list[str], eval_subjects: list[str], beta: float, args,
                   out: Path) -> dict:
    """On-policy DPO at beta: every step draws two responses per training subject from the policy as it
    is, ranks them by r and takes a DPO step against the base model (the adapter switched off)."""
    started = time.perf_counter()
    options = TrainOptions(model=str(default_model_path()), out=str(out / f"online-dpo-beta{beta:g}"),
                           max_steps=args.online_steps, batch_size=8, learning_rate=args.online_lr, max_length=96,
                           lora=True, lora_r=16, save_steps=10_000, progress=False, seed=args.seed)
    metrics = train_online_dpo([format_prompt(instruction(s)) for s in train_subjects],
                               lambda _, responses: [float(hits(r)) for r in responses], options, beta=beta,
                               max_new_tokens=TOKENS)
    minutes = (time.perf_counter() - started) / 60
    return {**sampled_policy(Path(metrics["model"]), base, tokenizer, eval_subjects, args),
            "training_minutes": minutes, "steps": args.online_steps,
            "drawn_reward_first": metrics["reward_first"], "drawn_reward_last": metrics["reward_last"]}


def sampled_policy(model: Path, base, tokenizer, eval_subjects: list[str], args) -> dict:
    """A trained policy sampled on the held-out subjects: its mean reward, and KL(pi || p) =
    E_pi[log pi(x) - log p(x)] over its samples."""
    policy = load_causal_lm(model).eval()
    rewards, kls = [], []
    sample_started = time.perf_counter()
    eval_prompts = [format_prompt(instruction(s)) for s in eval_subjects]
    drawn = sample(policy, tokenizer, eval_prompts, args.samples, args.seed + 1)
    seconds = (time.perf_counter() - sample_started) / (len(eval_prompts) * args.samples)
    for prompt, responses in zip(eval_prompts, drawn):
        rewards.append([float(hits(text_of(tokenizer, r))) for r in responses])
        kls.append([log_prob(policy, tokenizer, prompt, r) - log_prob(base, tokenizer, prompt, r) for r in responses])
    return summarise(rewards, kls, seconds)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for method, marker in (("base", "s"), ("best-of-N", "^"), ("SMC", "o"), ("DPO", "D"), ("online DPO", "v")):
        mine = [r for r in rows if r["method"] == method]
        if not mine:
            continue
        ax.errorbar([r["kl"] for r in mine], [r["reward"] for r in mine],
                    yerr=[[r["reward"] - r["reward_ci95"][0] for r in mine],
                          [r["reward_ci95"][1] - r["reward"] for r in mine]] if mine[0]["reward_ci95"] else None,
                    marker=marker, linestyle="-" if len(mine) > 1 else "", label=method, capsize=2)
        for r in mine:
            ax.annotate(r["setting"], (r["kl"], r["reward"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("KL(method || base model), nats")
    ax.set_ylabel("positive words per response")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def measured(args) -> list[dict]:
    """Every method's row, measured."""
    eval_subjects = SUBJECTS[:args.eval_subjects]
    train_subjects = SUBJECTS[args.eval_subjects:][:args.train_subjects]
    lm = steer.load_model()
    tokenizer = load_tokenizer(default_model_path())
    base = load_causal_lm(default_model_path()).eval()
    started = time.perf_counter()
    eval_prompts = [format_prompt(instruction(s)) for s in eval_subjects]
    n_max = max(args.best_of)
    drawn = sample(base, tokenizer, eval_prompts, max(n_max * 2, args.samples), args.seed + 2)
    base_seconds = (time.perf_counter() - started) / sum(map(len, drawn))
    texts = {s: [text_of(tokenizer, r) for r in rows] for s, rows in zip(eval_subjects, drawn)}

    rows = [{"method": "base", "setting": "", **summarise([[float(hits(t)) for t in v] for v in texts.values()],
                                                          [[0.0]] * len(texts), base_seconds)}]
    for n in args.best_of:
        rows.append({"method": "best-of-N", "setting": f"N={n}", **best_of(texts, n),
                     "seconds_per_output": base_seconds * n})
    for beta in args.betas:
        rows.append({"method": "SMC", "setting": f"beta={beta:g}", "beta": beta,
                     **steered(lm, eval_subjects, beta, args.particles, args.seed)})
    if not args.no_dpo:
        started = time.perf_counter()
        data = preference_pairs(base, tokenizer, train_subjects, args.candidates, args.pairs_per_subject, args.seed,
                                args.out)
        pair_minutes = (time.perf_counter() - started) / 60  # counted in every beta's training time
        for beta in args.betas:
            rows.append({"method": "DPO", "setting": f"beta={beta:g}", "beta": beta,
                         **dpo_arm(base, tokenizer, data, eval_subjects, beta, args, args.out, pair_minutes)})

    for beta in args.betas if args.online_steps > 0 else []:
        rows.append({"method": "online DPO", "setting": f"beta={beta:g}", "beta": beta,
                     **online_dpo_arm(base, tokenizer, train_subjects, eval_subjects, beta, args, args.out)})

    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--betas", type=float, nargs="+", default=[2.0, 1.0, 0.5])
    parser.add_argument("--best-of", type=int, nargs="+", default=[2, 4, 8, 16])
    parser.add_argument("--eval-subjects", type=int, default=8)
    parser.add_argument("--train-subjects", type=int, default=len(SUBJECTS), help="at most this many train on")
    parser.add_argument("--samples", type=int, default=16, help="samples per held-out subject")
    parser.add_argument("--particles", type=int, default=16)
    parser.add_argument("--candidates", type=int, default=8, help="base responses per training subject")
    parser.add_argument("--pairs-per-subject", type=int, default=1,
                        help="DPO pairs per training subject: the best against the worst, then random others")
    parser.add_argument("--epochs", type=float, default=2.0)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--no-dpo", action="store_true", help="skip the offline DPO arm")
    parser.add_argument("--online-steps", type=int, default=0,
                        help="also train online DPO for this many steps (8 prompts a step) at each beta")
    parser.add_argument("--online-lr", type=float, default=1e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--merge", type=Path, nargs="*", default=[],
                        help="earlier runs' frontier.json: their trained arms join this run's table and plot")
    parser.add_argument("--replot", action="store_true",
                        help="measure nothing: redraw the table and plot of OUT/frontier.json (with --merge)")
    parser.add_argument("--out", type=Path, default=Path("runs/frontier"))
    args = parser.parse_args()
    if args.pairs_per_subject < 1:
        parser.error(f"--pairs-per-subject must be at least 1, got {args.pairs_per_subject}")
    args.out.mkdir(parents=True, exist_ok=True)

    if args.replot:  # (rows an earlier --merge added are merged anew)
        rows = [r for r in json.loads((args.out / "frontier.json").read_text()) if "from" not in r]
    else:
        rows = measured(args)
    for earlier in args.merge:  # (the same base model, subjects and seeds: its base rows are this run's)
        rows += [{**r, "setting": f"{r['setting']}, {earlier.parent.name}", "from": str(earlier)}
                 for r in json.loads(earlier.read_text()) if r["method"] in ("DPO", "online DPO") and "from" not in r]

    def ci(x):
        return f"[{x[0]:.2f}, {x[1]:.2f}]" if x else "-"

    print(f"{'method':<10} {'setting':<10} {'reward':>7} {'95% CI':>14} {'KL':>7} {'95% CI':>14} "
          f"{'s/output':>9} {'train min':>9}")
    for r in rows:
        print(f"{r['method']:<10} {r['setting']:<10} {r['reward']:>7.2f} {ci(r['reward_ci95']):>14} {r['kl']:>7.2f} "
              f"{ci(r['kl_ci95']):>14} {r['seconds_per_output'] or 0:>9.2f} {r.get('training_minutes', 0):>9.1f}")
    plot(rows, args.out / "frontier.png")
    (args.out / "frontier.json").write_text(json.dumps(rows, indent=1))
    print(json.dumps({"rows": rows, "out": str(args.out)}))


if __name__ == "__main__":
    main()
