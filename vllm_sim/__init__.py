"""A simulated vLLM server: OpenAI API, vLLM metrics, prefix-cached KV blocks, calibrated timing.

Independent of the picker it is used to measure (it imports nothing from `picker`), so the
simulator's token counts and cache behaviour cannot agree with the picker's guesses by
construction. In-process: `async with run_replicas(n, profiles=..., speed=...) as replicas`; as
a separate process: `python -m vllm_sim` (see `engine.py` for the model).
"""

from vllm_sim.profiles import PROFILES, Profile, StepCost, get_profile
from vllm_sim.server import REPLICA_HEADER, Replica, SimConfig, run_replicas

__all__ = [
    "PROFILES",
    "REPLICA_HEADER",
    "Profile",
    "Replica",
    "SimConfig",
    "StepCost",
    "get_profile",
    "run_replicas",
]
