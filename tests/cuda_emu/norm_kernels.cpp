// csrc/cuda/norm.cu compiled for the CUDA emulation (FFN_CUDA_EMU): its kernels
// and launchers, unchanged, running on the CPU.
#include "cuda/norm.cu"
