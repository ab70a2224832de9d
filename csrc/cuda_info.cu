// Facts nvcc knows about this build, reported by mmfast.info.
#include <cuda_runtime_api.h>

#include <string>

namespace mmfast {

std::string cuda_build_version() {
  return std::to_string(CUDART_VERSION / 1000) + "." + std::to_string((CUDART_VERSION % 1000) / 10);
}

std::string cuda_archs_compiled() {
#ifdef __CUDA_ARCH_LIST__
#define MMFAST_STR2(...) #__VA_ARGS__
#define MMFAST_STR(...) MMFAST_STR2(__VA_ARGS__)
  return MMFAST_STR(__CUDA_ARCH_LIST__);  // e.g. "800,900"
#else
  return "unknown";
#endif
}

}  // namespace mmfast
