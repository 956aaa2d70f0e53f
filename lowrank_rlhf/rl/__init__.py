"""Online RL on the shared base: rollout, scoring, advantages and the update (PPO), and the run state."""
