// Element type codes shared by the CPU and CUDA kernels and their bindings (plain C++, no torch).
#pragma once

namespace mki {

// Element type of a buffer handed to the kernels; the bindings map torch's ScalarType onto it.
enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat64 = 3 };

// Backward modes of the KL gradient: forward KL / teacher cross-entropy share one formula.
enum KlMode : int { kKlForward = 0, kKlReverse = 1 };

}  // namespace mki
