"""On-policy DPO: pairs drawn from the policy as it trains, ranked by a reward function.

DPO on a fixed set of pairs learns those pairs' particular responses as much as the preference
behind them (`bench/preference_frontier.py`: with 210 pairs it bought best-of-8's reward at three
times its KL).  Online DPO (Guo et al. 2024, "Direct language model alignment from online AI
feedback") samples two responses per prompt from the current policy at every step, ranks them by the
reward and takes a DPO step.  The reference stays the starting model (the adapter switched off under
LoRA), so the target is still the KL-regularised optimum π_ref·exp(r/β)/Z that a steering program
scoring r/β samples exactly.

Built on TRL's `OnlineDPOTrainer` (in `trl.experimental` as of TRL 1.16).  Responses are drawn at
temperature 1 with no top-k or top-p, so that they come from the policy itself.  A pair whose two
rewards tie is trained on with the first response as the chosen one (TRL's rule): over random orders
such pairs pull the two log-ratios together, which is what equal preference means, but they carry no
preference signal, so a reward with many ties learns more slowly.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from steer.errors import SteerError

from .common import (TrainOptions, load_causal_lm, load_tokenizer, lora_config, model_dir, quiet_trainer,
                     quiet_transformers, resume_from, run_and_save, trainer_arguments, write_metrics)


Reward = Callable[[list[str], list[str]], list[float]]


def train_online_dpo(prompts: list[str], reward: Reward, options: TrainOptions, *, beta: float = 0.1,
                     max_new_tokens: int = 64, callbacks: list | None = None) -> dict[str, Any]:
    """Train with online DPO on `prompts` (in steer's instruction template, as `load_prompts` reads
    them); `reward(prompts, responses)` scores each step's responses in one batch (a
    `steer.potentials.RewardModel`'s `score_laid_out` fits).  Returns (and writes to
    `out/metrics.json`) the metrics, with the mean reward of the responses drawn over the first and the
    last tenth of the steps."""
    from datasets import Dataset

    if not prompts:
        raise SteerError("online DPO needs at least one prompt")
    quiet_transformers()
    checkpoint = resume_from(options)
    directory = model_dir(options.model)
    tokenizer = load_tokenizer(directory)
    # TRL tokenizes prompts without special tokens; the model was trained with its BOS first
    bos = tokenizer.bos_token if tokenizer("x")["input_ids"][:1] == [tokenizer.bos_token_id] else ""

    def score(prompts: list[str], completions: list[str], **_: Any) -> list[float]:
        return [float(v) for v in reward([p[len(bos):] for p in prompts], completions)]

    score.__name__ = "reward"  # (TRL names the logged reward after the function)
    config_class, trainer_class = _trl_online_dpo()
    args = config_class(**trainer_arguments(options, False), beta=[beta], max_new_tokens=max_new_tokens,
                        temperature=1.0, top_k=0, top_p=1.0, remove_unused_columns=False)
    trainer = trainer_class(model=load_causal_lm(directory), reward_funcs=score, args=args, processing_class=tokenizer,
                            train_dataset=Dataset.from_list([{"prompt": bos + p} for p in prompts]),
                            peft_config=lora_config(options), callbacks=callbacks)
    quiet_trainer(trainer, options)
    run = run_and_save(trainer, tokenizer, options, checkpoint, has_eval=False)
    metrics = {"trainer": "online-dpo", "prompts": len(prompts),
               "settings": {**options.as_dict(), "beta": beta, "max_new_tokens": max_new_tokens},
               **run, **drawn_rewards(run["log"])}
    write_metrics(options.out, metrics)
    return metrics


def _trl_online_dpo():
    """TRL's online DPO config and trainer, imported without its warning that `trl.experimental` may
    change (the project pins the TRL range it is tested with); the trainer reads the LM head on the
    completions' positions only."""
    import warnings

    import torch

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*trl.experimental")
        from trl.experimental.online_dpo import OnlineDPOConfig, OnlineDPOTrainer

    class CompletionLogits(OnlineDPOTrainer):
        """TRL's `_forward` projects every position, the prompt's included, through the LM head (262k
        outputs on the default model: most of a step's cost) and then drops the prompt's.  This one
        asks the model for the logits of the completion's positions only (`logits_to_keep`): the same
        log-probabilities, for text-only prompts."""

        def _forward(self, model, prompt_ids, prompt_mask, completion_ids, completion_mask, vision_inputs=None):
            cut = max(prompt_ids.size(1) + completion_ids.size(1) - self.max_length, 0)  # as TRL: the left goes
            if vision_inputs is not None or cut >= prompt_ids.size(1):
                return super()._forward(model, prompt_ids, prompt_mask, completion_ids, completion_mask,
                                        vision_inputs)
            ids = torch.cat((prompt_ids[:, cut:], completion_ids), dim=1)
            mask = torch.cat((prompt_mask[:, cut:], completion_mask), dim=1)
            logits = model(ids, attention_mask=mask, logits_to_keep=completion_ids.size(1) + 1).logits[:, :-1]
            return torch.take_along_dim(logits.log_softmax(-1), completion_ids.unsqueeze(-1), dim=2).squeeze(-1)

    return OnlineDPOConfig, CompletionLogits


def drawn_rewards(history: list[dict[str, Any]]) -> dict[str, float | None]:
    """The mean reward of the responses drawn over the first and the last tenth of the logged steps
    (at least one step each): whether the policy's own samples improved while it trained."""
    scores = [row["objective/scores"] for row in history if "objective/scores" in row]
    if not scores:
        return {"reward_first": None, "reward_last": None}
    k = max(1, len(scores) // 10)
    return {"reward_first": sum(scores[:k]) / k, "reward_last": sum(scores[-k:]) / k}
