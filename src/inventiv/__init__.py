"""Inventiv: a control plane for fleets of GPU inference workers."""

__version__ = "0.1.0"
