"""`steer train ...`: the trainers (and the In-Context Pretraining ordering) from the command line.

Every command takes the same run flags (model, data, output, length of training, LoRA, seed,
checkpoints, resume) and writes `OUT/metrics.json` at the end; the trained model lands in `OUT/model`.
"""

from __future__ import annotations

import argparse
import json
import sys

from steer.cli import positive
from steer.errors import SteerError

from .common import TrainOptions

# Each command imports its trainer when it runs: TRL, PEFT and the embedders take seconds to import,
# and `steer --help` or another command should not wait for them.


def _fraction(name: str, high: float = 1.0):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be a number, got {text!r}") from None
        if not 0 <= value < high:
            raise argparse.ArgumentTypeError(f"{name} must be in [0, {high}), got {value}")
        return value

    return parse


def _run_flags(parser: argparse.ArgumentParser, lr: float, data: bool = True, lora_lr: float | None = None) -> None:
    if data:
        parser.add_argument("--data", required=True, help="JSONL data file (.jsonl or .jsonl.gz)")
    parser.add_argument("--model", default=None, help="local HF model directory (default: Gemma 3 270M)")
    parser.add_argument("--out", required=True, help="output directory: checkpoints, model/, metrics.json")
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--max-steps", type=int, default=-1, help="stop after N optimiser steps (overrides --epochs)")
    parser.add_argument("--batch-size", type=positive("--batch-size"), default=2)
    parser.add_argument("--grad-accum", type=positive("--grad-accum"), default=1)
    if lora_lr is None:
        parser.add_argument("--lr", type=float, default=lr)
    else:  # a LoRA adapter barely moves at a full fine-tune's learning rate
        parser.add_argument("--lr", type=float, default=None, help=f"default: {lora_lr:g} with --lora, else {lr:g}")
        parser.set_defaults(lr_default=(lr, lora_lr))
    parser.add_argument("--max-length", type=positive("--max-length"), default=256, help="tokens per sequence")
    parser.add_argument("--lora", action="store_true", help="train a LoRA adapter instead of every weight")
    parser.add_argument("--lora-r", type=positive("--lora-r"), default=16)
    parser.add_argument("--lora-alpha", type=positive("--lora-alpha"), default=None, help="LoRA scale (default: 2 x r)")
    parser.add_argument("--lora-dropout", type=_fraction("--lora-dropout"), default=0.0)
    parser.add_argument("--lora-targets", default="all-linear",
                        help='modules to adapt: "all-linear" (every linear layer but the head) or names, '
                             'comma-separated (e.g. q_proj,v_proj)')
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--save-steps", type=positive("--save-steps"), default=50, help="checkpoint every K steps")
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    parser.add_argument("--eval-fraction", type=_fraction("--eval-fraction"), default=0.1,
                        help="share of the data held out for evaluation")
    parser.add_argument("--eval-steps", type=int, default=0, help="also evaluate every K steps (0: only at the end)")
    parser.add_argument("--limit", type=positive("--limit"), default=None, help="use only the first N rows")
    parser.add_argument("--bf16", action="store_true", help="bfloat16 mixed precision (GPUs; slow or failing on CPU)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def _options(args: argparse.Namespace) -> TrainOptions:
    lr = args.lr if args.lr is not None else args.lr_default[1 if args.lora else 0]
    return TrainOptions(model=args.model, out=args.out, epochs=args.epochs, max_steps=args.max_steps,
                        batch_size=args.batch_size, grad_accum=args.grad_accum, learning_rate=lr,
                        max_length=args.max_length, lora=args.lora, lora_r=args.lora_r,
                        lora_alpha=args.lora_alpha or 2 * args.lora_r, lora_dropout=args.lora_dropout,
                        lora_targets=args.lora_targets,
                        seed=args.seed, save_steps=args.save_steps, eval_fraction=args.eval_fraction,
                        eval_steps=args.eval_steps, limit=args.limit, resume=args.resume, bf16=args.bf16,
                        progress=not args.no_progress)


def _print_json(value) -> None:
    """One JSON line on stdout, from the main process only (a multi-process run prints it once)."""
    from .common import is_main_process

    if is_main_process():
        print(json.dumps(value))


def _summary(metrics: dict, keys: tuple[str, ...]) -> None:
    evaluation = metrics.get("eval") or {}
    shown = {k: evaluation[k] for k in keys if k in evaluation}
    _print_json({"out": metrics.get("model"), "steps": metrics.get("train", {}).get("steps"), **shown})


def _sft(args: argparse.Namespace) -> int:
    from .sft import train_sft

    _summary(train_sft(args.data, _options(args)), ("eval_loss", "eval_mean_token_accuracy"))
    return 0


def _dpo(args: argparse.Namespace) -> int:
    from .dpo import train_dpo

    metrics = train_dpo(args.data, _options(args), beta=args.beta, loss_type=args.loss,
                        label_smoothing=args.label_smoothing, precompute_ref=args.precompute_ref,
                        fast_head=not args.trl_head, sft_first=args.sft_first)
    _summary(metrics, ("eval_loss", "pair_accuracy", "eval_rewards/margins"))
    return 0


def _online_dpo(args: argparse.Namespace) -> int:
    from steer.potentials import RewardModel

    from .data import load_prompts
    from .online_dpo import train_online_dpo

    prompts = load_prompts(args.data)  # (a bad data file is told before any model loads)
    judge = RewardModel(args.reward_model, max_length=args.max_length)
    metrics = train_online_dpo(prompts, judge.score_laid_out, _options(args), beta=args.beta,
                               max_new_tokens=args.max_new_tokens)
    _print_json({"out": metrics["model"], "steps": metrics["train"]["steps"],
                 "reward_first": metrics["reward_first"], "reward_last": metrics["reward_last"]})
    return 0


def _reward(args: argparse.Namespace) -> int:
    from .reward import train_reward

    metrics = train_reward(args.data, _options(args), label_smoothing=args.label_smoothing, strength=args.strength,
                           contrastive=args.contrastive, meta_data=args.meta_data, meta_lr=args.meta_lr,
                           flip_fraction=args.flip, adaptive_margin=args.adaptive_margin)
    _summary(metrics, ("eval_loss", "pair_accuracy", "eval_margin"))
    return 0


def _sample(args: argparse.Namespace) -> int:
    from .generation import sample_response_sets

    _print_json(sample_response_sets(args.data, args.out, model=args.model, n=args.n, prompts=args.prompts,
                                     split=args.split, eval_fraction=args.eval_fraction, seed=args.seed,
                                     max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                     top_p=args.top_p, batch_size=args.batch_size, progress=not args.no_progress))
    return 0


def _strength(args: argparse.Namespace) -> int:
    from .strength import preference_strength

    metrics = preference_strength(args.data, _options(args), models=args.models, train_fraction=args.train_fraction,
                                  band=args.band, deciles=args.deciles)
    _print_json({"out": args.out, "pairs": metrics["pairs"], "categories": metrics["categories"],
                 "band": metrics["band"]})
    return 0


def _self_reward(args: argparse.Namespace) -> int:
    from .self_reward import SelfRewardConfig, self_reward

    config = SelfRewardConfig(iterations=args.iterations, prompts_per_iter=args.prompts_per_iter,
                              candidates=args.candidates, judgments=args.judgments,
                              max_new_tokens=args.max_new_tokens, judge_tokens=args.judge_tokens,
                              held_out=args.held_out, questions=args.questions, seed_limit=args.seed_limit,
                              judge=args.judge)
    options = _options(argparse.Namespace(**{**vars(args), "data": None}))
    metrics = self_reward(args.seed_data, options, config, dpo_options={"beta": args.beta})
    _print_json({"out": args.out, "iterations": metrics["iterations"],
                 "tokens_per_second": metrics["generation"]["tokens_per_second"]})
    return 0


def _checkable(args: argparse.Namespace) -> int:
    from .checkable_reward import CheckableConfig, checkable_self_reward

    config = CheckableConfig(iterations=args.iterations, train_questions=args.train_questions,
                             eval_questions=args.eval_questions, candidates=args.candidates)
    options = _options(argparse.Namespace(**{**vars(args), "data": None}))
    metrics = checkable_self_reward(args.qa, args.passages, options, config, dpo_options={"beta": args.beta})
    _print_json({"out": args.out, "exact_match": {f"M{t}": m["exact_match"] for t, m in metrics["models"].items()},
                 "change_vs_m0": {f"M{t}": m["vs_m0"] for t, m in metrics["models"].items() if "vs_m0" in m}})
    return 0


def _pretrain(args: argparse.Namespace) -> int:
    from .pretrain import pretrain

    metrics = pretrain(args.data, _options(args), config=args.config, eval_data=args.eval_data)
    _print_json({"out": metrics["model"], "steps": metrics["train"]["steps"],
                 "perplexity_before": (metrics.get("eval_before") or {}).get("perplexity"),
                 "perplexity": (metrics.get("eval") or {}).get("perplexity")})
    return 0


def _llara(args: argparse.Namespace) -> int:
    from .llara import train_llara

    metrics = train_llara(args.data, _options(args))
    _print_json({"out": metrics["model"], "steps": metrics["train"]["steps"],
                 "eval_loss_before": (metrics.get("eval_before") or {}).get("eval_loss"),
                 "eval_loss": (metrics.get("eval") or {}).get("eval_loss")})
    return 0


def _radit_lm(args: argparse.Namespace) -> int:
    from .radit import train_radit_lm

    metrics = train_radit_lm(args.data, args.index, _options(args), k=args.k)
    _summary(metrics, ("eval_loss", "eval_mean_token_accuracy"))
    return 0


def _radit_retriever(args: argparse.Namespace) -> int:
    from .radit import train_radit_retriever

    metrics = train_radit_retriever(args.data, args.index, args.out, lm=args.model, k=args.k, tau=args.tau,
                                    epochs=args.epochs, batch_size=args.batch_size, learning_rate=args.lr,
                                    limit=args.limit, eval_fraction=args.eval_fraction, seed=args.seed,
                                    progress=not args.no_progress)
    _print_json({"out": args.out, **{k: metrics[k] for k in ("questions", "before", "after")}})
    return 0


def _icp_order(args: argparse.Namespace) -> int:
    from retrieval.loading import load_embedder

    from .common import load_tokenizer, model_dir
    from .icp import order_corpus

    if not 0 < args.dedup <= 1.0001:
        raise SteerError(f"--dedup must be a cosine threshold in (0, 1], got {args.dedup}")
    stats = order_corpus(args.docs, args.out, k=args.k, window=args.window, dedup=args.dedup, variant=args.variant,
                         embedder=load_embedder(args.embedder), tokenizer=load_tokenizer(model_dir(args.model)),
                         output_format=args.format, seed=args.seed, limit=args.limit, batch_size=args.batch_size,
                         progress=not args.no_progress)
    shown = ("documents", "duplicates_removed", "ordered", "windows", "tokens", "adjacent_cosine", "topics")
    _print_json({"out": args.out, **{k: stats[k] for k in shown if k in stats}})
    return 0


def add_commands(commands) -> None:
    from .dpo import LOSS_TYPES

    train = commands.add_parser("train", help="train models: sft, dpo, reward, sample, strength, self-reward, checkable-reward, icp-order, pretrain, llara, radit-lm, radit-retriever")
    kinds = train.add_subparsers(dest="trainer", required=True, parser_class=type(train))

    sft = kinds.add_parser("sft", help="supervised fine-tuning on prompt/completion or messages JSONL")
    _run_flags(sft, lr=5e-5)
    sft.set_defaults(handler=_sft)

    dpo = kinds.add_parser("dpo", help="Direct Preference Optimization on prompt/chosen/rejected JSONL")
    _run_flags(dpo, lr=5e-6)
    dpo.add_argument("--beta", type=float, default=0.1)
    dpo.add_argument("--loss", choices=LOSS_TYPES, default="sigmoid")
    dpo.add_argument("--label-smoothing", type=_fraction("--label-smoothing", 0.5), default=0.0,
                     help="assumed label-noise rate (robust, exo_pair losses)")
    dpo.add_argument("--precompute-ref", action="store_true",
                     help="compute the reference log-probs once before training")
    dpo.add_argument("--sft-first", action="store_true",
                     help="fine-tune on the chosen responses first (into OUT/sft), then DPO from that model")
    dpo.add_argument("--trl-head", action="store_true",
                     help="use TRL's LM head over every position (default: completion positions only)")
    dpo.set_defaults(handler=_dpo)

    online = kinds.add_parser("online-dpo", help="on-policy DPO: each step's responses drawn from the policy "
                                                 "and ranked by a reward model")
    _run_flags(online, lr=5e-6, lora_lr=1e-4)
    online.add_argument("--reward-model", required=True,
                        help="a reward model directory (`steer train reward`'s OUT/model)")
    online.add_argument("--beta", type=float, default=0.1)
    online.add_argument("--max-new-tokens", type=positive("--max-new-tokens"), default=64)
    online.set_defaults(handler=_online_dpo)

    reward = kinds.add_parser("reward", help="a Bradley-Terry reward model on preference pairs")
    _run_flags(reward, lr=1e-5, lora_lr=2e-4)
    reward.add_argument("--label-smoothing", type=_fraction("--label-smoothing", 0.5), default=0.0)
    reward.add_argument("--strength", default=None, help="strength.jsonl from `steer train strength`")
    reward.add_argument("--flip", type=_fraction("--flip"), default=0.0,
                        help="flip the labels of this share of pairs, most negative strength first")
    reward.add_argument("--adaptive-margin", type=float, default=0.0,
                        help="margin = this x the pair's mean strength, in the loss")
    reward.add_argument("--contrastive", type=float, default=0.0,
                        help="weight of a SimCSE-style contrastive loss on the pairs' difference representations "
                             "beside Bradley-Terry (0: off; the paper's contrastive reward modelling)")
    reward.add_argument("--meta-data", default=None,
                        help='MetaRM: JSONL of {"prompt", "responses": [...]} sampled from the policy (the shifted '
                             "distribution); each step's gradient is taken after an ascent step on their difference loss")
    reward.add_argument("--meta-lr", type=float, default=1e-3, help="MetaRM's ascent step size")
    reward.set_defaults(handler=_reward)

    sample = kinds.add_parser("sample", help='sample a policy\'s responses to a file\'s prompts: {"prompt", '
                                             '"responses"} rows (MetaRM\'s --meta-data)')
    sample.add_argument("--data", required=True, help="preference pairs (their prompts are used) or rows with 'prompt'")
    sample.add_argument("--out", required=True, help="JSONL file to write")
    sample.add_argument("--model", default=None, help="the policy: a local HF model directory (default: Gemma 3 270M)")
    sample.add_argument("--n", type=positive("--n"), default=2, help="responses per prompt (at least 2)")
    sample.add_argument("--prompts", type=positive("--prompts"), default=None, help="draw this many prompts (seeded)")
    sample.add_argument("--split", choices=("all", "train", "eval"), default="all",
                        help="the side of the prompt split `steer train reward` makes with the same --seed and "
                             "--eval-fraction (train: a meta set that shares no prompt with the held-out pairs)")
    sample.add_argument("--eval-fraction", type=_fraction("--eval-fraction"), default=0.1)
    sample.add_argument("--seed", type=int, default=0)
    sample.add_argument("--max-new-tokens", type=positive("--max-new-tokens"), default=64)
    sample.add_argument("--temperature", type=float, default=0.7)
    sample.add_argument("--top-p", type=float, default=0.9)
    sample.add_argument("--batch-size", type=positive("--batch-size"), default=16, help="sequences per generate call")
    sample.add_argument("--no-progress", action="store_true", help="no progress bars")
    sample.set_defaults(handler=_sample)

    strength = kinds.add_parser("strength", help="preference strength of every pair from a reward-model ensemble")
    _run_flags(strength, lr=1e-5)
    strength.add_argument("--models", type=positive("--models"), default=4, help="reward models in the ensemble")
    strength.add_argument("--train-fraction", type=_fraction("--train-fraction"), default=0.5,
                          help="share of the pairs each model trains on")
    strength.add_argument("--band", type=float, default=None,
                          help="strengths in [0, band) are ambiguous (default: 0.25 x std of strengths)")
    strength.add_argument("--deciles", action="store_true",
                          help="also train one model per strength decile and report validation accuracy")
    strength.set_defaults(handler=_strength)

    loop = kinds.add_parser("self-reward", help="self-rewarding training: M1 = SFT(IFT+EFT), M_t+1 = DPO(AIFT(M_t))")
    _run_flags(loop, lr=5e-5, data=False)
    loop.add_argument("--seed-data", required=True,
                      help="directory with oasst2_quality_scored.jsonl.gz, self_instruct_seed.jsonl and "
                           "mt_bench_questions.jsonl (examples/data has them)")
    loop.add_argument("--iterations", type=positive("--iterations"), default=3, help="models M1..M_N")
    loop.add_argument("--prompts-per-iter", type=positive("--prompts-per-iter"), default=16)
    loop.add_argument("--candidates", type=positive("--candidates"), default=4)
    loop.add_argument("--judgments", type=positive("--judgments"), default=3, help="judgments averaged per response")
    loop.add_argument("--max-new-tokens", type=positive("--max-new-tokens"), default=96, help="per response")
    loop.add_argument("--judge-tokens", type=positive("--judge-tokens"), default=48, help="per judgment")
    loop.add_argument("--held-out", type=positive("--held-out"), default=16,
                      help="human-scored prompts for judge agreement")
    loop.add_argument("--questions", type=positive("--questions"), default=80, help="questions for win rates")
    loop.add_argument("--judge", default=None,
                      help="head-to-head judge: a reward model directory (steer train reward) or a causal LM "
                           "that is none of the models compared (without it, no win rates)")
    loop.add_argument("--seed-limit", type=positive("--seed-limit"), default=None,
                      help="training prompts taken from the seed data")
    loop.add_argument("--beta", type=float, default=0.1, help="DPO beta")
    loop.set_defaults(handler=_self_reward)

    checkable = kinds.add_parser("checkable-reward",
                                 help="the self-rewarding loop with a checked reward: iterative DPO on cloze-year "
                                      "questions, exact match as reward and as metric")
    _run_flags(checkable, lr=1e-4, data=False)
    checkable.add_argument("--qa", required=True, help="cloze questions: JSONL with question, answer, source "
                                                       "(examples/data/wikipedia_cloze_qa.jsonl)")
    checkable.add_argument("--passages", required=True, help="the source paragraphs: JSONL with id and text "
                                                             "(examples/data/wikipedia_passages.jsonl.gz)")
    checkable.add_argument("--iterations", type=positive("--iterations"), default=3, help="models M1..M_N")
    checkable.add_argument("--train-questions", type=positive("--train-questions"), default=240,
                           help="questions answered per iteration")
    checkable.add_argument("--eval-questions", type=positive("--eval-questions"), default=150,
                           help="held-out questions (whole articles)")
    checkable.add_argument("--candidates", type=positive("--candidates"), default=4, help="answers per question")
    checkable.add_argument("--beta", type=float, default=0.1, help="DPO beta")
    checkable.set_defaults(handler=_checkable)

    llara = kinds.add_parser("llara", help="adapt a causal LM into a text embedder (LLaRA: EBAE + EBAR)")
    _run_flags(llara, lr=1e-4)
    llara.set_defaults(handler=_llara, max_length=128)
    llara.epilog = ("--data: rows with 'passage' and 'next', or documents with 'article-paragraph' ids "
                    "(examples/data/wikipedia_passages.jsonl.gz); --max-length caps passage tokens")

    radit_lm = kinds.add_parser("radit-lm", help="RA-DIT LM-ft: SFT with one retrieved chunk per example")
    _run_flags(radit_lm, lr=5e-5)
    radit_lm.add_argument("--index", required=True, help="index directory of `steer index build`")
    radit_lm.add_argument("--k", type=positive("--k"), default=2, help="chunks per question (one per example)")
    radit_lm.set_defaults(handler=_radit_lm)
    radit_lm.epilog = "--data: JSONL rows with 'question' and 'answer'"

    radit_r = kinds.add_parser("radit-retriever", help="RA-DIT R-ft: tune the query encoder with LM-supervised retrieval")
    radit_r.add_argument("--data", required=True, help="JSONL rows with 'question' and 'answer'")
    radit_r.add_argument("--index", required=True, help="index directory (built with MiniLM)")
    radit_r.add_argument("--out", required=True, help="embedder directory to write (dual.json + query_encoder/)")
    radit_r.add_argument("--model", default=None, help="the LM that scores chunks (default: Gemma 3 270M)")
    radit_r.add_argument("--k", type=positive("--k"), default=4, help="retrieved chunks scored per question")
    radit_r.add_argument("--tau", type=float, default=0.1, help="temperature of p_LSR and p_R")
    radit_r.add_argument("--epochs", type=positive("--epochs"), default=2)
    radit_r.add_argument("--batch-size", type=positive("--batch-size"), default=8)
    radit_r.add_argument("--lr", type=float, default=2e-5)
    radit_r.add_argument("--limit", type=positive("--limit"), default=None)
    radit_r.add_argument("--eval-fraction", type=_fraction("--eval-fraction"), default=0.2,
                         help="share of the questions held out for the reported LSR figures")
    radit_r.add_argument("--seed", type=int, default=0)
    radit_r.add_argument("--no-progress", action="store_true")
    radit_r.set_defaults(handler=_radit_retriever)

    from .pretrain import CONFIGS

    pre = kinds.add_parser("pretrain", help="causal-LM training on packed windows (e.g. from icp-order)")
    _run_flags(pre, lr=3e-4)
    pre.add_argument("--config", choices=sorted(CONFIGS), default=None,
                     help="train a model of this size from scratch instead of continuing --model")
    pre.add_argument("--eval-data", default=None, help="held-out windows for perplexity (default: --eval-fraction)")
    pre.set_defaults(handler=_pretrain)

    icp = kinds.add_parser("icp-order", help="order a corpus for In-Context Pretraining and pack it into windows")
    icp.add_argument("--docs", required=True, help="JSONL documents: 'text' (and 'id', 'title')")
    icp.add_argument("--out", required=True, help="directory for order.jsonl, windows and stats.json")
    icp.add_argument("--k", type=positive("--k"), default=10, help="neighbours per document")
    icp.add_argument("--window", type=positive("--window"), default=2048, help="tokens per training window")
    icp.add_argument("--dedup", type=float, default=0.95,
                     help="drop one of two documents at cosine >= this (1.0 drops exact copies only)")
    icp.add_argument("--variant", choices=("icp", "reference"), default="icp",
                     help="icp: the paper's min-degree greedy traversal; reference: the released code's "
                          "own-top-k chains with a cluster cap")
    icp.add_argument("--format", choices=("jsonl", "arrow"), default="jsonl", help="windows as JSONL or datasets Arrow")
    icp.add_argument("--embedder", default=None, help="'minilm' (default) or a sentence-transformers directory")
    icp.add_argument("--model", default=None, help="model directory whose tokenizer packs the windows (default model)")
    icp.add_argument("--seed", type=int, default=0, help="seed of the window shuffle")
    icp.add_argument("--limit", type=positive("--limit"), default=None, help="only the first N documents")
    icp.add_argument("--batch-size", type=positive("--batch-size"), default=64, help="embedding batch size")
    icp.add_argument("--no-progress", action="store_true")
    icp.set_defaults(handler=_icp_order)


if __name__ == "__main__":  # pragma: no cover
    from steer.cli import main

    sys.exit(main(["train", *sys.argv[1:]]))
