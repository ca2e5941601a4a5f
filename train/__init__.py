"""Training the models steer steers and the reward models that steer them.

Each trainer has a function API and a `steer train ...` command (`train.cli`); the shared run flags,
LoRA, checkpoints and resume live in `common`:
- `sft` (supervised fine-tuning), `dpo` (Direct Preference Optimization), `reward` (Bradley-Terry
  reward models) and `strength` (preference strength over a reward-model ensemble) build on TRL;
- `self_reward` (Self-Rewarding Language Models: `judge`, `seed_data`, `self_instruct`, `generation`);
- `icp` (In-Context Pretraining ordering) and `pretrain` (continued pretraining on its windows);
- `llara` (a causal LM adapted into a dense retriever) and `radit` (retrieval-augmented dual
  instruction tuning).
"""
