"""The C++ program's op kinds and sub-op numbers (runtime.h)."""

K_CONV, K_BINARY, K_UNARY, K_AFFINE, K_POOL, K_REDUCE, K_SOFTMAX, K_CONCAT, K_STRIDED, K_PAD, K_COPY = range(11)
_BINARY = {"Add": 0, "Sub": 1, "Mul": 2, "Div": 3, "Max": 4, "Min": 5, "Pow": 6}
_UNARY = {"Relu": 0, "Clip": 1, "Sqrt": 2, "Reciprocal": 3, "Exp": 4, "Sigmoid": 5, "Tanh": 6, "Neg": 7, "Abs": 8,
          "LeakyRelu": 9, "Identity": 10, "Log": 11, "Erf": 12, "HardSigmoid": 13, "HardSwish": 14, "Floor": 17,
          "Ceil": 18}
_REDUCE = {"ReduceSum": 0, "ReduceMean": 1, "ReduceMax": 2, "ReduceMin": 3, "ReduceSumSquare": 4, "ReduceL2": 5}
_POOL_NAMES = {0: "max pool", 1: "average pool"}
