"""Reward functions of configs/grpo.yml, called as TRL calls them (see jaxtune/objectives/rewards.py).

jaxtune imports `grpo_rewards.final_number` from the working directory or, as here, from the
directory of the config file. Every dataset column other than the prompt arrives as a keyword
argument (a list, one value per completion): `answer` below.
"""

from __future__ import annotations

import re

NUMBER = re.compile(r"-?\d+")


def final_number(prompts, completions, completion_ids, answer, **kwargs) -> list[float]:
    """1.0 when the last number in the completion is the answer, else 0.0."""
    rewards = []
    for completion, want in zip(completions, answer):
        text = completion[0]["content"] if isinstance(completion, list) else completion
        numbers = NUMBER.findall(text)
        rewards.append(1.0 if numbers and numbers[-1] == want else 0.0)
    return rewards
