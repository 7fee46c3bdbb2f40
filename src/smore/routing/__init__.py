"""Routers: flat gates (``gates.py``), the S'MoRE tree router (``tree.py``) and their typed results (``types.py``)."""

from smore.routing.gates import GATES, DenseGate, NoisyTopKGate, SwitchGate, build_gate
from smore.routing.tree import TreeRouter
from smore.routing.types import GateOutput, TreeRouting

__all__ = ["GATES", "DenseGate", "GateOutput", "NoisyTopKGate", "SwitchGate", "TreeRouter", "TreeRouting", "build_gate"]
