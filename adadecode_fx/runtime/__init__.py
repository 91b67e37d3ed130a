from .decoder import AdaDecoder, GenerationResult
from .kv_state import KVState
from .program import DecodeProgram
from .sampling import SamplingConfig
from .stats import DecodeStats
from .verify import Verdict, verify_greedy, verify_sampling

__all__ = ["AdaDecoder", "GenerationResult", "KVState", "DecodeProgram", "DecodeStats", "Verdict", "verify_greedy",
           "SamplingConfig", "verify_sampling"]
