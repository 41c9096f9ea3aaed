// The ffn op library: every schema, in one place.
//
// Public ops (layer_norm, rms_norm, add_layer_norm, add_rms_norm, gelu_ffn,
// relu_ffn, swiglu, geglu, reglu) are CompositeImplicitAutograd, like
// aten::layer_norm over aten::native_layer_norm: each calls an internal
// `_<op>_fwd` that also returns what backward needs (mean/rstd, the
// pre-activation); their composite kernels, the autograd and fake kernels of the
// internal ops and the autocast rules are in ops/_registrations.py. The fused
// add + norms share the norms' backward ops. The internal ops, the elementwise
// pieces (gated_activation, bias_gelu) and the telemetry op ffn_stats have one
// kernel per backend, registered in cpu/ops.cpp and cuda/ops.cpp; their bodies
// are norm.h, ffn.h and telemetry.h.
//
// Everything here goes through the LibTorch stable ABI (STABLE_TORCH_LIBRARY),
// so the same binary loads into every torch from 2.11 on.
#include "activation_table.h"
#include "tensor.h"

#include <string>

#ifdef FFN_PYTHON_MODULE
#include <Python.h>
#endif

STABLE_TORCH_LIBRARY(ffn, m) {
  // Public ops.
  // weight_offset: the weight scales as (weight + weight_offset); 1 for Gemma's
  // zero-centered gamma.
  // in_place_backward: backward may write grad_x into grad_y's storage
  // (ops/_registrations.py says when), saving a buffer.
  m.def("layer_norm(Tensor x, Tensor? weight, Tensor? bias, float eps=1e-05, "
        "float weight_offset=0.0, bool in_place_backward=False) -> Tensor");
  m.def("rms_norm(Tensor x, Tensor? weight, Tensor? bias, float eps=1e-06, "
        "float weight_offset=0.0, bool in_place_backward=False) -> Tensor");
  // Fused residual add + norm: s = x + residual (in x's dtype), y = norm(s).
  m.def("add_layer_norm(Tensor x, Tensor residual, Tensor? weight, Tensor? bias, "
        "float eps=1e-05, float weight_offset=0.0, bool in_place_backward=False) "
        "-> (Tensor y, Tensor s)");
  m.def("add_rms_norm(Tensor x, Tensor residual, Tensor? weight, Tensor? bias, "
        "float eps=1e-06, float weight_offset=0.0, bool in_place_backward=False) "
        "-> (Tensor y, Tensor s)");
  m.def("gelu_ffn(Tensor x, Tensor w1, Tensor? b1, Tensor w2, Tensor? b2, "
        "str approximate=\"none\") -> Tensor");
  m.def("relu_ffn(Tensor x, Tensor w1, Tensor? b1, Tensor w2, Tensor? b2) -> Tensor");
  // swiglu, geglu, reglu: one schema, named by activation_table.h.
  for (const ffn::ActivationInfo& info : ffn::kActivations) {
    if (!info.public_gated_op) continue;
    const std::string schema =
        std::string(info.gated_op) +
        "(Tensor x, Tensor w_gate_up, Tensor? b_gate_up, Tensor w_down, Tensor? b_down, "
        "str approximate=\"none\") -> Tensor";
    m.def(schema.c_str());
  }
  m.def("gated_activation(Tensor gate_up, str activation=\"silu\") -> Tensor");
  m.def("bias_gelu(Tensor x, Tensor? bias, str approximate=\"none\") -> Tensor");

  // Internal: forward with what backward needs, and the backward ops.
  // The backward ops serve the fused add + norms too: x is then s, and grad_s
  // (the gradient of the s output) is added to grad_x.
  m.def("_layer_norm_fwd(Tensor x, Tensor? weight, Tensor? bias, float eps, "
        "float weight_offset=0.0, bool in_place_backward=False) "
        "-> (Tensor y, Tensor mean, Tensor rstd)");
  m.def("_layer_norm_bwd(Tensor grad_y, Tensor x, Tensor mean, Tensor rstd, Tensor? weight, "
        "Tensor? bias, bool weight_grad, bool bias_grad, float weight_offset=0.0, "
        "Tensor? grad_s=None) -> (Tensor grad_x, Tensor grad_weight, Tensor grad_bias)");
  m.def("_rms_norm_fwd(Tensor x, Tensor? weight, Tensor? bias, float eps, "
        "float weight_offset=0.0, bool in_place_backward=False) -> (Tensor y, Tensor rstd)");
  m.def("_rms_norm_bwd(Tensor grad_y, Tensor x, Tensor rstd, Tensor? weight, Tensor? bias, "
        "bool weight_grad, bool bias_grad, float weight_offset=0.0, Tensor? grad_s=None) "
        "-> (Tensor grad_x, Tensor grad_weight, Tensor grad_bias)");
  m.def("_add_layer_norm_fwd(Tensor x, Tensor residual, Tensor? weight, Tensor? bias, float eps, "
        "float weight_offset=0.0, bool in_place_backward=False) "
        "-> (Tensor y, Tensor s, Tensor mean, Tensor rstd)");
  m.def("_add_rms_norm_fwd(Tensor x, Tensor residual, Tensor? weight, Tensor? bias, float eps, "
        "float weight_offset=0.0, bool in_place_backward=False) "
        "-> (Tensor y, Tensor s, Tensor rstd)");
  // The in-place backward: grad_x written into grad_y.
  m.def("_layer_norm_bwd_(Tensor(a!) grad_y, Tensor x, Tensor mean, Tensor rstd, Tensor? weight, "
        "Tensor? bias, bool weight_grad, bool bias_grad, float weight_offset=0.0, "
        "Tensor? grad_s=None) -> (Tensor grad_weight, Tensor grad_bias)");
  m.def("_rms_norm_bwd_(Tensor(a!) grad_y, Tensor x, Tensor rstd, Tensor? weight, Tensor? bias, "
        "bool weight_grad, bool bias_grad, float weight_offset=0.0, Tensor? grad_s=None) "
        "-> (Tensor grad_weight, Tensor grad_bias)");
  // keep_preact=False: no backward will follow (the public ops' call without autograd), so
  // preact comes back empty [0] (and a plain FFN's activation is written over it).
  m.def("_gelu_ffn_fwd(Tensor x, Tensor w1, Tensor? b1, Tensor w2, Tensor? b2, str approximate, "
        "bool keep_preact=True) -> (Tensor out, Tensor preact)");
  m.def("_gelu_ffn_bwd(Tensor grad_out, Tensor x, Tensor preact, Tensor w1, Tensor w2, "
        "str approximate, bool[5] grad_mask) "
        "-> (Tensor grad_x, Tensor grad_w1, Tensor grad_b1, Tensor grad_w2, Tensor grad_b2)");
  m.def("_relu_ffn_fwd(Tensor x, Tensor w1, Tensor? b1, Tensor w2, Tensor? b2, "
        "bool keep_preact=True) -> (Tensor out, Tensor preact)");
  m.def("_relu_ffn_bwd(Tensor grad_out, Tensor x, Tensor preact, Tensor w1, Tensor w2, "
        "bool[5] grad_mask) "
        "-> (Tensor grad_x, Tensor grad_w1, Tensor grad_b1, Tensor grad_w2, Tensor grad_b2)");
  m.def("_gated_ffn_fwd(Tensor x, Tensor w_gate_up, Tensor? b_gate_up, Tensor w_down, "
        "Tensor? b_down, str activation, bool keep_preact=True) -> (Tensor out, Tensor preact)");
  m.def("_gated_ffn_bwd(Tensor grad_out, Tensor x, Tensor preact, Tensor w_gate_up, "
        "Tensor w_down, str activation, bool[5] grad_mask) "
        "-> (Tensor grad_x, Tensor grad_w_gate_up, Tensor grad_b_gate_up, Tensor grad_w_down, "
        "Tensor grad_b_down)");
  m.def("_gated_activation_bwd(Tensor grad, Tensor gate_up, str activation) -> Tensor");
  m.def("_bias_gelu_bwd(Tensor grad, Tensor x, Tensor? bias, str approximate, bool bias_grad) "
        "-> (Tensor grad_x, Tensor grad_bias)");

  // Telemetry (telemetry.h): raw float64 sums over one FFN call's tokens.
  m.def("ffn_stats(Tensor ffn_input, Tensor preact, str activation, bool gated, "
        "float near_zero=0.01, float large=6.0, float outlier=6.0) -> Tensor");
}

#ifdef FFN_PYTHON_MODULE
// `import ffn._C` loads this library, whose static initializers register the
// ops. Python's limited API (abi3): one binary for every Python from 3.10 on.
namespace {
PyObject* release_cpu_scratch(PyObject*, PyObject*) {
  ffn::release_scratch();
  Py_RETURN_NONE;
}
PyMethodDef module_methods[] = {
    {"release_cpu_scratch", release_cpu_scratch, METH_NOARGS,
     "Frees the calling thread's CPU scratch buffers (ffn.release_cpu_scratch)."},
    {nullptr, nullptr, 0, nullptr}};
}  // namespace

extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, module_methods};
  return PyModule_Create(&module_def);
}
#endif
