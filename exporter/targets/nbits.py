"""onnxruntime's block-quantized weight ops (com.microsoft MatMulNBits, GatherBlockQuantized) as torch custom ops
that torch.onnx exports as themselves: a quantized ONNX / OpenVINO export holds its weights in the bytes the
artifact stores from the moment each is read from the checkpoint (exporter.loaders.build_model with a Packer), and
no float copy of the model is ever made or quantized afterwards. OpenVINO's ONNX frontend reads both ops as
compressed weights (u4 / u8 constants and their decompression), which its CPU plugin runs as such.

The layouts are those onnxruntime's own quantizer (MatMulNBitsQuantizer) writes: symmetric codes offset by
2^(bits-1) (the ops' default zero point), 4-bit codes two per byte, low nibble first; fp32 scales per block;
affine int4 as those codes plus fp16 offsets per group."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from exporter.quantize import Quantization, affine_int4, block_quantize, by_rows


def _unpack(data: Tensor, bits: int) -> Tensor:
    """Codes [rows, K] (uint8, 0 .. 2^bits - 1) from the stored bytes [rows, ...]."""
    rows = data.shape[0]
    if bits == 4:
        return torch.stack([data & 15, data >> 4], -1).reshape(rows, -1)
    return data.reshape(rows, -1)


def _dequantize(data: Tensor, scales: Tensor, bits: int, block: int) -> Tensor:
    codes = _unpack(data, bits).float() - 2 ** (bits - 1)
    rows = codes.shape[0]
    return (codes.reshape(rows, -1, block) * scales.reshape(rows, -1, 1)).reshape(rows, -1)


@torch.library.custom_op("edgekv::matmul_nbits", mutates_args=())
def matmul_nbits(x: Tensor, data: Tensor, scales: Tensor, bits: int, block: int) -> Tensor:
    """x @ W.T for W [N, K] stored as MatMulNBits stores it: data [N, K / block, block * bits / 8], scales [N * K /
    block]. Eager: dequantized in float32 (onnxruntime's accuracy level 4 also rounds x to int8 per block)."""
    return x @ _dequantize(data, scales, bits, block).T


@matmul_nbits.register_fake
def _(x, data, scales, bits, block):
    return x.new_empty(*x.shape[:-1], data.shape[0])


@torch.library.custom_op("edgekv::gather_nbits", mutates_args=())
def gather_nbits(data: Tensor, indices: Tensor, scales: Tensor, bits: int, block: int) -> Tensor:
    """Rows of a table [V, H] stored as GatherBlockQuantized reads it: data [V, H * bits / 8], scales [V, H / block]."""
    return _dequantize(data, scales, bits, block)[indices]


@gather_nbits.register_fake
def _(data, indices, scales, bits, block):
    return scales.new_empty(*indices.shape, data.shape[1] * 8 // bits)


def _register_schemas() -> None:
    """The two contrib ops' ONNX schemas (as onnxruntime defines them, the parts used), which torch.onnx's graph
    builder needs to emit a node."""
    from onnx.defs import OpSchema, has, register_schema

    arg, attr, kind = OpSchema.FormalParameter, OpSchema.Attribute, OpSchema.AttrType
    floats, codes = ("T1", ["tensor(float)"], ""), ("T2", ["tensor(uint8)"], "")
    if not has("MatMulNBits", "com.microsoft"):
        register_schema(
            OpSchema(
                "MatMulNBits",
                "com.microsoft",
                1,
                inputs=[arg("A", "T1"), arg("B", "T2"), arg("scales", "T1")],
                outputs=[arg("Y", "T1")],
                type_constraints=[floats, codes],
                attributes=[attr(n, kind.INT, "") for n in ("K", "N", "bits", "block_size", "accuracy_level")],
            )
        )
    if not has("GatherBlockQuantized", "com.microsoft"):
        register_schema(
            OpSchema(
                "GatherBlockQuantized",
                "com.microsoft",
                1,
                inputs=[arg("data", "T2"), arg("indices", "Tind"), arg("scales", "T1")],
                outputs=[arg("output", "T1")],
                type_constraints=[floats, codes, ("Tind", ["tensor(int64)", "tensor(int32)"], "")],
                attributes=[attr(n, kind.INT, "") for n in ("gather_axis", "quantize_axis", "block_size", "bits")],
            )
        )


def translations() -> dict:
    """torch.onnx.export's custom_translation_table for the two ops."""
    from onnxscript.values import Opset

    _register_schemas()
    msft = Opset("com.microsoft", 1)

    def matmul(x, data, scales, bits: int, block: int):
        n, blocks = data.shape[0], data.shape[1]
        return msft.MatMulNBits(x, data, scales, K=blocks * block, N=n, bits=bits, block_size=block, accuracy_level=4)

    def gather(data, indices, scales, bits: int, block: int):
        return msft.GatherBlockQuantized(
            data, indices, scales, gather_axis=0, quantize_axis=1, block_size=block, bits=bits
        )

    return {torch.ops.edgekv.matmul_nbits.default: matmul, torch.ops.edgekv.gather_nbits.default: gather}


class NBitsLinear(nn.Module):
    """A linear layer whose weight [N, K] is stored as MatMulNBits stores it. int4 is affine (exporter/quantize.py):
    the codes of affine_int4 with the ops' default zero point 8 are the symmetric part, and y gains the product of
    x's group sums with fp16 offsets [N, K / group] (exporter.quantize.OffsetLinear's numbers)."""

    def __init__(self, weight: Tensor, bias: Tensor | None, quant: Quantization):
        super().__init__()
        n, k = weight.shape
        self.bits, self.group = quant.bits, quant.group_size
        offset = None
        if quant.bits == 4:
            q, scale, zero = by_rows(lambda w: affine_int4(w, self.group), weight.detach())
            offset = (scale * (8 - zero)).half()
            q = q[:, 0::2] | (q[:, 1::2] << 4)
        else:
            codes, scale = by_rows(lambda w: block_quantize(w.numpy(), quant.bits, self.group), weight.detach())
            q, scale = torch.from_numpy((codes + 2 ** (quant.bits - 1)).astype(np.uint8)), torch.from_numpy(scale)
        self.register_buffer("data", q.reshape(n, k // self.group, -1).contiguous())
        self.register_buffer("scales", scale.float().reshape(-1).contiguous())
        self.register_buffer("offset", offset)
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())

    def forward(self, x: Tensor) -> Tensor:
        y = torch.ops.edgekv.matmul_nbits(x, self.data, self.scales, self.bits, self.group)
        if self.bias is not None:
            y = y + self.bias
        if self.offset is not None:
            y = y + F.linear(x.unflatten(-1, (-1, self.group)).sum(-1), self.offset.float())
        return y


class NBitsEmbedding(nn.Module):
    """The lookup of a table quantized as an NBitsLinear, through GatherBlockQuantized; affine int4 adds each row's
    offsets, repeated over their group. Tied to the output projection (`tied`), it reads that layer's bytes through
    a reshape in the graph, which onnxruntime folds at load (stored once); else it holds them in the op's layout, as
    constants (OpenVINO's frontend takes nothing else)."""

    def __init__(self, table: NBitsLinear, tied: bool = False):
        super().__init__()
        self.bits, self.group = table.bits, table.group
        if tied:
            self.table = table
        else:
            rows = table.data.shape[0]
            self.register_buffer("data", table.data.reshape(rows, -1))
            self.register_buffer("scales", table.scales.reshape(rows, -1))
            self.register_buffer("offset", table.offset)

    def forward(self, tokens: Tensor) -> Tensor:
        if hasattr(self, "table"):
            rows = self.table.data.shape[0]
            data, scales, offset = self.table.data.view(rows, -1), self.table.scales.view(rows, -1), self.table.offset
        else:
            data, scales, offset = self.data, self.scales, self.offset
        x = torch.ops.edgekv.gather_nbits(data, tokens, scales, self.bits, self.group)
        if offset is not None:
            off = F.embedding(tokens, offset.float())
            x = x + off.unsqueeze(-1).expand(*off.shape, self.group).flatten(-2)
        return x


def pack(module: nn.Module, quant: Quantization) -> nn.Module:
    if isinstance(module, nn.Embedding):
        return NBitsEmbedding(NBitsLinear(module.weight, None, quant))
    return NBitsLinear(module.weight, module.bias, quant)


def pack_tied(embedding: nn.Embedding, head: nn.Linear, quant: Quantization) -> tuple[nn.Module, nn.Module]:
    table = NBitsLinear(head.weight, None, quant)
    return NBitsEmbedding(table, tied=True), table
