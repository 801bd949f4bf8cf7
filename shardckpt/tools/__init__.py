"""Whole-checkpoint tools built on the layers below: verify, single-process save/load, mirror."""
