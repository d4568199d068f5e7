//! The CUDA C source of every kernel (compiled at run time by NVRTC) and the
//! names of its entry points.

/// All kernels as one translation unit: helpers first.
pub const SOURCE: &str = concat!(
    include_str!("kernels/common.cuh"),
    "\n",
    include_str!("kernels/elementwise.cu"),
    "\n",
    include_str!("kernels/attention.cu"),
    "\n",
    include_str!("kernels/gemv.cu"),
    "\n",
);

/// Every `extern "C"` entry point of [`SOURCE`], loaded once per context.
pub const KERNEL_NAMES: &[&str] = &[
    "embed_f32",
    "embed_f16",
    "embed_bf16",
    "rms_norm",
    "rope",
    "silu_mul",
    "add_assign",
    "gather_rows",
    "argmax_rows",
    "f32_to_f16",
    "f32_to_bf16_split",
    "kv_append",
    "attn_decode",
    "attn_combine",
    "attn_prefill_d16",
    "attn_prefill_d32",
    "attn_prefill_d64",
    "attn_prefill_d128",
    "gemv_f32",
    "gemv_f16",
    "gemv_bf16",
];
