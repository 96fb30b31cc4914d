"""A verifiable reward for the quickstart's reviews (docs/training.md, "Objectives"):

    zoscale train objective=zoscale.quickstart.rewards:sentiment_word objective.max_new_tokens=1

The model writes a word after "<review> It was"; the reward is +1 when it is a word of the
review's sentiment (great, dull, ...: the words the data's reviews use), -1 when it is a word of
the other sentiment, and 0 for any other word. No label word is given to the model: it learns
from the reward alone. The signature is that of TRL's GRPO reward functions.
"""

from zoscale.quickstart.generate import NEGATIVE, POSITIVE


def sentiment_word(prompts: list[str], completions: list[str], label: list[int], **columns) -> list[float]:
    rewards = []
    for completion, gold in zip(completions, label):
        words = completion.split()
        first = words[0] if words else ""
        right, wrong = (POSITIVE, NEGATIVE) if gold == 1 else (NEGATIVE, POSITIVE)
        rewards.append(1.0 if first in right else -1.0 if first in wrong else 0.0)
    return rewards
