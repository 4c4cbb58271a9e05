"""Reward models and scorers: one interface ``score(images, prompts, **cond) -> Tensor`` (see ``base``)."""
