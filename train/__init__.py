"""Training the models steer steers and the reward models that steer them.

`sft`, `dpo`, `reward` and `strength` build on TRL; each has a function API (`train_sft`, `train_dpo`,
`train_reward`, `preference_strength`) and a `steer train ...` command (`train.cli`).
"""
