"""Simulated vLLM replicas: OpenAI API, vLLM metrics, prefix-cached KV blocks, calibrated timing.

In-process: `async with run_replicas(n, profiles=..., speed=...) as replicas`; as a separate
process: `python -m loadtest.sim` or `SimProcess` (see `engine.py` for the model).
"""

from loadtest.sim.launcher import SimProcess
from loadtest.sim.profiles import PROFILES, Profile, StepCost, get_profile
from loadtest.sim.server import REPLICA_HEADER, Replica, SimConfig, run_replicas

__all__ = [
    "PROFILES",
    "REPLICA_HEADER",
    "Profile",
    "Replica",
    "SimConfig",
    "SimProcess",
    "StepCost",
    "get_profile",
    "run_replicas",
]
