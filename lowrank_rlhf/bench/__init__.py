"""`lowrank-rlhf bench`: memory and speed of PPO, our one-base layout against the four-model layout."""
