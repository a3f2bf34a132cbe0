"""ppo_tbptt: recurrent PPO trained by truncated backpropagation through time on memory tasks."""

__version__ = "0.1.0"
