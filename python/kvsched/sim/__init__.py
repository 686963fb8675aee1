"""Workloads and replays that drive the real kvsched core (the simulator grows here)."""
