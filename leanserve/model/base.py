"""What every model family shares: the decoder stack around its layers, logits, weight loading."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Iterable

import torch
from torch import nn

from leanserve import env, kernels
from leanserve.model.attention import AttentionMetadata
from leanserve.model.config import ModelConfig
from leanserve.model.native import NativeDecodePlan
from leanserve.model.quant import AMX_KERNEL_ROWS, KERNEL_ROWS, QUANT_ONLY_ROWS, QuantWeight, five_bits_pay, qmatmul

# HF checkpoint names of the separate projections -> (fused parameter, shard index)
STACKED = {
    "q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
    "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1),
}


class CausalLM(nn.Module):
    """A decoder-only LM over a flat token batch. Subclasses build ``self.layers`` and may override
    ``embed`` and ``rope_for``; names of parameters follow HF checkpoints (``model.layers.N...``)."""

    norm_offset = 0.0  # RMSNorm weight stored as a delta from this (Gemma: 1.0)

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.model.layers = nn.ModuleList()
        from leanserve.model.layers import RMSNorm
        self.model.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, self.norm_offset)
        from leanserve.model.layers import Linear
        self.lm_head = None if cfg.tie_word_embeddings else Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.lm_head_q: QuantWeight | None = None  # tied LM head in quantized blocks
        # the embedding table in quantized blocks where they are its only copy (embed_tokens.weight
        # then is a meta tensor); lookups dequantize the rows they take
        self.embed_q: QuantWeight | None = None
        self.lm_head_amx: torch.Tensor | None = None  # tied LM head packed for the AMX kernel
        # CPU steps in which every sequence decodes run all layers in one native call where the family
        # has native_layer_norms and the kernels apply (model/native.py; LEANSERVE_NATIVE_DECODE=0: never)
        self.native_decode = env.native_decode_enabled()
        self._plan: NativeDecodePlan | None | bool = False  # False: not built yet; None: does not apply

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.embed_q is not None:
            return self.embed_q.lookup(input_ids, self.model.embed_tokens.weight.dtype)
        return self.model.embed_tokens(input_ids)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                kv_caches: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        # input_ids, positions: (num_tokens,) -> hidden states (num_tokens, hidden_size)
        if meta.context_lens:
            self.ensure_positions(max(meta.context_lens))
        if self.native_decode and meta.decode_rows is not None and not meta.prefills:
            from leanserve.model import layers

            plan = self.native_plan()
            if plan is not None and plan.takes(kv_caches) and (ops := layers._fused_ops()) is not None:
                h = ops.decode_layers(self.embed(input_ids), positions, meta.slot_mapping, meta.decode_tables,
                                      meta.decode_lens, [t for kv in kv_caches for t in kv], plan.weights,
                                      plan.ints, plan.floats)
                return self.model.norm(h)
        h = self.embed(input_ids)
        for layer, kv_cache in zip(self.model.layers, kv_caches):
            h = layer(h, positions, kv_cache, meta)
        return self.model.norm(h)

    def shallow_prefix(self, num_layers: int) -> CausalLM:
        """The same model cut after its first ``num_layers`` layers, ending in its own final norm and
        LM head (a self-draft for speculative decoding). Shares every weight: no memory but the KV
        cache its caller keeps for it."""
        if not 1 <= num_layers < self.cfg.num_layers:
            raise ValueError(f"a shallow prefix needs 1 to {self.cfg.num_layers - 1} layers, got {num_layers}")
        view = copy.copy(self)  # a new module over the same parameters; its own child table below
        view.__dict__["_modules"] = dict(self._modules)
        inner = nn.Module()
        inner.embed_tokens = self.model.embed_tokens
        inner.layers = nn.ModuleList(list(self.model.layers)[:num_layers])
        inner.norm = self.model.norm
        view.model = inner
        view.cfg = dataclasses.replace(self.cfg, num_layers=num_layers, layer_windows=self.cfg.layer_windows[:num_layers])
        view._plan = False  # its native loop runs only its layers
        return view

    def ensure_positions(self, positions: int) -> None:
        """Rotary tables for ``positions`` positions; the native loop's arguments are rebuilt when
        they grew (a shallow prefix sharing them sees the new length too)."""
        ropes = self.__dict__.get("_ropes")
        if ropes is None:  # found once (a walk over every module took ~170 us a step)
            from leanserve.model.layers import RotaryEmbedding

            ropes = self.__dict__["_ropes"] = [m for m in self.modules() if isinstance(m, RotaryEmbedding)]
        if not all(positions <= r.cos.shape[0] for r in ropes):
            for r in ropes:
                r.ensure(positions)
        if isinstance(self._plan, NativeDecodePlan) and self._plan.positions < positions:
            self._plan = False

    def native_layer_norms(self, layer: nn.Module) -> tuple[nn.Module | None, ...] | None:
        """A layer's RMSNorms in the native loop's four places (input, after attention, before the MLP,
        after the MLP; None where there is none), or None: the family has no native loop."""
        return None

    def native_plan(self) -> NativeDecodePlan | None:
        """The native loop's arguments, built on first use (after loading: weights, their quantized
        blocks and AMX packing are final by then); None where it does not apply. Set ``_plan = False``
        to rebuild after changing the model."""
        if self._plan is False:
            self._plan = NativeDecodePlan.build(self)
        return self._plan

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        # (num_rows, hidden_size) -> (num_rows, vocab_size)
        if self.lm_head is not None:
            return self.lm_head(hidden)
        if self.lm_head_q is not None and (hidden.shape[0] <= self.lm_head_q.max_rows or self.embed_q is not None):
            return qmatmul(hidden, self.lm_head_q)  # the kernel up to max_rows; above, blocks only: tiles
        if self.lm_head_amx is not None and hidden.dtype == torch.bfloat16 and hidden.dim() == 2:
            return kernels.ops().amx_linear(hidden, self.lm_head_amx)
        return hidden @ self.model.embed_tokens.weight.t()

    @torch.no_grad()  # Linear weights require grad (nn.Linear's default): a packed copy made with
    # grad on would hold its weight alive through its autograd node
    def attach_amx(self) -> None:
        """Pack every bfloat16 matmul weight whose shape the AMX kernel takes (N and K multiples
        of 32) for ``amx_linear``; the caller checked ``kernels.amx_available()``. A packed Linear
        then runs only on its packed copy, so its plain weight is released (replaced by a meta
        tensor, which has no storage: shapes and parameter counts stay right); the tied embedding
        stays, as lookups read it."""
        ops = kernels.ops()

        def pack(w: torch.Tensor) -> torch.Tensor | None:
            if w.is_meta or w.dtype != torch.bfloat16 or not w.is_cpu or w.dim() != 2 or w.shape[0] % 32 or w.shape[1] % 32:
                return None
            return ops.amx_pack(w)

        from leanserve.model.layers import Linear
        for m in self.modules():
            if isinstance(m, Linear):
                m.amx = pack(m.weight)
                if m.amx is not None:
                    m.weight = nn.Parameter(torch.empty_like(m.weight, device="meta"), requires_grad=False)
                    if m.qweight is not None:
                        m.qweight.max_rows = min(m.qweight.max_rows, AMX_KERNEL_ROWS)
        if self.lm_head is None:
            self.lm_head_amx = pack(self.model.embed_tokens.weight)
            if self.lm_head_amx is not None and self.lm_head_q is not None:
                self.lm_head_q.max_rows = min(self.lm_head_q.max_rows, AMX_KERNEL_ROWS)

    def small_step_reads(self) -> tuple[tuple[int, int], ...]:
        """Where small steps read the weights' quantized blocks: ((rows, bytes), ...), ascending, each
        the weight bytes (layers and LM head) a step of at most ``rows`` tokens reads; () if none.
        A matmul uses its blocks up to its own ``max_rows`` and its float (or packed) weight above,
        or its blocks again where they are its only copy."""
        parts = []  # (max_rows or 0, bytes below or at it, bytes above it)
        for m in self.modules():
            if isinstance(getattr(m, "weight", None), torch.Tensor) and hasattr(m, "qweight"):
                q = m.qweight
                dense = (m.amx.nbytes if m.amx is not None else q.nbytes if m.weight.is_meta
                         else m.weight.numel() * m.weight.element_size())
                parts.append((q.max_rows, q.nbytes, dense) if q is not None else (0, dense, dense))
        if self.lm_head is None:  # tied: the embedding table (an untied head is a Linear, counted above)
            emb = self.model.embed_tokens.weight
            q = self.lm_head_q
            dense = q.nbytes if emb.is_meta else emb.numel() * emb.element_size()
            parts.append((q.max_rows, q.nbytes, dense) if q is not None else (0, dense, dense))
        rows = sorted({r for r, _, _ in parts if r > 0})
        return tuple((r, sum(b if r <= mr else d for mr, b, d in parts)) for r in rows)

    def quantized_summary(self) -> str:
        """E.g. '121 of 121 matmuls in 4/8-bit GGUF blocks only (115 MB), the native kernel up to 16
        rows, tiles dequantized above'; '121 of 121 matmuls also in ... blocks (115 MB), read ... up to
        4 rows; 121 packed for AMX (269 MB)'; '' if neither."""
        linears = [m for m in self.modules() if hasattr(m, "qweight")]
        total = len(linears) + (1 if self.lm_head is None else 0)
        parts = []
        quant = [m.qweight for m in linears if m.qweight is not None] + ([self.lm_head_q] if self.lm_head_q else [])
        only = sum(1 for m in linears if m.qweight is not None and m.weight.is_meta)
        only += 1 if self.lm_head is None and self.lm_head_q is not None and self.model.embed_tokens.weight.is_meta else 0
        if quant:
            bits = "/".join(str(b) for b in sorted({q.bits for q in quant}))
            rows = "/".join(str(r) for r in sorted({q.max_rows for q in quant}))
            mb = sum(q.nbytes for q in quant) / 1e6
            if only == len(quant):
                parts.append(f"{len(quant)} of {total} matmuls in {bits}-bit GGUF blocks only ({mb:.0f} MB, no float "
                             f"copy): the native kernel up to {rows} rows, tiles dequantized for the dense matmul above")
            else:
                parts.append(f"{len(quant)} of {total} matmuls also in {bits}-bit GGUF blocks "
                             f"({mb:.0f} MB), read by the native kernel up to {rows} rows")
        amx = [m.amx for m in linears if m.amx is not None] + ([self.lm_head_amx] if self.lm_head_amx is not None else [])
        if amx:
            parts.append(f"{len(amx)} of {total} matmuls packed for AMX ({sum(a.nbytes for a in amx) / 1e6:.0f} MB)")
        return "; ".join(parts)

    @torch.no_grad()
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor | QuantWeight]], float_weights: bool = True) -> None:
        """Copy HF-named tensors into the (partly fused) parameters; every parameter must be set.

        A matmul weight may come as a ``QuantWeight`` (GGUF blocks, CPU with the native kernels): the
        layer (or tied LM head) then runs on the blocks, and its float parameter holds the same values
        dequantized if ``float_weights``, else nothing (a ``meta`` tensor: the blocks are the only copy,
        and, as the float parameter was never written, no memory was used for it). A fused layer's
        parts in different formats meet in the wider one (``QuantWeight.cat``); parts that cannot meet
        (different widths) leave the layer with float weights."""
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        blocks: dict[str, dict[int, QuantWeight]] = {}  # fused parameter -> its parts' blocks, by shard
        for name, tensor in weights:
            if "rotary_emb" in name or (self.lm_head is None and name.startswith("lm_head.")):
                continue
            parts = name.split(".")
            shard = None
            if len(parts) >= 2 and parts[-2] in STACKED:
                fused, shard = STACKED[parts[-2]]
                parts[-2] = fused
            target = ".".join(parts)
            if target not in params:
                raise ValueError(f"checkpoint tensor {name!r} has no place in {type(self).__name__}")
            param = params[target]
            if isinstance(tensor, QuantWeight):
                rows = self._shard_sizes(parts[-2])[shard] if shard is not None else param.shape[0]
                if tensor.shape != (rows, param.shape[1]):
                    raise ValueError(f"{name}: checkpoint shape {tensor.shape} != model shape {(rows, param.shape[1])}")
                blocks.setdefault(target, {})[shard or 0] = tensor
                loaded.add(target if shard is None else f"{target}#{shard}")
                continue
            if shard is None:
                if param.shape != tensor.shape:
                    raise ValueError(f"{name}: checkpoint shape {tuple(tensor.shape)} != model shape {tuple(param.shape)}")
                param.copy_(tensor)
                loaded.add(target)
            else:
                sizes = self._shard_sizes(parts[-2])
                start = sum(sizes[:shard])
                if tensor.shape[0] != sizes[shard] or tensor.shape[1:] != param.shape[1:]:
                    raise ValueError(f"{name}: checkpoint shape {tuple(tensor.shape)} does not fit shard {shard} of {target}")
                param[start:start + sizes[shard]].copy_(tensor)
                loaded.add(f"{target}#{shard}")
        expected = set()
        for pname in params:
            fused = pname.split(".")[-2] if "." in pname else ""
            if fused in ("qkv_proj", "gate_up_proj"):
                expected.update(f"{pname}#{i}" for i in range(len(self._shard_sizes(fused))))
            else:
                expected.add(pname)
        missing = sorted(expected - loaded)
        if missing:
            raise ValueError(f"checkpoint is missing {len(missing)} tensors, e.g. {', '.join(missing[:3])}")
        self._place_blocks(params, blocks, float_weights)

    def _place_blocks(self, params: dict[str, nn.Parameter], blocks: dict[str, dict[int, QuantWeight]],
                      float_weights: bool) -> None:
        modules = dict(self.named_modules())
        dtype = self.model.embed_tokens.weight.dtype
        rows_with_copy, rows_alone = KERNEL_ROWS[dtype], QUANT_ONLY_ROWS[dtype]  # (layers, LM head); by bits
        five_bits = five_bits_pay(dtype)
        for target, shards in blocks.items():
            module_name = target.removesuffix(".weight")
            parts = [shards[i] for i in range(len(shards))]
            qw = QuantWeight.cat(parts) if len(parts) > 1 else parts[0]
            if qw is not None and qw.bits == 5 and not five_bits:
                qw = qw.widened(8)
            head = target in ("model.embed_tokens.weight", "lm_head.weight")
            embedding = target == "model.embed_tokens.weight"
            keep_float = float_weights or qw is None
            if keep_float:  # the float parameter holds the blocks' values
                start = 0
                for part in parts:
                    params[target][start:start + part.shape[0]].copy_(part.dequantize())
                    start += part.shape[0]
            if qw is None or (embedding and self.lm_head is not None and keep_float):
                continue  # parts that cannot meet: float only; an untied embedding with a float copy: lookups only
            qw.max_rows = rows_with_copy[1 if head else 0] if keep_float else rows_alone[qw.bits]
            if embedding:
                if self.lm_head is None:
                    self.lm_head_q = qw
                if not keep_float:
                    self.embed_q = qw
            else:
                modules[module_name].qweight = qw
            if not keep_float:
                module = modules[module_name]
                module.weight = nn.Parameter(torch.empty_like(params[target], device="meta"), requires_grad=False)

    def _shard_sizes(self, fused: str) -> list[int]:
        c = self.cfg
        if fused == "qkv_proj":
            return [c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim, c.num_kv_heads * c.head_dim]
        return [c.intermediate_size, c.intermediate_size]
