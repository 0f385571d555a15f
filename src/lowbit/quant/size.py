"""What a quantized model needs when packed: bits x count for quantized weights, float32 for their
scales and for everything left float (first/last layers, biases, BatchNorm parameters and running
statistics). Training-only parts (FDA's noise adaptation module) are not counted."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from torch import nn

from lowbit.quant.layers import QUANT_LAYERS
from lowbit.quant.quantizers import NoiseAdaptation, Quantizer
from lowbit.table import markdown_table


@dataclass
class SizeRow:
    name: str
    kind: str  # module class
    weight_bits: float  # bits per weight as packed (32 for float layers)
    params: int  # parameters and inference buffers counted
    packed_bytes: int
    float32_bytes: int


@dataclass
class ModelSize:
    packed_bytes: int
    float32_bytes: int
    rows: list[SizeRow] = field(default_factory=list)

    @property
    def compression(self) -> float:
        """float32 bytes / packed bytes."""
        return self.float32_bytes / max(self.packed_bytes, 1)

    def __str__(self) -> str:
        rows = [[r.name or "(root)", r.kind, r.weight_bits, r.params, r.packed_bytes, r.float32_bytes] for r in self.rows]
        rows.append(["total", "", "", sum(r.params for r in self.rows), self.packed_bytes, self.float32_bytes])
        return (markdown_table(["layer", "type", "weight bits", "values", "packed bytes", "float32 bytes"], rows)
                + f"\ncompression: {self.compression:.1f}x")


def _float_count(m: nn.Module, skip_weight: bool = False) -> int:
    n = sum(p.numel() for name, p in m.named_parameters(recurse=False) if not (skip_weight and name == "weight"))
    n += sum(b.numel() for name, b in m.named_buffers(recurse=False) if name != "num_batches_tracked")
    return n


def _training_only(name: str, model: nn.Module) -> bool:
    parts = name.split(".")
    return any(isinstance(model.get_submodule(".".join(parts[:i])), (Quantizer, NoiseAdaptation)) for i in range(1, len(parts) + 1))


def model_size(model: nn.Module) -> ModelSize:
    """Packed size of ``model`` against float32, per layer (see module docstring for what counts)."""
    rows: list[SizeRow] = []
    for name, m in model.named_modules():
        if _training_only(name, model) if name else False:
            continue  # quantizers are counted with their layer; noise adaptation is dropped at inference
        if isinstance(m, QUANT_LAYERS):
            wq = m.weight_quantizer
            fixed = getattr(m, "weight_bits", None)  # post-training quantized: weights already on the grid
            bits = float(wq.storage_bits) if wq is not None else float(fixed or 32)
            scales = wq.num_scales(m.weight) if wq is not None else (m.weight.shape[0] if fixed else 0)
            scales += 0 if m.input_quantizer is None else m.input_quantizer.num_scales(m.weight)
            rest = _float_count(m, skip_weight=True)
            packed = math.ceil(m.weight.numel() * bits / 8) + 4 * (scales + rest)
            rows.append(SizeRow(name, type(m).__name__, bits, m.weight.numel() + rest, packed, 4 * (m.weight.numel() + rest)))
            continue
        stored = getattr(m, "stored_size", None)
        if stored is not None:  # an exported (packed) layer: its real bytes against its float32 layer
            packed, values = stored()
            rows.append(SizeRow(name, type(m).__name__, round(8 * packed / max(values, 1), 2), values, packed, 4 * values))
            continue
        n = _float_count(m)
        if n:
            rows.append(SizeRow(name, type(m).__name__, 32.0, n, 4 * n, 4 * n))
    return ModelSize(sum(r.packed_bytes for r in rows), sum(r.float32_bytes for r in rows), rows)


def summary(model: nn.Module) -> str:
    """Per-layer table (larq-style): quantizers, bits, values and packed bytes, then the totals."""
    lines = []
    recipe = getattr(model, "lowbit_recipe", None)
    if recipe:
        lines.append(f"recipe: {recipe['name']}")
    exported = getattr(model, "lowbit_export", None)
    if exported:
        lines.append(f"exported: {len(exported['packed'])} packed layers; "
                     + (f"kept float: {', '.join(exported['float'])}" if exported["float"] else "no float weight layer left"))
    qrows = [[n, type(m).__name__, _describe(m.weight_quantizer), _describe(m.input_quantizer),
              m.grad_quantizer.bits if m.grad_quantizer is not None else "-"]
             for n, m in model.named_modules() if isinstance(m, QUANT_LAYERS)]
    if qrows:
        lines.append(markdown_table(["layer", "type", "weight quantizer", "input quantizer", "grad bits"], qrows))
    lines.append(str(model_size(model)))
    return "\n\n".join(lines)


def _describe(q) -> str:
    return "float" if q is None else f"{type(q).__name__}({q.extra_repr()})"
