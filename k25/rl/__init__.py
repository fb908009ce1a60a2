"""Reinforcement learning: the K2.5 policy loss, rewards, Toggle."""
