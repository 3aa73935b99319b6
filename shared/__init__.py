"""Cadence: post-train LLMs with DPO and GRPO at the sync cadence you pick (offline, semi-online, online)."""

__version__ = "0.1.0"
