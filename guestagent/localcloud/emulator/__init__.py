"""The local metadata service: an emulator of the ECS instance metadata service.

``Emulator`` runs it in-process (tests) or behind ``guestagent emulator serve``;
``load_scenario`` reads the TOML file describing the emulated instance.
"""

from guestagent.localcloud.emulator.instance import Emulator, RequestRecord
from guestagent.localcloud.emulator.scenario import Scenario, ScenarioError, load_scenario

__all__ = ["Emulator", "RequestRecord", "Scenario", "ScenarioError", "load_scenario"]
