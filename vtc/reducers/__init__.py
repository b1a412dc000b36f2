"""Token reducers: one file per method, pure tensor functions first, then the reducer class."""

from vtc.reducers.drop import EViT, RandomDrop
from vtc.reducers.dymu import DyMU, VirtualUnmerge
from vtc.reducers.dyvte import DyVTE
from vtc.reducers.exit import VisualExit
from vtc.reducers.holov import HoloV
from vtc.reducers.m3 import M3
from vtc.reducers.mqt import MQT
from vtc.reducers.pool import Pool
from vtc.reducers.tome import ToMe
from vtc.sites import (
    ConnectorInfo,
    ConnectorReducer,
    DecoderInfo,
    DecoderReducer,
    EncoderInfo,
    EncoderReducer,
    Reducer,
    Signal,
    Signals,
    Site,
)
from vtc.spec import REDUCERS, parse_reducer, to_spec

__all__ = [
    "ConnectorInfo", "ConnectorReducer", "DecoderInfo", "DecoderReducer", "DyMU", "DyVTE", "EViT", "EncoderInfo",
    "EncoderReducer", "HoloV", "M3", "MQT",
    "Pool", "REDUCERS", "RandomDrop", "Reducer", "Signal", "Signals", "Site", "ToMe", "VirtualUnmerge", "VisualExit",
    "parse_reducer", "to_spec",
]
