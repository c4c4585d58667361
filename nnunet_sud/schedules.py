"""Schedules of training progress t in [0, 1] (fraction of all training iterations done).

Parameters are given at construction, the value is drawn by calling the schedule with t, so a
trainer variant changes a schedule by assigning another object (batchgeneratorsv2 style).

    LinearRamp(0, 4)(t)          = 4 t                      SUD's lambda (Young et al. §3.3.2)
    LinearRamp(1, 0)(t)          = 1 - t                    SUD's alpha (1 down to 0)
    GaussianRampUp(0.1)(t)       = 0.1 exp(-5 (1 - t)^2)    mean teacher / UA-MT consistency
                                                            weight (Laine & Aila 2017; Yu et al. 2019)
    GaussianRampBetween(a, b)(t) = a + (b - a) exp(-5 (1 - t)^2)    UA-MT's uncertainty threshold ramp
    Constant(c)(t)               = c
    Step(1, 0.1)(t)              = 0 for t < 0.1, 1 from 0.1 on     weak-to-strong's lambda_u
"""
import math


class Schedule:
    def __call__(self, t: float) -> float:
        raise NotImplementedError

    def __repr__(self):
        return f"{type(self).__name__}({', '.join(f'{k}={v}' for k, v in vars(self).items())})"


class Constant(Schedule):
    def __init__(self, value: float):
        self.value = float(value)

    def __call__(self, t: float) -> float:
        return self.value


class LinearRamp(Schedule):
    """start + (end - start) * clip((t - t_start) / (t_end - t_start), 0, 1)."""

    def __init__(self, start: float, end: float, t_start: float = 0.0, t_end: float = 1.0):
        if not t_end > t_start:
            raise ValueError(f"t_end ({t_end}) must be larger than t_start ({t_start})")
        self.start, self.end, self.t_start, self.t_end = float(start), float(end), float(t_start), float(t_end)

    def __call__(self, t: float) -> float:
        u = min(max((t - self.t_start) / (self.t_end - self.t_start), 0.0), 1.0)
        return self.start + (self.end - self.start) * u


class GaussianRampUp(Schedule):
    """max_value * exp(-5 (1 - min(t / t_end, 1))^2): 0.0067 max at t = 0, max from t_end on."""

    def __init__(self, max_value: float, t_end: float = 1.0):
        if not t_end > 0:
            raise ValueError(f"t_end must be positive, got {t_end}")
        self.max_value, self.t_end = float(max_value), float(t_end)

    def __call__(self, t: float) -> float:
        u = min(max(t / self.t_end, 0.0), 1.0)
        return self.max_value * math.exp(-5.0 * (1.0 - u) ** 2)


class GaussianRampBetween(Schedule):
    """start + (end - start) * exp(-5 (1 - clip(t, 0, 1))^2): UA-MT's threshold fraction (0.75 -> 1)."""

    def __init__(self, start: float, end: float):
        self.start, self.end = float(start), float(end)

    def __call__(self, t: float) -> float:
        u = min(max(float(t), 0.0), 1.0)
        return self.start + (self.end - self.start) * math.exp(-5.0 * (1.0 - u) ** 2)


class Step(Schedule):
    """``before`` for t < t_start, ``value`` from t_start on (a weight switched on at a point of training)."""

    def __init__(self, value: float, t_start: float, before: float = 0.0):
        self.value, self.t_start, self.before = float(value), float(t_start), float(before)

    def __call__(self, t: float) -> float:
        return self.value if t >= self.t_start else self.before
