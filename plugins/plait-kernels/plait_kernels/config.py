"""The configuration keys this plugin owns (Axolotl names where Axolotl has them)."""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import BaseModel, Field


class KernelsConfig(BaseModel):
    plait_kernels: Literal["auto", "triton", "liger", "torch", "off"] = Field(
        "auto",
        description="Kernels for norm, rotary, GLU and loss: auto (Triton on CUDA, the model's PyTorch code "
                    "otherwise), triton, liger (liger-kernel), torch (no swaps), off (this plugin does nothing).",
    )
    liger_rms_norm: Optional[bool] = Field(None, description="Use liger-kernel's RMSNorm.")
    liger_rope: Optional[bool] = Field(None, description="Use liger-kernel's rotary embedding.")
    liger_rms_norm_gated: Optional[bool] = Field(
        None, description="Fuse the gated RMSNorm of linear-attention / Mamba layers (norm(x) * silu(gate), or "
                          "Mamba-2's gate-then-group-norm: Qwen3-Next, Qwen3.5, NemotronH, ...) into one Triton "
                          "kernel, Plait's (liger-kernel has none); needs a CUDA device. Models without a gated "
                          "norm are unchanged (the kernel log says so).")
    liger_glu_activation: Optional[bool] = Field(None, description="Use liger-kernel's SwiGLU/GeGLU.")
    liger_layer_norm: Optional[bool] = Field(
        None, description="Use liger-kernel's LayerNorm for the model's torch.nn.LayerNorm modules (the families "
                          "built on RMSNorm have none, so nothing changes there; the kernel log says so).")
    liger_fused_linear_cross_entropy: Optional[bool] = Field(
        None, description="Use liger-kernel's fused linear cross-entropy as the loss step.")
    liger_cross_entropy: Optional[bool] = Field(
        None, description="Accepted from Axolotl: Plait's loss step is always head + cross-entropy, so this "
                          "selects liger's fused linear cross-entropy too.")
    flash_attn_rms_norm: Optional[bool] = Field(
        None, description="Axolotl's older switch for a fused RMSNorm (it used flash-attn's): swaps the model's "
                          "RMSNorm for Plait's Triton one (liger's with liger_rms_norm); needs a CUDA device.")
    flash_attn_fuse_mlp: Optional[bool] = Field(
        None, description="Axolotl's older switch for a fused MLP (it used xformers' SwiGLU): swaps the gated MLP "
                          "for Plait's fused SwiGLU/GeGLU (the fused LoRA MLP under LoRA, which Axolotl's refused; "
                          "liger's with liger_glu_activation); needs a CUDA device.")
    lora_mlp_kernel: Optional[bool] = Field(
        None, description="The fused LoRA GLU MLP (on by default with Plait's Triton kernels; false turns it off).")
    lora_mlp_fold: Optional[bool] = Field(
        None, description="In the fused LoRA MLP (lora_mlp_kernel), keep gate and up's stacked weight "
                          "[[W_g, s B_g, 0], [W_u, 0, s B_u]] in one persistent buffer whose first columns the frozen "
                          "base weights become views of (r_g + r_u columns more memory), so each call writes only the "
                          "LoRA B columns instead of copying both base weights, in the forward, the recompute and the "
                          "backward. Same values; peft's parameters, saved adapters and merges are unchanged. Dense "
                          "bases only (a 4-bit base is dequantized per use). On by default in a single-process run "
                          "(with several processes true asks for it); false builds the weight per call.")
    lora_qkv_kernel: Optional[bool] = Field(
        None, description="The fused LoRA q/k/v projections (on by default with Plait's Triton kernels).")
    lora_o_kernel: Optional[bool] = Field(
        None, description="The fused LoRA output projection (on by default with Plait's Triton kernels).")
    lora_experts_kernel: Optional[bool] = Field(
        None, description="LoRA on fused MoE experts (lora_target_experts) computed for the routed tokens only: "
                          "x @ W_e.T + s * (x @ A_e.T) @ B_e.T by grouped matmuls, instead of peft building "
                          "W + s * B @ A for every expert each step. On by default (1.45x peft's speed on an H100, exact "
                          "against peft); false keeps peft's path; true works with any plait_kernels but off.")
    moe_combine_kernel: Optional[bool] = Field(
        None, description="End the routed LoRA experts path (lora_experts_kernel) with a Triton kernel that weights "
                          "each expert output row by its routing weight and sums each token's top-k rows in one pass "
                          "(float32 sums, exact against the PyTorch code up to the sum order), instead of a "
                          "[tokens * top_k, hidden] product, an index write and a sum. On by default (with "
                          "lora_experts_fold 1.28x the unfolded path on an H100); false turns it off. Runs on CUDA tensors only (elsewhere, and without Triton, the PyTorch code runs).")
    lora_experts_fold: Optional[bool] = Field(
        None, description="In the routed LoRA experts path (lora_experts_kernel), fold each projection's LoRA term "
                          "into its grouped matmul: [x | s * x @ A_e.T] @ [W_e.T ; B_e.T] in one grouped GEMM (and "
                          "the backward likewise), instead of a base matmul, a rank-r matmul and an add over the "
                          "[tokens * top_k, out] output. The frozen expert weights move, once, into buffers with "
                          "rank-r more columns (about r / hidden more memory for them); peft's LoRA parameters and "
                          "saved adapters are unchanged. Gated SiLU experts with both projections adapted at one "
                          "rank (others keep the unfolded path); its SiLU gate is Plait's Triton GLU on CUDA "
                          "(one pass each way, written into the folded operands) unless plait_kernels is torch; "
                          "works with moe_combine_kernel. On by default in a single-process run (with moe_combine_kernel 1.07x "
                          "Unsloth's MoE step on an H100, 1.28x the unfolded path; with several processes true asks "
                          "for it); false keeps the unfolded path.")
    moe_weight_in_gate: Optional[bool] = Field(
        None, description="In the routed LoRA experts path (lora_experts_kernel), multiply each routed row's routing "
                          "weight into its gated activation ([tokens * top_k, moe_intermediate], before the down "
                          "projection, inside the Triton GLU where that runs) instead of into the down projection's "
                          "output ([tokens * top_k, hidden]); the same sum, as the down projection is linear with no "
                          "bias. Each token's rows are then summed unweighted, and the backward is one gather of the "
                          "output gradient, with the weights' gradient from the gate's backward. On by default "
                          "(fewer bytes and kernels: bench/moe_census.py); false keeps the weighted combine.")
    lora_cast_once: Optional[bool] = Field(
        None, description="In a training run, cast each float32 LoRA factor to the compute dtype once per optimizer "
                          "step for the fused LoRA paths (kept until the step's update), instead of at every use: a "
                          "checkpointed layer used them in its forward, recompute and backward, about 20 tiny "
                          "kernels a layer a step. Same values. On by default in a single-process run (with several "
                          "processes, where a sharding wrapper may free parameters within a step, each use casts); "
                          "false casts at every use.")
    torch_compile: bool = Field(False, description="torch.compile each decoder layer (regional compilation).")
    torch_compile_backend: Optional[str] = Field(None, description="torch.compile backend (default inductor).")
    torch_compile_mode: Optional[Literal["default", "reduce-overhead", "max-autotune",
                                         "max-autotune-no-cudagraphs"]] = Field(
        None, description="torch.compile mode for the compiled layers (needs torch_compile: true).")
