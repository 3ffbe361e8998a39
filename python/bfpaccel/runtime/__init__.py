"""Compile ONNX models into BFP plans and run them (``bfpaccel.compile``, ``bfpaccel.Session``)."""

from .compiler import SUPPORTED_OPS, VECTOR_PRECISIONS, UnsupportedOpError, compile
from .lower import LoweringError
from .plan import PLAN_FORMAT_VERSION, Plan, PlanError, load_plan
from .predictor import Predictor, top_k
from .profile import OpProfile, ProfileSummary
from .session import Session

__all__ = ["compile", "Plan", "PlanError", "load_plan", "Session", "Predictor", "top_k", "ProfileSummary", "OpProfile", "UnsupportedOpError", "LoweringError",
           "SUPPORTED_OPS", "VECTOR_PRECISIONS", "PLAN_FORMAT_VERSION"]
