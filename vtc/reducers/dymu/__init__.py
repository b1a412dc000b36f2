"""DyMU (Wang et al., "DyMU: Dynamic Merging and Virtual Unmerging for Efficient VLMs", 2025):
one home for the method.

- :mod:`~vtc.reducers.dymu.reducer`: DToMe, threshold merging in the encoder (Sec. 3.1);
- :mod:`~vtc.reducers.dymu.calibration`: thresholds, calibration files, merge schedules;
- :mod:`~vtc.reducers.dymu.unmerge`: virtual token unmerging in the LLM (Sec. 3.2), its option
  and tensor algebra (the LLaVA adapter, :mod:`vtc.models.vtu`, runs it).

Running a model to calibrate is :func:`vtc.dymu.calibrate`.
"""

from vtc.reducers.dymu.calibration import PRESETS, Calibration, CalibrationRecorder, merge_schedule
from vtc.reducers.dymu.reducer import DyMU, LayerThreshold
from vtc.reducers.dymu.unmerge import VirtualUnmerge

__all__ = ["PRESETS", "Calibration", "CalibrationRecorder", "DyMU", "LayerThreshold", "VirtualUnmerge", "merge_schedule"]
