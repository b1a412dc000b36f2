"""Token reducers: one file per method, pure tensor functions first, then the reducer class."""

from vtc.reducers.base import (
    ConnectorInfo, ConnectorReducer, DecoderInfo, DecoderReducer, EncoderInfo, EncoderReducer, Reducer, Signal,
    Signals, Site,
)
from vtc.reducers.drop import EViT, RandomDrop
from vtc.reducers.exit import VisualExit
from vtc.reducers.pool import Pool
from vtc.reducers.registry import REDUCERS, parse_reducer, to_spec
from vtc.reducers.tome import ToMe

__all__ = [
    "ConnectorInfo", "ConnectorReducer", "DecoderInfo", "DecoderReducer", "EViT", "EncoderInfo", "EncoderReducer",
    "Pool", "REDUCERS", "RandomDrop", "Reducer", "Signal", "Signals", "Site", "ToMe", "VisualExit", "parse_reducer",
    "to_spec",
]
