"""The import path of the tracker in the last public release, kept so that code written for it runs."""

from delve.tracker import CheckLayerSat, SaturationTracker

__all__ = ["CheckLayerSat", "SaturationTracker"]
