"""Simulated vLLM replicas: OpenAI API, vLLM metrics, prefix-cached KV blocks, calibrated timing.

Use `Replica` in-process (tests), `python -m loadtest.sim` or `SimProcess` for a separate process.
"""

from loadtest.sim.launcher import SimProcess
from loadtest.sim.profiles import PROFILES, Profile, StepCost
from loadtest.sim.server import REPLICA_HEADER, Replica, SimConfig

__all__ = ["PROFILES", "REPLICA_HEADER", "Profile", "Replica", "SimConfig", "SimProcess", "StepCost"]
